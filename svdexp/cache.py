"""Content-addressed on-disk cache under ``$SVDEXP_CACHE``: keys are hashes of everything a value depends on.

Entries are written atomically (temporary file + rename) and carry their own key, which is checked on read,
so a truncated or foreign file is treated as a miss, never as a value.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections import OrderedDict
from typing import Any, Callable

import torch
from torch import nn

from svdexp.models.loading import cache_dir
from svdexp.tracking import read_results, write_json_atomic


def model_fingerprint(model: nn.Module) -> str:
    """A hash of every parameter and buffer (names, shapes, dtypes and values): the weights' identity."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        h.update(_bytes(tensor))
    return h.hexdigest()


def _bytes(tensor: torch.Tensor):
    """The tensor's raw bytes as a buffer (no copy when it already is contiguous on the CPU)."""
    return tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()


def tensor_fingerprint(tensor: torch.Tensor) -> str:
    """A hash of one tensor's shape, dtype and values (e.g. the token ids of an evaluation set)."""
    h = hashlib.blake2b(f"{tuple(tensor.shape)}:{tensor.dtype}".encode(), digest_size=16)
    h.update(_bytes(tensor))
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


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    """CRC-32 of the names and bytes of ``tensors``: detects truncated or damaged entries (the key, a hash of
    the entry's description, is stored beside it and checked too); ~3x faster than a cryptographic digest."""
    crc = 0
    for name in sorted(tensors):
        crc = zlib.crc32(name.encode(), crc)
        crc = zlib.crc32(_bytes(tensors[name]), crc)
    return f"crc32:{crc:08x}"


def has_tensor_entry(kind: str, key: str) -> bool:
    """Whether an entry file exists (not verified: :func:`load_tensor_entry` verifies)."""
    return (cache_dir() / kind / f"{key}.safetensors").is_file()


def load_tensor_entry(kind: str, key: str) -> dict[str, torch.Tensor] | None:
    """Cached tensors of ``kind/key``; ``None`` when missing, unreadable, for another key, or corrupted."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = cache_dir() / kind / f"{key}.safetensors"
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        tensors = load_file(str(path))
    except Exception:  # noqa: BLE001 - any unreadable file is a miss, to be rebuilt
        return None
    if meta.get("key") != key or meta.get("checksum") != _checksum(tensors):
        return None
    return tensors


def store_tensor_entry(kind: str, key: str, tensors: dict[str, torch.Tensor], description: dict) -> None:
    """Write tensors (safetensors, never pickle) with their key and checksum; atomic via rename."""
    import os

    from safetensors.torch import save_file

    path = cache_dir() / kind / f"{key}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {"key": key, "checksum": _checksum(tensors), "description": json.dumps(description, sort_keys=True)}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


class SVDCache:
    """An :data:`~svdexp.methods.linalg.SVDProvider` backed by ``$SVDEXP_CACHE/svd``: every job that factorises
    the same (scaled) matrix, at any rank, shares one decomposition.

    A matrix is keyed by what makes it: the model's fingerprint, the name of the weight in use
    (:func:`~svdexp.methods.linalg.weight_in_use`), the recipe's operation and the fingerprints of its inputs
    (scalings, whitening factor); so a hit neither builds nor reads the matrix. Without a model fingerprint
    or a weight name, the matrix is built and keyed by its own bytes.

    An entry keeps all singular values and the first ``max(k, floor(m n / (m + n)))`` singular vectors: no
    rank that saves parameters is larger, so one entry serves every ratio >= 0. Results are bit-identical with
    and without the cache (the returned factors are slices of the very tensors that are stored).
    """

    def __init__(self, model: str | None = None, device: str = "cpu") -> None:
        self.model = model
        self.device = device
        self.reused = 0
        self.computed = 0
        # fingerprints of recent recipe inputs: a site's whitening factor serves several matrices
        self._recent: OrderedDict[int, tuple[torch.Tensor, str]] = OrderedDict()

    def _fingerprint(self, tensor: torch.Tensor) -> str:
        held = self._recent.get(id(tensor))
        if held is None or held[0] is not tensor:
            held = (tensor, tensor_fingerprint(tensor))
            self._recent[id(tensor)] = held
            while len(self._recent) > 8:
                self._recent.popitem(last=False)
        return held[1]

    def __call__(self, build: Callable[[], torch.Tensor], k: int, recipe, weight: str | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        M = None
        if self.model is not None and weight is not None:
            description = {"model": self.model, "weight": weight, "op": recipe.op,
                           "inputs": {n: self._fingerprint(t) for n, t in sorted(recipe.inputs.items())},
                           "torch": torch.__version__, "device": self.device}
            device = self.device
        else:
            M = build()
            description = {"matrix": tensor_fingerprint(M), "torch": torch.__version__, "device": M.device.type}
            device = M.device
        key = cache_key(description)
        entry = load_tensor_entry("svd", key)
        if entry is not None and entry["U"].shape[1] >= k:
            self.reused += 1
            U, sigma, Vh = (entry[name].to(device) for name in ("U", "sigma", "Vh"))
        else:
            self.computed += 1
            M = build() if M is None else M
            U, sigma, Vh = torch.linalg.svd(M, full_matrices=False)
            m, n = M.shape
            keep = min(max(k, m * n // (m + n)), sigma.numel())
            U, Vh = U[:, :keep].contiguous(), Vh[:keep].contiguous()
            store_tensor_entry("svd", key, {"U": U, "sigma": sigma, "Vh": Vh},
                               {**description, "shape": [m, n], "vectors": keep})
        return U[:, :k], sigma, Vh[:k]

    def record(self) -> dict[str, int]:
        """``{"reused": ..., "computed": ...}`` decompositions, for ``results.json``."""
        return {"reused": self.reused, "computed": self.computed}
