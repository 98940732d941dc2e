"""Importance criteria: a registry and the built-in scores.

A criterion scores every entry of the prunable parameters it is given; higher means more important.
It follows Neural Compressor's three training-loop hooks:

- ``on_step_begin()`` — before the forward pass;
- ``on_before_optimizer_step()`` — after ``backward()``: gradients are available;
- ``on_after_optimizer_step()`` — after the optimizer changed the weights.

``scores`` is ``{parameter name: tensor}`` shaped like each parameter. Criteria that accumulate
over batches (gradient, snip, taylor, movement, fisher) report the *mean* over the batches they saw
since the last ``reset()`` (``accumulate="mean"``), or only the last batch's term
(``accumulate="last"``, Neural Compressor's gradient and snip); ``snip_momentum`` is an exponential
accumulation by definition.

``reduce_each_step=True`` (with a block pattern ``NxM``, ``channel`` or ``kernel``) replaces each
step's term, before it is accumulated, by its unit's reduced value at every entry of the unit, as
Neural Compressor reduced every step's score before accumulating. A unit's final score is then the
accumulation of per-step unit scores; for ``reduce="mean"`` and ``"sum"`` that equals reducing the
accumulated entries once, for ``"max"`` it does not. Both options are fields of
:class:`~gradprune.PruneConfig`, read by :func:`get_criterion`.

Built in:

============== ==================================== =========
name           score                                 needs data
============== ==================================== =========
magnitude      ``|W|``                               no
gradient       mean ``|G|``                          yes
snip           mean ``|W * G|``                      yes
snip_momentum  ``S <- alpha * S + beta * |W * G|``   yes
taylor         mean ``(W * G)^2``                    yes
movement       mean ``-W * G`` (signed)              yes
fisher         mean ``G^2``                          yes
random         uniform, from ``seed``                no
============== ==================================== =========

Your own criterion works everywhere a built-in one does once registered:

    >>> import torch
    >>> import gradprune as gp
    >>> @gp.register_criterion("abs_cubed")
    ... class AbsCubed(gp.Criterion):
    ...     needs_grad = False
    ...     @property
    ...     def scores(self):
    ...         return {n: p.detach().abs() ** 3 for n, p in self.params.items()}
    >>> crit = gp.get_criterion("abs_cubed", {"w": torch.nn.Parameter(torch.tensor([[-2.0, 1.0]]))})
    >>> crit.scores["w"]
    tensor([[8., 1.]])
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Mapping

import torch

from .._checks import check_choice, check_float, check_int
from ..config import ACCUMULATIONS, parse_pattern

__all__ = [
    "Criterion",
    "register_criterion",
    "get_criterion",
    "list_criteria",
    "MagnitudeCriterion",
    "GradientCriterion",
    "SnipCriterion",
    "SnipMomentumCriterion",
    "TaylorCriterion",
    "MovementCriterion",
    "FisherCriterion",
    "RandomCriterion",
]

_REGISTRY: dict[str, type] = {}


def register_criterion(name: str, *, overwrite: bool = False):
    """Class decorator registering a :class:`Criterion` subclass under ``name``."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"criterion name must be a non-empty str, got {name!r}")

    def deco(cls):
        if not (isinstance(cls, type) and issubclass(cls, Criterion)):
            raise TypeError(f"register_criterion({name!r}) needs a Criterion subclass, got {cls!r}")
        if name in _REGISTRY and not overwrite and _REGISTRY[name] is not cls:
            raise ValueError(f"criterion {name!r} is already registered; pass overwrite=True")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def list_criteria() -> list[str]:
    """Names of every registered criterion, built-in ones first."""
    return list(_REGISTRY)


def criterion_class(name: str) -> type:
    if not isinstance(name, str):
        raise TypeError(f"criterion must be str, got {type(name).__name__}")
    if name not in _REGISTRY:
        raise ValueError(f"criterion must be one of {', '.join(_REGISTRY)}; got {name!r}")
    return _REGISTRY[name]


def get_criterion(name_or_config: Any, params: Mapping[str, torch.Tensor], **options) -> "Criterion":
    """Instantiate a registered criterion for ``params`` (``{name: parameter}``).

    ``name_or_config`` is a registered name or a :class:`~gradprune.PruneConfig` (its
    ``criterion`` and ``criterion_options`` are used; ``random`` takes the config's ``seed``; its
    ``accumulate`` and ``reduce_each_step`` set how scores are accumulated over batches).

    Example:
        >>> import torch, gradprune as gp
        >>> w = torch.nn.Parameter(torch.ones(1, 2))
        >>> crit = gp.get_criterion(gp.PruneConfig(criterion="gradient", accumulate="last"), {"w": w})
        >>> for g in ([[1.0, 4.0]], [[3.0, 2.0]]):
        ...     w.grad = torch.tensor(g)
        ...     crit.on_before_optimizer_step()
        >>> crit.scores["w"]           # the last batch only (accumulate="mean" gives [[2., 3.]])
        tensor([[3., 2.]])
    """
    accumulate, step_reduce = "mean", None
    if isinstance(name_or_config, str):
        name = name_or_config
    elif hasattr(name_or_config, "criterion") and hasattr(name_or_config, "criterion_options"):
        cfg = name_or_config
        name = cfg.criterion
        merged = dict(cfg.criterion_options)
        cls = criterion_class(name)
        if "seed" in getattr(cls, "option_names", ()) and "seed" not in merged:
            merged["seed"] = cfg.seed
        merged.update(options)
        options = merged
        accumulate = check_choice("accumulate", getattr(cfg, "accumulate", "mean"), ACCUMULATIONS)
        if getattr(cfg, "reduce_each_step", False):
            step_reduce = _unit_spread(cfg.pattern, cfg.reduce)
    else:
        raise TypeError(f"criterion must be a name or a PruneConfig, got {type(name_or_config).__name__}")
    cls = criterion_class(name)
    allowed = getattr(cls, "option_names", ())
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for criterion {name!r}; "
            f"valid options: {', '.join(allowed) if allowed else '(none)'}"
        )
    if accumulate not in cls.accumulate_modes:
        raise ValueError(f"accumulate={accumulate!r} does not apply to criterion {name!r} "
                         f"(it supports {', '.join(map(repr, cls.accumulate_modes))})")
    if step_reduce is not None and not cls.reduces_each_step:
        raise ValueError(f"reduce_each_step=True does not apply to criterion {name!r} "
                         "(it does not accumulate per-step terms)")
    crit = cls(params, **options)
    crit.accumulate, crit.step_reduce = accumulate, step_reduce
    return crit


def _unit_spread(pattern: str, reduce: str):
    """A function mapping one step's entry scores to the same shape with every entry replaced by
    its block unit's reduced value; ``None`` where reducing once at the end gives the same units
    (``mean``/``sum`` are linear; ``1x1`` and ``N:M`` units are not block reductions)."""
    kind, rows, cols = parse_pattern(pattern)
    if reduce != "max" or kind == "nm" or (kind == "block" and rows == cols == 1):
        return None

    def spread(t: torch.Tensor) -> torch.Tensor:
        if kind == "channel":
            dims = tuple(range(1, t.dim()))
            return t.amax(dim=dims, keepdim=True).expand_as(t)
        if kind == "kernel":
            dims = tuple(range(2, t.dim()))
            return t.amax(dim=dims, keepdim=True).expand_as(t)
        m = t.reshape(t.shape[0] // rows, rows, -1, cols)
        return m.amax(dim=(1, 3), keepdim=True).expand_as(m).reshape(t.shape)

    return spread


class Criterion(ABC):
    """Base class: holds ``params`` and exposes ``scores``; override what you need.

    Class attributes: ``needs_grad`` (whether the criterion reads gradients, so needs data),
    ``signed`` (whether scores can be negative: then multi-entry units reduce the signed scores,
    otherwise absolute ones), ``option_names`` (accepted keyword options).
    """

    name: str = ""
    needs_grad: bool = True
    signed: bool = False
    option_names: tuple = ()
    #: values of ``PruneConfig.accumulate`` the criterion honours
    accumulate_modes: tuple = ("mean",)
    #: whether it honours ``PruneConfig.reduce_each_step`` (applies ``step_reduce`` to each term)
    reduces_each_step: bool = False
    accumulate: str = "mean"
    step_reduce = None

    def __init__(self, params: Mapping[str, torch.Tensor], **options):
        if not isinstance(params, Mapping) or not params:
            raise ValueError("params must be a non-empty mapping {name: parameter}")
        self.params = dict(params)

    @property
    @abstractmethod
    def scores(self) -> dict[str, torch.Tensor]:
        """``{parameter name: score tensor shaped like the parameter}``."""

    def on_step_begin(self) -> None:
        pass

    def on_before_optimizer_step(self) -> None:
        pass

    def on_after_optimizer_step(self) -> None:
        pass

    def reset(self) -> None:
        """Forget accumulated statistics (called by the pruner after each prune event)."""

    def ready(self) -> bool:
        """Whether ``scores`` can be read now."""
        return True

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _acc_like(p: torch.Tensor) -> torch.Tensor:
    dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
    return torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)


class _MeanCriterion(Criterion):
    """Mean over batches of a per-batch term of ``(w, g)``, accumulated in place (or, with
    ``accumulate="last"``, only the last batch's term)."""

    accumulate_modes = ACCUMULATIONS
    reduces_each_step = True

    def __init__(self, params, **options):
        super().__init__(params, **options)
        self._sums = {n: _acc_like(p) for n, p in self.params.items()}
        self._count = 0

    @abstractmethod
    def _accumulate(self, acc: torch.Tensor, w: torch.Tensor, g: torch.Tensor) -> None:
        """Add this batch's term of ``(w, g)`` to ``acc`` in place."""

    @torch.no_grad()
    def on_before_optimizer_step(self) -> None:
        for n, p in self.params.items():
            if p.grad is None:
                continue
            acc = self._sums[n]
            if self.accumulate == "last":
                acc.zero_()
            if self.step_reduce is None:
                self._accumulate(acc, p.detach().to(acc.dtype), p.grad.to(acc.dtype))
            else:
                term = torch.zeros_like(acc)
                self._accumulate(term, p.detach().to(acc.dtype), p.grad.to(acc.dtype))
                acc.add_(self.step_reduce(term))
        if self.accumulate == "last":
            for n, p in self.params.items():  # a parameter without a gradient now scores 0
                if p.grad is None:
                    self._sums[n].zero_()
            self._count = 0
        self._count += 1

    def ready(self) -> bool:
        return self._count > 0

    @property
    def scores(self) -> dict[str, torch.Tensor]:
        if self._count == 0:
            raise RuntimeError(
                f"criterion {self.name!r} needs gradients: it has seen no batch yet "
                "(call on_before_optimizer_step() after loss.backward(), or pass data to prune())"
            )
        return {n: s / self._count for n, s in self._sums.items()}

    def reset(self) -> None:
        for s in self._sums.values():
            s.zero_()
        self._count = 0

    def state_dict(self) -> dict:
        return {"count": self._count, "sums": {n: s.clone() for n, s in self._sums.items()}}

    def load_state_dict(self, state: dict) -> None:
        self._count = int(state["count"])
        for n, s in state["sums"].items():
            self._sums[n].copy_(s)


@register_criterion("magnitude")
class MagnitudeCriterion(Criterion):
    """``|W|`` (absolute value: upstream once used the signed weight, a bug)."""

    needs_grad = False
    accumulate_modes = ACCUMULATIONS  # nothing accumulated: both modes read the current weights,
    reduces_each_step = True          # and reducing once is reducing the one step

    @property
    def scores(self):
        return {n: p.detach().abs() for n, p in self.params.items()}


@register_criterion("gradient")
class GradientCriterion(_MeanCriterion):
    """Mean ``|G|`` over batches."""

    def _accumulate(self, acc, w, g):
        acc.add_(g.abs())


@register_criterion("snip")
class SnipCriterion(_MeanCriterion):
    """Mean ``|W * G|`` over batches (Lee et al., SNIP, arXiv 1810.02340)."""

    def _accumulate(self, acc, w, g):
        acc.add_(torch.mul(w, g).abs_())


@register_criterion("taylor")
class TaylorCriterion(_MeanCriterion):
    """Mean ``(W * G)^2`` over batches (second-order Taylor / OBD-style saliency)."""

    def _accumulate(self, acc, w, g):
        wg = torch.mul(w, g)
        acc.addcmul_(wg, wg)


@register_criterion("movement")
class MovementCriterion(_MeanCriterion):
    """Mean ``-W * G`` over batches (Sanh et al., movement pruning): signed."""

    signed = True

    def _accumulate(self, acc, w, g):
        acc.addcmul_(w, g, value=-1.0)


@register_criterion("fisher")
class FisherCriterion(_MeanCriterion):
    """Mean ``G^2`` over batches (diagonal empirical Fisher of batch gradients)."""

    def _accumulate(self, acc, w, g):
        acc.addcmul_(g, g)


@register_criterion("snip_momentum")
class SnipMomentumCriterion(Criterion):
    """``S <- alpha * S + beta * |W * G|`` at every step (Neural Compressor's snip_momentum).

    ``alpha`` keeps the previous score, ``beta`` weighs the new one (defaults 0.9 and 1.0; upstream
    hard-coded them and its docs swapped their meaning). The score persists across prune events.
    """

    option_names = ("alpha", "beta")
    reduces_each_step = True

    def __init__(self, params, alpha: float = 0.9, beta: float = 1.0):
        super().__init__(params)
        self.alpha = check_float("alpha", alpha, low=0.0)
        self.beta = check_float("beta", beta, low=0.0, low_open=True)
        self._scores = {n: _acc_like(p) for n, p in self.params.items()}
        self._count = 0

    @torch.no_grad()
    def on_before_optimizer_step(self) -> None:
        for n, p in self.params.items():
            s = self._scores[n]
            s.mul_(self.alpha)
            if p.grad is not None:
                term = torch.mul(p.detach().to(s.dtype), p.grad.to(s.dtype)).abs_()
                if self.step_reduce is not None:
                    term = self.step_reduce(term)
                s.add_(term, alpha=self.beta)
        self._count += 1

    def ready(self) -> bool:
        return self._count > 0

    @property
    def scores(self):
        if self._count == 0:
            raise RuntimeError(
                "criterion 'snip_momentum' needs gradients: it has seen no batch yet "
                "(call on_before_optimizer_step() after loss.backward(), or pass data to prune())"
            )
        return {n: s.clone() for n, s in self._scores.items()}

    def state_dict(self):
        return {"count": self._count, "scores": {n: s.clone() for n, s in self._scores.items()}}

    def load_state_dict(self, state):
        self._count = int(state["count"])
        for n, s in state["scores"].items():
            self._scores[n].copy_(s)


@register_criterion("random")
class RandomCriterion(Criterion):
    """Uniform random scores in [0, 1), the same for the same ``seed`` (a baseline)."""

    needs_grad = False
    option_names = ("seed",)
    accumulate_modes = ACCUMULATIONS  # nothing accumulated (see MagnitudeCriterion)
    reduces_each_step = True

    def __init__(self, params, seed: int = 0):
        super().__init__(params)
        self.seed = check_int("seed", seed, min_value=0)
        self._cache: dict[str, torch.Tensor] | None = None

    @property
    def scores(self):
        if self._cache is None:
            gen = torch.Generator().manual_seed(self.seed)
            self._cache = {
                n: torch.rand(p.shape, generator=gen, dtype=torch.float32).to(p.device)
                for n, p in self.params.items()
            }
        return dict(self._cache)
