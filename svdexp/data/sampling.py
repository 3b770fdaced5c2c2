"""Tokenisation, calibration sampling and evaluation chunks."""

from __future__ import annotations

import functools

import torch

from svdexp.errors import ConfigError


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Tokenise a whole split once, with the tokenizer's default special tokens, as a 1-D LongTensor."""
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
