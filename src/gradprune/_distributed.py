"""Low-level ``torch.distributed`` helpers used by the scoring layers (layer 0: no gradprune
imports). The user-facing API is :mod:`gradprune.integrations.distributed`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Iterable

import torch
from torch import nn

__all__ = ["is_ddp", "resolve_process_group", "sum_over_ranks", "all_reduce_tensors", "is_dtensor",
           "local", "RowShard", "all_reduce_ints", "all_reduce_floats", "rank_in",
           "all_reduce_gradients", "sharded_group", "meta_structure", "to_meta"]

_BUCKET_BYTES = 25 * 1024 * 1024  # DDP's default bucket size


def _dist():
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this build of PyTorch")
    return dist


def _initialized_dist():
    dist = _dist()
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized: call "
                           "torch.distributed.init_process_group(...) first (torchrun sets it up)")
    return dist


# ---------------------------------------------------------------------------------------------
# process groups

def is_ddp(model: Any) -> bool:
    """Whether ``model`` is a ``torch.nn.parallel.DistributedDataParallel``."""
    try:
        from torch.nn.parallel import DistributedDataParallel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, DistributedDataParallel)


def resolve_process_group(model: nn.Module, process_group: Any = None):
    """``(module to run forward and backward on, process group or None)`` for one-shot scoring.

    - a ``DistributedDataParallel`` model: its inner ``.module`` (DDP's own gradient all-reduce and
      buffer broadcasts stay out of scoring; gradprune reduces explicitly) and ``process_group``, by
      default the DDP model's own group;
    - a plain module with ``process_group`` (a ``torch.distributed.ProcessGroup``, such as
      ``torch.distributed.group.WORLD``): the module and that group;
    - a plain module without: the module and ``None`` (single process; nothing is communicated).
    """
    if process_group is not None:  # the type first: a wrong argument is a TypeError everywhere
        dist = _dist()
        if not isinstance(process_group, dist.ProcessGroup):
            raise TypeError("process_group must be a torch.distributed.ProcessGroup (e.g. "
                            f"torch.distributed.group.WORLD), got {type(process_group).__name__}")
    if is_ddp(model):
        return model.module, (process_group if process_group is not None else model.process_group)
    if process_group is None:
        return model, None
    _initialized_dist()
    return model, process_group


def sum_over_ranks(values: list[int], group: Any, device: torch.device | None = None) -> list[int]:
    """The element-wise sum over the ranks of ``group`` of a short list of integers (one small
    ``all_reduce``; ``device`` must suit the backend: CUDA for NCCL)."""
    dist = _dist()
    t = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return [int(v) for v in t.tolist()]


@torch.no_grad()
def all_reduce_tensors(tensors: Iterable[torch.Tensor], group: Any, *, average: bool = False,
                       bucket_bytes: int = _BUCKET_BYTES) -> None:
    """Sum (``average=True``: mean) each tensor over the ranks of ``group``, in place.

    Tensors are flattened into buckets of at most ``bucket_bytes`` (per device and dtype), one
    ``all_reduce`` per bucket, as DDP does.
    """
    dist = _dist()
    tensors = list(tensors)
    world = dist.get_world_size(group)
    if world == 1 or not tensors:
        return
    buckets: list[list[torch.Tensor]] = []
    open_bucket: dict[tuple, tuple[list, int]] = {}
    for t in tensors:
        key = (t.device, t.dtype)
        bucket, size = open_bucket.get(key, (None, 0))
        nbytes = t.numel() * t.element_size()
        if bucket is None or (size + nbytes > bucket_bytes and bucket):
            bucket, size = [], 0
            buckets.append(bucket)
        bucket.append(t)
        open_bucket[key] = (bucket, size + nbytes)
    for bucket in buckets:
        flat = torch.cat([t.reshape(-1) for t in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        if average:
            flat.div_(world)
        offset = 0
        for t in bucket:
            k = t.numel()
            t.copy_(flat[offset:offset + k].view_as(t))
            offset += k


@torch.no_grad()
def all_reduce_gradients(params: Mapping[str, torch.Tensor] | Iterable[torch.Tensor], group: Any, *,
                         average: bool = True, bucket_bytes: int = _BUCKET_BYTES) -> None:
    """Average (``average=False``: sum) every parameter's ``.grad`` over the ranks of ``group``.

    A parameter without a gradient on this rank takes part with zeros and receives the reduced
    gradient, so every rank ends with the same ``.grad`` for every parameter.
    """
    ps = list(params.values()) if isinstance(params, Mapping) else list(params)
    grads, seen = [], set()
    for p in ps:
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    all_reduce_tensors(grads, group, average=average, bucket_bytes=bucket_bytes)




# ---------------------------------------------------------------------------------------------
# FSDP2 (``fully_shard``): DTensor parameters sharded on dim 0

def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (an FSDP2 parameter, gradient or
    optimizer state)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(t, DTensor)


def local(t: Any) -> Any:
    """This rank's shard of a DTensor (a view of its storage: in-place edits reach the DTensor);
    anything else unchanged."""
    if is_dtensor(t):
        with torch.no_grad():
            return t.to_local()
    return t


class RowShard:
    """Where this rank's shard of a dim-0-sharded DTensor lies: rows ``start:stop`` of a tensor of
    ``shape`` (``torch.chunk`` rule, as FSDP2 shards), over process group ``group``. ``key``
    identifies the placement (mesh and placements), so a change of placement is detected."""

    __slots__ = ("name", "shape", "start", "stop", "chunk", "group", "mesh", "placements", "key")

    def __init__(self, name: str, t: Any):
        from torch.distributed.tensor import Replicate, Shard

        mesh, placements = t.device_mesh, tuple(t.placements)
        self.name, self.shape, self.mesh, self.placements = name, tuple(t.shape), mesh, placements
        self.key = (id(mesh), placements, self.shape)
        sharded = [(i, p) for i, p in enumerate(placements) if not isinstance(p, Replicate)]
        if len(sharded) > 1 or (sharded and (not isinstance(sharded[0][1], Shard) or sharded[0][1].dim != 0)):
            raise ValueError(f"parameter {name!r} is a DTensor with placements {placements}: gradprune "
                             "supports DTensors sharded on dim 0 over one mesh dimension (FSDP2's "
                             "fully_shard) or replicated")
        rows = self.shape[0] if self.shape else 1
        if not sharded:
            self.group, self.start, self.stop, self.chunk = None, 0, rows, rows
            return
        dim = sharded[0][0]
        self.group = mesh.get_group(dim)
        world, rank = mesh.size(dim), mesh.get_local_rank(dim)
        self.chunk = chunk = -(-rows // world)  # rows per rank (the last ones may hold fewer)
        self.start, self.stop = min(rows, rank * chunk), min(rows, (rank + 1) * chunk)

    @property
    def sharded(self) -> bool:
        return self.group is not None

    def to_dtensor(self, local_tensor: torch.Tensor):
        """``local_tensor`` (this rank's rows) as a DTensor placed like the parameter."""
        from torch.distributed.tensor import DTensor

        stride = torch.empty(self.shape, device="meta").stride()
        return DTensor.from_local(local_tensor, self.mesh, self.placements, run_check=False,
                                  shape=torch.Size(self.shape), stride=stride)


def all_reduce_ints(values: list[int], group: Any, device: Any = None, op: str = "sum") -> list[int]:
    """Element-wise sum (``op="max"``: maximum) of a short list of ints over ``group``."""
    dist = _dist()
    t = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=group)
    return [int(v) for v in t.tolist()]


def all_reduce_floats(values: list[float], group: Any, device: Any = None, op: str = "max") -> list[float]:
    """Element-wise maximum (``op="min"``, ``"sum"``) of a short list of floats over ``group``."""
    dist = _dist()
    ops = {"max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN, "sum": dist.ReduceOp.SUM}
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=ops[op], group=group)
    return [float(v) for v in t.tolist()]


def rank_in(group: Any) -> tuple[int, int]:
    """``(rank, world size)`` of this process in ``group``."""
    dist = _dist()
    return dist.get_rank(group), dist.get_world_size(group)


def sharded_group(model: nn.Module) -> Any:
    """The process group over which ``model``'s DTensor parameters are sharded on dim 0 (FSDP2's
    ``fully_shard``), or ``None`` when no parameter is sharded. ``ValueError`` when they are
    sharded over different groups."""
    groups: dict = {}
    for name, p in model.named_parameters():
        if is_dtensor(p):
            shard = RowShard(name, p)
            if shard.sharded:
                groups.setdefault(id(shard.group), shard.group)
    if len(groups) > 1:
        raise ValueError("the model's parameters are sharded over more than one process group: "
                         "gradprune supports one data-parallel mesh dimension (FSDP2's fully_shard)")
    return next(iter(groups.values()), None)


_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
               "_backward_pre_hooks", "_state_dict_hooks", "_state_dict_pre_hooks",
               "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def _plain_class(module: nn.Module) -> type:
    """The module's own class: ``fully_shard`` swaps in a subclass ``FSDP<cls>(FSDPModule, cls)``."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return type(module)
    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


def meta_structure(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s structure on the meta device: the same module tree, names and classes
    (FSDP2's wrapper classes and hooks removed), every parameter and buffer a meta tensor of the
    *global* shape (a DTensor's whole shape), tied parameters still tied. No data is copied or
    gathered: it is for tracing and shape propagation (``gp.search`` on a ``fully_shard``-ed
    model), run on meta inputs (:func:`to_meta`)."""
    memo: dict = {}

    def meta(t):
        if t is None:
            return None
        if id(t) not in memo:
            m = torch.empty(tuple(t.shape), dtype=t.dtype, device="meta")
            memo[id(t)] = nn.Parameter(m, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else m
        return memo[id(t)]

    def copy(mod: nn.Module) -> nn.Module:
        if id(mod) in memo:
            return memo[id(mod)]
        new = object.__new__(_plain_class(mod))
        state = dict(mod.__dict__)
        for key in _HOOK_DICTS:
            if key in state:
                state[key] = type(state[key])()
        state["_parameters"] = {n: meta(p) for n, p in mod._parameters.items()}
        state["_buffers"] = {n: meta(b) for n, b in mod._buffers.items()}
        memo[id(mod)] = new
        state["_modules"] = {n: None if c is None else copy(c) for n, c in mod._modules.items()}
        new.__dict__.update(state)
        return new

    return copy(model)


def to_meta(x: Any) -> Any:
    """Tensors (in tuples, lists and dicts) as meta tensors of the same shape and dtype."""
    if isinstance(x, torch.Tensor):
        return torch.empty(tuple(x.shape), dtype=x.dtype, device="meta")
    if isinstance(x, (tuple, list)):
        return type(x)(to_meta(v) for v in x)
    if isinstance(x, Mapping):
        return {k: to_meta(v) for k, v in x.items()}
    return x
