"""Resuming ``SparseTrainer`` and ``Pruner`` in any loading order (issue #13, point 1), loud and
all-or-nothing ``load_state_dict``, the warning past ``total_steps`` and the Pruner's optimizer and
config checks (point 8); docs/resume.md's examples run in tests/test_docs.py.

A run of N steps uninterrupted must equal, bit for bit (every weight, every optimizer state tensor,
every mask, the counters), K steps + checkpoint (deep-copied state dicts) + a fresh model,
optimizer and trainer loaded in one of the orders below + N - K steps.
"""

from __future__ import annotations

import copy
import pathlib
import warnings

import pytest
import torch
from torch import nn

import gradprune as gp
from gradprune import sparse_training

ROOT = pathlib.Path(__file__).resolve().parents[1]

N_STEPS, STOP = 12, 5   # RigL-style updates at 2, 4, 6, 8 (3 of 4 of total_steps=12): two after STOP


def build(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 3))


def data(n: int = N_STEPS) -> list:
    gen = torch.Generator().manual_seed(7)
    return [(torch.randn(8, 10, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(n)]


def loss_of(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
}


def _lottery_masks():
    model, gen = build(), torch.Generator().manual_seed(3)
    return {n: torch.rand(p.shape, generator=gen) < 0.4 for n, p in model.named_parameters() if n.endswith("weight")}


PRESETS = {
    "rigl": lambda: gp.SparseConfig.rigl(density=0.3, total_steps=N_STEPS, update_interval=2),
    "set": lambda: gp.SparseConfig.set(density=0.3, total_steps=N_STEPS, update_interval=2),
    "snfs": lambda: gp.SparseConfig.snfs(density=0.3, total_steps=N_STEPS, update_interval=2),
    "static": lambda: gp.SparseConfig.static(density=0.3, total_steps=N_STEPS),
    "pruning": lambda: gp.SparseConfig.pruning(density=0.3, total_steps=N_STEPS, update_interval=2),
    "lottery": lambda: gp.SparseConfig.lottery(_lottery_masks(), density=0.4),
}


def test_the_matrix_covers_every_preset():
    presets = {name for name, v in vars(gp.SparseConfig).items() if isinstance(v, classmethod)} - {"from_dict", "from_yaml"}
    assert presets <= set(PRESETS), presets - set(PRESETS)


def run_trainer(model, opt, trainer, batches):
    for batch in batches:
        opt.zero_grad()
        loss_of(model, batch).backward()
        trainer.step()


def assert_same_run(model_a, opt_a, engine_a, model_b, opt_b, engine_b):
    for (n, a), (n2, b) in zip(model_a.state_dict().items(), model_b.state_dict().items()):
        assert n == n2 and torch.equal(a, b), f"weight {n}"
    sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        assert sa[i].keys() == sb[i].keys()
        for k, v in sa[i].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(sb[i][k])), f"optimizer state {i}/{k}"
    for n, m in engine_a.masks.items():
        assert torch.equal(m, engine_b.masks[n]), f"mask {n}"


# each order: what happens before the engine is built, and after
ORDERS = {
    "weights_then_build": (["model"], ["opt", "engine"]),  # model (nothing else), build, then the rest
    "weights_and_optimizer_then_build": (["model", "opt"], ["engine"]),  # a Hugging Face Trainer's order
    "build_then_model_optimizer_state": ([], ["model", "opt", "engine"]),
    "build_then_state_model_optimizer": ([], ["engine", "model", "opt"]),
}


def resume(order: str, make_model, make_opt, make_engine, ckpt):
    """A fresh model (another init), optimizer and engine, loaded from ``ckpt`` in ``order``."""
    before, after = ORDERS[order]
    objs = {"model": make_model()}
    objs["opt"] = make_opt(objs["model"])
    for key in before:
        objs[key].load_state_dict(ckpt[key])
    objs["engine"] = make_engine(objs["model"], objs["opt"])
    for key in after:
        objs[key].load_state_dict(ckpt[key])
    return objs["model"], objs["opt"], objs["engine"]


def straight_and_resumed(order, opt_name, make_engine, run):
    """Run STOP steps straight; run STOP steps elsewhere, checkpoint, resume in ``order`` into a
    fresh model (another init), optimizer and engine; then step both in lockstep over the rest of
    the batches, asserting they are equal after every step. Returns both engines and the
    checkpointed one."""
    make_opt = lambda m: OPTIMIZERS[opt_name](m.parameters())  # noqa: E731
    batches = data()
    model_a = build()
    opt_a = make_opt(model_a)
    straight = make_engine(model_a, opt_a)
    run(model_a, opt_a, straight, batches[:STOP])

    model_b = build()
    opt_b = make_opt(model_b)
    first = make_engine(model_b, opt_b)
    run(model_b, opt_b, first, batches[:STOP])
    ckpt = copy.deepcopy({"model": model_b.state_dict(), "opt": opt_b.state_dict(), "engine": first.state_dict()})

    model_c, opt_c, resumed = resume(order, lambda: build(seed=99), make_opt, make_engine, ckpt)
    for batch in batches[STOP:]:                 # in lockstep, equal after every step
        run(model_a, opt_a, straight, [batch])
        run(model_c, opt_c, resumed, [batch])
        assert_same_run(model_a, opt_a, straight, model_c, opt_c, resumed)
    return straight, resumed, first


@pytest.mark.parametrize("order", list(ORDERS))
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("preset", list(PRESETS))
def test_sparse_trainer_resumes_bit_for_bit_in_any_order(preset, opt_name, order):
    cfg = PRESETS[preset]()
    straight, resumed, first = straight_and_resumed(order, opt_name, lambda m, o: gp.SparseTrainer(m, o, cfg),
                                                    run_trainer)
    assert first.step_count == STOP
    assert (resumed.step_count, resumed.updates, resumed.history) == \
        (straight.step_count, straight.updates, straight.history)
    if preset in ("rigl", "set", "snfs", "pruning"):
        assert any(h["step"] >= STOP for h in straight.history)  # the resumed part updated connectivity


@pytest.fixture(autouse=True)
def _one_thread():
    """Bit-for-bit comparisons of two runs in one process: one thread, so that no matrix product
    depends on how the threads were scheduled."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# Pruner

PRUNER_CASES = ["snip_momentum", "magnitude", "magnitude_from_a_mask"]


def _initial_mask():
    gen = torch.Generator().manual_seed(5)
    return {n: torch.rand(p.shape, generator=gen) > 0.3 for n, p in build().named_parameters()
            if n in ("0.weight", "2.weight")}


def run_pruner(model, opt, pruner, batches):
    for batch in batches:
        pruner.on_step_begin()
        opt.zero_grad()
        loss_of(model, batch).backward()
        pruner.on_before_optimizer_step()
        opt.step()
        pruner.on_after_optimizer_step()


def _prune_config(criterion):
    return gp.PruneConfig(criterion=criterion, pattern="4x1", target_sparsity=0.75, schedule="cubic",
                          start_step=0, end_step=9, frequency=3, seed=1)


@pytest.mark.parametrize("order", list(ORDERS))
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("case", PRUNER_CASES)
def test_pruner_resumes_bit_for_bit_in_any_order(case, opt_name, order):
    """With ``mask=`` (pruned from the start), too: building the pruner applies it, which must not
    damage an optimizer state loaded before."""
    cfg = _prune_config(case.removesuffix("_from_a_mask"))
    mask = _initial_mask() if case.endswith("mask") else None
    straight, resumed, first = straight_and_resumed(
        order, opt_name, lambda m, o: gp.Pruner(m, cfg, optimizer=o, mask=mask), run_pruner)
    assert first.history and not first.done      # an event before the checkpoint, more after it
    assert resumed.history == straight.history and resumed.step == straight.step == N_STEPS
    assert any(step >= STOP for step, _ in straight.history)


# ---------------------------------------------------------------------------------------------
# load_state_dict is all-or-nothing

def _trained_trainer(preset="rigl"):
    model = build()
    opt = OPTIMIZERS["sgd"](model.parameters())
    trainer = gp.SparseTrainer(model, opt, PRESETS[preset]())
    run_trainer(model, opt, trainer, data()[:STOP])
    return model, opt, trainer


def _snapshot(model, opt, engine):
    return copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "engine": engine.state_dict()})


def _equal(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def assert_failed_load_changes_nothing(make, state, exc, run, match):
    """``make()`` twice; loading ``state`` into one raises ``exc`` and changes nothing (its model,
    optimizer and engine states are as before, and it then runs exactly as the twin)."""
    model, opt, engine = make()
    twin = make()
    before = _snapshot(model, opt, engine)
    with pytest.raises(exc, match=match):
        engine.load_state_dict(state)
    assert _equal(_snapshot(model, opt, engine), before)
    run(model, opt, engine, data()[STOP:])
    run(*twin, data()[STOP:])
    assert_same_run(*twin, model, opt, engine)
    return engine


def _bad_trainer_states(good):
    other = copy.deepcopy(good)
    name = next(iter(other["masks"]))
    cases = {
        "negative step": ("step_count", -1, ValueError),
        "bool step": ("step_count", True, TypeError),
        "float step": ("step_count", 3.0, TypeError),
        "string step": ("step_count", "3", TypeError),
        "negative updates": ("updates", -2, ValueError),
        "pending not bool": ("epoch_update_pending", 1, TypeError),
        "short generator": ("generator", good["generator"][:-1].clone(), ValueError),
        "float generator": ("generator", good["generator"].float(), ValueError),
        "generator not a tensor": ("generator", [1, 2, 3], ValueError),
        "empty config": ("config", {}, ValueError),
        "partial config": ("config", {k: v for k, v in good["config"].items() if k != "seed"}, ValueError),
        "changed config": ("config", {**good["config"], "alpha": 0.5}, ValueError),
        "unknown config field": ("config", {**good["config"], "bogus": 1}, ValueError),
        "wrong-shaped mask": ("masks", {**good["masks"], name: good["masks"][name][:-1].clone()}, ValueError),
        "float mask": ("masks", {**good["masks"], name: good["masks"][name].float()}, TypeError),
        "missing mask": ("masks", {k: v for k, v in good["masks"].items() if k != name}, ValueError),
        "history not a list": ("history", "x", TypeError),
    }
    for label, (key, value, exc) in cases.items():
        state = copy.deepcopy(other)
        state[key] = value
        yield label, state, exc
    state = copy.deepcopy(other)
    del state["generator"]
    yield "missing generator", state, ValueError


def _bad_trainer_labels():
    model, opt, trainer = _trained_trainer()
    return [label for label, _, _ in _bad_trainer_states(trainer.state_dict())]


@pytest.mark.parametrize("label", _bad_trainer_labels())
@pytest.mark.parametrize("fresh", [False, True], ids=["used", "fresh"])
def test_sparse_trainer_load_state_dict_changes_nothing_when_it_fails(label, fresh):
    """A checkpoint from another run, with one thing wrong, loaded into a used trainer or into a
    fresh one built on a model that holds checkpoint weights: it raises naming the problem, and the
    trainer then runs exactly as an untouched twin."""
    _, _, source = _trained_trainer()
    source_state = source.state_dict()
    source_state["step_count"] = STOP + 1          # differs from the target trainer in every field
    source_state["generator"] = torch.Generator().manual_seed(123).get_state()
    source_state["masks"] = {n: ~m for n, m in source_state["masks"].items()}
    state, exc = {lbl: (s, e) for lbl, s, e in _bad_trainer_states(source_state)}[label]

    def target():
        model, opt, trainer = _trained_trainer()
        if fresh:                                  # weights first, then a new optimizer and trainer
            ckpt = _snapshot(model, opt, trainer)
            model = build(seed=99)
            model.load_state_dict(ckpt["model"])
            opt = OPTIMIZERS["sgd"](model.parameters())
            opt.load_state_dict(ckpt["opt"])
            trainer = gp.SparseTrainer(model, opt, PRESETS["rigl"]())
        return model, opt, trainer

    assert_failed_load_changes_nothing(target, state, exc, run_trainer,
                                       r"step_count|updates|epoch_update_pending|generator|config|mask|history|missing")


def test_sparse_trainer_load_state_dict_refuses_non_unit_masks_for_structured_rules():
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = gp.SparseTrainer(model, opt, gp.SparseConfig.rigl(density=0.5, total_steps=8, init="struct_erk"))
    state = trainer.state_dict()
    before = copy.deepcopy(state)
    mask = state["masks"]["0.weight"].clone()
    mask[0, 0, 0, 0] = ~mask[0, 0, 0, 0]            # half a kernel
    state["masks"]["0.weight"] = mask
    with pytest.raises(ValueError, match="whole kernel units"):
        trainer.load_state_dict(state)
    assert _equal(trainer.state_dict(), before)


def _pruner_run(cfg=None, steps=STOP, seed=0):
    model = build(seed)
    opt = OPTIMIZERS["sgd"](model.parameters())
    pruner = gp.Pruner(model, cfg or _prune_config("snip_momentum"), optimizer=opt)
    run_pruner(model, opt, pruner, data()[:steps])
    return model, opt, pruner


def _bad_pruner_states(good):
    name = next(iter(good["masks"]))
    crit = copy.deepcopy(good["criterion"])
    first = next(iter(crit["scores"]))
    last = list(crit["scores"])[-1]
    crit["scores"][last] = torch.zeros(5)     # fails after the first layer was copied
    crit["scores"][first] = crit["scores"][first] + 1
    cases = {
        "negative step": ("step", -1, ValueError),
        "bool step": ("step", True, TypeError),
        "string step": ("step", "4", TypeError),
        "negative skipped": ("skipped_steps", -1, ValueError),
        "empty config": ("config", {}, ValueError),
        "partial config": ("config", {k: v for k, v in good["config"].items() if k != "seed"}, ValueError),
        "changed config": ("config", {**good["config"], "frequency": 2}, ValueError),
        "wrong-shaped mask": ("masks", {**good["masks"], name: good["masks"][name][:-1].clone()}, ValueError),
        "bad history": ("history", [[1, 0.5, 7]], ValueError),
        "bad criterion state": ("criterion", crit, ValueError),
    }
    for label, (key, value, exc) in cases.items():
        state = copy.deepcopy(good)
        state[key] = value
        yield label, state, exc


@pytest.mark.parametrize("label", [lbl for lbl, _, _ in _bad_pruner_states(_pruner_run(steps=4)[2].state_dict())])
def test_pruner_load_state_dict_changes_nothing_when_it_fails(label):
    source = _pruner_run(steps=STOP + 2)[2].state_dict()
    state, exc = {lbl: (s, e) for lbl, s, e in _bad_pruner_states(source)}[label]
    pruner = assert_failed_load_changes_nothing(_pruner_run, state, exc, run_pruner,
                                                r"step|skipped_steps|config|mask|history|criterion")
    assert pruner.history == _pruner_run(steps=N_STEPS)[2].history


def test_pruner_copies_its_config():
    cfg = _prune_config("snip_momentum")
    model, opt, pruner = _pruner_run(cfg=cfg, steps=0)
    cfg.target_sparsity = 0.25
    cfg.end_step = 3
    assert pruner.config == _prune_config("snip_momentum")
    run_pruner(model, opt, pruner, data())
    twin = _pruner_run(cfg=_prune_config("snip_momentum"), steps=N_STEPS)
    assert_same_run(*twin, model, opt, pruner)
    assert pruner.masks.sparsity() == 0.75


def test_pruner_refuses_an_optimizer_of_another_model():
    model, other = build(), build(seed=1)
    with pytest.raises(ValueError, match="optimizer holds none of the model's parameters"):
        gp.Pruner(model, _prune_config("magnitude"), optimizer=torch.optim.SGD(other.parameters(), lr=0.1))
    # an optimizer over part of the model is fine (e.g. a frozen backbone)
    gp.Pruner(model, _prune_config("magnitude"), optimizer=torch.optim.SGD(model[4].parameters(), lr=0.1))


# ---------------------------------------------------------------------------------------------
# warn once past total_steps

def _steps_with_warnings(cfg, n, hooks=False):
    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    trainer = gp.SparseTrainer(model, opt, cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for batch in data(n):
            opt.zero_grad()
            loss_of(model, batch).backward()
            if hooks:
                trainer.before_optimizer_step()
                opt.step()
                trainer.after_optimizer_step()
            else:
                trainer.step()
    return [w for w in caught if issubclass(w.category, sparse_training.StepsPastEndWarning)]


@pytest.mark.parametrize("hooks", [False, True], ids=["step", "hooks"])
@pytest.mark.parametrize("preset", ["rigl", "set", "snfs", "pruning"])
def test_warns_once_when_training_runs_past_total_steps(preset, hooks):
    cfg = PRESETS[preset]()
    assert cfg.total_steps == N_STEPS
    assert _steps_with_warnings(cfg, N_STEPS, hooks) == []           # exactly the planned length
    caught = _steps_with_warnings(cfg, 3 * N_STEPS, hooks)           # three times as long: once
    assert len(caught) == 1
    assert issubclass(caught[0].category, UserWarning)
    assert f"total_steps={N_STEPS}" in str(caught[0].message) and "end_step=9" in str(caught[0].message)


def test_no_warning_without_a_schedule_or_a_planned_length():
    assert _steps_with_warnings(PRESETS["static"](), 3 * N_STEPS) == []   # nothing scheduled
    assert _steps_with_warnings(PRESETS["lottery"](), 3 * N_STEPS) == []
    direct = gp.SparseConfig(density=0.3, end_step=6, update_interval=2)  # no total_steps: no claim
    assert direct.total_steps is None
    assert _steps_with_warnings(direct, 3 * N_STEPS) == []
    with pytest.raises(ValueError, match="total_steps"):
        gp.SparseConfig(total_steps=0)


# ---------------------------------------------------------------------------------------------
# Hugging Face: the Trainer loads the weights and the optimizer before on_train_begin

@pytest.mark.parametrize("preset", ["rigl", "snfs"])
def test_hf_sparse_training_callback_resume_keeps_the_loaded_weights_and_optimizer_state(tmp_path, preset):
    pytest.importorskip("transformers")
    from gradprune.integrations.hf import STATE_FILE, SparseTrainingCallback

    model, opt, trainer = _trained_trainer(preset)
    ckpt = _snapshot(model, opt, trainer)
    torch.save(ckpt["engine"], tmp_path / STATE_FILE)
    fresh = build(seed=99)
    fresh.load_state_dict(ckpt["model"])
    fresh_opt = OPTIMIZERS["sgd"](fresh.parameters())
    fresh_opt.load_state_dict(ckpt["opt"])
    cb = SparseTrainingCallback(PRESETS[preset](), resume_from=str(tmp_path))
    cb.on_train_begin(None, None, None, model=fresh, optimizer=fresh_opt)
    assert cb.sparse.step_count == STOP
    assert_same_run(model, opt, trainer, fresh, fresh_opt, cb.sparse)


def test_a_fresh_model_and_optimizer_keep_nothing_for_resume():
    """What the initial masks zero is kept only when it may be a checkpoint's, and only until the
    first step: a fresh model costs no memory."""
    model = build()
    opt = OPTIMIZERS["adam"](model.parameters())
    assert gp.SparseTrainer(model, opt, PRESETS["rigl"]())._provisional is None
    model, opt, trainer = _trained_trainer()
    again = gp.SparseTrainer(model, opt, PRESETS["set"]())          # weights with zeros, optimizer state
    assert again._provisional
    run_trainer(model, opt, again, data(1))
    assert again._provisional is None


def test_sparse_trainer_copies_its_config():
    cfg = PRESETS["rigl"]()
    model = build()
    opt = OPTIMIZERS["sgd"](model.parameters())
    trainer = gp.SparseTrainer(model, opt, cfg)
    cfg.alpha = 0.9
    assert trainer.config == PRESETS["rigl"]()
    assert trainer.config is not cfg
    # the trainer's state carries its own config, not the caller's edited one
    fresh_model = build(seed=1)
    fresh = gp.SparseTrainer(fresh_model, OPTIMIZERS["sgd"](fresh_model.parameters()), PRESETS["rigl"]())
    fresh.load_state_dict(trainer.state_dict())
