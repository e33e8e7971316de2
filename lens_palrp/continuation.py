"""Explain a continuation token by token: which input made the model write each of its tokens.

Step ``t`` explains the logit of continuation token ``t`` at the position before it, given the
prompt and continuation tokens ``0 .. t-1``. All steps run as batched ``explain`` calls over copies
of one sequence: row ``t`` holds the prompt and the continuation, its attention mask keeps the first
``n_prompt + t`` tokens and pads the rest, and its explained position is its last real token. In a
causal model the masked tail changes nothing, so row ``t`` is the step explained on its own
(``tests/test_continuation.py`` checks it against separate calls, in float64), at the cost of
``ceil(T / batch_size)`` sweeps instead of ``T``.
"""

from __future__ import annotations

import numbers
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from lens_palrp.engine import explain
from lens_palrp.hooks import family_for
from lens_palrp.hooks.base import TextFamily
from lens_palrp.models import explainable
from lens_palrp.result import Attribution
from lens_palrp.safety import evaluating

TokensLike = Union[str, Tensor, np.ndarray, Sequence[int]]


class Continuation(Sequence):
    """One ``Attribution`` per continuation token, in order: ``cont[t]`` explains token ``t``.

    ``cont[t]`` is a batch of one whose first ``n = cont.n_prompt + t`` positions are the prompt
    and continuation tokens ``0 .. t-1`` (``attention_mask`` 1); positions after them, if any, are
    the padded tail of its batch and hold zeros, so ``cont[t].semantic[0, :n]`` is the map.
    ``cont.target(t)`` is ``(id, text)`` of token ``t``; ``cont.tokens`` the prompt and
    continuation ids, ``cont.str_continuation`` the continuation's tokens as text,
    ``cont.target_values`` each step's explained logit, ``cont.generated`` whether the model
    wrote the continuation (greedy decoding).
    """

    def __init__(self, prompt_tokens: Tensor, continuation_tokens: Tensor, str_continuation: List[str],
                 attributions: List[Attribution], generated: bool):
        self.prompt_tokens = prompt_tokens
        self.continuation_tokens = continuation_tokens
        self.str_continuation = str_continuation
        self.attributions = attributions
        self.generated = generated

    @property
    def n_prompt(self) -> int:
        return int(self.prompt_tokens.numel())

    @property
    def tokens(self) -> Tensor:
        """The prompt and continuation ids ``[n_prompt + T]``."""
        return torch.cat([self.prompt_tokens, self.continuation_tokens])

    @property
    def target_values(self) -> Tensor:
        """The explained logit of each step ``[T]``."""
        return torch.cat([a.target_value for a in self.attributions])

    def target(self, step: int) -> Tuple[int, str]:
        """Step ``step``'s target token: its id and its text."""
        return int(self.continuation_tokens[step]), self.str_continuation[step]

    def __len__(self) -> int:
        return len(self.attributions)

    def __getitem__(self, step):
        return self.attributions[step]

    def __iter__(self) -> Iterator[Attribution]:
        return iter(self.attributions)

    def __repr__(self) -> str:
        return (f"Continuation(n_prompt={self.n_prompt}, steps={len(self)}, generated={self.generated}, "
                f"tokens={self.str_continuation!r})")


def explain_continuation(model, prompt: TokensLike, continuation: Optional[TokensLike] = None, *,
                         max_new_tokens: int = 20, method="pa_lrp", batch_size: int = 8,
                         prepend_bos: Optional[bool] = None, tokenizer=None, **explain_options) -> Continuation:
    """Explain every token of a continuation of ``prompt`` (the multi-token target of Inseq).

    Args:
        model: a causal language model ``lp.explain`` takes (a Hugging Face model object too, with
            ``tokenizer=`` where its folder holds none). Encoders are refused: a later token would
            change the explained logit.
        prompt: text (tokenized as ``explain`` does, with the model's BOS unless ``prepend_bos``
            says otherwise) or token ids ``[pos]``.
        continuation: text (tokenized on its own, without BOS: pass ids where the tokenizer
            would merge it with the prompt's end), ids ``[T]``, or None: the model's greedy
            continuation, ``max_new_tokens`` long or up to and including its end-of-sequence token.
        batch_size: steps per sweep (memory grows with it; the maps do not change).
        method, explain_options: as ``explain`` (``record``, ``attention``, ``checkpoint``, ...);
            ``position``, ``attention_mask`` and ``target`` are set per step and refused here.

    Returns a ``Continuation``: ``result[t]`` is the ``Attribution`` of token ``t``.
    """
    for name in ("position", "attention_mask", "target", "tokens"):
        if name in explain_options:
            raise TypeError(f"explain_continuation sets {name} for each step itself; it cannot be passed")
    batch_size = _positive(batch_size, "batch_size")
    model = explainable(model, tokenizer)
    family = family_for(model)
    if not isinstance(family, TextFamily) or not family.causal:
        raise ValueError(
            f"explain_continuation needs a causal language model; {family.describe()} attends in both "
            "directions, so a continuation token would change the logits before it"
        )
    device = next(model.parameters()).device
    prompt_ids = _ids(family, prompt, "prompt", prepend_bos)
    if prompt_ids.numel() == 0:
        raise ValueError("prompt is empty: there is no position to predict the first token from")
    if continuation is None:
        max_new_tokens = _positive(max_new_tokens, "max_new_tokens")
        continuation_ids, generated = _greedy(model, family, prompt_ids, max_new_tokens, device), True
    else:
        continuation_ids, generated = _ids(family, continuation, "continuation", False), False
        if continuation_ids.numel() == 0:
            raise ValueError("continuation is empty: no token to explain")
    sequence = torch.cat([prompt_ids, continuation_ids])
    n_prompt, steps = prompt_ids.numel(), continuation_ids.numel()
    attributions: List[Attribution] = []
    for start in range(0, steps, batch_size):
        stop = min(start + batch_size, steps)
        width = n_prompt + stop - 1  # the longest row of this chunk: its last step's input
        tokens = sequence[:width].repeat(stop - start, 1)
        lengths = torch.arange(n_prompt + start, n_prompt + stop)
        mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        attr = explain(model, tokens.to(device), continuation_ids[start:stop], method=method,
                       attention_mask=mask.to(device), **explain_options)
        attributions.extend(attr[i] for i in range(stop - start))
    str_continuation = [family.to_str_tokens(continuation_ids[t:t + 1])[0] for t in range(steps)]
    return Continuation(prompt_ids, continuation_ids, str_continuation, attributions, generated)


def _positive(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _ids(family, spec: TokensLike, what: str, prepend_bos: Optional[bool]) -> Tensor:
    """Text or ids as a 1-d LongTensor of token ids on the CPU, checked against the vocabulary."""
    if isinstance(spec, str):
        if what == "continuation" and not spec:
            return torch.zeros(0, dtype=torch.long)
        ids = family.to_tokens(spec, prepend_bos).reshape(-1).long().cpu()
    else:
        if isinstance(spec, np.ndarray):
            spec = torch.from_numpy(spec)
        if isinstance(spec, Tensor):
            if spec.dtype.is_floating_point or spec.dtype == torch.bool:
                raise TypeError(f"{what} ids must be integers, got a {spec.dtype} tensor")
            if spec.ndim == 2 and spec.shape[0] == 1:
                spec = spec[0]
            if spec.ndim != 1:
                raise ValueError(f"{what} must be one sequence of ids [pos], got shape {tuple(spec.shape)}")
            ids = spec.long().cpu()
        elif isinstance(spec, (list, tuple)) and all(
                isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in spec):
            ids = torch.tensor(list(spec), dtype=torch.long)
        else:
            raise TypeError(f"{what} must be a string or a sequence of token ids, got {type(spec).__name__}")
    bad = (ids < 0) | (ids >= family.d_vocab_out)
    if bad.any():
        raise ValueError(f"{what} id {int(ids[bad][0])} is out of the vocabulary (0..{family.d_vocab_out - 1})")
    return ids


def _greedy(model, family, prompt_ids: Tensor, max_new_tokens: int, device) -> Tensor:
    """The model's greedy continuation (argmax each step, no cache; stops after its EOS token).
    Run in eval mode, every module's training flag given back afterwards (``safety.evaluating``)."""
    tokenizer = family.tokenizer
    eos = getattr(tokenizer, "eos_token_id", None)
    sequence = prompt_ids.to(device)
    new: List[int] = []
    with evaluating(model), torch.no_grad():
        for _ in range(max_new_tokens):
            if sequence.numel() >= family.n_ctx:
                break
            logits = family.forward(sequence[None], None, ())
            token = int(logits[0, -1].argmax())
            new.append(token)
            sequence = torch.cat([sequence, torch.tensor([token], device=device)])
            if eos is not None and token == eos:
                break
    if not new:
        raise ValueError(f"the prompt fills the model's context ({family.n_ctx} tokens): nothing to generate")
    return torch.tensor(new, dtype=torch.long)
