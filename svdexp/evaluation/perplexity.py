"""Token perplexity as in the papers: exp(mean next-token NLL over non-overlapping chunks)."""

from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm



def perplexity(model: nn.Module, chunks: torch.Tensor, batch_size: int, device: torch.device,
               desc: str = "perplexity") -> dict:
    """Perplexity of ``model`` over ``chunks`` (``num_chunks x seq_len`` token ids).

    Every chunk contributes ``seq_len - 1`` next-token predictions. A chunk whose NLL is not finite is
    reported by index in ``nonfinite_chunks`` (and makes the perplexity non-finite), never skipped.
    """
    nll_sum = 0.0
    count = 0
    nonfinite: list[int] = []
    model.eval()
    with torch.no_grad():
        for start in tqdm(range(0, chunks.shape[0], batch_size), desc=desc, unit="batch", leave=False):
            ids = chunks[start:start + batch_size].to(device)
            nll = torch.stack([F.cross_entropy(logits[:-1].float(), ids[j, 1:], reduction="none")
                               for j, logits in enumerate(chunk_logits(model, ids))]).double()
            per_chunk = nll.sum(1)
            for j, value in enumerate(per_chunk.tolist()):
                if not math.isfinite(value):
                    nonfinite.append(start + j)
            nll_sum += per_chunk.sum().item()
            count += nll.numel()
    mean_nll = nll_sum / count
    ppl = math.exp(min(mean_nll, 700.0)) if math.isfinite(mean_nll) else mean_nll  # nan stays nan
    return {"ppl": ppl, "nll": mean_nll, "chunks": int(chunks.shape[0]), "tokens": count,
            "nonfinite_chunks": nonfinite}


def chunk_logits(model: nn.Module, ids: torch.Tensor) -> Iterator[torch.Tensor]:
    """The logits of each chunk (row) of ``ids`` in turn, the batch run through the model at once.

    When the model's logits are its output embedding applied to the decoder's last hidden states and nothing else
    (:func:`plain_head`), the head runs one chunk at a time, so one chunk's logits exist at a time (512 tokens x
    49k vocabulary: 0.1 GB instead of the batch's 0.8 GB); otherwise (soft-capped or scaled logits: Gemma 2,
    Cohere, Granite) the batch's logits as the model returns them.
    """
    if plain_head(model):
        hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
        head = model.get_output_embeddings()
        for j in range(ids.shape[0]):
            yield head(hidden[j])
        return
    logits = model(ids, use_cache=False).logits
    yield from logits


def plain_head(model: nn.Module) -> bool:
    """Whether ``model``'s logits are exactly its output embedding (an ``nn.Linear``) applied to its decoder's last
    hidden states: checked once per model on a few tokens, by comparing what the head reads and returns with the
    decoder's output and the model's logits, bit for bit."""
    known = getattr(model, "_svdexp_plain_head", None)
    if known is not None:
        return known
    head, decoder = model.get_output_embeddings(), model.get_decoder()
    plain = False
    if isinstance(head, nn.Linear) and decoder is not None and decoder is not model:
        seen: dict[str, torch.Tensor] = {}
        handle = head.register_forward_hook(lambda _m, args, out: seen.update(read=args[0], wrote=out))
        ids = (torch.arange(1, 9) % head.out_features)[None].to(head.weight.device)
        try:
            with torch.no_grad():
                logits = model(ids, use_cache=False).logits
                hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state
        finally:
            handle.remove()
        plain = ("wrote" in seen and seen["wrote"].shape == logits.shape and torch.equal(seen["wrote"], logits)
                 and seen["read"].shape == hidden.shape and torch.equal(seen["read"], hidden))
    model._svdexp_plain_head = plain
    return plain


def first_nonfinite_module(model: nn.Module, ids: torch.Tensor, device: torch.device) -> str | None:
    """The first module, in execution order, whose output holds a NaN or Inf on ``ids`` (None if none does)."""
    found: list[str] = []

    def hook(name):
        def check(_module, _inputs, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            if not found and torch.is_tensor(out) and out.is_floating_point() and not torch.isfinite(out).all():
                found.append(name)
        return check

    handles = [m.register_forward_hook(hook(name)) for name, m in model.named_modules() if name]
    try:
        with torch.no_grad():
            model(ids.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None
