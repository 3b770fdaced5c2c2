"""What one run's steps share: the model, the method, the calibration tokens and where the caches are.

:func:`svdexp.runner.run` builds one :class:`RunContext` after loading (:func:`build_context`) and hands it down,
so that calibration (:mod:`svdexp.compression.calibration`), the statistics (:mod:`svdexp.compression.statistics`),
compression (:mod:`svdexp.compression.compress`) and evaluation read the same values from one place instead of long
lists of arguments. It is frozen: a step that needs a variant (ResSVD's K search compresses copies of the model)
makes one with :func:`dataclasses.replace`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from svdexp.cache.budget import cache_root, note_model
from svdexp.cache.store import model_fingerprint
from svdexp.methods import METHODS, Method
from svdexp.models.decoder import Decoder


@dataclass(frozen=True)
class RunContext:
    """The dense model of a run and how it is calibrated and compressed."""
    model: nn.Module
    decoder: Decoder                        # the decoder layers and their input sites (discovered)
    method: Method
    options: dict[str, Any]                 # the method's config (``cfg.method``, resolved)
    calib_ids: torch.Tensor | None          # calibration token ids (samples x seq_len); None when not compressing
    batch_size: int                         # calib.batch_size
    device: torch.device
    seed: int
    dtype: str = "float32"                  # the model's dtype, a part of every cache key
    fingerprint: str = ""                   # hash of the dense weights: the key of every cache entry of this model
    stats_cache: Path | None = None         # the shared statistics cache (calib.cache); None: a private directory
    svd_cache: bool = False                 # share decompositions across ratios (calib.cache_svd)
    tokenizer: Any = None
    eval_sets: dict[str, torch.Tensor] = field(default_factory=dict)   # dataset -> perplexity chunks
    activations: str = "memory"             # where calibration activations live: memory | disk (memory.plan)

    @property
    def propagate(self) -> str:
        """Where the statistics come from: ``original`` (the dense model) or ``compressed`` (the prefix)."""
        return self.options.get("propagate", "original")

    @property
    def num_groups(self) -> int:
        """AdaSVD's stack-of-batch groups (0: none)."""
        return int(self.options.get("groups") or 0)

    @property
    def num_layers(self) -> int:
        return self.decoder.num_layers


def build_context(cfg, model, tokenizer, eval_sets: dict[str, torch.Tensor], calib_ids: torch.Tensor | None,
                  decoder: Decoder, activations: str = "memory") -> RunContext:
    """The context of the run ``cfg`` on ``model``, calibration activations kept in ``activations`` (``memory`` or
    ``disk``, as the memory plan chose); hashes the weights (the key of every cache entry of this model)."""
    fingerprint = model_fingerprint(model)
    note_model(fingerprint, cfg.model.name)   # $SVDEXP_CACHE/models.json, for svdexp-cache --model NAME
    return RunContext(
        model=model, decoder=decoder, method=METHODS[cfg.method.name],
        options=OmegaConf.to_container(cfg.method, resolve=True), calib_ids=calib_ids,
        batch_size=cfg.calib.batch_size, device=torch.device(cfg.device), seed=cfg.seed, dtype=cfg.dtype,
        fingerprint=fingerprint, stats_cache=cache_root() if cfg.calib.cache else None,
        # Decompositions of rank-independent matrices are shared across ratios through $SVDEXP_CACHE/svd; with
        # propagate=compressed every matrix depends on the ratio, so there is nothing to share.
        svd_cache=bool(cfg.calib.cache_svd) and cfg.method.propagate == "original",
        tokenizer=tokenizer, eval_sets=eval_sets, activations=activations)
