"""Several axes at once: the staged search behind ``search(..., axes=(...))`` with more than one
axis when one of them is ``"layers"``, ``"hidden"`` or ``"experts"``.

The axes are taken in a fixed order, each a *stage*: ``"layers"`` (decoder layers), then
``"hidden"`` (residual channels), then ``"experts"`` (MoE experts), and last the width search of
``"heads"`` / ``"mlp"`` (with neither, every width stays and the last stage only checks the
budget). A stage

1. checks, before anything is scored, that the budget is reachable: the next stages run on the
   copy with the most this axis can remove (one layer kept, the smallest hidden size, one expert
   per MoE block) up to their first score, which stops them;
2. scores its units once, with ``gradnas`` (``(dL/dg)^2`` of a gate on each unit, so the scores
   of every axis are on one scale and add up);
3. builds a candidate copy per amount removed, the least first (the ``k`` lowest-scored layers
   dropped, ``k = 0 .. n - 1``; up to :data:`HIDDEN_CANDIDATES` hidden sizes spread over the
   allowed ones, from the dense size down; ``r`` lowest-scored experts fewer per block, or under
   per-layer counts the lowest-scored over every block) and runs the next stages on each, to the
   same absolute bounds (percentages are of the original model);
4. keeps the candidate whose removed scores, its own plus those the next stages removed, are
   smallest (ties: the one that removes less on this axis). A candidate whose own removed score
   is already at least the best total so far is skipped unsearched: it cannot win, as no score
   is negative.

The result is the width search's :class:`~gradprune.structured.search.SearchResult` on the copy
pruned on every other axis (``found.analysis.model``; ``found.gates()`` gates its widths, and
``found.export()`` is that copy with its widths cut), with ``dropped_layers`` /
``layer_scores``, ``hidden_size`` / ``dense_hidden_size`` / ``hidden_keep`` / ``hidden_scores``
and ``dropped_experts`` / ``expert_scores`` for the axes that ran, ``axes_skipped`` (an axis
with nothing to prune: ``{"experts": "no MoE blocks ..."}``, ``{"hidden": why}``) and the
``dense_*`` counts of the original model. Each candidate scores the data again, so a search over
``L`` layers, ``H`` hidden sizes and ``E`` experts runs up to ``L * H * E`` width searches.

Measured bounds (``latency``, ``decode_latency``): their
:class:`~gradprune.structured.search.LatencyProbe` objects are built once, on the original model,
before anything is scored (a model that cannot decode is refused then), and passed to every width
search, which times its candidates that meet the counted bounds against the original model; so a
candidate of an earlier stage whose best width subnet is still too slow is passed over like one
over a counted bound. ``result.latency_search`` / ``decode_latency_search`` is the measurement of
the winner, with the candidates timed over the whole search; ``result.reference_model`` is the
original model (``result.latency()`` times the export against it).

Example (a dense Qwen2: the ``"experts"`` axis has nothing to remove and says so):
    >>> import gradprune as gp, torch
    >>> from transformers import Qwen2Config, Qwen2ForCausalLM
    >>> _ = torch.manual_seed(0)
    >>> config = Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    ...                      num_attention_heads=2, num_key_value_heads=1)
    >>> model, tokens = Qwen2ForCausalLM(config).eval(), torch.randint(0, 32, (2, 8))
    >>> every = ("heads", "mlp", "hidden", "layers", "experts")
    >>> found = gp.search(model, {"params": "70%"}, [tokens], lambda m, b: m(b, labels=b).loss,
    ...                   example_input=tokens, axes=every, uniform=True, hidden_divisor=8)
    >>> found.axes_skipped["experts"]
    'no MoE blocks (nothing to remove on this axis)'
    >>> small = found.export()
    >>> sum(p.numel() for p in small.parameters()) == found.params <= 0.7 * found.dense_params
    True
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .._checks import check_int

__all__ = ["STAGES", "HIDDEN_CANDIDATES", "COMBINED_CONSTRAINTS", "Candidate", "Stage",
           "staged_search", "removed_score", "best_candidate", "check_reachable"]

logger = logging.getLogger(__name__)

STAGES = ("layers", "hidden", "experts")  # the order the staged search takes them in
HIDDEN_CANDIDATES = 6
COMBINED_CONSTRAINTS = ("params", "flops", "kv_cache", "latency", "decode_latency")


class _Reachable(Exception):
    """Raised by the probe loss: the next stages got past their reachability checks."""


@dataclass
class Candidate:
    """One amount removed on a stage's axis: ``removed`` (the sum of the scores of what goes),
    ``build()`` (the pruned copy) and ``info`` (attributes set on the result if it wins)."""

    removed: float
    build: Callable[[], nn.Module]
    info: dict


@dataclass
class Stage:
    """One axis of a staged search: ``smallest()`` (the copy with the most removed, for the
    reachability check), ``candidates()`` (scores the axis, then yields :class:`Candidate`),
    ``where`` (what the smallest copy keeps, for messages) and ``finish(found)`` (run on the
    winning result; may be ``None``)."""

    axis: str
    smallest: Callable[[], nn.Module]
    candidates: Callable[[], Iterable[Candidate]]
    where: str
    finish: Callable | None = None


def removed_score(found) -> float:
    """The summed scores of everything ``found`` removes: a staged result's total, or a width
    result's removed unit scores."""
    total = getattr(found, "staged_removed", None)
    if total is not None:
        return float(total)
    return sum(float(found.scores[gi].double().sum() - found.scores[gi][keep].double().sum())
               for gi, keep in found.keep.items())


def best_candidate(candidates: Iterable[Candidate], run_next: Callable, what: str):
    """Run ``run_next(copy)`` on every candidate's copy and return ``(candidate, result)`` of the
    one with the smallest removed score (its own plus the result's; ties: the earlier
    candidate); candidates whose next stages cannot meet the budget are passed over.
    ``ValueError`` if none can. Scores are squared gradients (never negative), so a candidate
    whose own removed score already reaches the best total cannot win: it is not built or
    searched (candidates come in increasing amounts removed, so most are cut this way)."""
    best, last_error = None, None
    for cand in candidates:
        if best is not None and cand.removed >= best[0]:
            continue
        try:
            found = run_next(cand.build())
        except ValueError as exc:
            if "no subnet meets" not in str(exc):
                raise
            last_error = exc
            continue
        total = cand.removed + removed_score(found)
        if best is None or total < best[0]:
            best = (total, cand, found)
    if best is None:
        raise ValueError(f"no subnet meets constraints by {what}: {last_error}")
    total, cand, found = best
    found.staged_removed = total
    for key, value in cand.info.items():
        setattr(found, key, value)
    return cand, found


def check_reachable(smallest: nn.Module, run_next: Callable, where: str) -> None:
    """Run the next stages on ``smallest`` with a loss that stops them at their first score;
    their ``no subnet meets`` error is re-raised with ``where`` added."""
    def probe(m, batch):
        raise _Reachable
    try:
        run_next(smallest, probe)
    except _Reachable:
        pass
    except ValueError as exc:
        if "no subnet meets" in str(exc):
            raise ValueError(f"{exc} ({where})") from None
        raise


@dataclass
class _Context:
    data: Any
    example_input: Any
    uniform: bool
    max_batches: int
    show_progress: bool | None
    hidden_divisor: int | None
    gradient_checkpointing: bool


# --------------------------------------------------------------------------------------------
# the stages


def _layers_stage(model: nn.Module, loss_fn, ctx: _Context):
    from .depth import _weight_sharing_copy, decoder_layers, drop_layers, layer_scores

    try:
        _, layers = decoder_layers(model)
    except ValueError as exc:
        return f"no decoder layers found ({exc})"
    n = len(layers)

    def candidates():
        scores, _ = layer_scores(model, ctx.data, loss_fn, "gradnas", ctx.max_batches, ctx.show_progress,
                                 ctx.gradient_checkpointing)
        order = sorted(range(n), key=lambda i: (float(scores[i]), i))  # ties: lower index first
        for k in range(n):
            yield Candidate(float(scores[order[:k]].sum()),
                            lambda k=k: drop_layers(_weight_sharing_copy(model), order[:k]),  # shares weights
                            {"dropped_layers": sorted(order[:k]), "layer_scores": scores})

    return Stage("layers", lambda: drop_layers(_weight_sharing_copy(model), range(1, n)), candidates,
                 f"with one of {n} decoder layers kept")


def _spread(values: list, n: int) -> list:
    """At most ``n`` of ``values`` evenly spaced, the first and last included."""
    if len(values) <= n:
        return list(values)
    idx = sorted({round(i * (len(values) - 1) / (n - 1)) for i in range(n)})
    return [values[i] for i in idx]


def _hidden_stage(model: nn.Module, loss_fn, ctx: _Context):
    from .hidden import _check_expressible, _default_divisor, _top, export_hidden, hidden_scores, \
        hidden_widths, residual_map

    try:
        rmap = residual_map(model)
        divisor = ctx.hidden_divisor or _default_divisor(rmap.hidden_size)
        if divisor > rmap.hidden_size:
            raise ValueError(f"hidden_divisor={divisor} is larger than hidden_size {rmap.hidden_size}")
        choices = hidden_widths(rmap, divisor)
        _check_expressible(rmap, choices[0])
    except ValueError as exc:
        if "hidden_divisor" in str(exc):
            raise
        return f"the hidden size is left unpruned: {exc}"
    h = rmap.hidden_size

    def candidates():
        scores, _ = hidden_scores(model, ctx.data, loss_fn, "gradnas", ctx.max_batches, ctx.show_progress, rmap)
        for k in reversed(_spread(list(choices), HIDDEN_CANDIDATES)):  # the least removed first
            keep = _top(scores, k, model)
            gone = torch.ones(h, dtype=torch.bool)
            gone[keep] = False
            yield Candidate(float(scores[gone].sum()), lambda keep=keep: export_hidden(rmap, keep),
                            {"hidden_size": k, "dense_hidden_size": h, "hidden_keep": keep,
                             "hidden_scores": scores})

    def finish(found):  # the width search's analysis lists the hidden size as not pruned
        found.analysis.skipped = [s for s in found.analysis.skipped if s["module"] != "<hidden size>"]

    return Stage("hidden", lambda: export_hidden(rmap, torch.arange(choices[0])), candidates,
                 f"with hidden_size {choices[0]} of {h}", finish)


def _experts_stage(model: nn.Module, loss_fn, ctx: _Context):
    from .depth import _weight_sharing_copy
    from .experts import _check_routing, _expert_candidates, drop_experts, expert_scores, find_moe_blocks

    blocks, skipped = find_moe_blocks(model)
    if blocks:
        blocks, bad = _check_routing(model, blocks, ctx.example_input)
        skipped += bad
    if not blocks:
        why = "; ".join(f"{s['module']}: {s['reason']}" for s in skipped[:4])
        return "no MoE blocks " + (f"it can prune ({why})" if why else "(nothing to remove on this axis)")
    if ctx.uniform and len({b.n_experts for b in blocks}) != 1:
        raise ValueError(f"uniform=True needs the same expert count in every MoE block, got "
                         f"{sorted({b.n_experts for b in blocks})}")

    def candidates():
        scores, _ = expert_scores(model, blocks, ctx.data, loss_fn, "gradnas", ctx.max_batches,
                                  ctx.show_progress)
        for keep in _expert_candidates(blocks, scores, ctx.uniform):
            gone = sum(float(scores[b.name].sum() - scores[b.name][keep[b.name]].sum()) for b in blocks)
            dropped = {b.name: [e for e in range(b.n_experts) if e not in keep[b.name].tolist()]
                       for b in blocks}
            yield Candidate(gone, lambda keep=keep: drop_experts(_weight_sharing_copy(model), keep),
                            {"dropped_experts": dropped, "expert_scores": scores})

    one = {b.name: torch.tensor([0]) for b in blocks}
    return Stage("experts", lambda: drop_experts(_weight_sharing_copy(model), one), candidates,
                 f"with one expert kept in each of {len(blocks)} MoE blocks")


_STAGE_BUILDERS = {"layers": _layers_stage, "hidden": _hidden_stage, "experts": _experts_stage}


# --------------------------------------------------------------------------------------------
# the search


def _run(model: nn.Module, axes: tuple, loss_fn, widths: Callable, ctx: _Context):
    """The stages of ``axes`` (in :data:`STAGES` order) on ``model``, then ``widths``."""
    stage_axes = [a for a in STAGES if a in axes]
    if not stage_axes:
        return widths(model, loss_fn)
    axis = stage_axes[0]
    rest = tuple(a for a in axes if a != axis)
    stage = _STAGE_BUILDERS[axis](model, loss_fn, ctx)
    if isinstance(stage, str):  # nothing to prune on this axis: say so, go on with the rest
        (logger.info if stage.startswith("no MoE blocks (") else logger.warning)(
            "axes: %r is not pruned: %s", axis, stage)
        found = _run(model, rest, loss_fn, widths, ctx)
        found.axes_skipped = {axis: stage, **getattr(found, "axes_skipped", {})}
        return found
    check_reachable(stage.smallest(), lambda m, probe: _run(m, rest, probe, widths, ctx), stage.where)
    _, found = best_candidate(stage.candidates(), lambda m: _run(m, rest, loss_fn, widths, ctx),
                              f"pruning {', '.join(axes)}")
    if stage.finish is not None:
        stage.finish(found)
    return found


def _dense_counts(model: nn.Module, example_input) -> dict:
    from .flops import flop_counter
    from .kvcache import _config_elements, _element_size

    elements = _config_elements(model)
    return {"params": sum(p.numel() for p in model.parameters()),
            "flops": int(flop_counter(model, example_input).get_total_flops()),
            "kv_cache": None if elements is None else elements * _element_size(model)}


def staged_search(model: nn.Module, constraints: dict, data: Iterable, loss_fn: Callable, method: str,
                  example_input, axes: tuple, width_search: Callable, *, uniform: bool = False,
                  max_iter_data_loader: int = 128, show_progress: bool | None = None,
                  hidden_divisor: int | None = None, gradient_checkpointing: bool = False,
                  **width_kw):
    """``search(..., axes=...)`` over several axes, one of them ``"layers"``, ``"hidden"`` or
    ``"experts"`` (see the module docs). ``width_search(model, bounds, data, loss_fn, method,
    example_input, axes=width_axes, **kw)`` is the width search (``width_axes`` may be empty).
    Every check runs before anything is scored."""
    from .depth import check_axis_inputs
    from .search import MEASURED_KEYS, make_probes, parse_constraints

    if method != "gradnas":
        raise ValueError(f"method={method!r}: combining axes {axes!r} needs method='gradnas' "
                         "(the scores of every axis are then squared gate gradients, which add up)")
    if hidden_divisor is not None:
        check_int("hidden_divisor", hidden_divisor, min_value=1)
    check_axis_inputs(f"axes={axes!r}", data, loss_fn, constraints, COMBINED_CONSTRAINTS, example_input,
                      max_iter_data_loader)
    probes = make_probes(model, constraints, example_input)  # timed against this model; before scoring
    dense = _dense_counts(model, example_input)
    if "kv_cache" in constraints and dense["kv_cache"] is None:
        raise ValueError("constraints['kv_cache']: the model has no Hugging Face attention config "
                         "whose key/value cache gradprune can count")
    counted = {k: v for k, v in constraints.items() if k not in MEASURED_KEYS}
    bounds = parse_constraints(counted, {k: v or 0 for k, v in dense.items()}) if counted else {}
    measured = {k: constraints[k] for k in probes}
    ctx = _Context(data, example_input, uniform, max_iter_data_loader, show_progress, hidden_divisor,
                   gradient_checkpointing)
    width_axes = tuple(a for a in axes if a not in STAGES)

    def widths(m, loss):
        return width_search(m, {**bounds, **measured}, data, loss, "gradnas", example_input, width_axes,
                            uniform=uniform, max_iter_data_loader=max_iter_data_loader,
                            show_progress=show_progress, gradient_checkpointing=gradient_checkpointing,
                            latency_probes=probes, **width_kw)

    found = _run(model, axes, loss_fn, widths, ctx)
    found.axes = tuple(axes)
    found.axes_skipped = dict(getattr(found, "axes_skipped", {}))
    found.dense_params, found.dense_flops = dense["params"], dense["flops"]
    if dense["kv_cache"] is not None and found.dense_kv_cache is not None:
        found.dense_kv_cache = dense["kv_cache"]
    found.constraints = {**bounds, **{k: p.bound_ms for k, p in probes.items()}}
    found.reference_model = model  # measured bounds and found.latency() time against it
    for key, p in probes.items():  # every candidate of every stage counts
        getattr(found, f"{key}_search")["candidates_timed"] = p.calls
    return found

