"""The promise that ``explain`` leaves the user's model as it found it, also under threads.

A sweep changes the model for its duration: parameters are frozen (the embeddings become the
autograd leaves), every module is put in eval mode (dropout off: an explanation is of the
deterministic model), canonizers may switch a config flag (grouped-query attention ungrouped on a
HookedTransformer; they undo it themselves, ``lens_palrp.canonizers``) and hooks are added. ``model_left_unchanged`` takes one call at a time per
model (a second thread waits; a call from inside a running sweep on the same model is refused,
since it would see the first sweep's hooks) and restores every piece of state even when the sweep
or one restore step raises.
"""

from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager

import torch

_LOCKS: "weakref.WeakKeyDictionary[torch.nn.Module, _ModelLock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


class _ModelLock:
    def __init__(self):
        self.lock = threading.Lock()
        self.owner = None  # thread ident of the sweep in progress


@contextmanager
def exclusive(model):
    """One sweep at a time on ``model``: other threads wait, the same thread is refused."""
    with _LOCKS_GUARD:
        entry = _LOCKS.get(model)
        if entry is None:
            entry = _LOCKS[model] = _ModelLock()
    me = threading.get_ident()
    if entry.owner == me:
        raise RuntimeError(
            "explain was called on a model that this thread is already explaining (from a metric, a "
            "hook target or a callback inside the sweep); run the second explanation after the first"
        )
    with entry.lock:
        entry.owner = me
        try:
            yield
        finally:
            entry.owner = None


def check_usable(model) -> None:
    """Refuse up front what autograd cannot sweep, before anything is changed."""
    for kind, tensors in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in tensors:
            if t.is_inference():
                raise RuntimeError(
                    f"the model's {kind} {name!r} was created under torch.inference_mode(), and autograd "
                    "cannot use inference tensors: load or build the model outside inference_mode "
                    "(torch.no_grad() is fine)"
                )


@contextmanager
def evaluating(model):
    """Every module in eval mode (a bridge's Hugging Face model too: dropout off), each module's
    flag put back afterwards, whatever happens."""
    modes = [(m, m.training) for m in all_modules(model)]
    try:
        if isinstance(model, torch.nn.Module):
            model.eval()
        for module, _ in modes:
            module.training = False
        yield
    finally:
        for module, training in modes:
            module.training = training


@contextmanager
def model_left_unchanged(model):
    """Freeze parameters and switch to eval for the sweep; restore ``requires_grad``, ``.grad``
    and every module's training flag afterwards, whatever happens."""
    with exclusive(model):
        check_usable(model)
        params = list(model.parameters())
        requires = [p.requires_grad for p in params]
        grads = [p.grad for p in params]
        try:
            with evaluating(model):
                for p in params:
                    p.requires_grad_(False)
                yield
        finally:
            _restore(params, requires, grads)


def all_modules(model):
    """``model.modules()`` plus a TransformerBridge's Hugging Face model's: the bridge keeps
    ``original_model`` outside its module tree, and GPT-2's embedding dropout lives only there."""
    seen = {}
    for root in (model, getattr(model, "original_model", None)):
        if isinstance(root, torch.nn.Module):
            for module in root.modules():
                seen.setdefault(id(module), module)
    return list(seen.values())


def _restore(params, requires, grads) -> None:
    """Every parameter is restored; the first failure is raised after all of them ran."""
    failure = None
    for p, r, g in zip(params, requires, grads):
        try:
            p.requires_grad_(r)
            p.grad = g
        except Exception as err:  # pragma: no cover - defensive: keep restoring the rest
            failure = failure or err
    if failure is not None:  # pragma: no cover
        raise failure
