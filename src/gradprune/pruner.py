"""Gradual pruning inside your own training loop.

The pruner follows Neural Compressor's hooks. Its clock is the number of *optimizer steps* taken
(a micro-batch of gradient accumulation is not a step), counted from 0; at the end of every step
listed by the schedule (see :mod:`gradprune.schedules`) it recomputes the masks from the
criterion's scores, to the schedule's sparsity; after every step it re-applies the masks, so pruned
weights stay exactly zero.

A step whose gradients (of any of the model's parameters) hold inf or NaN is treated as skipped —
exactly the steps that ``torch.amp.GradScaler`` skips: it neither updates the scores nor advances the
schedule.
With a ``GradScaler``, call ``scaler.unscale_(optimizer)`` before ``on_before_optimizer_step()`` (as
for gradient clipping) so the scores see true gradients.

Example:
    >>> import torch, torch.nn as nn
    >>> import gradprune as gp
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    >>> pruner = gp.Pruner(model, gp.PruneConfig(criterion="snip_momentum", pattern="4x1",
    ...                    target_sparsity=0.5, schedule="cubic", start_step=0, end_step=20,
    ...                    frequency=5), optimizer=opt)
    >>> for step in range(30):
    ...     x, y = torch.randn(16, 8), torch.randint(0, 2, (16,))
    ...     pruner.on_step_begin()
    ...     loss = nn.functional.cross_entropy(model(x), y)
    ...     opt.zero_grad(); loss.backward()
    ...     pruner.on_before_optimizer_step()
    ...     opt.step()
    ...     pruner.on_after_optimizer_step()
    >>> pruner.masks.sparsity(), pruner.step
    (0.5, 30)
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

import torch
from torch import nn

from .config import PruneConfig
from .masks import MaskSet, SparsityReport, build_masks, fitting_targets
from .patterns import get_pattern
from .prune import make_config
from .schedules import SparsitySchedule
from .scores import get_criterion
from ._checks import check_int
from ._resume import apply_keeping, restore_zeroed
from .targets import find_targets

__all__ = ["Pruner"]

# What a saved pruner state whose config lacks these fields ran with: they were added later, and
# before that every count was rounded half up. ``load_state_dict`` reads such a config with these
# values, so an old checkpoint resumes into the old behaviour (never silently into a new one).
_LEGACY_CONFIG = {"count_rounding": "half_up"}


class Pruner:
    """Gradual pruning driven by three hooks called from your training loop.

    Args:
        model: the model to prune in place.
        config: a :class:`PruneConfig` (keyword ``fields`` override or build it); it needs a
            ``target_sparsity`` (or an N:M pattern, whose ratio is the target).
        optimizer: optional; when given, its per-parameter state (momentum, Adam moments) is
            zeroed for pruned entries at every prune event.
        mask: optional existing mask (a :class:`MaskSet` or ``{name: bool tensor}``, e.g. from
            ``MaskSet.from_torch_prune``): its pruned entries stay pruned and count toward every
            target of the schedule.

    Loop (gradient accumulation: call ``on_before_optimizer_step``/``on_after_optimizer_step``
    once per optimizer step, not per micro-batch)::

        pruner.on_step_begin()
        loss.backward()
        pruner.on_before_optimizer_step()
        optimizer.step()
        pruner.on_after_optimizer_step()
    """

    def __init__(self, model: nn.Module, config: PruneConfig | None = None, *,
                 optimizer: torch.optim.Optimizer | None = None,
                 mask: "MaskSet | dict | None" = None, **fields):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        # a copy: editing the caller's config afterwards must not desynchronise the pruner
        cfg = copy.deepcopy(make_config(config, fields))
        target = cfg.effective_target()
        if target is None:
            raise ValueError("Pruner needs target_sparsity (topk/threshold are for one-shot prune())")
        if optimizer is not None:
            held = {id(p) for g in optimizer.param_groups for p in g["params"]}
            if not any(id(p) in held for p in model.parameters()):
                raise ValueError("optimizer holds none of the model's parameters (was it built for "
                                 "another model?)")
        self.config = cfg
        self.model = model
        self.optimizer = optimizer
        targets = find_targets(model, cfg.include, cfg.exclude, cfg.module_types, cfg.include_classifier,
                               cfg.strict_filters)
        self.pattern = get_pattern(cfg.pattern)
        self._transposed = [n for n, t in targets.items() if t.transposed]  # Conv1D: [in, out]
        fit, self.skipped = fitting_targets({n: t.shape for n, t in targets.items()}, self.pattern, self._transposed)
        self._skipped_shapes = {n: targets[n].shape for n in self.skipped}
        self.params = {n: targets[n].param for n in fit}
        self.criterion = get_criterion(cfg, self.params)
        self.schedule = SparsitySchedule(cfg.schedule, cfg.initial_sparsity, target,
                                         start_step=cfg.start_step, end_step=cfg.end_step,
                                         frequency=cfg.frequency)
        self.masks = MaskSet(model, names=fit)
        if mask is not None:  # start from an existing mask: it stays pruned and counts toward targets
            if not hasattr(mask, "items"):
                raise TypeError(f"mask must be a MaskSet or a mapping name -> bool tensor, got {type(mask).__name__}")
            unknown = sorted(set(mask) - set(fit))
            if unknown:
                raise ValueError(f"mask names parameters this pruner does not prune: {unknown}")
            for n, m in mask.items():
                self.masks[n] = m
        # a checkpoint's optimizer state loaded before the pruner is kept for load_state_dict
        self._provisional = apply_keeping(self.masks, optimizer) if mask is not None else None
        self.step = 0
        self.skipped_steps = 0
        self.history: list[tuple[int, float]] = []
        self._skip_this_step = False
        self._last_event = self.schedule.events[-1]

    # -- hooks ----------------------------------------------------------------------------
    def on_step_begin(self, step: Any = None) -> None:
        """Call before the forward pass. ``step`` is accepted for Neural Compressor-style loops and
        not used: the schedule follows the pruner's own count of optimizer steps (``self.step``)."""
        if self.step <= self._last_event:
            self.criterion.on_step_begin()

    def on_before_optimizer_step(self) -> None:
        """Call after ``backward()`` (and ``scaler.unscale_``), before ``optimizer.step()``."""
        self._skip_this_step = False  # decided afresh: a skipped step may never reach on_after
        self._provisional = None      # the masks given at construction are final now
        if self.step <= self._last_event:
            # every gradient, not only the prunable weights': GradScaler skips a step on any inf/NaN
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            if grads:
                norms = torch._foreach_norm(grads)
                if not bool(torch.stack(norms).isfinite().all()):
                    self._skip_this_step = True
            if not self._skip_this_step:
                self.criterion.on_before_optimizer_step()
        # Gradients are left dense: pruned weights never return (masks only shrink), and
        # re-zeroing them after the step keeps them at exactly 0, at one tensor pass per step.

    def on_after_optimizer_step(self) -> None:
        """Call after ``optimizer.step()``: advances the clock, prunes on event steps, re-masks."""
        if self._skip_this_step:
            self._skip_this_step = False
            self.skipped_steps += 1
            self.masks.apply()
            return
        if self.step <= self._last_event:
            self.criterion.on_after_optimizer_step()
            sparsity = self.schedule.sparsity_for_step(self.step)
            if sparsity is not None:
                self._prune_to(sparsity)
        self.step += 1
        self.masks.apply()

    def _prune_to(self, sparsity: float) -> None:
        cfg = self.config
        if not self.criterion.ready():
            raise RuntimeError(
                f"prune event at step {self.step}: criterion {cfg.criterion!r} has no scores "
                "(no finite gradients reached on_before_optimizer_step since the last event)"
            )
        new = build_masks(self.params, self.criterion.scores, self.pattern, previous=dict(self.masks),
                          signed=self.criterion.signed, reduce=cfg.reduce, allocation=cfg.allocation,
                          sparsity=sparsity, scope=cfg.scope, min_sparsity=cfg.min_sparsity,
                          max_sparsity=cfg.max_sparsity, count_rounding=cfg.count_rounding,
                          transposed=self._transposed)
        for n, m in new.items():
            self.masks[n] = m
        if self.optimizer is not None:
            self.masks.apply_to_optimizer(self.optimizer)
        self.criterion.reset()
        self.history.append((self.step, self.masks.sparsity()))

    # -- reporting and state --------------------------------------------------------------
    @property
    def done(self) -> bool:
        """Whether every prune event has happened."""
        return self.step > self._last_event

    @property
    def report(self) -> SparsityReport:
        """Per-layer sparsity table of the current masks (``print(pruner.report)``; see
        :class:`~gradprune.report.Report`). Calling it, ``pruner.report()``, is deprecated."""
        return SparsityReport(self.masks, self.skipped, self._skipped_shapes)

    def state_dict(self) -> dict:
        """Everything needed to resume mid-schedule (tensors and plain values only)."""
        return {
            "config": self.config.to_dict(),
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "history": [list(h) for h in self.history],
            "masks": self.masks.state_dict(),
            "criterion": self.criterion.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict` (into a new pruner of a new model is fine).

        The run continues bit for bit as if it had not stopped whatever the order: the model's
        weights and the optimizer's state may be loaded before the pruner is built, or after it,
        before or after this call. Everything is validated before anything changes: the config
        (every saved field), ``step``/``skipped_steps`` (ints >= 0), the history, the masks (names,
        dtype, shape) and the criterion's state. Then the masks are applied to the weights; the
        optimizer state is left as loaded (it is zeroed for pruned entries at prune events only).
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        missing = {"config", "step", "masks", "criterion"} - set(state)
        if missing:
            raise ValueError(f"pruner state is missing {sorted(missing)}")
        if not isinstance(state["config"], Mapping):
            raise TypeError(f"pruner state 'config' must be a dict, got {type(state['config']).__name__}")
        mine = self.config.to_dict()
        legacy = {k: v for k, v in _LEGACY_CONFIG.items() if k not in state["config"]}
        absent = sorted(set(mine) - set(state["config"]) - set(legacy))
        if absent:
            raise ValueError(f"pruner state was saved with a different config: the saved config lacks {absent}")
        saved = PruneConfig.from_dict({**state["config"], **legacy})
        if saved != self.config:
            diff = [k for k, v in saved.to_dict().items() if mine[k] != v]
            old = {k: v for k, v in legacy.items() if k in diff}
            raise ValueError(f"pruner state was saved with a different config (fields {diff})"
                             + (f"; it predates {sorted(old)} and ran with "
                                + ", ".join(f"{k}={v!r}" for k, v in old.items()) if old else ""))
        step = check_int("step", state["step"], min_value=0)
        skipped = check_int("skipped_steps", state.get("skipped_steps", 0), min_value=0)
        history = state.get("history", [])
        if not isinstance(history, (list, tuple)) or not all(
                isinstance(h, (list, tuple)) and len(h) == 2 for h in history):
            raise ValueError("pruner state 'history' must be a list of (step, sparsity) pairs")
        previous_masks = self.masks.state_dict()
        previous_criterion = copy.deepcopy(self.criterion.state_dict())
        self.masks.load_state_dict(state["masks"])  # validates names, dtypes and shapes first
        try:
            self.criterion.load_state_dict(state["criterion"])
        except Exception as e:
            self.masks.load_state_dict(previous_masks)
            self.criterion.load_state_dict(previous_criterion)
            raise ValueError(f"pruner state 'criterion' does not fit criterion {self.config.criterion!r}: "
                             f"{type(e).__name__}: {e}") from e
        restore_zeroed(self._provisional, self.masks, self.optimizer)
        self._provisional = None
        self.step = step
        self.skipped_steps = skipped
        self.history = [tuple(h) for h in history]
        self._skip_this_step = False
        self.masks.apply()
