"""Low-level ``torch.distributed`` helpers used by the scoring layers (layer 0: no gradprune
imports). The user-facing API is :mod:`gradprune.integrations.distributed`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Iterable

import torch
from torch import nn

__all__ = ["is_ddp", "resolve_process_group", "sum_over_ranks", "all_reduce_tensors",
           "all_reduce_gradients"]

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


