"""What to explain: a logit, a logit difference, a metric on the logits, or an internal scalar."""

from __future__ import annotations

import inspect
import numbers
import warnings
from dataclasses import dataclass
from typing import Callable, Union

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class HookTarget:
    """Explain ``fn(activation) -> [batch]`` computed at hook point ``hook_name``.

    The forward stops there, and relevance flows down from that point. For the relevance to be
    conserved, ``fn`` should be linear in the activation (a neuron, a direction, a head's output
    along a direction).
    """

    hook_name: str
    fn: Callable[[Tensor], Tensor]


def at_hook(hook_name: str, fn: Callable[[Tensor], Tensor]) -> HookTarget:
    """Target a scalar per example computed from the activation at ``hook_name``.

    ``fn(activation)`` or ``fn(activation, positions)`` (each example's explained position in the
    right-aligned batch, for padded batches):

    >>> lp.explain(model, tokens, lp.at_hook("blocks.1.mlp.hook_post", lambda a: a[:, -1, 42]))
    """
    if not isinstance(hook_name, str):
        raise TypeError("at_hook needs the hook point's name as a string")
    if not callable(fn):
        raise TypeError("at_hook needs a callable fn(activation) -> [batch]")
    return HookTarget(hook_name, fn)


TargetSpec = Union[int, str, Tensor, tuple, list, Callable[[Tensor], Tensor], HookTarget]


class LogitTarget:
    """``logits[b, position_b, correct_b] - logits[b, position_b, wrong_b]`` (wrong optional)."""

    def __init__(self, correct: Tensor, wrong, positions: Tensor):
        self.correct = correct
        self.wrong = wrong
        self.positions = positions

    def at_first_position(self) -> "LogitTarget":
        """The same target on logits that hold each example's explained position only
        (``canonizers.LogitsAtPositions``)."""
        return LogitTarget(self.correct, self.wrong, torch.zeros_like(self.positions))

    def __call__(self, logits: Tensor) -> Tensor:
        rows = torch.arange(logits.shape[0], device=logits.device)
        # classifiers (ViT) give [batch, classes]: no position to pick
        at_pos = logits if logits.ndim == 2 else logits[rows, self.positions.to(logits.device)]
        value = at_pos[rows, self.correct.to(logits.device)]
        if self.wrong is not None:
            value = value - at_pos[rows, self.wrong.to(logits.device)]
        return value


def _tokenization(family, text: str) -> str:
    """How the model's tokenizer splits ``text`` (for the error of a multi-token target), or ''."""
    tokenizer = getattr(family, "tokenizer", None)
    try:
        pieces = tokenizer.tokenize(text)
    except Exception:  # no tokenizer (ids only), or one without tokenize()
        return ""
    return f" (it tokenizes as {pieces!r})"


def _per_example_ids(specs, batch: int, family, what: str) -> Tensor:
    """One id per example from a list (ints, numpy integers or single-token strings)."""
    if len(specs) != batch:
        raise ValueError(f"{what} has {len(specs)} entries for a batch of {batch} prompts (one per prompt)")
    ids = []
    for i, spec in enumerate(specs):
        if isinstance(spec, (list, tuple, Tensor, np.ndarray)) and not isinstance(spec, str):
            raise TypeError(f"{what} for prompt {i}: got {given(spec)}; it must be a token id or a "
                            "single-token string")
        ids.append(int(_as_ids(spec, 1, family, f"{what} for prompt {i}")[0]))
    return torch.tensor(ids, dtype=torch.long)


def _as_ids(spec, batch: int, family, what: str) -> Tensor:
    if isinstance(spec, list):
        return _per_example_ids(spec, batch, family, what)
    if isinstance(spec, str):
        text = spec
        try:
            spec = family.to_single_token(text)
        except Exception as err:  # the tokenizer says why (several tokens, no tokenizer, ...)
            raise ValueError(f"{what} {text!r} is not a single token of this model{_tokenization(family, text)}: "
                             f"{err}") from None
        tokenizer = family.tokenizer
        unk = getattr(tokenizer, "unk_token_id", None)
        if unk is not None and spec == unk and text.strip() != str(tokenizer.unk_token):
            raise ValueError(f"{what} {text!r} is not in the vocabulary (it maps to the unknown token)")
    if isinstance(spec, bool):
        raise TypeError(f"{what}: got {given(spec)}; a bool is not a token id")
    if isinstance(spec, np.ndarray):
        spec = torch.from_numpy(spec)
    if isinstance(spec, numbers.Integral):  # int, numpy integers
        ids = torch.full((batch,), int(spec), dtype=torch.long)
    elif isinstance(spec, Tensor):
        if spec.dtype.is_floating_point or spec.dtype == torch.bool:
            raise TypeError(f"{what}: got a {spec.dtype} tensor; ids must be an integer tensor")
        ids = spec.reshape(-1).long().cpu()
        if ids.numel() == 1:
            ids = ids.expand(batch).clone()
        if ids.numel() != batch:
            raise ValueError(f"{what} has {ids.numel()} ids for a batch of {batch}")
    else:
        raise TypeError(
            f"{what}: got {given(spec)}; it must be an int, a single-token string, a list with one per prompt "
            "or a [batch] tensor of ids"
        )
    vocab = family.d_vocab_out
    bad = (ids < 0) | (ids >= vocab)
    if bad.any():
        raise ValueError(
            f"{what} id {int(ids[bad][0])} is out of the vocabulary (0..{vocab - 1})"
        )
    return ids


def takes_positions(fn: Callable) -> bool:
    """Whether ``fn`` accepts a second positional argument (the explained positions)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # builtins without a signature: call with one argument
        return False
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2


def with_positions(fn: Callable, positions: Tensor) -> Callable[[Tensor], Tensor]:
    """``fn`` as a one-argument callable, handing it ``positions`` if it takes them."""
    if not takes_positions(fn):
        return fn
    return lambda x: fn(x, positions.to(x.device))


def _pairs_per_example(pairs: list) -> tuple:
    """``[(correct_0, wrong_0), (correct_1, wrong_1), ...]`` as the pair of lists ``(corrects, wrongs)``."""
    for i, pair in enumerate(pairs):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"target for prompt {i}: a list of logit-difference targets holds one pair "
                             f"(correct, wrong) per prompt, got {pair!r}")
    return [p[0] for p in pairs], [p[1] for p in pairs]


def resolve_target(target: TargetSpec, batch: int, positions: Tensor, family, padded: bool = False):
    """Turn the user's ``target`` into ``(callable on logits or None, HookTarget or None)``.

    Callables that take a second argument get each example's explained position; a one-argument
    metric on a padded batch is warned about, since ``logits[:, -1]`` is a pad in shorter rows.
    """
    if isinstance(target, HookTarget):
        if not family.has_hook(target.hook_name):
            raise ValueError(f"at_hook: the model has no hook point named {target.hook_name!r}")
        return None, HookTarget(target.hook_name, with_positions(target.fn, positions))
    if isinstance(target, list) and any(isinstance(t, (tuple, list)) for t in target):
        target = _pairs_per_example(target)
    if isinstance(target, tuple):
        if len(target) != 2:
            raise ValueError(f"target: got a tuple of {len(target)} ({given(target)}); a logit-difference "
                             "target is a pair (correct_id, wrong_id)")
        correct = _as_ids(target[0], batch, family, "correct target")
        wrong = _as_ids(target[1], batch, family, "wrong target")
        return LogitTarget(correct, wrong, positions), None
    if isinstance(target, (numbers.Integral, str, Tensor, np.ndarray, list)):
        return LogitTarget(_as_ids(target, batch, family, "target"), None, positions), None
    if callable(target):
        if padded and not takes_positions(target):
            warnings.warn(
                "the batch is padded and the metric takes only the logits: shorter rows end in pads "
                "(logits[:, -1] reads a pad). Write it as metric(logits, positions), positions being "
                "each example's explained position.",
                UserWarning,
                stacklevel=4,
            )
        return with_positions(target, positions), None
    raise TypeError(
        f"target: got {given(target)}; a target is a token id, a [batch] tensor of ids, one id or string per "
        "prompt (a list), a pair (correct, wrong) or one pair per prompt, a callable metric(logits) -> [batch], "
        "or lp.at_hook(...)"
    )


def given(value) -> str:
    """What the caller passed, type and value, for the first words of an error message."""
    if value is None:
        return "None"
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{type(value).__name__} {text}"
