"""Content-addressed on-disk cache under ``$SVDEXP_CACHE``: keys are hashes of everything a value depends on.

Entries are written atomically (temporary file + rename) and carry their own key, which is checked on read,
so a truncated or foreign file is treated as a miss, never as a value. Writes stay within the cache's size budget
(least recently used entries evicted first) and are skipped, with one warning, when the disk is full
(:mod:`svdexp.cache.budget`; ``svdexp-cache`` lists and clears entries).
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from svdexp.cache.budget import cache_root, is_shared, read_entry, spill, spilled, use_entry, write_bytes, write_entry
from svdexp.methods.linalg import EIG_VECTORS, decompose
from svdexp.record.tracking import jsonable, read_results


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


# Kinds a run reads back after writing them (the statistics store: each layer's statistics are written during
# calibration and read while compressing). An entry of these kinds that cannot be written (budget, no room) is
# kept aside for the run (:func:`~svdexp.cache.budget.spill`), so the run goes on as with ``calib.cache=false``;
# an entry of another kind is simply computed again when needed.
READ_BACK_KINDS = frozenset({"stats"})


def load_json_entry(kind: str, key: str) -> dict | None:
    """The cached value of ``kind/key``, or ``None`` when missing or not a valid entry for that key."""
    root = cache_root()
    path = root / kind / f"{key}.json"
    entry = read_results(path)
    if not isinstance(entry, dict) or entry.get("key") != key or "value" not in entry:
        return None
    read_entry(root, kind, key, path)
    return entry["value"]


def store_json_entry(kind: str, key: str, value: Any, description: dict) -> bool:
    """Write ``value`` with its key and description (atomic, within the cache budget, see
    :mod:`svdexp.cache.budget`); False when it was skipped for lack of room."""
    root = cache_root()
    data = json.dumps(jsonable({"key": key, "description": description, "value": value}), indent=2,
                      allow_nan=False).encode()
    return write_entry(root, kind, key, root / kind / f"{key}.json", len(data), lambda tmp: write_bytes(tmp, data))


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    """CRC-32 of the names and bytes of ``tensors``: detects truncated or damaged entries (the key, a hash of
    the entry's description, is stored beside it and checked too); ~3x faster than a cryptographic digest."""
    crc = 0
    for name in sorted(tensors):
        crc = zlib.crc32(name.encode(), crc)
        crc = zlib.crc32(_bytes(tensors[name]), crc)
    return f"crc32:{crc:08x}"


def has_tensor_entry(kind: str, key: str, root: Path | None = None) -> bool:
    """Whether an entry file exists, or this run kept it aside (not verified: :func:`load_tensor_entry`
    verifies)."""
    path = (root or cache_root()) / kind / f"{key}.safetensors"
    return path.is_file() or spilled(path) is not None


def _read_tensor_file(path: Path, key: str) -> dict[str, torch.Tensor] | None:
    """The tensors of one entry file, metadata and tensors from one opening (a writer renaming a new file over
    it meanwhile cannot mix two versions); ``None`` when missing, unreadable, for another key, or corrupted."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}
    except Exception:  # noqa: BLE001 - any unreadable file is a miss, to be rebuilt
        return None
    if meta.get("key") != key or meta.get("checksum") != _checksum(tensors):
        return None
    return tensors


def load_tensor_entry(kind: str, key: str, root: Path | None = None) -> dict[str, torch.Tensor] | None:
    """Cached tensors of ``kind/key`` (under ``root``, default :func:`~svdexp.cache.budget.cache_root`); ``None``
    when missing, unreadable, for another key, or corrupted. A hit is this run's use of the entry (its last use is
    now, and the budget never evicts it under this run)."""
    root = root or cache_root()
    path = root / kind / f"{key}.safetensors"
    tensors = _read_tensor_file(path, key) if path.is_file() else None
    if tensors is not None:
        read_entry(root, kind, key, path)
        return tensors
    kept = spilled(path)
    if isinstance(kept, Path):
        return _read_tensor_file(kept, key)
    return dict(kept) if kept is not None else None


def store_tensor_entry(kind: str, key: str, tensors: dict[str, torch.Tensor], description: dict,
                       root: Path | None = None) -> bool:
    """Write tensors (safetensors, never pickle) with their key and checksum; atomic via rename, within the
    cache budget (:mod:`svdexp.cache.budget`). False when skipped for lack of room; the run's own statistics
    (:data:`READ_BACK_KINDS`) are then kept aside for it."""
    from safetensors.torch import save_file

    root = root or cache_root()
    path = root / kind / f"{key}.safetensors"
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {"key": key, "checksum": _checksum(tensors), "description": json.dumps(description, sort_keys=True)}
    nbytes = 8 + len(json.dumps(meta)) + sum(t.numel() * t.element_size() + 64 + len(name)
                                             for name, t in tensors.items())

    def save(dest: Path) -> None:
        save_file(tensors, str(dest), metadata=meta)

    if write_entry(root, kind, key, path, nbytes, save):
        return True
    if kind in READ_BACK_KINDS:
        spill(path, save, {k: v.clone() for k, v in tensors.items()}, on_disk=is_shared(root))
    return False


RESPONSES = "zeroshot_responses"


def note_responses(key: str, description: dict) -> None:
    """lm-eval's answers for one model (``zeroshot_responses/<key>_rank0.db``, written by lm-eval itself): their
    description beside them (``<key>.json``, so that ``svdexp-cache`` knows their model) and their use by this
    run (never evicted under it)."""
    if load_json_entry(RESPONSES, key) is None:
        store_json_entry(RESPONSES, key, {}, description)
    use_entry(RESPONSES, key)


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

    Two kinds of entry (:func:`~svdexp.methods.linalg.decompose`, by the recipe's ``kind``): a thin SVD
    ``{U, sigma, Vh}`` (float64) of the matrix, for solver ``svd``; and, for solver ``auto``, the eigenvalues
    ``lam`` of ``M M^T`` and the top left singular vectors ``U`` (float32), from the Gram matrix of ``M``'s
    smaller side. Keys of the second kind carry the kind and the vectors' dtype; those of the first are as
    they always were.
    """

    def __init__(self, model: str | None = None, device: str = "cpu", root: Path | None = None) -> None:
        self.model = model
        self.device = device
        self.root = root          # None: $SVDEXP_CACHE; else a private folder (the allocation step's in-run memo)
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
                 ) -> dict[str, torch.Tensor]:
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
        if recipe.kind != "svd":
            description.update(kind=recipe.kind, shape=recipe.shape, vectors_dtype=str(EIG_VECTORS))
        key = cache_key(description)
        entry = load_tensor_entry("svd", key, self.root)
        if entry is not None and entry["U"].shape[1] >= k:
            self.reused += 1
            return {name: tensor.to(device) for name, tensor in entry.items()}
        self.computed += 1
        M = build() if M is None else M
        entry = decompose(recipe, M, k)
        store_tensor_entry("svd", key, entry, {**description, "shape": list(recipe.shape or M.shape),
                                               "vectors": entry["U"].shape[1]}, self.root)
        return entry

    def record(self) -> dict[str, int]:
        """``{"reused": ..., "computed": ...}`` decompositions, for ``results.json``."""
        return {"reused": self.reused, "computed": self.computed}
