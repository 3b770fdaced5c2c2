"""Bad input exits non-zero before any heavy work, with a one-paragraph message naming the value and what is
allowed, and leaves no results.json and no cache entry. In-process through the app's main (the exit code and
stderr the shell would see); one real process per exit code (2 here, 3 and 4) proves what the shell sees."""

import json

import pytest
import torch

from conftest import CONF, TINY, run_process, run_svdexp
from svdexp.data import calibration_batch
from svdexp.errors import ConfigError


def run_bad(tmp_path, *overrides):
    run_dir = tmp_path / "run"
    proc = run_svdexp([*TINY, *overrides], run_dir, cache=tmp_path / "cache")
    assert proc.returncode != 0
    assert not (run_dir / "results.json").exists()
    assert not (tmp_path / "cache" / "stats").exists()
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr


@pytest.mark.parametrize("overrides,expected", [
    (["ratio=1.5"], "ratio=1.5 must be a number in [0, 1)"),
    (["ratio=-0.1"], "ratio=-0.1 must be a number in [0, 1)"),
    (["ratio=abc"], "ratio"),
    (["method=magic"], "Available options in 'method'"),
    (["model=gpt17"], "Available options in 'model'"),
    (["allocation=greedy"], "Available options in 'allocation'"),
    (["calib=imdb"], "Available options in 'calib'"),
    (["calib.num_samples=0"], "calib.num_samples=0 must be a positive integer"),
    (["calib.num_samples=2.5"], "num_samples"),
    (["device=cuda"], "no CUDA device"),
    (["eval.ppl.datasets=[wiki,imdb]"], "eval.ppl.datasets[]='imdb' is not allowed; choose one of: c4, news"),
    (["eval.zeroshot.tasks=[arc_easy_embeded]"], "arc_easy_embedded"),
    (["eval.zeroshot.dtype=int8"], "eval.zeroshot.dtype='int8' is not allowed; choose one of: bfloat16, float16"),
    (["method.propagate=sideways"], "choose one of: original, compressed"),
    (["calib.seq_len=4096"], "exceeds the model's context of 2048"),
    (["model.family=lama"], "model.family='lama' is not a causal-LM family of the installed transformers; did you mean llama"),
    (["allocation=last_layers", "allocation.num_layers=1", "ratio=0.4"], "2 <= K <= 4"),
    (["allocation=adacr", "allocation.min_keep=0.9", "ratio=0.4"], "0 < min_keep <= 1 - ratio"),
    (["method.alhpa=0.3"], "alhpa"),
])
def test_bad_input_fails_cleanly(tmp_path, overrides, expected):
    stderr = run_bad(tmp_path, *overrides)
    assert expected in stderr, stderr[-2000:]


def test_unknown_method_message_lists_methods(tmp_path):
    stderr = run_bad(tmp_path, "method=magic")
    for name in ("svd", "svd_llm", "none"):
        assert name in stderr


def test_missing_model_folder_and_folder_without_weights(tmp_path):
    stderr = run_bad(tmp_path, "model=llama_7b", f"model.path={tmp_path / 'nowhere'}")
    assert "does not exist" in stderr and "nowhere" in stderr
    empty = tmp_path / "empty_model"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    stderr = run_bad(tmp_path, "model=llama_7b", f"model.path={empty}")
    assert "has no weights" in stderr


def test_calibration_text_shorter_than_one_sample():
    with pytest.raises(ConfigError, match="shorter than one sample of calib.seq_len=512"):
        calibration_batch(torch.arange(300), 4, 512, seed=0)


def test_foreign_callback_target_is_refused(tmp_path):
    stderr = run_bad(tmp_path, "+hydra.callbacks.evil._target_=builtins.dict")
    assert "only svdexp's own classes" in stderr


@pytest.mark.integration
def test_a_bad_value_exits_2_from_the_shell(tmp_path):
    """Exit code 2 as a real process sees it: nothing run, nothing written, no traceback."""
    proc = run_process([*TINY, "ratio=1.5"], tmp_path / "run", tmp_path / "cache")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "ratio=1.5 must be a number in [0, 1)" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "results.json").exists() and not (tmp_path / "cache").exists()


def _nan_model(folder):
    """A tiny random Llama saved to ``folder`` with a NaN in layer 2's up_proj."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from omegaconf import OmegaConf

    from svdexp.models.loading import _package_dir

    tiny = OmegaConf.load(CONF / "model" / "tiny_random.yaml")
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **tiny.tiny))
    with torch.no_grad():
        model.model.layers[2].mlp.up_proj.weight[0, 0] = float("nan")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(_package_dir(tiny.package)), gguf_file=tiny.gguf_file).save_pretrained(folder)
    return [o for o in TINY if not o.startswith("model=")] + ["model=llama_7b", f"model.path={folder}"]


def test_nan_weight_fails_the_run_naming_the_layer(tmp_path):
    """A NaN in the weights is caught where it arises; the run is marked failed, not done (exit 3)."""
    run_dir = tmp_path / "run"
    proc = run_svdexp(_nan_model(tmp_path / "nan_model"), run_dir, cache=tmp_path / "cache")
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "non-finite" in proc.stderr and "model.layers.2" in proc.stderr
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "failed" and "model.layers.2" in results["error"]


@pytest.mark.integration
def test_a_numerical_failure_exits_3_from_the_shell(tmp_path):
    proc = run_process(_nan_model(tmp_path / "nan_model"), tmp_path / "run", tmp_path / "cache")
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "numerical failure" in proc.stderr and "model.layers.2" in proc.stderr
    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "failed"
