"""Tokenisation, calibration sampling and evaluation chunks, and the token sets of a run (:func:`run_tokens`)."""

from __future__ import annotations

import functools
import hashlib

import torch

from svdexp.data.sources import load_text
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


def calibration_batch(ids: torch.Tensor, num_samples: int, seq_len: int, seed: int,
                      bos_id: int | None = None) -> torch.Tensor:
    """``num_samples`` random windows of ``seq_len`` tokens from ``ids``, reproducible from ``seed``. With
    ``bos_id``, each window is that token followed by ``seq_len - 1`` tokens of ``ids``."""
    text_len = seq_len - (bos_id is not None)
    if text_len < 1:
        raise ConfigError(f"calib.seq_len={seq_len} leaves no text token after the BOS token; choose calib.seq_len "
                          ">= 2, or calib.bos=false.")
    if ids.numel() <= text_len:
        raise ConfigError(
            f"calibration text has {ids.numel()} tokens, shorter than one sample of calib.seq_len={seq_len}"
            f"{' (BOS + text)' if bos_id is not None else ''}; use a shorter seq_len or a larger dataset.")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - text_len, (num_samples,), generator=gen)
    windows = torch.stack([ids[s:s + text_len] for s in starts.tolist()])
    return windows if bos_id is None else _with_bos(windows, bos_id)


def eval_chunks(ids: torch.Tensor, seq_len: int, max_chunks: int | None, bos_id: int | None = None) -> torch.Tensor:
    """Non-overlapping chunks of ``seq_len`` tokens (the tail shorter than ``seq_len`` is dropped). With
    ``bos_id``, each chunk is that token followed by the next ``seq_len - 1`` tokens of ``ids``: still
    ``seq_len - 1`` predictions per chunk, all of text tokens."""
    text_len = seq_len - (bos_id is not None)
    n = ids.numel() // text_len
    if n == 0:
        raise ConfigError(f"evaluation text has {ids.numel()} tokens, fewer than one chunk of {seq_len}.")
    if max_chunks is not None:
        n = min(n, max_chunks)
    chunks = ids[: n * text_len].view(n, text_len)
    return chunks if bos_id is None else _with_bos(chunks, bos_id)


def _with_bos(rows: torch.Tensor, bos_id: int) -> torch.Tensor:
    return torch.cat([torch.full((rows.shape[0], 1), bos_id, dtype=rows.dtype), rows], dim=1)


# -- BOS: calib.bos / eval.ppl.bos ------------------------------------------------------------------------

BOS_CHOICES = ("auto", "true", "false")


def bos_choice(value) -> str | None:
    """``value`` of ``calib.bos`` / ``eval.ppl.bos`` as one of :data:`BOS_CHOICES`, None when it is none of them.
    A YAML or command-line ``true`` / ``false`` reaches the string key as ``'True'`` / ``'False'``."""
    text = {"True": "true", "False": "false"}.get(str(value), str(value))
    return text if isinstance(value, (str, bool)) and text in BOS_CHOICES else None


def adds_bos(tokenizer) -> bool:
    """Whether ``tokenizer`` puts its BOS token first when it tokenises a text (its own setting)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", verbose=False).input_ids
    return len(ids) > 0 and ids[0] == bos


def bos_token(tokenizer, key: str, value) -> int | None:
    """The BOS token id each window/chunk starts with under ``key=value`` (``auto``: the tokenizer's own setting,
    :func:`adds_bos`), or None: no BOS. ``true`` with a tokenizer that has no BOS token is a :class:`ConfigError`."""
    choice = bos_choice(value)
    if choice is None:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of: {', '.join(BOS_CHOICES)}.")
    if choice == "false" or (choice == "auto" and not adds_bos(tokenizer)):
        return None
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise ConfigError(f"{key}={choice} asks for a BOS token at the start of every sequence, but the model's "
                          "tokenizer has none (its bos_token_id is None); choose one of: auto (the tokenizer's own "
                          "setting: here no BOS), false.")
    return int(bos)


def strip_bos(tokenizer, ids: torch.Tensor, bos_id: int | None) -> torch.Tensor:
    """``ids`` of a whole text (:func:`tokenize_text`), less the BOS token the tokenizer itself put first when the
    sequences cut from it get their own (``bos_id``): the first sequence then starts with one BOS, not two."""
    if bos_id is not None and ids.numel() and int(ids[0]) == bos_id and adds_bos(tokenizer):
        return ids[1:]
    return ids


def bos_ids(cfg, tokenizer, compressing: bool) -> dict[str, int | None]:
    """The BOS token id the calibration windows (``calib``; None when not ``compressing``) and the perplexity
    chunks (``ppl``) of the run ``cfg`` start with, or None where they start with none (``calib.bos`` /
    ``eval.ppl.bos``; ``true`` without a BOS token in the tokenizer: :class:`ConfigError`)."""
    ppl_bos = bos_token(tokenizer, "eval.ppl.bos", cfg.eval.ppl.bos)
    calib_bos = bos_token(tokenizer, "calib.bos", cfg.calib.bos) if compressing else None
    return {"calib": calib_bos, "ppl": ppl_bos}


def bos_record(cfg, tokenizer, compressing: bool) -> dict[str, bool]:
    """results.json's ``bos``: whether the calibration windows and the perplexity chunks start with a BOS token."""
    return {part: token is not None for part, token in bos_ids(cfg, tokenizer, compressing).items()}


def run_tokens(cfg, tokenizer, compressing: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """The perplexity chunks of every evaluation set of the run ``cfg``, and its calibration samples (None when
    not ``compressing``), each starting with the BOS token where :func:`bos_ids` says so."""
    bos = bos_ids(cfg, tokenizer, compressing)
    ppl_bos, calib_bos = bos["ppl"], bos["calib"]

    def text(dataset: str, split: str, bos: int | None) -> torch.Tensor:
        return strip_bos(tokenizer, tokenize_text(tokenizer, load_text(dataset, split)), bos)

    eval_sets = {name: eval_chunks(text(name, "test", ppl_bos), cfg.eval.ppl.seq_len, cfg.eval.ppl.max_chunks,
                                   ppl_bos) for name in cfg.eval.ppl.datasets}
    calib_ids = None
    if compressing:
        calib_ids = calibration_batch(text(cfg.calib.dataset, "train", calib_bos), cfg.calib.num_samples,
                                      cfg.calib.seq_len, cfg.seed, calib_bos)
    return eval_sets, calib_ids
