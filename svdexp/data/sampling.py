"""Tokenisation, calibration sampling and evaluation chunks."""

from __future__ import annotations

import functools
import hashlib

import torch

from svdexp.errors import ConfigError


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Tokenise a whole split once, with the tokenizer's default special tokens, as a 1-D LongTensor.

    Remembered per process for a fast tokenizer (keyed by its serialised form and the text's hash, not by object
    identity): runs of one process (a Hydra multirun's basic launcher, the benchmarks, the tests) tokenise each
    split once. The caller gets its own tensor."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return _tokenize(tokenizer, text)
    key = (hashlib.sha256(backend.to_str().encode()).hexdigest(), hashlib.sha256(text.encode()).hexdigest())
    if key not in _TOKENIZED:
        if len(_TOKENIZED) >= _TOKENIZED_MAX:
            _TOKENIZED.pop(next(iter(_TOKENIZED)))
        _TOKENIZED[key] = _tokenize(tokenizer, text)
    return _TOKENIZED[key].clone()


_TOKENIZED: dict[tuple[str, str], torch.Tensor] = {}
_TOKENIZED_MAX = 8          # splits remembered (the embedded ones are ~0.1-1 M tokens: a few MB each)


def _tokenize(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids[0].long()
    _return_freed_memory()
    return ids


@functools.lru_cache(maxsize=1)
def _libc():
    """The C library (looked up once: ``find_library`` runs ``ldconfig``), or None."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def _return_freed_memory() -> None:
    """Hand the heap glibc keeps after a large transient allocation (tokenising a split: ~0.3 GB measured by
    benchmarks/memory.py) back to the system; nothing elsewhere."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def calibration_batch(ids: torch.Tensor, num_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """``num_samples`` random windows of ``seq_len`` tokens from ``ids``, reproducible from ``seed``."""
    if ids.numel() <= seq_len:
        raise ConfigError(
            f"calibration text has {ids.numel()} tokens, shorter than one sample of calib.seq_len={seq_len}; "
            "use a shorter seq_len or a larger dataset.")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (num_samples,), generator=gen)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


def eval_chunks(ids: torch.Tensor, seq_len: int, max_chunks: int | None) -> torch.Tensor:
    """Non-overlapping chunks of ``seq_len`` tokens (the tail shorter than ``seq_len`` is dropped)."""
    n = ids.numel() // seq_len
    if n == 0:
        raise ConfigError(f"evaluation text has {ids.numel()} tokens, fewer than one chunk of {seq_len}.")
    if max_chunks is not None:
        n = min(n, max_chunks)
    return ids[: n * seq_len].view(n, seq_len)
