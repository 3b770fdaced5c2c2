"""Sweeps: the statistics cache, resume after a kill, corrupt cache entries, and the two local launchers."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, TINY, offline_env, read_results, run_process, run_svdexp
from svdexp import sweep


def run(args, run_dir, cache):
    """One tiny job in this process with ``$SVDEXP_CACHE`` = ``cache``."""
    return run_svdexp([*TINY, *args], run_dir, cache)


def test_statistics_are_cached_shared_and_rebuilt_when_corrupt(tmp_path):
    cache = tmp_path / "cache"
    first = run(["method=svd_llm"], tmp_path / "a", cache)
    assert first.returncode == 0, first.stderr[-3000:]
    a = read_results(tmp_path / "a")
    # svd_llm with solver=auto: the output Grams of the wide matrices, H only at the sites of tall ones
    assert {"C_out", "H_tall"} <= set(a["compression"]["statistics"]["computed"])
    # the same statistics serve another ratio and another policy: nothing recomputed
    second = run(["method=svd_llm", "ratio=0.4", "allocation=adacr"], tmp_path / "b", cache)
    assert second.returncode == 0, second.stderr[-3000:]
    b = read_results(tmp_path / "b")
    assert b["compression"]["statistics"] == {"cached": ["C_out", "H_tall", "cosine"], "computed": []}
    # corrupt every entry's data bytes: detected (content digest), rebuilt, never used
    entries = sorted((cache / "stats").glob("*.safetensors"))
    assert entries
    for entry in entries:
        data = bytearray(entry.read_bytes())
        data[-100] ^= 0xFF
        entry.write_bytes(bytes(data))
    third = run(["method=svd_llm"], tmp_path / "c", cache)
    assert third.returncode == 0, third.stderr[-3000:]
    c = read_results(tmp_path / "c")
    assert {"C_out", "H_tall"} <= set(c["compression"]["statistics"]["computed"])
    assert c["metrics"]["ppl"] == a["metrics"]["ppl"]
    # and without the cache, everything is computed again
    fourth = run(["method=svd_llm", "calib.cache=false"], tmp_path / "d", cache)
    assert fourth.returncode == 0, fourth.stderr[-3000:]
    assert read_results(tmp_path / "d")["compression"]["statistics"] == {"cached": [], "computed": ["C_out", "H_tall"]}


SWEEP = """
name: killtest
overrides: [model=tiny_random, logger=none, calib.num_samples=4, calib.seq_len=64, eval.ppl.max_chunks=2,
            eval.ppl.seq_len=64]
grids:
  - {method: none}
  - {method: "svd,svd_llm", ratio: "0.2,0.4"}
"""


def sweep_cmd(sweep_file, out):
    return [sys.executable, "-m", "svdexp.sweep", str(sweep_file), f"hydra.sweep.dir={out}"]


def done_jobs(out: Path) -> dict[str, float]:
    jobs = {}
    for f in out.rglob("results.json"):
        r = json.loads(f.read_text())      # a half-written file would fail here
        if r["status"] == "done":
            jobs[str(f.parent.relative_to(out))] = f.stat().st_mtime
    return jobs


@pytest.mark.integration
def test_killed_sweep_resumes_with_every_job_done_once(tmp_path):
    sweep_file = tmp_path / "killtest.yaml"
    sweep_file.write_text(SWEEP)
    out = tmp_path / "sweep"
    env = offline_env(SVDEXP_CACHE=str(tmp_path / "cache"))
    # kill the sweep with SIGKILL (whole process group) once the second job has finished
    proc = subprocess.Popen(sweep_cmd(sweep_file, out), cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while len(done_jobs(out)) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = done_jobs(out)
    assert 1 <= len(before) < 5
    # nothing half-written: no stray temporary results file is taken for a result
    for f in out.rglob("*results.json*"):
        assert f.name == "results.json" or f.name.startswith(".results.json.tmp")
    rerun = subprocess.run(sweep_cmd(sweep_file, out), cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    after = done_jobs(out)
    assert len(after) == 5
    for job, mtime in before.items():          # finished jobs were skipped, not re-run
        assert after[job] == mtime
    # readable job directories named after the overrides (the sweep's own overrides included)
    names = set(after)
    assert any("method=none" in n for n in names)
    assert any("method=svd_llm" in n and n.endswith("ratio=0.4") for n in names)


def test_sweep_file_with_a_typo_is_rejected(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(SWEEP.replace("grids:", "gridz:"))
    assert sweep.main([str(bad), f"hydra.sweep.dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert "unknown key(s) 'gridz'" in err and "allowed: name" in err
    typo = tmp_path / "typo.yaml"
    typo.write_text(SWEEP.replace("ratio:", "ratoi:"))
    assert sweep.main([str(typo), f"hydra.sweep.dir={tmp_path / 'out2'}"]) == 2
    assert "ratoi" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists()


@pytest.mark.integration
@pytest.mark.parametrize("launcher", ["submitit_local", "parallel"])
def test_local_launcher_runs_two_jobs(tmp_path, launcher):
    """submitit (the Slurm mechanics, locally) and joblib (``parallel``, two jobs at once: each job's threads are
    the cores divided by the two jobs)."""
    out = tmp_path / "multirun"
    extra = ["hydra.launcher.timeout_min=10"] if launcher == "submitit_local" else []
    proc = run_process(["-m", *TINY, "method=svd,svd_llm", f"hydra/launcher={launcher}", *extra,
                        f"hydra.sweep.dir={out}"], cache=tmp_path / "cache", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [read_results(p.parent) for p in out.rglob("results.json")]
    assert sorted(r["compression"]["method"] for r in results) == ["svd", "svd_llm"]
    assert all(r["status"] == "done" for r in results)
    if launcher == "parallel":
        assert {r["threads"] for r in results} == {max(1, len(os.sched_getaffinity(0)) // 2)}


def test_finished_run_is_reused_across_cache_and_logger_settings_only(tmp_path):
    """A done run is skipped when only cache/logger settings differ, redone when a result-changing key does."""
    cache, run_dir = tmp_path / "cache", tmp_path / "job"
    first = run(["method=svd"], run_dir, cache)
    assert first.returncode == 0, first.stderr[-3000:]
    mtime = (run_dir / "results.json").stat().st_mtime_ns
    same = run(["method=svd", "calib.cache=false", "calib.cache_svd=false", "eval.cache_dense=false"], run_dir, cache)
    assert same.returncode == 0 and "already done" in same.stdout
    assert (run_dir / "results.json").stat().st_mtime_ns == mtime
    other = run(["method=svd", "seed=1"], run_dir, cache)
    assert other.returncode == 0 and "already done" not in other.stdout
    assert read_results(run_dir)["config"]["seed"] == 1
