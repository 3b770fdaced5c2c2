"""Compressed checkpoints: save, load with and without remote code, refuse tampered folders, size on disk."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, OPTConfig, \
    OPTForCausalLM, Qwen2Config, Qwen2ForCausalLM

from svdexp.checkpoint import CheckpointError, load_compressed, save_compressed
from svdexp.compression.lowrank import LowRankLinear, count_parameters, rank_for_ratio, weight_bytes

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "out_proj", "fc1", "fc2")
RATIO = 0.4
SETTINGS = {"method": "svd", "ratio": RATIO, "allocation": "uniform"}
VOCAB = 256
NEW_TOKENS = 6


def compress_truncated_svd(model: nn.Module, ratio: float) -> dict[str, int]:
    """Replace every targeted decoder-layer linear by its rank-``rank_for_ratio`` truncated SVD; return the ranks.

    The SVDs run in float32 on one thread: LAPACK's multi-threaded SVD slows down ~10x when the 2 cores are shared
    with other processes (OpenMP oversubscription), and the checkpoint tests need the factors' shapes, not float64
    accuracy.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _compress_truncated_svd(model, ratio)
    finally:
        torch.set_num_threads(threads)


def _compress_truncated_svd(model: nn.Module, ratio: float) -> dict[str, int]:
    ranks = {}
    for name, module in list(model.named_modules()):
        if ".layers." not in f".{name}.":
            continue
        for child_name, child in list(module.named_children()):
            if not (isinstance(child, nn.Linear) and child_name in TARGETS):
                continue
            weight = child.weight.detach()
            rank = rank_for_ratio(weight.shape[0], weight.shape[1], ratio)
            u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
            root = s[:rank].sqrt()
            a = (u[:, :rank] * root).to(weight.dtype)
            b = (root[:, None] * vh[:rank]).to(weight.dtype)
            bias = None if child.bias is None else child.bias.detach()
            setattr(module, child_name, LowRankLinear.from_factors(a, b, bias))
            ranks[f"{name}.{child_name}"] = rank
    return ranks


def tiny_model(family: str) -> nn.Module:
    """A random tiny model of ``family`` (seeded), in eval mode."""
    torch.manual_seed(0)
    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
                  max_position_embeddings=128)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(intermediate_size=128, num_key_value_heads=2, tie_word_embeddings=True,
                                             **common))
    elif family == "qwen2":  # q/k/v carry a bias: it must travel with the A factor
        model = Qwen2ForCausalLM(Qwen2Config(intermediate_size=128, num_key_value_heads=2, tie_word_embeddings=True,
                                             **common))
    elif family == "mistral":  # untied lm_head
        model = MistralForCausalLM(MistralConfig(intermediate_size=128, num_key_value_heads=2,
                                                 tie_word_embeddings=False, **common))
    elif family == "opt":
        model = OPTForCausalLM(OPTConfig(ffn_dim=128, word_embed_proj_dim=64, **common))
    else:
        raise ValueError(family)
    return model.eval()


def fixed_batch() -> torch.Tensor:
    """A deterministic 2 x 12 batch of token ids."""
    return (torch.arange(24).reshape(2, 12) * 37 + 5) % VOCAB


def greedy(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Greedy generation of exactly ``NEW_TOKENS`` tokens with the KV cache."""
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                              min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, use_cache=True)


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[nn.Module, dict[str, int], Path]]:
    """Per family: the in-memory compressed model, its rank map and the folder it was saved to."""
    out = {}
    root = tmp_path_factory.mktemp("ckpt")
    for family in ("llama", "qwen2", "mistral", "opt"):
        model = tiny_model(family)
        ranks = compress_truncated_svd(model, RATIO)
        path = save_compressed(model, None, root / family, ranks, SETTINGS)
        out[family] = (model, ranks, path)
    return out


def tampered(saved: dict, tmp_path: Path) -> Path:
    """A private copy of the saved tiny Llama folder to break."""
    return Path(shutil.copytree(saved["llama"][2], tmp_path / "copy"))


# ------------------------------------------------------------------------------------------- round trips


def test_folder_layout_and_config(saved: dict) -> None:
    model, ranks, path = saved["llama"]
    names = sorted(p.name for p in path.iterdir())
    assert names == ["README.md", "config.json", "configuration_svdexp.py", "generation_config.json",
                     "model.safetensors", "modeling_svdexp.py"]
    config = json.loads((path / "config.json").read_text())
    assert config["svdexp_ranks"] == ranks and len(ranks) == 14
    assert config["svdexp_settings"] == SETTINGS
    assert config["model_type"] == "svdexp" and config["svdexp_base_model_type"] == "llama"
    assert config["svdexp_format_version"] == 2 and config["architectures"] == ["SvdexpForCausalLM"]
    assert config["auto_map"] == {"AutoConfig": "configuration_svdexp.SvdexpConfig",
                                  "AutoModelForCausalLM": "modeling_svdexp.SvdexpForCausalLM"}
    assert config["hidden_size"] == 64 and config["tie_word_embeddings"] is True
    stored = load_file(str(path / "model.safetensors"))
    assert "lm_head.weight" not in stored  # tied alias stored once
    assert stored["model.layers.0.self_attn.q_proj.B.weight"].shape == (ranks["model.layers.0.self_attn.q_proj"], 64)
    assert sum(t.numel() for t in stored.values()) == count_parameters(model)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "opt"])
def test_load_compressed_matches_in_memory_model(saved: dict, family: str) -> None:
    model, ranks, path = saved[family]
    loaded = load_compressed(path)
    assert type(loaded) is type(model) and not loaded.training
    loaded_ranks = {n: m.rank for n, m in loaded.named_modules() if isinstance(m, LowRankLinear)}
    assert loaded_ranks == ranks == loaded.config.svdexp_ranks
    assert weight_bytes(loaded) == weight_bytes(model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    if model.config.tie_word_embeddings:
        assert loaded.lm_head.weight is loaded.get_input_embeddings().weight
    else:
        assert loaded.lm_head.weight is not loaded.get_input_embeddings().weight
    if family == "qwen2":
        assert loaded.model.layers[1].self_attn.k_proj.A.bias is not None
    ids = fixed_batch()
    # Same fp32 tensors, same ops, same process: bit-identical, so the tolerance is exactly 0.
    assert (logits(loaded, ids) - logits(model, ids)).abs().max().item() == 0.0
    assert torch.equal(greedy(loaded, ids), greedy(model, ids))


def test_save_drops_quantization_config_and_use_cache(tmp_path: Path) -> None:
    """A GGUF-loaded model's config carries ``quantization_config``; the saved folder must not (weights are fp32)."""
    model = tiny_model("llama")
    ranks = compress_truncated_svd(model, RATIO)
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf", "dequantize": False}
    model.config.use_cache = False  # as evaluation code leaves it; the checkpoint should generate with the cache
    assert "quantization_config" in model.config.to_diff_dict()
    path = save_compressed(model, None, tmp_path / "q", ranks, SETTINGS)
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and "use_cache" not in config
    loaded = load_compressed(path)
    assert loaded.config.svdexp_ranks == ranks and loaded.config.use_cache is True


def test_load_compressed_casts_dtype(saved: dict) -> None:
    model, _, path = saved["llama"]
    loaded = load_compressed(path, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert torch.equal(loaded.model.layers[0].mlp.up_proj.A.weight,
                       model.model.layers[0].mlp.up_proj.A.weight.to(torch.bfloat16))


REMOTE_SCRIPT = textwrap.dedent("""
    import importlib.util, json, os, sys
    site_dirs, out, folders = sys.argv[1].split(os.pathsep), sys.argv[2], sys.argv[3:]
    sys.path.extend(site_dirs)  # -S: site-packages added by hand, no .pth processed, so no editable svdexp finder
    if importlib.util.find_spec("svdexp") is not None:
        raise SystemExit("svdexp is importable in the isolated interpreter: " + str(importlib.util.find_spec("svdexp")))
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    ids = (torch.arange(24).reshape(2, 12) * 37 + 5) % 256
    tensors, classes, refusals = {}, [], []
    for folder in [f[1:] for f in folders if f.startswith("!")]:  # tampered: must raise, not random-initialise
        try:
            AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
            refusals.append("LOADED")
        except ValueError as err:
            refusals.append(str(err))
    for i, folder in enumerate(f for f in folders if not f.startswith("!")):
        model, info = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
        if any(info.values()):
            raise SystemExit(f"loading {folder} was not clean: {info}")
        with torch.no_grad():
            tensors[f"{i}.logits"] = model(ids).logits
            tensors[f"{i}.generated"] = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                                       min_new_tokens=6, do_sample=False, pad_token_id=0)
        classes.append([type(model).__module__, type(model).__name__, type(model.model.layers[0].mlp.up_proj).__name__])
    leaked = sorted(m for m in sys.modules if m == "svdexp" or m.startswith("svdexp."))
    save_file(tensors, out, metadata={"classes": json.dumps(classes), "leaked": json.dumps(leaked),
                                      "refusals": json.dumps(refusals)})
""")


@pytest.mark.integration
def test_remote_code_loads_without_svdexp(saved: dict, tmp_path: Path) -> None:
    """``trust_remote_code`` loading in an interpreter that cannot import svdexp gives the same logits and tokens.

    Isolation: ``python -I -S`` run from an empty cwd (no cwd/script dir on sys.path, PYTHON* env ignored, no
    user site, no ``site`` module so no ``.pth`` file runs, which also defeats an editable install's finder); only
    the interpreter's plain site-packages dirs are appended by hand, and the script first checks that
    ``find_spec("svdexp")`` is None, and at the end that no svdexp module was imported.
    """
    families = ["llama", "qwen2", "mistral"]
    broken = tampered(saved, tmp_path)  # one tensor missing: HF alone would only warn and initialise it randomly
    tensors = load_file(str(broken / "model.safetensors"))
    del tensors["model.layers.0.mlp.gate_proj.A.weight"]
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    site_dirs = os.pathsep.join(dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]))
    out = tmp_path / "remote.safetensors"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}   # offline: conftest's TEST_ENV
    env["HF_HOME"] = str(tmp_path / "hf_home")  # the dynamic-module cache goes here, not into ~/.cache
    run = subprocess.run([sys.executable, "-I", "-S", "-c", REMOTE_SCRIPT, site_dirs, str(out),
                          "!" + str(broken), *[str(saved[f][2]) for f in families]],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    result = load_file(str(out))
    from safetensors import safe_open
    with safe_open(str(out), framework="pt") as handle:
        meta = handle.metadata()
    assert json.loads(meta["leaked"]) == []
    [refusal] = json.loads(meta["refusals"])
    assert "do not match config.json" in refusal and "model.layers.0.mlp.gate_proj.A.weight" in refusal, refusal
    ids = fixed_batch()
    for i, (family, (module, name, layer)) in enumerate(zip(families, json.loads(meta["classes"]))):
        model = saved[family][0]
        assert module.startswith("transformers_modules.") and name.startswith("Svdexp")
        assert layer == "SvdexpLowRankLinear"
        # Same fp32 weights and ops on the same CPU build and thread count: bit-identical across processes.
        assert (result[f"{i}.logits"] - logits(model, ids)).abs().max().item() == 0.0, family
        assert torch.equal(result[f"{i}.generated"], greedy(model, ids)), family


# ------------------------------------------------------------------------------------------- refusals


def test_refuses_pickle_file(saved: dict, tmp_path: Path) -> None:
    path = tampered(saved, tmp_path)
    (path / "pytorch_model.bin").write_bytes(b"\x80\x04 pretend pickle: must never be opened")
    with pytest.raises(CheckpointError, match=r"pickle-based file\(s\) pytorch_model\.bin"):
        load_compressed(path)
    (path / "pytorch_model.bin").unlink()
    (path / "sub").mkdir()
    (path / "sub" / "optimizer.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"sub/optimizer\.pt"):
        load_compressed(path)


def test_refuses_missing_rank_map(saved: dict, tmp_path: Path) -> None:
    path = tampered(saved, tmp_path)
    config = json.loads((path / "config.json").read_text())
    del config["svdexp_ranks"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="no rank map: 'svdexp_ranks'"):
        load_compressed(path)


def test_refuses_shape_that_disagrees_with_rank_map(saved: dict, tmp_path: Path) -> None:
    path = tampered(saved, tmp_path)
    tensors = load_file(str(path / "model.safetensors"))
    key = "model.layers.1.mlp.down_proj.B.weight"
    tensors[key] = tensors[key][:-1].contiguous()  # drop one rank
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    rank = saved["llama"][1]["model.layers.1.mlp.down_proj"]
    with pytest.raises(CheckpointError, match=rf"{key} has shape \({rank - 1}, 128\) but the rank map gives "
                                              rf"model\.layers\.1\.mlp\.down_proj rank {rank}"):
        load_compressed(path)


def test_refuses_rank_map_edited_after_saving(saved: dict, tmp_path: Path) -> None:
    path = tampered(saved, tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["svdexp_ranks"]["model.layers.0.self_attn.v_proj"] += 1
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"shape mismatch: model\.layers\.0\.self_attn\.v_proj\.A\.weight"):
        load_compressed(path)


def test_refuses_missing_and_unknown_keys(saved: dict, tmp_path: Path) -> None:
    path = tampered(saved, tmp_path)
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.norm.weight"]
    tensors["model.layers.0.extra.weight"] = torch.zeros(3)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) model\.norm\.weight; "
                                              r"unknown tensor\(s\) model\.layers\.0\.extra\.weight"):
        load_compressed(path)


def test_refuses_missing_or_corrupt_weight_file(saved: dict, tmp_path: Path) -> None:
    path = tampered(saved, tmp_path)
    (path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_compressed(path)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no weight file: expected model.safetensors"):
        load_compressed(path)


def test_refuses_malformed_config(saved: dict, tmp_path: Path) -> None:
    path = tampered(saved, tmp_path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="is not valid JSON"):
        load_compressed(path)
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="has no config.json"):
        load_compressed(path)


def test_save_checks_rank_map_and_target(saved: dict, tmp_path: Path) -> None:
    model, ranks, path = saved["llama"]
    with pytest.raises(FileExistsError):
        save_compressed(model, None, path, ranks, SETTINGS)
    wrong = dict(ranks, **{"model.layers.0.mlp.up_proj": ranks["model.layers.0.mlp.up_proj"] + 1})
    with pytest.raises(ValueError, match="ranks gives model.layers.0.mlp.up_proj rank"):
        save_compressed(model, None, tmp_path / "a", wrong, SETTINGS)
    partial = {k: v for k, v in ranks.items() if "layers.1." not in k}
    with pytest.raises(ValueError, match="missing from ranks"):
        save_compressed(model, None, tmp_path / "b", partial, SETTINGS)
    with pytest.raises(ValueError, match="JSON-serialisable"):
        save_compressed(model, None, tmp_path / "c", ranks, {"bad": object()})


# ------------------------------------------------------------------------------------------- real size


@pytest.mark.slow
def test_smollm2_size_on_disk_matches_parameter_count(tmp_path: Path, smollm2) -> None:
    """SmolLM2-135M at ratio 0.4: bytes on disk within 2 % of (unique parameters x 4 bytes)."""
    import copy

    from transformers import AutoTokenizer

    model, tokenizer = copy.deepcopy(smollm2.model), smollm2.tokenizer
    ranks = compress_truncated_svd(model, RATIO)
    assert len(ranks) == 30 * 7
    path = save_compressed(model, tokenizer, tmp_path / "smollm2-svd-0.4", ranks, SETTINGS)

    predicted = count_parameters(model) * 4  # fp32; tied embedding / lm_head counted once
    assert predicted == weight_bytes(model)
    weights_on_disk = (path / "model.safetensors").stat().st_size
    folder_on_disk = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    assert abs(weights_on_disk / predicted - 1) < 0.02, (weights_on_disk, predicted)
    assert abs(folder_on_disk / predicted - 1) < 0.02, (folder_on_disk, predicted)

    loaded = load_compressed(path)
    reloaded_tokenizer = AutoTokenizer.from_pretrained(str(path))
    text = "Low-rank factors make the model smaller."
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert torch.equal(reloaded_tokenizer(text, return_tensors="pt").input_ids, ids)
    assert (logits(loaded, ids) - logits(model, ids)).abs().max().item() == 0.0
