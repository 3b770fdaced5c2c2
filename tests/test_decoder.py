"""The decoder read from the model itself (svdexp.models.decoder): layers, input sites, what stays dense, and the
inputs each layer is passed, for every family of tests/families.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from families import FAMILIES, family_params, tiny_model
from svdexp.compression.calibration import capture_inputs, run_layer
from svdexp.errors import ConfigError
from svdexp.models.decoder import OVERRIDES, Override, discover, is_linear, weight_matrix

# The hand-written table svdexp used before discovery (input site -> linears): discovery must find exactly these.
_LLAMA_LIKE = [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
               ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)]
FORMER_TABLE = {
    "llama": ("model.layers", _LLAMA_LIKE),
    "mistral": ("model.layers", _LLAMA_LIKE),
    "qwen2": ("model.layers", _LLAMA_LIKE),
    "opt": ("model.decoder.layers", [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                                     ("self_attn.out_proj",), ("fc1",), ("fc2",)]),
}


@pytest.mark.parametrize("family", sorted(FORMER_TABLE))
def test_discovered_sites_equal_the_former_table(family):
    decoder = discover(tiny_model(family))
    layers_path, sites = FORMER_TABLE[family]
    assert decoder.layers_path == layers_path
    assert decoder.num_layers == 2 and decoder.dense == {}
    for index in range(decoder.num_layers):
        assert list(decoder.sites(index).values()) == sites      # same groups, same order


@pytest.mark.parametrize("family", family_params())
def test_every_layer_input_captured_equals_the_models_own_hidden_states(family):
    """capture_inputs + run_layer, layer by layer, reproduce the hidden states of the full forward pass: each layer
    gets what the model passes it (per-layer masks of sliding/full attention, hybrid layers, positional args)."""
    model = tiny_model(family)
    decoder = discover(model)
    ids = torch.randint(3, 1000, (3, 12), generator=torch.Generator().manual_seed(0))
    inputs = capture_inputs(model, decoder, ids, 2, torch.device("cpu"))
    with torch.no_grad():
        expected = [model(ids[s:s + 2], output_hidden_states=True, use_cache=False).hidden_states for s in (0, 2)]
    for index, layer in enumerate(decoder.layers(model)):
        for batch, hidden in enumerate(inputs.hidden):
            assert torch.equal(hidden, expected[batch][index]), (family, index)
        inputs = run_layer(layer, inputs)


@pytest.mark.parametrize("family", family_params())
def test_sites_cover_every_linear_of_the_layers_once_and_nothing_outside(family):
    model = tiny_model(family)
    decoder = discover(model)
    for index, layer in enumerate(decoder.layers(model)):
        targets = decoder.targets(index)
        assert len(targets) == len(set(targets)) > 0
        prefix = decoder.layer_prefix(index)
        linears = {path for path, m in layer.named_modules() if path and is_linear(m)}
        dense = {name.removeprefix(prefix + ".") for name in decoder.dense if name.startswith(prefix + ".")}
        assert set(targets) <= linears and not set(targets) & dense
        assert linears - set(targets) <= {d.removesuffix(".weight") for d in dense}
    names = {f"{decoder.layer_prefix(i)}.{t}" for i in range(decoder.num_layers) for t in decoder.targets(i)}
    assert not any(n.startswith(("lm_head", "model.embed", "transformer.wte")) for n in names)


@pytest.mark.parametrize("family", [f for f, spec in FAMILIES.items() if spec.experts != "-"])
def test_experts_and_routers_stay_dense_and_are_reported(family):
    model = tiny_model(family)
    decoder = discover(model)
    reasons = {info["reason"] for info in decoder.dense.values()}
    assert reasons == {"expert", "router"}
    for name, info in decoder.dense.items():
        assert list(model.get_parameter(name if name.endswith(("weight", "proj")) else name).shape) == info["shape"]
    for index in range(decoder.num_layers):
        assert all(not t.startswith("mlp.") for t in decoder.targets(index))   # attention only


def test_hybrid_layers_have_their_own_sites():
    decoder = discover(tiny_model("qwen3_5_text"))
    kinds = [next(iter(decoder.sites(i))).split(".")[0] for i in range(decoder.num_layers)]
    assert kinds == ["linear_attn", "linear_attn", "linear_attn", "self_attn"]
    assert {info["reason"] for info in decoder.dense.values()} == {"not a linear"}    # the depthwise Conv1d


def test_parallel_attention_and_mlp_share_one_site():
    """Falcon's and GPT-J's attention and MLP read the same normalised hidden state: one H serves both."""
    for family, shared in (("falcon", {"self_attention.query_key_value", "mlp.dense_h_to_4h"}),
                           ("gptj", {"attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.fc_in"})):
        sites = discover(tiny_model(family)).sites(0)
        assert set(next(iter(sites.values()))) == shared


def test_conv1d_matrix_is_the_transposed_weight():
    layer = tiny_model("gpt2").transformer.h[0]
    x = torch.randn(5, 64)
    conv = layer.attn.c_attn
    assert torch.allclose(conv(x), x @ weight_matrix(conv).T + conv.bias, atol=1e-6)
    assert tuple(weight_matrix(conv).shape) == (192, 64)


def test_a_model_without_decoder_layers_is_refused_naming_its_family():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"model_type": "flatnet", "vocab_size": 8})()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(ConfigError, match="'flatnet' model: no decoder layers found"):
        discover(Flat())


def test_a_layer_without_a_reachable_linear_is_refused(monkeypatch):
    model = tiny_model("llama")
    model.model.layers[1].forward = lambda hidden_states, *a, **k: hidden_states    # skips its linears
    with pytest.raises(ConfigError, match=r"layer model.layers.1 has no linear layer a forward pass reaches"):
        discover(model)


def test_a_declared_override_replaces_discovery(monkeypatch):
    monkeypatch.setitem(OVERRIDES, "llama", Override("model.layers", {"mlp": ("mlp.down_proj",)}))
    decoder = discover(tiny_model("llama"))
    assert [decoder.sites(i) for i in range(2)] == [{"mlp": ("mlp.down_proj",)}] * 2
