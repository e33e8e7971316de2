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
    _check_usable(_parameters_and_buffers(all_modules(model))[1])


def _check_usable(named) -> None:
    for kind, name, t in named:
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
    with _evaluating(all_modules(model)):
        yield


@contextmanager
def _evaluating(modules):
    """Only modules in training mode are touched: a model already in eval mode (the usual case)
    costs one pass over the flags, where ``model.eval()`` on a TransformerBridge sends thousands
    of modules through ``nn.Module.__setattr__`` (a quarter of a small model's sweep)."""
    training = [m for m in modules if m.training]
    try:
        for module in training:
            module.training = False
        yield
    finally:
        for module in training:
            module.training = True


@contextmanager
def model_left_unchanged(model):
    """Freeze parameters and switch to eval for the sweep; restore ``requires_grad``, ``.grad``
    and every module's training flag afterwards, whatever happens."""
    with exclusive(model):
        modules = all_modules(model)
        params, named = _parameters_and_buffers(modules)
        _check_usable(named)
        requires = [p.requires_grad for p in params]
        grads = [p.grad for p in params]
        try:
            with _evaluating(modules):
                for p, r in zip(params, requires):
                    if r:
                        p.requires_grad_(False)
                yield
        finally:
            _restore(params, requires, grads)


def _parameters_and_buffers(modules):
    """Each parameter once, and ``(kind, name, tensor)`` of every parameter and buffer, read from
    the modules' own tables: one walk of the module tree per call, not one per question."""
    params, named, seen = [], [], set()
    for module in modules:
        for kind, table in (("parameter", module._parameters), ("buffer", module._buffers)):
            for name, t in table.items():
                if t is None or id(t) in seen:
                    continue
                seen.add(id(t))
                named.append((kind, name, t))
                if kind == "parameter":
                    params.append(t)
    return params, named


def all_modules(model):
    """``model.modules()`` plus a TransformerBridge's Hugging Face model's: the bridge keeps
    ``original_model`` outside its module tree, and GPT-2's embedding dropout lives only there.
    A plain walk over ``_modules``: ``named_modules`` builds a name string per visit, which on a
    bridge (each Hugging Face module reached twice) cost ~10 ms per call."""
    roots = [root for root in (model, getattr(model, "original_model", None)) if isinstance(root, torch.nn.Module)]
    seen: dict = {}
    stack = list(reversed(roots))
    while stack:
        module = stack.pop()
        if id(module) in seen:
            continue
        seen[id(module)] = module
        stack.extend(child for child in reversed(module._modules.values()) if child is not None)
    return list(seen.values())


def _restore(params, requires, grads) -> None:
    """Every parameter is restored; the first failure is raised after all of them ran."""
    failure = None
    for p, r, g in zip(params, requires, grads):
        try:
            if p.requires_grad != r:
                p.requires_grad_(r)
            if p.grad is not g:
                p.grad = g
        except Exception as err:  # pragma: no cover - defensive: keep restoring the rest
            failure = failure or err
    if failure is not None:  # pragma: no cover
        raise failure
