"""Explain a whole dataset: batches by length, results written as they come, resumable, and shared
out over the processes of a ``torch.distributed`` run (``torchrun``), each on its own device.

The folder ``out`` holds, readable without lens_palrp:

* ``run.json``: the settings (method, model, versions, the prompts' digest, batch size and the
  batch plan: which prompts each batch holds);
* ``shard-00000.safetensors``, ...: one per batch, an ``Attribution`` of that batch in
  ``lens_palrp.io``'s format (safetensors, JSON header), written to a temporary name and renamed,
  so that a shard exists whole or not at all;
* ``index.json``: prompt ``i`` -> ``[shard, row]``, written once every shard exists.

The batch plan is fixed by the prompts and the batch size, so a run that stopped, or a rank that
crashed, is finished by calling again with the same arguments (any number of processes): shards that
exist are not redone. A folder made with other settings is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from lens_palrp.engine import explain
from lens_palrp.hooks import family_for
from lens_palrp.io import load_attribution, save_attribution
from lens_palrp.models import explainable
from lens_palrp.result import Attribution

FORMAT = 1
RUN_FILE, INDEX_FILE = "run.json", "index.json"


def explain_dataset(model, prompts, targets=None, *, method: str = "pa_lrp", batch_size: int = 8,
                    out: Optional[str] = None, position=-1, prompt_column: str = "prompt",
                    target_column: str = "target", position_column: Optional[str] = None,
                    record=None, prepend_bos: Optional[bool] = None, progress: bool = True,
                    attention: str = "auto", checkpoint: bool = False, allow_unverified: bool = False,
                    **options) -> "DatasetAttribution":
    """Explain every prompt of a dataset, one batch at a time, writing each batch to ``out``.

    Args:
        prompts: a list of strings or of token-id sequences (1-d tensors or lists of ints), or a
            Hugging Face ``datasets.Dataset`` with a ``prompt_column`` (and, when ``targets`` is
            None, a ``target_column``; per-row explained positions from ``position_column``).
        targets: one per prompt (a token id, a single-token string, or a pair ``(correct, wrong)``
            for a logit difference), or one target for all.
        batch_size: prompts per ``explain`` call; prompts are sorted by length first, so a batch
            pads little. Peak memory is one batch's.
        out: the results folder (created); None: a temporary folder (``res.path``).
        position: the explained position within each prompt (-1: its last token), one for all or
            one per prompt.
        record: hook names whose relevance is stored too (as ``explain``'s ``record``).
        method, prepend_bos, attention, checkpoint, allow_unverified, options: as ``explain``
            (a Hugging Face model object too, with ``tokenizer=``).

    Under ``torch.distributed`` (``torchrun``, or any launcher that sets ``WORLD_SIZE``; the
    process group is started with ``gloo`` on CPU, ``nccl`` on CUDA if nobody started it), rank
    ``r`` of ``n`` explains batches ``r, r + n, ...`` on the model it was given (put it on
    ``cuda:LOCAL_RANK``), rank 0 writes the index, and every rank returns the whole result.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    model = explainable(model, options.pop("tokenizer", None))
    prompts, targets, positions = _columns(prompts, targets, position, prompt_column, target_column, position_column)
    family = family_for(model)
    ids = [_token_ids(family, p, prepend_bos) for p in prompts]
    targets = [_target_ids(family, t) for t in targets]
    plan = _plan(ids, batch_size)
    rank, world, dist = _distributed(model)
    out = _folder(out, rank, dist)
    settings = {
        "format": FORMAT, "method": str(method), "model": _model_name(model), "model_config": _config_digest(model),
        "versions": _versions(), "n_prompts": len(ids), "batch_size": batch_size,
        "prompts": _digest([[int(t) for t in r] for r in ids], targets, positions, record, options),
        "attention": attention, "checkpoint": checkpoint, "plan": plan,
    }
    _settle_run_file(out, settings, rank, dist)
    mine = [k for k in range(len(plan)) if k % world == rank and not os.path.exists(_shard(out, k))]
    bar = _progress(sum(len(plan[k]) for k in mine), rank, world) if progress else None
    try:
        for k in mine:
            rows = plan[k]
            tokens, mask = _padded([ids[i] for i in rows], family)
            attr = explain(model, tokens, _batch_target([targets[i] for i in rows]),
                           method=method, position=torch.tensor([positions[i] for i in rows]),
                           attention_mask=mask, record=record, attention=attention, checkpoint=checkpoint,
                           allow_unverified=allow_unverified, **options)
            _write_shard(out, k, attr)
            if bar is not None:
                bar.update(len(rows))
    finally:
        if bar is not None:
            bar.close()
    if dist is not None:
        dist.barrier()
    if rank == 0:
        _write_index(out, plan)
    if dist is not None:
        dist.barrier()
    return DatasetAttribution(out)


class DatasetAttribution:
    """The results of ``explain_dataset``, read from its folder: ``len(res)`` prompts, ``res[i]``
    the ``Attribution`` of prompt ``i`` (a batch of one; positions past its length are its batch's
    padding, ``attention_mask`` 0), in dataset order whichever process computed it. A partial run
    (some shards missing) opens too: ``res.missing`` lists the prompts not yet explained."""

    def __init__(self, path: str):
        run = os.path.join(path, RUN_FILE)
        if not os.path.isfile(run):
            raise FileNotFoundError(f"{path} holds no {RUN_FILE}: not an explain_dataset folder")
        with open(run) as f:
            self.settings: Dict[str, Any] = json.load(f)
        if self.settings.get("format") != FORMAT:
            raise ValueError(f"{run}: format {self.settings.get('format')!r}, this lens_palrp reads {FORMAT}")
        self.path = path
        self.plan: List[List[int]] = self.settings["plan"]
        self._where = {i: (k, row) for k, rows in enumerate(self.plan) for row, i in enumerate(rows)}
        self._cached: Tuple[Optional[int], Optional[Attribution]] = (None, None)
        self._stats = None

    @classmethod
    def load(cls, path: str) -> "DatasetAttribution":
        """Reopen a finished or partial run."""
        return cls(path)

    def __len__(self) -> int:
        return int(self.settings["n_prompts"])

    @property
    def method(self) -> str:
        return self.settings["method"]

    @property
    def missing(self) -> List[int]:
        """Prompts whose shard does not exist (yet)."""
        return sorted(i for k, rows in enumerate(self.plan) if not os.path.exists(_shard(self.path, k)) for i in rows)

    @property
    def complete(self) -> bool:
        return all(os.path.exists(_shard(self.path, k)) for k in range(len(self.plan)))

    def __getitem__(self, index: int) -> Attribution:
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"a DatasetAttribution is indexed by prompt number (int), got {type(index).__name__}")
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"prompt {index} out of range: the dataset has {n} prompts")
        k, row = self._where[index % n]
        return self.shard(k)[row]

    def __iter__(self) -> Iterator[Attribution]:
        for i in range(len(self)):
            yield self[i]

    def shard(self, k: int) -> Attribution:
        """Batch ``k`` as it was explained (the last one read is kept)."""
        if self._cached[0] != k:
            path = _shard(self.path, k)
            if not os.path.exists(path):
                raise KeyError(f"batch {k} (prompts {self.plan[k]}) has not been explained yet: {path} is missing")
            self._cached = (k, load_attribution(path))
        return self._cached[1]  # type: ignore[return-value]

    def batches(self) -> Iterator[Attribution]:
        """Every explained batch in plan order, one in memory at a time (what the statistics read)."""
        for k in range(len(self.plan)):
            if os.path.exists(_shard(self.path, k)):
                yield self.shard(k)

    # -- dataset-level statistics (lens_palrp.analyses.dataset_stats) ---------------------------
    def stats(self, n_boot: int = 1000, seed: int = 0, confidence: float = 0.95):
        """Mean and spread over the explained prompts of the per-head positional and semantic
        relevance, per-layer shares, relevance by query-minus-key distance, and per-head bootstrap
        intervals: one pass over the shards, one batch in memory at a time; kept once computed."""
        key = (n_boot, seed, confidence, len(self) - len(self.missing))
        if self._stats is None or self._stats[0] != key:
            from lens_palrp.analyses.dataset_stats import collect

            self._stats = (key, collect(self.batches(), n_boot=n_boot, seed=seed, confidence=confidence))
        return self._stats[1]

    def top_heads(self, k: int = 10, which: str = "positional", n_boot: int = 1000, seed: int = 0,
                  confidence: float = 0.95):
        """The ``k`` heads with the largest mean relevance over prompts (``"positional"`` or
        ``"semantic"``), each ``{layer, head, mean, low, high}`` with its bootstrap interval."""
        from lens_palrp.analyses.dataset_stats import top_heads

        return top_heads(self.stats(n_boot=0), k=k, which=which, n_boot=n_boot, seed=seed, confidence=confidence)

    def report(self, path: str, title: Optional[str] = None, k: int = 10) -> str:
        """The dataset figures (mean per-head positional and semantic maps, layer shares,
        relevance by distance, top heads with intervals) in one HTML page; returns ``path``."""
        from lens_palrp.analyses.dataset_stats import dataset_report

        return dataset_report(self.stats(), path, title=title, k=k)

    def __repr__(self) -> str:
        done = len(self) - len(self.missing)
        return f"DatasetAttribution({self.path!r}, method={self.method!r}, prompts={len(self)}, explained={done})"


# ------------------------------------------------------------------------------------ inputs
def _columns(prompts, targets, position, prompt_column, target_column, position_column):
    """Prompts, one target and one position per prompt, from lists or a ``datasets.Dataset``."""
    if _is_hf_dataset(prompts):
        ds = prompts
        for name in [prompt_column] + ([target_column] if targets is None else []) + (
                [position_column] if position_column else []):
            if name not in ds.column_names:
                raise ValueError(f"the dataset has no column {name!r} (columns: {ds.column_names})")
        if targets is None:
            targets = [tuple(t) if isinstance(t, list) else t for t in ds[target_column]]
        if position_column:
            position = list(ds[position_column])
        prompts = list(ds[prompt_column])
    if isinstance(prompts, (str, Tensor)) or not isinstance(prompts, Sequence):
        raise TypeError("prompts must be a list of prompts (strings or token-id sequences) or a datasets.Dataset")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    n = len(prompts)
    if targets is None:
        raise ValueError("targets are needed: one per prompt, one for all, or a target column of the dataset")
    if isinstance(targets, (list, Tensor, np.ndarray)):  # one per prompt (a tuple is one pair for all)
        targets = [tuple(t) if isinstance(t, list) else t
                   for t in (targets if isinstance(targets, list) else targets.tolist())]
        if len(targets) != n:
            raise ValueError(f"{len(targets)} targets for {n} prompts")
    else:
        targets = [targets] * n
    if isinstance(position, (list, tuple, Tensor, np.ndarray)):
        position = [int(p) for p in (position.tolist() if isinstance(position, (Tensor, np.ndarray)) else position)]
        if len(position) != n:
            raise ValueError(f"{len(position)} positions for {n} prompts")
    else:
        position = [int(position)] * n
    return prompts, targets, position


def _is_hf_dataset(obj) -> bool:
    return type(obj).__module__.startswith("datasets") and hasattr(obj, "column_names")


def _token_ids(family, prompt, prepend_bos) -> Tensor:
    if isinstance(prompt, str):
        return family.to_tokens(prompt, prepend_bos).reshape(-1).cpu()
    ids = torch.as_tensor(prompt)
    if ids.ndim != 1 or ids.dtype.is_floating_point or ids.numel() == 0:
        raise ValueError(f"a prompt must be a string or a non-empty 1-d sequence of token ids, got {prompt!r}")
    return ids.long().cpu()


def _target_ids(family, target):
    """A token id, or a pair of them, from ids or single-token strings."""
    if isinstance(target, tuple):
        if len(target) != 2:
            raise ValueError(f"a logit-difference target is a pair (correct, wrong), got {target!r}")
        return tuple(_target_ids(family, t) for t in target)
    if isinstance(target, str):
        return int(family.to_single_token(target))
    if isinstance(target, bool) or not isinstance(target, int):
        raise TypeError(f"a target is a token id, a single-token string or a pair of them, got {target!r}")
    return int(target)


def _batch_target(targets):
    if isinstance(targets[0], tuple):
        return tuple(torch.tensor([t[j] for t in targets]) for j in range(2))
    return torch.tensor(targets)


def _plan(ids: List[Tensor], batch_size: int) -> List[List[int]]:
    """Prompts sorted by length (ties by index), cut into batches: little padding, and the same
    plan whenever the same prompts are given."""
    order = sorted(range(len(ids)), key=lambda i: (ids[i].numel(), i))
    return [order[k:k + batch_size] for k in range(0, len(order), batch_size)]


def _padded(rows: List[Tensor], family) -> Tuple[Tensor, Tensor]:
    n_pos = max(r.numel() for r in rows)
    pad = getattr(family.tokenizer, "pad_token_id", None) if family.tokenizer is not None else None
    tokens = torch.full((len(rows), n_pos), 0 if pad is None else int(pad), dtype=torch.long)
    mask = torch.zeros((len(rows), n_pos), dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : r.numel()], mask[i, : r.numel()] = r, 1
    return tokens, mask


# ------------------------------------------------------------------------------------ the folder
def _folder(out: Optional[str], rank: int, dist) -> str:
    if out is None:
        if dist is not None and dist.get_world_size() > 1:
            raise ValueError("under torch.distributed, pass out= (a folder every rank can reach)")
        out = tempfile.mkdtemp(prefix="lens_palrp_dataset_")
    os.makedirs(out, exist_ok=True)
    return out


def _settle_run_file(out: str, settings: Dict[str, Any], rank: int, dist) -> None:
    """Write ``run.json`` (rank 0, once); a folder of another run is refused, naming what differs."""
    path = os.path.join(out, RUN_FILE)
    if rank == 0 and not os.path.exists(path):
        _write_json(path, settings)
    if dist is not None:
        dist.barrier()
    with open(path) as f:
        stored = json.load(f)
    differ = sorted(k for k in set(stored) | set(settings) if k != "versions" and stored.get(k) != settings.get(k))
    if stored.get("versions") != settings["versions"]:
        differ.append("versions")
    if differ:
        raise ValueError(f"{out} holds a run with other settings ({', '.join(differ)}); "
                         "use another folder, or delete this one to start over")


def _shard(out: str, k: int) -> str:
    return os.path.join(out, f"shard-{k:05d}.safetensors")


def _write_shard(out: str, k: int, attr: Attribution) -> None:
    """Written under a temporary name and renamed: a shard exists whole or not at all."""
    final = _shard(out, k)
    tmp = final + f".tmp{os.getpid()}"
    save_attribution(attr, tmp)
    os.replace(tmp, final)


def _write_index(out: str, plan: List[List[int]]) -> None:
    if all(os.path.exists(_shard(out, k)) for k in range(len(plan))):
        index = {str(i): [f"shard-{k:05d}.safetensors", row] for k, rows in enumerate(plan) for row, i in enumerate(rows)}
        _write_json(os.path.join(out, INDEX_FILE), {"prompts": len(index), "index": index})


def _write_json(path: str, obj) -> None:
    tmp = path + f".tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------ settings
def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _model_name(model) -> str:
    cfg = getattr(model, "cfg", None)
    return str(getattr(cfg, "model_name", None) or type(model).__name__)


def _config_digest(model) -> str:
    """The model's shape, dtype and a fingerprint of its weights (sum and sum of squares of every
    parameter, in float64): another model of the same name, or other weights, is another run."""
    cfg = getattr(model, "cfg", None)
    facts = {k: getattr(cfg, k, None) for k in ("n_layers", "n_heads", "d_model", "d_head", "d_vocab",
                                                 "positional_embedding_type", "dtype")}
    with torch.no_grad():
        sums = [(float(p.double().sum()), float(p.double().square().sum())) for p in model.parameters()]
    return _digest(facts, [f"{a:.12g},{b:.12g}" for a, b in sums])


def _versions() -> Dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("lens_palrp", "transformer-lens", "torch")}


# ------------------------------------------------------------------------------------ processes
def _distributed(model):
    """``(rank, world size, torch.distributed or None)``; starts the process group when a launcher
    set ``WORLD_SIZE`` > 1 and nobody started it (``nccl`` for a CUDA model, ``gloo`` otherwise)."""
    import torch.distributed as dist

    if not dist.is_available():
        return 0, 1, None
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return 0, 1, None
        on_cuda = any(p.is_cuda for p in model.parameters())
        dist.init_process_group(backend="nccl" if on_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), dist


def _progress(total: int, rank: int, world: int):
    from tqdm.auto import tqdm

    desc = "explaining" if world == 1 else f"rank {rank}/{world}"
    return tqdm(total=total, desc=desc, unit="prompt", position=rank, leave=True)
