"""gp.distill / gp.Distiller / DistillTrainer: recovery of a pruned model by distillation (issue 16,
point 6): the loss terms against hand computations, the teacher left alone, masks kept, bitwise
resume, the Hugging Face Trainer path, and validation before any work."""

import copy
import io
import math
import pathlib
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gradprune as gp
from gradprune.distill import DistillLoss, kl_loss

transformers = pytest.importorskip("transformers")

VOCAB = 40


def _llama(seed=0, hidden=32, inter=64, layers=2, vocab=VOCAB):
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=32, head_dim=8)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg)


def _batches(n=4, bs=4, t=10, seed=0, padded=True):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (bs, t), generator=g)
        mask = torch.ones(bs, t, dtype=torch.long)
        if padded:
            mask[0, -3:] = 0  # right padding in the first row
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _same(model, snap):
    return all(torch.equal(p, snap[n]) for n, p in model.named_parameters())


def _mlp(seed, width=8, dropout=0.0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, width), nn.ReLU(), nn.Dropout(dropout), nn.Linear(width, 5))


# -- the loss ----------------------------------------------------------------------------------------
def _hand_kl(s, t, temperature, mask):
    """T² · mean over unmasked positions of Σ_v p_t log(p_t / p_s), in plain Python."""
    total, count = 0.0, 0
    rows_s, rows_t = s.reshape(-1, s.shape[-1]).tolist(), t.reshape(-1, t.shape[-1]).tolist()
    keep = [True] * len(rows_s) if mask is None else [bool(m) for m in mask.reshape(-1).tolist()]
    for zs, zt, k in zip(rows_s, rows_t, keep):
        if not k:
            continue
        ps = [math.exp(z / temperature) for z in zs]
        pt = [math.exp(z / temperature) for z in zt]
        ps = [p / sum(ps) for p in ps]
        pt = [p / sum(pt) for p in pt]
        total += sum(a * math.log(a / b) for a, b in zip(pt, ps))
        count += 1
    return temperature ** 2 * total / max(count, 1)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.25, 8.0), st.booleans())
def test_kl_equals_hand_computation_with_temperature_squared(seed, temperature, masked):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(2, 3, 5, generator=g) * 3, torch.randn(2, 3, 5, generator=g) * 3
    mask = (torch.rand(2, 3, generator=g) > 0.4) if masked else None
    if mask is not None:
        mask[0, 0] = True
    assert float(kl_loss(s, t, temperature, mask)) == pytest.approx(_hand_kl(s, t, temperature, mask), rel=1e-5,
                                                                     abs=1e-6)


def test_reported_losses_equal_hand_computation_on_first_step():
    teacher, student = _llama(0), _llama(1, inter=16)
    batch = _batches(1)[0]
    with torch.no_grad():
        zs, zt = student(**batch).logits, teacher(**batch).logits
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    ce = nn.functional.cross_entropy(zs[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
    run = gp.distill(student, teacher=teacher, data=[batch], steps=1, temperature=3.0, ce_weight=0.5, kl_weight=2.0)
    first = run.history[0]
    hand = _hand_kl(zs, zt, 3.0, batch["attention_mask"])
    assert first["kl"] == pytest.approx(hand, rel=1e-5)
    assert first["ce"] == pytest.approx(float(ce), rel=1e-5)
    assert first["loss"] == pytest.approx(2.0 * hand + 0.5 * float(ce), rel=1e-5)


def test_kl_decreases_on_tiny_llama_and_teacher_is_left_alone():
    teacher, student = _llama(0), _llama(1, inter=16, layers=1)
    teacher.train()  # distill puts it in eval mode while it runs, and back afterwards
    student.eval()
    before = _snapshot(teacher)
    run = gp.distill(student, teacher=teacher, data=_batches(4), steps=40, lr=1e-2, temperature=2.0,
                     show_progress=False)
    kl = [h["kl"] for h in run.history]
    assert len(kl) == 40 and run.step == 40
    assert sum(kl[-4:]) / 4 < 0.5 * sum(kl[:4]) / 4
    assert _same(teacher, before)
    assert all(p.grad is None for p in teacher.parameters())
    assert teacher.training and not student.training


def test_teacher_runs_in_eval_mode_under_no_grad():
    teacher, student = _mlp(0, dropout=0.5), _mlp(1)
    seen = []
    teacher.register_forward_hook(lambda m, i, o: seen.append((m.training, torch.is_grad_enabled())))
    gp.distill(student, teacher=teacher, data=[torch.randn(4, 6)], steps=3)
    assert seen == [(False, False)] * 3


# -- hidden states ------------------------------------------------------------------------------------
def test_hidden_state_loss_of_a_copy_is_zero():
    teacher = _llama(0)
    student = copy.deepcopy(teacher)
    for loss in ("mse", "cosine"):
        fn = DistillLoss(student, teacher, gp.DistillConfig(hidden_weight=1.0, hidden_loss=loss,
                                                            hidden_states=[(-1, -1), (1, 1)]))
        assert len(fn.projections) == 0
        _, parts, _ = fn(student, teacher, _batches(1)[0])
        assert parts["hidden"] == pytest.approx(0.0, abs=1e-6) and parts["kl"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_hidden_state_loss_with_a_projection_for_pruned_widths(kind):
    teacher, student = _llama(0), _llama(1, hidden=16)
    batch = _batches(1)[0]
    fn = DistillLoss(student, teacher, gp.DistillConfig(hidden_weight=1.0, kl_weight=0.0, hidden_loss=kind,
                                                        hidden_states=[(1, 2)]))
    proj = fn.projections["0"]
    assert (proj.in_features, proj.out_features) == (16, 32) and proj.bias is None
    _, parts, _ = fn(student, teacher, batch)
    with torch.no_grad():
        hs = student(**batch, output_hidden_states=True).hidden_states[1]
        ht = teacher(**batch, output_hidden_states=True).hidden_states[2]
        p = proj(hs)
        per = ((p - ht) ** 2).mean(-1) if kind == "mse" else 1 - nn.functional.cosine_similarity(p, ht, dim=-1)
        m = batch["attention_mask"].float()
        hand = float((per * m).sum() / m.sum())
    assert parts["hidden"] == pytest.approx(hand, rel=1e-5)
    run = gp.distill(student, teacher=teacher, data=_batches(2), steps=25, lr=1e-2, kl_weight=0.0,
                     hidden_weight=1.0, hidden_loss=kind, hidden_states=[(1, 2)])
    h = [x["hidden"] for x in run.history]
    assert h[-1] < 0.7 * h[0]
    assert not torch.equal(run.loss.projections["0"].weight, proj.weight)  # the projection is trained


def test_hidden_state_loss_by_module_name_on_plain_modules():
    teacher, student = _mlp(0, width=12), _mlp(1, width=8)
    run = gp.distill(student, teacher=teacher, data=[torch.randn(8, 6)], steps=15, lr=1e-2,
                     hidden_weight=1.0, hidden_states=[("0", "0")])
    assert run.loss.widths == [(8, 12)]
    assert run.history[-1]["hidden"] < run.history[0]["hidden"]
    with pytest.raises(ValueError, match="'nope'"):
        gp.Distiller(student, teacher, hidden_weight=1.0, hidden_states=[("nope", "0")])
    with pytest.raises(ValueError, match="config.hidden_size"):
        gp.Distiller(student, teacher, hidden_weight=1.0, hidden_states=[(-1, -1)])


# -- masks -----------------------------------------------------------------------------------------
def test_masks_stay_exactly_zero_after_every_step():
    teacher, student = _llama(0), _llama(1, inter=16)
    masks = gp.MaskSet(student, names=["model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight"])
    g = torch.Generator().manual_seed(0)
    for n in masks:
        masks[n] = torch.rand(masks[n].shape, generator=g) > 0.5
    d = gp.Distiller(student, teacher, masks=masks, lr=1e-2, weight_decay=0.1, max_grad_norm=1.0)
    params = dict(student.named_parameters())
    for batch in _batches(4) * 2:
        d.train_step(batch)
        for n, m in masks.items():
            assert torch.all(params[n].detach()[~m] == 0)
            assert torch.all(d.optimizer.state[params[n]]["exp_avg"][~m] == 0)
            assert torch.any(params[n].detach()[m] != 0)


# -- resume -----------------------------------------------------------------------------------------
def _params_and_state(student, d):
    out = [p.detach().clone() for p in student.parameters()]
    out += [v.clone() for v in d.loss.projections.state_dict().values()]
    for s in d.optimizer.state.values():
        out += [v.clone() for v in s.values() if isinstance(v, torch.Tensor)]
    return out


@pytest.mark.parametrize("kind", ["mlp_dropout", "llama_projection"])
def test_resume_after_k_steps_is_bitwise_identical(kind, tmp_path):
    if kind == "mlp_dropout":
        make_teacher, make_student = (lambda: _mlp(0, width=16)), (lambda: _mlp(1, dropout=0.3))
        data = torch.utils.data.DataLoader(torch.randn(24, 6), batch_size=8)  # re-iterable, not a list
        fields = {"lr": 1e-2, "temperature": 2.0, "seed": 3}
    else:
        make_teacher, make_student = (lambda: _llama(0)), (lambda: _llama(1, hidden=16))
        data = _batches(3)
        fields = {"lr": 1e-2, "hidden_weight": 0.5, "hidden_states": [(-1, -1), (1, 1)], "ce_weight": 0.1,
                  "max_grad_norm": 0.5}
    teacher = make_teacher()
    straight = make_student()
    full = gp.distill(straight, teacher=teacher, data=data, steps=7, **fields)

    student = make_student()
    part = gp.distill(student, teacher=teacher, data=data, steps=4, **fields)
    torch.save({"student": student.state_dict(), "distill": part.state_dict()}, tmp_path / "ckpt.pt")

    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    again = make_student()
    again.load_state_dict(ckpt["student"])
    torch.manual_seed(456)  # nor does the global random state when resuming: the Distiller has its own
    resumed = gp.distill(again, teacher=teacher, data=data, steps=7, state=ckpt["distill"], **fields)
    assert resumed.step == 7 and [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    for a, b in zip(_params_and_state(again, resumed), _params_and_state(straight, full)):
        assert torch.equal(a, b)


def test_resume_refuses_another_config_and_loads_all_or_nothing():
    teacher, data = _mlp(0, width=16), [torch.randn(8, 6) for _ in range(3)]
    student = _mlp(1, dropout=0.2)
    d = gp.Distiller(student, teacher, lr=1e-2).run(data, 2)
    state = copy.deepcopy(d.state_dict())
    with pytest.raises(ValueError, match=r"temperature=1.0 \(saved\) vs 2.0"):
        gp.Distiller(_mlp(1), teacher, lr=1e-2, temperature=2.0).load_state_dict(state)

    target = gp.Distiller(_mlp(2, dropout=0.2), teacher, lr=1e-2).run(data, 1)
    before = (target.step, target.batches, copy.deepcopy(target.optimizer.state_dict()), target._rng["cpu"].clone())
    bad_shape = copy.deepcopy(state)
    bad_shape["optimizer"]["state"][0]["exp_avg"] = torch.zeros(3)
    bad_rng = copy.deepcopy(state)
    bad_rng["rng"]["cpu"] = torch.zeros(3, dtype=torch.uint8)
    bad_step = dict(copy.deepcopy(state), step=-1)
    for bad, match in [(bad_shape, "exp_avg"), (bad_rng, "rng"), (bad_step, "step"), ({"config": {}}, "missing")]:
        with pytest.raises(ValueError, match=match):
            target.load_state_dict(bad)
        assert (target.step, target.batches) == before[:2] and torch.equal(target._rng["cpu"], before[3])
        now = target.optimizer.state_dict()
        assert all(torch.equal(now["state"][k]["exp_avg"], before[2]["state"][k]["exp_avg"]) for k in now["state"])
    sgd = gp.Distiller(_mlp(2), teacher, lr=1e-2, optimizer=None)
    sgd.optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="another optimizer"):
        sgd.load_state_dict(state)


def test_one_shot_iterator_is_the_continuation_and_running_out_is_an_error():
    teacher, student = _mlp(0), _mlp(1)
    d = gp.distill(student, teacher=teacher, data=iter([torch.randn(4, 6) for _ in range(3)]), steps=3)
    assert d.step == 3
    with pytest.raises(ValueError, match="ran out at step 4"):
        d.run(iter([torch.randn(4, 6)]), steps=5)
    assert d.step == 4


# -- Hugging Face Trainer --------------------------------------------------------------------------
def test_distill_trainer_lowers_the_kl_keeps_masks_and_leaves_the_teacher(tmp_path):
    pytest.importorskip("accelerate")
    from gradprune.integrations.hf import DistillTrainer

    teacher, student = _llama(0), _llama(1, inter=16)
    held = _batches(1, seed=9, padded=False)[0]
    fn = DistillLoss(student, teacher, gp.DistillConfig(temperature=2.0))
    kl_before = fn(student, teacher, held)[1]["kl"]
    snap = _snapshot(teacher)
    masks = gp.MaskSet(student, names=["model.layers.0.mlp.down_proj.weight"])
    masks["model.layers.0.mlp.down_proj.weight"] = torch.rand(32, 16, generator=torch.Generator().manual_seed(0)) > 0.5
    rows = [{"input_ids": b["input_ids"][i], "attention_mask": b["attention_mask"][i]}
            for b in _batches(4, padded=False) for i in range(4)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=30, per_device_train_batch_size=4,
                                          learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no",
                                          logging_strategy="no", disable_tqdm=True, seed=0,
                                          gradient_accumulation_steps=2)
    trainer = DistillTrainer(model=student, teacher=teacher, args=args, train_dataset=rows,
                             distill_config=gp.DistillConfig(temperature=2.0), masks=masks)
    trainer.train()
    kl_after = fn(student, teacher, held)[1]["kl"]
    assert kl_after < 0.5 * kl_before
    assert _same(teacher, snap) and not teacher.training
    w = student.model.layers[0].mlp.down_proj.weight.detach()
    assert torch.all(w[~masks["model.layers.0.mlp.down_proj.weight"]] == 0)
    with pytest.raises(ValueError, match="widths differ"):
        DistillTrainer(model=_llama(1, hidden=16), teacher=teacher, args=args, train_dataset=rows,
                       distill_config={"hidden_weight": 1.0})
    with pytest.raises(ValueError, match="must not be the student"):
        DistillTrainer(model=student, teacher=student, args=args, train_dataset=rows)


# -- validation -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, error, match", [
    ({"steps": 0}, ValueError, "steps must be >= 1, got 0"),
    ({"steps": 2.0}, TypeError, "steps must be int"),
    ({"temperature": 0.0}, ValueError, r"temperature must be in \(0.0, inf\], got 0.0"),
    ({"temperature": -1}, ValueError, "temperature"),
    ({"kl_weight": 0.0}, ValueError, "at least one loss term"),
    ({"hidden_loss": "l1"}, ValueError, "hidden_loss must be one of mse, cosine; got 'l1'"),
    ({"hidden_states": [(0, "x")]}, TypeError, "hidden_states pair"),
    ({"lr": 0}, ValueError, "lr"),
    ({"max_grad_norm": -1.0}, ValueError, "max_grad_norm"),
    ({"tempreature": 2.0}, ValueError, "unknown distill option.*'tempreature'"),
    ({"data": 3}, TypeError, "data must be an iterable"),
    ({"teacher": "model"}, TypeError, "teacher must be a torch.nn.Module, got str"),
    ({"masks": {"0.weight": None}}, TypeError, "masks must be a gradprune.MaskSet"),
    ({"show_progress": 1}, TypeError, "show_progress must be bool"),
])
def test_bad_input_is_refused_before_any_work(kwargs, error, match):
    teacher, student = _mlp(0), _mlp(1)
    call = {"teacher": teacher, "data": [torch.randn(4, 6)], "steps": 2, **kwargs}
    snap, rng = _snapshot(student), torch.get_rng_state()
    with pytest.raises(error, match=match):
        gp.distill(student, **call)
    assert _same(student, snap) and torch.equal(torch.get_rng_state(), rng)


def test_teacher_must_not_be_or_share_with_the_student():
    student = _mlp(1)
    with pytest.raises(ValueError, match="must not be the student"):
        gp.distill(student, teacher=student, data=[torch.randn(4, 6)], steps=1)
    twin = nn.Sequential(student[0], nn.ReLU(), nn.Linear(8, 5))
    with pytest.raises(ValueError, match=r"shares parameters with the student \(\['0.weight'"):
        gp.distill(student, teacher=twin, data=[torch.randn(4, 6)], steps=1)


def test_vocabulary_mismatch_is_refused_before_any_work():
    teacher, student = _llama(0), _llama(1, vocab=VOCAB + 2)
    with pytest.raises(ValueError, match=f"student vocab_size={VOCAB + 2}, teacher vocab_size={VOCAB}"):
        gp.distill(student, teacher=teacher, data=_batches(1), steps=1)
    # plain modules show their output size only in their logits: refused on the first batch, unchanged
    small = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 7))
    snap = _snapshot(small)
    d = gp.Distiller(small, _mlp(0))
    with pytest.raises(ValueError, match=r"vocabulary size, got 7 \(student\) and 5 \(teacher\)"):
        d.run([torch.randn(4, 6)], steps=1)
    assert d.step == 0 and _same(small, snap) and not d.optimizer.state


# -- progress and docs ------------------------------------------------------------------------------
def test_progress_bar_only_when_asked(monkeypatch, caplog):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    monkeypatch.setattr("sys.stderr", screen)
    teacher, student = _mlp(0), _mlp(1)
    with caplog.at_level("INFO", logger="gradprune.distill"):
        gp.distill(student, teacher=teacher, data=[torch.randn(4, 6)], steps=4, show_progress=False, log_every=2)
    assert screen.getvalue() == ""
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["distill step 2/4", "distill step 4/4"]
    gp.distill(student, teacher=teacher, data=[torch.randn(4, 6)], steps=2)
    assert "distill" in screen.getvalue()


def test_docs_distill_examples_run():
    text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "distill.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 3
    for i, block in enumerate(blocks):  # every block is self-contained
        exec(compile(block, f"docs/distill.md (python block {i})", "exec"), {})
