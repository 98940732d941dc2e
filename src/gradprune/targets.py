"""Which parameters of a model are prunable.

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

``include``/``exclude`` are ``fnmatch`` globs on qualified parameter names (``"encoder.*.weight"``);
a glob that matches no parameter of the model warns (a typo would otherwise silently prune
everything, or nothing). ``module_types`` are class names, matched along the class's MRO so
subclasses count. Parameters on the ``meta`` device raise ``ValueError`` naming them.

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

import warnings
from fnmatch import fnmatchcase
from typing import Iterable

import torch
from torch import nn

from ._checks import check_bool, check_str_list
from .config import DEFAULT_MODULE_TYPES

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

    all_names = [n for names in aliases.values() for n in names]
    for field, globs in (("include", include or ()), ("exclude", exclude)):
        for g in globs:
            if not any(fnmatchcase(n, g) for n in all_names):
                warnings.warn(f"gradprune: {field} pattern {g!r} matches no parameter of "
                              f"{type(model).__name__}", UserWarning, stacklevel=2)

    out: dict[str, Target] = {}
    for t in candidates:
        mod_name = t.name.rsplit(".", 1)[0] if "." in t.name else ""
        names = aliases.get(id(t.param), [t.name])
        explicitly = include is not None and any(fnmatchcase(n, g) for n in names for g in include)
        if include is not None and not explicitly:
            continue
        if any(fnmatchcase(n, g) for n in names for g in exclude):
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
