"""Perplexity's logits one chunk at a time equal the model's own logits, for every family with an adapter."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from svdexp.evaluation.perplexity import chunk_logits, perplexity

SIZES = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 97}
FAMILIES = {
    "llama": {"intermediate_size": 48, "num_key_value_heads": 2},
    "mistral": {"intermediate_size": 48, "num_key_value_heads": 2},
    "qwen2": {"intermediate_size": 48, "num_key_value_heads": 2},
    "opt": {"ffn_dim": 48, "word_embed_proj_dim": 32},
    "gpt2": {},        # no adapter: the batch's logits as the model returns them
}


def _model(family: str):
    torch.manual_seed(0)
    sizes = dict(SIZES)
    if family == "gpt2":
        sizes = {"n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": 97}
    config = AutoConfig.for_model(family, **sizes, **FAMILIES[family])
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_chunk_logits_equal_the_models_logits(family):
    model = _model(family)
    ids = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
        chunks = list(chunk_logits(model, ids))
    assert len(chunks) == 3
    for j, logits in enumerate(chunks):
        assert logits.shape == (16, 97)
        torch.testing.assert_close(logits, expected[j], rtol=1e-5, atol=1e-5)


def test_perplexity_is_the_exp_of_the_mean_next_token_nll():
    model = _model("llama")
    ids = torch.randint(0, 97, (5, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1)).item()
    result = perplexity(model, ids, batch_size=2, device=torch.device("cpu"))
    assert result["tokens"] == 5 * 11 and result["chunks"] == 5 and result["nonfinite_chunks"] == []
    assert math.isclose(result["nll"], nll, rel_tol=1e-5) and math.isclose(result["ppl"], math.exp(nll), rel_tol=1e-5)
