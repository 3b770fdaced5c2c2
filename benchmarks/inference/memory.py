"""The inference benchmark's memory measurement: one model per process, its peak resident set through one
prefill and one generation."""

from __future__ import annotations

import torch

from benchmarks.common import timed
from benchmarks.inference.models import DTYPES, Runner, load_for_bench
from svdexp.memory import lifetime_peak_host, proc_status, reset_host_peak


def memory_worker(spec: dict) -> dict:
    """Peak memory of one model (its own process): after loading, through one prefill and one generation."""
    from svdexp.compression.lowrank import count_parameters, weight_bytes

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device, dtype = torch.device(spec["device"]), DTYPES[spec["dtype"]]
    rss_before = proc_status().get("VmRSS")
    (model, targets), load_s = timed(lambda: load_for_bench(spec["ratio"], spec["path"], device, dtype))
    status = proc_status()
    rss_loaded, peak_loading = status.get("VmRSS"), status.get("VmHWM")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    hwm_reset = reset_host_peak()
    runner = Runner(model, spec, device)
    runner.prefill()
    out = runner.generate(spec["new_tokens"])
    assert out.shape == (spec["batch"], spec["prompt_len"] + spec["new_tokens"]), out.shape
    peak_inference = proc_status().get("VmHWM") if hwm_reset else None
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
        if peak_loading is not None else lifetime_peak_host(),
        "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    }

