"""One-shot LLM sparsity: criteria that read layer inputs, sequential calibration, OWL allocation.

:func:`gradprune.prune` comes here when the criterion reads layer inputs (``wanda``, ``sparsegpt``,
``gblm``, ``ria``), when ``sequential=True`` or when ``allocation="owl"``.

* **Inputs.** Each pruned ``Linear`` (or GPT-2 ``Conv1D``) reads ``input[0]`` of its forward, every
  calibration token; a ``Conv1d`` / ``Conv2d`` reads its input unfolded (one row per output
  position, padding included: :func:`~gradprune.scores.llm.input_matrix`), so its weight is the
  ``[out, in * prod(kernel)]`` matrix of the convolution-as-matmul. Grouped, 3-D and transposed
  convolutions and weights that are not a layer's ``weight`` (e.g. ``MultiheadAttention``'s
  ``in_proj_weight``) are refused with a ``ValueError`` naming the parameter, before any work (``loss_fn(model, batch)`` runs the batches; only the forward is used, except
  for criteria that also read gradients, e.g. ``gblm``: their gradients come from one backward per
  batch through the *dense* model first, as in the reference implementation).
* **Sequential** (``sequential=True``): the inputs of the first block are captured (the forward is
  stopped there), then block after block: its layers' statistics are collected on the current
  inputs, its layers are pruned, and the *pruned* block produces the next block's inputs.
  ``sequential=False`` collects every layer's statistics in one pass through the dense model.
  Blocks are the model's repeated decoder/encoder layers (:func:`find_blocks`) or the module names
  given in ``blocks=``. Every pruned weight must lie in a block.
* **Offload.** ``device`` is the compute device (default: where the first block is);
  ``offload="cpu"`` keeps every block but the current one on the CPU; ``offload=<folder>`` keeps
  them on disk (safetensors, parameters on ``meta`` meanwhile) and loads them back at the end.
  Peak compute-device memory of the sequential pass is bounded by::

      P_block + 2 * A + S_block + max(F, R)          A = n_tokens * hidden * bytes(dtype)

  ``P_block``: one block's parameters; ``A``: the calibration hidden states entering (and leaving)
  the block, with their keyword arguments (masks, rotary tables); ``S_block``: the criterion's
  statistics for the block's layers (``4 * in`` bytes per layer, plus ``4 * in**2`` for
  ``sparsegpt``'s Hessian, plus ``4 * numel`` for criteria reading gradients). These are counted
  from the tensors held: ``result.details["peak_device_bytes"]``. The transients on top: ``F``, one
  calibration batch's activations inside the block's forward (model-dependent: attention scores,
  MLP intermediates), or ``R``, the working memory of pruning one layer, whichever is larger:
  ``sparsegpt`` ``16 * in**2 + 5 * out * in`` bytes (two float64 ``[in, in]`` factors at a time,
  the float32 Hessian released first; the float32 working weight and its mask), the selecting
  criteria about ``40 * out * in`` (the score matrix and its sort). The keep masks (1 byte per
  weight) go to the CPU as each block finishes; no float copy of them is kept. Measured on a
  6.3M-parameter LLaMA on the CPU (``benchmarks/llm_oneshot.py``), the resident-set rise stays
  within the bound (less ``P_block``, already resident; plus the returned masks), e.g. sparsegpt
  15.3 MiB against 20.3 (``benchmarks/results/llm_oneshot.md``). ``sequential=False`` instead holds every
  layer's statistics at once (all Hessians for ``sparsegpt``) and runs the whole model's forward,
  the output head's logits included. Gradient criteria need one full backward pass first (the
  whole model on its device).
* **OWL** (Yin et al. 2024, ``allocation="owl"``): outlier ratio ``D_l`` = share of Wanda scores
  ``|W| * ||X||`` of block ``l`` (all its pruned layers together) above ``M`` times their mean, on
  the dense model's inputs; ``D`` is scaled to ``[0, 2*lambda]`` and centred, and block ``l`` gets
  sparsity ``s - (D'_l - mean D')``. Per-layer counts are then rounded by largest remainder so
  the overall count is exactly ``round(s * N)``. ``M`` and ``lambda`` are ``owl_m`` / ``owl_lambda``.
* **Scope.** ``scope="local"`` (default): every layer to its sparsity. ``scope="global"`` (``wanda``,
  ``ria``, ``gblm``, dense inputs): one ranking of every layer's scores with one exact count over
  all layers (``round_half_up(s * N)`` entries, bounded by ``min_sparsity`` / ``max_sparsity``),
  as :func:`gradprune.prune` does for the gradient criteria; the paper's per-row comparison does
  not apply then. Refused: ``sparsegpt`` (per layer by construction: the OBS update reconstructs
  each layer from its own Hessian and picks the mask while updating), ``sequential=True`` (a block
  is scored only after the blocks before it are pruned) and ``allocation="owl"``.
* **Exact counts.** Each layer prunes ``round_half_up(s_l * units)`` units (rounded down with
  ``count_rounding="floor"``); ``"row"`` comparison
  spreads them over the rows of the unit grid (``k // R`` each, one more for the first ``k % R``
  rows), ``sparsegpt`` over its column blocks by cumulative rounding. Ties: the higher index is
  pruned first (the lowest index is kept), as everywhere else.
"""
from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ._checks import check_float, count_of, round_half_up
from .masks import build_masks
from .patterns import BlockPattern, NMPattern
from .scores import stream_gradients
from .scores.llm import InputCriterion, WandaCriterion, input_layer_problem, input_matrix
from .select import _prune_lowest

__all__ = ["find_blocks", "prune_with_inputs"]

log = logging.getLogger(__name__)


def find_blocks(model: nn.Module, names: Iterable[str] | None = None) -> list[tuple[str, nn.Module]]:
    """The model's repeated blocks, in order: ``names`` (module names) when given, else the
    ``nn.ModuleList`` of same-class modules holding the most parameters (a transformer's decoder
    or encoder layers: LLaMA, Qwen, Gemma, Phi-3, GPT-2, BERT).

    Example:
        >>> import torch.nn as nn
        >>> m = nn.Sequential(nn.Embedding(10, 4), nn.ModuleList([nn.Linear(4, 4) for _ in range(3)]))
        >>> [n for n, _ in find_blocks(m)]
        ['1.0', '1.1', '1.2']
    """
    if names is not None:
        if isinstance(names, str) or not all(isinstance(n, str) for n in names):
            raise TypeError(f"blocks must be a list of module names, got {names!r}")
        names = list(names)
        if not names:
            raise ValueError("blocks must name at least one module, got []")
        known = dict(model.named_modules())
        missing = [n for n in names if n not in known]
        if missing:
            raise ValueError(f"blocks names modules the model does not have: {missing}")
        return [(n, known[n]) for n in names]
    best, best_size = None, 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) >= 2 and len({type(c) for c in mod}) == 1:
            size = sum(p.numel() for p in mod.parameters())
            if size > best_size:
                best, best_size = (name, mod), size
    if best is None:
        raise ValueError("sequential=True found no repeated blocks (an nn.ModuleList of same-class "
                         "layers); pass blocks=[module names] in order")
    prefix = best[0] + "." if best[0] else ""
    return [(f"{prefix}{i}", m) for i, m in enumerate(best[1])]


def _owner(model, name):
    return model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model


class _Stop(Exception):
    pass


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return 0 if obj.device.type == "meta" else obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(_nbytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    return 0


def _batches(data, n_batches):
    for i, b in enumerate(data):
        if n_batches is not None and i >= n_batches:
            return
        yield b


@contextmanager
def _input_hooks(model, names, sink: Callable[[str, torch.Tensor], None]):
    """Feed ``sink(name, X)`` every input of each named weight's layer, as the ``[tokens, in]``
    matrix its weight multiplies (conv inputs unfolded: :func:`~gradprune.scores.llm.input_matrix`)."""
    handles = []
    for n in names:
        mod = _owner(model, n)

        def hook(m, args, _n=n):
            sink(_n, input_matrix(m, args[0]))

        handles.append(mod.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class _Offload:
    """Moves one block at a time to ``device``; the others stay on the CPU or on disk."""

    def __init__(self, blocks, device, where):
        self.blocks, self.device, self.where = blocks, torch.device(device), where
        self.home = [next(iter(b.parameters()), torch.empty(0)).device for _, b in blocks]
        self.disk = where is not None and where != "cpu"
        if self.disk:
            from safetensors.torch import save_file

            os.makedirs(where, exist_ok=True)
            for i, (_, b) in enumerate(blocks):
                state = {k: t.detach().cpu().contiguous() for k, t in self._tensors(b)}
                save_file(state, self._path(i))
                b.to("meta")
        elif where == "cpu":
            for _, b in blocks:
                b.to("cpu")

    @staticmethod
    def _tensors(block):
        yield from block.named_parameters(remove_duplicate=False)
        yield from block.named_buffers(remove_duplicate=False)

    def _path(self, i):
        return os.path.join(self.where, f"block{i}.safetensors")

    def load(self, i):
        block = self.blocks[i][1]
        if self.disk:
            from safetensors.torch import load_file

            state = load_file(self._path(i), device=str(self.device))
            for k, t in self._tensors(block):
                mod_name, _, attr = k.rpartition(".")
                owner = block.get_submodule(mod_name) if mod_name else block
                if isinstance(t, nn.Parameter):
                    owner._parameters[attr] = nn.Parameter(state[k], requires_grad=t.requires_grad)
                else:
                    owner._buffers[attr] = state[k]
        else:
            block.to(self.device)

    def park(self, i, final=False):
        block = self.blocks[i][1]
        if self.disk and not final:
            from safetensors.torch import save_file

            save_file({k: t.detach().cpu().contiguous() for k, t in self._tensors(block)}, self._path(i))
            block.to("meta")
        else:
            block.to("cpu" if self.disk or self.where == "cpu" else self.home[i])

    def restore(self):
        """Load every parked block back (to the CPU for offloaded models)."""
        if self.disk:
            saved = self.device
            self.device = torch.device("cpu")
            for i in range(len(self.blocks)):
                self.load(i)
            self.device = saved


def _capture_block_inputs(model, block, data, loss_fn, n_batches, device):
    """``[(args, kwargs)]`` entering ``block`` for each calibration batch, on ``device``."""
    cached = []

    def hook(_m, args, kwargs):
        # no KV cache: a block runs twice on the same inputs (statistics, then outputs)
        kwargs = {k: (False if k == "use_cache" else
                      None if k in ("past_key_value", "past_key_values", "layer_past")
                      or type(v).__name__.endswith("Cache") else v)
                  for k, v in kwargs.items()}
        cached.append((_to(args, device), _to(kwargs, device)))
        raise _Stop

    h = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for b in _batches(data, n_batches):
                try:
                    loss_fn(model, b)
                except _Stop:
                    pass
    finally:
        h.remove()
    if not cached:
        raise ValueError("the calibration data never reached the first block (no batch?)")
    return cached


def _run_block(block, inputs):
    outs = []
    with torch.no_grad():
        for args, kwargs in inputs:
            y = block(*args, **kwargs)
            h = y[0] if isinstance(y, (tuple, list)) else y
            if args:
                outs.append(((h,) + tuple(args[1:]), kwargs))
            else:
                outs.append(((), {**kwargs, "hidden_states": h}))
    return outs


# ------------------------------------------------------------------------------------------------
# selection with exact counts


def _unit_grid(pattern, shape):
    """(rows, cols) of the unit grid of a block pattern on an ``[out, in]`` weight."""
    return shape[0] // pattern.rows, shape[1] // pattern.cols


def _row_prune(unit_scores: torch.Tensor, k: int) -> torch.Tensor:
    """Prune mask over a ``[R, C]`` grid: ``k`` units spread over rows (``k // R`` each, one more
    for the first ``k % R`` rows), the lowest of each row (ties: higher index first)."""
    rows, cols = unit_scores.shape
    per_row = torch.full((rows,), k // rows, dtype=torch.long)
    per_row[: k % rows] += 1
    flipped = unit_scores.float().flip(-1)
    order = torch.sort(flipped, dim=-1, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(cols).expand(rows, cols).contiguous())
    return (rank < per_row.to(rank.device).unsqueeze(1)).flip(-1)


def _oriented(t, name, transposed):
    return t.t() if name in transposed else t.reshape(t.shape[0], -1)


def _select_layer(name, param, score, k, pattern, comparison, transposed):
    """Keep mask of one layer pruning exactly ``k`` units."""
    n_units = pattern.n_units(param.shape)
    if isinstance(pattern, BlockPattern) and comparison == "row":
        s = _oriented(score, name, transposed)
        grid = pattern.unit_scores(s, "mean", False).reshape(_unit_grid(pattern, s.shape))
        keep = ~_row_prune(grid, k)
        m = pattern.expand(keep.reshape(-1), s)
        return (m.t() if name in transposed else m.reshape(param.shape)).contiguous()
    return build_masks({name: param}, {name: score}, pattern, transposed=[name] if name in transposed else [],
                       sparsity=k / n_units if n_units else 0.0, scope="local",
                       min_sparsity=0.0, max_sparsity=1.0)[name]


def _sparsegpt_chooser(pattern, k_total, shape_oi):
    """``choose(saliency [out, width], start)`` for SparseGPT: exact counts per column block by
    cumulative rounding (block patterns), or ``M - N`` per row in each group (N:M)."""
    if isinstance(pattern, NMPattern):
        m, n_prune = pattern.m, pattern.m - pattern.n
        later = {}

        def later_on(device):  # later[j, k]: k > j
            if device not in later:
                later[device] = torch.ones(m, m, dtype=torch.bool, device=device).triu(1)
            return later[device]

        def choose(sal, start):
            # one M-column group [out, M]: prune the M - N lowest of each row, ties the higher
            # index first (the order NMPattern.expand sorts in), ranked by comparisons, no sort
            a, b = sal.unsqueeze(2), sal.unsqueeze(1)            # a[r, j, 0], b[r, 0, k]
            before = torch.where(later_on(sal.device), b <= a, b < a)  # k is pruned before j
            return before.sum(-1) < n_prune
        choose.per_group, choose.group, choose.block_multiple = True, m, m
        return choose
    out, inp = shape_oi
    total_cols = inp // pattern.cols

    def choose(sal, start):
        c0, c1 = start // pattern.cols, (start + sal.shape[1]) // pattern.cols
        k = round_half_up(k_total * c1 / total_cols) - round_half_up(k_total * c0 / total_cols)
        units = pattern.unit_scores(sal, "mean", False)
        return ~pattern.expand(~_prune_lowest(units, k), sal)

    choose.block_multiple = pattern.cols
    return choose


def _layer_counts(names, params, pattern, sparsity, group_sparsity, rounding="half_up"):
    """Units to prune per layer: ``round_half_up(s_l * units)`` (``rounding="floor"``: rounded
    down); with per-group sparsities (OWL) corrected by largest remainder so the total is
    ``round_half_up(s * total units)`` (or its floor)."""
    units = {n: pattern.n_units(params[n].shape) for n in names}
    if group_sparsity is None:
        return {n: count_of(sparsity * units[n], rounding) for n in names}
    want = {n: min(max(group_sparsity[n], 0.0), 1.0) * units[n] for n in names}
    counts = {n: int(want[n]) for n in names}
    total = count_of(sparsity * sum(units.values()), rounding)
    rest = sorted(names, key=lambda n: (-(want[n] - counts[n]), names.index(n)))
    i = 0
    while sum(counts.values()) < total:
        n = rest[i % len(rest)]
        if counts[n] < units[n]:
            counts[n] += 1
        i += 1
    return counts


def _owl_sparsities(groups, wanda: WandaCriterion, sparsity, m, lam):
    """Per parameter sparsity from each group's outlier ratio (OWL)."""
    ratios = []
    for names in groups:
        s = torch.cat([wanda.score_one(n).reshape(-1) for n in names])
        ratios.append(float((s > m * s.mean()).float().mean()))
    d = torch.tensor(ratios, dtype=torch.float64)
    span = float(d.max() - d.min())
    d = (d - d.min()) / span * (2 * lam) if span > 0 else torch.zeros_like(d)
    d = d - d.mean()
    out = {}
    for names, dl in zip(groups, d.tolist()):
        for n in names:
            out[n] = sparsity - dl
    return out, ratios


# ------------------------------------------------------------------------------------------------


def check_options(*, sequential, blocks, offload, owl_m, owl_lambda, allocation, pattern, criterion_cls,
                  sparsity):
    """Validation before any work (called by :func:`gradprune.prune`)."""
    if not isinstance(sequential, bool):
        raise TypeError(f"sequential must be bool, got {type(sequential).__name__}")
    if blocks is not None and not sequential:
        raise ValueError("blocks= is used with sequential=True only")
    if offload is not None and not sequential:
        raise ValueError("offload= is used with sequential=True only")
    if offload is not None and not isinstance(offload, (str, os.PathLike)):
        raise TypeError(f"offload must be None, 'cpu' or a folder path, got {type(offload).__name__}")
    check_float("owl_m", owl_m, low=0.0, low_open=True)
    check_float("owl_lambda", owl_lambda, low=0.0, high=0.5, high_open=True)
    if allocation == "owl" and isinstance(pattern, NMPattern):
        raise ValueError(f"allocation='owl' sets per-layer sparsities; pattern {pattern.spec!r} fixes "
                         "every layer's sparsity. Use an unstructured or NxM pattern")
    if getattr(criterion_cls, "updates_weights", False):
        if isinstance(pattern, NMPattern) and sparsity is not None and \
                abs(sparsity - (pattern.m - pattern.n) / pattern.m) > 1e-9:
            raise ValueError(f"criterion {criterion_cls.name!r} with pattern {pattern.spec!r} prunes "
                             f"exactly {(pattern.m - pattern.n) / pattern.m:g}; got sparsity={sparsity}")
        if not isinstance(pattern, (NMPattern, BlockPattern)):
            raise ValueError(f"criterion {criterion_cls.name!r} supports '1x1', 'NxM' and 'N:M' patterns, "
                             f"got {pattern.spec!r}")


def prune_with_inputs(model: nn.Module, cfg, params: dict, transposed: list, pattern, criterion, *,
                      data, loss_fn, n_batches, sequential: bool, blocks=None, device=None, offload=None,
                      owl_m: float = 5.0, owl_lambda: float = 0.08, show_progress=None,
                      process_group=None) -> tuple[dict, dict[str, Any]]:
    """Masks ``{name: keep}`` and ``details`` for :func:`gradprune.prune` (see the module doc)."""
    transposed = set(transposed)
    sparsity = cfg.effective_target()
    owl = cfg.allocation == "owl"
    if isinstance(criterion, InputCriterion) or owl:
        for n in params:
            why = input_layer_problem(_owner(model, n), n.rsplit(".", 1)[-1])
            if why:
                raise ValueError(f"criterion {cfg.criterion!r}{' with allocation=owl' if owl else ''} reads "
                                 f"layer inputs and cannot score {n!r}: {why} (exclude it)")
    global_scope = cfg.scope == "global"
    if global_scope:
        if getattr(criterion, "updates_weights", False):
            raise ValueError(f"criterion {cfg.criterion!r} is per layer: its OBS update reconstructs each "
                             "layer from that layer's own Hessian and picks the mask column block by block "
                             "while updating the weights, so its saliencies are never all known at once "
                             "and are not comparable across layers. Use scope='local'")
        if sequential:
            raise ValueError("scope='global' ranks every layer's scores together, but sequential=True scores "
                             "each block only after the blocks before it are pruned; use sequential=False "
                             "or scope='local'")
        if owl:
            raise ValueError("allocation='owl' sets each layer's sparsity; scope='global' ranks all layers "
                             "together: choose one (scope='local' with OWL)")
    if isinstance(criterion, InputCriterion):
        criterion.transposed = transposed
    comparison = getattr(criterion, "comparison", "layer")
    block_list, block_of = None, {}
    if sequential or owl:
        try:
            block_list = find_blocks(model, blocks)
        except ValueError:
            if sequential:
                raise
        if block_list is not None:
            for n in params:
                for i, (bn, _) in enumerate(block_list):
                    if n.startswith(bn + "."):
                        block_of[n] = i
    if sequential:
        outside = [n for n in params if n not in block_of]
        if outside:
            raise ValueError(f"sequential=True prunes weights inside the blocks only; {outside} lie outside "
                             f"{[b for b, _ in block_list][:3]}...: exclude them (exclude=[...]) or "
                             "pass blocks=")
    details: dict[str, Any] = {"sequential": sequential, "criterion": cfg.criterion,
                               "weights_changed": bool(getattr(criterion, "updates_weights", False))}
    start = time.perf_counter()
    if criterion.needs_grad:
        details["gradient_batches"] = stream_gradients(
            model, data, loss_fn, params, n_batches=n_batches,
            on_batch=lambda: (criterion.on_step_begin(), criterion.on_before_optimizer_step()),
            show_progress=show_progress, desc=f"gradients ({cfg.criterion})", process_group=process_group)
    names = list(params)
    if owl:
        groups = ([[n for n in names if block_of.get(n) == i] for i in range(len(block_list))]
                  if block_list is not None and all(n in block_of for n in names) else [[n] for n in names])
        groups = [g for g in groups if g]
    keep: dict[str, torch.Tensor] = {}

    def prune_layer(n, counts):
        if getattr(criterion, "updates_weights", False):
            w = _oriented(params[n], n, transposed)
            order = None
            if params[n].dim() > 2 and isinstance(pattern, NMPattern) and pattern.layout == "channels":
                # visit a conv's columns channels-last, so each N:M group is M consecutive columns
                cin, k = params[n].shape[1], w.shape[1] // params[n].shape[1]
                order = torch.arange(w.shape[1], device=w.device).reshape(cin, k).t().reshape(-1)
            keep[n] = criterion.prune_layer(n, _sparsegpt_chooser(pattern, counts[n], w.shape), order)
        else:
            score = criterion.score(n) if isinstance(criterion, InputCriterion) else criterion.scores[n]
            keep[n] = _select_layer(n, params[n], score, counts[n], pattern, comparison, transposed)
        if isinstance(criterion, InputCriterion):
            criterion.forget(n)

    if not sequential:
        sink = criterion.add_inputs if isinstance(criterion, InputCriterion) else None
        helper = WandaCriterion(params) if owl and not isinstance(criterion, WandaCriterion) else None
        if helper is not None:
            helper.transposed = transposed

        def both(n, x):
            x = x.detach().reshape(-1, x.shape[-1])
            if sink is not None:
                sink(n, x)
            if helper is not None:
                helper.add_inputs(n, x)

        if sink is not None or helper is not None:
            batches = 0
            with _input_hooks(model, names, both), torch.no_grad():
                for b in _batches(data, n_batches):
                    loss_fn(model, b)
                    batches += 1
            details["batches"] = batches
        group_s = None
        if owl:
            group_s, details["owl_outlier_ratios"] = _owl_sparsities(groups, helper or criterion, sparsity,
                                                                   owl_m, owl_lambda)
        if global_scope:  # one exact count over every layer (build_masks' global selection)
            scores = {n: criterion.score(n) for n in names}
            keep.update(build_masks(params, scores, pattern, transposed=transposed, sparsity=sparsity,
                                    scope="global", min_sparsity=cfg.min_sparsity,
                                    max_sparsity=cfg.max_sparsity,
                                    count_rounding=cfg.count_rounding))
            details["scope"] = "global"
        else:
            counts = _layer_counts(names, params, pattern, sparsity, group_s, cfg.count_rounding)
            for n in names:
                prune_layer(n, counts)
        details["calibration_seconds"] = time.perf_counter() - start
        return keep, details

    # sequential, block by block
    first = block_list[0][1]
    dev = torch.device(device) if device is not None else next(first.parameters()).device
    off = _Offload(block_list, dev, None if offload is None else os.fspath(offload))
    peak = 0
    try:
        inputs = _capture_block_inputs(model, first, data, loss_fn, n_batches, dev)
        details["batches"] = len(inputs)
        group_s = None
        if owl:  # outlier ratios from the dense model, block by block
            helper = WandaCriterion(params)
            helper.transposed = transposed
            xs = inputs
            for i in range(len(block_list)):
                off.load(i)
                bnames = [n for n in names if block_of[n] == i]
                with _input_hooks(model, bnames, helper.add_inputs):
                    xs = _run_block(block_list[i][1], xs)
                off.park(i)
            group_s, details["owl_outlier_ratios"] = _owl_sparsities(groups, helper, sparsity, owl_m, owl_lambda)
            del xs
        counts = _layer_counts(names, params, pattern, sparsity, group_s, cfg.count_rounding)
        for i, (bname, block) in enumerate(block_list):
            off.load(i)
            bnames = [n for n in names if block_of[n] == i]
            for n in bnames:  # parameters may have been re-created by a disk offload
                params[n] = model.get_parameter(n)
                criterion.params[n] = params[n]
            if bnames and isinstance(criterion, InputCriterion):
                with _input_hooks(model, bnames, criterion.add_inputs):
                    _run_block(block, inputs)
            stats = _nbytes(getattr(criterion, "sq", {})) + _nbytes(getattr(criterion, "hessian", {})) + \
                _nbytes({n: getattr(criterion, "grad_sq", {}).get(n) for n in bnames})
            for n in bnames:
                prune_layer(n, counts)
                with torch.no_grad():
                    params[n].mul_(keep[n].to(params[n].device))
            outputs = _run_block(block, inputs)
            resident = sum(_nbytes(t) for _, t in off._tensors(block)) + _nbytes(inputs) + _nbytes(outputs)
            peak = max(peak, resident + stats)
            inputs = outputs
            off.park(i)
            keep.update({n: m.cpu() for n, m in keep.items() if n in bnames})
    finally:
        off.restore()
    for n in names:
        params[n] = model.get_parameter(n)
    details["peak_device_bytes"] = peak
    details["calibration_seconds"] = time.perf_counter() - start
    return keep, details
