"""``Records``: the relevances (``attr.hooks``) and gradients (``attr.gradients``) recorded at hook
points, keyed by hook name.

A ``Records`` is a ``dict`` (``==``, ``keys()``, ``items()``, ``len`` and iteration are a dict's),
that also takes TransformerLens' shorthand, as its ``ActivationCache`` does:

- the full hook name, as recorded: ``attr.hooks["blocks.0.attn.hook_pattern"]``;
- a short name that ``get_act_name`` expands without a layer: ``attr.hooks["embed"]`` is
  ``"hook_embed"``;
- ``(name, layer)`` or ``(name, layer, layer_type)``, expanded by ``get_act_name``:
  ``attr.hooks["pattern", 0]``, ``attr.hooks["scale", 1, "ln2"]``; a negative layer counts from
  the model's last layer (``attr.hooks["rot_k", -1]``).

A missing key raises a ``KeyError`` that names the hook it resolved to and what was recorded.
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional, Tuple, Union

import torch
from torch import Tensor

from transformer_lens.utilities import get_act_name  # 3.9 and 4.x (3.x's ``utils`` spelling warns)

Key = Union[str, Tuple]


class Records(Dict[str, Tensor]):
    """Recorded tensors ``[batch, ...]`` by hook name; see the module docstring for the keys.

    ``n_layers`` (the model's, which an ``Attribution`` knows from ``positional``) resolves
    negative layers; ``what`` (``"relevance"`` or ``"gradient"``) words the ``KeyError``.
    """

    def __init__(self, items: Union[Dict[str, Tensor], Iterable, None] = None, *,
                 n_layers: Optional[int] = None, what: str = "relevance"):
        super().__init__(items or {})
        self.n_layers = n_layers
        self.what = what

    # ------------------------------------------------------------------ keys
    def resolve(self, key: Key) -> str:
        """The hook name ``key`` stands for (whether or not it was recorded)."""
        if isinstance(key, str):
            if dict.__contains__(self, key):
                return key
            try:
                return get_act_name(key)
            except Exception:  # get_act_name asserts on names it does not know
                return key
        if not isinstance(key, tuple) or not 1 <= len(key) <= 3 or not isinstance(key[0], str):
            raise TypeError(
                f"a {self.what} record key is a hook name or a tuple (name, layer[, layer_type]), got {key!r}"
            )
        name, layer, layer_type = (tuple(key) + (None, None))[:3]
        if layer is not None:
            if isinstance(layer, bool) or not isinstance(layer, int):
                if isinstance(layer, Tensor) and layer.numel() == 1 and not layer.dtype.is_floating_point:
                    layer = int(layer)
                else:
                    raise TypeError(f"the layer of key {key!r} must be an int, got {type(layer).__name__}")
            if layer < 0:
                if self.n_layers is None:
                    raise KeyError(f"{key!r}: a negative layer needs the model's number of layers, "
                                   "which these records do not know")
                if layer < -self.n_layers:
                    raise KeyError(f"{key!r}: layer {layer} is out of range for a model of "
                                   f"{self.n_layers} layers")
                layer += self.n_layers
        try:
            return get_act_name(name, layer, layer_type)
        except Exception as err:  # e.g. an unknown layer_type
            raise KeyError(f"{key!r} is not a TransformerLens hook name ({err})") from None

    def __getitem__(self, key: Key) -> Tensor:
        if isinstance(key, str) and dict.__contains__(self, key):
            return dict.__getitem__(self, key)
        name = self.resolve(key)
        if dict.__contains__(self, name):
            return dict.__getitem__(self, name)
        shown = repr(key) if name == key else f"{key!r} (hook {name!r})"
        recorded = ", ".join(repr(k) for k in self) or "nothing"
        option = "record" if self.what == "relevance" else "record_gradients"
        raise KeyError(f"no {self.what} recorded at {shown}; recorded: {recorded}. "
                       f"Name the hook in explain({option}=[...]) to record it")

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str) and dict.__contains__(self, key):
            return True
        if not isinstance(key, (str, tuple)):
            return False
        try:
            return dict.__contains__(self, self.resolve(key))
        except (KeyError, TypeError):
            return False

    def get(self, key: Key, default=None):
        return self[key] if key in self else default

    # ------------------------------------------------------------------ copies
    def _like(self, items: Dict[str, Tensor]) -> "Records":
        return type(self)(items, n_layers=self.n_layers, what=self.what)

    def copy(self) -> "Records":
        return self._like(dict(self))

    def to(self, device) -> "Records":
        """A copy with every tensor moved to ``device``."""
        return self._like({k: v.to(device) for k, v in self.items()})

    def select(self, index) -> "Records":
        """A copy with every tensor indexed along its batch dimension by ``index`` (a slice)."""
        return self._like({k: v[index] for k, v in self.items()})

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k!r}: {list(v.shape) if isinstance(v, torch.Tensor) else v!r}"
                           for k, v in self.items())
        return f"Records({self.what}: {{{shapes}}})"
