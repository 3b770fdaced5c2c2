"""The memory a run needs (svdexp.memory): the estimate's terms against measured tensor sizes on the tiny model,
activations on disk equal to in memory bit for bit, refusals before any work, and the scratch file's lifetime."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import TINY, read_results, run_svdexp
from svdexp import memory
from svdexp.cache import scratch
from svdexp.compression.calibration import DiskActivations, capture_inputs
from svdexp.compression.lowrank import weight_bytes
from svdexp.config import CONFIG_DIR
from svdexp.runner import load_context


def _run(run_dir: Path, *overrides: str) -> dict:
    done = run_svdexp([*TINY, *overrides], run_dir)
    assert done.returncode == 0, done.stderr[-2000:]
    return read_results(run_dir)


def _cfg(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=[*TINY, *overrides])


def test_estimate_terms_match_the_tensors_of_a_tiny_run():
    cfg = _cfg("method=svd_llm", "ratio=0.4", "calib.num_samples=6", "calib.batch_size=4")
    shape = memory.model_shape(memory.model_config(cfg.model))
    needs = frozenset({"H"})
    estimate = memory.estimate(cfg, shape, needs, "memory", runtime=0)
    ctx = load_context(cfg)
    assert estimate.terms["weights"] == weight_bytes(ctx.model)                 # parameters, tied ones once
    inputs = capture_inputs(ctx.model, ctx.decoder, ctx.calib_ids, ctx.batch_size, ctx.device)
    held = sum(h.numel() * h.element_size() for h in inputs.hidden)
    assert estimate.terms["activations"] == 2 * held                            # a layer's inputs and outputs
    layer = ctx.decoder.layers(ctx.model)[0]
    grams = sum(8 * module.in_features ** 2 for _, module in layer.named_modules()
                if isinstance(module, torch.nn.Linear))
    assert estimate.terms["statistics"] == grams         # one H per matrix: the upper bound of one H per site
    sites = {paths[0] for paths in ctx.decoder.sites(0).values()}
    assert sum(8 * layer.get_submodule(p).in_features ** 2 for p in sites) < estimate.terms["statistics"]
    disk = memory.estimate(cfg, shape, needs, "disk", runtime=0)
    assert disk.terms["activations"] == 0 and disk.scratch == 2 * held and disk.host <= estimate.host


@pytest.mark.parametrize("extra", [(), ("method=adasvd", "method.groups=0")], ids=["svd_llm", "prefix"])
def test_activations_on_disk_give_the_digits_of_memory(tmp_path, extra):
    memory_run, disk_run = (_run(tmp_path / mode, "method=svd_llm", "ratio=0.4", "calib.cache=false",
                                 "calib.cache_svd=false", f"calib.activations={mode}", *extra)
                            for mode in ("memory", "disk"))
    assert disk_run["memory"]["estimate"]["activations"] == "disk"
    assert memory_run["memory"]["estimate"]["activations"] == "memory"
    assert disk_run["metrics"] == memory_run["metrics"]
    assert disk_run["compression"]["ranks"] == memory_run["compression"]["ranks"]
    assert not list(scratch.scratch_root().glob("*.bin"))            # the scratch file is gone after the run


def test_results_carry_the_estimate_and_the_measured_peak(tmp_path):
    results = _run(tmp_path, "method=svd_llm", "ratio=0.2")
    estimate = results["memory"]["estimate"]
    assert estimate["host"] > estimate["terms"]["weights"] > 0 and estimate["device"] == 0
    assert results["memory"]["peak_host"] > 0 and "peak_device" not in results["memory"]


def test_the_peak_is_the_runs_own_not_the_processes(tmp_path):
    # an in-process multirun runs its jobs in one process: a job's peak must not include what came before it
    ballast = torch.ones(400_000_000, dtype=torch.uint8)          # 0.4 GB touched, then freed
    before = memory.peak_host()
    del ballast
    results = _run(tmp_path, "method=svd_llm", "ratio=0.2")
    assert 0 < results["memory"]["peak_host"] < before / memory.GB - 0.2


def test_a_run_that_fits_nowhere_is_refused_before_any_work(tmp_path, fresh_cache):
    # 10^8 windows of 64 tokens at width 64: 3.3 TB of activations, on no disk of this machine
    done = run_svdexp([*TINY, "calib.num_samples=100000000", "calib.activations=auto"], tmp_path / "run")
    assert done.returncode == 2
    assert "of calibration activations on disk" in done.stderr and "lower calib.num_samples" in done.stderr
    assert not (tmp_path / "run" / "results.json").exists()
    assert not list(fresh_cache.rglob("*.safetensors")) and not list(fresh_cache.rglob("*.bin"))
    done = run_svdexp([*TINY, "calib.num_samples=100000000", "calib.activations=memory"], tmp_path / "mem")
    assert done.returncode == 2 and "of memory" in done.stderr and "is available" in done.stderr
    assert not (tmp_path / "mem" / "results.json").exists()


def test_scratch_file_is_removed_after_a_failure_and_a_killed_runs_by_the_next(tmp_path):
    with pytest.raises(RuntimeError):
        with scratch.scratch_file() as path:
            DiskActivations(path, 4, 2).put(0, 0, torch.ones(2, 3, 5))
            assert path.stat().st_size == 2 * 4 * 3 * 5 * 4
            raise RuntimeError("a failure mid-pass")
    assert not path.exists()
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())      # never a live process's id
    leftover = scratch.scratch_root() / f"activations-{os.uname().nodename}-{pid_max}-deadbeef.bin"
    alive = scratch.scratch_root() / f"activations-{os.uname().nodename}-{os.getpid()}-cafecafe.bin"
    leftover.write_bytes(b"x" * 10)
    alive.write_bytes(b"y")
    assert scratch.clean_scratch(dry_run=True) == [(leftover, 10)] and leftover.exists()
    _run(tmp_path, "method=svd_llm", "ratio=0.2")                               # the next run cleans it
    assert not leftover.exists() and alive.exists()
    alive.unlink()


def test_cache_clear_removes_a_killed_runs_activation_file(tmp_path):
    from svdexp.cache.cli import main

    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    scratch.scratch_root().mkdir(parents=True, exist_ok=True)
    leftover = scratch.scratch_root() / f"activations-{os.uname().nodename}-{pid_max}-0badf00d.bin"
    leftover.write_bytes(b"x" * 100)
    assert main(["clear", "--dry-run"]) == 0 and leftover.exists()
    assert main(["clear"]) == 0 and not leftover.exists()
