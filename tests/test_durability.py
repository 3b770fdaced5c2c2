"""SIGKILL at random points never leaves a half-written file that is read as valid; a re-run completes."""

import json
import random
import signal
import subprocess
import sys
import time

from conftest import ROOT, TINY, offline_env, read_results
from svdexp.cache import load_tensor_entry


def test_sigkill_at_random_points_then_rerun(tmp_path, monkeypatch):
    env = offline_env()
    env["SVDEXP_CACHE"] = str(tmp_path / "cache")
    monkeypatch.setenv("SVDEXP_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "svdexp.app", *TINY, "method=svd_llm", "save=true", f"hydra.run.dir={run_dir}"]
    rng = random.Random(0)
    for attempt in range(4):
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(2.0, 12.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        results = run_dir / "results.json"
        if results.exists():                    # only ever complete, valid and done
            assert json.loads(results.read_text())["status"] == "done"
            results.unlink()
        for entry in (tmp_path / "cache" / "stats").glob("*.safetensors"):
            assert load_tensor_entry("stats", entry.stem) is not None, f"attempt {attempt}: invalid {entry}"
    final = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-3000:]
    assert read_results(run_dir)["status"] == "done"
