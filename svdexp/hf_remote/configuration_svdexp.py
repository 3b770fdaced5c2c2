"""Configurations of svdexp low-rank checkpoints (Hugging Face remote code, self-contained).

Each class is the family's own transformers configuration plus three fields:
``svdexp_ranks`` (``{module name: rank}`` of every low-rank matrix), ``svdexp_settings`` (how the
checkpoint was compressed, informational) and ``svdexp_base_model_type`` (the family, e.g. ``"llama"``).
"""

from __future__ import annotations

from transformers import LlamaConfig, MistralConfig, OPTConfig, Qwen2Config


class SvdexpLlamaConfig(LlamaConfig):
    """``LlamaConfig`` with the svdexp rank map."""

    model_type = "svdexp_llama"
    svdexp_ranks: dict | None = None
    svdexp_settings: dict | None = None
    svdexp_base_model_type: str | None = "llama"


class SvdexpMistralConfig(MistralConfig):
    """``MistralConfig`` with the svdexp rank map."""

    model_type = "svdexp_mistral"
    svdexp_ranks: dict | None = None
    svdexp_settings: dict | None = None
    svdexp_base_model_type: str | None = "mistral"


class SvdexpQwen2Config(Qwen2Config):
    """``Qwen2Config`` with the svdexp rank map."""

    model_type = "svdexp_qwen2"
    svdexp_ranks: dict | None = None
    svdexp_settings: dict | None = None
    svdexp_base_model_type: str | None = "qwen2"


class SvdexpOPTConfig(OPTConfig):
    """``OPTConfig`` with the svdexp rank map."""

    model_type = "svdexp_opt"
    svdexp_ranks: dict | None = None
    svdexp_settings: dict | None = None
    svdexp_base_model_type: str | None = "opt"
