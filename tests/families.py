"""Tiny random models of every decoder family the suite runs end to end, built offline from transformers' config
classes: a few layers, hidden size 64, SmolLM2's vocabulary (49,152) so its tokenizer drives them.

``FAMILIES`` maps a family (transformers ``model_type``) to the config fields that differ from :data:`SIZES` (the
older families name their sizes differently) and to what the README's table says of it: the shape of its attention
and MLP projections and whether mixture-of-experts weights stay dense. The README table is generated from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

VOCAB = 49152
SIZES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, head_dim=16, vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2,
             max_position_embeddings=256)
_GPT_STYLE = dict(n_embd=64, n_layer=2, n_head=4)


@dataclass(frozen=True)
class Family:
    attention: str                   # how the attention projections come
    mlp: str                         # how the MLP projections come
    fields: dict = field(default_factory=dict)
    drop: tuple[str, ...] = ()       # fields of SIZES this family's config does not take
    experts: str = "-"               # MoE: what stays dense
    shape: str = ""                  # the layer shape this family stands for in the method x policy tests


FAMILIES: dict[str, Family] = {
    "llama": Family("q/k/v, GQA", "gate/up + down", shape="separate q/k/v, gated MLP"),
    "mistral": Family("q/k/v, GQA, sliding window", "gate/up + down"),
    "qwen2": Family("q/k/v with bias, GQA", "gate/up + down"),
    "qwen3": Family("q/k/v, GQA, qk-norm", "gate/up + down"),
    "gemma": Family("q/k/v, GQA", "gate/up + down"),
    "gemma2": Family("q/k/v, GQA, sliding/full alternating, soft-capped logits", "gate/up + down",
                     {"sliding_window": 4}),
    "gemma3_text": Family("q/k/v, GQA, qk-norm, sliding/full per layer", "gate/up + down",
                          {"sliding_window": 4, "num_hidden_layers": 3}),
    "phi": Family("q/k/v with bias, parallel to the MLP", "fc1 + fc2 (shares the attention's input)"),
    "phi3": Family("fused qkv_proj", "fused gate_up_proj + down", shape="fused projections"),
    "olmo2": Family("q/k/v, qk-norm", "gate/up + down"),
    "granite": Family("q/k/v, GQA, scaled logits", "gate/up + down"),
    "stablelm": Family("q/k/v, partial rotary", "gate/up + down"),
    "starcoder2": Family("q/k/v with bias, GQA", "c_fc + c_proj with bias"),
    "cohere": Family("q/k/v parallel to the MLP, scaled logits", "gate/up (share the attention's input) + down"),
    "gpt2": Family("fused c_attn (Conv1D, transposed weight)", "c_fc + c_proj (Conv1D)", _GPT_STYLE,
                   shape="Conv1D (transposed weights)"),
    "gpt_neox": Family("fused query_key_value", "dense_h_to_4h + dense_4h_to_h"),
    "gptj": Family("q/k/v parallel to the MLP", "fc_in (shares the attention's input) + fc_out",
                   {**_GPT_STYLE, "rotary_dim": 8}),
    "opt": Family("q/k/v with bias", "fc1 + fc2", {"ffn_dim": 128, "word_embed_proj_dim": 64}),
    "falcon": Family("fused query_key_value (nn.Linear subclass), multi-query, parallel to the MLP",
                     "dense_h_to_4h (shares the attention's input) + dense_4h_to_h", drop=("head_dim",)),
    "bloom": Family("fused query_key_value, ALiBi", "dense_h_to_4h + dense_4h_to_h", {"n_layer": 2, "n_head": 4}),
    "gpt_bigcode": Family("fused c_attn, multi-query", "c_fc + c_proj", _GPT_STYLE),
    "mixtral": Family("q/k/v, GQA", "experts (3-D) + router", {"num_local_experts": 4, "num_experts_per_tok": 2},
                      experts="experts and router dense", shape="mixture of experts"),
    "qwen3_moe": Family("q/k/v, GQA, qk-norm", "experts (3-D) + router",
                        {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
                        experts="experts and router dense"),
    "qwen3_5_text": Family("gated delta net (in_proj_qkv/z/b/a, out_proj) and full attention layers, hybrid",
                           "gate/up + down", {"num_hidden_layers": 4}, shape="hybrid layers"),
}


def tiny_config(family: str, **overrides):
    """The config of the tiny ``family`` model (random weights come from :func:`tiny_model`); ``overrides``
    replace fields (e.g. a smaller ``vocab_size`` where no tokenizer drives the model)."""
    from transformers import AutoConfig

    spec = FAMILIES[family]
    fields = {k: v for k, v in {**SIZES, **spec.fields, **overrides}.items() if k not in spec.drop}
    return AutoConfig.for_model(family, **fields)


def tiny_model(family: str, seed: int = 0, **overrides):
    """The tiny ``family`` model with random weights drawn from ``seed``; ``overrides`` as in :func:`tiny_config`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family, **overrides)).eval()


def markdown_table() -> str:
    """README's table of the tested families (``python tests/families.py`` prints it; tests/test_readme.py checks
    that README carries this very table)."""
    rows = ["| family (`model_type`) | attention | MLP | mixture of experts | checkpoint reload |", "|---|---|---|---|---|"]
    for family, spec in FAMILIES.items():
        rows.append(f"| `{family}` | {spec.attention} | {spec.mlp} | {spec.experts} | "
                    "plain transformers and `load_compressed` |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())


# One family per layer shape stays in the unit tier (make test-fast); the others run in the slow tier (make test).
UNIT_TIER = ("llama", "phi3", "gpt2", "mixtral", "qwen3_5_text")


def family_params(names=None) -> list:
    """``names`` (default: every family) as pytest parameters, those outside :data:`UNIT_TIER` marked slow."""
    import pytest

    return [pytest.param(name, marks=() if name in UNIT_TIER else pytest.mark.slow)
            for name in sorted(FAMILIES if names is None else names)]
