"""Feature-targeted pre-pruning (GRADIEND's ``PrePruneConfig`` / ``pre_prune``), batched and exact.

Choose the individual parameter entries of a model that matter for a *feature* — the contrast
between a factual and an alternative (counterfactual) target — from the mean gradient over
``n_samples`` stratified samples, before a costly step that only looks at those entries.

Semantics:

- **Sampling.** Items are dicts carrying a class under ``feature_class_key``. The target classes are
  ``target_feature_class_ids``, else ``definition.get_target_feature_class_ids()``, else every class
  present (sorted). Each class gets ``n_samples // n_classes`` items, the remainder going to the
  first classes. Per class, a seeded permutation of its items is taken in order, so a smaller
  ``n_samples`` gives a *prefix* of a larger one (classes interleaved round-robin). A class with too
  few items is used whole and filled by seeded sampling with replacement, with a warning.
- **Gradients.** ``source``: ``factual``, ``alternative``, or ``diff`` = factual - alternative.
  ``statistic="mean"`` (default) is GRADIENDS's importance ``|mean over samples of the signed
  gradient|``; since the mean is linear it costs ``ceil(n / batch_size)`` backward passes of a
  summed loss (two per batch for ``diff``), accumulated in ``.grad`` in place: memory is
  O(parameters), independent of ``n_samples``. ``"mean_abs"`` (mean ``|g|``) and ``"mean_sq"``
  (mean ``g^2``) need per-sample gradients: computed with ``torch.func.vmap(grad(...))`` in chunks
  of ``batch_size``.
- **loss_fn(model, batch, target)** returns either a 1-D tensor of per-sample losses or their mean
  over the batch (a scalar); either way each sample weighs the same, exactly as one pass per sample.
- **Selection**, over all selected parameters at once: existing ``mask`` -> ``threshold`` (keep
  importance >= threshold) -> ``topk`` (int: a count, capped at what remains; float in (0, 1]:
  ``ceil(topk * remaining)``, rounded up, unlike the sparsity counts' half up, so that every
  ``topk > 0`` keeps at least one entry, as GRADIEND did; the README's counting rule says so); ties keep the lowest flat index (parameters in model order). The
  global top-k uses a bisection over the score order, never one tensor of all importances.
- **Cache.** With ``cache_dir``, the result is stored under a key fingerprinting everything it
  depends on: every parameter and buffer of the model (not only the scored ones: BatchNorm
  statistics too), each module's type and train/eval mode, the names of the scored parameters, the
  code of ``loss_fn`` and ``collate_fn`` (bytecode, constants, names, defaults, closure cells and
  the globals they read, recursively; installed libraries by name), the sampled items and their
  indices, and every config field that changes the result; an identical call reuses it, any change
  recomputes. State that the loss reads is part of the key, so a loss that appends to a list on
  every call misses every time. An input that cannot be fingerprinted honestly (a callable without
  Python code, an object of a library class holding native state, such as a fast tokenizer) raises
  ``ValueError`` unless ``config.cache_key`` is given; that string then stands in for it, and the
  caller changes it whenever that input changes. With
  ``use_cached_gradients=True``, a call that differs only in the selection (``topk``,
  ``threshold``, ``mask``) also reuses the importances of an earlier run.

Example:
    >>> import torch, torch.nn as nn
    >>> import gradprune as gp
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> data = [{"x": torch.randn(4), "feature_class_id": i % 2, "factual": i % 2,
    ...          "alternative": 1 - i % 2} for i in range(20)]
    >>> def loss_fn(model, batch, target):
    ...     return nn.functional.cross_entropy(model(batch["x"]), batch[target])
    >>> sel = gp.pre_prune(model, data, gp.PrePruneConfig(n_samples=8, topk=5, source="diff"), loss_fn)
    >>> sum(len(i) for i in sel.indices.values())
    5
    >>> sel.report.samples_per_class
    {0: 4, 1: 4}
"""

from __future__ import annotations

import enum
import functools
import hashlib
import os
import sys
import types
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ._checks import (check_bool, check_choice, check_float, check_int, check_names, check_optional_bool,
                      check_topk)
from ._progress import progress
from ._modes import keeps_modes
from .config import Config, atomic_write
from ._distributed import (RowShard, all_reduce_gradients, all_reduce_tensors, is_dtensor, local,
                                       resolve_process_group, sum_over_ranks)
from ._report import SelectionReport
from .masks import MaskSet
from .scores import scoring_context
from .select import Units, select

__all__ = ["PrePruneConfig", "pre_prune", "PrePruneSelection", "sample_indices"]

SOURCES = ("factual", "alternative", "diff")
PREPRUNE_STATISTICS = ("mean", "mean_abs", "mean_sq")


@dataclass(eq=False)
class PrePruneConfig(Config):
    """Config for pre-pruning: the gradient mean over ``n_samples`` samples, then ``topk``/``threshold``.

    Fields: ``n_samples`` (total samples), ``topk`` (int count or float fraction in (0, 1];
    ``topk=1.0`` keeps everything, ``topk=1`` keeps one entry), ``threshold`` (keep importance >=
    threshold), ``source`` (``factual`` | ``alternative`` | ``diff``), ``batch_size`` (samples per
    backward pass, default 8), ``dataset`` (use this instead of the one passed to ``pre_prune``),
    ``feature_class_key`` (default ``"feature_class_id"``), ``target_feature_class_ids`` (classes to
    stratify over), ``use_cached_gradients``, ``seed``, ``mask`` (``{name: bool tensor}``: in the
    parameters it names, only its True entries are candidates; others are unrestricted), ``cache_dir``,
    ``statistic`` (``mean`` | ``mean_abs`` | ``mean_sq``), ``cache_key`` (stands in, in the cache
    key, for inputs that cannot be fingerprinted: see :func:`pre_prune`).

    Example:
        >>> import gradprune as gp
        >>> print(gp.PrePruneConfig(n_samples=16, topk=0.01, source="diff"))
        PrePruneConfig(n_samples=16, topk=0.01, threshold=None, source='diff')
        >>> gp.PrePruneConfig(n_samples=16)
        Traceback (most recent call last):
        ...
        ValueError: PrePruneConfig: at least one of topk or threshold must be set
    """

    n_samples: int
    topk: int | float | None = None
    threshold: float | None = None
    source: str = "factual"
    batch_size: int = 8
    dataset: Any = None
    feature_class_key: str = "feature_class_id"
    target_feature_class_ids: tuple | None = None
    use_cached_gradients: bool = False
    seed: int = 0
    mask: Any = None
    cache_dir: str | None = None
    statistic: str = "mean"
    cache_key: str | None = None

    _validate_n_samples = staticmethod(lambda v: check_int("n_samples", v, min_value=1))
    _validate_topk = staticmethod(lambda v: check_topk("topk", v))
    # importance is |mean gradient| (or mean |g|, mean g^2): never negative
    _validate_threshold = staticmethod(lambda v: check_float("threshold", v, low=0.0, allow_none=True))
    _validate_batch_size = staticmethod(lambda v: check_int("batch_size", v, min_value=1))
    _validate_seed = staticmethod(lambda v: check_int("seed", v, min_value=0))

    _validate_source = staticmethod(lambda v: check_choice("source", v, SOURCES))
    _validate_statistic = staticmethod(lambda v: check_choice("statistic", v, PREPRUNE_STATISTICS))

    @staticmethod
    def _validate_dataset(v):
        if v is not None and not isinstance(v, Sequence):
            raise TypeError(f"dataset must be a sequence of dict items, got {type(v).__name__}")
        return v

    @staticmethod
    def _validate_feature_class_key(v):
        if not isinstance(v, str):
            raise TypeError(f"feature_class_key must be str, got {type(v).__name__}")
        return v

    @staticmethod
    def _validate_target_feature_class_ids(v):
        if v is None:
            return None
        if not isinstance(v, (list, tuple)):
            raise TypeError(f"target_feature_class_ids must be a list, got {type(v).__name__}")
        if not v:
            raise ValueError("target_feature_class_ids must not be empty, got []")
        for c in v:
            if isinstance(c, bool) or not isinstance(c, (int, str)):
                raise TypeError(f"target_feature_class_ids items must be int or str, got {type(c).__name__}")
        if len(set(v)) != len(v):
            raise ValueError(f"target_feature_class_ids must not repeat a class, got {list(v)!r}")
        return tuple(v)

    _validate_use_cached_gradients = staticmethod(lambda v: check_bool("use_cached_gradients", v))

    @staticmethod
    def _validate_mask(v):
        if v is None:
            return None
        if not isinstance(v, Mapping):
            raise TypeError(f"mask must be a mapping name -> bool tensor, got {type(v).__name__}")
        for k, m in v.items():
            if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
                raise TypeError(f"mask[{k!r}] must be a bool tensor, got "
                                f"{m.dtype if isinstance(m, torch.Tensor) else type(m).__name__}")
        return v

    @staticmethod
    def _validate_cache_key(v):
        if v is not None and (not isinstance(v, str) or not v):
            raise TypeError(f"cache_key must be a non-empty str or None, got {v!r}")
        return v

    @staticmethod
    def _validate_cache_dir(v):
        if v is None:
            return None
        if not isinstance(v, (str, os.PathLike)):
            raise TypeError(f"cache_dir must be str or a path, got {type(v).__name__}")
        return os.fspath(v)

    def _check(self) -> None:
        if self.topk is None and self.threshold is None:
            raise ValueError("PrePruneConfig: at least one of topk or threshold must be set")

    def __str__(self) -> str:
        return (f"PrePruneConfig(n_samples={self.n_samples}, topk={self.topk!r}, "
                f"threshold={self.threshold!r}, source={self.source!r})")


@dataclass
class PrePruneSelection:
    """The result of :func:`pre_prune`.

    ``masks``: a :class:`MaskSet` of kept entries per parameter; ``indices``: kept flat indices per
    parameter (sorted); ``importance``: importance tensor per parameter; ``report``: a
    :class:`~gradprune.report.SelectionReport` (``print(sel.report)``; counts, time, samples per
    class, backward passes and cache use as attributes: ``sel.report.kept_total``). Reading it
    as the dict it was, ``sel.report["kept_total"]``, is deprecated.
    """

    masks: MaskSet
    indices: dict
    importance: dict
    report: SelectionReport

    def __post_init__(self):
        if isinstance(self.report, Mapping):  # built with the dict of earlier versions
            self.report = SelectionReport(self.masks, self.report)


# ---------------------------------------------------------------------------------------------
# sampling

def sample_indices(classes: Sequence[Any], targets: Sequence[Any], n_samples: int, seed: int):
    """Stratified, seeded, nested sample of item indices.

    ``classes[i]`` is item ``i``'s class. Returns ``(indices, per_class_counts, filled_classes)``.
    """
    by_class = {c: [] for c in targets}
    for i, c in enumerate(classes):
        if c in by_class:
            by_class[c].append(i)
    n_cls = len(targets)
    quota = {c: n_samples // n_cls + (1 if k < n_samples % n_cls else 0) for k, c in enumerate(targets)}
    streams, filled = {}, []
    for k, c in enumerate(targets):
        items = by_class[c]
        if not items:
            raise ValueError(f"feature class {c!r} has no items in the dataset")
        gen = torch.Generator().manual_seed(seed * 1_000_003 + k)
        order = [items[j] for j in torch.randperm(len(items), generator=gen).tolist()]
        if quota[c] > len(order):
            extra = torch.randint(len(items), (quota[c] - len(order),), generator=gen).tolist()
            order += [items[j] for j in extra]
            filled.append(c)
        streams[c] = order[: quota[c]]
    indices = []
    for r in range(max(quota.values())):  # round-robin: any prefix is stratified
        for c in targets:
            if r < quota[c]:
                indices.append(streams[c][r])
    return indices, quota, filled


# ---------------------------------------------------------------------------------------------
# fingerprints for the cache

class _Unkeyable(Exception):
    """An input whose content cannot be fingerprinted honestly (see ``PrePruneConfig.cache_key``)."""


def _library_paths() -> tuple:
    import sysconfig

    paths = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    return tuple(os.path.realpath(p) + os.sep for p in paths if p)


_LIBRARY_PATHS = None


def _is_library(module_name: str | None) -> bool:
    """Installed or standard-library code (keyed by name; its version is fixed for a process)."""
    global _LIBRARY_PATHS
    if _LIBRARY_PATHS is None:
        _LIBRARY_PATHS = _library_paths()
    if not module_name:
        return False
    mod = sys.modules.get(module_name)
    if mod is None:
        return False
    path = getattr(mod, "__file__", None)
    if path is None:  # built into the interpreter; else e.g. a notebook's __main__: user code
        return module_name.partition(".")[0] in sys.builtin_module_names
    return os.path.realpath(path).startswith(_LIBRARY_PATHS)


def _global_names(code) -> set:
    names = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names |= _global_names(c)
    return names


class _Hasher:
    """Feeds values into a sha256: tensors by their bytes, functions by their code, closure cells,
    defaults and the globals they read (recursively), objects by their class and ``__dict__``.
    Anything else raises :class:`_Unkeyable`."""

    def __init__(self):
        self.h = hashlib.sha256()
        self.seen: dict[int, int] = {}
        self._keep = []  # keeps visited objects alive, so their ids are not reused

    def tag(self, text: str) -> None:
        self.h.update(text.encode() + b";")

    def _enter(self, obj) -> bool:
        """False (after feeding a back-reference) when ``obj`` was fed already."""
        if id(obj) in self.seen:
            self.tag(f"@{self.seen[id(obj)]}")
            return False
        self.seen[id(obj)] = len(self.seen)
        self._keep.append(obj)
        return True

    def value(self, obj) -> None:
        if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes, bytearray)):
            self.tag(f"{type(obj).__name__}:{obj!r}")
        elif obj is Ellipsis or obj is NotImplemented:
            self.tag(repr(obj))
        elif isinstance(obj, torch.Tensor):
            t = obj.detach()
            if t.layout != torch.strided:
                t = t.to_dense()
            t = t.cpu().contiguous().reshape(-1)
            self.tag(f"T{t.dtype}{tuple(obj.shape)}")
            self.h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(obj, enum.Enum):
            self.cls(type(obj))
            self.tag(f"enum:{obj.name}")
        elif isinstance(obj, types.ModuleType):
            self.tag(f"module:{obj.__name__}")
        elif isinstance(obj, (torch.dtype, torch.device)):
            self.tag(f"{type(obj).__name__}:{obj}")
        elif _is_numpy(obj):
            import numpy as np

            arr = np.asarray(obj)
            if arr.dtype == object:
                self.value(arr.tolist())
            else:
                self.tag(f"np{arr.dtype}")
                self.value(torch.from_numpy(np.ascontiguousarray(arr).reshape(-1).view(np.uint8)))
                self.tag(str(arr.shape))
        elif isinstance(obj, (list, tuple)):
            if self._enter(obj):
                self.tag(f"{type(obj).__name__}[{len(obj)}")
                for v in obj:
                    self.value(v)
                self.tag("]")
        elif isinstance(obj, Mapping):
            if self._enter(obj):
                self.tag(f"{{{len(obj)}")
                for k in sorted(obj, key=repr):
                    self.value(k)
                    self.value(obj[k])
                self.tag("}")
        elif isinstance(obj, (set, frozenset)):
            sub = []
            for v in obj:
                one = _Hasher()
                one.value(v)
                sub.append(one.h.hexdigest())
            self.tag(f"set:{sorted(sub)}")
        elif isinstance(obj, type):
            self.cls(obj)
        elif callable(obj) and not hasattr(obj, "__dict__") or isinstance(
                obj, (types.FunctionType, types.MethodType, types.BuiltinFunctionType, functools.partial)):
            self.func(obj)
        elif isinstance(obj, (staticmethod, classmethod)):
            self.tag(type(obj).__name__)
            self.func(obj.__func__)
        elif isinstance(obj, property):
            self.tag("property")
            for f in (obj.fget, obj.fset, obj.fdel):
                self.value(f)
        elif hasattr(obj, "__dict__") and not isinstance(obj, type) and _plain_state(obj):
            if self._enter(obj):
                self.cls(type(obj))
                self.value(vars(obj))
        else:
            raise _Unkeyable(f"a {type(obj).__module__}.{type(obj).__qualname__} object (no content "
                             f"to fingerprint)")

    def _open(self, obj, kind: str) -> bool:
        """Tag a class or function by name; True when its content is to be fed (user code, first visit)."""
        name = f"{obj.__module__}.{obj.__qualname__}"
        if _is_library(obj.__module__):  # by name and the installed package's version
            top = sys.modules.get(obj.__module__.partition(".")[0])
            self.tag(f"lib{kind}:{name}@{getattr(top, '__version__', '')}")
            return False
        if not self._enter(obj):
            return False
        self.tag(f"{kind}:{name}")
        return True

    def cls(self, c: type) -> None:
        if not self._open(c, "class"):
            return
        for base in c.__bases__:
            self.cls(base)
        for k, v in sorted(vars(c).items()):
            if k in ("__dict__", "__weakref__", "__doc__", "__module__", "__qualname__"):
                continue
            self.tag(k)
            self.value(v)

    def code(self, code: types.CodeType) -> None:
        self.tag(f"code:{code.co_name}")
        self.h.update(code.co_code)
        self.tag(repr((code.co_names, code.co_varnames, code.co_freevars, code.co_cellvars)))
        for c in code.co_consts:
            if isinstance(c, types.CodeType):
                self.code(c)
            else:
                self.value(c)

    def func(self, fn) -> None:
        if isinstance(fn, functools.partial):
            self.tag("partial")
            self.func(fn.func)
            self.value(fn.args)
            self.value(fn.keywords)
        elif isinstance(fn, types.MethodType):
            self.tag("method")
            self.func(fn.__func__)
            self.value(fn.__self__)
        elif isinstance(fn, types.FunctionType):
            if not self._open(fn, "fn"):
                return
            self.code(fn.__code__)
            self.value(fn.__defaults__)
            self.value(fn.__kwdefaults__)
            for cell in fn.__closure__ or ():
                try:
                    self.value(cell.cell_contents)
                except ValueError:  # an empty cell
                    self.tag("<empty cell>")
            for gname in sorted(_global_names(fn.__code__)):
                if gname in fn.__globals__:
                    self.tag(f"global:{gname}")
                    self.value(fn.__globals__[gname])
        elif isinstance(fn, (types.BuiltinFunctionType, types.BuiltinMethodType, types.WrapperDescriptorType,
                             types.MethodDescriptorType, types.MethodWrapperType)):
            owner = getattr(fn, "__self__", None)
            self.tag(f"builtin:{getattr(fn, '__module__', None)}.{getattr(fn, '__qualname__', fn)}")
            if owner is not None and not isinstance(owner, types.ModuleType):
                self.value(owner)
        elif isinstance(fn, type):
            self.cls(fn)
        else:
            raise _Unkeyable(f"a callable {type(fn).__module__}.{type(fn).__qualname__} object without "
                             f"code to fingerprint")

    def hexdigest(self) -> str:
        return self.h.hexdigest()


def _is_numpy(obj) -> bool:
    np = sys.modules.get("numpy")
    return np is not None and isinstance(obj, (np.ndarray, np.generic))


def _plain_state(obj) -> bool:
    """Objects whose whole state is their ``__dict__``: instances of user classes and of
    ``nn.Module`` (parameters and buffers live in the ``__dict__``)."""
    return isinstance(obj, nn.Module) or not _is_library(type(obj).__module__)


def _fingerprint(*parts) -> str:
    """sha256 of ``parts``; raises :class:`_Unkeyable` for content that cannot be fingerprinted."""
    h = _Hasher()
    for p in parts:
        h.value(p)
    return h.hexdigest()


def _model_fingerprint(model: nn.Module) -> str:
    """Every module's type and mode and every parameter and buffer (persistent or not)."""
    h = _Hasher()
    for name, mod in model.named_modules(remove_duplicate=False):
        h.tag(f"{name}:{type(mod).__module__}.{type(mod).__qualname__}:{mod.training}")
        for pname, p in mod.named_parameters(recurse=False):
            h.tag(f"p:{pname}:{p.requires_grad}")
            h.value(p)
        for bname, b in mod.named_buffers(recurse=False):
            h.tag(f"b:{bname}")
            h.value(b)
    return h.hexdigest()


def _cache_keys(config, model, chosen, loss_fn, collate, data, indices, targets) -> tuple[str, str]:
    """``(gradient key, selection key)``: everything the result depends on. An input that cannot
    be fingerprinted is replaced by ``config.cache_key``; without one, ``ValueError``."""
    unkeyed = []

    def part(what, *values):
        try:
            return _fingerprint(*values)
        except _Unkeyable as exc:
            unkeyed.append(f"{what} holds {exc}")
            return "unkeyed"

    model_fp = _model_fingerprint(model)
    inputs = (part("loss_fn", loss_fn), part("collate_fn", collate),
              part("the sampled data", indices, [data[i] for i in indices]),
              part("target_feature_class_ids", targets), part("mask", config.mask))
    if unkeyed and config.cache_key is None:
        raise ValueError(
            "pre_prune cannot key its cache on every input: " + "; ".join(unkeyed) + ". Pass "
            "PrePruneConfig(cache_key='...') naming that input's version (change it whenever the input "
            "changes), or drop cache_dir")
    grad_key = _fingerprint("grad-v2", model_fp, list(chosen), inputs[:4], config.source,
                            config.statistic, config.batch_size, config.feature_class_key, config.seed,
                            config.n_samples, config.cache_key)
    sel_key = _fingerprint("sel-v2", grad_key, config.topk, config.threshold, inputs[4])
    return grad_key, sel_key


def _load_cache(path: str, key: str):
    if not os.path.isfile(path):
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a damaged cache file is recomputed, never trusted
        return None
    if not isinstance(state, dict) or state.get("key") != key:
        return None
    return state


# ---------------------------------------------------------------------------------------------
# gradients

def _targets_of(source: str):
    if source == "factual":
        return (("factual", 1.0),)
    if source == "alternative":
        return (("alternative", 1.0),)
    return (("factual", 1.0), ("alternative", -1.0))


def _batch_size_of(batch) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, Mapping):
        for v in batch.values():
            n = _batch_size_of(v)
            if n:
                return n
    if isinstance(batch, (list, tuple)) and batch:
        first = _batch_size_of(batch[0])
        return first if first else len(batch)
    return 0


def _summed_loss(loss, n_in_batch: int, loss_fn_name: str) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"{loss_fn_name} must return a tensor, got {type(loss).__name__}")
    if loss.dim() == 0:
        return loss * n_in_batch
    if loss.dim() == 1 and loss.shape[0] == n_in_batch:
        return loss.sum()
    raise ValueError(f"{loss_fn_name} must return a scalar (mean over the batch) or one loss per "
                     f"sample (shape [{n_in_batch}]), got shape {tuple(loss.shape)}")


def _mean_gradient(model, params, chunks, collate, loss_fn, source, n, bar, group=None):
    passes = 0
    for chunk_items in chunks:
        batch = collate(chunk_items)
        b = len(chunk_items)
        for target, sign in _targets_of(source):
            loss = _summed_loss(loss_fn(model, batch, target), b, "loss_fn")
            if not torch.isfinite(loss.detach()):
                raise ValueError(f"loss_fn returned a non-finite loss for target {target!r}")
            (loss * (sign / n)).backward()
            passes += 1
        bar.update(1)
    if group is not None:  # each rank summed its share of the samples: add the shares up
        all_reduce_gradients(params, group, average=False)
    grads = {name: (p.grad if p.grad is not None else torch.zeros_like(p)) for name, p in params.items()}
    return {name: g.detach().abs().float() for name, g in grads.items()}, passes


def _per_sample_statistic(model, params, chunks, collate, loss_fn, source, n, statistic, bar, group=None):
    from torch.func import functional_call, grad, vmap  # noqa: F401  (functional_call: API check)
    from torch.nn.utils.stateless import _reparametrize_module

    names = list(params)
    acc = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}
    detached = {k: p.detach() for k, p in params.items()}
    passes = 0

    def sample_loss(pvals, sample):
        batch1 = _unsqueeze(sample)
        total = 0.0
        with _reparametrize_module(model, dict(zip(names, pvals))):
            for target, sign in _targets_of(source):
                loss = _summed_loss(loss_fn(model, batch1, target), 1, "loss_fn")
                total = total + sign * loss
        return total

    per_sample_grad = vmap(grad(sample_loss), in_dims=(None, 0))
    for chunk_items in chunks:
        batch = collate(chunk_items)
        _check_tensor_leaves(batch)
        g = per_sample_grad(tuple(detached[k] for k in names), batch)
        for k, gk in zip(names, g):
            gk = gk.float()
            acc[k].add_((gk.abs() if statistic == "mean_abs" else gk * gk).sum(0), alpha=1.0 / n)
        passes += len(_targets_of(source))
        bar.update(1)
    if group is not None:
        all_reduce_tensors(list(acc.values()), group)
    return acc, passes


def _unsqueeze(sample):
    if isinstance(sample, torch.Tensor):
        return sample.unsqueeze(0)
    if isinstance(sample, Mapping):
        return {k: _unsqueeze(v) for k, v in sample.items()}
    if isinstance(sample, (list, tuple)):
        return type(sample)(_unsqueeze(v) for v in sample)
    return sample


def _check_tensor_leaves(batch, path="batch"):
    if isinstance(batch, torch.Tensor):
        return
    if isinstance(batch, Mapping):
        for k, v in batch.items():
            _check_tensor_leaves(v, f"{path}[{k!r}]")
        return
    if isinstance(batch, (list, tuple)):
        for i, v in enumerate(batch):
            _check_tensor_leaves(v, f"{path}[{i}]")
        return
    raise TypeError(f"statistic 'mean_abs'/'mean_sq' needs batches of tensors only; {path} is "
                    f"{type(batch).__name__} (drop it in collate_fn or use statistic='mean')")


# ---------------------------------------------------------------------------------------------

@keeps_modes
def pre_prune(
    model: nn.Module,
    dataset: Sequence[Mapping] | None,
    config: PrePruneConfig,
    loss_fn: Callable,
    definition: Any = None,
    *,
    collate_fn: Callable | None = None,
    params: Sequence[str] | None = None,
    show_progress: bool | None = None,
    process_group: Any = None,
) -> PrePruneSelection:
    """Select the parameter entries that matter for a feature contrast (see the module docs).

    Args:
        model: any ``nn.Module`` (e.g. a Hugging Face masked or causal LM). Not modified: its
            mode, ``requires_grad`` flags and gradients are restored.
        dataset: a sequence of dict items (``config.dataset`` overrides it).
        config: a :class:`PrePruneConfig`.
        loss_fn: ``loss_fn(model, batch, target)`` with ``target`` in ``{"factual", "alternative"}``.
        definition: optional object with ``get_target_feature_class_ids()``.
        collate_fn: builds a batch from a list of items (default
            ``torch.utils.data.default_collate``).
        params: names of the parameters to score (default: every parameter that requires grad).
        process_group: split the work over the ranks of a ``torch.distributed`` group (implied by a
            ``DistributedDataParallel`` model, whose inner ``.module`` is what ``loss_fn`` gets):
            every rank passes the whole dataset and the same config, takes its share of the seeded
            sample's batches, and the statistics are summed over the ranks, so every rank gets the
            selection of a single-process run (``report.backward_passes`` counts this rank's).
    """
    start = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, PrePruneConfig):
        raise TypeError(f"config must be a PrePruneConfig, got {type(config).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(model, batch, target), got {type(loss_fn).__name__}")
    check_optional_bool("show_progress", show_progress)
    if config.cache_dir is not None and os.path.exists(config.cache_dir) and not os.path.isdir(config.cache_dir):
        raise ValueError(f"cache_dir must be a folder, but {config.cache_dir} is an existing file")
    data = config.dataset if config.dataset is not None else dataset
    if data is None or not isinstance(data, Sequence) or isinstance(data, (str, bytes)):
        raise TypeError(f"dataset must be a sequence of dict items, got {type(data).__name__}")
    if len(data) == 0:
        raise ValueError("dataset must not be empty")
    key = config.feature_class_key
    classes = []
    for i in range(len(data)):
        item = data[i]
        if not isinstance(item, Mapping):
            raise TypeError(f"dataset items must be dicts, got {type(item).__name__} at index {i}")
        if key not in item:
            raise ValueError(f"dataset item {i} has no feature_class_key {key!r} (keys: {sorted(item)})")
        c = item[key]
        classes.append(c.item() if isinstance(c, torch.Tensor) else c)
    if config.target_feature_class_ids is not None:
        targets = list(config.target_feature_class_ids)
    elif definition is not None:
        if not hasattr(definition, "get_target_feature_class_ids"):
            raise TypeError("definition must have get_target_feature_class_ids(), got "
                            f"{type(definition).__name__}")
        targets = list(definition.get_target_feature_class_ids())
    else:
        targets = sorted(set(classes), key=repr)
    collate = collate_fn
    if collate is None:
        from torch.utils.data import default_collate as collate
    elif not callable(collate):
        raise TypeError(f"collate_fn must be callable, got {type(collate).__name__}")

    all_params = dict(model.named_parameters())
    if params is None:
        chosen = {n: p for n, p in all_params.items() if p.requires_grad}
    else:
        params = check_names("params", params)
        missing = [n for n in params if n not in all_params]
        if missing:
            raise ValueError(f"params not in the model: {missing}")
        chosen = {n: all_params[n] for n in params}
    if not chosen:
        raise ValueError("no parameters to score (none requires grad)")
    if config.mask is not None:
        for n, m in config.mask.items():
            if n not in chosen:
                raise ValueError(f"mask names a parameter that is not scored: {n!r}")
            if m.shape != chosen[n].shape:
                raise ValueError(f"mask[{n!r}] must have shape {tuple(chosen[n].shape)}, got {tuple(m.shape)}")
    # FSDP2 (fully_shard): every rank runs every sample and FSDP averages the gradients; each rank
    # then scores and selects its own rows, together with the others (exact global top-k)
    shards = {n: RowShard(n, p) for n, p in chosen.items() if is_dtensor(p)}
    if shards and (process_group is not None or config.cache_dir is not None):
        raise ValueError("pre_prune on a fully_shard-ed model: FSDP2 already reduces the gradients; pass "
                         "the whole dataset on every rank without process_group= and cache_dir= (got "
                         f"process_group={process_group!r}, cache_dir={config.cache_dir!r})")
    if shards and config.statistic != "mean":
        raise ValueError(f"pre_prune on a fully_shard-ed model supports statistic='mean' (FSDP2 reduces "
                         f"batch gradients; no rank holds whole per-sample gradients), got "
                         f"statistic={config.statistic!r}")

    indices, per_class, filled = sample_indices(classes, targets, config.n_samples, config.seed)
    if filled:
        warnings.warn(f"pre_prune: feature classes {filled} have fewer items than their share of "
                      f"n_samples={config.n_samples}; sampled with replacement", UserWarning, stacklevel=2)

    grad_key = sel_key = None
    importance = None
    cache_hit = None
    if config.cache_dir is not None:
        grad_key, sel_key = _cache_keys(config, model, chosen, loss_fn, collate, data, indices, targets)
        sel_path = os.path.join(config.cache_dir, f"preprune-sel-{sel_key[:40]}.pt")
        grad_path = os.path.join(config.cache_dir, f"preprune-grad-{grad_key[:40]}.pt")
        cached = _load_cache(sel_path, sel_key)
        if cached is not None:
            cache_hit = "selection"
            importance = cached["importance"]
        elif config.use_cached_gradients:
            cached = _load_cache(grad_path, grad_key)
            if cached is not None:
                cache_hit = "gradients"
                importance = cached["importance"]
        if importance is not None and set(importance) != set(chosen):
            importance, cache_hit = None, None

    run_model, group = resolve_process_group(model, process_group)
    rank, world = 0, 1
    if group is not None:
        rank, world = torch.distributed.get_rank(group), torch.distributed.get_world_size(group)
        if rank != 0:
            show_progress = False
        if config.cache_dir is not None:  # recompute everywhere unless every rank hit the cache
            device = next(iter(chosen.values())).device
            if sum_over_ranks([int(importance is None)], group, device)[0]:
                importance, cache_hit = None, None
    passes = 0
    if importance is None:
        items = [data[i] for i in indices]
        chunks = [items[i:i + config.batch_size] for i in range(0, len(items), config.batch_size)]
        chunks = chunks[rank::world]
        # a DDP model runs as its inner module: per-sample gradients address its parameters by
        # their names there (without DDP's "module." prefix)
        prefix = "module." if run_model is not model else ""
        inner = {n[len(prefix):]: p for n, p in chosen.items()}
        bar = progress(total=len(chunks), desc=f"pre_prune ({config.source})", enable=show_progress)
        try:
            with scoring_context(model, chosen):
                if config.statistic == "mean":
                    importance, passes = _mean_gradient(run_model, inner, chunks, collate, loss_fn,
                                                        config.source, len(items), bar, group)
                else:
                    importance, passes = _per_sample_statistic(run_model, inner, chunks, collate, loss_fn,
                                                               config.source, len(items),
                                                               config.statistic, bar, group)
        finally:
            bar.close()
        importance = {prefix + n: t for n, t in importance.items()}
        if config.cache_dir is not None and rank == 0:
            cpu_imp = {n: t.detach().cpu() for n, t in importance.items()}
            atomic_write(grad_path, lambda t: torch.save({"key": grad_key, "importance": cpu_imp}, t))
    importance = {n: t.to(chosen[n].device) for n, t in importance.items()}

    layers = []
    for n, p in chosen.items():
        spec, pruned = shards.get(n), None
        if config.mask is not None and n in config.mask:
            m = config.mask[n].to(p.device)
            pruned = ~(m[spec.start:spec.stop] if spec is not None else m).reshape(-1)
        layers.append(Units(n, local(importance[n]).reshape(-1), 1, p.numel(), pruned,
                            group=spec.group if spec is not None else None,
                            total=p.numel() if spec is not None else None))
    keep = select(layers, topk=config.topk, threshold=config.threshold, scope="global")
    masks = MaskSet(model, names=list(chosen), masks={n: keep[n].reshape(local(chosen[n]).shape) for n in chosen})
    # a sharded parameter: this rank's kept entries, as indices into the whole flattened parameter
    kept_idx = {n: torch.nonzero(keep[n]).flatten().cpu()
                + (shards[n].start * (p.numel() // max(1, p.shape[0])) if n in shards and p.dim() else 0)
                for n, p in chosen.items()}
    if config.cache_dir is not None and cache_hit != "selection" and rank == 0:
        cpu_imp = {n: t.detach().cpu() for n, t in importance.items()}
        atomic_write(sel_path, lambda t: torch.save(
            {"key": sel_key, "importance": cpu_imp, "indices": kept_idx}, t))
    total = sum(p.numel() for p in chosen.values())
    kept = {n: k for n, (k, _) in masks.layer_counts().items()} if shards else \
        {n: int(i.numel()) for n, i in kept_idx.items()}
    kept_total = sum(kept.values())
    report = {
        "kept": kept,
        "kept_total": kept_total,
        "total": total,
        "samples": len(indices),
        "samples_per_class": dict(per_class),
        "filled_with_replacement": filled,
        "backward_passes": passes,
        "cache": cache_hit,
        "seconds": time.perf_counter() - start,
    }
    return PrePruneSelection(masks, kept_idx, importance, SelectionReport(masks, report))
