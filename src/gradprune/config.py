"""Typed, validated configuration objects.

Each config is a dataclass whose fields are checked when they are set (at construction *and* on
later assignment): a wrong type raises ``TypeError`` naming the field and the type received, a wrong
value raises ``ValueError`` naming the field and the value. ``from_dict`` rejects unknown keys with
the list of valid ones; ``to_dict``/``from_dict`` and ``to_yaml``/``from_yaml`` round-trip.

Example:
    >>> import gradprune as gp
    >>> cfg = gp.PruneConfig(criterion="snip", pattern="4x1", target_sparsity=0.8)
    >>> gp.PruneConfig.from_dict(cfg.to_dict()) == cfg
    True
    >>> gp.PruneConfig(scope="globl")
    Traceback (most recent call last):
    ...
    ValueError: scope must be one of global, local; got 'globl'
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field, fields
from typing import Any, Callable, ClassVar

from ._checks import (COUNT_ROUNDINGS, check_bool, check_choice, check_float, check_int, check_str_list, check_threshold,
                      check_topk)
from ._io import atomic_write  # re-exported: gradprune.config.atomic_write

__all__ = ["Config", "PruneConfig", "SCHEDULES", "SCOPES", "ALLOCATIONS", "REDUCTIONS", "COUNT_ROUNDINGS",
           "parse_pattern", "atomic_write", "yaml_load"]

SCHEDULES = ("oneshot", "cubic", "exp", "linear", "cos", "cube")
SCOPES = ("global", "local")
ALLOCATIONS = ("uniform", "er", "erk", "owl")
REDUCTIONS = ("mean", "sum", "max")
ACCUMULATIONS = ("mean", "last")
DEFAULT_MODULE_TYPES = ("Linear", "Conv1d", "Conv2d", "Conv3d", "Conv1D", "MultiheadAttention")

REGEX_PREFIX = "re:"  # an include/exclude pattern "re:<regex>" is a regular expression (fullmatch)


def check_name_patterns(name: str, value: Any, *, allow_none: bool = False):
    """``include``/``exclude``: a tuple of ``fnmatch`` globs or ``"re:<regex>"`` strings.

    A regular expression that does not compile raises ``ValueError`` naming the field and pattern.

    Example:
        >>> check_name_patterns("exclude", ["2", "re:layer[0-5]"])
        ('2', 're:layer[0-5]')
        >>> check_name_patterns("include", ["re:layer[0-"])
        Traceback (most recent call last):
        ...
        ValueError: include pattern 're:layer[0-' is not a valid regular expression: unterminated character set at position 5
    """
    value = check_str_list(name, value, allow_none=allow_none)
    for pat in value or ():
        if pat.startswith(REGEX_PREFIX):
            try:
                re.compile(pat[len(REGEX_PREFIX):])
            except re.error as e:
                raise ValueError(f"{name} pattern {pat!r} is not a valid regular expression: {e}") from None
    return value


_BLOCK_RE = re.compile(r"^(\d+)x(\d+)$")
_NM_RE = re.compile(r"^(\d+):(\d+)(?:-flat)?$")


def parse_pattern(value: Any) -> tuple:
    """Parse a pattern string into a tuple ``(kind, a, b)``.

    ``"1x1"`` -> ``("block", 1, 1)``; ``"4x1"`` -> ``("block", 4, 1)`` (4 output rows x 1 input
    column); ``"2:4"`` -> ``("nm", 2, 4)`` (2 weights KEPT in every 4 consecutive along the input
    dimension, NVIDIA's meaning; a conv groups input channels at each kernel position, and
    ``"2:4-flat"`` groups its flattened ``(in, kernel)`` axis instead); ``"channel"`` and ``"kernel"``
    -> ``(kind, 0, 0)``.

    Neural Compressor's ``"N:M"`` meant N *pruned* of M: its ``"1:4"`` is gradprune's ``"3:4"``.
    """
    if isinstance(value, int) and not isinstance(value, bool) and value >= 60 and 0 < value % 60:
        n, m = divmod(value, 60)
        raise TypeError(
            f"pattern must be str, got int {value}: YAML 1.1 (yaml.safe_load) reads an unquoted "
            f"{n}:{m} as the base-60 integer {value}; quote it: pattern: \"{n}:{m}\" "
            "(gradprune's own YAML readers take it unquoted)")
    if not isinstance(value, str):
        raise TypeError(f"pattern must be str, got {type(value).__name__}")
    if value in ("channel", "kernel"):
        return (value, 0, 0)
    m = _BLOCK_RE.match(value)
    if m:
        n, k = int(m.group(1)), int(m.group(2))
        if n < 1 or k < 1:
            raise ValueError(f"pattern block sizes must be >= 1, got {value!r}")
        return ("block", n, k)
    m = _NM_RE.match(value)
    if m:
        n, k = int(m.group(1)), int(m.group(2))
        if not 1 <= n < k:
            raise ValueError(f"pattern N:M needs 1 <= N < M, got {value!r}")
        return ("nm", n, k)
    raise ValueError(
        f"pattern must be '1x1', 'NxM' (e.g. '4x1'), 'N:M' (e.g. '2:4', '2:4-flat'), 'channel' or 'kernel'; "
        f"got {value!r}"
    )


class Config:
    """Base of every config dataclass: validation on assignment, dict and YAML round-trips.

    Subclasses define ``_validate_<field>(value) -> value`` for each field and may define
    ``_check()`` for rules that involve several fields (run after construction and by ``validate``).
    """

    _initialised: ClassVar[bool] = False

    def __setattr__(self, name: str, value: Any) -> None:
        checker = getattr(type(self), f"_validate_{name}", None)
        if checker is not None:
            value = checker(value)
        if not self.__dict__.get("_ready", False):
            object.__setattr__(self, name, value)
            return
        if name not in self.field_names():
            raise AttributeError(
                f"{type(self).__name__} has no field {name!r}; valid keys: {', '.join(self.field_names())}"
            )
        old = getattr(self, name)
        object.__setattr__(self, name, value)
        try:
            self._check()
        except Exception:
            object.__setattr__(self, name, old)  # a rejected assignment leaves the config as it was
            raise

    def __post_init__(self) -> None:
        self._check()
        object.__setattr__(self, "_ready", True)

    def _check(self) -> None:  # cross-field rules
        pass

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def to_dict(self) -> dict:
        """A plain dict of every field (lists, not tuples), suitable for JSON or YAML."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, tuple):
                v = list(v)
            elif isinstance(v, dict):
                v = dict(v)
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, data: Any):
        """Build from a mapping; unknown keys raise ``ValueError`` listing the valid ones."""
        if not isinstance(data, dict):
            raise TypeError(f"{cls.__name__} data must be a dict, got {type(data).__name__}")
        valid = cls.field_names()
        unknown = sorted(k for k in data if k not in valid)
        if unknown:
            raise ValueError(
                f"unknown {cls.__name__} key(s) {', '.join(map(repr, unknown))}; "
                f"valid keys: {', '.join(valid)}"
            )
        return cls(**data)

    def to_yaml(self, path: str | os.PathLike | None = None) -> str:
        """Return the config as YAML text, and write it atomically to ``path`` if given."""
        yaml = _import_yaml()
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            def write(tmp):
                with open(tmp, "w", encoding="utf-8") as fh:
                    fh.write(text)
            atomic_write(path, write)
        return text

    @classmethod
    def from_yaml(cls, text_or_path: str | os.PathLike):
        """Build from YAML text or a ``.yaml``/``.yml`` file (read with ``yaml.safe_load``)."""
        yaml = _import_yaml()
        source = os.fspath(text_or_path)
        if source.endswith((".yaml", ".yml")) or os.path.isfile(source):
            with open(source, encoding="utf-8") as fh:
                source = fh.read()
        del yaml
        return cls.from_dict(yaml_load(source) or {})

    def replace(self, **changes):
        """A copy with some fields changed (validated like the constructor)."""
        return dataclasses.replace(self, **changes)


def _import_yaml():
    try:
        import yaml
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("YAML support needs PyYAML: pip install 'gradprune[yaml]'") from exc
    return yaml


# YAML 1.2 scalars in a safe loader: PyYAML's YAML 1.1 reads an unquoted ``2:4`` as the base-60
# integer 124 and ``5e-1`` (no dot) as a string; recipes mean the pattern "2:4" and the float 0.5.
_YAML_INT = r"""^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"""
_YAML_FLOAT = (r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?"""
               r"""|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"""
               r"""|[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?"""
               r"""|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""")
_LOADER = None


def yaml_load(text_or_stream: Any) -> Any:
    """``yaml.safe_load`` with YAML 1.2 numbers: ``pattern: 2:4`` stays the string ``"2:4"`` (not
    the base-60 integer 124) and ``5e-1`` is the float 0.5 (not a string). Never runs code.

    Example:
        >>> from gradprune.config import yaml_load
        >>> yaml_load("pattern: 2:4\\nlr: 5e-1\\nsteps: 10")
        {'pattern': '2:4', 'lr': 0.5, 'steps': 10}
    """
    global _LOADER
    yaml = _import_yaml()
    if _LOADER is None:
        class Loader(yaml.SafeLoader):
            pass

        Loader.yaml_implicit_resolvers = {
            ch: [(tag, rx) for tag, rx in entries
                 if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
            for ch, entries in yaml.SafeLoader.yaml_implicit_resolvers.items()}
        Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(_YAML_INT),
                                     list("-+0123456789"))
        Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(_YAML_FLOAT),
                                     list("-+0123456789."))
        _LOADER = Loader
    return yaml.load(text_or_stream, Loader=_LOADER)  # a SafeLoader: no Python objects


@dataclass(eq=True)
class PruneConfig(Config):
    """What to prune, by which score, in which unit, to which target, and when.

    Used by one-shot pruning (:func:`gradprune.prune`) and gradual pruning (:class:`gradprune.Pruner`).

    Fields:
        criterion: name of a registered criterion (``magnitude``, ``gradient``, ``snip``,
            ``snip_momentum``, ``taylor``, ``movement``, ``fisher``, ``random`` or your own).
        criterion_options: keyword options of the criterion (e.g. ``{"alpha": 0.9, "beta": 1.0}``
            for ``snip_momentum``, ``{"seed": 1}`` for ``random``).
        pattern: unit of removal: ``"1x1"``, ``"NxM"`` blocks, ``"N:M"`` (N kept of M), ``"channel"``,
            ``"kernel"``.
        reduce: how a multi-entry unit's score is reduced from its entries' absolute scores.
        accumulate: how criteria that average over batches (gradient, snip, taylor, movement,
            fisher) combine the batches since the last prune event: ``"mean"`` of them, or only the
            ``"last"`` one (Neural Compressor's gradient and snip).
        reduce_each_step: reduce each step's entry scores to block units (``NxM``, ``channel``,
            ``kernel``) before accumulating, as Neural Compressor did, instead of reducing the
            accumulated scores once. Only ``reduce="max"`` gives different units.
        target_sparsity: fraction of prunable weights to remove (``None`` with an N:M pattern means
            the pattern's own ratio, e.g. 0.5 for ``"2:4"``).
        topk, threshold: alternative selections: keep the ``topk`` best units (int count, or float
            fraction in (0, 1] of what remains) / keep units with score >= ``threshold``. Applied in
            the order existing mask -> threshold -> topk. Not combined with ``target_sparsity``.
        initial_sparsity: sparsity the schedule starts from (``s_0``).
        scope: ``"local"`` (every layer to the target) or ``"global"`` (one threshold over all).
        allocation: per-layer sparsity for local scope: ``"uniform"``, ``"er"``, ``"erk"`` or
            ``"owl"`` (outlier-weighed, from calibration inputs; :func:`gradprune.prune` only).
        min_sparsity, max_sparsity: per-layer bounds; a capped layer's share goes to the others.
        count_rounding: how a sparsity becomes a number of units to prune (per layer, or over all
            layers in global scope): ``"half_up"`` (default: nearest, halves up, so 0.75 of 10
            units prunes 8) or ``"floor"`` (Neural Compressor's ``int(units * sparsity)``: 7).
            Both ignore float noise below 1e-9. ``max_sparsity`` always rounds down.
        schedule, start_step, end_step, frequency: gradual schedule over optimizer steps.
        include, exclude, module_types, include_classifier: which parameters are prunable
            (see :func:`gradprune.targets.find_targets`): ``include``/``exclude`` patterns are
            ``fnmatch`` globs or ``"re:<regex>"`` regular expressions, matched against parameter
            names and module names (``exclude=["2"]`` leaves module ``2`` dense).
        strict_filters: an ``include``/``exclude`` pattern that matches nothing raises
            ``ValueError`` instead of warning.
        seed: seed of every random choice.

    Example:
        >>> import gradprune as gp
        >>> cfg = gp.PruneConfig(criterion="snip_momentum", pattern="2:4", schedule="cubic",
        ...                      start_step=0, end_step=1000, frequency=100)
        >>> cfg.effective_target()
        0.5
    """

    criterion: str = "magnitude"
    criterion_options: dict = field(default_factory=dict)
    pattern: str = "1x1"
    reduce: str = "mean"
    accumulate: str = "mean"
    reduce_each_step: bool = False
    target_sparsity: float | None = None
    topk: int | float | None = None
    threshold: float | None = None
    initial_sparsity: float = 0.0
    scope: str = "local"
    allocation: str = "uniform"
    min_sparsity: float = 0.0
    max_sparsity: float = 0.98
    count_rounding: str = "half_up"
    schedule: str = "cubic"
    start_step: int = 0
    end_step: int = 0
    frequency: int = 1
    include: tuple | None = None
    exclude: tuple = ()
    module_types: tuple = DEFAULT_MODULE_TYPES
    include_classifier: bool = False
    strict_filters: bool = False
    seed: int = 0

    # -- per-field validation -------------------------------------------------------------
    @staticmethod
    def _validate_criterion(v):
        if not isinstance(v, str):
            raise TypeError(f"criterion must be str, got {type(v).__name__}")
        if not v:
            raise ValueError("criterion must be a non-empty name, got ''")
        return v

    @staticmethod
    def _validate_criterion_options(v):
        if v is None:
            return {}
        if not isinstance(v, dict):
            raise TypeError(f"criterion_options must be dict, got {type(v).__name__}")
        for k in v:
            if not isinstance(k, str):
                raise TypeError(f"criterion_options keys must be str, got {type(k).__name__}")
        return dict(v)

    @staticmethod
    def _validate_pattern(v):
        parse_pattern(v)
        return v

    @staticmethod
    def _validate_reduce(v):
        return check_choice("reduce", v, REDUCTIONS)

    @staticmethod
    def _validate_accumulate(v):
        return check_choice("accumulate", v, ACCUMULATIONS)

    @staticmethod
    def _validate_reduce_each_step(v):
        return check_bool("reduce_each_step", v)

    @staticmethod
    def _validate_target_sparsity(v):
        return check_float("target_sparsity", v, low=0.0, high=1.0, high_open=True, allow_none=True)

    @staticmethod
    def _validate_topk(v):
        return check_topk("topk", v)

    @staticmethod
    def _validate_threshold(v):
        return check_threshold("threshold", v)

    @staticmethod
    def _validate_initial_sparsity(v):
        return check_float("initial_sparsity", v, low=0.0, high=1.0, high_open=True)

    @staticmethod
    def _validate_scope(v):
        return check_choice("scope", v, SCOPES)

    @staticmethod
    def _validate_allocation(v):
        return check_choice("allocation", v, ALLOCATIONS)

    @staticmethod
    def _validate_min_sparsity(v):
        return check_float("min_sparsity", v, low=0.0, high=1.0)

    @staticmethod
    def _validate_max_sparsity(v):
        return check_float("max_sparsity", v, low=0.0, high=1.0)

    @staticmethod
    def _validate_count_rounding(v):
        return check_choice("count_rounding", v, COUNT_ROUNDINGS)

    @staticmethod
    def _validate_schedule(v):
        return check_choice("schedule", v, SCHEDULES)

    @staticmethod
    def _validate_start_step(v):
        return check_int("start_step", v, min_value=0)

    @staticmethod
    def _validate_end_step(v):
        return check_int("end_step", v, min_value=0)

    @staticmethod
    def _validate_frequency(v):
        return check_int("frequency", v, min_value=1)

    @staticmethod
    def _validate_include(v):
        return check_name_patterns("include", v, allow_none=True)

    @staticmethod
    def _validate_exclude(v):
        return check_name_patterns("exclude", v) if v is not None else ()

    @staticmethod
    def _validate_strict_filters(v):
        return check_bool("strict_filters", v)

    @staticmethod
    def _validate_module_types(v):
        v = check_str_list("module_types", v)
        if not v:
            raise ValueError("module_types must name at least one module type, got []")
        return v

    @staticmethod
    def _validate_include_classifier(v):
        return check_bool("include_classifier", v)

    @staticmethod
    def _validate_seed(v):
        return check_int("seed", v, min_value=0)

    # -- cross-field rules ----------------------------------------------------------------
    def _check(self) -> None:
        if self.min_sparsity > self.max_sparsity:
            raise ValueError(
                f"min_sparsity must be <= max_sparsity, got min_sparsity={self.min_sparsity!r}, "
                f"max_sparsity={self.max_sparsity!r}"
            )
        if self.end_step < self.start_step:
            raise ValueError(
                f"end_step must be >= start_step, got end_step={self.end_step!r}, "
                f"start_step={self.start_step!r}"
            )
        if self.target_sparsity is not None and (self.topk is not None or self.threshold is not None):
            raise ValueError(
                "target_sparsity cannot be combined with topk or threshold, got "
                f"target_sparsity={self.target_sparsity!r}, topk={self.topk!r}, "
                f"threshold={self.threshold!r}"
            )
        kind, n, m = parse_pattern(self.pattern)
        if kind == "nm" and self.target_sparsity is not None:
            cap = (m - n) / m
            if self.target_sparsity > cap + 1e-12:
                raise ValueError(
                    f"target_sparsity must be <= {cap:g} for pattern {self.pattern!r} "
                    f"({n} kept of every {m}), got {self.target_sparsity!r}"
                )
        if self.scope == "global" and self.allocation != "uniform":
            raise ValueError(
                f"allocation applies to scope='local' only, got allocation={self.allocation!r} "
                "with scope='global'"
            )
        target = self.effective_target()
        if target is not None and self.initial_sparsity > target:
            raise ValueError(
                f"initial_sparsity must be <= target_sparsity, got initial_sparsity="
                f"{self.initial_sparsity!r}, target_sparsity={target!r}"
            )

    def effective_target(self) -> float | None:
        """The target sparsity, with an N:M pattern's own ratio when none is given."""
        if self.target_sparsity is not None:
            return self.target_sparsity
        kind, n, m = parse_pattern(self.pattern)
        if kind == "nm" and self.topk is None and self.threshold is None:
            return (m - n) / m
        return None
