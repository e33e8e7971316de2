"""Words for what one ``explain`` call explained, kept on the ``Attribution`` so that a report or
a notebook view made later (or from a saved file) can say it: the prompt as the tokenizer decodes
it (joined ``str_tokens`` lose the spaces of word-level and character tokenizers) and the target
(which logit, logit difference, metric or hook scalar)."""

from __future__ import annotations

from typing import List, Optional

import torch

from lens_palrp.targets import LogitTarget


def _token_text(family, token_id: int) -> str:
    """One id as its string (``repr`` keeps a leading space visible), or ``#id`` without a tokenizer."""
    tokenizer = family.tokenizer
    if tokenizer is None:
        return f"#{token_id}"
    return repr(tokenizer.decode([token_id]))


def prompt_texts(family, prepared) -> Optional[List[str]]:
    """Each example's real tokens decoded by the model's tokenizer (special tokens left out);
    None where the model has no tokenizer (ids only, images)."""
    tokenizer = family.tokenizer
    if tokenizer is None or not hasattr(tokenizer, "decode") or prepared.tokens.ndim != 2:
        return None
    mask = prepared.attention_mask if prepared.attention_mask is not None else torch.ones_like(prepared.tokens)
    return [tokenizer.decode(row[m.bool()].tolist(), skip_special_tokens=True)
            for row, m in zip(prepared.tokens.cpu(), mask.cpu())]


def target_labels(family, target, target_fn, hook_target, batch: int) -> List[str]:
    """One description per example of the explained scalar (its position is ``target_position``)."""
    if hook_target is not None:
        return [f"a scalar of the activation at hook {hook_target.hook_name}"] * batch
    if isinstance(target_fn, LogitTarget):
        correct = _per_example(target_fn.correct, batch)
        wrong = None if target_fn.wrong is None else _per_example(target_fn.wrong, batch)
        out = []
        for b in range(batch):
            label = f"logit of {_token_text(family, int(correct[b]))}"
            if wrong is not None:
                label += f" minus logit of {_token_text(family, int(wrong[b]))}"
            out.append(label)
        return out
    name = getattr(target, "__name__", type(target).__name__)
    return [f"the metric {name}(logits)"] * batch


def _per_example(ids, batch: int) -> List[int]:
    """One id for all examples, or one each, as one per example."""
    return ids.reshape(-1).expand(batch).tolist() if ids.numel() == 1 else ids.tolist()


def describe(family, prepared, target, target_fn, hook_target):
    """``(prompt_text, target_label)`` for the Attribution; labels never stop an explanation, so
    a tokenizer that cannot decode leaves them None."""
    batch = int(prepared.tokens.shape[0])
    try:
        texts = prompt_texts(family, prepared)
    except (TypeError, ValueError, AttributeError, KeyError, IndexError):
        texts = None
    try:
        labels = target_labels(family, target, target_fn, hook_target, batch)
    except (TypeError, ValueError, AttributeError, KeyError, IndexError):
        labels = None
    return texts, labels
