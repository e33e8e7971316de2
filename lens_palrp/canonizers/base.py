"""Canonizers: temporary rewrites that put a model into a form the rules can be installed on.

As in Zennit, a canonizer changes how the computation is *expressed*, never what it computes, and
comes with a ``register`` / ``remove`` pair; the engine removes every registered canonizer even
when the sweep raises. A family lists the canonizers its models need (``family.canonizers()``).
A canonizer may switch a model setting (and restore it), change which hook points the sweep uses,
fold records back to the model's own layout, or put an equivalent subgraph into the path.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, List, Sequence, Tuple

import torch


class Canonizer:
    def register(self, family, sweep) -> None:
        """Rewrite; ``sweep`` is the sweep about to run (its role map, captures and transforms)."""
        raise NotImplementedError

    def remove(self) -> None:
        """Undo what ``register`` did to the model."""
        raise NotImplementedError


class ForwardSwap:
    """Modules whose ``forward`` is replaced on the instance (the class is untouched), and put
    back: the module's own instance attribute, if it had one, or none."""

    _NONE = object()

    def __init__(self):
        self._swapped: List[Tuple[torch.nn.Module, object]] = []

    def replace(self, module: torch.nn.Module, forward: Callable) -> None:
        self._swapped.append((module, module.__dict__.get("forward", self._NONE)))
        module.__dict__["forward"] = forward  # not setattr: a bridge component forwards attributes

    def restore(self) -> None:
        for module, previous in reversed(self._swapped):
            if previous is self._NONE:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = previous
        self._swapped = []


@contextmanager
def canonized(canonizers: Sequence[Canonizer], family, sweep) -> Iterator[None]:
    """Register ``canonizers`` in order; remove the registered ones in reverse order on exit,
    every one of them even if one fails (the first failure is raised after all ran)."""
    registered = []
    try:
        for canonizer in canonizers:
            canonizer.register(family, sweep)
            registered.append(canonizer)
        yield
    finally:
        failure = None
        for canonizer in reversed(registered):
            try:
                canonizer.remove()
            except Exception as err:  # pragma: no cover - keep removing the rest
                failure = failure or err
        if failure is not None:  # pragma: no cover
            raise failure
