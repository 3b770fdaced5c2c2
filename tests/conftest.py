"""Shared fixtures: the real Hydra app run in a subprocess, offline, with W&B disabled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Tiny sizes for the tiny random model: seconds per run.
TINY = ["model=tiny_random", "logger=none", "calib.num_samples=4", "calib.seq_len=64",
        "eval.ppl.max_chunks=2", "eval.ppl.seq_len=64"]


def offline_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled",
               HYDRA_FULL_ERROR="0", TQDM_DISABLE="1")
    return env


def run_svdexp(args: list[str], run_dir: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run ``python -m svdexp.app`` with ``args`` and Hydra's run dir set to ``run_dir``."""
    cmd = [sys.executable, "-m", "svdexp.app", *args, f"hydra.run.dir={run_dir}"]
    return subprocess.run(cmd, cwd=ROOT, env=offline_env(), capture_output=True, text=True, timeout=timeout)


def read_results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


@pytest.fixture
def svdexp_run(tmp_path):
    """Call ``svdexp_run(*overrides)`` -> (completed process, run dir)."""
    def _run(*args: str, timeout: int = 900):
        run_dir = tmp_path / "run"
        return run_svdexp(list(args), run_dir, timeout), run_dir
    return _run


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty $SVDEXP_CACHE with the default budget and a fresh run state, dropped afterwards."""
    from svdexp import cache_budget

    monkeypatch.setenv("SVDEXP_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(cache_budget.ENV_MAX_GB, raising=False)
    cache_budget.install_budget()
    yield tmp_path / "cache"
    cache_budget._RUN.close()
    cache_budget._RUN = None
