"""SIGKILL at every place a kill could hurt never leaves a half-written file that is read as valid; a re-run
completes with the results of an uninterrupted run.

The kills are deterministic: ``$SVDEXP_CRASH_AT=<stage>@<n>`` makes the run SIGKILL itself the n-th time it
reaches a named stage (svdexp/faults.py), so each kill lands where it is meant to, in bounded time."""

import json

import pytest

from conftest import TINY, read_results, run_process, run_svdexp
from svdexp.cache.store import load_tensor_entry
from svdexp.faults import STAGES

pytestmark = pytest.mark.integration

RUN = [*TINY, "method=svd_llm", "save=true"]
# (stage, arrival): mid-calibration, a cache entry complete but not renamed, mid-compression, the checkpoint
# complete but not renamed, results.json complete but not renamed
KILLS = [("calibration_layer", 2), ("cache_write", 3), ("compression_layer", 2), ("checkpoint_write", 1),
         ("results_write", 1)]


def test_every_stage_has_a_kill():
    assert {stage for stage, _ in KILLS} == set(STAGES)


def test_sigkill_at_each_stage_then_rerun(tmp_path, monkeypatch):
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    monkeypatch.setenv("SVDEXP_CACHE", str(cache))
    for stage, n in KILLS:
        proc = run_process(RUN, run_dir, cache, SVDEXP_CRASH_AT=f"{stage}@{n}")
        assert proc.returncode == -9, (stage, proc.returncode, proc.stderr[-2000:])   # killed there, not finished
        assert not (run_dir / "results.json").exists(), stage        # results.json only ever complete and done
        if stage != "results_write":                                  # no checkpoint folder before its rename
            assert not (run_dir / "model").exists(), stage
        for entry in (cache / "stats").glob("*.safetensors"):
            assert load_tensor_entry("stats", entry.stem) is not None, f"{stage}: invalid {entry}"
    assert list(run_dir.glob(".results.json.tmp*")) and list(run_dir.glob(".model.tmp*"))   # the kills' leftovers
    final = run_process(RUN, run_dir, cache)
    assert final.returncode == 0, final.stderr[-3000:]
    resumed = read_results(run_dir)
    assert resumed["status"] == "done" and (run_dir / "model" / "model.safetensors").is_file()
    # the same numbers as a run that was never interrupted, from an empty cache
    clean = run_svdexp(RUN, tmp_path / "clean", cache=tmp_path / "clean_cache")
    assert clean.returncode == 0, clean.stderr[-3000:]
    reference = read_results(tmp_path / "clean")
    assert resumed["metrics"]["ppl"] == reference["metrics"]["ppl"]
    assert resumed["compression"]["ranks"] == reference["compression"]["ranks"]
    assert json.loads((run_dir / "model" / "config.json").read_text())["svdexp_ranks"] == {
        k: v for k, v in reference["compression"]["ranks"].items() if v is not None}
