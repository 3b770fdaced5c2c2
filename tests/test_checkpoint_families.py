"""Compressed checkpoints of every decoder family: one generic remote-code path and ``load_compressed``.

Per family, a tiny random model (seeded, eval mode) has most of its decoder-layer ``nn.Linear`` / ``Conv1D``
modules replaced by their truncated SVD (some are left dense); it is saved with ``save_compressed`` and read back
(a) with plain ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``, in this process, and (b) with
``load_compressed``. Both must give the in-memory model's logits (within 1e-5) with the same modules at the same
names. Further tests: dtype / device_map through the remote code, the generic ``SvdexpConfig``, refusals at save
and load time, format-1 folders, the remote files' imports, and lm-eval's command line scoring a saved folder.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

import families
from families import FAMILIES, family_params
from svdexp.checkpoint import REMOTE_DIR, REMOTE_FILES, CheckpointError, load_compressed, save_compressed
from svdexp.compression.lowrank import LowRankLinear, rank_for_ratio

RATIO = 0.4
SETTINGS = {"method": "svd", "ratio": RATIO, "allocation": "uniform"}
VOCAB = 256
TOLERANCE = 1e-5
NEW_TOKENS = 4
LAYER = re.compile(r"\.(?:layers|h)\.(\d+)\.")   # model.layers.3.  transformer.h.3.  gpt_neox.layers.3.

# The tiny models of tests/families.py (every family the suite runs), with a small vocabulary: these tests need no
# tokenizer, and a 256-token head keeps each round trip well under a second.
SMALL = {"vocab_size": VOCAB, "max_position_embeddings": 128}


def tiny_config(family: str, **overrides):
    return families.tiny_config(family, **{**SMALL, **overrides})


def tiny_model(family: str, **overrides) -> nn.Module:
    return families.tiny_model(family, **{**SMALL, **overrides})


def dense_candidates(model: nn.Module) -> dict[str, nn.Module]:
    """Every ``nn.Linear`` / ``Conv1D`` inside a decoder layer, by name."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, Conv1D)) and LAYER.search(name)}


def compress_truncated_svd(model: nn.Module) -> dict[str, int]:
    """Replace the decoder-layer dense modules by their rank-``rank_for_ratio`` truncated SVD, except every third
    one of the last layer (left dense); return the rank map. A ``Conv1D``'s matrix is its weight transposed.
    One thread: LAPACK's threaded SVD crawls when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        candidates = dense_candidates(model)
        last = max(int(LAYER.search(name).group(1)) for name in candidates)
        ranks = {}
        for i, (name, module) in enumerate(candidates.items()):
            if int(LAYER.search(name).group(1)) == last and i % 3 == 0:
                continue
            weight = module.weight.detach()
            matrix = weight.T if isinstance(module, Conv1D) else weight   # (out, in)
            rank = rank_for_ratio(matrix.shape[0], matrix.shape[1], RATIO)
            u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
            root = s[:rank].sqrt()
            a, b = (u[:, :rank] * root).contiguous(), (root[:, None] * vh[:rank]).contiguous()
            low = LowRankLinear.from_factors(a, b, None if module.bias is None else module.bias.detach())
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, low)
            ranks[name] = rank
        return ranks
    finally:
        torch.set_num_threads(threads)


def batch() -> torch.Tensor:
    return (torch.arange(24).reshape(2, 12) * 37 + 5) % VOCAB


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def greedy(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                              min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, use_cache=True)


def is_tied(model: nn.Module) -> bool:
    return model.get_output_embeddings().weight is model.get_input_embeddings().weight


def saved_folder(tmp_path: Path, family: str) -> tuple[nn.Module, dict[str, int], dict[str, nn.Module], Path]:
    """The compressed tiny model of ``family``, its rank map, its dense modules before compression, its folder."""
    model = tiny_model(family)
    original = dict(dense_candidates(model))
    ranks = compress_truncated_svd(model)
    # a folder name per family: transformers keys its cache of remote-code modules by the folder's name
    path = save_compressed(model, None, tmp_path / f"svdexp_{family}", ranks, SETTINGS)
    return model, ranks, original, path


# ------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("family", family_params())
def test_round_trip_remote_code_and_load_compressed(family: str, tmp_path: Path) -> None:
    model, ranks, original, path = saved_folder(tmp_path, family)
    assert ranks and {int(LAYER.search(n).group(1)) for n in ranks} == set(range(model.config.num_hidden_layers))
    assert set(original) - set(ranks), "some decoder-layer modules must stay dense"
    if family == "gpt2":
        assert all(isinstance(original[name], Conv1D) for name in ranks)

    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "svdexp" and config["svdexp_base_model_type"] == family
    assert config["svdexp_format_version"] == 2 and config["svdexp_ranks"] == ranks
    assert config["auto_map"] == {"AutoConfig": "configuration_svdexp.SvdexpConfig",
                                  "AutoModelForCausalLM": "modeling_svdexp.SvdexpForCausalLM"}
    with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    for name, rank in ranks.items():
        weight = original[name].weight
        n_in, n_out = (weight.shape[0], weight.shape[1]) if isinstance(original[name], Conv1D) else \
            (weight.shape[1], weight.shape[0])
        assert shapes[f"{name}.B.weight"] == (rank, n_in) and shapes[f"{name}.A.weight"] == (n_out, rank), name
        assert (f"{name}.A.bias" in shapes) == (original[name].bias is not None), name
        assert f"{name}.weight" not in shapes

    ids = batch()
    expected = logits(model, ids)

    # (a) plain transformers, remote code
    remote, info = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True, output_loading_info=True)
    assert not any(info.values()), info
    assert type(remote).__name__ == f"Svdexp{type(model).__name__}" and isinstance(remote, type(model))
    assert not remote.training and remote.config.model_type == family
    assert remote.config.svdexp_ranks == ranks and remote.config.svdexp_settings == SETTINGS
    for name, module in original.items():
        reloaded = remote.get_submodule(name)
        if name in ranks:
            assert type(reloaded).__name__ == "SvdexpLowRankLinear" and reloaded.rank == ranks[name], name
            assert (reloaded.in_features, reloaded.out_features) == (model.get_submodule(name).in_features,
                                                                     model.get_submodule(name).out_features)
        else:
            assert type(reloaded) is type(module), name
    assert is_tied(remote) == is_tied(model)
    remote_state = remote.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, remote_state[key]), key
    assert (logits(remote, ids) - expected).abs().max().item() <= TOLERANCE
    assert torch.equal(greedy(remote, ids), greedy(model, ids))
    # the base configuration survives the trip through config.json
    ignore = {"dtype", "transformers_version", "svdexp_ranks", "svdexp_settings", "svdexp_base_model_type",
              "svdexp_format_version"}
    before = {k: v for k, v in model.config.to_diff_dict().items() if k not in ignore}
    after = {k: v for k, v in remote.config.to_diff_dict().items() if k not in ignore}
    assert after == before

    # (b) svdexp without remote code
    loaded = load_compressed(path)
    assert type(loaded) is type(model) and not loaded.training
    assert {n: m.rank for n, m in loaded.named_modules() if isinstance(m, LowRankLinear)} == ranks
    for name, module in original.items():
        if name not in ranks:
            assert type(loaded.get_submodule(name)) is type(module), name
    assert is_tied(loaded) == is_tied(model)
    loaded_state = loaded.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded_state[key]), key
    for key, value in model.named_buffers():
        assert torch.equal(value, loaded.get_buffer(key)), key
    assert {k: v for k, v in loaded.config.to_diff_dict().items() if k not in ignore} == before
    assert (logits(loaded, ids) - expected).abs().max().item() <= TOLERANCE


def test_remote_code_honours_dtype_and_device_map(tmp_path: Path) -> None:
    """dtype and device_map go through transformers' own loading (a Conv1D family here)."""
    model, ranks, _, path = saved_folder(tmp_path, "gpt2")
    remote = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True, dtype=torch.bfloat16,
                                                  device_map="cpu")
    assert {p.dtype for p in remote.parameters()} == {torch.bfloat16}
    name = next(iter(ranks))
    assert torch.equal(remote.get_submodule(name).A.weight, model.get_submodule(name).A.weight.to(torch.bfloat16))
    assert torch.equal(remote.get_submodule(name).A.bias, model.get_submodule(name).A.bias.to(torch.bfloat16))
    assert remote.lm_head.weight is remote.transformer.wte.weight


def test_a_model_loaded_with_remote_code_saves_again(tmp_path: Path) -> None:
    """Its own save_pretrained writes the svdexp layout with the remote code; save_compressed accepts it too."""
    model, ranks, _, path = saved_folder(tmp_path, "phi3")
    remote = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True)
    ids, expected = batch(), logits(model, batch())

    remote.config.use_cache = False   # a base field PretrainedConfig alone would drop as a generation parameter
    remote.save_pretrained(tmp_path / "resaved")
    config = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert config["model_type"] == "svdexp" and config["svdexp_base_model_type"] == "phi3"
    assert config["use_cache"] is False
    assert config["svdexp_ranks"] == ranks and config["svdexp_settings"] == SETTINGS
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_svdexp.SvdexpForCausalLM"
    for name in REMOTE_FILES:
        assert (tmp_path / "resaved" / name).read_bytes() == (REMOTE_DIR / name).read_bytes()
    again, info = AutoModelForCausalLM.from_pretrained(str(tmp_path / "resaved"), trust_remote_code=True,
                                                       output_loading_info=True)
    assert not any(info.values()), info
    assert again.config.use_cache is False
    assert (logits(again, ids) - expected).abs().max().item() <= TOLERANCE
    assert (logits(load_compressed(tmp_path / "resaved"), ids) - expected).abs().max().item() <= TOLERANCE

    save_compressed(remote, None, tmp_path / "recompressed", ranks, SETTINGS)
    loaded = load_compressed(tmp_path / "recompressed")
    assert type(loaded) is type(model)
    assert (logits(loaded, ids) - expected).abs().max().item() <= TOLERANCE


def test_auto_config_is_the_generic_svdexp_config(tmp_path: Path) -> None:
    """AutoConfig gives SvdexpConfig with the base fields readable (lm-eval reads n_positions), and
    to_base_config rebuilds the family's own configuration class with the rank map."""
    model, ranks, _, path = saved_folder(tmp_path, "gpt2")
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=True)
    assert type(config).__name__ == "SvdexpConfig" and config.model_type == "svdexp"
    assert config.n_positions == 128 and config.n_embd == 64 and config.svdexp_ranks == ranks
    base = config.to_base_config()
    assert type(base) is type(model.config) and base.svdexp_ranks == ranks and base.hidden_size == 64
    override = AutoConfig.from_pretrained(str(path), trust_remote_code=True, attn_implementation="eager")
    assert override.to_base_config()._attn_implementation == "eager"


# ------------------------------------------------------------------------------------------- refusals


def test_save_refuses_a_family_transformers_does_not_know(tmp_path: Path) -> None:
    llama_config = tiny_config("llama")

    class UnknownConfig(type(llama_config)):
        model_type = "not_a_family"

    torch.manual_seed(0)
    fields = {key: value for key, value in llama_config.to_dict().items() if key != "model_type"}
    model = LlamaForCausalLM(UnknownConfig(**fields)).eval()
    assert model.config.model_type == "not_a_family"
    ranks = compress_truncated_svd(model)
    with pytest.raises(ValueError, match=r"cannot save a 'not_a_family' model: transformers' CONFIG_MAPPING"):
        save_compressed(model, None, tmp_path / "unknown", ranks, SETTINGS)
    assert not (tmp_path / "unknown").exists()


def test_save_refuses_a_model_its_config_would_not_rebuild(tmp_path: Path) -> None:
    """A Llama class under a Mistral config would reload as MistralForCausalLM: refused before writing."""
    torch.manual_seed(0)
    config = tiny_config("mistral")
    config.attention_bias = config.mlp_bias = False   # what LlamaForCausalLM reads beyond Mistral's fields
    model = LlamaForCausalLM(config).eval()
    ranks = compress_truncated_svd(model)
    with pytest.raises(ValueError, match="reloads as MistralForCausalLM"):
        save_compressed(model, None, tmp_path / "mismatch", ranks, SETTINGS)
    assert not (tmp_path / "mismatch").exists()


def test_rank_map_naming_a_layer_norm_is_refused(tmp_path: Path) -> None:
    _, _, _, path = saved_folder(tmp_path, "gpt2")
    config = json.loads((path / "config.json").read_text())
    config["svdexp_ranks"]["transformer.h.0.ln_1"] = 3
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"transformer\.h\.0\.ln_1 \(a LayerNorm, not an nn\.Linear or Conv1D\)"):
        load_compressed(path)
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.ln_1 \(a LayerNorm, not an nn\.Linear or Conv1D\)"):
        AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True)


def test_format_1_folder_still_loads_and_unknown_versions_or_families_are_refused(tmp_path: Path) -> None:
    model, ranks, _, path = saved_folder(tmp_path, "llama")
    config = json.loads((path / "config.json").read_text())
    del config["svdexp_base_model_type"]   # format 1 named the family in model_type (and repeated it here)
    config.update({"model_type": "svdexp_llama", "svdexp_format_version": 1,
                   "architectures": ["SvdexpLlamaForCausalLM"],
                   "auto_map": {"AutoConfig": "configuration_svdexp.SvdexpLlamaConfig",
                                "AutoModelForCausalLM": "modeling_svdexp.SvdexpLlamaForCausalLM"}})
    (path / "config.json").write_text(json.dumps(config))
    loaded = load_compressed(path)
    assert type(loaded) is type(model) and loaded.config.svdexp_ranks == ranks
    assert (logits(loaded, batch()) - logits(model, batch())).abs().max().item() <= TOLERANCE

    (path / "config.json").write_text(json.dumps({**config, "svdexp_format_version": 3}))
    with pytest.raises(CheckpointError, match="svdexp_format_version 3; this svdexp reads versions 1, 2"):
        load_compressed(path)
    (path / "config.json").write_text(json.dumps({**config, "model_type": "svdexp",
                                                  "svdexp_base_model_type": "not_a_family"}))
    with pytest.raises(CheckpointError, match="svdexp_base_model_type is 'not_a_family'"):
        load_compressed(path)


def test_remote_files_import_only_torch_transformers_and_each_other() -> None:
    allowed = {"__future__", "copy", "json", "pathlib", "shutil", "sys", "typing", "torch", "transformers"}
    for name in REMOTE_FILES:
        tree = ast.parse((REMOTE_DIR / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = set() if node.level else {node.module.split(".")[0]}
                if node.level:
                    assert node.level == 1 and node.module == "configuration_svdexp", (name, ast.dump(node))
            else:
                continue
            assert roots <= allowed, (name, roots)


# ------------------------------------------------------------------------------------------- lm-eval CLI


@pytest.mark.integration
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lm_eval_command_line_scores_the_folder(family: str, tmp_path: Path) -> None:
    """``lm_eval --model hf --model_args pretrained=FOLDER,trust_remote_code=True`` scores a saved folder as the
    in-memory compressed model: every log-likelihood it logs for 8 embedded ARC-Easy questions equals the one
    lm-eval's HF backend computes in this process from the in-memory model (same requests), within 1e-4."""
    from hydra import compose, initialize_config_dir
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from svdexp.config import CONFIG_DIR
    from svdexp.evaluation.harness import TASKS_DIR, summarize_results
    from svdexp.models import load_model

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["model=tiny_random"])
    tokenizer = load_model(cfg.model, "float32", 0)[1]            # SmolLM2's tokenizer, from the packaged GGUF
    model = tiny_model(family, vocab_size=len(tokenizer), max_position_embeddings=512)
    ranks = compress_truncated_svd(model)
    path = save_compressed(model, tokenizer, tmp_path / f"svdexp_{family}", ranks, SETTINGS)

    task, limit, batch_size, max_length = "arc_easy_embedded", 8, 4, 512
    out = tmp_path / "lm_eval"
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf_modules")}   # offline: conftest's TEST_ENV
    run = subprocess.run([str(Path(sys.executable).with_name("lm_eval")), "--model", "hf", "--model_args",
                          f"pretrained={path},trust_remote_code=True,dtype=float32,max_length={max_length}",
                          "--include_path", str(TASKS_DIR), "--tasks", task, "--limit", str(limit),
                          "--batch_size", str(batch_size), "--device", "cpu", "--output_path", str(out),
                          "--log_samples"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    [results_file] = sorted(out.rglob("results_*.json"))
    summary = summarize_results(json.loads(results_file.read_text()))[task]
    assert summary["samples"] == limit and 0.0 <= summary["acc"] <= 1.0
    [samples_file] = sorted(out.rglob(f"samples_{task}_*.jsonl"))
    requests, scored = [], []
    for line in samples_file.read_text().splitlines():
        sample = json.loads(line)
        for i, (args, resp) in enumerate(zip(sample["arguments"].values(), sample["filtered_resps"])):
            requests.append(Instance("loglikelihood", doc={}, arguments=(args["arg_0"], args["arg_1"]), idx=i))
            scored.append(float(resp[0]))
    assert len(requests) >= 2 * limit

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length, device="cpu")
    expected = [loglikelihood for loglikelihood, _ in lm.loglikelihood(requests, disable_tqdm=True)]
    assert scored == pytest.approx(expected, abs=1e-4, rel=1e-5)
