"""calib.bos / eval.ppl.bos: calibration windows and perplexity chunks start with the tokenizer's BOS token when the
tokenizer adds one (auto), or as asked (true / false); results.json records what was used, and every cache keyed by
the tokens tells the two apart. SmolLM2's tokenizer adds no BOS: its tokens and numbers are those of before."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import CONF, TINY, run_svdexp
from svdexp.config import CONFIG_DIR
from svdexp.data import bos_record, calibration_batch, eval_chunks, load_text, run_tokens, tokenize_text
from svdexp.data.sampling import adds_bos
from svdexp.errors import ConfigError
from svdexp.models.loading import _packaged_tokenizer
from svdexp.runner import compressing

TINY_MODEL = OmegaConf.load(CONF / "model" / "tiny_random.yaml")


def tokens(cfg, tokenizer):
    """The token sets of the run ``cfg``, as the runner makes them."""
    return run_tokens(cfg, tokenizer, compressing(cfg))


def bos_used(cfg, tokenizer) -> dict[str, bool]:
    """results.json's ``bos`` of the run ``cfg``, as the runner records it."""
    return bos_record(cfg, tokenizer, compressing(cfg))


def smollm2_tokenizer():
    """The tokenizer of the tiny model (SmolLM2's: it has a BOS token, <|im_start|>, and does not add it)."""
    return copy.deepcopy(_packaged_tokenizer(TINY_MODEL.package, TINY_MODEL.gguf_file))


def bos_adding_tokenizer():
    """SmolLM2's tokenizer made to add its BOS token, as Gemma's or LLaMA's do."""
    tokenizer = smollm2_tokenizer()
    tokenizer.add_bos_token = True
    return tokenizer


def no_bos_tokenizer():
    tokenizer = smollm2_tokenizer()
    tokenizer.bos_token = None
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer_folders(tmp_path_factory):
    """Tokenizer folders for ``model.path`` of the tiny random model: one that adds BOS, one without a BOS token."""
    root = tmp_path_factory.mktemp("tokenizers")
    bos_adding_tokenizer().save_pretrained(root / "adds_bos")
    no_bos_tokenizer().save_pretrained(root / "no_bos")
    return root


def config(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=[*TINY, *overrides])


def test_the_test_tokenizers_are_what_they_claim():
    plain, adding, none = smollm2_tokenizer(), bos_adding_tokenizer(), no_bos_tokenizer()
    assert plain.bos_token_id is not None and plain("a b").input_ids[0] != plain.bos_token_id
    assert adding("a b").input_ids == [adding.bos_token_id, *plain("a b").input_ids]
    assert none.bos_token_id is None and none("a b").input_ids == plain("a b").input_ids
    assert (adds_bos(plain), adds_bos(adding), adds_bos(none)) == (False, True, False)


def test_windows_and_chunks_start_with_one_bos_then_text():
    tokenizer = bos_adding_tokenizer()
    bos = tokenizer.bos_token_id
    cfg = config("eval.ppl.max_chunks=null")                     # auto, compressing (svd_llm at 0.2)
    eval_sets, calib = tokens(cfg, tokenizer)
    assert bos_used(cfg, tokenizer) == {"calib": True, "ppl": True}
    for name, chunks in eval_sets.items():
        stream = tokenize_text(tokenizer, load_text(name, "test"))   # the tokenizer's default: BOS first
        assert stream[0] == bos and (stream[1:] != bos).all()    # the tokenizer's own BOS, once, at the start
        n = chunks.shape[0]
        assert chunks.shape == (n, 64) and n == (stream.numel() - 1) // 63
        assert (chunks[:, 0] == bos).all() and (chunks[:, 1:] != bos).all()   # one BOS per chunk, never doubled
        assert torch.equal(chunks[:, 1:].reshape(-1), stream[1:1 + n * 63])   # then the text, no token skipped
    stream = tokenize_text(tokenizer, load_text("wiki", "train"))[1:]
    assert calib.shape == (4, 64) and (calib[:, 0] == bos).all() and (calib[:, 1:] != bos).all()
    for window in calib:           # each window's text is a contiguous run of the text's tokens
        starts = (stream[:-62] == window[1]).nonzero().flatten().tolist()
        assert any(torch.equal(stream[s:s + 63], window[1:]) for s in starts)


def test_bos_false_and_auto_are_todays_tokens_for_a_tokenizer_that_adds_none():
    tokenizer = smollm2_tokenizer()
    auto, off = tokens(config(), tokenizer), tokens(config("calib.bos=false", "eval.ppl.bos=false"), tokenizer)
    assert bos_used(config(), tokenizer) == {"calib": False, "ppl": False}
    before = ({name: eval_chunks(tokenize_text(tokenizer, load_text(name, "test")), 64, 2) for name in ["wiki", "news"]},
              calibration_batch(tokenize_text(tokenizer, load_text("wiki", "train")), 4, 64, 0))
    for got in (auto, off):
        assert got[0].keys() == before[0].keys()
        assert all(torch.equal(got[0][name], before[0][name]) for name in before[0])
        assert torch.equal(got[1], before[1])
    assert (before[1][:, 0] != tokenizer.bos_token_id).any()


def test_bos_false_with_a_tokenizer_that_adds_bos_keeps_todays_stream():
    """false: today's tokens, where only the text's first token is the tokenizer's own BOS."""
    tokenizer = bos_adding_tokenizer()
    eval_sets, calib = tokens(config("calib.bos=false", "eval.ppl.bos=false"), tokenizer)
    wiki = eval_chunks(tokenize_text(tokenizer, load_text("wiki", "test")), 64, 2)
    assert torch.equal(eval_sets["wiki"], wiki) and wiki[0, 0] == tokenizer.bos_token_id != wiki[1, 0]
    assert bos_used(config("calib.bos=false", "eval.ppl.bos=false"), tokenizer) == \
        {"calib": False, "ppl": False}


def test_true_puts_the_bos_of_a_tokenizer_that_does_not_add_it():
    tokenizer = smollm2_tokenizer()
    eval_sets, calib = tokens(config("calib.bos=true", "eval.ppl.bos=false"), tokenizer)
    assert (calib[:, 0] == tokenizer.bos_token_id).all() and (calib[:, 1:] != tokenizer.bos_token_id).all()
    assert (eval_sets["wiki"][:, 0] != tokenizer.bos_token_id).all()
    eval_sets, calib = tokens(config("calib.bos=false", "eval.ppl.bos=true"), tokenizer)
    stream = tokenize_text(tokenizer, load_text("news", "test"))
    assert torch.equal(eval_sets["news"], torch.cat([torch.ones(2, 1, dtype=torch.long), stream[:126].view(2, 63)], 1))
    assert (calib[:, 0] != tokenizer.bos_token_id).any()


def test_calib_bos_of_a_run_that_does_not_compress_is_false_and_unchecked():
    tokenizer = no_bos_tokenizer()
    assert bos_used(config("method=none", "calib.bos=true"), tokenizer) == {"calib": False, "ppl": False}
    eval_sets, calib = tokens(config("method=none", "calib.bos=true"), tokenizer)
    assert calib is None
    with pytest.raises(ConfigError, match=r"eval.ppl.bos=true .* has none .*choose one of: auto"):
        tokens(config("method=none", "eval.ppl.bos=true"), tokenizer)


@pytest.mark.slow   # several full app runs: make test, not make test-fast
def test_results_record_the_choice_and_cache_keys_tell_bos_apart(tmp_path):
    """SmolLM2's tokenizer: auto and false give the same numbers (the statistics and dense perplexity of the first run
    are found again); true (its <|im_start|> first) gives others, computed anew, not found in the cache."""
    cache = tmp_path / "cache"

    def run(name: str, *overrides: str) -> dict:
        proc = run_svdexp([*TINY, "eval.dense_baseline=true", *overrides], tmp_path / name, cache=cache)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads((tmp_path / name / "results.json").read_text())

    auto = run("auto")
    off = run("off", "calib.bos=false", "eval.ppl.bos=false")
    on = run("on", "calib.bos=true", "eval.ppl.bos=true")
    assert (auto["bos"], off["bos"], on["bos"]) == ({"calib": False, "ppl": False}, {"calib": False, "ppl": False},
                                                     {"calib": True, "ppl": True})
    assert (auto["config"]["calib"]["bos"], auto["config"]["eval"]["ppl"]["bos"]) == ("auto", "auto")
    assert auto["compression"]["statistics"]["computed"] and not auto["compression"]["statistics"]["cached"]
    assert off["compression"]["statistics"]["cached"] and not off["compression"]["statistics"]["computed"]
    assert set(off["compression"]["statistics"]["cached"]) <= set(auto["compression"]["statistics"]["computed"])
    assert off["metrics"] == auto["metrics"] and off["compression"]["ranks"] == auto["compression"]["ranks"]
    assert not on["compression"]["statistics"]["cached"]
    assert on["compression"]["statistics"]["computed"] == auto["compression"]["statistics"]["computed"]
    for name in ("wiki", "news"):
        assert on["metrics"]["dense_ppl"][name] != auto["metrics"]["dense_ppl"][name]
        assert on["metrics"]["ppl"][name] != auto["metrics"]["ppl"][name]
        assert on["metrics"]["eval_tokens"][name] == auto["metrics"]["eval_tokens"][name] == 2 * 63


def test_auto_follows_the_tokenizer_through_the_app(tmp_path, tokenizer_folders):
    model = ["model.package=null", "model.gguf_file=null", f"model.path={tokenizer_folders / 'adds_bos'}"]
    proc = run_svdexp([*TINY, *model, "method=svd"], tmp_path / "run", cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["bos"] == {"calib": True, "ppl": True}
    assert results["metrics"]["eval_tokens"] == {"wiki": 2 * 63, "news": 2 * 63}


@pytest.mark.parametrize("key", ["calib.bos", "eval.ppl.bos"])
def test_true_without_a_bos_token_is_refused(tmp_path, tokenizer_folders, key):
    model = ["model.package=null", "model.gguf_file=null", f"model.path={tokenizer_folders / 'no_bos'}"]
    proc = run_svdexp([*TINY, *model, f"{key}=true"], tmp_path / "run", cache=tmp_path / "cache")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"configuration error: {key}=true asks for a BOS token" in proc.stderr
    assert "choose one of: auto (the tokenizer's own setting: here no BOS), false." in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "results.json").exists()
    assert not (tmp_path / "cache" / "stats").exists()


@pytest.mark.parametrize("value", ["true", "false", "auto", "True", "'false'"])
def test_every_spelling_of_the_choices_is_accepted(value):
    from svdexp.config import validate

    validate(config(f"calib.bos={value}", f"eval.ppl.bos={value}"))
