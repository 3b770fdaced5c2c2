"""The inference benchmark's speed measurement: every model in one process, timed round-robin; the hooked
per-module profile of a few generations; single layers timed in isolation."""

from __future__ import annotations

import os
import statistics
from typing import Callable

import torch
from torch import nn

from benchmarks.common import timed
from benchmarks.inference.breakdown import Breakdown
from benchmarks.inference.models import DTYPES, Runner, load_for_bench


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


def _best_us(one_pass: Callable[[], None], calls: int, device: torch.device) -> float:
    """Microseconds per call of ``one_pass()`` (which makes ``calls`` calls), best of 5 passes: the least
    disturbed by other jobs."""
    with torch.no_grad():
        return min(timed(one_pass, device)[1] / calls * 1e6 for _ in range(5))


def _call_us(make: Callable[[], nn.Module], x: torch.Tensor, device: torch.device,
             working_set: int = 64 * 2**20) -> float:
    """Microseconds per call cycling over enough copies of ``make()`` to hold ``working_set`` bytes of weights,
    so each call streams its weights from memory as in the full model rather than from a hot cache."""
    first = make()
    size = sum(p.numel() * p.element_size() for p in first.parameters())
    copies = [first] + [make() for _ in range(max(1, min(4000, working_set // size)) - 1)]
    def one_pass() -> None:
        for layer in copies:
            layer(x)

    with torch.no_grad():
        one_pass()  # warm-up
    return _best_us(one_pass, len(copies), device)


def single_token_layer_times(model: nn.Module, targets: set[str], ratios: list[float], device: torch.device,
                             dtype: torch.dtype) -> list[dict]:
    """Per distinct targeted shape: one-token time of the dense linear and of a low-rank one at each ratio."""
    from svdexp.compression.lowrank import LowRankLinear, rank_for_ratio

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

    def one_pass() -> None:
        for _ in range(calls):
            layer(x)

    return _best_us(one_pass, calls, device)
