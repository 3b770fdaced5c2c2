"""Crash points: named places where a run can be killed on purpose, to prove that a kill there loses nothing.

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
import signal
from collections import Counter

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
