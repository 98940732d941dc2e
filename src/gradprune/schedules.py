"""Sparsity over optimizer steps, and drop fraction over steps.

**Prune events.** Steps are counted from 0 (the first optimizer step is step 0). Events fall on
``start_step, start_step + frequency, ...`` up to ``end_step``, and on ``end_step`` itself when the
frequency does not land on it, so the target is always reached at ``end_step``. ``start_step ==
end_step`` is one-shot. With ``K`` events, event ``k`` (1-based) sets sparsity ``s(k / K)``:

=========== ========================================================== =================
name         s(p), p = k / K                                            shape
=========== ========================================================== =================
``oneshot``  s_T (only one event, at ``end_step``)
``linear``   s_0 + (s_T - s_0) p
``exp``      1 - (1 - s_0) ((1 - s_T) / (1 - s_0)) ^ p                   Neural Compressor
``cos``      s_0 + (s_T - s_0) (1 - cos(pi p / 2))                       slow first
``cube``     s_0 + (s_T - s_0) p^3                                       slow first
``cubic``    s_T + (s_0 - s_T) (1 - p)^3                                 Zhu & Gupta: fast first
=========== ========================================================== =================

Example:
    >>> from gradprune.schedules import SparsitySchedule
    >>> sch = SparsitySchedule("linear", 0.0, 0.8, start_step=0, end_step=30, frequency=10)
    >>> sch.events
    [0, 10, 20, 30]
    >>> [round(sch.sparsity_at_event(k), 3) for k in range(1, 5)]
    [0.2, 0.4, 0.6, 0.8]
"""

from __future__ import annotations

import math

from ._checks import check_choice, check_float, check_int
from .config import SCHEDULES

__all__ = ["sparsity_at", "prune_events", "SparsitySchedule", "drop_fraction", "DROP_SCHEDULES"]

DROP_SCHEDULES = ("cosine", "linear", "constant")


def sparsity_at(schedule: str, progress: float, initial: float, target: float) -> float:
    """Sparsity of ``schedule`` at ``progress`` in [0, 1] between ``initial`` and ``target``."""
    check_choice("schedule", schedule, SCHEDULES)
    p = check_float("progress", progress, low=0.0, high=1.0)
    s0 = check_float("initial", initial, low=0.0, high=1.0, high_open=True)
    st = check_float("target", target, low=0.0, high=1.0, high_open=True)
    if p == 0.0 or p == 1.0:  # exact endpoints (exp/cubic would give e.g. 0.09999999999999998)
        return s0 if p == 0.0 else st
    if schedule == "oneshot":
        return st if p > 0 else s0
    if schedule == "linear":
        return s0 + (st - s0) * p
    if schedule == "exp":
        return 1.0 - (1.0 - s0) * ((1.0 - st) / (1.0 - s0)) ** p
    if schedule == "cos":
        return s0 + (st - s0) * (1.0 - math.cos(math.pi * p / 2.0))
    if schedule == "cube":
        return s0 + (st - s0) * p ** 3
    return st + (s0 - st) * (1.0 - p) ** 3  # cubic, Zhu & Gupta 2018


def prune_events(start_step: int, end_step: int, frequency: int) -> list[int]:
    """The optimizer steps at whose end masks are recomputed."""
    check_int("start_step", start_step, min_value=0)
    check_int("end_step", end_step, min_value=0)
    check_int("frequency", frequency, min_value=1)
    if end_step < start_step:
        raise ValueError(f"end_step must be >= start_step, got end_step={end_step}, start_step={start_step}")
    events = list(range(start_step, end_step + 1, frequency))
    if events[-1] != end_step:
        events.append(end_step)
    return events


class SparsitySchedule:
    """A schedule bound to its steps: ``events`` and the sparsity at each one."""

    def __init__(self, schedule: str, initial: float, target: float, *, start_step: int = 0,
                 end_step: int = 0, frequency: int = 1):
        self.schedule = check_choice("schedule", schedule, SCHEDULES)
        self.initial = check_float("initial", initial, low=0.0, high=1.0, high_open=True)
        self.target = check_float("target", target, low=0.0, high=1.0, high_open=True)
        if self.schedule == "oneshot":
            start_step = end_step
        self.events = prune_events(start_step, end_step, frequency)
        self._index = {e: i + 1 for i, e in enumerate(self.events)}

    @property
    def n_events(self) -> int:
        return len(self.events)

    def sparsity_at_event(self, k: int) -> float:
        """Sparsity after the k-th event (1-based)."""
        return sparsity_at(self.schedule, k / self.n_events, self.initial, self.target)

    def sparsity_for_step(self, step: int) -> float | None:
        """The sparsity to prune to at the end of ``step``, or ``None`` if it is no event."""
        check_int("step", step, min_value=0)
        k = self._index.get(step)
        return None if k is None else self.sparsity_at_event(k)


def drop_fraction(schedule: str, step: int, *, alpha: float, t_end: int, eta_min: float = 0.0) -> float:
    """Fraction of active weights to drop at ``step`` (dynamic sparse training).

    ``cosine``: ``eta_min + (alpha - eta_min) / 2 * (1 + cos(pi * t / t_end))`` (constant after
    ``t_end``); ``linear``: ``alpha - alpha * (t + 1) / t_end`` (at least 0); ``constant``: ``alpha``.
    """
    check_choice("schedule", schedule, DROP_SCHEDULES)
    check_int("step", step, min_value=0)
    check_int("t_end", t_end, min_value=1)
    alpha = check_float("alpha", alpha, low=0.0, high=1.0)
    eta_min = check_float("eta_min", eta_min, low=0.0, high=1.0)
    if eta_min > alpha:
        raise ValueError(f"eta_min must be <= alpha, got eta_min={eta_min!r}, alpha={alpha!r}")
    if schedule == "constant":
        return alpha
    t = min(step, t_end)
    if schedule == "cosine":
        return eta_min + (alpha - eta_min) / 2.0 * (1.0 + math.cos(math.pi * t / t_end))
    return max(0.0, alpha * (1.0 - (t + 1) / t_end))  # exactly 0 once t + 1 >= t_end
