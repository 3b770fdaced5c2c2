"""What the benchmark scripts share: the repository's paths, the composed config and the loaded run, timing, the
real app run in a child process, and writing results (the process's memory is read with svdexp.memory's
``proc_status``, ``reset_host_peak`` and ``lifetime_peak_host``, which load no more than this module does).

Every script imports it as ``from common import ...`` (a script's folder is first on ``sys.path``), the
``benchmarks.inference`` package as ``from benchmarks.common import ...`` (run with ``python -m`` from the
repository's root). Importing it loads nothing but the standard library, so that a memory measurement starts
from a bare interpreter.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

T = TypeVar("T")


# -- config and model --------------------------------------------------------------------------------------


def compose_config(overrides: list[str]):
    """The app's config for ``overrides`` (W&B off), as ``svdexp`` would compose it."""
    from hydra import compose, initialize_config_dir

    from svdexp.config import CONFIG_DIR, register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=["logger=none", *overrides])


def load_run(cfg):
    """The run's context as the runner builds it: the model, its evaluation and calibration tokens, its weights'
    fingerprint (:class:`svdexp.context.RunContext`)."""
    from svdexp.runner import load_context

    return load_context(cfg)


# -- time ----------------------------------------------------------------------------------------------------


def sync(device) -> None:
    """Wait for the device's queued work (CUDA), so that a clock read after it counts that work."""
    if device is not None and device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def timed(fn: Callable[[], T], device=None) -> tuple[T, float]:
    """``fn()`` and its wall seconds (the device synchronised before and after)."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


# -- the app in a child process -------------------------------------------------------------------------------


def app_env(cache: Path | None = None) -> dict[str, str]:
    """The environment of a benchmark's app runs: offline, W&B and progress bars off; ``cache`` as
    ``$SVDEXP_CACHE`` when given."""
    from svdexp.app import OFFLINE

    env = {**os.environ, **OFFLINE, "TQDM_DISABLE": "1"}
    if cache is not None:
        env["SVDEXP_CACHE"] = str(cache)
    return env


def run_app(args: list[str], log: Path | None = None, cache: Path | None = None, module: str = "svdexp.app",
            check: bool = True, root: Path = ROOT) -> subprocess.CompletedProcess:
    """``python -m <module> args`` from the repository root (``svdexp.sweep`` for a sweep; ``root``: the app of
    another checkout, e.g. a git worktree at an older commit), its output into ``log`` or captured; with
    ``check``, a failure raises with the end of that output."""
    cmd = [sys.executable, "-m", module, *args]
    env = app_env(cache)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    if log is None:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
        tail = proc.stderr[-3000:]
    else:
        with open(log, "w") as fh:
            proc = subprocess.run(cmd, cwd=root, env=env, stdout=fh, stderr=subprocess.STDOUT)
        tail = Path(log).read_text()[-3000:]
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{tail}")
    return proc


# -- results -------------------------------------------------------------------------------------------------


def portable(text: str) -> str:
    """``text`` with this machine's folders written as any machine has them: the repository as ``.``, svdexp's
    cache as ``$SVDEXP_CACHE``, the temporary folder as ``$TMPDIR``, the home folder as ``~`` (results files are
    committed; a path of one machine means nothing on another)."""
    import tempfile

    from svdexp.cache.budget import cache_root

    for folder, name in ((ROOT, "."), (cache_root(), "$SVDEXP_CACHE"), (Path(tempfile.gettempdir()), "$TMPDIR"),
                         (Path.home(), "~")):
        for spelling in dict.fromkeys((str(folder.resolve()), str(folder))):
            # the whole folder only: a sibling whose name starts alike (the home folder + "fs") stays as it is
            text = re.sub(re.escape(spelling) + r"(?![\w.-])", lambda _: name, text)
    return text


def write_results(name: str, data: Any, markdown: str | None = None, out: Path = RESULTS) -> Path:
    """``out/<name>.json`` (and ``out/<name>.md`` with ``markdown``), paths made :func:`portable`; returns the
    JSON's path."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(portable(json.dumps(data, indent=2)) + "\n")
    if markdown is not None:
        (out / f"{name}.md").write_text(portable(markdown if markdown.endswith("\n") else markdown + "\n"))
    return path
