"""Edge attribution patching (Syed et al. 2023) with plain or LRP-modified gradients.

For every sender -> receiver pair of the computational graph the effect of patching the
sender's clean output into *that receiver's input only* is estimated to first order as

    score(s -> r) = (s_clean - s_corrupted) . d metric / d (input of r)   on the corrupted run,

the gradient taken through ``r`` alone, plain (``"grad"``) or as an LRP method's rules modify it
(``"pa_lrp"``, ``"attn_lrp"``, ``"relp"``, ... any registered method: the rules are the ones
``lp.explain`` installs). Senders: the token embedding, a learned position embedding, each head's
output into the residual stream (``z_h @ W_O^h``) and each MLP's output. Receivers: each head's
query, key and value inputs, each MLP's input and the logits (the final residual stream).

How the per-receiver gradient is read: TransformerLens' ``use_split_qkv_input`` /
``use_attn_result`` / ``use_hook_mlp_in`` give every head's q, k and v its own copy of the residual
stream (``blocks.{l}.hook_q_input[:, :, h]``), so the gradient recorded there during ``explain``'s
sweep is the gradient through that receiver only, with the method's rules in place. The flags are
set for the call and always put back. Since the residual stream is a sum, a sender's gradient is
the sum of its downstream receivers' gradients, so its edge scores sum to its node score
``(clean - corrupted) . g_sender`` (tested to float64 precision for every method).

Under a method with positional sinks (PA-LRP) on a RoPE or ALiBi model, the relevance each head
sends into its positional encoding is reported as an edge ``"pos" -> head`` of ``kind
"positional"``: the sink relevance of that head on the corrupted run, summed over positions. It
is *not* a patching estimate: positions are the same in both runs, there is nothing to patch.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import plotly.graph_objects as go
import torch
from torch import Tensor

from lens_palrp.analyses.common import in_eval_mode, takes_hf_models
from lens_palrp.analyses.patching import _as_batch_metric as as_batch_metric
from lens_palrp.analyses.patching import _pairs as patching_pairs
from lens_palrp.engine import explain
from lens_palrp.hooks import family_for
from lens_palrp.inputs import infer_padding
from lens_palrp.methods import get_method
from lens_palrp.roles import Role
from lens_palrp.targets import HookTarget, takes_positions

PATCHING, POSITIONAL = "patching", "positional"
_SPLIT_FLAGS = ("use_split_qkv_input", "use_attn_result", "use_hook_mlp_in")


@dataclass(frozen=True)
class Edge:
    """One sender -> receiver edge. ``receiver_input`` is ``q``, ``k``, ``v``, ``mlp``, ``logits``
    or, for a positional edge (``kind="positional"``), ``pos``. Layers: the inputs are layer -1,
    the logits layer ``n_layers``."""

    sender: str
    receiver: str
    sender_layer: int
    receiver_layer: int
    receiver_input: str
    kind: str = PATCHING


@dataclass(frozen=True)
class _Node:
    name: str
    layer: int
    order: Tuple[int, int]  # (layer, 0 attention / 1 MLP): a sender feeds receivers ordered after it
    hook: str
    head: Optional[int] = None  # index along the hook's head dimension
    kind: str = ""  # receivers: q / k / v / mlp / logits


# ---------------------------------------------------------------------------------- the graph
def _check_model(model):
    family = family_for(model)
    if family.name != "HookedTransformer":
        raise NotImplementedError(
            f"edge attribution runs on a HookedTransformer only, not on a {family.name}: it reads each "
            "receiver's gradient from the per-head copies of the residual stream that TransformerLens' "
            "use_split_qkv_input / use_attn_result / use_hook_mlp_in give a HookedTransformer. A "
            "TransformerBridge's hook_q_input / hook_k_input / hook_v_input are not on the gradient path of "
            "one head's query, key and value input (a sender's edge scores do not sum to its node score), so "
            "the per-receiver gradients cannot be read there. Load the model as a HookedTransformer "
            "(TransformerLens 3.x; lp.zoo.load(name, kind='hooked'))"
        )
    if family.n_kv_heads is not None:
        raise NotImplementedError(
            "edge attribution: grouped-query attention (n_key_value_heads < n_heads) is not supported: the sweep "
            "ungroups the key/value heads, and the split key/value inputs then no longer give one gradient per "
            "receiver (a sender's edge scores would not sum to its node score)")
    if family.pe_type == "shortformer":
        raise NotImplementedError("edge attribution: shortformer position embeddings are added to the query and key "
                                  "inputs only, which TransformerLens cannot combine with use_split_qkv_input")
    return family


def _graph(model, family) -> Tuple[List[_Node], List[_Node]]:
    """Senders and receivers with their hook points (the split-input names) and order."""
    cfg = model.cfg
    L, H = cfg.n_layers, cfg.n_heads
    mlp_order = 0 if cfg.parallel_attn_mlp else 1  # a parallel MLP reads the block's input, as attention
    senders = [_Node("embed", -1, (-1, 0), "hook_embed")]
    if family.pe_type == "standard":
        senders.append(_Node("pos_embed", -1, (-1, 0), "hook_pos_embed"))
    receivers = []
    for l in range(L):
        senders += [_Node(f"L{l}.H{h}", l, (l, 0), f"blocks.{l}.attn.hook_result", h) for h in range(H)]
        for kind in ("q", "k", "v"):
            receivers += [_Node(f"L{l}.H{h}", l, (l, 0), f"blocks.{l}.hook_{kind}_input", h, kind) for h in range(H)]
        if not cfg.attn_only:
            senders.append(_Node(f"L{l}.MLP", l, (l, 1), f"blocks.{l}.hook_mlp_out"))
            receivers.append(_Node(f"L{l}.MLP", l, (l, mlp_order), f"blocks.{l}.hook_mlp_in", None, "mlp"))
    final = [n for n, hr in family.hook_roles().items() if hr.role is Role.RESID_FINAL][0]
    receivers.append(_Node("logits", L, (L, 0), final, None, "logits"))
    return senders, receivers


def _feeds(sender: _Node, receiver: _Node) -> bool:
    return sender.order < receiver.order


@contextmanager
def _split_inputs(model):
    """The per-receiver hook points switched on for the duration; the model's flags put back."""
    before = {flag: bool(getattr(model.cfg, flag)) for flag in _SPLIT_FLAGS}
    try:
        model.set_use_split_qkv_input(True)
        model.set_use_attn_result(True)
        if not model.cfg.attn_only:  # an attention-only model has no MLP input to split
            model.set_use_hook_mlp_in(True)
        yield
    finally:
        model.set_use_split_qkv_input(before["use_split_qkv_input"])
        model.set_use_attn_result(before["use_attn_result"])
        if not model.cfg.attn_only:
            model.set_use_hook_mlp_in(before["use_hook_mlp_in"])


def _flat(act: Tensor, node: _Node) -> Tensor:
    """The node's ``[batch, pos * d_model]`` slice of a hook's activation or gradient, float64."""
    x = act if node.head is None else act[:, :, node.head]
    return x.detach().double().reshape(x.shape[0], -1)


# ---------------------------------------------------------------------------------- inputs
def _pairs(family, clean, corrupted, device) -> List[Tuple[List[int], Tensor, Tensor]]:
    """Pairs grouped by length: ``(pair indices, clean [n, pos], corrupted [n, pos])`` per group,
    parsed and checked as activation patching does (``patching._pairs``)."""
    pairs = patching_pairs(family, clean, corrupted, device)
    batches = [(idx, *pairs.stacked(idx)) for idx in pairs.groups().values()]
    for _, clean_t, corr_t in batches:  # explain would right-align a padded-looking batch: positions shift
        for which, t in (("clean", clean_t), ("corrupted", corr_t)):
            if infer_padding(t, family.tokenizer) is not None:
                raise ValueError(f"{which}: the prompts of one length start or end with runs of the pad id of "
                                 "different lengths, as a padded batch does; edge attribution patches positions one "
                                 "to one and takes unpadded prompts")
    return batches


def _metric(metric: Callable, idx: List[int], n_groups: int) -> Callable[[Tensor], Tensor]:
    """``metric`` on one length group, as patching runs it (``metric(logits)`` or
    ``metric(logits, pair_indices)``, one value per pair); over several groups the metric must take
    the pair indices, since the edge scores of a pair must come from that pair's own answer."""
    if isinstance(metric, HookTarget):
        raise TypeError("edge attribution takes a metric on the logits (the logits are a receiver of the graph); "
                        "an lp.at_hook target works with activation_patching and relevance_patching")
    if callable(metric) and n_groups > 1 and not takes_positions(metric):
        raise ValueError("the pairs have different lengths, so they run in separate batches: write the metric as "
                         "metric(logits, pair_indices) -> [len(pair_indices)] (pair_indices: which pairs the batch "
                         "holds, in order)")
    return as_batch_metric(metric, torch.tensor(idx))


# ---------------------------------------------------------------------------------- result
@dataclass
class EdgeAttribution:
    """Edge scores averaged over pairs (``scores[method]`` ``[n_edges]``) and per pair
    (``per_pair[method]`` ``[n_pairs, n_edges]``), in the order of ``edges``; ``node_scores[method]``
    ``{sender: [n_pairs]}`` is ``(clean - corrupted) . g`` at each sender's output."""

    edges: List[Edge]
    methods: List[str]
    per_pair: Dict[str, Tensor]
    node_scores: Dict[str, Dict[str, Tensor]]
    metric_clean: Tensor
    metric_corrupted: Tensor
    n_layers: int
    positional_methods: List[str] = field(default_factory=list)  # those with positional sinks here
    scores: Dict[str, Tensor] = field(init=False)

    def __post_init__(self):
        self.scores = {m: s.mean(0) for m, s in self.per_pair.items()}

    def _method(self, method: Optional[str]) -> str:
        method = self.methods[0] if method is None else method
        if method not in self.per_pair:
            raise ValueError(f"no scores for method {method!r}; this result has {self.methods}")
        return method

    def score(self, sender: str, receiver: str, receiver_input: str, method: Optional[str] = None) -> float:
        """The mean score of one edge."""
        method = self._method(method)
        for i, e in enumerate(self.edges):
            if (e.sender, e.receiver, e.receiver_input) == (sender, receiver, receiver_input):
                return float(self.scores[method][i])
        raise KeyError(f"no edge {sender} -> {receiver} ({receiver_input})")

    def table(self) -> List[dict]:
        """One row per edge and method: the edge's fields, ``method``, ``score`` (mean over pairs)
        and ``scores`` (one per pair)."""
        rows = []
        for method in self.methods:
            mean, per = self.scores[method].tolist(), self.per_pair[method].T.tolist()
            for e, s, p in zip(self.edges, mean, per):
                if e.kind == POSITIONAL and method not in self.positional_methods:
                    continue
                rows.append({"sender": e.sender, "receiver": e.receiver, "sender_layer": e.sender_layer,
                             "receiver_layer": e.receiver_layer, "receiver_input": e.receiver_input, "kind": e.kind,
                             "method": method, "score": s, "scores": p})
        return rows

    def to_frame(self):
        """``table()`` as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame(self.table())

    def top(self, k: int = 10, method: Optional[str] = None, kind: Optional[str] = PATCHING) -> List[dict]:
        """The ``k`` rows of ``method`` with the largest absolute score (of ``kind``; None: any)."""
        if not isinstance(k, int) or k < 0:
            raise ValueError(f"k must be a non-negative integer, got {k!r}")
        method = self._method(method)
        rows = [r for r in self.table() if r["method"] == method and (kind is None or r["kind"] == kind)]
        return sorted(rows, key=lambda r: -abs(r["score"]))[:k]

    def figure(self, method: Optional[str] = None, threshold: Optional[float] = None,
               top: Optional[int] = None) -> go.Figure:
        """The graph, layer by layer left to right: edges as lines, red positive and blue negative,
        width by |score|; only edges with |score| >= ``threshold`` and/or the ``top`` largest
        (default: the 50 largest). Positional edges are dotted."""
        method = self._method(method)
        rows = [r for r in self.table() if r["method"] == method]
        if threshold is not None:
            rows = [r for r in rows if abs(r["score"]) >= threshold]
        if top is not None or threshold is None:
            rows = sorted(rows, key=lambda r: -abs(r["score"]))[: 50 if top is None else top]
        nodes = self._node_positions()
        largest = max([abs(r["score"]) for r in rows] + [1e-30])
        fig = go.Figure()
        for r in rows:
            (x0, y0), (x1, y1) = nodes[r["sender"]], nodes[r["receiver"]]
            y1 += {"q": 0.2, "k": 0.0, "v": -0.2}.get(r["receiver_input"], 0.0)
            text = f"{r['sender']} -> {r['receiver']} ({r['receiver_input']}): {r['score']:.4g}"
            fig.add_trace(go.Scatter(
                x=[x0, (x0 + x1) / 2, x1], y=[y0, (y0 + y1) / 2, y1], mode="lines", hoverinfo="text",
                text=[text] * 3, showlegend=False,
                line=dict(width=0.5 + 6 * abs(r["score"]) / largest, color="crimson" if r["score"] > 0 else "royalblue",
                          dash="dot" if r["kind"] == POSITIONAL else "solid")))
        names = list(nodes)
        fig.add_trace(go.Scatter(x=[nodes[n][0] for n in names], y=[nodes[n][1] for n in names],
                                 mode="markers+text", text=names, textposition="top center", hoverinfo="text",
                                 marker=dict(size=10, color="black"), showlegend=False))
        fig.update_layout(title=f"Edge attribution ({method}): {len(rows)} edges", xaxis=dict(
            tickvals=list(range(-1, self.n_layers + 1)),
            ticktext=["inputs"] + [f"layer {l}" for l in range(self.n_layers)] + ["logits"]),
            yaxis=dict(visible=False), height=600)
        return fig

    def _node_positions(self) -> Dict[str, Tuple[float, float]]:
        """x: the layer (an MLP half a layer after its heads); y: the node's index in its column."""
        columns: Dict[float, List[str]] = {}
        for e in self.edges:
            for name, layer in ((e.sender, e.sender_layer), (e.receiver, e.receiver_layer)):
                x = layer + (0.5 if name.endswith("MLP") else 0.0)
                if name not in columns.setdefault(x, []):
                    columns[x].append(name)
        return {n: (x, i - (len(col) - 1) / 2) for x, col in columns.items() for i, n in enumerate(col)}


# ---------------------------------------------------------------------------------- the call
@takes_hf_models
@in_eval_mode
def edge_attribution(model, clean, corrupted, metric: Callable[[Tensor], Tensor],
                     methods: Union[str, Sequence[str]] = ("grad", "pa_lrp")) -> EdgeAttribution:
    """Score every sender -> receiver edge as ``(clean - corrupted sender output) . g_receiver``.

    ``clean`` / ``corrupted``: one prompt or a batch (strings, or ids ``[n, pos]``), pair ``i``
    of equal length. ``metric(logits)`` returns ``[n]`` (one value per pair, e.g. a logit
    difference at the last position); pairs of different lengths run in separate batches, and
    the metric is then ``metric(logits, pair_indices)`` (which pairs the batch holds, in order;
    a two-argument metric is always called so).
    ``methods``: ``"grad"`` (plain gradient) and/or any registered LRP method. Cost per method:
    one hooked forward and one backward per length group, plus one forward of each input.
    """
    family = _check_model(model)
    methods = [methods] if isinstance(methods, str) else list(methods)
    if not methods:
        raise ValueError("methods: give at least one method")
    lrp = {m: get_method("grad_x_input" if m == "grad" else m) for m in methods}  # unknown names refused here
    device = next(model.parameters()).device
    groups = _pairs(family, clean, corrupted, device)
    n_pairs = sum(len(idx) for idx, _, _ in groups)
    senders, receivers = _graph(model, family)
    patch_edges = [(i, j) for i, s in enumerate(senders) for j, r in enumerate(receivers) if _feeds(s, r)]
    edges = [Edge(senders[i].name, receivers[j].name, senders[i].layer, receivers[j].layer, receivers[j].kind)
             for i, j in patch_edges]
    L, H = model.cfg.n_layers, model.cfg.n_heads
    with_positional = family.pe_type in ("rotary", "alibi")
    if with_positional:
        edges += [Edge("pos", f"L{l}.H{h}", -1, l, "pos", POSITIONAL) for l in range(L) for h in range(H)]
    per_pair = {m: torch.zeros(n_pairs, len(edges), dtype=torch.float64) for m in methods}
    nodes = {m: {s.name: torch.zeros(n_pairs, dtype=torch.float64) for s in senders} for m in methods}
    metric_clean = torch.zeros(n_pairs, dtype=torch.float64)
    metric_corr = torch.zeros(n_pairs, dtype=torch.float64)
    send_hooks = sorted({s.hook for s in senders})
    recv_hooks = sorted({r.hook for r in receivers})
    s_idx = torch.tensor([i for i, _ in patch_edges], dtype=torch.long)
    r_idx = torch.tensor([j for _, j in patch_edges], dtype=torch.long)
    with _split_inputs(model):
        for idx, clean_t, corr_t in groups:
            at = torch.tensor(idx)
            checked = _metric(metric, idx, len(groups))
            with torch.no_grad():
                clean_logits, clean_cache = model.run_with_cache(clean_t, names_filter=send_hooks)
                corr_logits, corr_cache = model.run_with_cache(corr_t, names_filter=send_hooks)
                metric_clean[at] = checked(clean_logits).double().cpu()
                metric_corr[at] = checked(corr_logits).double().cpu()
            delta = torch.stack([_flat(clean_cache[s.hook], s) - _flat(corr_cache[s.hook], s) for s in senders], 1)
            del clean_cache, corr_cache
            for m in methods:
                attr = explain(model, corr_t, checked, method=lrp[m], record_gradients=send_hooks + recv_hooks)
                grads = attr.gradients
                g_recv = torch.stack([_flat(grads[r.hook], r) for r in receivers], 1)  # [n, R, pos * d]
                g_send = torch.stack([_flat(grads[s.hook], s) for s in senders], 1)
                pair_scores = torch.einsum("nsk,nrk->nsr", delta, g_recv)
                per_pair[m][at, : len(patch_edges)] = pair_scores[:, s_idx, r_idx].cpu()
                node = (delta * g_send).sum(-1).cpu()
                for i, s in enumerate(senders):
                    nodes[m][s.name][at] = node[:, i]
                if with_positional and lrp[m].positional.sinks:
                    sinks = attr.positional.sum(-1).double().reshape(len(idx), L * H).cpu()
                    per_pair[m][at, len(patch_edges):] = sinks
    positional_methods = [m for m in methods if with_positional and lrp[m].positional.sinks]
    return EdgeAttribution(edges, methods, per_pair, nodes, metric_clean, metric_corr, L, positional_methods)


@takes_hf_models
@in_eval_mode
def path_patching(model, clean, corrupted, metric: Callable[[Tensor], Tensor], edges: Sequence[Edge],
                  scale: float = 1.0) -> Tensor:
    """The effect on ``metric`` (mean over pairs, relative to the corrupted run) of patching each
    edge: the receiver's input reads the corrupted residual stream plus ``scale * (clean -
    corrupted)`` output of the sender, everything else stays corrupted. One forward per edge and
    length group. Positional edges have no patch: NaN. ``scale`` small: ``effect / scale`` tends
    to the plain-gradient edge score."""
    family = _check_model(model)
    senders, receivers = _graph(model, family)
    by_sender = {s.name: s for s in senders}
    by_receiver = {(r.name, r.kind): r for r in receivers}
    groups = _pairs(family, clean, corrupted, next(model.parameters()).device)
    n_pairs = sum(len(idx) for idx, _, _ in groups)
    effects = torch.zeros(n_pairs, len(edges), dtype=torch.float64)
    hooks = sorted({s.hook for s in senders})
    with _split_inputs(model), torch.no_grad():
        for idx, clean_t, corr_t in groups:
            at = torch.tensor(idx)
            checked = _metric(metric, idx, len(groups))
            _, clean_cache = model.run_with_cache(clean_t, names_filter=hooks)
            corr_logits, corr_cache = model.run_with_cache(corr_t, names_filter=hooks)
            baseline = checked(corr_logits).double().cpu()
            for k, e in enumerate(edges):
                if e.kind == POSITIONAL:
                    effects[at, k] = float("nan")
                    continue
                s, r = by_sender.get(e.sender), by_receiver.get((e.receiver, e.receiver_input))
                if s is None or r is None or not _feeds(s, r):
                    raise ValueError(f"no edge {e.sender} -> {e.receiver} ({e.receiver_input}) in this model")
                d = clean_cache[s.hook] - corr_cache[s.hook]
                d = scale * (d if s.head is None else d[:, :, s.head])

                def patch(act, hook, d=d, head=r.head):
                    act = act.clone()
                    if head is None:
                        act += d
                    else:
                        act[:, :, head] += d
                    return act

                logits = model.run_with_hooks(corr_t, fwd_hooks=[(r.hook, patch)])
                effects[at, k] = checked(logits).double().cpu() - baseline
    return effects.mean(0)
