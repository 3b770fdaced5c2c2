"""Content-addressed on-disk cache under ``$SVDEXP_CACHE``: keys are hashes of everything a value depends on.

Entries are written atomically (temporary file + rename) and carry their own key, which is checked on read,
so a truncated or foreign file is treated as a miss, never as a value.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn

from svdexp.models.loading import cache_dir
from svdexp.tracking import read_results, write_json_atomic


def model_fingerprint(model: nn.Module) -> str:
    """A hash of every parameter and buffer (names, shapes, dtypes and values): the weights' identity."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def tensor_fingerprint(tensor: torch.Tensor) -> str:
    """A hash of one tensor's shape, dtype and values (e.g. the token ids of an evaluation set)."""
    h = hashlib.blake2b(f"{tuple(tensor.shape)}:{tensor.dtype}".encode(), digest_size=16)
    h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_key(parts: dict[str, Any]) -> str:
    """A stable hash of a JSON-serialisable description."""
    return hashlib.blake2b(json.dumps(parts, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()


def load_json_entry(kind: str, key: str) -> dict | None:
    """The cached value of ``kind/key``, or ``None`` when missing or not a valid entry for that key."""
    entry = read_results(cache_dir() / kind / f"{key}.json")
    if not entry or entry.get("key") != key or "value" not in entry:
        return None
    return entry["value"]


def store_json_entry(kind: str, key: str, value: Any, description: dict) -> None:
    write_json_atomic(cache_dir() / kind / f"{key}.json", {"key": key, "description": description, "value": value})
