"""Dynamic sparse training: ``SparseTrainer`` with RigL, SET, SNFS, static, gradual and lottery presets.

Train a sparse network from scratch at a fixed parameter budget (sparselearning / rigl-torch users).
``trainer.step()`` replaces ``optimizer.step()``:

1. On an *update step* (every ``update_interval`` optimizer steps, from step ``update_interval`` while
   the step is below ``end_step``; or the first step after ``on_epoch_end()`` with ``update_on="epoch"``) the
   optimizer step is replaced by a connectivity update (RigL, Algorithm 1): in every layer the
   fraction ``f(t)`` (the *decay*) of active weights is dropped by the *prune* rule
   (``floor(f * active)`` with ``drop_rounding="floor"``, the RigL preset's; rounded half up by
   default) and as many are regrown by the *grow* rule among the connections that were inactive
   before the drop (dropped and grown sets are disjoint), or, with ``regrow_dropped=True`` (the RigL
   preset's), among all connections inactive after it. Per-layer nonzero counts are preserved **exactly** (with a
   *redistribute* rule, the total is preserved exactly and the layers' shares follow the rule,
   never above full density). Grown weights and their optimizer state start at 0.
2. Otherwise: gradients of inactive weights are zeroed (unless ``dense_gradients``), the optimizer
   steps, and weights (and, unless ``dense_gradients``, optimizer state: SGD momentum, Adam moments)
   are multiplied by the masks, so inactive weights are exactly 0. With ``torch.optim`` SGD, Adam,
   AdamW, Adamax, NAdam, RAdam, RMSprop, Adagrad or Adadelta the second multiplication is skipped:
   with a zero gradient and zero state these optimizers leave an inactive weight at exactly 0, so it
   would change nothing (a test checks the two paths bit for bit). Should anything else write to the
   weights between steps (their version counter tells), the next step multiplies them again.

The dense gradient used for growth is the one ``backward()`` already produced on the update step:
nothing extra is computed or stored on other steps.

Rules by name (or pass a callable with the documented signature):

============== ==============================================================================
family          names
============== ==============================================================================
init            ``uniform`` (``dense_first_layer`` keeps the first layer dense), ``er``, ``erk``,
                ``struct_random``, ``struct_erk`` (conv kernel granularity), ``lottery`` (masks
                from ``lottery_masks``; ``lottery_shuffle`` re-places them keeping per-layer
                counts), ``resume`` (mask = weight != 0), ``dense`` (for gradual pruning);
                callable ``init(shapes: dict[str, torch.Size], density: float, ctx) -> dict[str, bool mask]``
prune           ``magnitude`` (per layer), ``global_magnitude`` (one exact threshold over layers),
                ``struct_magnitude`` (conv kernels by reduced ``|w|``: absolute value first),
                ``set_signed`` (Mocanu et al.'s SET: the smallest positive and the largest negative
                weights, the drop count split between the signs, see :func:`_set_signed_drop`);
                callable ``prune(weight, mask, n, ctx) -> mask`` with exactly ``n`` fewer active
grow            ``gradient`` (RigL: largest ``|dense grad|``), ``momentum`` (SNFS; Adam:
                ``exp_avg / (sqrt(exp_avg_sq) + eps)``), ``random``, ``none``, ``struct_gradient``;
                callable ``grow(weight, mask, n, ctx) -> mask`` with exactly ``n`` more active
                (``mask`` is the one from before the drop, so nothing just dropped is regrown;
                with ``regrow_dropped=True`` the one after the drop)
redistribute    ``none``, ``momentum`` (mean ``|m|`` over active), ``gradient`` (mean ``|g|`` over
                active), ``nonzero``; callable ``redistribute(weight, mask, ctx) -> float``
decay           ``cosine`` (``eta_min + (alpha - eta_min)/2 (1 + cos(pi t / end_step))``), ``linear``,
                ``constant``, ``magnitude_prune`` (Zhu & Gupta cubic sparsity from dense to the
                target, no regrowth); callable ``decay(step) -> float``
============== ==============================================================================

``ctx`` is a :class:`LayerContext` (``name``, ``grad``, ``momentum``, ``generator``); the masks that
callables get and return are bool tensors shaped like the weight (with struct rules, whole kernels).
Ties in the drop and grow scores are broken at random with the trainer's seeded generator
(``global_magnitude`` breaks ties by position instead: later layer, higher index first).
Score-based growth (``gradient``, ``struct_gradient``, ``momentum``) never grows a connection whose
score is exactly 0 (it leads into or out of a unit that is dead on the batch: grown at 0 it would
stay 0): when a layer has fewer such candidates than it would drop, it drops only as many as it can
regrow, so counts stay exact. ``grow_zero_score=True`` lets zero-score candidates compete again,
as upstream did (ties among them broken at random);
everything random comes from that one generator, so the same seed gives the same masks.

By default a connection dropped in an update cannot be regrown in the same update, so the
dropped and the grown sets are disjoint and every update replaces exactly the dropped count.
``regrow_dropped=True`` (set by :meth:`SparseConfig.rigl`) grows among every connection inactive
after the drop, as the RigL authors' reference implementation (``reinit_when_same=False``) and
rigl-torch do: a dropped connection that is regrown keeps its weight and optimizer state (it never
left), so an update may replace fewer connections than it dropped; counts stay exact either way.

Example:
    >>> import torch, torch.nn as nn
    >>> import gradprune as gp
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    >>> sparse = gp.SparseTrainer(model, opt, gp.SparseConfig.rigl(density=0.2, total_steps=40,
    ...                                                             update_interval=10))
    >>> before = {n: int(m.sum()) for n, m in sparse.masks.items()}
    >>> for step in range(40):
    ...     x, y = torch.randn(16, 20), torch.randint(0, 4, (16,))
    ...     opt.zero_grad(); nn.functional.cross_entropy(model(x), y).backward()
    ...     _ = sparse.step()
    >>> {n: int(m.sum()) for n, m in sparse.masks.items()} == before   # exact per-layer counts
    True
    >>> sparse.updates
    2
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from . import _sharded
from ._distributed import local
from ._io import load_torch
from ._resume import apply_keeping, restore_zeroed
from ._checks import check_bool, check_choice, check_float, check_int, check_str_list, round_half_up
from ._modes import keeps_modes
from .config import DEFAULT_MODULE_TYPES, Config, check_name_patterns
from .masks import MaskSet, SparsityReport
from .patterns import get_pattern
from .schedules import drop_fraction, sparsity_at, prune_events
from .select import Units, _global_lowest, allocate_densities, raw_density
from .targets import find_targets

__all__ = ["SparseConfig", "SparseTrainer", "LayerContext", "StepsPastEndWarning"]

INITS = ("uniform", "er", "erk", "struct_random", "struct_erk", "lottery", "resume", "dense")
PRUNES = ("magnitude", "global_magnitude", "struct_magnitude", "set_signed")
GROWS = ("gradient", "momentum", "random", "none", "struct_gradient")
REDISTRIBUTES = ("none", "momentum", "gradient", "nonzero")
DECAYS = ("cosine", "linear", "constant", "magnitude_prune")
DROP_ROUNDINGS = ("floor", "half_up")

# What a saved trainer state without these config fields was run with: they were added later
# (``regrow_dropped``, ``drop_rounding``), and before that every update grew disjointly and rounded
# the drop count half up. ``load_state_dict`` reads a saved config lacking them with these values, so
# such a checkpoint resumes only into a config with the old semantics (never silently the new ones).
_LEGACY_CONFIG = {"regrow_dropped": False, "drop_rounding": "half_up"}

# Optimizers (exact classes: a subclass may do anything) whose update of a weight with a zero
# gradient and zero state is exactly 0, with or without weight decay (the weight is 0 too): once the
# gradients are masked, multiplying the weights by the masks after their step changes nothing.
_ZERO_KEEPING = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax,
                 torch.optim.NAdam, torch.optim.RAdam, torch.optim.RMSprop, torch.optim.Adagrad,
                 torch.optim.Adadelta)


class StepsPastEndWarning(UserWarning):
    """A :class:`SparseTrainer` stepped past its config's ``total_steps`` (issued once per trainer):
    the schedule (``end_step``, the decay, the pruning events) was planned for a shorter run."""


def _name_or_callable(field_name: str, choices):
    def check(v):
        if callable(v):
            return v
        return check_choice(field_name, v, choices)
    return staticmethod(check)


@dataclass(eq=True)
class SparseConfig(Config):
    """Options of :class:`SparseTrainer`; start from a preset (:meth:`rigl`, :meth:`set`,
    :meth:`snfs`, :meth:`static`, :meth:`pruning`, :meth:`lottery`) and override by keyword.

    ``density`` is the target fraction of active weights over the masked layers (with
    ``init="uniform"`` and ``dense_first_layer=True``: the density of every layer but the dense
    first one, rigl-torch's allocation, so the overall density is higher); ``end_step``
    (RigL's ``T_end``) the last step with a connectivity update; ``total_steps`` the planned length
    of training (every preset but :meth:`lottery` requires it by keyword, with no default, and
    derives ``end_step`` from it, e.g. ``SparseConfig.rigl(density=0.1, total_steps=5000)``;
    omitting it raises ``TypeError``): a trainer whose schedule has
    updates warns once (:class:`StepsPastEndWarning`) when it steps past it; ``include_classifier``
    defaults to False, as in every config (the final classifier / a tied LM head stays dense);
    ``include``/``exclude`` take globs or ``"re:<regex>"`` on parameter or module names, and
    ``strict_filters=True`` makes one that matches nothing an error (see :func:`find_targets`).
    """

    density: float = 0.1
    init: Any = "erk"
    dense_first_layer: bool = False
    prune: Any = "magnitude"
    grow: Any = "gradient"
    redistribute: Any = "none"
    decay: Any = "cosine"
    alpha: float = 0.3
    eta_min: float = 0.0
    update_interval: int = 100
    start_step: int = 0
    end_step: int = 1
    update_on: str = "step"
    dense_gradients: bool = False
    grow_zero_score: bool = False
    regrow_dropped: bool = False
    drop_rounding: str = "half_up"
    struct_reduce: str = "mean"
    lottery_masks: Any = None
    lottery_shuffle: bool = False
    include: tuple | None = None
    exclude: tuple = ()
    module_types: tuple = DEFAULT_MODULE_TYPES
    include_classifier: bool = False
    strict_filters: bool = False
    seed: int = 0
    total_steps: int | None = None

    _validate_init = _name_or_callable("init", INITS)
    _validate_prune = _name_or_callable("prune", PRUNES)
    _validate_grow = _name_or_callable("grow", GROWS)
    _validate_redistribute = _name_or_callable("redistribute", REDISTRIBUTES)
    _validate_decay = _name_or_callable("decay", DECAYS)
    _validate_density = staticmethod(lambda v: check_float("density", v, low=0.0, high=1.0, low_open=True))
    _validate_alpha = staticmethod(lambda v: check_float("alpha", v, low=0.0, high=1.0))
    _validate_eta_min = staticmethod(lambda v: check_float("eta_min", v, low=0.0, high=1.0))
    _validate_update_interval = staticmethod(lambda v: check_int("update_interval", v, min_value=1))
    _validate_start_step = staticmethod(lambda v: check_int("start_step", v, min_value=0))
    _validate_end_step = staticmethod(lambda v: check_int("end_step", v, min_value=0))
    _validate_update_on = staticmethod(lambda v: check_choice("update_on", v, ("step", "epoch")))
    _validate_drop_rounding = staticmethod(lambda v: check_choice("drop_rounding", v, DROP_ROUNDINGS))
    _validate_struct_reduce = staticmethod(lambda v: check_choice("struct_reduce", v, ("mean", "max")))
    _validate_seed = staticmethod(lambda v: check_int("seed", v, min_value=0))
    _validate_total_steps = staticmethod(lambda v: check_int("total_steps", v, min_value=1, allow_none=True))
    _validate_include = staticmethod(lambda v: check_name_patterns("include", v, allow_none=True))
    _validate_exclude = staticmethod(lambda v: check_name_patterns("exclude", v) if v is not None else ())
    _validate_strict_filters = staticmethod(lambda v: check_bool("strict_filters", v))
    _validate_module_types = staticmethod(lambda v: check_str_list("module_types", v))

    _validate_dense_first_layer = staticmethod(lambda v: check_bool("dense_first_layer", v))
    _validate_dense_gradients = staticmethod(lambda v: check_bool("dense_gradients", v))
    _validate_grow_zero_score = staticmethod(lambda v: check_bool("grow_zero_score", v))
    _validate_regrow_dropped = staticmethod(lambda v: check_bool("regrow_dropped", v))
    _validate_lottery_shuffle = staticmethod(lambda v: check_bool("lottery_shuffle", v))
    _validate_include_classifier = staticmethod(lambda v: check_bool("include_classifier", v))

    @staticmethod
    def _validate_lottery_masks(v):
        if v is None or isinstance(v, (str, os.PathLike)):
            return v
        if isinstance(v, Mapping):
            for k, m in v.items():
                if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
                    raise TypeError(f"lottery_masks[{k!r}] must be a bool tensor")
            return v
        raise TypeError(f"lottery_masks must be a path or a mapping name -> bool tensor, got {type(v).__name__}")

    def _check(self) -> None:
        if self.eta_min > self.alpha:
            raise ValueError(f"eta_min must be <= alpha, got eta_min={self.eta_min!r}, alpha={self.alpha!r}")
        if self.end_step < self.start_step:
            raise ValueError(f"end_step must be >= start_step, got end_step={self.end_step!r}, "
                             f"start_step={self.start_step!r}")
        if self.init == "lottery" and self.lottery_masks is None:
            raise ValueError("init='lottery' needs lottery_masks (a path or a mapping of bool masks)")
        if self.grow == "momentum" and not self.dense_gradients and not self.grow_zero_score:
            raise ValueError("grow='momentum' needs dense_gradients=True: with masked gradients the "
                             "momentum of every inactive weight is 0, so nothing could be grown (the "
                             "SNFS preset sets it; grow_zero_score=True would grow at random instead)")
        if self.prune == "set_signed" and (isinstance(self.init, str) and self.init.startswith("struct")
                                           or self.grow == "struct_gradient"):
            raise ValueError(f"prune='set_signed' drops single weights by their sign: it needs an "
                             f"unstructured init and grow, got init={self.init!r}, grow={self.grow!r}")
        if self.update_on == "epoch" and self.decay == "magnitude_prune":
            raise ValueError("decay='magnitude_prune' prunes on its step schedule: use update_on='step'")

    # -- presets --------------------------------------------------------------------------
    @classmethod
    def rigl(cls, density: float = 0.1, *, total_steps: int, **overrides) -> "SparseConfig":
        """RigL (Evci et al. 2020): ERK init, magnitude drop, gradient growth, alpha=0.3,
        update every 100 steps, cosine decay, updates stop at 3/4 of training.

        Each update follows the RigL authors' reference code (``sparse_optimizers_base.py``) and
        rigl-torch: a layer drops ``floor(f * active)`` connections (``drop_rounding="floor"``) and
        grows as many among *all* connections inactive after the drop (``regrow_dropped=True``,
        Algorithm 1's ``ArgTopK`` over ``i not in theta \\ I_drop``): a connection dropped and
        regrown in the same update keeps its weight and optimizer state; a new one starts at 0 with
        zero optimizer state. ``regrow_dropped=False, drop_rounding="half_up"`` is the disjoint
        variant (this preset's behaviour before these fields existed: every update replaces exactly
        the dropped count).

        Timing: the update replaces the optimizer step, at optimizer steps ``t = dT, 2 dT, ...``
        while ``t < end_step`` (``dT = update_interval``; ``t`` counts every ``step()`` call from
        0), i.e. after ``dT`` ordinary steps. The reference code also updates at step 0, on the
        gradients at initialisation; rigl-torch one step earlier (``t = dT - 1, 2 dT - 1, ...``, it
        counts the call itself). gradprune skips the step-0 update: its first mask is already
        random, and dropping by the magnitudes of freshly initialised weights only swaps random
        connections for ones with large gradients at init, at the cost of the first batch's
        optimizer step; both libraries then make the same number of updates. Example:

            >>> import gradprune as gp
            >>> cfg = gp.SparseConfig.rigl(density=0.1, total_steps=1000)
            >>> cfg.drop_rounding, cfg.regrow_dropped, cfg.end_step
            ('floor', True, 750)
        """
        base = dict(density=density, init="erk", prune="magnitude", grow="gradient",
                    redistribute="none", decay="cosine", alpha=0.3, update_interval=100,
                    regrow_dropped=True, drop_rounding="floor",
                    end_step=_three_quarters(total_steps), total_steps=total_steps)
        return cls.from_dict({**base, **overrides})

    @classmethod
    def set(cls, density: float = 0.1, *, total_steps: int, **overrides) -> "SparseConfig":
        """SET (Mocanu et al. 2018): random (ER) init, magnitude drop, random growth, alpha=0.5."""
        base = dict(density=density, init="er", prune="magnitude", grow="random", redistribute="none",
                    decay="cosine", alpha=0.5, update_interval=100, end_step=_three_quarters(total_steps),
                    total_steps=total_steps)
        return cls.from_dict({**base, **overrides})

    @classmethod
    def snfs(cls, density: float = 0.1, *, total_steps: int, **overrides) -> "SparseConfig":
        """SNFS / sparse momentum (Dettmers & Zettlemoyer 2019): magnitude drop, momentum growth,
        momentum redistribution, dense gradients, alpha=0.5."""
        base = dict(density=density, init="erk", prune="magnitude", grow="momentum",
                    redistribute="momentum", decay="cosine", alpha=0.5, update_interval=100,
                    dense_gradients=True, end_step=_three_quarters(total_steps), total_steps=total_steps)
        return cls.from_dict({**base, **overrides})

    @classmethod
    def static(cls, density: float = 0.1, *, total_steps: int, **overrides) -> "SparseConfig":
        """A fixed random (ERK) mask: no connectivity updates."""
        base = dict(density=density, init="erk", grow="none", decay="constant", alpha=0.0,
                    end_step=0, total_steps=total_steps)
        return cls.from_dict({**base, **overrides})

    @classmethod
    def pruning(cls, density: float = 0.1, *, total_steps: int, **overrides) -> "SparseConfig":
        """Gradual magnitude pruning from dense (Zhu & Gupta 2018): cubic sparsity from 0 to
        ``1 - density`` between 1/8 and 3/4 of training, every ``update_interval`` steps."""
        base = dict(density=density, init="dense", prune="magnitude", grow="none",
                    decay="magnitude_prune", update_interval=100,
                    start_step=max(1, total_steps // 8), end_step=_three_quarters(total_steps),
                    total_steps=total_steps)
        return cls.from_dict({**base, **overrides})

    @classmethod
    def lottery(cls, masks: Any, density: float = 0.1, shuffle: bool = False, **overrides) -> "SparseConfig":
        """Lottery ticket: train with given masks (``shuffle=True``: random masks with the same
        per-layer counts)."""
        base = dict(density=density, init="lottery", lottery_masks=masks, lottery_shuffle=shuffle,
                    grow="none", decay="constant", alpha=0.0, end_step=0)
        return cls.from_dict({**base, **overrides})


def _three_quarters(total_steps: int) -> int:
    check_int("total_steps", total_steps, min_value=1)
    return (3 * total_steps) // 4


@dataclass
class LayerContext:
    """What a rule callable may look at for one layer."""

    name: str
    weight: torch.Tensor
    grad: torch.Tensor | None
    momentum: torch.Tensor | None
    generator: torch.Generator


# ---------------------------------------------------------------------------------------------
# exact selection with seeded random tie-breaking

def _pick(scores: torch.Tensor, candidates: torch.Tensor, n: int, largest: bool, gen: torch.Generator,
          group: Any = None) -> torch.Tensor:
    """Bool mask of exactly ``n`` candidates with the largest (or smallest) scores; ties at the
    cut are broken uniformly at random with ``gen``. ``group``: the tensors are this rank's part of
    a layer sharded over that process group (FSDP2); the same entries are picked as in one process."""
    if group is not None:
        return _sharded.pick(scores, candidates, n, largest, gen, group)
    out = torch.zeros_like(candidates)
    n_cand = int(candidates.sum())
    if n <= 0:
        return out
    if n >= n_cand:
        return candidates.clone()
    s = scores.float()
    fill = float("-inf") if largest else float("inf")
    s = s.masked_fill(~candidates, fill)
    if largest:
        t = torch.topk(s, n, largest=True, sorted=False).values.min()
        strict = s > t
    else:
        t = torch.topk(s, n, largest=False, sorted=False).values.max()
        strict = s < t
    strict &= candidates
    out |= strict
    need = n - int(strict.sum())
    if need > 0:
        ties = torch.nonzero((s == t) & candidates).flatten()
        perm = torch.randperm(ties.numel(), generator=gen)[:need].to(ties.device)
        out[ties[perm]] = True
    return out


def _pick_random(candidates: torch.Tensor, n: int, gen: torch.Generator, group: Any = None) -> torch.Tensor:
    """Bool mask of exactly ``n`` of ``candidates``, uniformly at random (``group``: see :func:`_pick`)."""
    if group is not None:
        return _sharded.pick_random(candidates, n, gen, group)
    if n <= 0:
        return torch.zeros_like(candidates)
    idx = torch.nonzero(candidates).flatten()
    chosen = idx[torch.randperm(idx.numel(), generator=gen)[:n].to(idx.device)]
    out = torch.zeros_like(candidates)
    out[chosen] = True
    return out


def _set_signed_drop(weight: torch.Tensor, active: torch.Tensor, n: int, gen: torch.Generator,
                     group: Any = None) -> torch.Tensor:
    """Bool mask of exactly ``n`` of the ``active`` weights (flat tensors) that SET drops (Mocanu
    et al. 2018): the weights closest to zero on each side, i.e. the smallest positive and the
    largest negative ones, in proportion to how many of each sign are active.

    The counts, with ``Z``/``P``/``N`` the active weights equal to / above / below 0:

    1. exact zeros go first (they are the closest to zero on both sides): ``z = min(n, Z)``;
    2. the rest ``r = n - z`` is split by sign: ``n_pos = round_half_up(r * P / (P + N))``
       (halves up), ``n_neg = r - n_pos``;
    3. a sign with fewer active weights than its share gives the excess to the other sign
       (``r <= P + N``, so both fit).

    So exactly ``n`` are dropped (what growth regrows), and with ``n = ζ·active`` each sign loses
    ζ of its weights, up to rounding. Ties (equal values at a cut) are broken at random with
    ``gen``, as ``magnitude``. Example:

        >>> w = torch.tensor([0.5, -0.1, 0.2, -0.9, 0.05, -0.3])
        >>> act = torch.ones(6, dtype=torch.bool)
        >>> _set_signed_drop(w, act, 2, torch.Generator()).nonzero().flatten().tolist()
        [1, 4]
    """
    w = weight.detach().reshape(-1)
    zero, pos, neg = active & (w == 0), active & (w > 0), active & (w < 0)
    z = min(n, _sharded.count(zero, group))
    r = n - z
    n_p, n_n = _sharded.count(pos, group), _sharded.count(neg, group)
    n_pos = round_half_up(r * n_p / (n_p + n_n)) if n_p + n_n else 0
    n_pos = min(max(n_pos, r - n_n), n_p)
    out = _pick(w, zero, z, largest=False, gen=gen, group=group)
    out |= _pick(w, pos, n_pos, largest=False, gen=gen, group=group)
    out |= _pick(w, neg, r - n_pos, largest=True, gen=gen, group=group)
    return out


def _drop_count(rounding: str, fraction: float, active: int) -> int:
    """How many of a layer's ``active`` connections an update with drop fraction ``fraction``
    drops: ``floor(fraction * active)`` (the RigL authors' code and rigl-torch: ``int(n * f)``) or
    ``fraction * active`` rounded half up.

        >>> _drop_count("floor", 0.25, 10), _drop_count("half_up", 0.25, 10)
        (2, 3)
    """
    x = fraction * active
    return int(math.floor(x)) if rounding == "floor" else round_half_up(x)


def _allocate_counts(capacity: list[int], weights: list[float], total: int) -> list[int]:
    """Split ``total`` into integers proportional to ``weights``, each at most ``capacity[i]``;
    what a full layer cannot take is spread over the others (largest remainders, ties by order)."""
    if total > sum(capacity):
        raise ValueError(f"cannot place {total} connections: capacity {sum(capacity)}")
    counts = [0] * len(capacity)
    remaining = total
    while remaining > 0:
        free = [i for i in range(len(capacity)) if counts[i] < capacity[i]]
        w = {i: max(float(weights[i]), 0.0) for i in free}
        wsum = sum(w.values())
        # multiply before dividing: with integer weights summing to ``remaining`` the ideal
        # shares are then exact (``7 * (3 / 7)`` is not 3.0 in floating point, and flooring it
        # would move a connection to another layer)
        ideal = {i: (remaining * w[i] / wsum if wsum > 0 else remaining / len(free)) for i in free}
        add = {i: min(int(math.floor(ideal[i])), capacity[i] - counts[i]) for i in free}
        if sum(add.values()) == 0:  # only fractions left: one each, largest remainder first
            for i in sorted(free, key=lambda i: -(ideal[i] - math.floor(ideal[i])))[:remaining]:
                add[i] = 1
        for i, a in add.items():
            counts[i] += a
        remaining -= sum(add.values())
    return counts


# ---------------------------------------------------------------------------------------------

class SparseTrainer:
    """Dynamic sparse training around your optimizer (see the module docs)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, config: SparseConfig | None = None,
                 **fields):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if config is None:
            config = SparseConfig.from_dict(fields)
        elif not isinstance(config, SparseConfig):
            raise TypeError(f"config must be a SparseConfig, got {type(config).__name__}")
        elif fields:
            config = SparseConfig.from_dict({**config.to_dict(), **fields})
        # A private copy: later edits to the caller's object cannot desynchronise config and state.
        self.config = cfg = copy.deepcopy(config)
        self.model, self.optimizer = model, optimizer
        targets = find_targets(model, cfg.include, cfg.exclude, cfg.module_types, cfg.include_classifier,
                               cfg.strict_filters)
        in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
        missing = [n for n, t in targets.items() if id(t.param) not in in_opt]
        if missing:
            raise ValueError(f"optimizer does not hold these prunable parameters: {missing}")
        self.params = {n: t.param for n, t in targets.items()}
        struct = isinstance(cfg.init, str) and cfg.init.startswith("struct") or \
            cfg.prune == "struct_magnitude" or cfg.grow == "struct_gradient"
        self._unit_pattern = {n: get_pattern("kernel" if struct and p.dim() >= 3 else "1x1")
                              for n, p in self.params.items()}
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.step_count = 0
        self.updates = 0
        self._epoch_update_pending = False
        self._versions = None  # weight version counters after our last step (see _before_step)
        self.history: list[dict] = []
        self.masks = MaskSet(model, names=list(self.params))
        self._check_sharded()
        self._units: dict[str, torch.Tensor] = {}
        self._initial_density: dict[str, float] = {}
        self._warned_past_end = False
        self._hook_state = None
        # what the initial masks zeroed in weights/optimizer state that may be a checkpoint's,
        # until the first step (see gradprune._resume and load_state_dict)
        self._provisional: list | None = None
        self._init_masks()

    # -- FSDP2: layers sharded on dim 0 (each rank holds its rows' units) --------------------
    def _check_sharded(self) -> None:
        cfg = self.config
        sharded = [n for n, spec in self.masks.row_shards.items() if spec.sharded]
        if not sharded:
            return
        rules = [k for k in ("init", "prune", "grow", "redistribute", "decay") if callable(getattr(cfg, k))]
        if rules:
            raise ValueError(f"SparseTrainer on a fully_shard-ed model: callable rules {rules} see whole "
                             f"weights, which no rank holds ({sharded[0]!r} is sharded); use the named rules")

    def _group(self, name: str) -> Any:
        """The process group ``name``'s units are sharded over (``None``: whole on this rank)."""
        spec = self.masks.row_shards.get(name)
        return spec.group if spec is not None else None

    def _count(self, name: str, t: torch.Tensor) -> int:
        """``count_nonzero`` of a per-unit tensor of layer ``name``, over every rank."""
        return _sharded.count(t, self._group(name))

    def _unit_range(self, name: str) -> tuple[int, int]:
        """The units (in the layer's flat unit order) that this rank's rows hold."""
        spec = self.masks.row_shards.get(name)
        total = self._n_units(name)
        if spec is None:
            return 0, total
        per_row = total // spec.shape[0]
        return spec.start * per_row, spec.stop * per_row

    # -- unit helpers -----------------------------------------------------------------------
    def _n_units(self, name: str) -> int:
        return self._unit_pattern[name].n_units(self.params[name].shape)

    def _unit_scores(self, name: str, t: torch.Tensor) -> torch.Tensor:
        pat = self._unit_pattern[name]
        return pat.unit_scores(local(t.detach()).abs(), self.config.struct_reduce, True)

    def _set_units(self, name: str, units: torch.Tensor) -> None:
        self._units[name] = units
        p = self.params[name]
        self.masks[name] = self._unit_pattern[name].expand(units, local(p.detach()), True)

    def _weight_mask(self, name: str, units: torch.Tensor) -> torch.Tensor:
        """A bool mask shaped like the weight (a copy) from per-unit ``units``: what callables get."""
        return self._unit_pattern[name].expand(units, self.params[name].detach(), True).clone()

    def _units_from_callable(self, name: str, mask: Any, what: str) -> torch.Tensor:
        """Per-unit bool mask from a weight-shaped mask returned by a rule callable."""
        p = self.params[name]
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != p.shape:
            raise ValueError(f"{what} callable must return a bool mask of shape {tuple(p.shape)} for {name!r}")
        mask = mask.to(p.device)
        pat = self._unit_pattern[name]
        return mask.reshape(-1).clone() if pat.spec == "1x1" else pat.unit_scores(mask.float(), "max", True) > 0

    # -- init ------------------------------------------------------------------------------
    def _layer_densities(self, kind: str) -> dict[str, float]:
        cfg = self.config
        names = list(self.params)
        # weights, not units: the density is a fraction of weights (a conv kernel unit holds
        # prod(kernel) of them), and a layer's unit and weight densities are the same
        numels = [self.params[n].numel() for n in names]
        alloc = {"uniform": "uniform", "struct_random": "uniform", "er": "er", "erk": "erk",
                 "struct_erk": "erk", "dense": "uniform"}.get(kind, "uniform")
        raws = [raw_density(self.params[n].shape, alloc) for n in names]
        lo = [0.0] * len(names)
        hi = [1.0] * len(names)
        if cfg.dense_first_layer:
            lo[0] = hi[0] = 1.0
        if alloc == "uniform":
            d = [1.0 if (cfg.dense_first_layer and i == 0) else cfg.density for i in range(len(names))]
        else:
            first = numels[0] if cfg.dense_first_layer else 0
            target = cfg.density
            if cfg.dense_first_layer:  # the other layers share what the dense first layer leaves
                rest = sum(numels) - first
                if rest and cfg.density * sum(numels) - first <= 0:
                    raise ValueError(
                        f"dense_first_layer: the first layer alone ({first} weights) exceeds the budget "
                        f"density * total = {cfg.density:g} * {sum(numels)}; raise density, or use "
                        "init='uniform' (rigl-torch's allocation: every other layer at density)")
                target = min(1.0, (cfg.density * sum(numels) - first) / rest) if rest else 1.0
                d_rest = allocate_densities(numels[1:], raws[1:], target, lo[1:], hi[1:]) if rest else []
                d = [1.0] + d_rest
            else:
                d = allocate_densities(numels, raws, target, lo, hi)
        return dict(zip(names, d))

    @torch.no_grad()
    def _init_masks(self) -> None:
        cfg = self.config
        gen = self.generator
        kind = cfg.init
        if callable(kind):
            ctx = LayerContext("", torch.empty(0), None, None, gen)
            given = kind({n: p.shape for n, p in self.params.items()}, cfg.density, ctx)
            for n, p in self.params.items():
                m = given.get(n) if isinstance(given, Mapping) else None
                if not isinstance(m, torch.Tensor) or m.dtype != torch.bool or m.shape != p.shape:
                    raise ValueError(f"init callable must return a bool mask of shape {tuple(p.shape)} for {n!r}")
                self._set_units(n, self._unit_scores(n, m.float()) > 0)
        elif kind == "resume":
            for n, p in self.params.items():
                self._set_units(n, self._unit_scores(n, p) != 0)
        elif kind == "lottery":
            source = cfg.lottery_masks
            if isinstance(source, (str, os.PathLike)):
                source = load_torch(source)  # names the path of a damaged file
            missing = [n for n in self.params if n not in source]
            if missing:
                raise ValueError(f"lottery_masks lacks masks for {missing}")
            for n, p in self.params.items():
                m = source[n]
                if m.shape != p.shape or m.dtype != torch.bool:
                    raise ValueError(f"lottery_masks[{n!r}] must be a bool mask of shape {tuple(p.shape)}")
                spec = self.masks.row_shards.get(n)
                units = (self._unit_scores(n, m[spec.start:spec.stop] if spec else m.float()) > 0)
                if cfg.lottery_shuffle:
                    k = self._count(n, units)
                    lo, hi = self._unit_range(n)
                    perm = torch.randperm(self._n_units(n), generator=gen)[:k]
                    units = torch.zeros(self._n_units(n), dtype=torch.bool)
                    units[perm] = True
                    units = units[lo:hi].to(units.device)
                self._set_units(n, units.to(p.device))
        else:
            dens = self._layer_densities(kind)
            for n, p in self.params.items():
                n_units = self._n_units(n)
                k = min(n_units, round_half_up(dens[n] * n_units))
                units = torch.zeros(n_units, dtype=torch.bool)
                if kind == "dense" or k == n_units:
                    units[:] = True
                else:
                    units[torch.randperm(n_units, generator=gen)[:k]] = True
                lo, hi = self._unit_range(n)  # the draw is over every unit; this rank keeps its own
                self._set_units(n, units[lo:hi].to(p.device))
        self._initial_density = {n: self._count(n, u) / self._n_units(n) for n, u in self._units.items()}
        self._final_density = self._layer_densities("uniform") if cfg.decay == "magnitude_prune" else None
        # zeroes weights and optimizer state: what may be a checkpoint's is kept until the first
        # step, for load_state_dict to put back (a model or optimizer loaded before the trainer)
        self._provisional = apply_keeping(self.masks, self.optimizer)

    # -- the step ----------------------------------------------------------------------------
    def is_update_step(self, step: int | None = None) -> bool:
        """Whether optimizer step ``step`` (default: the next one) is a connectivity update."""
        cfg = self.config
        t = self.step_count if step is None else check_int("step", step, min_value=0)
        if cfg.update_on == "epoch":
            return self._epoch_update_pending and t < cfg.end_step
        if cfg.decay == "magnitude_prune":
            return t in self._prune_events()
        return 0 < t < cfg.end_step and t % cfg.update_interval == 0 and \
            (callable(cfg.grow) or cfg.grow != "none" or callable(cfg.decay))

    def _prune_events(self) -> set:
        cfg = self.config
        key = (cfg.start_step, cfg.end_step, cfg.update_interval)
        cached = getattr(self, "_events_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, set(prune_events(cfg.start_step, max(cfg.start_step, cfg.end_step),
                                            cfg.update_interval)))
            self._events_cache = cached
        return cached[1]

    def on_epoch_end(self) -> None:
        """With ``update_on="epoch"``: the next ``step()`` performs a connectivity update."""
        self._epoch_update_pending = True

    def step(self, scaler: Any = None) -> bool:
        """Replaces ``optimizer.step()``. Returns True when this step updated connectivity.

        With an AMP ``GradScaler`` pass ``scaler=``: gradients are unscaled here, a step with
        inf/NaN gradients is skipped (nothing advances) and ``scaler.update()`` is yours to call.
        """
        self._begin_step()
        if scaler is not None:
            try:
                scaler.unscale_(self.optimizer)
            except RuntimeError:
                pass  # already unscaled by the caller
            grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            if grads and not bool(torch.stack(torch._foreach_norm(grads)).isfinite().all()):
                scaler.step(self.optimizer)  # records the skip for scaler.update()
                self.masks.apply()
                return False
        update = self.is_update_step()
        gradual = self.config.decay == "magnitude_prune"
        if update and not gradual:
            self._update()
            self._epoch_update_pending = False
            self.step_count += 1
            return True
        pruning_event = update and gradual
        self._before_step()
        if scaler is not None:
            scaler.step(self.optimizer)
        else:
            self.optimizer.step()
        self._after_step()
        if pruning_event:  # gradual magnitude pruning prunes after a normal step (Zhu & Gupta)
            self._update()
        self.step_count += 1
        return pruning_event

    def _has_schedule(self) -> bool:
        cfg = self.config
        return cfg.decay == "magnitude_prune" or callable(cfg.grow) or cfg.grow != "none" or callable(cfg.decay)

    def _begin_step(self) -> None:
        """Start of a step: the initial masks are final now; warn once past ``total_steps``."""
        self._provisional = None
        cfg = self.config
        if self._warned_past_end or cfg.total_steps is None or self.step_count < cfg.total_steps \
                or not self._has_schedule():
            return
        self._warned_past_end = True
        warnings.warn(
            f"SparseTrainer: step {self.step_count + 1} is past total_steps={cfg.total_steps}, the run "
            f"length its schedule was planned for (end_step={cfg.end_step}: no connectivity update "
            "after it); give the preset total_steps=<the number of optimizer steps you train for>",
            StepsPastEndWarning, stacklevel=3)

    def _weight_versions(self) -> tuple:
        return tuple(local(p)._version for p in self.params.values())

    def _before_step(self) -> None:
        """Mask the gradients (unless ``dense_gradients``); re-mask the weights and state first if
        anything but this trainer's own steps wrote to the weights since the last step."""
        if self.config.dense_gradients:
            return
        if self._versions != self._weight_versions():
            self.masks.apply(self.optimizer)
        self.masks.apply_to_grads()

    def _after_step(self) -> None:
        """Zero the inactive weights after the optimizer step; a no-op (see the module docs) for
        the optimizers in ``_ZERO_KEEPING`` when the gradients were masked."""
        if self.config.dense_gradients or type(self.optimizer) not in _ZERO_KEEPING:
            # with masked gradients the state of inactive weights stays at the zero every update
            # leaves it at, so only the weights need re-masking
            self.masks.apply()
            self._versions = None
        else:
            self._versions = self._weight_versions()

    def before_optimizer_step(self) -> bool:
        """Hook form of :meth:`step` for loops you do not own (e.g. a Hugging Face ``Trainer``):
        call after ``backward()`` (and gradient unscaling/clipping), before ``optimizer.step()``,
        then :meth:`after_optimizer_step`.

        On an update step the connectivity is updated and every gradient is set to ``None``, so
        the ``optimizer.step()`` that follows leaves every parameter and its state untouched (the
        update replaces the step, as with :meth:`step`). A step whose gradients hold inf/NaN (one
        an AMP scaler skips) changes nothing and is not counted. Returns True on update steps.
        """
        self._begin_step()
        grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if grads and not bool(torch.stack(torch._foreach_norm(grads)).isfinite().all()):
            self._hook_state = "skipped"
            return False
        if self.is_update_step() and self.config.decay != "magnitude_prune":
            self._update()
            self._epoch_update_pending = False
            for g in self.optimizer.param_groups:
                for p in g["params"]:
                    p.grad = None
            self._hook_state = "updated"
            return True
        self._before_step()
        self._hook_state = "stepped"
        return False

    def after_optimizer_step(self) -> None:
        """Second half of the hook form: re-applies the masks and advances the step count."""
        state = getattr(self, "_hook_state", None)
        if state is None:
            raise RuntimeError("after_optimizer_step() without before_optimizer_step()")
        self._hook_state = None
        if state == "skipped":
            self.masks.apply()
            return
        if state == "stepped":
            self._after_step()
            if self.config.decay == "magnitude_prune" and self.is_update_step():
                self._update()  # gradual magnitude pruning prunes after a normal step
        self.step_count += 1

    # -- connectivity update --------------------------------------------------------------------
    def _momentum(self, p: torch.Tensor) -> torch.Tensor | None:
        state = self.optimizer.state.get(p, {})
        if "momentum_buffer" in state and state["momentum_buffer"] is not None:
            return local(state["momentum_buffer"])
        if "exp_avg" in state:
            eps = next((g.get("eps", 1e-8) for g in self.optimizer.param_groups
                        if any(q is p for q in g["params"])), 1e-8)
            return local(state["exp_avg"]) / (local(state["exp_avg_sq"]).sqrt() + eps)
        return None

    def _ctx(self, n: str) -> LayerContext:
        p = self.params[n]
        return LayerContext(n, p.detach(), p.grad, self._momentum(p), self.generator)

    def _decay(self) -> float:
        cfg = self.config
        if callable(cfg.decay):  # checked before anything is dropped
            value = cfg.decay(self.step_count)
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            return check_float(f"decay({self.step_count})", value, low=0.0, high=1.0)
        return drop_fraction(cfg.decay, self.step_count, alpha=cfg.alpha, t_end=max(1, cfg.end_step),
                             eta_min=cfg.eta_min)

    @torch.no_grad()
    def _update(self) -> None:
        cfg = self.config
        if cfg.decay == "magnitude_prune":
            self._gradual_prune()
        else:
            self._drop_and_grow(self._decay())
        self.updates += 1
        # inactive weights are 0; so is their optimizer state, unless dense_gradients (SNFS keeps a
        # dense momentum); grown weights and their state were zeroed by _drop_and_grow
        self.masks.apply(None if cfg.dense_gradients else self.optimizer)
        for p in self.params.values():
            if p.grad is not None and not cfg.dense_gradients:
                p.grad.zero_()
        self.history.append({"step": self.step_count, "density": 1.0 - self.masks.sparsity()})

    def _drop_and_grow(self, fraction: float) -> None:
        cfg = self.config
        gen = self.generator
        names = list(self.params)
        before = {n: self._units[n].clone() for n in names}
        active = {n: self._count(n, before[n]) for n in names}
        n_drop = {n: min(active[n], _drop_count(cfg.drop_rounding, fraction, active[n])) for n in names}
        redistributing = callable(cfg.redistribute) or cfg.redistribute != "none"
        growing = callable(cfg.grow) or cfg.grow != "none"
        # where each layer can regrow: connections inactive before the drop (nothing just dropped),
        # with a nonzero score for score-based growth unless grow_zero_score; with regrow_dropped
        # the dropped connections too (whatever their score: regrowing one is keeping it)
        grow_scores = {n: self._grow_scores(n) for n in names} if growing else {}
        free = {n: self._count(n, ~before[n] if grow_scores.get(n) is None or cfg.grow_zero_score else
                               ~before[n] & (grow_scores[n] != 0)) for n in names}
        room = {n: free[n] + (n_drop[n] if cfg.regrow_dropped else 0) for n in names}
        if growing and not redistributing:
            # a layer regrows what it dropped: it cannot drop more than it can regrow (a dense
            # layer stays dense)
            n_drop = {n: min(n_drop[n], room[n]) for n in names}
        if growing:
            # every dropped connection must find a place to regrow (the total is preserved exactly):
            # with redistribution at high density, drop no more than all layers can regrow
            if sum(n_drop.values()) > sum(room.values()):
                n_drop = dict(zip(names, _allocate_counts([n_drop[n] for n in names],
                                                          [float(n_drop[n]) for n in names],
                                                          sum(room.values()))))
        after = {}
        # drop
        if callable(cfg.prune):
            for n in names:
                res = cfg.prune(self.params[n].detach(), self._weight_mask(n, before[n]), n_drop[n], self._ctx(n))
                after[n] = self._units_from_callable(n, res, "prune")
                if bool((after[n] & ~before[n]).any()) or int(after[n].sum()) != active[n] - n_drop[n]:
                    raise ValueError(f"prune callable must remove exactly {n_drop[n]} active connections "
                                     f"from {n!r} and add none")
        elif cfg.prune == "global_magnitude":
            layers = [Units(n, self._unit_scores(n, self.params[n]), 1, self._n_units(n), ~before[n],
                            group=self._group(n), total=self._n_units(n)) for n in names]
            total_drop = sum(n_drop.values())
            inactive = sum(self._n_units(n) - active[n] for n in names)
            pruned = _global_lowest(layers, inactive + total_drop, [1] * len(layers))
            for n in names:
                after[n] = ~pruned[n]
            n_drop = {n: active[n] - self._count(n, after[n]) for n in names}
        elif cfg.prune == "set_signed":
            for n in names:
                after[n] = before[n] & ~_set_signed_drop(local(self.params[n]), before[n], n_drop[n], gen,
                                                         self._group(n))
        else:
            for n in names:
                scores = self._unit_scores(n, self.params[n])
                dropped = _pick(scores, before[n], n_drop[n], largest=False, gen=gen, group=self._group(n))
                after[n] = before[n] & ~dropped
        # how many to grow where
        if growing:
            capacity = [free[n] + (active[n] - self._count(n, after[n]) if cfg.regrow_dropped else 0)
                        for n in names]
            total = min(sum(n_drop.values()), sum(capacity))
            # without redistribution each layer regrows what it dropped (exactly, whenever its
            # capacity allows; global magnitude may need to spread the rest)
            stats = [self._redistribution_stat(n, after[n]) for n in names] if redistributing \
                else [float(n_drop[n]) for n in names]
            n_grow = dict(zip(names, _allocate_counts(capacity, stats, total)))
            for n in names:
                # just-dropped connections are candidates only with regrow_dropped
                base = after[n] if cfg.regrow_dropped else before[n]
                candidates = ~base
                if callable(cfg.grow):
                    res = cfg.grow(self.params[n].detach(), self._weight_mask(n, base), n_grow[n],
                                   self._ctx(n))
                    grown = self._units_from_callable(n, res, "grow") & candidates
                    if int(grown.sum()) != n_grow[n]:
                        raise ValueError(f"grow callable must add exactly {n_grow[n]} connections to {n!r}, "
                                         f"added {int(grown.sum())}")
                elif grow_scores[n] is None:  # random
                    grown = _pick_random(candidates, n_grow[n], self.generator, self._group(n))
                else:
                    if not cfg.grow_zero_score:
                        keep_room = (before[n] & ~after[n]) if cfg.regrow_dropped else False
                        candidates = candidates & ((grow_scores[n] != 0) | keep_room)
                    grown = _pick(grow_scores[n], candidates, n_grow[n], largest=True, gen=self.generator,
                                  group=self._group(n))
                after[n] = after[n] | grown
        for n in names:
            pat, p = self._unit_pattern[n], self.params[n]
            w = local(p.detach())
            grown = pat.expand(after[n] & ~before[n], w, True)
            self._set_units(n, after[n])
            if grown.any():  # grown weights and their optimizer state start at exactly 0
                w.masked_fill_(grown, 0.0)
                for v in self.optimizer.state.get(p, {}).values():
                    v = local(v)
                    if isinstance(v, torch.Tensor) and v.shape == w.shape:
                        v.masked_fill_(grown, 0)

    def _grow_scores(self, n: str) -> torch.Tensor | None:
        """Per-unit growth scores of layer ``n`` for the named score rules (``None`` for random
        growth and callables)."""
        cfg = self.config
        if callable(cfg.grow) or cfg.grow == "random":
            return None
        p = self.params[n]
        if cfg.grow in ("gradient", "struct_gradient"):
            if p.grad is None:
                raise RuntimeError(f"grow='gradient' needs the gradient of {n!r} on update steps "
                                   "(call loss.backward() before step())")
            scores = self._unit_scores(n, p.grad)
        else:  # momentum
            m = self._momentum(p)
            if m is None:
                raise RuntimeError(f"grow='momentum' needs SGD momentum or Adam moments for {n!r}")
            scores = self._unit_scores(n, m)
        return scores

    def _redistribution_stat(self, n: str, units: torch.Tensor) -> float:
        cfg = self.config
        p = self.params[n]
        if callable(cfg.redistribute):
            return float(cfg.redistribute(p.detach(), self._weight_mask(n, units), self._ctx(n)))
        if cfg.redistribute == "nonzero":
            return float(self._count(n, units))
        src = self._momentum(p) if cfg.redistribute == "momentum" else p.grad
        if src is None or not self._count(n, units):
            return 0.0
        if self._group(n) is not None:
            return _sharded.mean_over(self._unit_scores(n, src)[units], self._group(n))
        return float(self._unit_scores(n, src)[units].mean())

    def _gradual_prune(self) -> None:
        events = sorted(self._prune_events())
        k = events.index(self.step_count) + 1
        for n in self.params:
            final_sparsity = 1.0 - self._final_density[n]
            s0 = 1.0 - self._initial_density[n]
            s = sparsity_at("cubic", k / len(events), min(s0, final_sparsity), final_sparsity)
            n_units = self._n_units(n)
            keep = n_units - min(n_units, round_half_up(s * n_units))
            units = self._units[n]
            n_drop = self._count(n, units) - keep
            if n_drop > 0:
                dropped = _pick(self._unit_scores(n, self.params[n]), units, n_drop, largest=False,
                                gen=self.generator, group=self._group(n))
                self._set_units(n, units & ~dropped)

    # -- reporting -------------------------------------------------------------------------------
    @property
    def report(self) -> SparsityReport:
        """Per-layer density/sparsity table of the current masks (``print(trainer.report)``; see
        :class:`~gradprune.report.Report`). Calling it, ``trainer.report()``, is deprecated."""
        return SparsityReport(self.masks)

    def training_flops(self, example_input: Any) -> dict:
        """Estimated FLOPs of one training step (forward = 1x, backward = 2x), RigL's accounting.

        ``f_D``/``f_S``: forward FLOPs (2 x MACs) of the masked layers for ``example_input`` with
        dense / current sparse weights. Per step: dense ``3 f_D``; static, SET and pruning
        ``3 f_S``; RigL ``(3 f_S dT + 2 f_S + f_D) / (dT + 1)``; dense-gradient methods (SNFS)
        ``2 f_S + f_D``. Only Linear/Conv/MultiheadAttention projections are counted.
        """
        macs = layer_macs(self.model, example_input, set(self.params))
        f_dense = 2.0 * sum(macs.values())
        f_sparse = 2.0 * sum(m * float(self.masks[n].float().mean()) for n, m in macs.items())
        cfg = self.config
        if cfg.dense_gradients:
            per_step = 2 * f_sparse + f_dense
        elif cfg.grow in ("gradient", "struct_gradient"):
            dt = cfg.update_interval
            per_step = (3 * f_sparse * dt + 2 * f_sparse + f_dense) / (dt + 1)
        else:
            per_step = 3 * f_sparse
        return {"forward_dense": f_dense, "forward_sparse": f_sparse, "train_step_dense": 3 * f_dense,
                "train_step": per_step, "ratio": per_step / (3 * f_dense) if f_dense else float("nan")}

    # -- state ------------------------------------------------------------------------------------
    def _config_state(self) -> dict:
        """The config fields a state records (callables and ``lottery_masks`` cannot be saved)."""
        return {k: v for k, v in self.config.to_dict().items() if not callable(v) and k != "lottery_masks"}

    def state_dict(self) -> dict:
        """Masks, counters and the random generator's state (tensors and plain values only)."""
        return {"config": self._config_state(),
                "step_count": self.step_count, "updates": self.updates,
                "epoch_update_pending": self._epoch_update_pending,
                "masks": self.masks.state_dict(), "generator": self.generator.get_state(),
                "history": list(self.history), "initial_density": dict(self._initial_density)}

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict` (a new model, optimizer and trainer are fine).

        The run continues bit for bit as if it had not stopped, whatever the order of loading the
        model's weights, the optimizer's state and this state: the weights (and optimizer state)
        may be loaded before the trainer is built (the entries its initial masks zeroed are put back
        here), or after, before or after this call. Everything is validated before anything
        changes: the config (every saved field, so a state with an empty or partial config is
        refused), counters (ints >= 0), the generator state and the masks (names, dtype, shape).
        Then the masks are applied to the weights, and to the optimizer state unless
        ``dense_gradients`` (SNFS keeps the dense momentum of inactive weights).

        Example:
            >>> import copy, torch, torch.nn as nn
            >>> import gradprune as gp
            >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
            >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            >>> cfg = gp.SparseConfig.rigl(density=0.5, total_steps=8, update_interval=2)
            >>> sparse = gp.SparseTrainer(model, opt, cfg)
            >>> ckpt = copy.deepcopy({"model": model.state_dict(), "sparse": sparse.state_dict()})
            >>> fresh = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
            >>> _ = fresh.load_state_dict(ckpt["model"])          # weights first ...
            >>> resumed = gp.SparseTrainer(fresh, torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9), cfg)
            >>> resumed.load_state_dict(ckpt["sparse"])           # ... then the trainer's state
            >>> all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters()))
            True
        """
        if not isinstance(state, Mapping) or "masks" not in state:
            raise TypeError("state must be a dict from SparseTrainer.state_dict()")
        missing = sorted({"config", "step_count", "updates", "epoch_update_pending", "generator"} - set(state))
        if missing:
            raise ValueError(f"trainer state is missing {missing}")
        saved = state["config"]
        if not isinstance(saved, Mapping):
            raise TypeError(f"trainer state 'config' must be a dict, got {type(saved).__name__}")
        mine = self._config_state()
        # a state saved before these fields existed ran with the old semantics (_LEGACY_CONFIG)
        legacy = {k: v for k, v in _LEGACY_CONFIG.items() if k not in saved} if saved else {}
        saved = {**saved, **legacy}
        diff = sorted(set(mine) ^ set(saved) | {k for k in set(mine) & set(saved) if saved[k] != mine[k]})
        if diff:
            absent = sorted(set(mine) - set(saved))
            old = {k: v for k, v in legacy.items() if k in diff}
            raise ValueError(f"trainer state was saved with a different config (fields {diff})"
                             + (f"; the saved config lacks {absent}" if absent else "")
                             + (f"; it predates {sorted(old)} and ran with "
                                + ", ".join(f"{k}={v!r}" for k, v in sorted(old.items()))
                                + ": build the config with these to resume it" if old else ""))
        step_count = check_int("step_count", state["step_count"], min_value=0)
        updates = check_int("updates", state["updates"], min_value=0)
        pending = check_bool("epoch_update_pending", state["epoch_update_pending"])
        gen_state = state["generator"]
        want = self.generator.get_state()
        if not isinstance(gen_state, torch.Tensor) or gen_state.dtype != torch.uint8 or gen_state.shape != want.shape:
            raise ValueError(f"trainer state 'generator' must be a torch.uint8 tensor of shape {tuple(want.shape)} "
                             "(torch.Generator.get_state()), got "
                             + (f"{gen_state.dtype} {tuple(gen_state.shape)}" if isinstance(gen_state, torch.Tensor)
                                else type(gen_state).__name__))
        try:
            torch.Generator(device=self.generator.device).set_state(gen_state)
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"trainer state 'generator' is not a valid generator state: {e}") from e
        history = state.get("history", [])
        if not isinstance(history, list):
            raise TypeError(f"trainer state 'history' must be a list, got {type(history).__name__}")
        initial = state.get("initial_density", self._initial_density)
        if not isinstance(initial, Mapping) or set(initial) != set(self.params) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1 for v in initial.values()):
            raise ValueError("trainer state 'initial_density' must map every masked parameter to a density in [0, 1]")
        previous = self.masks.state_dict()
        self.masks.load_state_dict(state["masks"])  # validates names, dtypes and shapes first
        units = {}
        for n, p in self.params.items():
            pat, m = self._unit_pattern[n], self.masks[n]
            units[n] = m.reshape(-1).clone() if pat.spec == "1x1" else pat.unit_scores(m.float(), "max", True) > 0
            if pat.spec != "1x1" and not torch.equal(pat.expand(units[n], local(p.detach()), True), m):
                self.masks.load_state_dict(previous)
                raise ValueError(f"mask for {n!r} does not cover whole {pat.spec} units, as this config's "
                                 "structured rules need")
        # everything validated: nothing below can fail
        restore_zeroed(self._provisional, self.masks, self.optimizer)
        self._provisional = None
        self._units = units
        self.step_count, self.updates, self._epoch_update_pending = step_count, updates, pending
        self.generator.set_state(gen_state)
        self.history = list(history)
        self._initial_density = {n: float(initial[n]) for n in self.params}
        self._versions, self._hook_state = None, None
        self.masks.apply(None if self.config.dense_gradients else self.optimizer)


@keeps_modes
def layer_macs(model: nn.Module, example_input: Any, names: set) -> dict[str, float]:
    """Multiply-accumulates per masked parameter for one forward pass of ``example_input``."""
    macs: dict[str, float] = {}
    hooks = []
    by_module = {}
    mha_out = {}
    for mod_name, module in model.named_modules():
        for pname in ("weight", "in_proj_weight"):
            q = f"{mod_name}.{pname}" if mod_name else pname
            if q in names:
                by_module[id(module)] = (q, module)
        # MultiheadAttention applies out_proj functionally (its forward hook never fires)
        q_out = f"{mod_name}.out_proj.weight" if mod_name else "out_proj.weight"
        if isinstance(module, nn.MultiheadAttention) and q_out in names:
            mha_out[id(module)] = q_out
            by_module.setdefault(id(module), (None, module))

    def hook(module, inputs, output):
        q, _ = by_module[id(module)]
        w = getattr(module, "weight", None)
        if isinstance(module, nn.MultiheadAttention):
            x = inputs[0]
            tokens = x.numel() // x.shape[-1]
            if q is not None:
                macs[q] = macs.get(q, 0.0) + tokens * module.in_proj_weight.numel()
            if id(module) in mha_out:
                q_o = mha_out[id(module)]
                macs[q_o] = macs.get(q_o, 0.0) + tokens * module.out_proj.weight.numel()
            return
        out = output[0] if isinstance(output, tuple) else output
        if isinstance(module, nn.Linear):
            macs[q] = macs.get(q, 0.0) + out.numel() * module.in_features
        elif isinstance(module, nn.modules.conv._ConvNd) and w is not None:
            macs[q] = macs.get(q, 0.0) + out.numel() * w[0].numel()
        elif type(module).__name__ == "Conv1D" and w is not None:  # GPT-2: weight [in, out]
            macs[q] = macs.get(q, 0.0) + out.numel() * w.shape[0]

    for _, module in by_module.values():
        hooks.append(module.register_forward_hook(hook))
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            if isinstance(example_input, (tuple, list)):
                model(*example_input)
            elif isinstance(example_input, Mapping):
                model(**example_input)
            else:
                model(example_input)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return macs
