"""Configurations of svdexp low-rank checkpoints (Hugging Face remote code, self-contained).

Each class is the family's own transformers configuration plus three fields:
``svdexp_ranks`` (``{module name: rank}`` of every low-rank matrix), ``svdexp_settings`` (how the
checkpoint was compressed, informational) and ``svdexp_base_model_type`` (the family, e.g. ``"llama"``).
"""

from __future__ import annotations

from transformers import LlamaConfig, MistralConfig, OPTConfig, Qwen2Config


class SvdexpFields:
    """The three fields every svdexp configuration adds to its family's (class attributes: their defaults)."""

    svdexp_ranks: dict | None = None
    svdexp_settings: dict | None = None
    svdexp_base_model_type: str | None = None


def _svdexp_config(base: type, family: str) -> type:
    """``base`` (the family's transformers configuration) with the svdexp fields, as ``model_type`` svdexp_<family>."""
    name = f"Svdexp{base.__name__}"
    return type(name, (SvdexpFields, base), {"__doc__": f"``{base.__name__}`` with the svdexp rank map.",
                                             "__qualname__": name, "model_type": f"svdexp_{family}",
                                             "svdexp_base_model_type": family})


SvdexpLlamaConfig = _svdexp_config(LlamaConfig, "llama")
SvdexpMistralConfig = _svdexp_config(MistralConfig, "mistral")
SvdexpQwen2Config = _svdexp_config(Qwen2Config, "qwen2")
SvdexpOPTConfig = _svdexp_config(OPTConfig, "opt")
