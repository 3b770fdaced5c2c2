"""Scratch files under ``$SVDEXP_CACHE/scratch``: the calibration activations a run keeps on disk
(``calib.activations=disk``, memory-mapped), each removed when its run ends; a killed run's file by the next run
or by ``svdexp-cache clear``."""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from svdexp.cache.budget import cache_root


def scratch_root() -> Path:
    return cache_root() / "scratch"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_scratch(dry_run: bool = False) -> list[tuple[Path, int]]:
    """Remove the activation files of runs that are gone (killed: the name carries this host and the pid) and
    return them with their sizes; with ``dry_run`` only list them."""
    root, host, stale = scratch_root(), os.uname().nodename, []
    for path in sorted(root.glob("activations-*.bin")) if root.is_dir() else []:
        owner, _, rest = path.name.removeprefix("activations-").rpartition("-")[0].rpartition("-")
        if owner == host and rest.isdigit() and not _alive(int(rest)):
            stale.append((path, path.stat().st_size))
            if not dry_run:
                path.unlink(missing_ok=True)
    return stale


@contextmanager
def scratch_file() -> Iterator[Path]:
    """A fresh path for a memory-mapped activation file under ``$SVDEXP_CACHE/scratch``, removed on exit (also
    after a failure); a killed run's file is removed by the next run (:func:`clean_scratch`)."""
    root = scratch_root()
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"activations-{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:8]}.bin"
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)
