"""Shared fixtures and the three test tiers.

Tiers (markers declared in pyproject.toml; docs/testing.md says what goes where):

- unit (no marker, ``make test-fast``): in-process, tiny random models only. The app runs through
  :func:`run_svdexp`, which calls ``svdexp.app.main`` with an argv list in this interpreter: the same Hydra
  composition, validation, runner, results and exit codes as from the shell, without an interpreter start and the
  torch / transformers / lm-eval imports each one pays. A unit test that starts a Python interpreter fails
  (:func:`_no_interpreter_in_unit_tests`).
- ``integration``: the app as a real process, where the process is what is tested (an exit code seen by the
  shell, SIGKILL and resume, launchers, console scripts, per-process limits): :func:`run_process`.
- ``slow``: the packaged SmolLM2-135M end to end (one converted copy and one loaded model per test process:
  :func:`smollm2`), every decoder family beyond one per layer shape (tests/families.py), tests making several
  full app runs.

Every test run (every xdist worker) gets its own empty ``$SVDEXP_CACHE``; a test that checks what a cache holds
makes its own folder. Under ``pytest -n N`` each worker is pinned to one core and runs torch on one thread.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import hydra._internal.utils as hydra_utils
import pytest
import torch

from svdexp.app import OFFLINE
from svdexp.config import CONFIG_DIR

ROOT = Path(__file__).resolve().parents[1]
CONF = Path(CONFIG_DIR)   # the config tree the package ships (svdexp/conf/), as the app finds it

# Hydra prints a configuration error and exits unless it believes a debugger is attached, which it infers from
# sys.gettrace(): under coverage's tracer (make coverage) every error test would see a raised exception instead
# of what a user sees in a terminal. The tracer is no debugger.
hydra_utils.is_under_debugger = lambda: False

# Tiny sizes for the tiny random model: seconds per run.
TINY = ["model=tiny_random", "logger=none", "calib.num_samples=4", "calib.seq_len=64",
        "eval.ppl.max_chunks=2", "eval.ppl.seq_len=64"]

# Offline, W&B disabled, no progress bars: for this process (in-process runs) and every process it starts.
TEST_ENV = {**OFFLINE, "HYDRA_FULL_ERROR": "0", "TQDM_DISABLE": "1"}
os.environ.update(TEST_ENV)


def offline_env(**extra: str) -> dict[str, str]:
    """The environment of a process a test starts: this one's (its $SVDEXP_CACHE included) plus ``extra``."""
    return {**os.environ, **TEST_ENV, **extra}


@dataclass
class Completed:
    """What one call of the app gave: its exit code and what it printed (as ``subprocess.CompletedProcess``)."""
    returncode: int
    stdout: str
    stderr: str


def run_svdexp(args: list[str], run_dir: Path | None = None, cache: Path | None = None) -> Completed:
    """``svdexp *args`` in this process (``svdexp.app.main`` with an argv list), Hydra's run dir set to
    ``run_dir`` and, with ``cache``, ``$SVDEXP_CACHE`` set to it for the call."""
    from svdexp import app

    argv = [*args, *([f"hydra.run.dir={run_dir}"] if run_dir is not None else [])]
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as env, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        if cache is not None:
            env.setenv("SVDEXP_CACHE", str(cache))
        try:
            app.main(argv)
            code = 0
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else int(done.code is not None)
    return Completed(code, out.getvalue(), err.getvalue())


def run_process(args: list[str], run_dir: Path | None = None, cache: Path | None = None, *, timeout: int = 600,
                preexec=None, **env: str) -> subprocess.CompletedProcess:
    """``python -m svdexp.app *args`` as a real process (integration tests only), offline, with ``env`` added."""
    cmd = [sys.executable, "-m", "svdexp.app", *args, *([f"hydra.run.dir={run_dir}"] if run_dir is not None else [])]
    extra = {**env, **({"SVDEXP_CACHE": str(cache)} if cache is not None else {})}
    return subprocess.run(cmd, cwd=ROOT, env=offline_env(**extra), capture_output=True, text=True, timeout=timeout,
                          preexec_fn=preexec)


def read_results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


@pytest.fixture
def svdexp_run(tmp_path):
    """Call ``svdexp_run(*overrides)`` -> (:class:`Completed`, run dir), in this process."""
    def _run(*args: str):
        run_dir = tmp_path / "run"
        return run_svdexp(list(args), run_dir), run_dir
    return _run


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty $SVDEXP_CACHE with the default budget and a fresh run state, dropped afterwards."""
    from svdexp.cache import budget

    monkeypatch.setenv("SVDEXP_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(budget.ENV_MAX_GB, raising=False)
    budget.install_budget()
    yield tmp_path / "cache"
    budget._RUN.close()
    budget._RUN = None


# -- the test run: a cache of its own, one core per xdist worker ------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory):
    """This test run's (this worker's) own $SVDEXP_CACHE: nothing from earlier runs or other workers."""
    previous = os.environ.get("SVDEXP_CACHE")
    os.environ["SVDEXP_CACHE"] = str(tmp_path_factory.mktemp("svdexp-cache"))
    yield Path(os.environ["SVDEXP_CACHE"])
    if previous is None:
        os.environ.pop("SVDEXP_CACHE", None)
    else:
        os.environ["SVDEXP_CACHE"] = previous


def pytest_configure(config):
    """Under ``pytest -n N`` (N > 1), worker i runs on core i (mod the cores) with one torch thread, so that the
    workers do not oversubscribe the cores; the processes a test starts inherit the pinning."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker and int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1 and hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[int(worker.removeprefix("gw")) % len(cores)]})
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """The slow tests first: under ``pytest -n 2`` the longest tests start at once instead of forming a tail
    on one worker after the others are done."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(autouse=True)
def _no_interpreter_in_unit_tests(request, monkeypatch):
    """A unit test may not start a Python interpreter (the app, a console script, ``python -c``): that is what
    the integration tier is for."""
    if request.node.get_closest_marker("integration") or request.node.get_closest_marker("slow"):
        return
    execute = subprocess.Popen._execute_child
    python = os.path.realpath(sys.executable)
    scripts = Path(sys.executable).parent

    def guarded(self, args, executable, *rest, **kwargs):
        program = str(args[0] if isinstance(args, (list, tuple)) else args).split()[0]
        if os.path.realpath(program) == python or Path(program).parent == scripts:
            raise AssertionError(f"a unit test started {program}: mark it @pytest.mark.integration, or run the app "
                                 "in-process with conftest.run_svdexp")
        return execute(self, args, executable, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "_execute_child", guarded)


# -- the packaged SmolLM2 (slow tier) ---------------------------------------------------------------------


@dataclass
class SmolLM2:
    folder: str              # the Hugging Face folder svdexp converts the packaged GGUF into, in $SVDEXP_CACHE
    model: torch.nn.Module   # loaded once (fp32, eval mode): tests that change it work on a deep copy
    tokenizer: object


@pytest.fixture(scope="session")
def smollm2() -> SmolLM2:
    """The packaged SmolLM2-135M-Instruct through svdexp's own loader: converted once per test run into this
    run's $SVDEXP_CACHE (the app's runs of ``model=smollm2_135m`` then load that folder), and loaded once."""
    from hydra import compose, initialize_config_dir

    from svdexp.config import CONFIG_DIR
    from svdexp.models import load_model
    from svdexp.models.loading import resolve_path

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["model=smollm2_135m"])
    folder = resolve_path(cfg.model)
    model, tokenizer = load_model(cfg.model, "float32", 0)
    return SmolLM2(folder, model, tokenizer)
