r"""Which parameters of a model are prunable.

By default: the ``weight`` of every ``Linear``, ``Conv1d/2d/3d`` module, of every GPT-2 style
``Conv1D`` (``transformers.pytorch_utils.Conv1D``, weight stored ``[in, out]``: patterns work on
its transpose, see :attr:`Target.transposed`) and the ``in_proj_weight`` of every
``MultiheadAttention``; never biases, norms or embeddings (their module types are not in the
list), and not the final classifier / LM head — the *last* ``Linear`` in registration order, when
there is another candidate — unless ``include_classifier=True``. ``include_classifier`` defaults
to ``False`` in every config (``PruneConfig``, ``SparseConfig``, the Hugging Face and Lightning
callbacks).

Shared (tied) tensors: a parameter registered in several modules is one prunable unit under its
*first* qualified name in registration order (``model.named_modules()``), never counted twice. A
parameter that is also held by a module whose type is not prunable (an ``Embedding`` tied to the
LM head, as in GPT-2 or a LLaMA with ``tie_word_embeddings=True``) is left out unless an
``include`` glob names it: no default prunes an embedding through a tied head.

``include``/``exclude`` patterns are ``fnmatch`` globs (``"encoder.*.weight"``) or, with the
``re:`` prefix, regular expressions that must match the whole name (``re.fullmatch``, e.g.
``"re:encoder\.layer\.[0-5]\..*"``, what Neural Compressor's ``op_names`` took). A pattern selects a
parameter when it matches the parameter's qualified name (``"2.weight"``) or the qualified name of
a module that holds it, directly or through a submodule (``"2"``, ``"encoder.layer.0"``): module
names select those modules' prunable weights. A pattern that matches no parameter and no module
holding one warns (a typo would otherwise silently prune everything, or nothing); with
``strict=True`` (the configs' ``strict_filters``) it raises ``ValueError`` naming the pattern and a
few valid names. ``module_types`` are class names, matched along the class's MRO so
subclasses count. Parameters on the ``meta`` device raise ``ValueError`` naming them.

Example:
    >>> import torch.nn as nn
    >>> from gradprune.targets import find_targets
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> list(find_targets(model))
    ['0.weight']
    >>> list(find_targets(model, include_classifier=True))
    ['0.weight', '2.weight']
    >>> list(find_targets(model, include_classifier=True, exclude=["2"]))   # a module name
    ['0.weight']
    >>> list(find_targets(model, include=[r"re:[02]\.weight"], include_classifier=True))
    ['0.weight', '2.weight']
"""

from __future__ import annotations

import re
import warnings
from fnmatch import fnmatchcase
from typing import Iterable

import torch
from torch import nn

from ._checks import check_bool, check_str_list
from .config import DEFAULT_MODULE_TYPES, REGEX_PREFIX, check_name_patterns

__all__ = ["find_targets", "Target", "weight_param_names"]

# module types whose weight is stored [in, out] (transposed against Linear's [out, in])
TRANSPOSED_TYPES = frozenset({"Conv1D"})

# parameter names that are "the weight" of a module of that type
_WEIGHT_PARAMS = {"MultiheadAttention": ("in_proj_weight", "q_proj_weight", "k_proj_weight",
                                          "v_proj_weight")}


class Target:
    """A prunable parameter: its qualified name, the parameter, and the module holding it.

    ``transposed`` is True when the weight is stored ``[in, out]`` (GPT-2's ``Conv1D``): patterns
    that work along the input dimension (N:M, blocks, channels) are applied to its transpose.
    """

    __slots__ = ("name", "param", "module", "module_type")

    @property
    def transposed(self) -> bool:
        return self.module_type in TRANSPOSED_TYPES

    def __init__(self, name: str, param: nn.Parameter, module: nn.Module, module_type: str):
        self.name, self.param, self.module, self.module_type = name, param, module, module_type

    @property
    def shape(self) -> torch.Size:
        return self.param.shape

    def __repr__(self) -> str:
        return f"Target({self.name!r}, {tuple(self.shape)}, {self.module_type})"


def _type_names(module: nn.Module) -> list[str]:
    return [cls.__name__ for cls in type(module).__mro__]


def weight_param_names(type_name: str) -> tuple:
    return _WEIGHT_PARAMS.get(type_name, ("weight",))


def _matcher(pattern: str):
    """A predicate on one name: ``re:`` regular expression (full match) or ``fnmatch`` glob."""
    if pattern.startswith(REGEX_PREFIX):
        rx = re.compile(pattern[len(REGEX_PREFIX):])
        return lambda name: rx.fullmatch(name) is not None
    return lambda name: fnmatchcase(name, pattern)


def _selectable_names(param_name: str) -> list[str]:
    """The names of the modules holding a parameter and its qualified name (``"a.b.w"`` ->
    ``["a", "a.b", "a.b.w"]``); the root module's empty name is not one."""
    parts = param_name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def find_targets(
    model: nn.Module,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    module_types: Iterable[str] = DEFAULT_MODULE_TYPES,
    include_classifier: bool = False,
    strict: bool = False,
) -> dict[str, Target]:
    """Return ``{qualified parameter name: Target}`` in registration order.

    ``include``/``exclude``: globs or ``"re:<regex>"`` patterns on parameter or module names (see
    the module docstring). ``strict=True``: a pattern that matches nothing raises ``ValueError``
    instead of warning. Raises ``ValueError`` when nothing is left to prune, naming the filters
    that were used.

    Example:
        >>> import torch.nn as nn
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> list(find_targets(model, exclude=["2"]))
        ['0.weight']
        >>> find_targets(model, exclude=["encodr"], strict=True)
        Traceback (most recent call last):
        ...
        ValueError: exclude pattern 'encodr' matches no parameter or module name of Sequential (names: '0', '0.weight', '0.bias', '2', '2.weight', '2.bias', '4', '4.weight', ...)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    include = check_name_patterns("include", include, allow_none=True)
    exclude = check_name_patterns("exclude", exclude) if exclude is not None else ()
    module_types = check_str_list("module_types", module_types)
    check_bool("include_classifier", include_classifier)
    check_bool("strict", strict)

    candidates: list[Target] = []
    last_linear: str | None = None
    seen: set[int] = set()
    tied: set[int] = set()  # parameters also held by a module that is not prunable (an embedding)
    aliases: dict[int, list[str]] = {}  # every qualified name of each parameter
    for mod_name, module in model.named_modules(remove_duplicate=False):
        names = _type_names(module)
        matched = next((t for t in module_types if t in names), None)
        wanted = weight_param_names(matched) if matched is not None else ()
        for pname, param in module._parameters.items():
            if param is None:
                continue
            aliases.setdefault(id(param), []).append(f"{mod_name}.{pname}" if mod_name else pname)
            if pname not in wanted:
                tied.add(id(param))
    for mod_name, module in model.named_modules():
        names = _type_names(module)
        if "Linear" in names:
            last_linear = mod_name
        matched = next((t for t in module_types if t in names), None)
        if matched is None:
            continue
        for pname in weight_param_names(matched):
            param = getattr(module, pname, None)
            if not isinstance(param, nn.Parameter) or id(param) in seen or param.dim() < 2:
                continue
            seen.add(id(param))
            qual = f"{mod_name}.{pname}" if mod_name else pname
            candidates.append(Target(qual, param, module, matched))

    all_names = list(dict.fromkeys(m for names in aliases.values() for n in names
                                   for m in _selectable_names(n)))
    inc = [_matcher(g) for g in include or ()]
    exc = [_matcher(g) for g in exclude]
    for field, globs, preds in (("include", include or (), inc), ("exclude", exclude, exc)):
        for g, pred in zip(globs, preds):
            if not any(pred(n) for n in all_names):
                msg = (f"{field} pattern {g!r} matches no parameter or module name of "
                       f"{type(model).__name__} (names: {', '.join(map(repr, all_names[:8]))}"
                       f"{', ...' if len(all_names) > 8 else ''})")
                if strict:
                    raise ValueError(msg)
                warnings.warn(f"gradprune: {msg}", UserWarning, stacklevel=2)

    out: dict[str, Target] = {}
    for t in candidates:
        mod_name = t.name.rsplit(".", 1)[0] if "." in t.name else ""
        names = [m for n in aliases.get(id(t.param), [t.name]) for m in _selectable_names(n)]
        explicitly = include is not None and any(p(n) for n in names for p in inc)
        if include is not None and not explicitly:
            continue
        if any(p(n) for n in names for p in exc):
            continue
        is_classifier = (mod_name == last_linear and t.module_type == "Linear"
                         and len(candidates) > 1)
        if (is_classifier and not include_classifier or id(t.param) in tied) and not explicitly:
            continue
        out[t.name] = t
    on_meta = [n for n, t in out.items() if t.param.is_meta]
    if on_meta:
        raise ValueError(f"parameters on the meta device have no values to prune: {on_meta} "
                         "(materialize the model first, e.g. model.to_empty(device=...) and load weights)")
    if not out:
        raise ValueError(
            f"no prunable parameters in {type(model).__name__} with include={list(include) if include else None}, "
            f"exclude={list(exclude)}, module_types={list(module_types)}, "
            f"include_classifier={include_classifier}"
        )
    return out
