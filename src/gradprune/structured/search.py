"""Search for the best subnet within a params/FLOPs budget (ModelOpt's gradnas / fastnas).

1. :func:`~gradprune.structured.find_groups` finds the dependency groups; the search-space
   ``rules`` give each group its allowed widths.
2. Every unit of every group gets a score (``method``): ``gradnas`` (mean squared gate gradient,
   or per sample with ``per_sample=True``), ``taylor``, ``fisher`` (per-sample), ``michel``,
   ``activation`` (Minitron's mean activation norm), ``magnitude`` (L2 or L1 weight norm) — higher
   is more important (every score is registered with its formula in
   :data:`~gradprune.structured.scoring.WIDTH_SCORES`). A group keeps its highest-scored units; the *sensitivity* of a
   width is the sum of the scores of the units it removes. ``fastnas`` instead orders units by L2
   weight norm and measures ``score_func(model) - score_func(model with those units off)`` with one
   evaluation per (group, width).
3. One global threshold ``t``: each group takes its smallest width whose sensitivity is ``<= t``
   (scores that are not loss-calibrated, ``activation`` and ``magnitude``, are first divided by
   their kind's scale, :func:`~gradprune.structured.scoring.per_kind_scale`, so heads and neurons
   are compared within their kind).
   Params and FLOPs only decrease as ``t`` grows, so a binary search finds the smallest ``t`` whose
   subnet meets every constraint. The search runs over the sorted distinct sensitivities, so it is
   exact and scale-free (it stops when the bracket holds two neighbouring candidate thresholds; no
   absolute tolerance). A ``latency`` constraint is measured, not counted: a candidate that meets
   the params/FLOPs bounds is exported and timed on ``example_input`` (see :class:`LatencyProbe`).
4. The result reports per-group widths, params and FLOPs (a dry run: nothing is cut) and
   :meth:`SearchResult.export` returns the smaller model.

Example:
    >>> import torch, torch.nn as nn
    >>> import gradprune.structured as st
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
    >>> data = [(torch.randn(16, 8), torch.randint(0, 3, (16,))) for _ in range(4)]
    >>> loss_fn = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])
    >>> rules = {"nn.Linear": {"feature_divisor": 4}}
    >>> found = st.search(model, {"params": "50%"}, data, loss_fn, "gradnas", data[0][0], rules=rules)
    >>> found.params <= 0.5 * found.dense_params
    True
    >>> small = found.export()
    >>> sum(p.numel() for p in small.parameters()) == found.params
    True
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import math
import re
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .._checks import check_bool, check_choice, check_int, check_optional_bool
from .._progress import progress
from .._modes import keeps_modes
from .._report import SearchReport
from .depth import check_axes, group_axis, search_layers
from .export import export_model
from .flops import CostModel
from .gates import Gates
from .groups import Analysis, _as_args, find_groups
from .kvcache import KVCache
from .measured import MEASURED_KEYS, latency_extra, latency_lines  # noqa: F401 (re-exported)
from .rules import SearchRules
from .staged import STAGES, staged_search
from .scoring import WIDTH_SCORES, activation_scores, gate_statistics, magnitude_scores, per_kind_scale, width_score

__all__ = ["search", "SearchResult", "METHODS", "parse_constraints", "LatencyProbe", "recalibrate_batchnorm",
           "check_decodes", "make_probes", "latency_table", "latency_lines"]

METHODS = tuple(WIDTH_SCORES)  # gradnas, taylor, fisher, michel, activation, magnitude, fastnas
CONSTRAINT_KEYS = ("params", "flops", "latency", "kv_cache", "decode_latency")
DECODE_STEPS = 8  # decode_latency: cached one-token forwards timed after each prefill
_PCT = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*%\s*$")


def parse_constraints(constraints: Any, dense: dict) -> dict:
    """``{"params": N or "NN%", "flops": ..., "latency": ms or "NN%", "decode_latency": ...}`` ->
    absolute upper bounds (percentages of ``dense[key]``; ``latency`` and ``decode_latency`` in
    milliseconds)."""
    if not isinstance(constraints, dict):
        raise TypeError(f"constraints must be a dict like {{'flops': '50%'}}, got {type(constraints).__name__}")
    if not constraints:
        raise ValueError(f"constraints must name at least one of {', '.join(CONSTRAINT_KEYS)}; got {{}}")
    out = {}
    for key, value in constraints.items():
        if key not in CONSTRAINT_KEYS:
            raise ValueError(f"constraints has an unknown key {key!r}; valid keys: {', '.join(CONSTRAINT_KEYS)}")
        if isinstance(value, str):
            m = _PCT.match(value)
            if not m:
                raise ValueError(f"constraints[{key!r}] must be a number or a percentage like '50%', got {value!r}")
            pct = float(m.group(1))
            if not 0.0 < pct <= 100.0:
                raise ValueError(f"constraints[{key!r}] must be a percentage in (0%, 100%], got {value!r}")
            out[key] = pct / 100.0 * dense[key]
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"constraints[{key!r}] must be a number or a percentage string, got "
                            f"{type(value).__name__}")
        elif not (value > 0 and math.isfinite(value)):
            raise ValueError(f"constraints[{key!r}] must be a positive number, got {value!r}")
        elif key not in MEASURED_KEYS and value <= 1:
            raise ValueError(
                f"constraints[{key!r}]={value!r} is ambiguous: a number is an absolute count of "
                f"{key}, not a fraction; for a fraction of the dense model write "
                f"'{value * 100:g}%', got {value!r}")
        else:
            out[key] = float(value)
    return out


@dataclass
class SearchResult:
    """What :func:`search` found. Nothing is cut until :meth:`export`.

    Attributes: ``analysis`` (groups, skipped modules), ``choices`` / ``widths`` / ``keep`` per
    group index, ``scores`` and ``sensitivity`` per group, ``params``/``flops`` of the subnet and
    of the dense model, ``constraints`` (absolute bounds; ``latency`` in ms), ``threshold``,
    ``method``, ``batches``, ``latency_ms`` (:meth:`latency`) and ``latency_search`` (the
    measurement a ``latency`` constraint was checked on: batch size, dense and pruned ms, bound,
    candidates timed).
    """

    analysis: Analysis
    method: str
    choices: dict
    widths: dict
    keep: dict
    scores: dict
    sensitivity: dict
    params: int
    flops: int
    dense_params: int
    dense_flops: int
    constraints: dict
    threshold: float
    batches: int = 0
    score_summary: dict = field(default_factory=dict)
    config_kept: list = field(default_factory=list)  # uniform: families no config width can narrow
    example_input: Any = None
    latency_ms: dict = field(default_factory=dict)  # {"dense"/"pruned": {batch size: median ms}}
    latency_search: dict = field(default_factory=dict)  # the measurement a latency constraint used
    uniform: bool = False  # searched with one common width per family of layers
    kv_cache: int | None = None  # KV-cache bytes per token of the subnet (see .kvcache)
    dense_kv_cache: int | None = None
    axes_skipped: dict = field(default_factory=dict)  # staged search: {axis: why nothing was pruned on it}
    decode_latency_search: dict = field(default_factory=dict)  # the measurement a decode_latency bound used
    reference_model: Any = None  # staged search: the original model (analysis.model is a pruned copy)

    @property
    def groups(self) -> list:
        return self.analysis.groups

    @property
    def skipped(self) -> list:
        return self.analysis.skipped

    def rows(self) -> list:
        rows = []
        for gi, g in enumerate(self.analysis.groups):
            rows.append({"group": g.name, "unit": g.unit, "modules": len(g.modules()),
                         "width": g.size, "kept": self.widths[gi], "choices": len(self.choices[gi])})
        return rows

    @property
    def report(self) -> SearchReport:
        """Per-group widths, then params and FLOPs of the dense model and of the subnet
        (``print(found.report)``; see :class:`~gradprune.report.Report`). Calling it,
        ``found.report()``, is deprecated (it returns this text)."""
        lines = [f"params: {self.dense_params} -> {self.params} "
                 f"({self.params / max(self.dense_params, 1):.1%})"]
        lines.append(f"flops:  {self.dense_flops} -> {self.flops} "
                     f"({self.flops / max(self.dense_flops, 1):.1%})")
        dropped = getattr(self, "dropped_layers", None)
        if dropped is not None:  # search(..., axes=("layers", ...)): the widths are of the shallower copy
            lines.insert(0, f"decoder layers dropped: {list(dropped)}")
        experts = getattr(self, "dropped_experts", None)
        if experts is not None:  # search(..., axes=("experts", ...)): the widths are of the expert-pruned copy
            lines.insert(0, f"MoE experts dropped: {experts}")
        hidden = getattr(self, "hidden_size", None)
        if hidden is not None:  # search(..., axes=("hidden", ...)): the widths are of the narrower copy
            lines.insert(0, f"hidden_size: {self.dense_hidden_size} -> {hidden} (residual channels)")
        for axis, why in self.axes_skipped.items():
            lines.insert(0, f"{axis}: {why}")
        if "kv_cache" in self.constraints:
            lines.append(f"kv_cache: {self.dense_kv_cache} -> {self.kv_cache} bytes/token "
                         f"({self.kv_cache / max(self.dense_kv_cache, 1):.1%})")
        lines += latency_lines(self)
        from .hf import reload_hint
        hint = reload_hint(self.analysis, self.uniform)
        if hint:
            lines.append(hint)
        lines += [f"  {text}" for text in self.config_kept]
        if self.analysis.skipped:
            lines.append("not pruned:")
            lines += [f"  {s['module'] or '<model>'}: {s['reason']}" for s in self.analysis.skipped]
        extra = {"method": self.method, "params": {"dense": self.dense_params, "subnet": self.params},
                 "flops": {"dense": self.dense_flops, "subnet": self.flops}, **latency_extra(self),
                 "skipped": self.analysis.skipped,
                 "axes_skipped": dict(self.axes_skipped)}
        return SearchReport(self.rows(), lines, extra)

    def gates(self) -> Gates:
        """Fixed gates with the units this result removes turned off (a context manager)."""
        return Gates(self.analysis, keep=self.keep)

    def export(self, uniform: bool | None = None, model: nn.Module | None = None) -> nn.Module:
        """A deep copy of the model with the removed units sliced away (an ordinary nn.Module).

        ``uniform=True`` (Hugging Face models; default: as searched) keeps the same widths in
        every layer and writes them to the config, so plain ``from_pretrained`` loads the saved
        model. For a result searched without ``uniform``, each family of groups (e.g. the FFN
        neurons of every layer) takes the minimum width over its layers, keeping each layer's
        highest-scored units: the export is then smaller than ``params``/``flops`` say (see
        :meth:`uniform_keep`).

        ``model``: slice this model instead of the searched one: the same architecture (module
        names and parameter shapes) with whole weights. A search on a ``fully_shard``-ed (FSDP2)
        model needs it: gather the weights into an unsharded copy first (``docs/distributed.md``)."""
        if uniform is None:
            uniform = self.uniform
        if not isinstance(uniform, bool):
            raise TypeError(f"uniform must be bool or None, got {type(uniform).__name__}")
        keep = self.uniform_keep() if uniform and not self.uniform else self.keep
        analysis = self.analysis
        if model is not None:
            if not isinstance(model, nn.Module):
                raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
            if model is not analysis.model:
                _check_same_structure(analysis.model, model)
                analysis = dataclasses.replace(analysis, model=model)
        from .._distributed import sharded_group
        if sharded_group(analysis.model) is not None:
            raise ValueError("export needs whole weights, and the searched model is fully_shard-ed "
                             "(FSDP2): gather them into an unsharded copy, e.g. on rank 0 "
                             "model.load_state_dict(get_model_state_dict(sharded, options="
                             "StateDictOptions(full_state_dict=True, cpu_offload=True))), and call "
                             "result.export(model=that_copy) (docs/distributed.md)")
        return export_model(analysis, keep, uniform=uniform)

    def uniform_keep(self) -> dict:
        """``keep`` with every family of groups (same role in every layer of a Hugging Face
        model) cut to its minimum width over layers, keeping the highest-scored units."""
        from .hf import families
        fams = families(self.analysis)
        if not fams:
            raise ValueError("uniform widths need a Hugging Face model with recognised attention "
                             "or MLP blocks (see result.skipped)")
        keep = dict(self.keep)
        for gis in fams.values():
            w = min(self.widths[gi] for gi in gis)
            for gi in gis:
                g = self.analysis.groups[gi]
                keep[gi] = _keep_for(_ranking(self.scores[gi], g.balance), w)
        return keep

    def latency(self, example_input_fn: Callable | None = None, batch_sizes=(1, 32),
                repeats: int = 20, warmup: int = 3) -> dict:
        """Measure the CPU latency (median over ``repeats`` timed forwards after ``warmup``, eval
        mode, no grad; the two models alternate, so both see the same machine load) of the dense
        and the exported model at each batch size.

        ``example_input_fn(batch_size)`` gives the input (a tensor or a tuple of tensors); by
        default the rows of the search's ``example_input`` are repeated to the batch size.
        Returns and stores ``latency_ms = {"dense": {bs: ms}, "pruned": {bs: ms}, "repeats": n}``,
        which :attr:`report` then shows next to params and FLOPs."""
        check_int("repeats", repeats, min_value=1)
        check_int("warmup", warmup, min_value=0)
        if example_input_fn is None:
            if self.example_input is None:
                raise ValueError("example_input_fn must be given when the result has no example_input")
            example_input_fn = _rows_of(self.example_input)
        elif not callable(example_input_fn):
            raise TypeError(f"example_input_fn must be callable as example_input_fn(batch_size), "
                            f"got {type(example_input_fn).__name__}")
        self.latency_ms = latency_table(self.reference_model or self.analysis.model, self.export(),
                                        example_input_fn, batch_sizes, repeats, warmup)
        return self.latency_ms


def latency_table(dense: nn.Module, pruned: nn.Module, example_input_fn: Callable, batch_sizes=(1, 32),
                  repeats: int = 20, warmup: int = 3) -> dict:
    """``{"dense": {bs: ms}, "pruned": {bs: ms}, "repeats": n}``: median forward times of the two
    models, interleaved, at each batch size (``example_input_fn(bs)`` gives the input)."""
    sizes = tuple(check_int("batch_sizes item", b, min_value=1) for b in batch_sizes)
    out = {"dense": {}, "pruned": {}, "repeats": repeats}
    for bs in sizes:
        ms = _interleaved_ms({"dense": dense, "pruned": pruned}, _as_args(example_input_fn(bs)), repeats, warmup)
        for key in ("dense", "pruned"):
            out[key][bs] = ms[key]
    return out


def _rows_of(example_input) -> Callable:
    """``example_input_fn(bs)``: the rows of ``example_input`` repeated to ``bs``."""
    base = _as_args(example_input)
    return lambda bs: tuple(t[torch.arange(bs) % t.shape[0]] for t in base)


class LatencyProbe:
    """Measures candidate subnets for a ``latency`` or ``decode_latency`` constraint.

    ``kind="latency"`` (prefill): each candidate is exported and timed on ``example_input`` (its
    batch size is the one that counts), on the model's device, eval mode, no grad: ``warmup``
    untimed forwards, then ``repeats`` timed forwards alternating with the dense model, so both
    see the same machine load. ``kind="decode_latency"`` (a causal LM at batch 1): the first row
    of ``example_input`` (token ids) is the prompt; each run prefills it with ``use_cache=True``
    (untimed) and times ``steps`` greedy one-token forwards on the key/value cache; the value is
    ms per token, the median over runs. A model that cannot decode so (no ``past_key_values``, no
    ``logits``, inputs that are not token ids) raises ``ValueError`` when the probe is built,
    before any scoring.

    ``time(key, build)`` returns ``(candidate ms, dense ms)`` (medians of the same interleaved
    measurement), cached per ``key``; ``measure(analysis, widths, keep)`` times a width subnet.
    ``bound(value, dense_value)`` sets the bound: a percentage is checked on the ratio of the two
    medians of one measurement, milliseconds on the candidate's median (``ok``); ``record`` is
    what a result keeps (``latency_search`` / ``decode_latency_search``). ``reference`` is the
    dense model the candidates are timed against (default ``analysis.model``; a staged search
    passes the original model, its stages pruned copies).

    Latency is measured, so it is noisy: two searches can pick neighbouring subnets, and near
    the bound a candidate can pass in one measurement and fail in another. Under
    ``torch.distributed`` (``group``), every rank times the candidate and the medians are
    averaged over the ranks, so all ranks take the same decisions.
    """

    def __init__(self, analysis: Analysis | None, example_input, uniform: bool = False,
                 repeats: int = 15, warmup: int = 2, group=None, *, kind: str = "latency",
                 reference: nn.Module | None = None, steps: int = DECODE_STEPS):
        check_choice("kind", kind, MEASURED_KEYS)
        self.kind, self.analysis, self.uniform, self.group = kind, analysis, uniform, group
        self.reference = reference if reference is not None else analysis.model
        self.repeats = check_int("repeats", repeats, min_value=1)
        self.warmup = check_int("warmup", warmup, min_value=0)
        self.steps = check_int("steps", steps, min_value=1)
        self.args = _as_args(example_input)
        if kind == "decode_latency":
            self.args = (check_decodes(self.reference, example_input),)
            self.batch_size = 1
        else:
            self.batch_size = int(self.args[0].shape[0]) if self.args and self.args[0].dim() else 1
        self._cache: dict = {}
        self._owner = None  # the analysis whose widths the cache keys name
        self._dense = None
        self.calls = 0  # candidates exported and timed
        self.bound_ms, self.ratio = None, None
        self.last = None  # (ms, dense ms) of the last candidate timed

    def _timer(self, models: dict) -> dict:
        if self.kind == "decode_latency":
            return _interleaved_decode_ms(models, self.args[0], self.steps, self.repeats, self.warmup)
        return _interleaved_ms(models, self.args, self.repeats, self.warmup)

    def time(self, key, build: Callable[[], nn.Module]) -> tuple:
        """``(ms, dense ms)`` of the model ``build()`` returns, timed against the reference."""
        if key not in self._cache:
            self.calls += 1
            times = self._timer({"pruned": build(), "dense": self.reference})
            self._cache[key] = self._agree(times["pruned"], times["dense"])
        self.last = self._cache[key]
        return self.last

    def measure(self, analysis_or_widths, widths: dict | None = None, keep: dict | None = None) -> tuple:
        """``measure(analysis, widths, keep)`` (or ``measure(widths, keep)`` on the probe's own
        analysis): the width subnet exported and timed."""
        if keep is None:
            analysis, widths, keep = self.analysis, analysis_or_widths, widths
        else:
            analysis = analysis_or_widths
        if analysis is not self._owner:  # another copy (a staged search): other subnets
            self._cache, self._owner = {}, analysis
        return self.time(tuple(sorted(widths.items())),
                         lambda: export_model(analysis, keep, uniform=self.uniform))

    def dense_ms(self) -> float:
        """The dense model alone (for a percentage bound's value in milliseconds), measured once."""
        if self._dense is None:
            self._dense = self._agree(self._timer({"dense": self.reference})["dense"])[0]
        return self._dense

    def bound(self, value, bound_ms: float) -> "LatencyProbe":
        """Set the bound: ``value`` as given (``"NN%"`` or ms) and its value in ms."""
        self.bound_ms = float(bound_ms)
        self.ratio = float(_PCT.match(value).group(1)) / 100.0 if isinstance(value, str) else None
        return self

    def ok(self, ms: float, dense_ms: float) -> bool:
        return ms / dense_ms <= self.ratio if self.ratio is not None else ms <= self.bound_ms

    def text(self, ms: float, dense_ms: float) -> str:
        unit = " per token" if self.kind == "decode_latency" else ""
        return f"{self.kind}={ms:.3f} ms{unit} ({ms / dense_ms:.1%} of the dense {dense_ms:.3f} ms, measured)"

    def record(self, ms: float, dense_ms: float) -> dict:
        out = {"batch_size": self.batch_size, "dense_ms": dense_ms, "pruned_ms": ms,
               "bound_ms": self.bound_ms, "bound_ratio": self.ratio, "repeats": self.repeats,
               "candidates_timed": self.calls}
        if self.kind == "decode_latency":
            out.update(decode_steps=self.steps, prompt_tokens=int(self.args[0].shape[1]))
        return out

    def _agree(self, *values: float) -> tuple:
        """``values`` averaged over the ranks of the process group (as they are without one)."""
        if self.group is None:
            return tuple(values)
        from .._distributed import all_reduce_tensors
        p = next(self.reference.parameters(), None)
        t = torch.tensor(values, dtype=torch.float64, device=p.device if p is not None else None)
        all_reduce_tensors([t], self.group, average=True)
        return tuple(float(v) for v in t.tolist())


def check_decodes(model: nn.Module, example_input) -> torch.Tensor:
    """The prompt for ``decode_latency`` (the first row of ``example_input``'s token ids, shape
    ``(1, T)``); ``ValueError`` unless ``model`` decodes with a key/value cache: ``model(ids,
    use_cache=True)`` returns ``logits`` and ``past_key_values``, and one cached step runs."""
    args = _as_args(example_input)
    ids = args[0] if args else None
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point() or ids.numel() == 0:
        raise ValueError(f"constraints['decode_latency'] needs example_input to be token ids of shape "
                         f"(batch, length) (an integer tensor), got {_describe_input(example_input)}")
    ids = ids[:1]
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            key = _cache_key(model)
            out = model(ids, use_cache=True)
            past, logits = getattr(out, key, None), getattr(out, "logits", None)
            if past is None or not isinstance(logits, torch.Tensor):
                raise ValueError(f"constraints['decode_latency'] needs a causal LM that decodes with a "
                                 f"key/value cache: {type(model).__name__}(input_ids, use_cache=True) "
                                 f"returned no {key} or no logits")
            model(logits[:, -1:].argmax(-1), use_cache=True, **{key: past})
    except (TypeError, RuntimeError, AttributeError, IndexError) as exc:
        raise ValueError(f"constraints['decode_latency'] needs a causal LM that decodes with a key/value "
                         f"cache: running {type(model).__name__}(input_ids, use_cache=True) and one cached "
                         f"step failed with {type(exc).__name__}: {str(exc).strip()[:200]}") from exc
    finally:
        model.train(was)
    return ids


def _cache_key(model: nn.Module) -> str:
    """transformers 5.2x calls the key/value cache ``cache``; earlier versions ``past_key_values``."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _decode_once(model: nn.Module, ids: torch.Tensor, steps: int) -> float:
    """Prefill ``ids`` (untimed), then ms per greedy one-token forward on the cache."""
    key = _cache_key(model)
    out = model(ids, use_cache=True)
    past, tok = getattr(out, key), out.logits[:, -1:].argmax(-1)
    _sync(model)
    start = time.perf_counter()
    for _ in range(steps):
        out = model(tok, use_cache=True, **{key: past})
        past, tok = getattr(out, key), out.logits[:, -1:].argmax(-1)
    _sync(model)
    return (time.perf_counter() - start) * 1e3 / steps


def _interleaved_decode_ms(models: dict, ids: torch.Tensor, steps: int, repeats: int, warmup: int) -> dict:
    """Median decode ms per token of each model at batch 1, timed round-robin (eval, no grad)."""
    return _round_robin(models, lambda m: _decode_once(m, ids, steps), repeats, warmup)


class _MeasuredBounds:
    """The measured bounds of a search on the layer, hidden or expert axis alone: ``accept(key,
    build)`` times the candidate ``build()`` returns with every probe; a candidate is accepted
    when every bound holds. ``records()`` are the measurements of the last candidate timed (the
    search stops at the first accepted one); ``text()`` describes it for an unmet bound."""

    def __init__(self, probes: dict):
        self.probes = probes

    def __call__(self, key, build: Callable[[], nn.Module]) -> bool:
        model = []

        def once():  # one build for every probe
            if not model:
                model.append(build())
            return model[0]
        return all([p.ok(*p.time(key, once)) for p in self.probes.values()])

    def text(self) -> str:
        return "".join(f", {p.text(*p.last)}" for p in self.probes.values() if p.last is not None)

    def asked(self) -> str:
        return "".join(f", {k} <= {p.bound_ms:.3f} ms" + (f" ({p.ratio:.1%} of dense)" if p.ratio else "")
                       for k, p in self.probes.items())

    def records(self) -> dict:
        return {k: p.record(*p.last) for k, p in self.probes.items()}


def make_probes(model: nn.Module, constraints: dict, example_input, analysis: Analysis | None = None,
                uniform: bool = False, group=None) -> dict:
    """One :class:`LatencyProbe` per measured key of ``constraints`` (built before scoring, so a
    model that cannot decode is refused first), each with its bound set."""
    probes = {}
    for key in MEASURED_KEYS:
        if key in constraints:
            p = LatencyProbe(analysis, example_input, uniform=uniform, group=group, kind=key, reference=model)
            value = constraints[key]
            dense = p.dense_ms() if isinstance(value, str) else 1.0
            probes[key] = p.bound(value, parse_constraints({key: value}, {key: dense})[key])
    return probes


def _sync(model: nn.Module) -> None:
    p = next(model.parameters(), None)
    if p is not None and p.device.type == "cuda":
        torch.cuda.synchronize(p.device)


def _interleaved_ms(models: dict, args: tuple, repeats: int, warmup: int) -> dict:
    """Median forward time (ms) of each model, timed round-robin (eval mode, no grad)."""
    def forward_ms(m):
        start = time.perf_counter()
        m(*args)
        _sync(m)
        return (time.perf_counter() - start) * 1e3
    return _round_robin(models, forward_ms, repeats, warmup)


def _round_robin(models: dict, run_ms: Callable, repeats: int, warmup: int) -> dict:
    """Median of ``run_ms(model)`` for each model: ``warmup`` untimed runs each, then ``repeats``
    rounds taking the models in turn, so all see the same machine load (eval mode, no grad; the
    models' modes are restored)."""
    modes = {k: m.training for k, m in models.items()}
    times = {k: [] for k in models}
    try:
        with torch.no_grad():
            for m in models.values():
                m.eval()
                for _ in range(warmup):
                    run_ms(m)
            for _ in range(repeats):
                for k, m in models.items():
                    times[k].append(run_ms(m))
    finally:
        for k, m in models.items():
            m.train(modes[k])
    return {k: float(statistics.median(v)) for k, v in times.items()}


def _group_choices(analysis: Analysis, rules: SearchRules) -> dict:
    modules = dict(analysis.model.named_modules())
    out = {}
    for gi, g in enumerate(analysis.groups):
        allowed = None
        for name, _ in g.owners:
            rule_type = g.rule_type or (g.handler.rule_type if g.handler is not None else None)
            rule = rules.rule_for(name, modules[name], rule_type)
            widths = {g.size} if rule is None else set(rule.widths(g.size))
            allowed = widths if allowed is None else allowed & widths
        allowed = allowed or {g.size}
        out[gi] = tuple(sorted(w for w in allowed if w % g.balance == 0) or (g.size,))
    return out


def _is_own_error(exc: BaseException) -> bool:
    """An input error gradprune raised itself (it already names what to change)."""
    return isinstance(exc, (TypeError, ValueError)) and "example_input" in str(exc)


def _describe_input(example_input) -> str:
    args = example_input if isinstance(example_input, (tuple, list)) else (example_input,)
    return ", ".join(f"shape {tuple(a.shape)}" if isinstance(a, torch.Tensor) else type(a).__name__
                     for a in args)


def _group_blockers(analysis: Analysis, rules: SearchRules, gi: int) -> list:
    """``(module, rule)`` pairs whose rule leaves group ``gi`` no width below its size."""
    g = analysis.groups[gi]
    modules = dict(analysis.model.named_modules())
    out = []
    for name, _ in g.owners:
        rule_type = g.rule_type or (g.handler.rule_type if g.handler is not None else None)
        rule = rules.rule_for(name, modules[name], rule_type)
        if rule is None or min(rule.widths(g.size)) >= g.size:
            out.append((name, rule))
    return out


def _rule_advice(rule, size: int, unit: str) -> str:
    """What in the rule keeps ``size`` units whole and how to relax it."""
    if rule is None:
        return "no rule prunes it (its type or name is excluded in rules=)"
    names = [f.name for f in dataclasses.fields(rule)]
    divisor = next((n for n in names if n.endswith("_divisor")), None)
    ratios = next((n for n in names if n.endswith("_ratio")), None)
    if divisor is not None:
        value = getattr(rule, divisor)
        for k in sorted({2 ** i for i in range(12)} | {value}, reverse=True):
            if k < value and min(dataclasses.replace(rule, **{divisor: k}).widths(size)) < size:
                return (f"{divisor}={value} leaves it unprunable ({size} {unit}); "
                        f"use {divisor}={k} or smaller")
    if ratios is not None:
        return (f"{ratios}={list(getattr(rule, ratios))} allows no width below {size} {unit}; "
                f"add smaller ratios")
    return f"its rule allows no width below {size} {unit}"


def _check_reachable(analysis: Analysis, choices: dict, cost, bounds: dict, rules: SearchRules,
                     kv: KVCache | None = None) -> None:
    """Raise before any scoring when even the smallest widths the rules allow miss a params or
    FLOPs bound; name the groups the rules keep whole and what to relax."""
    smallest = {gi: min(c) for gi, c in choices.items()}
    p, f = cost.costs(smallest)
    values = {"params": p, "flops": f, "kv_cache": kv.of(smallest) if kv is not None else 0}
    missed = {k: b for k, b in bounds.items() if k not in MEASURED_KEYS and values[k] > b}
    if not missed:
        return
    asked = ", ".join(f"{k} <= {b:g}" for k, b in bounds.items())
    blocked = []
    for gi, g in enumerate(analysis.groups):
        if smallest.get(gi, g.size) < g.size:
            continue
        for name, rule in _group_blockers(analysis, rules, gi):
            blocked.append(f"module {name!r} ({g.size} {g.unit}): {_rule_advice(rule, g.size, g.unit)}")
    if not analysis.groups:
        detail = " The model has no prunable groups at all (see result.skipped / find_groups(...).skipped)."
    elif blocked:
        shown = blocked[:8] + ([f"... and {len(blocked) - 8} more"] if len(blocked) > 8 else [])
        detail = " Groups the rules keep whole: " + "; ".join(shown) + "."
    else:
        detail = (" Every group is already at its smallest allowed width: allow smaller widths "
                  "(smaller ratios or divisors in rules=) or loosen the constraint.")
    raise ValueError(f"no subnet meets constraints ({asked}): the smallest reachable are "
                     f"params={p} ({p / cost.dense_params:.1%}) and flops={f} "
                     f"({f / max(cost.dense_flops, 1):.1%}){_kv_text(kv, smallest, bounds)} with these "
                     f"rules.{detail}")


def _kv_text(kv: KVCache, widths: dict, bounds: dict) -> str:
    if "kv_cache" not in bounds:
        return ""
    k = kv.of(widths)
    return f", kv_cache={k} bytes/token ({k / max(kv.dense, 1):.1%})"


def _ranking(scores: torch.Tensor, balance: int, tiebreak: torch.Tensor | None = None) -> list:
    """Units sorted by decreasing score, per balance chunk; ties by decreasing ``tiebreak`` (the
    weight norm), then lower index first."""
    n = scores.numel()
    chunk = n // balance
    ranks = []
    for c in range(balance):
        s = scores[c * chunk:(c + 1) * chunk].to(torch.float64)
        order = torch.arange(s.numel())
        if tiebreak is not None:
            order = torch.sort(-tiebreak[c * chunk:(c + 1) * chunk].to(torch.float64), stable=True).indices
        order = order[torch.sort(-s[order], stable=True).indices]  # stable: ties keep that order
        ranks.append((order + c * chunk).tolist())
    return ranks


def _warn_untied(analysis: Analysis, scores: dict, choices: dict, method: str) -> None:
    """Warn when the scores of a prunable group cannot rank its units (all equal: all zero, e.g.
    behind a zero-initialised classifier every gate gradient is 0); they are then ranked by weight
    norm and cut no further than the budget needs."""
    if method in ("magnitude", "fastnas"):
        return
    tied = [gi for gi, c in choices.items() if len(c) > 1 and scores[gi].numel() > 1
            and bool((scores[gi] == scores[gi].reshape(-1)[0]).all())]
    if not tied:
        return
    names = ", ".join(analysis.groups[gi].name for gi in tied[:5]) + (", ..." if len(tied) > 5 else "")
    zero = all(float(scores[gi].abs().max()) == 0.0 for gi in tied)
    warnings.warn(f"method={method!r} scores cannot rank the units of {len(tied)} of "
                  f"{len(analysis.groups)} groups ({names}): every unit scored "
                  f"{'0' if zero else 'the same'}{' (is the loss constant? e.g. a zero-initialised head)' if zero else ''}; "
                  "ranking them by the L2 norm of their weights instead", stacklevel=3)


def _keep_for(ranks: list, width: int) -> torch.Tensor:
    per = width // len(ranks)
    return torch.tensor(sorted(u for r in ranks for u in r[:per]), dtype=torch.long)


def _sensitivities(scores: torch.Tensor, ranks: list, choices: tuple) -> dict:
    out = {}
    scores = scores.to(torch.float64)
    for w in choices:
        removed = torch.ones(scores.numel(), dtype=torch.bool)
        removed[_keep_for(ranks, w)] = False
        out[w] = float(scores[removed].sum())
    return out


@keeps_modes
def search(model: nn.Module, constraints: dict, data: Iterable | None = None,
           loss_fn: Callable | None = None, method: str = "gradnas", example_input=None,
           rules: dict | SearchRules | None = None, score_func: Callable | None = None, *,
           max_iter_data_loader: int = 128, per_sample: bool = False, magnitude_norm: str = "l2",
           show_progress: bool | None = None, measure_latency: bool = False,
           uniform: bool = False, process_group=None,
           mlp_gate: str = "post_activation", axes: tuple | None = None,
           hidden_divisor: int | None = None, gradient_checkpointing: bool = False) -> SearchResult:
    """Find the subnet of ``model`` that meets every constraint with the least sensitivity.

    Args:
        model: any ``nn.Module`` that :func:`torch.fx.symbolic_trace` can trace (untraceable
            submodules are left unpruned and listed in ``result.skipped``).
        constraints: ``{"params": N or "NN%", "flops": N or "NN%", "latency": ms or "NN%"}``
            (any of them at once); percentages are of the dense model; FLOPs are 2 x MACs of one
            forward on ``example_input``; latency is the measured median forward time on
            ``example_input`` (its batch size, the model's device; see :class:`LatencyProbe`):
            each candidate that meets the other bounds is exported and timed. ``"kv_cache": bytes
            or "NN%"`` bounds the key/value-cache bytes per token of context, counted from the
            kept key/value heads (see :mod:`gradprune.structured.kvcache`). ``"decode_latency":
            ms or "NN%"`` (causal LMs) bounds the measured ms per token of greedy decoding at
            batch 1 on the key/value cache after a prefill of ``example_input``'s first row
            (:class:`LatencyProbe`; a model that cannot decode is refused before scoring). Every
            key works on every axis and combination of axes; the measurement that checked a
            measured bound is ``result.latency_search`` / ``result.decode_latency_search``.
        data, loss_fn: batches and ``loss_fn(model, batch) -> scalar`` for the gradient methods
            (for a causal LM, :func:`~gradprune.structured.lm_loss.causal_lm_loss` gives the
            next-token loss with the logits of one chunk of tokens at a time).
            For ``fastnas`` both are optional: with ``data``, BatchNorm statistics are
            re-estimated on its first ``max_iter_data_loader`` batches (held in memory; run with
            ``loss_fn``, or ``model(batch[0])`` without it) before every evaluation, with the
            candidate's units off (see :func:`recalibrate_batchnorm`).
        method: a registered width score (:data:`~gradprune.structured.scoring.WIDTH_SCORES`):
            ``gradnas``, ``taylor``, ``fisher``, ``michel``, ``activation``, ``magnitude`` or
            ``fastnas``.
        example_input: a tensor or a tuple of tensors for one forward (batch on dim 0).
        rules: search-space rules (see :mod:`gradprune.structured.rules`).
        score_func: ``score_func(model) -> float`` (higher is better), for ``fastnas``.
        max_iter_data_loader: at most this many batches are scored (exactly this many when the
            data has them).
        per_sample: for ``gradnas``, square per-sample instead of per-batch gate gradients.
        magnitude_norm: ``l2`` or ``l1`` for ``magnitude``.
        process_group: score under ``torch.distributed`` (or pass a ``DistributedDataParallel``
            model): every rank feeds its own shard of each batch; gate gradients are averaged over
            the ranks per batch (per-sample sums are added), so every rank finds the same subnet
            as one process on the global batches; latency measurements are averaged over the
            ranks. A ``fully_shard``-ed (FSDP2) model is taken as it is (its shards' group by
            default): the structure is analysed on a meta-device copy, the gates score the shards,
            and weight norms are summed from each rank's rows; ``fastnas`` and latency are refused,
            and :meth:`SearchResult.export` needs ``model=`` an unsharded copy with whole weights
            (``docs/distributed.md``).
        measure_latency: also time the dense and the exported model on CPU at batch sizes 1
            and 32 (:meth:`SearchResult.latency`; ``result.latency_ms``, on every axis).
        uniform: (Hugging Face models) search one common width per family of groups (the
            heads, the FFN neurons of every layer): the sensitivity of a width is the sum over
            layers; the export then has a plain config that ``from_pretrained`` loads. BERT and
            GPT-2 heads are kept (their config derives the head size from the head count).
        mlp_gate: where a recognised transformer MLP's neurons are gated (Hugging Face models):
            ``"post_activation"`` (the activation's output, the default) or ``"pre_activation"``
            (the up projection's output, where ModelOpt's gradnas gates BERT's
            ``intermediate.dense``); gated MLPs (``act(gate) * up``) are gated on ``up`` either way.
        axes: what may be removed (default ``("heads", "mlp")``, the widths above).
            ``("layers",)`` drops whole decoder layers instead (``method``: ``gradnas``,
            ``block_influence`` or ``loss_drop``; a :class:`~gradprune.structured.depth.LayerSearchResult`
            is returned; see :mod:`gradprune.structured.depth`). ``("hidden",)`` prunes
            residual-stream channels (``gradnas`` or ``activation``; a
            :class:`~gradprune.structured.hidden.HiddenSearchResult`; see
            :mod:`gradprune.structured.hidden`). ``("experts",)`` removes whole MoE experts per
            layer (``method``: ``gradnas``, ``reap`` or ``frequency``; ``params`` and ``flops``
            budgets; an :class:`~gradprune.structured.experts.ExpertSearchResult`; see
            :mod:`gradprune.structured.experts`). Any combination of several axes with
            ``"layers"``, ``"hidden"`` or ``"experts"`` among them (``gradnas`` only; every
            constraint key) is a staged search
            (:mod:`gradprune.structured.staged`) that returns the width result on the copy
            pruned on the other axes; an axis with nothing to prune there (``"experts"`` on a
            dense model, ``"hidden"`` on a model whose residual stream is not understood) is left
            whole and named in ``result.axes_skipped`` and the report.
        hidden_divisor: with ``"hidden"`` in ``axes``: the hidden size stays a multiple of it
            (default: the largest power of two up to 64 that divides ``hidden_size``).

        gradient_checkpointing: recompute each decoder layer's activations in the backward
            pass while gate gradients are taken (the same scores; less memory: see
            :mod:`gradprune.structured.checkpointing`); gate-gradient width scores and the
            ``gradnas`` layer score.

    Raises ``ValueError`` naming the smallest reachable params and FLOPs (and latency) when no
    subnet meets the constraints.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    axes = check_axes(axes)
    check_bool("gradient_checkpointing", gradient_checkpointing)
    check_choice("mlp_gate", mlp_gate, ("post_activation", "pre_activation"))
    if hidden_divisor is not None and "hidden" not in axes:
        raise ValueError(f"hidden_divisor={hidden_divisor!r} needs 'hidden' in axes, got axes={axes!r}")
    staged = [a for a in STAGES if a in axes]
    if staged and process_group is not None:
        raise ValueError(f"the {staged[0]!r} axis does not take process_group yet")
    if staged:
        check_bool("measure_latency", measure_latency)
    if len(axes) > 1 and staged:  # several axes, one of them not a width: a staged search
        found = staged_search(model, constraints, data, loss_fn, method, example_input, axes,
                              _search_widths, uniform=uniform, max_iter_data_loader=max_iter_data_loader,
                              show_progress=show_progress, hidden_divisor=hidden_divisor,
                              gradient_checkpointing=gradient_checkpointing, rules=rules,
                              per_sample=per_sample, mlp_gate=mlp_gate)
        if measure_latency:
            found.latency()
        return found
    if staged:  # one of the layer, hidden and expert axes alone
        return _search_axis(model, constraints, data, loss_fn, method, example_input, axes[0], rules=rules,
                            per_sample=per_sample, hidden_divisor=hidden_divisor, uniform=uniform,
                            max_iter_data_loader=max_iter_data_loader, show_progress=show_progress,
                            gradient_checkpointing=gradient_checkpointing, measure_latency=measure_latency)
    return _search_widths(model, constraints, data, loss_fn, method, example_input, axes, rules,
                          score_func, max_iter_data_loader=max_iter_data_loader, per_sample=per_sample,
                          magnitude_norm=magnitude_norm, show_progress=show_progress,
                          measure_latency=measure_latency, uniform=uniform, process_group=process_group,
                          mlp_gate=mlp_gate, gradient_checkpointing=gradient_checkpointing)


def _search_axis(model, constraints, data, loss_fn, method, example_input, axis: str, *, rules, per_sample,
                 hidden_divisor, uniform, max_iter_data_loader, show_progress, gradient_checkpointing,
                 measure_latency):
    """The layer, hidden or expert axis alone. Measured bounds (``latency``, ``decode_latency``):
    the axis search takes candidates from the least removed up and stops at the first that meets
    the counted bounds and, timed against the dense model, every measured one (``accept``)."""
    from .depth import check_axis_inputs

    what = f"axes=({axis!r},)"
    if rules is not None:
        raise ValueError(f"{what} does not take rules (they restrict widths)"
                         + ("; use hidden_divisor" if axis == "hidden" else ""))
    if axis == "hidden" and per_sample:
        raise ValueError("axes=('hidden',) does not take per_sample=True (its gradnas score is per batch)")
    accept, counted = None, constraints
    if isinstance(constraints, dict) and any(k in constraints for k in MEASURED_KEYS):
        check_axis_inputs(what, data, loss_fn, constraints, CONSTRAINT_KEYS, example_input, max_iter_data_loader)
        accept = _MeasuredBounds(make_probes(model, constraints, example_input))  # before scoring
        # the counted bounds alone; with none, params <= 100% holds for every candidate
        counted = {k: v for k, v in constraints.items() if k not in MEASURED_KEYS} or {"params": "100%"}
    if axis == "hidden":
        from .hidden import search_hidden
        found = search_hidden(model, counted, data, loss_fn, method, example_input,
                              hidden_divisor=hidden_divisor, max_iter_data_loader=max_iter_data_loader,
                              show_progress=show_progress, accept=accept)
    elif axis == "experts":
        from .experts import search_experts
        found = search_experts(model, counted, data, loss_fn, method, example_input, uniform=uniform,
                               max_iter_data_loader=max_iter_data_loader, show_progress=show_progress,
                               accept=accept)
    else:
        found = search_layers(model, counted, data, loss_fn, method, example_input,
                              max_iter_data_loader=max_iter_data_loader, show_progress=show_progress,
                              gradient_checkpointing=gradient_checkpointing, accept=accept)
    if accept is not None:
        found.constraints = {**{k: v for k, v in found.constraints.items() if k in constraints},
                             **{k: p.bound_ms for k, p in accept.probes.items()}}
        for key, rec in accept.records().items():
            setattr(found, f"{key}_search", rec)
    if measure_latency:
        found.latency_ms = latency_table(model, found.export(), _rows_of(example_input))
    return found
def _search_widths(model: nn.Module, constraints: dict, data, loss_fn, method: str, example_input,
                   axes: tuple, rules=None, score_func=None, *, max_iter_data_loader: int = 128,
                   per_sample: bool = False, magnitude_norm: str = "l2", show_progress=None,
                   measure_latency: bool = False, uniform: bool = False, process_group=None,
                   mlp_gate: str = "post_activation", gradient_checkpointing: bool = False,
                   latency_probes: dict | None = None) -> SearchResult:
    """The width search of :func:`search` on the groups of ``axes`` (``"heads"``, ``"mlp"``; an
    empty tuple keeps every width and only checks the budget, as the last stage of a staged
    search does). ``latency_probes``: the :class:`LatencyProbe` of each measured constraint
    (a staged search builds them once on the original model; default: built here)."""
    spec = width_score(method)
    if spec.source == "activations" and process_group is not None:
        raise ValueError("method='activation' does not take process_group yet")
    if example_input is None:
        raise ValueError("example_input must be given (a tensor or a tuple of tensors), got None")
    _as_args(example_input)
    check_int("max_iter_data_loader", max_iter_data_loader, min_value=1)
    check_bool("per_sample", per_sample)
    check_choice("magnitude_norm", magnitude_norm, ("l1", "l2"))
    check_bool("measure_latency", measure_latency)
    check_optional_bool("show_progress", show_progress)
    if spec.needs_data:
        if data is None:
            raise ValueError(f"data must be an iterable of batches for method={method!r}, got None")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(model, batch) for method={method!r}, "
                            f"got {type(loss_fn).__name__}")
    if method == "fastnas" and not callable(score_func):
        raise TypeError(f"score_func must be callable as score_func(model) -> float for method='fastnas', "
                        f"got {type(score_func).__name__}")
    check_bool("uniform", uniform)
    check_choice("mlp_gate", mlp_gate, ("post_activation", "pre_activation"))
    parse_constraints(constraints, {k: 1.0 for k in CONSTRAINT_KEYS})  # syntax, before any work
    if not isinstance(rules, SearchRules):
        rules = SearchRules(rules)

    from .._distributed import meta_structure, resolve_process_group, sharded_group, to_meta

    model, group = resolve_process_group(model, process_group)
    if next(model.parameters(), None) is None:
        raise ValueError(f"model has no parameters: there is nothing to search over "
                         f"(got an empty {type(model).__name__})")
    shards = sharded_group(model)
    if shards is not None:  # FSDP2: analyse a meta copy of the structure, score on the shards
        bad = [k for k, v in (("method='fastnas'", method == "fastnas"), ("a latency constraint", any(k in constraints for k in MEASURED_KEYS)),
                              ("measure_latency=True", measure_latency)) if v]
        if bad:
            raise ValueError(f"search on a fully_shard-ed (FSDP2) model does not take {', '.join(bad)}: "
                             "they run or time exported candidates, which needs whole weights; search "
                             "with gradnas, taylor, michel or magnitude and params/flops/kv_cache bounds")
        if group is None:
            group = shards
    try:
        if shards is None:
            analysis = find_groups(model, example_input, mlp_gate=mlp_gate)
            cost = CostModel(analysis, example_input)
        else:
            meta_input = to_meta(example_input)
            analysis = find_groups(meta_structure(model), meta_input, mlp_gate=mlp_gate)
            cost = CostModel(analysis, meta_input)
            analysis = dataclasses.replace(analysis, model=model)  # gates hook the sharded modules
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        if _is_own_error(exc):
            raise
        raise ValueError(f"example_input does not fit the model: running "
                         f"{type(model).__name__} on example_input "
                         f"({_describe_input(example_input)}) failed with "
                         f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                         ) from exc
    batch_gated = [g.name for g in analysis.groups
                   if getattr(g.handler, "per_sample", True) is False and group_axis(g) in axes]
    if batch_gated and ((method == "gradnas" and per_sample) or method == "michel"):
        raise ValueError(f"per-sample gate gradients (per_sample=True, method='michel') are not "
                         f"available for {batch_gated[0]} (MoE experts mix every sample's tokens); "
                         "use per_sample=False or axes without 'mlp'")
    fams = {}
    if uniform:
        from .hf import families, uniform_width_ok
        fams = families(analysis)
        if not fams:
            raise ValueError("uniform=True needs a Hugging Face model with recognised attention "
                             "or MLP blocks (see find_groups(...).skipped)")
    kv = KVCache(analysis)
    dense = {"params": cost.dense_params, "flops": cost.dense_flops, "kv_cache": kv.dense}
    if "kv_cache" in constraints and not kv.dense:
        raise ValueError("constraints['kv_cache']: the model has no attention whose key/value cache "
                         "gradprune can count (no head groups, no Hugging Face config)")
    if latency_probes is None:  # built before scoring; a staged search passes its own
        latency_probes = make_probes(analysis.model, constraints, example_input, analysis, uniform, group)
    for key, p in latency_probes.items():
        dense[key] = p.dense_ms() if isinstance(constraints[key], str) else 1.0
    bounds = parse_constraints(constraints, dense)
    choices = _group_choices(analysis, rules)
    for gi in choices:  # a group of an axis not in ``axes`` keeps its width
        if group_axis(analysis.groups[gi]) not in axes:
            choices[gi] = (analysis.groups[gi].size,)
    config_kept = []  # uniform: families the rules would narrow but no config width can express
    for (kind, size), gis in fams.items():  # uniform: the widths every layer of the family allows
        ruled = set.intersection(*(set(choices[gi]) for gi in gis))
        common = {w for w in ruled if all(uniform_width_ok(analysis, gi, w) for gi in gis)}
        common = common or {size}
        if common == {size} and any(w < size for w in ruled):
            from .hf import uniform_kept_reason
            why = uniform_kept_reason(analysis, gis, [w for w in ruled if w < size])
            config_kept.append(f"{kind} ({size} {analysis.groups[gis[0]].unit} in each of {len(gis)} "
                               f"layers) kept whole by uniform=True: {why}; to prune them, search "
                               "per layer (uniform=False) and reload with load_pruned_pretrained")
        for gi in gis:
            choices[gi] = tuple(sorted(common))

    _check_reachable(analysis, choices, cost, bounds, rules, kv)  # from the rules alone, before scoring

    batches, summary = 0, {}
    if not any(len(c) > 1 for c in choices.values()):  # every width fixed (e.g. axes=()): nothing to score
        scores = {gi: torch.zeros(g.size) for gi, g in enumerate(analysis.groups)}
    elif spec.source == "gates":
        stats = gate_statistics(analysis, data, loss_fn, n_batches=max_iter_data_loader,
                                show_progress=show_progress, process_group=group,
                                gradient_checkpointing=gradient_checkpointing)
        kind = "gradnas_per_sample" if method == "gradnas" and per_sample else spec.statistic
        scores = stats.score(kind) if analysis.groups else {}
        batches, summary = stats.count, stats.summary()
    elif spec.source == "activations":
        if group is not None:
            raise ValueError("method='activation' does not take process_group yet")
        scores, batches = activation_scores(analysis, data, loss_fn, n_batches=max_iter_data_loader,
                                            show_progress=show_progress) if analysis.groups else ({}, 0)
    elif method == "fastnas":  # units ordered as ModelOpt sorts channels: by the consumers' weights
        scores = magnitude_scores(analysis, "l2", side="in")
    else:
        scores = magnitude_scores(analysis, magnitude_norm)

    norms = scores if method in ("magnitude", "fastnas") else magnitude_scores(analysis, "l2")
    ranks = {gi: _ranking(scores[gi], g.balance, norms[gi]) for gi, g in enumerate(analysis.groups)}
    _warn_untied(analysis, scores, choices, method)
    if method == "fastnas":
        calib = None
        if data is not None:
            calib = list(itertools.islice(iter(data), max_iter_data_loader))
        sens = _fastnas_sensitivities(analysis, choices, ranks, score_func, show_progress, calib,
                                      loss_fn if callable(loss_fn) else None)
        _break_ties(sens, analysis, ranks, scores)
    else:
        comparable = scores
        if not spec.calibrated:  # activation / weight norms: each kind of group on its own scale
            scale = per_kind_scale(analysis, scores, [gi for gi, c in choices.items() if len(c) > 1])
            summary = {**summary, "kind_scale": scale}
            comparable = {gi: s.to(torch.float64) / scale.get(analysis.groups[gi].unit, 1.0)
                          for gi, s in scores.items()}
        sens = {gi: _sensitivities(comparable[gi], ranks[gi], choices[gi]) for gi in choices}
        _break_ties(sens, analysis, ranks, norms)  # equal scores: cut no further than needed
    for gis in fams.values():  # uniform: a family's width costs the sum over its layers
        total = {w: sum(sens[gi][w] for gi in gis) for w in choices[gis[0]]}
        for gi in gis:
            sens[gi] = dict(total)

    def pick(t: float) -> dict:
        return {gi: min(w for w in choices[gi] if sens[gi][w] <= t or w == analysis.groups[gi].size)
                for gi in choices}

    def measured(widths: dict) -> dict:
        keep = {gi: _keep_for(ranks[gi], widths[gi]) for gi in widths}
        return {k: p.measure(analysis, widths, keep) for k, p in latency_probes.items()}

    def meets(widths: dict) -> bool:
        p, f = cost.costs(widths)
        values = {"params": p, "flops": f, "kv_cache": kv.of(widths)}
        if not all(values[k] <= b for k, b in bounds.items() if k not in MEASURED_KEYS):
            return False
        return all(latency_probes[k].ok(*v) for k, v in measured(widths).items())

    thresholds = sorted({v for s in sens.values() for v in s.values()} | {0.0})
    hi = len(thresholds) - 1
    if not meets(pick(thresholds[hi])):
        smallest = pick(thresholds[hi])
        p, f = cost.costs(smallest)
        asked = ", ".join(f"{k} <= {b:g}" for k, b in bounds.items())
        lat = "".join(f", {latency_probes[k].text(*v)}" for k, v in measured(smallest).items())
        raise ValueError(f"no subnet meets constraints ({asked}): the smallest reachable are "
                         f"params={p} ({p / cost.dense_params:.1%}) and flops={f} "
                         f"({f / max(cost.dense_flops, 1):.1%}){_kv_text(kv, smallest, bounds)}{lat} "
                         "with these rules")
    lo = -1  # thresholds[lo] fails (or lo = -1: nothing checked yet)
    bar = progress(total=max(1, math.ceil(math.log2(len(thresholds) + 1))), desc="budget search",
                   enable=show_progress)
    try:
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if meets(pick(thresholds[mid])):
                hi = mid
            else:
                lo = mid
            bar.update(1)
    finally:
        bar.close()
    t = thresholds[hi]
    widths = pick(t)
    keep = {gi: _keep_for(ranks[gi], widths[gi]) for gi in widths}
    p, f = cost.costs(widths)
    result = SearchResult(analysis=analysis, method=method, choices=choices, widths=widths,
                          keep=keep, scores=scores, sensitivity=sens, params=p, flops=f,
                          dense_params=cost.dense_params, dense_flops=cost.dense_flops,
                          constraints=bounds, threshold=t, batches=batches, score_summary=summary,
                          example_input=example_input, uniform=uniform, kv_cache=kv.of(widths),
                          dense_kv_cache=kv.dense, config_kept=config_kept)
    for key, (ms, dense_ms) in measured(widths).items():
        setattr(result, f"{key}_search", latency_probes[key].record(ms, dense_ms))
    if measure_latency:
        result.latency()
    return result


def _check_same_structure(searched: nn.Module, model: nn.Module) -> None:
    """``ValueError`` unless ``model`` has the searched model's parameter names and whole shapes."""
    want = {n: tuple(p.shape) for n, p in searched.named_parameters()}
    got = {n: tuple(p.shape) for n, p in model.named_parameters()}
    if want != got:
        diff = sorted(n for n in set(want) | set(got) if want.get(n) != got.get(n))
        raise ValueError(f"model is not the searched architecture: parameters differ in name or shape: "
                         f"{', '.join(diff[:5])}{' ...' if len(diff) > 5 else ''}")


def _fastnas_sensitivities(analysis, choices, ranks, score_func, show_progress,
                           calib=None, forward=None) -> dict:
    """``score(dense) - score(group at width w)`` per group and width, one evaluation each.

    Widths are tried from the smallest up; once a width loses nothing (``<= 0``), the wider ones
    are not evaluated (they are 0). With ``calib`` (batches, run with ``forward(model, batch)``)
    BatchNorm running statistics are re-estimated before every evaluation, with the candidate's
    units off (the dense baseline too), so a score measures the pruning and not statistics that
    no longer match; the model's own statistics are restored at the end. Sensitivities are made
    monotone: a narrower width never looks less sensitive than a wider one.
    """
    model = analysis.model
    was_training = model.training
    bns = [m for m in model.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    recalibrate = calib is not None and bool(bns)
    # recalibrate_batchnorm restores each layer's mode and momentum itself; the statistics are ours
    saved = [(b.running_mean.clone(), b.running_var.clone(), b.num_batches_tracked.clone())
             for b in bns] if recalibrate else []

    def evaluate() -> float:
        if recalibrate:
            recalibrate_batchnorm(model, calib, forward, modules=bns)
        return _score(score_func, model)

    n_evals = sum(len(c) - 1 for c in choices.values())
    bar = progress(total=n_evals + 1, desc="fastnas", enable=show_progress)
    out = {}
    try:
        model.eval()
        with torch.no_grad():
            base = evaluate()
            bar.update(1)
            for gi, ch in choices.items():
                size = analysis.groups[gi].size
                out[gi] = {size: 0.0}
                lossless = False
                for w in sorted(ch):
                    if w == size:
                        continue
                    if not lossless:
                        with Gates(analysis, keep={gi: _keep_for(ranks[gi], w)}):
                            out[gi][w] = base - evaluate()
                        lossless = out[gi][w] <= 0.0
                    else:
                        out[gi][w] = 0.0
                    bar.update(1)
                running = 0.0  # monotone: from the widest down, never below a wider width's value
                for w in sorted(out[gi], reverse=True):
                    running = out[gi][w] = max(out[gi][w], running)
    finally:
        bar.close()
        with torch.no_grad():
            for b, (mean, var, count) in zip(bns, saved):
                b.running_mean.copy_(mean)
                b.running_var.copy_(var)
                b.num_batches_tracked.copy_(count)
        model.train(was_training)
    return out


def _break_ties(sens: dict, analysis, ranks: dict, norms: dict) -> None:
    """Measured sensitivities tie often (an accuracy moves in steps of one sample; every lossless
    width is 0), and the smallest width under a threshold would then cut more than the budget
    needs. Add a tie-breaker far below any measured difference: the fraction of the group's
    consumer-side weight norm (``norms``, the scores fastnas ranks units by) the width removes
    (monotone in the width, like the sensitivity)."""
    values = sorted({v for d in sens.values() for v in d.values()})
    gaps = [b - a for a, b in zip(values, values[1:]) if b - a > 0]
    delta = 1e-3 * min(gaps) if gaps else 1e-9
    for gi, d in sens.items():
        total = float(norms[gi].sum()) or 1.0
        for w in d:
            if w != analysis.groups[gi].size:
                kept = float(norms[gi][_keep_for(ranks[gi], w)].sum())
                d[w] += delta * (total - kept) / total


def recalibrate_batchnorm(model: nn.Module, data: Iterable, forward: Callable | None = None,
                          max_batches: int | None = None, modules: list | None = None) -> nn.Module:
    """Re-estimate the running statistics of every BatchNorm layer of ``model`` on ``data``
    (no weight changes): statistics are reset, then averaged over the batches (cumulative
    average, as ``momentum=None``), with only the BatchNorm layers in training mode. Useful after
    :meth:`SearchResult.export`, whose BatchNorm statistics were estimated with the removed
    channels present.

    ``forward(model, batch)`` runs one batch (default: ``model(batch[0])`` for a tuple/list
    batch, else ``model(batch)``; a ``loss_fn(model, batch)`` works too, its value is ignored);
    at most ``max_batches`` batches are used. Returns ``model``.

    Example:
        >>> import torch, torch.nn as nn
        >>> from gradprune.structured import recalibrate_batchnorm
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8)).eval()
        >>> batches = [(torch.randn(16, 4) + 3.0, None) for _ in range(4)]
        >>> _ = recalibrate_batchnorm(net, batches)
        >>> bool(net[1].running_mean.abs().sum() > 0), net.training
        (True, False)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if forward is not None and not callable(forward):
        raise TypeError(f"forward must be callable as forward(model, batch), got {type(forward).__name__}")
    if max_batches is not None:
        check_int("max_batches", max_batches, min_value=1)
    if modules is None:
        modules = [m for m in model.modules()
                   if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if forward is None:
        def forward(m, batch):
            return m(batch[0]) if isinstance(batch, (tuple, list)) else m(batch)
    modes = [(b.training, b.momentum) for b in modules]
    try:
        for b in modules:
            b.reset_running_stats()
            b.momentum = None
            b.train()
        with torch.no_grad():
            for i, batch in enumerate(data):
                if max_batches is not None and i >= max_batches:
                    break
                forward(model, batch)
    finally:
        for b, (training, momentum) in zip(modules, modes):
            b.train(training)
            b.momentum = momentum
    return model


def _score(score_func, model) -> float:
    v = score_func(model)
    if isinstance(v, torch.Tensor):
        v = float(v.detach())
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"score_func must return a finite float, got {v!r}")
    return float(v)
