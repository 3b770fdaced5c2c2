"""Perplexity's logits one chunk at a time equal the model's own logits, for every family of tests/families.py
(the LM head applied per chunk where the model's logits are the head's output, the batch's logits otherwise, e.g.
Gemma 2's soft-capped logits)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from families import family_params, tiny_model
from svdexp.evaluation.perplexity import chunk_logits, perplexity

VOCAB = 97      # no tokenizer drives these models


@pytest.mark.parametrize("family", family_params())
def test_chunk_logits_equal_the_models_logits(family):
    model = tiny_model(family, vocab_size=VOCAB)
    ids = torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
        chunks = list(chunk_logits(model, ids))
    assert len(chunks) == 3
    for j, logits in enumerate(chunks):
        assert logits.shape == (16, VOCAB)
        torch.testing.assert_close(logits, expected[j], rtol=1e-5, atol=1e-5)


def test_perplexity_is_the_exp_of_the_mean_next_token_nll():
    model = tiny_model("llama", vocab_size=VOCAB)
    ids = torch.randint(0, VOCAB, (5, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1)).item()
    result = perplexity(model, ids, batch_size=2, device=torch.device("cpu"))
    assert result["tokens"] == 5 * 11 and result["chunks"] == 5 and result["nonfinite_chunks"] == []
    assert math.isclose(result["nll"], nll, rel_tol=1e-5) and math.isclose(result["ppl"], math.exp(nll), rel_tol=1e-5)
