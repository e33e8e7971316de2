"""What the user passes, checked and brought into the one layout the sweep and the results use.

Every batch is explained *right-aligned*: example ``i``'s real tokens sit at positions
``0 .. n_i - 1`` and its pads (if any) after them, whatever side the input was padded on. A causal
model never lets a real token see a pad to its right, and every model masks pads out of the keys,
so a right-aligned row computes exactly what the same tokens compute alone; results of a padded
batch therefore equal single runs, and every analysis can read example ``i`` as ``[i, :n_i]``.

Padding is taken from, in this order: an explicit ``attention_mask`` (either side, 0/1 values,
one contiguous block of ones per row); our own tokenization of a list of strings; or, for a
LongTensor without a mask, runs of the tokenizer's pad id at the start or end of rows, as
``model.to_tokens([...])`` leaves them. Where the pad id is also the BOS id such runs cannot be
told from real tokens, so a batch that looks padded is refused with a request for the mask.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Union

import numpy as np
import torch
from torch import Tensor

MASK_HINT = "pass attention_mask (1 for real tokens, 0 for pads), e.g. from the tokenizer's output"


@dataclass
class TokenBatch:
    """A checked, right-aligned batch: tokens ``[batch, pos]``, the mask (None if unpadded),
    the real length of each row and the string of each real token."""

    tokens: Tensor
    attention_mask: Optional[Tensor]
    lengths: Tensor
    str_tokens: List[List[str]]

    @property
    def padded(self) -> bool:
        return self.attention_mask is not None


# ------------------------------------------------------------------------------------ tokens
def prepare_tokens(family, tokens, attention_mask, prepend_bos: Optional[bool], device) -> TokenBatch:
    """Check ``tokens`` (strings or ids) and ``attention_mask``; return the right-aligned batch."""
    if prepend_bos is not None and not isinstance(prepend_bos, (bool, np.bool_)):
        raise TypeError(f"prepend_bos must be True, False or None, got {type(prepend_bos).__name__} {prepend_bos!r}")
    if isinstance(tokens, np.ndarray):
        tokens = torch.from_numpy(tokens)
    if isinstance(tokens, str):
        tokens = [tokens]
    if isinstance(tokens, (list, tuple)):
        if attention_mask is not None:
            raise ValueError("attention_mask applies to token ids; string prompts are padded by lens_palrp")
        tokens, attention_mask = _tokenize(family, tokens, prepend_bos)
    if not isinstance(tokens, Tensor):
        raise TypeError(f"tokens must be a string, a list of strings or a LongTensor, got {type(tokens).__name__}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise TypeError(f"tokens must be integer token ids, got dtype {tokens.dtype}")
    if tokens.is_inference():  # made under torch.inference_mode(): autograd cannot use it
        tokens = tokens.clone()
    tokens = tokens.long()
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, pos], got shape {tuple(tokens.shape)}")
    if tokens.numel() == 0:
        raise ValueError(f"empty input: tokens have shape {tuple(tokens.shape)}")
    if tokens.shape[1] > family.n_ctx:
        raise ValueError(f"sequence too long: {tokens.shape[1]} tokens, the model's n_ctx is {family.n_ctx}")
    _check_vocabulary(tokens, family.d_vocab)
    if attention_mask is None:
        mask = infer_padding(tokens, family.tokenizer)
    else:
        mask = check_mask(attention_mask, tokens.shape)
    if mask is not None:
        tokens = right_align(tokens, mask)
        mask = right_align(mask, mask)
    lengths = mask.sum(-1) if mask is not None else torch.full((tokens.shape[0],), tokens.shape[1])
    if mask is not None and bool(mask.all()):
        mask = None
    str_tokens = [list(family.to_str_tokens(row[: int(n)])) for row, n in zip(tokens, lengths)]
    tokens = tokens.to(device)
    if mask is not None:
        mask = mask.to(device)
    return TokenBatch(tokens, mask, lengths.cpu(), str_tokens)


def _tokenize(family, prompts, prepend_bos):
    """Each prompt tokenized alone (never truncated), then right-aligned with a mask."""
    if len(prompts) == 0:
        raise ValueError("empty input: no prompts given")
    if not all(isinstance(t, str) for t in prompts):
        raise TypeError("a list input must hold strings (or pass a LongTensor of token ids)")
    if family.tokenizer is None:
        raise ValueError("the model has no tokenizer: pass token ids as a LongTensor")
    rows = [family.to_tokens(t, prepend_bos).reshape(-1).cpu() for t in prompts]
    for i, r in enumerate(rows):
        if r.numel() == 0:
            raise ValueError(f"empty input: prompt {i} tokenizes to no tokens")
        if r.numel() > family.n_ctx:
            raise ValueError(
                f"sequence too long: prompt {i} is {r.numel()} tokens, the model's n_ctx is {family.n_ctx} "
                "(lens_palrp never truncates: shorten the prompt)"
            )
    lengths = torch.tensor([r.numel() for r in rows])
    n_pos = int(lengths.max())
    pad = getattr(family.tokenizer, "pad_token_id", None)
    out = torch.full((len(rows), n_pos), pad if pad is not None else 0, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : r.numel()] = r
    return out, (torch.arange(n_pos)[None, :] < lengths[:, None]).long()


def _check_vocabulary(tokens: Tensor, d_vocab: Optional[int]) -> None:
    bad = tokens < 0
    if d_vocab is not None:
        bad = bad | (tokens >= d_vocab)
    if bool(bad.any()):
        b, p = (int(v) for v in bad.nonzero()[0])
        limit = f"0..{d_vocab - 1}" if d_vocab is not None else ">= 0"
        raise ValueError(f"token id {int(tokens[b, p])} at example {b}, position {p} is outside the vocabulary ({limit})")


def check_mask(attention_mask, shape) -> Tensor:
    """A 0/1 mask of ``shape`` with one contiguous block of ones per row, as a LongTensor."""
    if isinstance(attention_mask, np.ndarray):
        attention_mask = torch.from_numpy(attention_mask)
    if not isinstance(attention_mask, Tensor):
        raise TypeError(f"attention_mask must be a tensor [batch, pos], got {type(attention_mask).__name__}")
    mask = attention_mask.detach().cpu()
    if mask.ndim == 1 and len(shape) == 2 and shape[0] == 1:
        mask = mask[None]
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"attention_mask shape {tuple(mask.shape)} != tokens shape {tuple(shape)}")
    if mask.dtype.is_complex or not bool(((mask == 0) | (mask == 1)).all()):
        bad = mask[(mask != 0) & (mask != 1)][0] if not mask.dtype.is_complex else "complex"
        raise ValueError(f"attention_mask must hold only 0 (pad) and 1 (real token), found {bad}")
    mask = mask.long()
    for i, row in enumerate(mask):
        ones = row.nonzero().flatten()
        if ones.numel() == 0:
            raise ValueError(f"attention_mask row {i} is all padding: example {i} has no token to explain")
        if int(ones[-1] - ones[0]) + 1 != ones.numel():
            raise ValueError(
                f"attention_mask row {i} has a gap: pads between real tokens are not padding "
                "(pad on the left or on the right)"
            )
    return mask


def infer_padding(tokens: Tensor, tokenizer) -> Optional[Tensor]:
    """The mask of a batch padded with the tokenizer's pad id, or None.

    A batch looks padded when its rows start or end with runs of the pad id of different lengths
    (as ``to_tokens`` pads a list of prompts); runs that every row shares are real tokens (a single
    prompt that ends in the end-of-text id, say). Refuses what it cannot decide: a padded-looking
    batch whose pad id is also the BOS id.
    """
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    if pad is None:
        return None
    is_pad = (tokens == pad).cpu()
    n = tokens.shape[1]
    lead = torch.where(is_pad.all(-1), n, (~is_pad).long().argmax(-1))
    trail = torch.where(is_pad.all(-1), n, (~is_pad).long().flip(-1).argmax(-1))
    if not (bool((lead != lead[0]).any()) or bool((trail != trail[0]).any())):
        return None  # every row alike: a pad id at the ends of all rows is taken as a real token
    if pad == getattr(tokenizer, "bos_token_id", None):
        raise ValueError(
            f"the rows start or end with runs of token {pad} of different lengths; that id is both this "
            f"tokenizer's pad and BOS id, so pads cannot be told from real tokens: {MASK_HINT}"
        )
    if bool(is_pad.all(-1).any()):
        i = int(is_pad.all(-1).nonzero()[0])
        raise ValueError(f"example {i} is all padding (pad id {pad}): it has no token to explain")
    positions = torch.arange(n)[None, :]
    return ((positions >= lead[:, None]) & (positions < n - trail[:, None])).long()


def right_align(values: Tensor, mask: Tensor) -> Tensor:
    """Rotate each row along dim 1 so that its first real position (per ``mask``) comes first."""
    start = mask.long().argmax(-1).to(values.device)
    if not bool(start.any()):
        return values
    n = values.shape[1]
    index = (torch.arange(n, device=values.device)[None, :] + start[:, None]) % n
    index = index.reshape(index.shape + (1,) * (values.ndim - 2)).expand_as(values)
    return values.gather(1, index)


# ------------------------------------------------------------------------------------ positions
def _as_index_tensor(value, what: str) -> Optional[Tensor]:
    """An integer tensor from an int, a numpy integer or array, or a tensor; None otherwise."""
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an integer, got a bool")
    if isinstance(value, numbers.Integral):
        return torch.tensor([int(value)])
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if isinstance(value, Tensor):
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"{what} must hold integers, got dtype {value.dtype}")
        return value.detach().reshape(-1).long().cpu()
    return None


def resolve_positions(position, lengths: Tensor) -> Tensor:
    """Per-example target positions, counted within each example's real (unpadded) tokens."""
    batch = lengths.shape[0]
    pos = _as_index_tensor(position, "position")
    if pos is None:
        raise TypeError(f"position must be an int or a [batch] tensor of ints, got {type(position).__name__}")
    if pos.numel() == 1:
        pos = pos.expand(batch).clone()
    if pos.numel() != batch:
        raise ValueError(f"position has {pos.numel()} entries for a batch of {batch}")
    resolved = torch.where(pos < 0, lengths + pos, pos)
    bad = (resolved < 0) | (resolved >= lengths)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"position {int(pos[i])} is out of range for example {i} with {int(lengths[i])} tokens")
    return resolved


# ------------------------------------------------------------------------------------ hook names
HookNames = Union[None, str, Iterable[str], Callable[[str], bool]]


def resolve_hook_names(spec: HookNames, family, what: str) -> List[str]:
    """Hook names from a name, a list of names or a ``names_filter``-style callable."""
    if spec is None:
        return []
    if isinstance(spec, str):
        names = [spec]
    elif isinstance(spec, (bytes, bytearray)):
        raise TypeError(f"{what}: hook names are strings, got bytes {spec!r}")
    elif callable(spec):
        names = [n for n in family.hook_names() if spec(n)]
    else:
        try:
            names = list(spec)
        except TypeError:
            raise TypeError(
                f"{what} must be a hook name, a list of hook names or a filter callable(name) -> bool, "
                f"got {type(spec).__name__}"
            ) from None
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"{what}: hook names are strings, got {type(name).__name__} {name!r}")
        if not family.has_hook(name):
            raise ValueError(f"{what}: the model has no hook point named {name!r}")
    return list(dict.fromkeys(names))
