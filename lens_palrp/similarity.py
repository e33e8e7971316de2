"""Explain the cosine similarity of two sentences' mean-pooled embeddings (sentence encoders).

The similarity ``cos = <a, b> / (|a| |b|)`` is a product of the two pooled embeddings: under
the uniform rule each side receives half of it, with the norms held constant (like a
normalization scale). The two sentences form a batch of two; row 0 explains sentence A's share
``cos / 2`` and row 1 sentence B's, so ``attr.target_value.sum()`` is the similarity and every
token and position of both sentences gets relevance.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lens_palrp.engine import explain
from lens_palrp.inputs import prepare_tokens
from lens_palrp.models import explainable
from lens_palrp.hooks import family_for
from lens_palrp.result import Attribution
from lens_palrp.targets import at_hook


def mean_pool(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values[batch, pos, ...]`` over each row's real positions (linear in ``values``)."""
    weights = mask.to(values.dtype).reshape(*mask.shape, *([1] * (values.ndim - 2)))
    return (values * weights).sum(1) / weights.sum(1)


def pooled_cosine_halves(hidden: Tensor, mask: Tensor) -> Tensor:
    """``[cos/2, cos/2]`` for a batch of two, each half differentiable only through its own side."""
    pooled = mean_pool(hidden, mask)
    a, b = pooled[0], pooled[1]
    norms = (a.norm() * b.norm()).detach()
    return torch.stack([0.5 * (a * b.detach()).sum() / norms, 0.5 * (a.detach() * b).sum() / norms])


def explain_similarity(
    model, sentence_a: str, sentence_b: str, method: str = "pa_lrp", hook_name: Optional[str] = None,
    record=None, tokenizer=None,
) -> Attribution:
    """Relevance of both sentences' tokens and positions for their cosine similarity.

    ``hook_name`` is where the token embeddings are read (default: the last block's output,
    what sentence-transformers mean-pools for all-MiniLM-L6-v2). ``model`` may be a Hugging Face
    model object, wrapped as ``lp.explain`` wraps it (``tokenizer=`` as there).
    """
    model = explainable(model, tokenizer)
    family = family_for(model)
    hook_name = hook_name or family.final_hidden_hook
    prepared = prepare_tokens(family, [sentence_a, sentence_b], None, None, "cpu")
    tokens, mask = prepared.tokens, prepared.attention_mask
    if mask is None:
        mask = torch.ones_like(tokens)
    device = next(model.parameters()).device
    target = at_hook(hook_name, lambda h: pooled_cosine_halves(h, mask.to(h.device)))
    return explain(model, tokens.to(device), target, method=method, attention_mask=mask.to(device), record=record)
