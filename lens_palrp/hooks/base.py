"""The contract between the engine and a model family: what a family must provide.

A family adapts one kind of model (``HookedTransformer``, ``TransformerBridge``, ``HookedViT``,
...) to the sweep. It names which hook point plays which role (``hook_roles``), runs the hooked
forward, tokenizes, and states the model facts the rules and the positional strategies read. New
families subclass ``ModelFamily``; the annotated facts below must be set by ``__init__`` (checked
when the family is built, see ``check_contract``), the abstract methods implemented. Capabilities
only some encodings need are the small protocols at the end; a family provides them where its
models have that encoding, and nowhere else.
"""

from __future__ import annotations

import abc
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple, runtime_checkable

from torch import Tensor

from lens_palrp.roles import HookRole, Role


@dataclass
class PreparedInput:
    """The checked input of one ``explain`` call in the layout of the results."""

    inputs: Tensor  # what the model's forward takes (token ids, or images)
    tokens: Tensor  # [batch, pos] ids (position ids for images)
    attention_mask: Optional[Tensor]  # [batch, pos] 1 real / 0 pad, None if unpadded
    str_tokens: List[List[str]]
    positions: Tensor  # [batch] the explained position of each example


class ModelFamily(abc.ABC):
    """What the engine and the analyses use of a model. Facts are plain attributes."""

    name: ClassVar[str]
    model: Any
    cfg: Any
    n_layers: int
    n_heads: int
    d_head: int
    n_ctx: int
    d_vocab: int  # token ids the embedding accepts
    d_vocab_out: int  # logits per position
    pe_type: str  # the positional encoding's registry name (lens_palrp.positional)
    rotary_dim: Optional[int]  # rotated channels per head (RoPE), else None
    rotary_adjacent_pairs: bool
    n_kv_heads: Optional[int]  # kv heads under grouped-query attention, else None
    attn_softcap: Optional[float]
    causal: bool
    logits_supported: bool  # False where the output head's activation has no hook (BERT's MLM head)
    score_roles: Tuple[Role, Role]  # the roles whose product, over attn_scale, gives the scores

    # an architecture nobody verified, explained on the caller's request: the engine then checks
    # that every hook point the rules patch is in the computation path before any map
    unverified: bool = False

    # keyword options of ``explain`` that only this family takes (e.g. a ViT's patch rule)
    options: ClassVar[Tuple[str, ...]] = ()

    # --------------------------------------------------------------- the contract, checked
    def check_contract(self) -> None:
        """Raise ``TypeError`` naming every annotated fact ``__init__`` left unset."""
        missing = [name for name in ModelFamily.__annotations__ if not hasattr(self, name)]
        if missing:
            raise TypeError(f"{type(self).__name__} does not set the family facts {missing}")

    def describe(self) -> str:
        """The model as errors name it."""
        return self.name

    # --------------------------------------------------------------- hooks and forward
    @abc.abstractmethod
    def hook_roles(self) -> Dict[str, HookRole]:
        """Every hook point the sweep installs a rule or a record at, with its role."""

    def hook_points(self) -> Mapping[str, Any]:
        """Hook name -> hook point object (aliases of one point map to the same object), read from
        the model once per family: a TransformerBridge rebuilds its alias table on every access."""
        points = self.__dict__.get("_hook_points")
        if points is None:
            points = self.__dict__["_hook_points"] = self.model.hook_dict
        return points

    def hook_names(self) -> List[str]:
        """Hook points a user's ``record`` filter may pick."""
        return list(self.hook_points())

    def has_hook(self, name: str) -> bool:
        return name in self.hook_points()

    @contextmanager
    def hooks_attached(self, fwd_hooks: Sequence[Tuple[str, Callable]]):
        """``fwd_hooks`` ``[(name, fn)]`` added to the hook point objects themselves and exactly
        those handles removed afterwards, whatever happens (hooks the user attached stay). No
        name goes through the model's ``hooks()``, which on a TransformerBridge resolves every
        name through its alias table and gating checks."""
        points = self.hook_points()
        added = []
        try:
            for name, fn in fwd_hooks:
                point = points[name]
                point.add_hook(fn, dir="fwd")  # TransformerLens 3.x returns no handle: take it back
                added.append((point, point.fwd_hooks[-1]))
            yield
        finally:
            for point, handle in reversed(added):
                handle.hook.remove()
                point.fwd_hooks[:] = [h for h in point.fwd_hooks if h is not handle]

    @property
    @abc.abstractmethod
    def final_hidden_hook(self) -> str:
        """The hook holding the last block's output (what a sentence encoder pools)."""

    @abc.abstractmethod
    def forward(self, inputs: Tensor, attention_mask: Optional[Tensor], fwd_hooks) -> Tensor:
        """One forward with ``fwd_hooks`` ``[(name, fn)]`` attached and removed again."""

    def unembed_module(self) -> Optional[Any]:
        """The module mapping the final residual ``[batch, pos, d_model]`` to the logits (each
        position alone), for unembedding the explained positions only; None: no such module."""
        return getattr(self.model, "unembed", None)

    def block_module(self, layer: int) -> Any:
        """Block ``layer`` as a module whose forward can be recomputed (``checkpoint=True``)."""
        return self.model.blocks[layer]

    def record_positions(self, layer: Optional[int]) -> slice:
        """The result positions that layer ``layer``'s per-position records fill (``None``: the final
        residual): all of them, except where a model lays two stacks side by side (T5's encoder
        and decoder positions)."""
        return slice(None)

    def canonizers(self) -> Sequence[Any]:
        """The rewrites (``lens_palrp.canonizers``) this model needs for the rules; none by default."""
        return ()

    # --------------------------------------------------------------- inputs and outputs
    @property
    @abc.abstractmethod
    def tokenizer(self):
        """The model's tokenizer, or None (ids only; images)."""

    @abc.abstractmethod
    def to_single_token(self, text: str) -> int:
        """The output index a target string names (a token, a class label)."""

    @abc.abstractmethod
    def prepare(self, inputs, attention_mask, prepend_bos, position, device) -> PreparedInput:
        """The user's input checked and brought into the results' layout."""

    def resolve_options(self, options: Mapping[str, Any]) -> Dict[str, Any]:
        """This family's ``explain`` options, checked, with defaults filled in."""
        return dict(options)

    def finish(self, attr, prepared: PreparedInput, sink_relevance: Dict[Role, Tensor], options: Dict[str, Any]):
        """What the family adds to the ``Attribution`` after the sweep; plain families add nothing."""
        return attr

    # --------------------------------------------------------------- facts the rules read
    @abc.abstractmethod
    def attn_scale(self, layer: int) -> float:
        """What the scores ``q k^T`` are divided by."""

    @abc.abstractmethod
    def activation(self, layer: int) -> Callable[[Tensor], Tensor]:
        """The MLP activation (the gate's, for gated MLPs)."""

    def attention_sinks(self, layer: int) -> Optional[Tensor]:
        """Learned per-head sink logits ``[heads]`` that join the softmax (GPT-OSS); None: none."""
        return None


class TextFamily(ModelFamily):
    """A family whose input is text: strings or token ids, padded on either side."""

    @abc.abstractmethod
    def to_tokens(self, text: str, prepend_bos: Optional[bool]) -> Tensor:
        """One prompt's ids ``[pos]``, never truncated."""

    @abc.abstractmethod
    def to_str_tokens(self, tokens: Tensor) -> List[str]: ...

    def prepare(self, inputs, attention_mask, prepend_bos, position, device) -> PreparedInput:
        """Right-aligned token batch (``lens_palrp.inputs``) and each example's explained position."""
        from lens_palrp.inputs import prepare_tokens, resolve_positions

        batch = prepare_tokens(self, inputs, attention_mask, prepend_bos, device)
        return PreparedInput(batch.tokens, batch.tokens, batch.attention_mask, batch.str_tokens,
                             resolve_positions(position, batch.lengths))


# ------------------------------------------------------------------- per-encoding capabilities
@runtime_checkable
class RotaryTables(Protocol):
    """RoPE models whose cos/sin tables are not observed at a hook: compute them."""

    def rotary_tables(self, layer: int, n_pos: int, attention_mask: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """cos and sin ``[batch or 1, pos, 1, rotary_dim]`` exactly as the forward used them."""


@runtime_checkable
class AlibiBias(Protocol):
    def alibi_bias(self, layer: int, n_pos: int) -> Tensor:
        """The canonical bias ``m_h (j - i)`` ``[heads, query, key]``."""


@runtime_checkable
class ShortformerProjections(Protocol):
    def shortformer_projections(self, layer: int) -> Tuple[Tensor, Tensor]:
        """``W_Q`` and ``W_K`` ``[heads, d_model, d_head]``."""
