"""The gradient-statistics engine.

:func:`stream_gradients` runs ``loss_fn(model, batch)`` and ``backward()`` over at most ``n_batches``
batches of any iterable, calling ``on_batch()`` after each backward, while only the given
parameters receive gradients. The user's model comes back as it was: training/eval mode,
``requires_grad`` flags and any ``.grad`` it held are restored, even when a batch fails.

:class:`GradientStatistics` accumulates per-parameter running statistics of those gradients in
place, on the parameters' device, in O(parameters) memory: ``mean`` (signed), ``mean_abs``,
``mean_sq`` and ``mean_wg`` (the mean of ``w * g``).

Example:
    >>> import torch, torch.nn as nn
    >>> from gradprune.scores import GradientStatistics, stream_gradients
    >>> model = nn.Linear(3, 1)
    >>> data = [torch.randn(4, 3) for _ in range(5)]
    >>> stats = GradientStatistics({"weight": model.weight}, ("mean", "mean_sq"))
    >>> stream_gradients(model, data, lambda m, x: m(x).pow(2).mean(),
    ...                  {"weight": model.weight}, on_batch=stats.update)
    5
    >>> stats.count, tuple(stats.get("mean_sq")["weight"].shape)
    (5, (1, 3))
"""

from __future__ import annotations

import math
import operator
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from .._checks import check_int, check_optional_bool
from .._progress import progress
from .._distributed import all_reduce_gradients, resolve_process_group, sum_over_ranks

__all__ = ["GradientStatistics", "stream_gradients", "scoring_context", "STATISTICS"]

STATISTICS = ("mean", "mean_abs", "mean_sq", "mean_wg")


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class GradientStatistics:
    """Running means of gradient statistics per parameter, updated in place.

    Args:
        params: ``{name: parameter}``.
        stats: any of ``"mean"``, ``"mean_abs"``, ``"mean_sq"``, ``"mean_wg"``.
    """

    def __init__(self, params: Mapping[str, torch.Tensor], stats: Iterable[str] = ("mean",)):
        stats = tuple(stats)
        for s in stats:
            if s not in STATISTICS:
                raise ValueError(f"stats must be among {', '.join(STATISTICS)}; got {s!r}")
        self.params = dict(params)
        self.stats = stats
        self.count = 0
        self._sums = {
            s: {n: torch.zeros_like(p, dtype=_acc_dtype(p), memory_format=torch.contiguous_format)
                for n, p in self.params.items()}
            for s in stats
        }

    @torch.no_grad()
    def update(self, grads: Mapping[str, torch.Tensor] | None = None) -> None:
        """Add one gradient per parameter (``grads`` or each parameter's ``.grad``)."""
        for name, p in self.params.items():
            g = grads[name] if grads is not None else p.grad
            if g is None:
                continue  # an unused parameter contributes a zero gradient
            g = g.to(_acc_dtype(p))
            for s in self.stats:
                acc = self._sums[s][name]
                if s == "mean":
                    acc.add_(g)
                elif s == "mean_abs":
                    acc.add_(g.abs())
                elif s == "mean_sq":
                    acc.addcmul_(g, g)
                else:
                    acc.addcmul_(p.detach().to(acc.dtype), g)
        self.count += 1

    def get(self, stat: str) -> dict[str, torch.Tensor]:
        """``{name: running mean}`` of one statistic (a new tensor per parameter)."""
        if stat not in self.stats:
            raise ValueError(f"stat must be one of {', '.join(self.stats)}; got {stat!r}")
        if self.count == 0:
            raise RuntimeError("GradientStatistics has seen no gradients yet")
        return {n: s / self.count for n, s in self._sums[stat].items()}

    def state_dict(self) -> dict:
        return {"count": self.count, "sums": {s: dict(d) for s, d in self._sums.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.count = int(state["count"])
        for s, d in state["sums"].items():
            for n, t in d.items():
                self._sums[s][n].copy_(t)


@contextmanager
def scoring_context(model: nn.Module, params: Mapping[str, torch.Tensor]):
    """Eval mode, gradients only for ``params``, user grads stashed; all restored on exit."""
    was_training = model.training
    wanted = {id(p) for p in params.values()}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    stashed = [(p, p.grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(id(p) in wanted)
            p.grad = None
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for p, g in stashed:
            p.grad = g
        model.train(was_training)


def stream_gradients(
    model: nn.Module,
    data: Iterable,
    loss_fn: Callable,
    params: Mapping[str, torch.Tensor],
    *,
    n_batches: int | None = None,
    on_batch: Callable[[], None] | None = None,
    show_progress: bool | None = None,
    desc: str = "scoring",
    process_group=None,
) -> int:
    """Backpropagate ``loss_fn(model, batch)`` for at most ``n_batches`` batches of ``data``.

    Only ``params`` get gradients; after each backward ``on_batch()`` is called while their
    ``.grad`` holds that batch's gradient. Returns the number of batches used. The model is scored
    in eval mode (no dropout, BatchNorm statistics untouched) and restored afterwards.

    Distributed (a ``DistributedDataParallel`` model, or ``process_group=``; see
    :func:`gradprune.integrations.distributed.resolve_process_group`): every rank passes its own
    shard of each batch; after each backward the gradients of ``params`` are averaged over the ranks
    (as DDP does) before ``on_batch()``, so every rank sees the gradient of the global batch. A DDP
    model's inner ``.module`` is what ``loss_fn`` receives. Scoring stops, on every rank, when any
    rank runs out of batches; the count returned is the same everywhere.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(model, batch), got {type(loss_fn).__name__}")
    check_int("n_batches", n_batches, min_value=1, allow_none=True)
    check_optional_bool("show_progress", show_progress)
    iterator = check_data(data, n_batches)
    total = n_batches
    if total is None and hasattr(data, "__len__"):
        total = len(data)
    elif total is not None and hasattr(data, "__len__"):
        total = min(total, len(data))

    run_model, group = resolve_process_group(model, process_group)
    if group is not None and torch.distributed.get_rank(group) != 0:
        show_progress = False
    seen = 0
    with scoring_context(model, params):
        bar = progress(total=total, desc=desc, enable=show_progress)
        try:
            if group is not None:
                iterator = _agreed_batches(iterator, run_model, loss_fn, params, group)
            for item in iterator:  # a batch; distributed: this rank's loss on its batch
                for p in params.values():
                    p.grad = None
                loss = loss_fn(run_model, item) if group is None else item
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    raise TypeError(
                        f"loss_fn must return a scalar tensor, got "
                        f"{type(loss).__name__ if not isinstance(loss, torch.Tensor) else tuple(loss.shape)}"
                    )
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise ValueError(f"loss_fn returned a non-finite loss ({value}) on batch {seen}")
                if not loss.requires_grad or loss.grad_fn is None:
                    raise ValueError(_NOT_CONNECTED)
                loss.backward()
                if seen == 0 and params and all(p.grad is None for p in params.values()):
                    raise ValueError(_NOT_CONNECTED)
                if group is not None:
                    all_reduce_gradients(params, group)
                if on_batch is not None:
                    on_batch()
                seen += 1
                bar.update(1)
                if n_batches is not None and seen >= n_batches:
                    break  # before drawing another batch from the caller's iterator
        finally:
            bar.close()
            for p in params.values():
                p.grad = None
    if seen == 0:
        raise ValueError("data yielded no batches")
    return seen


_NOT_CONNECTED = ("loss_fn's result does not depend on the model's parameters (no gradient reaches "
                  "them): compute the loss from the model's output, e.g. "
                  "loss_fn(model, batch) = F.cross_entropy(model(x), y), without .detach(), "
                  ".item() or torch.no_grad()")


def check_data(data, n_batches) -> Iterator:
    """``iter(data)``, refusing ``None``, non-iterables and an iterator with no length (nor length
    hint: a generator, ``itertools.cycle``) when ``n_batches`` is ``None``: it may never end."""
    if data is None:
        raise ValueError("data must be an iterable of batches, got None")
    try:
        iterator = iter(data)
    except TypeError:
        raise TypeError(f"data must be an iterable of batches, got {type(data).__name__}") from None
    if n_batches is None and iterator is data and operator.length_hint(data, -1) < 0:
        raise ValueError(
            f"data is an iterator ({type(data).__name__}) with no length and n_batches is None: "
            "it may never end; pass n_batches= (how many batches to score on), or a list or "
            "DataLoader")
    return iterator


def _agreed_batches(iterator, model, loss_fn, params, group):
    """Yield this rank's loss for each batch, while every rank of ``group`` has a batch with a
    finite loss (one small all-reduce per batch, so no rank waits forever on another)."""
    device = next(iter(params.values())).device if params else None
    seen = 0
    while True:
        batch = next(iterator, _END)
        loss, bad = None, 0
        if batch is not _END:
            loss = loss_fn(model, batch)
            if isinstance(loss, torch.Tensor) and loss.numel() == 1:
                bad = int(not math.isfinite(float(loss.detach())))
        missing, nonfinite = sum_over_ranks([int(batch is _END), bad], group, device)
        if nonfinite:
            raise ValueError(f"loss_fn returned a non-finite loss on batch {seen} on {nonfinite} rank(s)")
        if missing:
            return
        seen += 1
        yield loss


_END = object()
