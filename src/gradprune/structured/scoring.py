"""Unit scores of every group: gate gradients (gradnas, Taylor, Michel et al.) and magnitudes.

:func:`gate_statistics` attaches all-ones gates (:class:`~gradprune.structured.Gates`) and streams
at most ``n_batches`` batches through ``loss_fn(model, batch)`` with
:func:`gradprune.scores.stream_gradients` (eval mode, weight gradients off: only the gates need
grad). With ``g_b`` the gradient of batch ``b``'s loss with respect to a unit's gate and ``g_i`` the
gradient of sample ``i``'s loss (``batch size x`` the gate's row for sample ``i``, exact for a loss
that is the mean over the batch's samples, in eval mode where samples do not interact):

- ``gradnas``: ``mean_b g_b**2`` (ModelOpt sums; ``sum`` and ``count`` are reported too);
- ``gradnas_per_sample``: ``mean_i g_i**2``, the empirical Fisher of the gate;
- ``taylor``: ``|mean_b g_b|``, the first-order estimate of the loss change when the unit goes;
- ``michel``: ``mean_i |g_i|`` L2-normalised within each group (Michel et al., 2019).

:func:`activation_scores` gives Minitron's activation importance: with ``x_{t,u}`` the slice of
unit ``u`` in the input of the group's consumers (the ``o_proj`` input of a head / KV group, the
``down_proj`` input of an MLP neuron) at token ``t``, the score is ``mean_t ||x_{t,u}||_2`` over
every token of every batch (for a single neuron, the mean ``|activation|``). No gradient is taken.

:func:`magnitude_scores` gives the L1 or L2 norm of each unit's producer weights (output rows of
every producer of the group, together).

:data:`WIDTH_SCORES` registers every width score by name (the ``method`` of
:func:`~gradprune.structured.search`), with its formula and what it needs; :func:`width_score`
looks one up (an unknown name raises ``ValueError`` listing the known ones).

Example:
    >>> import torch, torch.nn as nn
    >>> from gradprune.structured import find_groups
    >>> from gradprune.structured.scoring import gate_statistics
    >>> model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    >>> data = [(torch.randn(5, 4), torch.randint(0, 2, (5,))) for _ in range(3)]
    >>> loss_fn = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])
    >>> analysis = find_groups(model, data[0][0])
    >>> stats = gate_statistics(analysis, data, loss_fn, n_batches=2)
    >>> stats.count, stats.n_samples, tuple(stats.score("gradnas")[0].shape)
    (2, 10, (6,))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from .._distributed import RowShard, all_reduce_tensors, is_dtensor, local
from ..scores.stats import stream_gradients
from .gates import Gates
from .groups import Analysis

__all__ = ["GateStatistics", "gate_statistics", "magnitude_scores", "activation_scores",
           "GRADIENT_SCORES", "WidthScore", "WIDTH_SCORES", "width_score", "per_kind_scale"]

GRADIENT_SCORES = ("gradnas", "gradnas_per_sample", "taylor", "michel")


@dataclass(frozen=True)
class WidthScore:
    """A registered width score: ``source`` is ``"gates"`` (gate gradients; ``statistic`` names the
    :meth:`GateStatistics.score` kind), ``"activations"`` (:func:`activation_scores`),
    ``"weights"`` (:func:`magnitude_scores`) or ``"measured"`` (fastnas: evaluations of
    ``score_func``); ``formula`` is the unit score (``g_b``: gate gradient of batch ``b``'s loss,
    ``g_i``: of sample ``i``'s loss, ``x_{t,u}``: unit ``u``'s consumer input at token ``t``).

    ``calibrated``: whether a unit's score is on one scale for every kind of group (a loss
    sensitivity: gate gradients, or a measured score change), so one global threshold can compare
    a KV group with an MLP neuron as they are. An uncalibrated score (an activation or weight
    norm, whose size depends on the kind of unit) is divided by its kind's scale first, see
    :func:`per_kind_scale`."""

    name: str
    source: str
    formula: str
    statistic: str | None = None
    calibrated: bool = True

    @property
    def needs_data(self) -> bool:
        return self.source in ("gates", "activations")


WIDTH_SCORES = {s.name: s for s in (
    WidthScore("gradnas", "gates", "mean_b g_b^2 (ModelOpt's gradnas; per_sample=True: mean_i g_i^2)",
               "gradnas"),
    WidthScore("taylor", "gates", "|mean_b g_b| = |mean_b sum_(w in unit's producer rows) w * dL_b/dw| "
               "(first-order Taylor loss change when the unit goes; the gate form equals the weight "
               "form for a bias-free producer)", "taylor"),
    WidthScore("fisher", "gates", "mean_i g_i^2 over samples (per-sample empirical Fisher of the gate)",
               "gradnas_per_sample"),
    WidthScore("michel", "gates", "mean_i |g_i|, L2-normalised within the group (Michel et al., 2019)",
               "michel"),
    WidthScore("activation", "activations", "mean_t ||x_{t,u}||_2 over calibration tokens "
               "(Minitron's activation importance; a neuron's mean |activation|)", calibrated=False),
    WidthScore("magnitude", "weights", "L2 (or L1) norm of the unit's producer weights", calibrated=False),
    WidthScore("fastnas", "measured", "score_func(model) - score_func(model without the units)"),
)}


def width_score(name) -> WidthScore:
    """The registered :class:`WidthScore` called ``name``.

    Example:
        >>> width_score("fisher").statistic
        'gradnas_per_sample'
        >>> width_score("taylr")
        Traceback (most recent call last):
        ...
        ValueError: method must be one of gradnas, taylor, fisher, michel, activation, magnitude, fastnas; got 'taylr'
    """
    if not isinstance(name, str):
        raise TypeError(f"method must be str, got {type(name).__name__}")
    if name not in WIDTH_SCORES:
        raise ValueError(f"method must be one of {', '.join(WIDTH_SCORES)}; got {name!r}")
    return WIDTH_SCORES[name]


def per_kind_scale(analysis: Analysis, scores: dict, groups) -> dict:
    """``{kind: scale}`` that puts uncalibrated scores of different kinds of groups on one scale.

    A group's kind is its :attr:`~gradprune.structured.groups.Group.unit` (``"heads"`` for
    attention heads / KV groups, ``"channels"`` for neurons and channels). The scale of a kind
    is the mean, over its groups in ``groups`` (the prunable ones), of a group's total score:
    dividing by it gives every kind a mean group total of 1, so a global threshold ``t`` removes
    about the same fraction of each kind's score mass, whatever the raw size of its scores (an
    activation norm over a KV group's 256 channels against one neuron's ``|activation|``). Ranks
    within a kind, and the result of a model with one kind, do not change. A kind whose scores
    are all 0 keeps scale 1.

    Example:
        >>> import torch, torch.nn as nn
        >>> from gradprune.structured import find_groups
        >>> model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
        >>> analysis = find_groups(model, torch.randn(1, 4))
        >>> per_kind_scale(analysis, {0: torch.arange(6.0)}, [0])
        {'channels': 15.0}
    """
    totals: dict = {}
    for gi in groups:
        totals.setdefault(analysis.groups[gi].unit, []).append(float(scores[gi].to(torch.float64).sum()))
    return {kind: (sum(v) / len(v)) if sum(v) > 0 else 1.0 for kind, v in totals.items()}


class GateStatistics:
    """Accumulated gate gradients per group: sums over batches and over samples."""

    def __init__(self, analysis: Analysis):
        sizes = [g.size for g in analysis.groups]
        z = lambda: {gi: torch.zeros(n, dtype=torch.float64) for gi, n in enumerate(sizes)}  # noqa: E731
        self.sum_grad, self.sum_sq, self.sum_abs = z(), z(), z()
        self.sum_sample_sq, self.sum_sample_abs = z(), z()
        self.count = 0
        self.n_samples = 0
        self.per_sample_ok = True

    def update(self, grads: dict) -> None:
        n = None
        for gi, (batch, per) in grads.items():
            b = batch.to(torch.float64)
            self.sum_grad[gi] += b
            self.sum_sq[gi] += b * b
            self.sum_abs[gi] += b.abs()
            if per is None:
                self.per_sample_ok = False
                continue
            n = per.shape[0]
            s = per.to(torch.float64) * n  # per-sample gradient of a mean-reduced loss
            self.sum_sample_sq[gi] += (s * s).sum(0)
            self.sum_sample_abs[gi] += s.abs().sum(0)
        self.count += 1
        self.n_samples += n or 0

    def score(self, kind: str) -> dict:
        """``{group index: scores}`` for ``kind`` in :data:`GRADIENT_SCORES`."""
        if self.count == 0:
            raise RuntimeError("no batch was scored")
        if kind == "gradnas":
            return {gi: s / self.count for gi, s in self.sum_sq.items()}
        if kind == "taylor":
            return {gi: (s / self.count).abs() for gi, s in self.sum_grad.items()}
        if kind in ("gradnas_per_sample", "michel"):
            if not self.per_sample_ok or self.n_samples == 0:
                raise ValueError(f"{kind} needs per-sample gate gradients: every gated layer must "
                                 "see the batch on dim 0 with the same size")
            if kind == "gradnas_per_sample":
                return {gi: s / self.n_samples for gi, s in self.sum_sample_sq.items()}
            out = {}
            for gi, s in self.sum_sample_abs.items():
                m = s / self.n_samples
                norm = torch.linalg.vector_norm(m)
                out[gi] = m / norm if norm > 0 else m
            return out
        raise ValueError(f"score must be one of {', '.join(GRADIENT_SCORES)}; got {kind!r}")

    def summary(self) -> dict:
        """The raw sums, for reports: gradnas ``sum`` (of squared batch gradients) and ``count``."""
        return {"count": self.count, "n_samples": self.n_samples,
                "gradnas_sum": {gi: s.clone() for gi, s in self.sum_sq.items()}}


def gate_statistics(analysis: Analysis, data: Iterable, loss_fn: Callable, *, n_batches: int = 128,
                    show_progress: bool | None = None, process_group=None,
                    gradient_checkpointing: bool = False) -> GateStatistics:
    """Stream at most ``n_batches`` batches with all-ones gates attached and accumulate the gate
    gradients of every group.

    ``gradient_checkpointing=True`` recomputes each decoder layer's activations in the backward
    pass (:func:`~gradprune.structured.checkpointing.checkpointed_layers`): the same scores, with
    only the layers' inputs kept between forward and backward.

    With ``process_group`` every rank feeds its shard of each batch: the batch gate gradients are
    averaged over the ranks before they are squared (the gradient of the global batch's mean
    loss), and the per-sample sums and sample counts are added up at the end.
    """
    stats = GateStatistics(analysis)
    if not analysis.groups:
        return stats
    gates = Gates(analysis)

    def on_batch():
        grads = gates.collect()
        if process_group is not None:
            from .._distributed import all_reduce_tensors

            order = sorted(grads)
            all_reduce_tensors([grads[gi][0] for gi in order], process_group, average=True)
        stats.update(grads)

    from contextlib import nullcontext

    from .checkpointing import checkpointed_layers

    with gates, (checkpointed_layers(analysis.model) if gradient_checkpointing else nullcontext()):
        stream_gradients(analysis.model, data, loss_fn, {}, n_batches=n_batches, on_batch=on_batch,
                         show_progress=show_progress, desc="gate scores", process_group=process_group)
    if process_group is not None:
        from .._distributed import all_reduce_tensors, sum_over_ranks

        keys = sorted(stats.sum_sample_sq)
        all_reduce_tensors([stats.sum_sample_sq[k] for k in keys] + [stats.sum_sample_abs[k] for k in keys],
                           process_group)
        stats.n_samples, ok = sum_over_ranks([stats.n_samples, int(stats.per_sample_ok)], process_group)
        stats.per_sample_ok = ok == torch.distributed.get_world_size(process_group)
    return stats


def magnitude_scores(analysis: Analysis, norm: str = "l2", side: str = "out") -> dict:
    """``{group index: per-unit weight norm}`` (``norm``: l1 or l2).

    ``side="out"``: the producers' output rows; ``side="in"``: the consumers' input columns
    (how much the next layers use a unit; ModelOpt's channel importance, meaningful behind a
    BatchNorm, which rescales a producer's outputs whatever their norm); a group without
    consumers falls back to its producers. Attention heads use their handler's norm either way.
    """
    if norm not in ("l1", "l2"):
        raise ValueError(f"norm must be one of l1, l2; got {norm!r}")
    if side not in ("out", "in"):
        raise ValueError(f"side must be one of out, in; got {side!r}")
    modules = dict(analysis.model.named_modules())
    out, parts, group, by_handler = {}, {}, None, set()
    with torch.no_grad():
        for gi, g in enumerate(analysis.groups):
            if g.handler is not None:
                m = g.handler.magnitude(modules, norm)  # a handler's own norm sums each rank's rows
                if m is not None:
                    out[gi] = m
                    by_handler.add(gi)
                    continue
            role = side if any(s.role == side for s in g.slices) else "out"
            acc = torch.zeros(g.size, dtype=torch.float64)
            for s in g.slices:
                if s.role != role:
                    continue
                w = modules[s.module].weight
                shard = _row_shard(f"{s.module}.weight", w)
                if shard is not None:  # this rank's rows: partial sums, added over the ranks below
                    part = parts.setdefault(gi, torch.zeros(g.size, dtype=torch.float64))
                    _add_local(part, s, local(w.detach()), shard.start, norm)
                    group = shard.group
                    continue
                w = w.detach().to(torch.float64).transpose(0, s.dim)
                w = w[s.offset:s.offset + s.size * s.inner].reshape(s.size, -1)
                acc += w.abs().sum(1) if norm == "l1" else (w * w).sum(1)
            out[gi] = acc
        if parts:  # FSDP2: one all-reduce of the per-unit sums of every rank's rows (never a weight)
            all_reduce_tensors([parts[gi] for gi in sorted(parts)], group)
            for gi, part in parts.items():
                out[gi] += part
    return {gi: acc if norm == "l1" or gi in by_handler else acc.sqrt() for gi, acc in out.items()}


def _row_shard(name: str, w):
    """The :class:`RowShard` of a dim-0-sharded DTensor ``w``, else ``None``."""
    if not is_dtensor(w):
        return None
    shard = RowShard(name, w)
    return shard if shard.sharded else None


def _add_local(acc: torch.Tensor, s, rows: torch.Tensor, start: int, norm: str) -> None:
    """Add to ``acc`` the per-unit L1 (or squared L2) sums of slice ``s`` over ``rows``, this rank's
    rows ``start:start + len(rows)`` of the whole weight."""
    w = rows.to(torch.float64)
    if s.dim == 0:  # units along the sharded dim: the rows of the slice that lie here
        lo = max(start, s.offset)
        hi = min(start + w.shape[0], s.offset + s.size * s.inner)
        if hi <= lo:
            return
        part = w[lo - start:hi - start].reshape(hi - lo, -1)
        per_row = part.abs().sum(1) if norm == "l1" else (part * part).sum(1)
        acc.index_add_(0, torch.div(torch.arange(lo, hi) - s.offset, s.inner, rounding_mode="floor"), per_row)
        return
    w = w.transpose(0, s.dim)[s.offset:s.offset + s.size * s.inner].reshape(s.size, -1)
    acc += w.abs().sum(1) if norm == "l1" else (w * w).sum(1)


def activation_scores(analysis: Analysis, data: Iterable, forward: Callable, *, n_batches: int = 128,
                      show_progress: bool | None = None) -> tuple:
    """Minitron's activation importance of every unit: ``mean_t ||x_{t,u}||_2`` with ``x_{t,u}``
    the channels of unit ``u`` in the input of the group's consumers (``in`` slices; a group
    without consumers uses its producers' outputs) at token ``t`` (every position of every batch
    but the channel dim). ``forward(model, batch)`` runs one batch (a ``loss_fn`` works; its value
    is ignored) in eval mode under ``torch.no_grad()``; at most ``n_batches`` batches are used.
    Returns ``({group index: float64 scores}, batches)``.

    Example:
        >>> import torch, torch.nn as nn
        >>> from gradprune.structured import find_groups
        >>> model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
        >>> x = torch.randn(5, 4)
        >>> scores, n = activation_scores(find_groups(model, x), [(x, None)], lambda m, b: m(b[0]))
        >>> bool(torch.allclose(scores[0], torch.relu(model[0](x)).abs().mean(0).double())), n
        (True, 1)
    """
    import itertools

    from .._modes import preserve_modes
    from .._progress import progress

    model = analysis.model
    modules = dict(model.named_modules())
    sums = {gi: torch.zeros(g.size, dtype=torch.float64) for gi, g in enumerate(analysis.groups)}
    counts = {gi: 0 for gi in sums}
    sites: dict = {}  # module name -> [(group index, slice, is_input)]
    for gi, g in enumerate(analysis.groups):
        role = "in" if any(s.role == "in" for s in g.slices) else "out"
        for s in g.slices:
            if s.role == role:
                sites.setdefault(s.module, []).append((gi, s, role == "in"))

    def record(name, tensor, want_input):
        mod = modules[name]
        cdim = 1 if isinstance(mod, nn.modules.conv._ConvNd) else -1
        x = tensor.detach().movedim(cdim, -1)
        x = x.reshape(-1, x.shape[-1]).to(torch.float64)
        sq: dict = {}  # slices of one group in one module: squares added before the root
        for gi, s, is_input in sites[name]:
            if is_input != want_input:
                continue
            lo, hi = s.index_range()
            part = x[:, lo:hi].reshape(x.shape[0], s.size, s.inner).pow(2).sum(-1)
            sq[gi] = part if gi not in sq else sq[gi] + part
        for gi, v in sq.items():
            sums[gi] += v.sqrt().sum(0).cpu()
            counts[gi] += x.shape[0]

    handles = []
    for name, entries in sites.items():
        if any(e[2] for e in entries):
            handles.append(modules[name].register_forward_pre_hook(
                lambda mod, args, name=name: record(name, args[0], True)))
        if any(not e[2] for e in entries):
            handles.append(modules[name].register_forward_hook(
                lambda mod, args, out, name=name: record(name, out, False)))
    batches = 0
    bar = progress(total=None, desc="activation scores", enable=show_progress)
    try:
        with torch.no_grad(), preserve_modes(model):
            model.eval()
            for batch in itertools.islice(iter(data), n_batches):
                forward(model, batch)
                batches += 1
                bar.update(1)
    finally:
        bar.close()
        for h in handles:
            h.remove()
    if batches == 0:
        raise ValueError("data yielded no batches: activation scores need at least one")
    return {gi: sums[gi] / max(counts[gi], 1) for gi in sums}, batches
