"""Writes that a kill cannot leave half done (:func:`atomic_write`), and crash points: named places where a run
can be killed on purpose, to prove that a kill there loses nothing.

``results.json``, the cache's entries, checkpoints and converted models are written by :func:`atomic_write`: under a
hidden name of their own beside the target, then renamed over it.

A run is killed wherever the kernel or a scheduler decides (OOM, a pre-empted Slurm job, Ctrl-\\). What must
hold after any kill: no half-written file is ever taken for a valid one, and the same command re-run completes.
The durability tests check that at each place a kill could hurt, deterministically, with

    SVDEXP_CRASH_AT=<stage>[@<n>]      # SIGKILL this process the n-th time (default: first) it reaches <stage>

The stages, in a run's order:

- ``calibration_layer``: a decoder layer's statistics were just written to the cache;
- ``cache_write``: a cache entry's temporary file is complete, not yet renamed into place;
- ``compression_layer``: a decoder layer was just compressed;
- ``checkpoint_write``: the checkpoint folder is complete under its temporary name, not yet renamed;
- ``results_write``: ``results.json``'s temporary file is complete, not yet renamed.

Unset (always, outside those tests), a crash point is one dictionary lookup.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
from collections import Counter
from pathlib import Path
from typing import Callable

ENV = "SVDEXP_CRASH_AT"
STAGES = ("calibration_layer", "cache_write", "compression_layer", "checkpoint_write", "results_write")
_reached: Counter[str] = Counter()


def crash_point(stage: str) -> None:
    """SIGKILL this process if ``$SVDEXP_CRASH_AT`` names ``stage`` and this is its n-th arrival there."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    name, _, nth = spec.partition("@")
    if name not in STAGES:
        raise ValueError(f"{ENV}={spec!r}: unknown stage {name!r}; choose one of: {', '.join(STAGES)}.")
    if name != stage:
        return
    _reached[stage] += 1
    if _reached[stage] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def atomic_write(path: str | Path, write: Callable[[Path], object], stage: str | None = None, *,
                 replace_folder: bool = False) -> int:
    """Write ``path``, a file or a folder, so that no reader and no kill ever sees it half written: ``write(tmp)``
    makes it at ``tmp``, a hidden name of its own in the same folder (``.<name>.tmp<pid>.<random>``), which is then
    renamed over ``path`` (atomic on POSIX filesystems, NFS included). A folder replaces only a missing or empty one,
    unless ``replace_folder``: then the folder at ``path`` is removed just before the rename. ``stage``: the crash
    point between writing and renaming (:data:`STAGES`). ``tmp`` never outlives a failure (a kill leaves it, hidden).
    Returns the bytes written (a file's size; 0 for a folder)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.{secrets.token_hex(4)}")
    try:
        write(tmp)
        size = 0 if tmp.is_dir() else os.stat(tmp).st_size
        if stage is not None:
            crash_point(stage)
        if replace_folder and path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            try:
                tmp.unlink()
            except OSError:
                pass
        raise
    return size
