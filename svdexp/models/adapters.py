"""Where each model family keeps its decoder layers and the linears SVD methods target.

Linears are grouped by *input site*: the matrices of one site read the same input (q/k/v read the
normalised hidden state; gate/up read the post-attention norm), so one Gram matrix ``H`` serves them all.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from svdexp.errors import ConfigError


@dataclass(frozen=True)
class Adapter:
    family: str
    layers_path: str                      # attribute path from the CausalLM to the decoder-layer ModuleList
    sites: dict[str, tuple[str, ...]]     # input site -> linears (paths relative to one decoder layer)

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(name for names in self.sites.values() for name in names)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        module = model
        for part in self.layers_path.split("."):
            module = getattr(module, part)
        return module

    def layer_prefix(self, index: int) -> str:
        return f"{self.layers_path}.{index}"


_LLAMA_LIKE = {
    "attn_in": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attn_out": ("self_attn.o_proj",),
    "mlp_in": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp_out": ("mlp.down_proj",),
}

ADAPTERS: dict[str, Adapter] = {
    "llama": Adapter("llama", "model.layers", _LLAMA_LIKE),
    "mistral": Adapter("mistral", "model.layers", _LLAMA_LIKE),
    "qwen2": Adapter("qwen2", "model.layers", _LLAMA_LIKE),
    "opt": Adapter("opt", "model.decoder.layers", {
        "attn_in": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "attn_out": ("self_attn.out_proj",),
        "mlp_in": ("fc1",),
        "mlp_out": ("fc2",),
    }),
}


def adapter_for(model_type: str) -> Adapter:
    """The adapter of a transformers ``config.model_type``; a clear error for unsupported families."""
    if model_type not in ADAPTERS:
        raise ConfigError(
            f"model family {model_type!r} has no adapter; supported families: {', '.join(sorted(ADAPTERS))}. "
            "Add one in svdexp/models/adapters.py (decoder-layer path and the linears of each input site).")
    return ADAPTERS[model_type]
