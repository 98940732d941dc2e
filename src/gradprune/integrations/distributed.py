"""``torch.distributed``: gradprune under DistributedDataParallel and FSDP.

See ``docs/distributed.md`` for a walk-through with ``torchrun``. In short:

**Gradual pruning and sparse training under DDP** need nothing extra. DDP averages ``.grad`` over
the ranks in ``backward()``; :class:`~gradprune.Pruner` scores and :class:`~gradprune.SparseTrainer`
drops and grows from those synchronized gradients and from the weights (identical on every rank:
DDP broadcasts rank 0's at construction and every rank then applies the same update); every random
choice comes from a ``torch.Generator`` seeded with ``config.seed``, never from the global RNG. The
masks are therefore identical on every rank after every update; :func:`check_masks_in_sync`
verifies it (one ``all_gather`` of a 32-byte digest per rank).

**One-shot scoring** (:func:`gradprune.prune`, :func:`gradprune.stream_gradients`,
:func:`gradprune.pre_prune`) runs distributed when given a DDP model, or a plain module and
``process_group=`` (e.g. ``torch.distributed.group.WORLD``): see :func:`resolve_process_group`.
``prune``/``stream_gradients``: each rank feeds its own shard of every global batch, and after each
backward the gradients are averaged over the ranks, as DDP does, so the scores and masks equal a
single-process run on the global batches. ``pre_prune``: every rank passes the whole dataset and the
same config; the seeded sample is split over the ranks and the (linear) gradient statistics are
summed, so the result equals a single-process run.

**FSDP2** (``torch.distributed.fsdp.fully_shard``: parameters are DTensors sharded on dim 0):
``Pruner``, ``SparseTrainer``, ``prune`` and ``pre_prune`` take the sharded model as it is. Each
rank's masks hold only its rows; selection is exact over all ranks through small all-reduces of
counts; :class:`Checkpointable` saves the state through ``torch.distributed.checkpoint``.

**FSDP1** (deprecated upstream; ``FullyShardedDataParallel(..., use_orig_params=True)``): :class:`FSDPPruner` and
:class:`FSDPSparseTrainer` drive a ``Pruner``/``SparseTrainer`` whose parameters live as flat shards:
they unshard parameters and gradients (``summon_full_params``) only where full tensors are needed
(scoring steps and prune events of the pruner; connectivity updates of the trainer) and otherwise
apply the masks to each rank's local shard, with no communication.

Example (under ``torchrun --nproc_per_node 2``; see ``examples/distributed_ddp.py``)::

    dist.init_process_group("gloo")
    model = DDP(build_model())
    pruner = gp.Pruner(model, config, optimizer=opt)   # the usual hooks in the usual loop
    ...
    check_masks_in_sync(pruner.masks)                  # raises MasksOutOfSyncError if ranks differ
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .._distributed import (  # re-exported: the public home of these helpers
    _initialized_dist,
    all_reduce_gradients,
    all_reduce_tensors,
    is_ddp,
    resolve_process_group,
    sum_over_ranks,
)

__all__ = [
    "check_masks_in_sync",
    "MasksOutOfSyncError",
    "mask_digest",
    "is_ddp",
    "resolve_process_group",
    "all_reduce_gradients",
    "all_reduce_tensors",
    "sum_over_ranks",
    "FSDPPruner",
    "FSDPSparseTrainer",
    "fsdp_shard_spans",
    "fsdp_full_params",
    "Checkpointable",
    "gather_masks",
    "is_sharded",
    "save_sharded_state",
    "load_sharded_state",
]


class MasksOutOfSyncError(RuntimeError):
    """Raised on every rank when the ranks' masks differ."""



# ---------------------------------------------------------------------------------------------
# masks in sync

def _masks_of(obj: Any) -> Mapping[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        return obj
    masks = getattr(obj, "masks", None)  # a Pruner, SparseTrainer, PruneResult, PrePruneSelection
    if isinstance(masks, Mapping):
        return masks
    raise TypeError("masks must be a MaskSet, a mapping name -> tensor, or an object with .masks "
                    f"(Pruner, SparseTrainer, PruneResult), got {type(obj).__name__}")


def mask_digest(masks: Any) -> tuple[str, dict[str, str]]:
    """``(overall sha256, {name: sha256})`` of masks: names, dtypes, shapes and every entry."""
    per_layer, overall = {}, hashlib.sha256()
    for name, m in _masks_of(masks).items():
        if not isinstance(m, torch.Tensor):
            raise TypeError(f"mask for {name!r} must be a tensor, got {type(m).__name__}")
        t = m.detach().cpu().contiguous().reshape(-1)
        h = hashlib.sha256(f"{name}|{t.dtype}|{tuple(m.shape)}|".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy().tobytes())
        per_layer[name] = h.hexdigest()
        overall.update(f"{name}:{per_layer[name]};".encode())
    return overall.hexdigest(), per_layer


def check_masks_in_sync(masks: Any, group: Any = None) -> str:
    """Raise :class:`MasksOutOfSyncError` on every rank unless all ranks of ``group`` (default: the
    default group) hold identical masks; return their sha256 digest.

    ``masks``: a :class:`~gradprune.MaskSet`, a mapping ``{name: tensor}``, or anything with
    ``.masks`` (``Pruner``, ``SparseTrainer``, ``FSDPPruner``, ``PruneResult``). It is a collective:
    call it on every rank. Each rank contributes a digest per layer (one ``all_gather_object``); the
    error names the ranks and layers that differ from the group's first rank.

    Sharded (FSDP2) masks, where each rank holds only its rows, are checked shard by shard (one
    ``all_gather_object`` of a few numbers and a 32-byte checksum per layer and rank; no rows cross
    ranks): every rank has the same layers and whole shapes; each mask shard has the rows its
    weight's placement gives it, and the shards tile the whole rows exactly once; ranks holding the
    same rows (replicas) hold equal checksums; each mask shard is the one applied to its weight
    shard (no pruned entry is nonzero); masks that are not sharded are compared whole, as above.
    The digest returned is over every rank's checksums (the same on every rank).
    """
    dist = _initialized_dist()
    if is_sharded(masks):
        return _check_sharded_masks(_masks_of(masks), group, dist)
    overall, per_layer = mask_digest(masks)
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, (overall, per_layer), group=group)
    ref_overall, ref_layers = gathered[0]
    problems = []
    for r, (o, layers) in enumerate(gathered):
        if o == ref_overall:
            continue
        names = sorted(set(layers) ^ set(ref_layers))
        names += [n for n in layers if n in ref_layers and layers[n] != ref_layers[n]]
        problems.append(f"rank {r}: {names}")
    if problems:
        raise MasksOutOfSyncError(
            "masks differ across ranks (layers that differ from group rank 0): " + "; ".join(problems)
            + ". Every rank must build the pruner/trainer with the same config and seed on the same "
            "model, and score from synchronized gradients (DistributedDataParallel or "
            "process_group=); see docs/distributed.md"
        )
    return ref_overall


def _check_sharded_masks(masks: Mapping, group: Any, dist) -> str:
    from .._distributed import local

    shards = getattr(masks, "row_shards", {})
    params = masks.params() if callable(getattr(masks, "params", None)) else {}
    _, per_layer = mask_digest(masks)
    info = {}
    for name, m in masks.items():
        spec = shards.get(name)
        if spec is None or not spec.sharded:
            info[name] = ("whole", per_layer[name])
            continue
        p = params.get(name)
        stale = 0 if p is None else int(((local(p.detach()) != 0) & ~m.to(torch.bool)).sum())
        info[name] = ("rows", spec.shape, spec.start, spec.stop, tuple(m.shape), per_layer[name], stale)
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, info, group=group)
    ref = gathered[0]
    problems: dict[int, list] = {}

    def bad(rank: int, text: str) -> None:
        problems.setdefault(rank, []).append(text)

    for r, layers in enumerate(gathered):
        for n in sorted(set(layers) ^ set(ref)):
            bad(r, f"{n!r}: present on {'this rank' if n in layers else 'group rank 0'} only")
        for n, v in layers.items():
            if n not in ref:
                continue
            if v[0] != ref[n][0] or (v[0] == "whole" and v[1] != ref[n][1]):
                bad(r, f"{n!r}: differs from group rank 0")
                continue
            if v[0] == "rows":
                _, shape, start, stop, local_shape, _, stale = v
                if shape != ref[n][1]:
                    bad(r, f"{n!r}: whole shape {shape}, group rank 0 has {ref[n][1]}")
                elif tuple(local_shape) != (stop - start, *shape[1:]):
                    bad(r, f"{n!r}: mask shard of shape {local_shape} for rows {start}:{stop}")
                if stale:
                    bad(r, f"{n!r}: {stale} pruned entries are nonzero in its weight shard (the mask shard "
                           "is not the one applied to the weights)")
    for n, v in ref.items():  # the shards tile the rows; replicas of the same rows agree
        if v[0] != "rows" or any(n not in g or g[n][0] != "rows" or g[n][1] != v[1] for g in gathered):
            continue
        by_rows: dict = {}
        for r, g in enumerate(gathered):
            by_rows.setdefault((g[n][2], g[n][3]), []).append((r, g[n][5]))
        covered = 0
        for (start, stop), holders in sorted(by_rows.items()):
            if start != stop and start != covered:
                bad(holders[0][0], f"{n!r}: rows {start}:{stop} do not continue from row {covered}")
            covered = max(covered, stop)
            for r, digest in holders[1:]:
                if digest != holders[0][1]:
                    bad(r, f"{n!r}: rows {start}:{stop} differ from those of rank {holders[0][0]}")
        rows = v[1][0] if v[1] else 1
        if covered != rows:
            bad(0, f"{n!r}: the shards cover rows 0:{covered} of {rows}")
    if problems:
        raise MasksOutOfSyncError(
            "sharded (FSDP2) masks are out of sync: " + "; ".join(
                f"rank {r}: {', '.join(texts)}" for r, texts in sorted(problems.items()))
            + ". Every rank must build the pruner/trainer with the same config and seed on the same "
            "fully_shard-ed model, and load checkpoints through torch.distributed.checkpoint "
            "(Checkpointable); see docs/distributed.md")
    overall = hashlib.sha256()
    for r, layers in enumerate(gathered):
        for n in sorted(layers):
            overall.update(f"{r}:{n}:{layers[n]};".encode())
    return overall.hexdigest()


# ---------------------------------------------------------------------------------------------
# torch.distributed.checkpoint (DCP)

_MISSING = object()


def _split(state: Any, where: str = "state") -> tuple[Any, Any]:
    """``(tensors, rest)``: the tensors of nested dicts (the same nesting), and everything else."""
    if isinstance(state, torch.Tensor):
        return state, _MISSING
    if isinstance(state, Mapping):
        tensors, rest = {}, {}
        for k, v in state.items():
            t, r = _split(v, f"{where}[{k!r}]")
            if t is not _MISSING and not (isinstance(t, dict) and not t and isinstance(v, Mapping) and v):
                tensors[k] = t
            if r is not _MISSING:
                rest[k] = r
        return tensors, rest
    if isinstance(state, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in state):
        raise TypeError(f"{where} holds tensors in a list: not supported by Checkpointable")
    return _MISSING, state


def _join(tensors: Any, rest: Any) -> Any:
    if not isinstance(tensors, Mapping):
        return tensors
    out = dict(rest) if isinstance(rest, Mapping) else {}
    for k, v in tensors.items():
        out[k] = _join(v, out.get(k))
    return out


class Checkpointable:
    """A :class:`~gradprune.Pruner` or :class:`~gradprune.SparseTrainer` (anything with
    ``state_dict``/``load_state_dict``) as a ``torch.distributed.checkpoint`` ``Stateful``: put it
    in the state dict you give ``dcp.save``/``dcp.load`` beside the model and the optimizer.

    Its tensors (masks: bool DTensors placed like their sharded weights; criterion statistics; the
    generator) go to DCP as tensors, so each rank writes only its shards and a checkpoint loads
    into another world size (DCP reshards); the rest (counters, history, config) is one small
    ``torch.save`` blob read back with ``weights_only=True``. ``dcp.load`` calls
    ``load_state_dict`` on the wrapped object, which validates everything first, as usual.

    Example (under ``torchrun``; see ``docs/distributed.md``)::

        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt),
                 "sparse": Checkpointable(trainer)}
        dcp.save(state, checkpoint_id="ckpt")
        ...
        dcp.load(state, checkpoint_id="ckpt")   # trainer.load_state_dict runs inside
        set_model_state_dict(model, state["model"]); set_optimizer_state_dict(model, opt, state["optim"])
    """

    def __init__(self, obj: Any):
        if not (callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))):
            raise TypeError(f"obj must have state_dict() and load_state_dict() (a Pruner or SparseTrainer), "
                            f"got {type(obj).__name__}")
        self.obj = obj

    def state_dict(self) -> dict:
        import io

        tensors, rest = _split(self.obj.state_dict())
        blob = io.BytesIO()
        torch.save(rest, blob)
        blob.seek(0)
        return {"tensors": tensors, "meta": blob}

    def load_state_dict(self, state: Mapping) -> None:
        blob = state["meta"]
        blob.seek(0)
        rest = torch.load(blob, weights_only=True)
        self.obj.load_state_dict(_join(state["tensors"], rest))


def is_sharded(obj: Any) -> bool:
    """Whether the masks of ``obj`` (a :class:`~gradprune.MaskSet`, or anything with ``.masks``)
    hold only this rank's rows of some parameter (FSDP2's ``fully_shard``)."""
    return any(s.sharded for s in getattr(_masks_of(obj), "row_shards", {}).values())


def save_sharded_state(obj: Any, path: str) -> None:
    """Save ``obj``'s state (a Pruner or SparseTrainer: masks, statistics, counters) to the folder
    ``path`` with ``torch.distributed.checkpoint``: each rank writes its own mask rows, the first
    rank the small rest. A collective: call it on every rank with the same ``path``."""
    import torch.distributed.checkpoint as dcp

    dcp.save({"gradprune": Checkpointable(obj)}, checkpoint_id=str(path))


def load_sharded_state(obj: Any, path: str) -> None:
    """Load into ``obj`` what :func:`save_sharded_state` wrote (any world size: DCP reshards;
    a single process gets whole masks). A collective under ``torch.distributed``."""
    import torch.distributed.checkpoint as dcp

    dcp.load({"gradprune": Checkpointable(obj)}, checkpoint_id=str(path))


def gather_masks(masks: Any) -> dict[str, torch.Tensor] | None:
    """The whole masks of a sharded (FSDP2) :class:`~gradprune.MaskSet` on the first rank of the
    shards' process group (``None`` on the others), e.g. to save one safetensors file for
    inference. A collective (one ``gather_object`` of each rank's bool rows): call it on every rank.

    Example (under ``torchrun``)::

        full = gather_masks(trainer.masks)
        if full is not None:
            gradprune.integrations.safetensors.save_masks(full, "masks.safetensors")
    """
    masks = _masks_of(masks)
    shards = {n: s for n, s in getattr(masks, "row_shards", {}).items() if s.sharded}
    local = {n: m.detach().cpu() for n, m in masks.items()}
    if not shards:
        return local
    groups = {id(s.group): s.group for s in shards.values()}
    if len(groups) != 1:
        raise ValueError("gather_masks needs every sharded mask on one process group")
    dist = _initialized_dist()
    group = next(iter(groups.values()))
    first = dist.get_global_rank(group, 0)
    gathered: list | None = [None] * dist.get_world_size(group) if dist.get_rank() == first else None
    dist.gather_object({n: local[n] for n in shards}, gathered, dst=first, group=group)
    if gathered is None:
        return None
    return {n: torch.cat([g[n] for g in gathered]) if n in shards else m for n, m in local.items()}


# ---------------------------------------------------------------------------------------------
# FSDP (use_orig_params=True)

def _fsdp(model: Any):
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except ImportError as e:  # pragma: no cover
        raise RuntimeError(f"torch.distributed.fsdp is not available: {e}") from None
    if not isinstance(model, FSDP):
        raise TypeError(f"model must be a FullyShardedDataParallel module, got {type(model).__name__}")
    if not getattr(model, "_use_orig_params", False):
        raise ValueError("gradprune needs FullyShardedDataParallel(..., use_orig_params=True): the "
                         "masks follow the original parameters, which only that mode keeps")
    return FSDP


def fsdp_full_params(model: nn.Module, *, with_grads: bool = False):
    """``FSDP.summon_full_params(model, writeback=True, with_grads=with_grads)``: inside, the
    original parameters (and, with ``with_grads``, their gradients) are whole; changes are written
    back to each rank's shard. A collective: enter it on every rank."""
    FSDP = _fsdp(model)
    return FSDP.summon_full_params(model, writeback=True, with_grads=with_grads)


def fsdp_shard_spans(model: nn.Module, params: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    """``{name: (start, stop)}``: the range of each parameter's flattened entries that this rank's
    FSDP shard holds (``(0, 0)`` when none). Parameters FSDP does not manage are left out."""
    FSDP = _fsdp(model)
    spans: dict[int, tuple[int, int]] = {}
    for module in FSDP.fsdp_modules(model):
        handle = getattr(module, "_handle", None)
        if handle is None:
            continue
        flat = handle.flat_param
        originals = getattr(flat, "_params", None)
        if originals is None:
            raise ValueError("FSDP must be built with use_orig_params=True")
        infos = getattr(flat, "_shard_param_infos", None)
        if not handle.uses_sharded_strategy or infos is None:
            continue  # NO_SHARD: every rank holds whole parameters
        for p, info in zip(originals, infos):
            spans[id(p)] = ((int(info.intra_param_start_idx), int(info.intra_param_end_idx) + 1)
                            if info.in_shard else (0, 0))
    return {n: spans[id(p)] for n, p in params.items() if id(p) in spans}


class _FSDPDriver:
    def __init__(self, model: nn.Module):
        import warnings

        warnings.warn(f"{type(self).__name__} drives FSDP1 (FullyShardedDataParallel), which PyTorch "
                      "deprecates, and gathers whole parameters at every scoring step: shard the model "
                      "with FSDP2 (torch.distributed.fsdp.fully_shard) and pass it to gp.Pruner / "
                      "gp.SparseTrainer as it is (docs/distributed.md)", DeprecationWarning, stacklevel=3)
        self._FSDP = _fsdp(model)
        self.fsdp_model = model

    def _full(self, with_grads: bool = False):
        return self._FSDP.summon_full_params(self.fsdp_model, writeback=True, with_grads=with_grads)

    def _attach(self, masks) -> None:
        masks.shard_spans = fsdp_shard_spans(self.fsdp_model, masks.params())

    def __getattr__(self, name):  # masks, step, history, report, ... of the wrapped object
        if name.startswith("_") or name in ("fsdp_model", "pruner", "trainer"):
            raise AttributeError(name)
        return getattr(self._inner, name)


class FSDPPruner(_FSDPDriver):
    """A :class:`~gradprune.Pruner` for a model wrapped in ``FullyShardedDataParallel(...,
    use_orig_params=True)``, with the same three hooks.

    The pruner is built on ``model.module`` with full parameters, so names and masks are those of the
    unwrapped model. While pruning is under way (``not done``), ``on_before_optimizer_step`` runs
    with parameters and gradients unsharded (the criterion sees the whole, reduce-scattered
    gradients, exactly as a single process would; masking the gradients is written back to the
    shards), and so does ``on_after_optimizer_step`` on a prune event (or when the criterion has its
    own ``on_after_optimizer_step``). Every other mask application (weights, gradients, optimizer
    state) works on each rank's local shard, with no communication. Create the optimizer after
    wrapping, from ``model.parameters()``. Attributes not defined here (``masks``, ``step``,
    ``done``, ``report``, ``state_dict()``, ...) are the wrapped pruner's (``.pruner``).
    """

    def __init__(self, model: nn.Module, config: Any = None, *,
                 optimizer: torch.optim.Optimizer | None = None, **fields):
        super().__init__(model)
        from ..pruner import Pruner
        from ..scores import Criterion

        with self._full():
            self.pruner = Pruner(model.module, config, optimizer=optimizer, **fields)
        self._inner = self.pruner
        self._attach(self.pruner.masks)
        crit = type(self.pruner.criterion)
        self._criterion_after = crit.on_after_optimizer_step is not Criterion.on_after_optimizer_step

    def on_step_begin(self, step: Any = None) -> None:
        self.pruner.on_step_begin(step)

    def on_before_optimizer_step(self) -> None:
        if self.pruner.done:
            self.pruner.on_before_optimizer_step()  # masks the local gradient shards
            return
        with self._full(with_grads=True):
            self.pruner.on_before_optimizer_step()

    def on_after_optimizer_step(self) -> None:
        p = self.pruner
        event = not p.done and (self._criterion_after
                                or p.schedule.sparsity_for_step(p.step) is not None)
        if not event:
            p.on_after_optimizer_step()  # masks the local weight shards
            return
        with self._full():
            p.on_after_optimizer_step()

    def load_state_dict(self, state: dict) -> None:
        with self._full():
            self.pruner.load_state_dict(state)


class FSDPSparseTrainer(_FSDPDriver):
    """A :class:`~gradprune.SparseTrainer` for a model wrapped in ``FullyShardedDataParallel(...,
    use_orig_params=True)``; ``step()`` replaces ``optimizer.step()`` as usual.

    The trainer is built on ``model.module`` with full parameters (initial masks written back to the
    shards). A connectivity update runs with parameters and gradients unsharded (drop by the whole
    weights, grow by the whole averaged gradients, every rank alike); every other step masks the
    local gradient shards, steps the optimizer on them and masks the local weight and optimizer-state
    shards, with no communication. Rules that read the optimizer's momentum (``grow="momentum"``,
    ``redistribute="momentum"``, SNFS) and ``dense_gradients=True`` are not supported: FSDP keeps
    optimizer state sharded. No AMP ``scaler`` (use FSDP's ``ShardedGradScaler`` yourself and
    unscale before ``step()``). Create the optimizer after wrapping, from ``model.parameters()``.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, config: Any = None, **fields):
        super().__init__(model)
        from ..sparse_training import SparseConfig, SparseTrainer

        cfg = config
        if cfg is None:
            cfg = SparseConfig.from_dict(fields)
        elif fields:
            cfg = SparseConfig.from_dict({**cfg.to_dict(), **fields})
        if isinstance(cfg, SparseConfig):
            bad = [k for k in ("grow", "redistribute") if getattr(cfg, k) == "momentum"]
            if cfg.dense_gradients:
                bad.append("dense_gradients")
            if bad:
                raise ValueError(
                    f"FSDPSparseTrainer does not support {bad}: FSDP shards the optimizer state "
                    "(momentum) that these rules read; use DDP, or gradient growth (RigL)")
        with self._full():
            self.trainer = SparseTrainer(model.module, optimizer, cfg)
        self._inner = self.trainer
        self._attach(self.trainer.masks)

    def step(self) -> bool:
        """Replaces ``optimizer.step()``; True when this step updated connectivity."""
        if self.trainer.is_update_step():
            with self._full(with_grads=True):
                return self.trainer.step()
        return self.trainer.step()

    def load_state_dict(self, state: dict) -> None:
        with self._full():
            self.trainer.load_state_dict(state)
