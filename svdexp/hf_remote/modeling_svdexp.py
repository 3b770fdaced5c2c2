"""Models of svdexp low-rank checkpoints (Hugging Face remote code, self-contained).

Each class subclasses the family's own ``...ForCausalLM`` and, just before the base class runs
``post_init`` (weight init / tying), replaces every ``nn.Linear`` named in ``config.svdexp_ranks`` by
``SvdexpLowRankLinear`` of the recorded rank. ``from_pretrained`` then loads the ``A``/``B`` factors from
the safetensors file like any other weight. Nothing here imports svdexp.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaForCausalLM, MistralForCausalLM, OPTForCausalLM, Qwen2ForCausalLM

from .configuration_svdexp import SvdexpLlamaConfig, SvdexpMistralConfig, SvdexpOPTConfig, SvdexpQwen2Config


class SvdexpLowRankLinear(nn.Module):
    """``y = A (B x) + bias``: ``B`` is ``rank x in`` without bias, ``A`` is ``out x rank`` with the bias."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.B = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.A = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.A(self.B(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def swap_in_low_rank(model: nn.Module, ranks: dict[str, int]) -> None:
    """Replace each ``nn.Linear`` named in ``ranks`` by an (uninitialised) ``SvdexpLowRankLinear``."""
    for name, rank in ranks.items():
        parent_name, _, child_name = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
            old = getattr(parent, child_name)
        except AttributeError as err:
            raise ValueError(f"svdexp_ranks names {name!r}, which this model does not have") from err
        if not isinstance(old, nn.Linear):
            raise ValueError(f"svdexp_ranks names {name!r}, which is a {type(old).__name__}, not an nn.Linear")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"svdexp_ranks gives {name!r} the rank {rank!r}; ranks must be positive integers")
        new = SvdexpLowRankLinear(old.in_features, old.out_features, rank, old.bias is not None,
                                  device=old.weight.device, dtype=old.weight.dtype)
        setattr(parent, child_name, new)


class _SvdexpLowRankMixin:
    """Swaps the low-rank modules in before the base class initialises and ties weights; loads strictly."""

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """``from_pretrained`` that raises instead of randomly initialising missing or mismatched tensors."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        problems = {key: sorted(str(item) for item in info.get(key) or ())
                    for key in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(key)}
        if problems:
            listed = "; ".join(f"{key.replace('_', ' ')}: {', '.join(items[:6])}" + (" ..." if len(items) > 6 else "")
                               for key, items in problems.items())
            raise ValueError(f"{cls.__name__}: the weights do not match config.json and its svdexp_ranks ({listed}); "
                             "the checkpoint folder is incomplete or was modified after saving")
        return (model, info) if want_info else model

    def post_init(self) -> None:
        ranks = getattr(self.config, "svdexp_ranks", None)
        if not ranks:
            raise ValueError(
                f"{type(self).__name__}: config has no 'svdexp_ranks' (module name -> rank); this folder is not a "
                "complete svdexp checkpoint")
        swap_in_low_rank(self, ranks)
        super().post_init()


class SvdexpLlamaForCausalLM(_SvdexpLowRankMixin, LlamaForCausalLM):
    """Llama with low-rank linears at the ranks in ``config.svdexp_ranks``."""

    config_class = SvdexpLlamaConfig


class SvdexpMistralForCausalLM(_SvdexpLowRankMixin, MistralForCausalLM):
    """Mistral with low-rank linears at the ranks in ``config.svdexp_ranks``."""

    config_class = SvdexpMistralConfig


class SvdexpQwen2ForCausalLM(_SvdexpLowRankMixin, Qwen2ForCausalLM):
    """Qwen2 with low-rank linears at the ranks in ``config.svdexp_ranks``."""

    config_class = SvdexpQwen2Config


class SvdexpOPTForCausalLM(_SvdexpLowRankMixin, OPTForCausalLM):
    """OPT with low-rank linears at the ranks in ``config.svdexp_ranks``."""

    config_class = SvdexpOPTConfig
