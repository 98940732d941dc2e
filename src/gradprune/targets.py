"""Which parameters of a model are prunable.

By default: the ``weight`` of every ``Linear``, ``Conv1d/2d/3d`` module and the ``in_proj_weight``
of every ``MultiheadAttention``; never biases, norms or embeddings (their module types are not in
the list), and not the final classifier — the *last* ``Linear`` in registration order — unless
``include_classifier=True``. ``include``/``exclude`` are ``fnmatch`` globs on qualified parameter
names (``"encoder.*.weight"``); ``module_types`` are class names, matched along the class's MRO so
subclasses count.

Example:
    >>> import torch.nn as nn
    >>> from gradprune.targets import find_targets
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> list(find_targets(model))
    ['0.weight']
    >>> list(find_targets(model, include_classifier=True))
    ['0.weight', '2.weight']
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Iterable

import torch
from torch import nn

from ._checks import check_bool, check_str_list
from .config import DEFAULT_MODULE_TYPES

__all__ = ["find_targets", "Target", "weight_param_names"]

# parameter names that are "the weight" of a module of that type
_WEIGHT_PARAMS = {"MultiheadAttention": ("in_proj_weight", "q_proj_weight", "k_proj_weight",
                                          "v_proj_weight")}


class Target:
    """A prunable parameter: its qualified name, the parameter, and the module holding it."""

    __slots__ = ("name", "param", "module", "module_type")

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


def find_targets(
    model: nn.Module,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    module_types: Iterable[str] = DEFAULT_MODULE_TYPES,
    include_classifier: bool = False,
) -> dict[str, Target]:
    """Return ``{qualified parameter name: Target}`` in registration order.

    Raises ``ValueError`` when nothing is left to prune, naming the filters that were used.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    include = check_str_list("include", include, allow_none=True)
    exclude = check_str_list("exclude", exclude) if exclude is not None else ()
    module_types = check_str_list("module_types", module_types)
    check_bool("include_classifier", include_classifier)

    candidates: list[Target] = []
    last_linear: str | None = None
    seen: set[int] = set()
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

    out: dict[str, Target] = {}
    for t in candidates:
        mod_name = t.name.rsplit(".", 1)[0] if "." in t.name else ""
        explicitly = include is not None and any(fnmatchcase(t.name, g) for g in include)
        if include is not None and not explicitly:
            continue
        if any(fnmatchcase(t.name, g) for g in exclude):
            continue
        is_classifier = (mod_name == last_linear and t.module_type == "Linear"
                         and len(candidates) > 1)
        if is_classifier and not (include_classifier or explicitly):
            continue
        out[t.name] = t
    if not out:
        raise ValueError(
            f"no prunable parameters in {type(model).__name__} with include={list(include) if include else None}, "
            f"exclude={list(exclude)}, module_types={list(module_types)}, "
            f"include_classifier={include_classifier}"
        )
    return out
