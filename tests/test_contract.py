"""The contract matrix: every registered criterion x every pattern x every tiny model.

For each combination, ``gp.prune`` must

- prune exactly ``round_half_up(s * units)`` units per layer (local scope), in the pattern's
  structure (whole 4x1 blocks, at most 2 of every 4 for 2:4, whole rows, whole kernels);
- skip a layer the pattern does not fit with one ``UserWarning`` naming it, and raise ``ValueError``
  naming the pattern when no layer fits;
- leave pruned weights at exactly ``0.0``, also after training steps with the masks attached to an
  SGD optimizer with momentum and weight decay;
- give masks that survive ``torch.save`` / ``torch.load(weights_only=True)`` into a new ``MaskSet``
  of a new model;
- be deterministic (same seed, same data -> identical masks);
- in global scope, prune the requested total with one threshold over all unit scores.

The expected counts and structures are computed here from the rules in ``ALGORITHMS.md`` and the
``select``/``patterns`` docstrings, independently of the library's code.
"""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch

import gradprune as gp
from conftest import MODELS, round_half_up


# -- a user-defined criterion, registered like a plug-in --------------------------------------

USER_CRITERION = "user_abs_w_mean_abs_g"


@gp.register_criterion(USER_CRITERION, overwrite=True)
class UserWeightTimesMeanGrad(gp.Criterion):
    """``|W| * mean |G|``: reads gradients, keeps its own state."""

    needs_grad = True

    def __init__(self, params, **options):
        super().__init__(params, **options)
        self._acc = {n: torch.zeros(p.shape, dtype=torch.float32) for n, p in self.params.items()}
        self._n = 0

    @torch.no_grad()
    def on_before_optimizer_step(self):
        for n, p in self.params.items():
            if p.grad is not None:
                self._acc[n] += p.grad.abs()
        self._n += 1

    def ready(self):
        return self._n > 0

    @property
    def scores(self):
        return {n: p.detach().abs() * (self._acc[n] / max(self._n, 1)) for n, p in self.params.items()}

    def reset(self):
        for a in self._acc.values():
            a.zero_()
        self._n = 0

    def state_dict(self):
        return {"n": self._n, "acc": {k: v.clone() for k, v in self._acc.items()}}

    def load_state_dict(self, state):
        self._n = int(state["n"])
        for k, v in state["acc"].items():
            self._acc[k].copy_(v)


CRITERIA = gp.list_criteria()
assert USER_CRITERION in CRITERIA
BUILTINS = ("magnitude", "gradient", "snip", "snip_momentum", "taylor", "movement", "fisher", "random")
PATTERNS = ("1x1", "4x1", "2:4", "channel", "kernel")
SIGNED = {"movement"}


# -- the rules, written out independently -----------------------------------------------------

def fits(pattern: str, shape) -> bool:
    inp = math.prod(shape[1:])
    if pattern == "kernel":
        return len(shape) >= 3
    if pattern == "channel" or pattern == "1x1":
        return len(shape) >= 2
    if pattern == "4x1":
        return shape[0] % 4 == 0
    if pattern == "2:4":
        return inp % 4 == 0
    raise AssertionError(pattern)


def unit_weight(pattern: str, shape) -> int:
    return {"1x1": 1, "4x1": 4, "2:4": 2, "channel": math.prod(shape[1:]),
            "kernel": math.prod(shape[2:])}[pattern]


def expected_pruned_entries(pattern: str, shape, s: float) -> int:
    numel = math.prod(shape)
    w = unit_weight(pattern, shape)
    n_units = numel // 4 if pattern == "2:4" else numel // w
    return w * min(n_units, round_half_up(s * numel / w))


def nm_groups(t: torch.Tensor) -> torch.Tensor:
    """``[out, groups, 4]``: a conv's groups are 4 input channels at one kernel position."""
    if t.dim() > 2:
        t = t.movedim(1, -1)
    return t.reshape(t.shape[0], -1, 4)


def pruned_units(pattern: str, mask: torch.Tensor) -> torch.Tensor:
    """1-D bool over the pattern's units (row-major); asserts the mask has the pattern's structure."""
    m = mask.reshape(mask.shape[0], -1)
    if pattern == "1x1":
        return ~m.reshape(-1)
    if pattern == "4x1":
        blocks = m.reshape(m.shape[0] // 4, 4, m.shape[1])
        assert (blocks == blocks[:, :1, :]).all(), "4x1 mask is not made of whole 4x1 blocks"
        return ~blocks[:, 0, :].reshape(-1)
    if pattern == "2:4":
        groups = nm_groups(mask)
        n_pruned = (~groups).sum(-1)
        assert ((n_pruned == 0) | (n_pruned == 2)).all(), "2:4 group with a pruned count other than 0 or 2"
        return (n_pruned == 2).reshape(-1)
    if pattern == "channel":
        assert (m == m[:, :1]).all(), "channel mask is not made of whole rows"
        return ~m[:, 0]
    if pattern == "kernel":
        k = mask.reshape(mask.shape[0], mask.shape[1], -1)
        assert (k == k[:, :, :1]).all(), "kernel mask is not made of whole kernels"
        return ~k[:, :, 0].reshape(-1)
    raise AssertionError(pattern)


def unit_scores(pattern: str, scores: torch.Tensor, signed: bool) -> torch.Tensor:
    """Unit scores per the patterns docstring: mean of (absolute unless signed) entry scores."""
    s = scores.detach().float().reshape(scores.shape[0], -1)
    if pattern == "1x1":
        return s.reshape(-1)
    if not signed:
        s = s.abs()
    if pattern == "4x1":
        return s.reshape(s.shape[0] // 4, 4, s.shape[1]).mean(1).reshape(-1)
    if pattern == "2:4":
        return nm_groups(s.reshape(scores.shape)).sort(-1).values[..., :2].mean(-1).reshape(-1)
    if pattern == "channel":
        return s.mean(1)
    if pattern == "kernel":
        k = scores.detach().float().reshape(scores.shape[0], scores.shape[1], -1)
        return (k if signed else k.abs()).mean(-1).reshape(-1)
    raise AssertionError(pattern)


def split_targets(model, pattern):
    targets = {n: t.shape for n, t in gp.find_targets(model).items()}
    fit = [n for n, s in targets.items() if fits(pattern, s)]
    skipped = [n for n in targets if n not in fit]
    return targets, fit, skipped


def prune_recording(model, spec, **kw):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        res = gp.prune(model, data=spec.batches(3), loss_fn=spec.loss_fn, **kw)
    msgs = [str(w.message) for w in rec if issubclass(w.category, UserWarning) and "gradprune" in str(w.message)]
    return res, msgs


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), k


# one-shot gp.prune refuses "movement" (it needs fine-tuning: gp.Pruner); its signed scores are
# checked through gp.Pruner (test_masks_pruner.py) and by test_filters_defaults.py's refusal test
# criteria reading layer inputs (wanda, sparsegpt, gblm, ria) prune Linear weights of LLM-style
# models: their contract loop over the registry is in test_llm_oneshot.py
ONE_SHOT = [c for c in CRITERIA if c != "movement"
            and not getattr(gp.scores.criterion_class(c), "reads_inputs", False)]


def combos():
    return [(c, p, m) for c in ONE_SHOT for p in PATTERNS for m in MODELS]


def combo_id(c, p, m):
    return f"{c}-{p}-{m}"


MATRIX = pytest.mark.parametrize("criterion,pattern,model_name",
                                 combos(), ids=[combo_id(*x) for x in combos()])


def _has_fit(model_name, pattern):
    return any(fits(pattern, t.shape) for t in gp.find_targets(MODELS[model_name].factory()).values())


# combinations where some layer fits the pattern (the others are the ValueError cases above)
FITTING = [x for x in combos() if _has_fit(x[2], x[1])]
FITTING_MATRIX = pytest.mark.parametrize("criterion,pattern,model_name",
                                         FITTING, ids=[combo_id(*x) for x in FITTING])


# -- the matrix -------------------------------------------------------------------------------

def test_every_builtin_criterion_is_in_the_matrix():
    assert set(BUILTINS) <= set(CRITERIA)


@MATRIX
def test_local_contract(criterion, pattern, model_name, tmp_path):
    spec = MODELS[model_name]
    model = spec.build(0)
    targets, fit, skipped = split_targets(model, pattern)

    if not fit:  # e.g. "kernel" on a model without conv layers
        before = snapshot(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(ValueError, match=re.escape(repr(pattern))):
                gp.prune(model, sparsity=0.5, criterion=criterion, pattern=pattern,
                         data=spec.batches(3), loss_fn=spec.loss_fn)
        assert_same_state(model, before)
        return

    res, msgs = prune_recording(model, spec, sparsity=0.5, criterion=criterion, pattern=pattern)

    # one warning per skipped layer, naming it; none for the layers that fit
    assert len(msgs) == len(skipped), msgs
    for n in skipped:
        assert sum(f"skipping {n}:" in m for m in msgs) == 1, (n, msgs)
    assert list(res.masks) == fit
    notes = {r["name"]: r["note"] for r in res.report.rows}
    for n in skipped:
        assert notes[n].startswith("skipped"), notes

    # exact, structured counts; pruned weights exactly zero
    params = dict(model.named_parameters())
    for n in fit:
        m = res.masks[n]
        assert m.dtype == torch.bool and m.shape == targets[n]
        units = pruned_units(pattern, m)
        w = unit_weight(pattern, m.shape)
        assert int((~m).sum()) == int(units.sum()) * w
        assert int((~m).sum()) == expected_pruned_entries(pattern, m.shape, 0.5), n
        if pattern == "2:4":
            assert int((~m).sum()) * 2 == m.numel()
        assert bool((params[n].detach()[~m] == 0.0).all()), n
    assert res.masks.sparsity(per_layer=True) == pytest.approx(
        {n: expected_pruned_entries(pattern, targets[n], 0.5) / math.prod(targets[n]) for n in fit})

    saved = {n: m.clone() for n, m in res.masks.items()}

    # masks stay applied through training with momentum and weight decay
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
    handle = res.masks.attach(opt)
    before_train = {n: params[n].detach().clone() for n in fit}
    model.train()
    for batch in spec.batches(3, seed=1):
        opt.zero_grad()
        spec.loss_fn(model, batch).backward()
        opt.step()
        for n in fit:
            assert bool((params[n].detach()[~res.masks[n]] == 0.0).all()), n
    handle.remove()
    assert any(not torch.equal(params[n].detach(), before_train[n]) for n in fit), "training changed nothing"
    for n in fit:
        assert torch.equal(res.masks[n], saved[n])

    # state round-trip into a NEW MaskSet of a NEW model
    path = tmp_path / "masks.pt"
    torch.save(res.masks.state_dict(), path)
    state = torch.load(path, weights_only=True)
    fresh_model = spec.build(1)
    fresh = gp.MaskSet(fresh_model, names=list(state))
    fresh.load_state_dict(state)
    assert list(fresh) == fit
    fresh_params = dict(fresh_model.named_parameters())
    fresh.apply()
    for n in fit:
        assert fresh[n].dtype == torch.bool
        assert torch.equal(fresh[n], saved[n]), n
        assert bool((fresh_params[n].detach()[~saved[n]] == 0.0).all())
        assert bool((fresh_params[n].detach()[saved[n]] != 0.0).any())


@FITTING_MATRIX
def test_deterministic(criterion, pattern, model_name):
    spec = MODELS[model_name]
    runs = []
    for _ in range(2):
        model = spec.build(0)
        res, _ = prune_recording(model, spec, sparsity=0.5, criterion=criterion, pattern=pattern,
                                 scope="global")
        runs.append((res, snapshot(model)))
    (a, sa), (b, sb) = runs
    assert list(a.masks) == list(b.masks)
    for n in a.masks:
        assert torch.equal(a.masks[n], b.masks[n]), n
        assert torch.equal(a.scores[n], b.scores[n]), n
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@MATRIX
def test_global_contract(criterion, pattern, model_name):
    spec = MODELS[model_name]
    model = spec.build(0)
    targets, fit, skipped = split_targets(model, pattern)
    if not fit:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(ValueError, match=re.escape(repr(pattern))):
                gp.prune(model, sparsity=0.5, criterion=criterion, pattern=pattern, scope="global",
                         data=spec.batches(3), loss_fn=spec.loss_fn)
        return
    s = 0.5
    res, msgs = prune_recording(model, spec, sparsity=s, criterion=criterion, pattern=pattern,
                                scope="global")
    assert len(msgs) == len(skipped)
    params = dict(model.named_parameters())
    total = sum(math.prod(targets[n]) for n in fit)
    weights = {n: unit_weight(pattern, targets[n]) for n in fit}
    removed = 0
    signed = criterion in SIGNED
    max_pruned, min_kept = -math.inf, math.inf
    for n in fit:
        m = res.masks[n]
        units = pruned_units(pattern, m)
        removed += int((~m).sum())
        assert bool((params[n].detach()[~m] == 0.0).all())
        us = unit_scores(pattern, res.scores[n], signed)
        assert us.shape == units.shape
        n_units = units.numel()
        scale = math.prod(targets[n]) / weights[n]
        cap = min(n_units, math.floor(round(min(0.98, n_units / scale) * scale, 9)))  # hard bound
        if units.any():
            max_pruned = max(max_pruned, float(us[units].max()))
        if int(units.sum()) < cap and (~units).any():  # a capped layer keeps its own order only
            min_kept = min(min_kept, float(us[~units].min()))
    if len(set(weights.values())) == 1:
        w = next(iter(weights.values()))
        assert removed == w * round_half_up(s * total / w)
    else:
        assert abs(removed - s * total) <= max(weights.values()) / 2
    # one threshold over all layers: nothing pruned scores above anything kept
    assert max_pruned <= min_kept + 1e-6 * max(1.0, abs(min_kept))


EXTRA_CRITERIA = ("magnitude", "snip", USER_CRITERION)
EXTRA = [x for x in FITTING if x[0] in EXTRA_CRITERIA]


@pytest.mark.parametrize("criterion,pattern,model_name", EXTRA, ids=[combo_id(*x) for x in EXTRA])
def test_local_counts_at_other_sparsity(criterion, pattern, model_name):
    spec = MODELS[model_name]
    model = spec.build(0)
    targets, fit, _ = split_targets(model, pattern)
    s = 0.3
    res, _ = prune_recording(model, spec, sparsity=s, criterion=criterion, pattern=pattern)
    params = dict(model.named_parameters())
    for n in fit:
        m = res.masks[n]
        pruned_units(pattern, m)  # structure
        assert int((~m).sum()) == expected_pruned_entries(pattern, targets[n], s), n
        assert bool((params[n].detach()[~m] == 0.0).all())
    # the lowest-scored units go (local scope: per layer)
    for n in fit:
        units = pruned_units(pattern, res.masks[n])
        us = unit_scores(pattern, res.scores[n], criterion in SIGNED)
        assert float(us[units].max()) <= float(us[~units].min()) + 1e-6


def test_no_fit_error_names_pattern_and_changes_nothing(mlp):
    model = mlp.build(0)
    before = snapshot(model)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match="pattern 'kernel'"):
            gp.prune(model, sparsity=0.5, pattern="kernel")
    msgs = [str(w.message) for w in rec if "gradprune" in str(w.message)]
    assert sorted(msgs) == sorted(m for m in msgs if "skipping" in m)
    assert_same_state(model, before)


def test_kernel_on_cnn_skips_only_the_linear_layer(cnn):
    model = cnn.build(0)
    with pytest.warns(UserWarning, match=r"skipping 6\.weight") as rec:
        res = gp.prune(model, sparsity=0.5, pattern="kernel")
    assert len([w for w in rec if "gradprune" in str(w.message)]) == 1
    assert list(res.masks) == ["0.weight", "2.weight"]
    # the skipped Linear is untouched
    assert bool((model[6].weight != 0).all())
