"""Search-space rules: which widths each prunable layer may take (ModelOpt's format).

Rules are a dict keyed by module type (``"nn.Conv2d"``, ``"nn.Linear"``, …). Each value is
``None`` (the type is not pruned), a rule dict (short for ``{"*": rule}``) or a dict from glob
patterns over qualified module names to a rule dict or ``None``; the patterns are applied in order
and a later match overrides an earlier one; a module no pattern matches is not pruned. A type that
is not given keeps its default ``{"*": {...}}``.

- ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d``, ``nn.GroupNorm``: ``channels_ratio``
  (default 0.05, 0.10, …, 1.0) and ``channel_divisor`` (default 32).
- ``nn.Linear``, ``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm``, ``nn.InstanceNorm1d/2d/3d``,
  ``nn.LayerNorm``: ``features_ratio`` and ``feature_divisor`` (same defaults).
- attention, per attention module (``nn.MultiheadAttention``; a Hugging Face attention by its
  class name without the implementation marker, e.g. ``hf.BertSelfAttention`` also for
  ``BertSdpaSelfAttention``, ``hf.GPT2Attention``, ``hf.LlamaAttention``, ``hf.OPTAttention``:
  every class registered in :data:`gradprune.structured.hf.ATTENTION_SPECS`; ``hf.Attention``
  for any other recognised attention):
  ``n_heads_ratio`` (default ``None``: any number of heads) and ``n_heads_divisor`` (default 1);
  a ratio list gives the widths as above, in heads (for LLaMA-style attention, in KV groups: a
  unit is one key/value head with its query heads; with a single key/value head, a query head). FFN neurons of a
  transformer layer follow the ``nn.Linear`` rule of the layer producing them (``linear1``,
  ``intermediate.dense``, ``mlp.up_proj``/``gate_proj``, and GPT-2's ``mlp.c_fc`` although it
  is a ``Conv1D``).

A misspelled field in the short form (``{"nn.Conv2d": {"channel_ratio": [0.5]}}``) raises
``ValueError`` listing the valid fields.

Candidate width for a ratio ``r`` of ``n`` units and divisor ``d``: ``r * n`` rounded (halves up)
to the nearest multiple of ``d``, at least ``d``; one more ``d`` when that rounding lost more than
10% of ``r * n``; widths above ``n`` are dropped and ``n`` itself is always a choice.

A group's choices are the widths allowed by *every* module that owns its channels (the producers
and the per-channel layers); a group with a disabled owner is not pruned.

Example:
    >>> from gradprune.structured.rules import SearchRules, candidate_widths
    >>> candidate_widths(64, [0.25, 0.5, 1.0], 8)
    (16, 32, 64)
    >>> candidate_widths(100, [0.1, 0.5], 32)
    (32, 64, 100)
    >>> rules = SearchRules({"nn.Linear": {"*": {"feature_divisor": 4}, "head*": None}})
    >>> import torch.nn as nn
    >>> rules.rule_for("fc1", nn.Linear(8, 8)).feature_divisor, rules.rule_for("head", nn.Linear(8, 2))
    (4, None)
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .._checks import check_int, round_half_up
from ..config import Config
from .hf import head_rule_types

__all__ = ["ChannelRule", "FeatureRule", "HeadRule", "SearchRules", "candidate_widths",
           "DEFAULT_RATIOS", "CHANNEL_TYPES", "FEATURE_TYPES", "HEAD_TYPES"]

DEFAULT_RATIOS = tuple(round(0.05 * i, 2) for i in range(1, 21))
CHANNEL_TYPES = ("Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d",
                 "ConvTranspose3d", "GroupNorm")
FEATURE_TYPES = ("Linear", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm",
                 "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "LayerNorm")
# attention modules whose units are heads; "hf." types are Hugging Face classes
_HF_TYPES = head_rule_types()
HEAD_TYPES = ("MultiheadAttention", *_HF_TYPES)


def _check_ratios(name: str, v: Any) -> tuple:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = [v]
    if not isinstance(v, (list, tuple)):
        raise TypeError(f"{name} must be a list of float, got {type(v).__name__}")
    if not v:
        raise ValueError(f"{name} must hold at least one ratio, got {list(v)!r}")
    out = []
    for r in v:
        if isinstance(r, bool) or not isinstance(r, (int, float)):
            raise TypeError(f"{name} must be a list of float, got an item of type {type(r).__name__}")
        if not 0.0 < r <= 1.0:
            raise ValueError(f"{name} items must be in (0, 1], got {r!r}")
        out.append(float(r))
    return tuple(sorted(set(out)))


@dataclass(eq=True)
class ChannelRule(Config):
    """Rule for conv-like layers: ``channels_ratio`` and ``channel_divisor``."""

    channels_ratio: tuple = DEFAULT_RATIOS
    channel_divisor: int = 32
    kernel_size: tuple = field(default_factory=tuple)

    @staticmethod
    def _validate_channels_ratio(v):
        return _check_ratios("channels_ratio", v)

    @staticmethod
    def _validate_channel_divisor(v):
        return check_int("channel_divisor", v, min_value=1)

    @staticmethod
    def _validate_kernel_size(v):
        if v is None:
            return ()
        if not isinstance(v, (list, tuple)):
            raise TypeError(f"kernel_size must be a list, got {type(v).__name__}")
        if len(v):
            raise ValueError(f"kernel_size search is not supported; kernel_size must be [], got {list(v)!r}")
        return ()

    def widths(self, n: int) -> tuple:
        return candidate_widths(n, self.channels_ratio, self.channel_divisor)


@dataclass(eq=True)
class FeatureRule(Config):
    """Rule for Linear and norm layers: ``features_ratio`` and ``feature_divisor``."""

    features_ratio: tuple = DEFAULT_RATIOS
    feature_divisor: int = 32

    @staticmethod
    def _validate_features_ratio(v):
        return _check_ratios("features_ratio", v)

    @staticmethod
    def _validate_feature_divisor(v):
        return check_int("feature_divisor", v, min_value=1)

    def widths(self, n: int) -> tuple:
        return candidate_widths(n, self.features_ratio, self.feature_divisor)


@dataclass(eq=True)
class HeadRule(Config):
    """Rule for attention modules: ``n_heads_ratio`` (``None``: any count) and ``n_heads_divisor``."""

    n_heads_ratio: Any = None
    n_heads_divisor: int = 1

    @staticmethod
    def _validate_n_heads_ratio(v):
        return None if v is None else _check_ratios("n_heads_ratio", v)

    @staticmethod
    def _validate_n_heads_divisor(v):
        return check_int("n_heads_divisor", v, min_value=1)

    def widths(self, n: int) -> tuple:
        if self.n_heads_ratio is None:
            d = self.n_heads_divisor
            return tuple(sorted({w for w in range(d, n + 1, d)} | {n}))
        return candidate_widths(n, self.n_heads_ratio, self.n_heads_divisor)


def candidate_widths(n: int, ratios, divisor: int) -> tuple:
    """Allowed widths of ``n`` units for ``ratios`` and ``divisor`` (sorted; ``n`` always in)."""
    check_int("n", n, min_value=1)
    check_int("divisor", divisor, min_value=1)
    out = {n}
    for r in ratios:
        target = r * n
        w = max(round_half_up(target / divisor) * divisor, divisor)
        if w < 0.9 * target - 1e-9:
            w += divisor
        if w <= n:
            out.add(w)
    return tuple(sorted(out))


def _type_key(key: Any) -> str:
    if not isinstance(key, str):
        raise TypeError(f"rules keys must be str (e.g. 'nn.Linear'), got {type(key).__name__}")
    name = key[3:] if key.startswith(("nn.", "hf.")) else key
    if name not in CHANNEL_TYPES + FEATURE_TYPES + HEAD_TYPES:
        valid = ", ".join(_prefix(t) + t for t in CHANNEL_TYPES + FEATURE_TYPES + HEAD_TYPES)
        raise ValueError(f"rules has an unknown module type {key!r}; valid keys: {valid}")
    return name


def _prefix(t: str) -> str:
    return "hf." if t in _HF_TYPES else "nn."


class SearchRules:
    """Validated search-space rules (see the module docstring for the format)."""

    def __init__(self, rules: dict | None = None):
        if rules is not None and not isinstance(rules, dict):
            raise TypeError(f"rules must be a dict, got {type(rules).__name__}")
        self._by_type: dict = {t: [("*", self._default(t))]
                               for t in CHANNEL_TYPES + FEATURE_TYPES + HEAD_TYPES}
        for key, value in (rules or {}).items():
            t = _type_key(key)
            self._by_type[t] = self._parse(t, key, value)

    @staticmethod
    def _rule_class(t: str):
        if t in HEAD_TYPES:
            return HeadRule
        return ChannelRule if t in CHANNEL_TYPES else FeatureRule

    def _default(self, t: str):
        return self._rule_class(t)()

    def _parse(self, t: str, key: str, value: Any) -> list:
        cls = self._rule_class(t)
        if value is None:
            return []
        if not isinstance(value, dict):
            raise TypeError(f"rules[{key!r}] must be a dict or None, got {type(value).__name__}")
        fields_ = cls.field_names()
        # the short form {field: value} (for {"*": {...}}): recognised by a field name as a key
        # or by a value that is not a rule (a list of ratios, a divisor); unknown fields then
        # raise instead of being taken as glob patterns
        if value and (any(k in fields_ for k in value) or any(
                not (v is None or isinstance(v, (dict, cls))) for v in value.values())):
            unknown = [k for k in value if k not in fields_]
            if unknown:
                raise ValueError(
                    f"rules[{key!r}] has unknown field(s) {', '.join(map(repr, unknown))}; valid "
                    f"fields: {', '.join(fields_)} (or glob patterns mapping to such dicts)")
            value = {"*": value}
        out = []
        for pattern, rule in value.items():
            if not isinstance(pattern, str):
                raise TypeError(f"rules[{key!r}] keys must be glob patterns (str), got "
                                f"{type(pattern).__name__}")
            if rule is None:
                out.append((pattern, None))
            elif isinstance(rule, cls):
                out.append((pattern, rule))
            elif isinstance(rule, dict):
                out.append((pattern, cls.from_dict(rule)))
            else:
                raise TypeError(f"rules[{key!r}][{pattern!r}] must be a dict or None, got "
                                f"{type(rule).__name__}")
        return out

    def rule_for(self, name: str, module: nn.Module, type_name: str | None = None):
        """The rule of module ``name`` (``None``: not pruned); ``type_name`` overrides the
        module's class name as the rule key."""
        t = type_name or type(module).__name__
        if t not in self._by_type:
            return None
        rule = None
        for pattern, r in self._by_type[t]:
            if fnmatch.fnmatchcase(name, pattern):
                rule = r
        return rule

    def to_dict(self) -> dict:
        return {f"{_prefix(t)}{t}": (None if not entries else
                            {p: (None if r is None else r.to_dict()) for p, r in entries})
                for t, entries in self._by_type.items()}
