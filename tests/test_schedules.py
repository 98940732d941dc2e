"""Tests for ``gradprune.schedules``: the formulas of ALGORITHMS.md §3/§4, events, drop fraction."""

from __future__ import annotations

import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gradprune.schedules import SparsitySchedule, drop_fraction, prune_events, sparsity_at

SETTINGS = settings(max_examples=80, deadline=None)
SCHEDULES = ["exp", "linear", "cos", "cube", "cubic"]

# ALGORITHMS.md §4, with K prune events and k done (p = k / K), s_0 start and s_T target;
# "cubic" is Zhu & Gupta 2018 (§3): s_f + (s_i - s_f)(1 - p)^3, fast first.
FORMULAS = {
    "exp": lambda p, s0, st_: 1 - (1 - s0) * ((1 - st_) / (1 - s0)) ** p,
    "linear": lambda p, s0, st_: s0 + (st_ - s0) * p,
    "cos": lambda p, s0, st_: s0 + (st_ - s0) * (1 - math.cos(math.pi * p / 2)),
    "cube": lambda p, s0, st_: s0 + (st_ - s0) * p ** 3,
    "cubic": lambda p, s0, st_: st_ + (s0 - st_) * (1 - p) ** 3,
}

sparsities = st.floats(0.0, 0.999)
progress = st.floats(0.0, 1.0)


@st.composite
def s0_st(draw):
    a, b = draw(sparsities), draw(sparsities)
    return min(a, b), max(a, b)


@SETTINGS
@given(schedule=st.sampled_from(SCHEDULES), p=progress, ss=s0_st())
def test_formulas(schedule, p, ss):
    s0, st_ = ss
    assert sparsity_at(schedule, p, s0, st_) == pytest.approx(FORMULAS[schedule](p, s0, st_),
                                                              rel=1e-12, abs=1e-14)


@pytest.mark.parametrize("schedule, p, want", [
    ("linear", 0.25, 0.3), ("cube", 0.5, 0.1 + 0.8 * 0.125), ("cubic", 0.5, 0.9 - 0.8 * 0.125),
    ("cos", 1 / 3, 0.1 + 0.8 * (1 - math.cos(math.pi / 6))),
    ("exp", 0.5, 1 - 0.9 * math.sqrt(0.1 / 0.9)),
])
def test_formula_values(schedule, p, want):
    assert sparsity_at(schedule, p, 0.1, 0.9) == pytest.approx(want, rel=1e-12)


@SETTINGS
@given(schedule=st.sampled_from(SCHEDULES + ["oneshot"]), p1=progress, p2=progress, ss=s0_st())
def test_monotone_non_decreasing(schedule, p1, p2, ss):
    lo, hi = min(p1, p2), max(p1, p2)
    a = sparsity_at(schedule, lo, *ss)
    b = sparsity_at(schedule, hi, *ss)
    assert a <= b + 1e-12
    assert ss[0] - 1e-12 <= a and b <= ss[1] + 1e-12


@SETTINGS
@given(schedule=st.sampled_from(SCHEDULES + ["oneshot"]), ss=s0_st())
def test_endpoints_exact(schedule, ss):
    s0, st_ = ss
    assert sparsity_at(schedule, 0.0, s0, st_) == s0
    assert sparsity_at(schedule, 1.0, s0, st_) == st_
    assert sparsity_at(schedule, 1, s0, st_) == st_        # an int progress is fine


@pytest.mark.parametrize("s0, st_", [(0.0, 0.1), (0.1, 0.3), (0.2, 0.9), (0.5, 0.5)])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_endpoints_free_of_float_noise(schedule, s0, st_):
    # e.g. exp from 0.1 would otherwise end at 0.09999999999999998 or 0.30000000000000004
    assert sparsity_at(schedule, 0.0, s0, st_) == s0
    assert sparsity_at(schedule, 1.0, s0, st_) == st_


@SETTINGS
@given(p=st.floats(0.01, 0.99), ss=s0_st())
def test_fast_first_and_slow_first(p, ss):
    s0, st_ = ss
    assume(st_ - s0 > 1e-3)
    lin = sparsity_at("linear", p, s0, st_)
    assert sparsity_at("cubic", p, s0, st_) > lin       # Zhu & Gupta: prunes fast at first
    assert sparsity_at("cube", p, s0, st_) < lin        # slow first
    assert sparsity_at("cos", p, s0, st_) < lin         # slow first


def test_oneshot():
    assert sparsity_at("oneshot", 0.0, 0.1, 0.8) == 0.1
    assert sparsity_at("oneshot", 0.001, 0.1, 0.8) == 0.8
    sch = SparsitySchedule("oneshot", 0.0, 0.8, start_step=0, end_step=100, frequency=10)
    assert sch.events == [100] and sch.n_events == 1
    assert sch.sparsity_for_step(0) is None
    assert sch.sparsity_for_step(100) == 0.8


@pytest.mark.parametrize("bad, exc", [
    (dict(schedule="cubicc"), ValueError), (dict(schedule=3), TypeError),
    (dict(progress=1.5), ValueError), (dict(progress=-0.1), ValueError),
    (dict(progress=True), TypeError), (dict(initial=1.0), ValueError),
    (dict(target=1.0), ValueError), (dict(target=float("nan")), ValueError),
])
def test_sparsity_at_validates(bad, exc):
    kw = dict(schedule="linear", progress=0.5, initial=0.0, target=0.5)
    kw.update(bad)
    name = next(iter(bad))
    with pytest.raises(exc, match=name):
        sparsity_at(**kw)


# ---------------------------------------------------------------------------------------------
# prune events

@SETTINGS
@given(start=st.integers(0, 50), length=st.integers(0, 60), freq=st.integers(1, 25))
def test_prune_events(start, length, freq):
    end = start + length
    ev = prune_events(start, end, freq)
    assert ev[0] == start and ev[-1] == end
    assert all(b > a for a, b in zip(ev, ev[1:]))                       # strictly increasing
    assert all(b - a == freq for a, b in zip(ev[:-1], ev[1:-1]))        # start, start+f, ...
    if len(ev) > 1:
        assert 0 < ev[-1] - ev[-2] <= freq
    assert ev == sorted(set(range(start, end + 1, freq)) | {end})
    if start == end:
        assert ev == [start]


def test_prune_events_examples():
    assert prune_events(0, 30, 10) == [0, 10, 20, 30]
    assert prune_events(0, 25, 10) == [0, 10, 20, 25]
    assert prune_events(5, 5, 3) == [5]
    assert prune_events(3, 4, 100) == [3, 4]


@pytest.mark.parametrize("args, exc, name", [
    ((5, 3, 1), ValueError, "end_step"), ((0, 10, 0), ValueError, "frequency"),
    ((-1, 10, 1), ValueError, "start_step"), ((0, 10, True), TypeError, "frequency"),
    ((0, 10.0, 1), TypeError, "end_step"),
])
def test_prune_events_validates(args, exc, name):
    with pytest.raises(exc, match=name):
        prune_events(*args)


@SETTINGS
@given(schedule=st.sampled_from(SCHEDULES), ss=s0_st(), start=st.integers(0, 20),
       length=st.integers(0, 40), freq=st.integers(1, 10))
def test_schedule_over_events(schedule, ss, start, length, freq):
    s0, st_ = ss
    sch = SparsitySchedule(schedule, s0, st_, start_step=start, end_step=start + length,
                           frequency=freq)
    assert sch.events == prune_events(start, start + length, freq)
    k_total = sch.n_events
    for k, step in enumerate(sch.events, start=1):
        want = FORMULAS[schedule](k / k_total, s0, st_)
        assert sch.sparsity_for_step(step) == pytest.approx(want, rel=1e-12, abs=1e-14)
        assert sch.sparsity_at_event(k) == sch.sparsity_for_step(step)
    assert sch.sparsity_for_step(sch.events[-1]) == st_                 # target reached exactly
    for step in set(range(start + length + 3)) - set(sch.events):
        assert sch.sparsity_for_step(step) is None


def test_schedule_docstring_example():
    sch = SparsitySchedule("linear", 0.0, 0.8, start_step=0, end_step=30, frequency=10)
    assert sch.events == [0, 10, 20, 30]
    assert [sch.sparsity_at_event(k) for k in range(1, 5)] == pytest.approx([0.2, 0.4, 0.6, 0.8])


# ---------------------------------------------------------------------------------------------
# drop fraction (dynamic sparse training)

@SETTINGS
@given(step=st.integers(0, 300), alpha=st.floats(0.0, 1.0), t_end=st.integers(1, 200),
       eta_min=st.floats(0.0, 1.0))
def test_drop_fraction_cosine(step, alpha, t_end, eta_min):
    assume(eta_min <= alpha)
    got = drop_fraction("cosine", step, alpha=alpha, t_end=t_end, eta_min=eta_min)
    t = min(step, t_end)                                                # constant after T_max
    want = eta_min + (alpha - eta_min) / 2 * (1 + math.cos(math.pi * t / t_end))
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)
    if step >= t_end:
        assert got == pytest.approx(eta_min, abs=1e-15)


@SETTINGS
@given(step=st.integers(0, 300), alpha=st.floats(0.0, 1.0), t_end=st.integers(1, 200))
def test_drop_fraction_linear_and_constant(step, alpha, t_end):
    got = drop_fraction("linear", step, alpha=alpha, t_end=t_end)
    assert got == pytest.approx(max(0.0, alpha - alpha * (min(step, t_end) + 1) / t_end),
                                rel=1e-12, abs=1e-15)
    assert got >= 0.0
    if step + 1 >= t_end:
        assert got == 0.0
    assert drop_fraction("constant", step, alpha=alpha, t_end=t_end) == alpha


def test_drop_fraction_values():
    assert drop_fraction("cosine", 0, alpha=0.3, t_end=100) == pytest.approx(0.3)
    assert drop_fraction("cosine", 50, alpha=0.3, t_end=100) == pytest.approx(0.15)
    assert drop_fraction("cosine", 100, alpha=0.3, t_end=100) == pytest.approx(0.0, abs=1e-15)
    assert drop_fraction("cosine", 50, alpha=0.3, t_end=100, eta_min=0.1) == pytest.approx(0.2)
    assert drop_fraction("linear", 0, alpha=0.5, t_end=10) == pytest.approx(0.45)
    assert drop_fraction("linear", 4, alpha=0.5, t_end=10) == pytest.approx(0.25)


@SETTINGS
@given(s1=st.integers(0, 100), s2=st.integers(0, 100), alpha=st.floats(0.0, 1.0),
       t_end=st.integers(1, 80), eta=st.floats(0.0, 1.0))
def test_drop_fraction_non_increasing(s1, s2, alpha, t_end, eta):
    assume(eta <= alpha)
    a, b = min(s1, s2), max(s1, s2)
    for sched, kw in (("cosine", dict(eta_min=eta)), ("linear", {})):
        assert (drop_fraction(sched, b, alpha=alpha, t_end=t_end, **kw)
                <= drop_fraction(sched, a, alpha=alpha, t_end=t_end, **kw) + 1e-12)


@pytest.mark.parametrize("kw, exc, name", [
    (dict(schedule="cos"), ValueError, "schedule"), (dict(step=-1), ValueError, "step"),
    (dict(step=1.0), TypeError, "step"), (dict(t_end=0), ValueError, "t_end"),
    (dict(alpha=1.5), ValueError, "alpha"), (dict(alpha=True), TypeError, "alpha"),
    (dict(eta_min=-0.1), ValueError, "eta_min"),
])
def test_drop_fraction_validates(kw, exc, name):
    args = dict(schedule="cosine", step=0, alpha=0.3, t_end=10)
    args.update(kw)
    schedule, step = args.pop("schedule"), args.pop("step")
    with pytest.raises(exc, match=name):
        drop_fraction(schedule, step, **args)


def test_drop_fraction_rejects_eta_min_above_alpha():
    with pytest.raises(ValueError, match="eta_min must be <= alpha"):
        drop_fraction("cosine", 0, alpha=0.1, t_end=10, eta_min=0.3)
