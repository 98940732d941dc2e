"""Hugging Face Trainer callbacks, save_pretrained round trips, safetensors masks, and the
SparseTrainer hook form they rely on."""


import pytest
import torch
from torch import nn

import gradprune as gp
from gradprune.integrations.safetensors import load_masks, load_selection, save_masks, save_selection

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from gradprune.integrations.hf import STATE_FILE, PruningCallback, SparseTrainingCallback  # noqa: E402


def _bert():
    cfg = transformers.BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, num_labels=2)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg)


def _dataset(n=32):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 60, (8,), generator=g), "labels": torch.tensor(i % 2)} for i in range(n)]


def _args(tmp_path, steps, **kw):
    return transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4,
                                          report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
                                          disable_tqdm=True, seed=0, **kw)


def test_pruning_callback_reaches_exact_target_and_saves_with_save_pretrained(tmp_path):
    model = _bert()
    cb = PruningCallback(criterion="snip_momentum", pattern="4x1", target_sparsity=0.75,
                         start_step=0, end_step=12, frequency=4, include=["bert.encoder.*"])
    trainer = transformers.Trainer(model=model, args=_args(tmp_path, 16, gradient_accumulation_steps=2),
                                   train_dataset=_dataset(), callbacks=[cb])
    trainer.train()
    assert cb.pruner.step == 16                   # optimizer steps, not micro-batches
    assert cb.pruner.masks.sparsity() == 0.75
    params = dict(model.named_parameters())
    for name, m in cb.pruner.masks.items():
        assert name.startswith("bert.encoder.")
        assert torch.all(params[name].detach()[~m] == 0)
    model.save_pretrained(tmp_path / "pruned")
    again = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "pruned")
    x = torch.randint(0, 60, (3, 8))
    model.eval(), again.eval()
    torch.testing.assert_close(again(input_ids=x).logits, model(input_ids=x).logits)
    for name, m in cb.pruner.masks.items():
        assert torch.all(dict(again.named_parameters())[name].detach()[~m] == 0)


def test_pruning_callback_saves_state_in_checkpoints_and_resumes(tmp_path):
    model = _bert()
    cb = PruningCallback(criterion="magnitude", target_sparsity=0.5, start_step=0, end_step=8, frequency=2,
                         include=["bert.encoder.*"])
    args = _args(tmp_path, 6)
    args.save_strategy = "steps"
    args.save_steps = 3
    transformers.Trainer(model=model, args=args, train_dataset=_dataset(), callbacks=[cb]).train()
    ckpt = tmp_path / "checkpoint-6"
    assert (ckpt / STATE_FILE).is_file()
    state = torch.load(ckpt / STATE_FILE, weights_only=True)
    assert state["step"] == 6
    resumed = PruningCallback(cb.config, resume_from=str(ckpt))
    model2 = transformers.BertForSequenceClassification.from_pretrained(ckpt)
    resumed.on_train_begin(None, None, None, model=model2, optimizer=torch.optim.SGD(model2.parameters(), lr=0.1))
    assert resumed.pruner.step == 6
    for n, m in cb.pruner.masks.items():
        assert torch.equal(resumed.pruner.masks[n], m)
    with pytest.raises(FileNotFoundError, match=STATE_FILE):
        PruningCallback(cb.config, resume_from=str(tmp_path))


def test_sparse_training_callback_keeps_exact_counts(tmp_path):
    model = _bert()
    cfg = gp.SparseConfig.rigl(density=0.3, total_steps=20, update_interval=5, include=["bert.encoder.*"])
    cb = SparseTrainingCallback(cfg)
    trainer = transformers.Trainer(model=model, args=_args(tmp_path, 20, learning_rate=0.05),
                                   train_dataset=_dataset(), callbacks=[cb],
                                   optimizers=(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), None))
    before = None

    class Record(transformers.TrainerCallback):
        def on_train_begin(self, *a, **k):
            nonlocal before
            before = {n: int(m.sum()) for n, m in cb.sparse.masks.items()}

    trainer.add_callback(Record())
    trainer.train()
    assert cb.sparse.updates == 2                      # steps 5 and 10 (< end_step 15)
    assert cb.sparse.step_count == 20
    assert {n: int(m.sum()) for n, m in cb.sparse.masks.items()} == before
    params = dict(model.named_parameters())
    for n, m in cb.sparse.masks.items():
        assert torch.all(params[n].detach()[~m] == 0)


def test_sparse_hook_form_equals_step():
    """before/after_optimizer_step around optimizer.step() == step(), update steps included."""
    def run(hooks):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sp = gp.SparseTrainer(model, opt, gp.SparseConfig.rigl(density=0.25, total_steps=24, update_interval=4))
        g = torch.Generator().manual_seed(1)
        for _ in range(24):
            x, y = torch.randn(8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            if hooks:
                sp.before_optimizer_step()
                opt.step()
                sp.after_optimizer_step()
            else:
                sp.step()
        return model, sp

    a, sa = run(False)
    b, sb = run(True)
    assert sa.updates == sb.updates == 4
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    for n in sa.masks:
        assert torch.equal(sa.masks[n], sb.masks[n])


def test_hook_form_skips_non_finite_steps():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = gp.SparseTrainer(model, opt, gp.SparseConfig.static(density=0.5, total_steps=10))
    nn.functional.cross_entropy(model(torch.randn(2, 4)), torch.tensor([0, 1])).backward()
    model[0].weight.grad[0, 0] = float("inf")
    assert sp.before_optimizer_step() is False
    sp.after_optimizer_step()
    assert sp.step_count == 0
    with pytest.raises(RuntimeError, match="without before_optimizer_step"):
        sp.after_optimizer_step()


def test_masks_and_selections_as_safetensors(tmp_path):
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    res = gp.prune(model, sparsity=0.5, pattern="2:4")
    save_masks(res.masks, tmp_path / "m.safetensors", metadata={"pattern": "2:4"})
    loaded = load_masks(tmp_path / "m.safetensors")
    assert set(loaded) == set(res.masks) and all(torch.equal(loaded[n], res.masks[n]) for n in loaded)
    items = [{"x": torch.randn(8), "feature_class_id": i % 2, "factual": i % 2, "alternative": 1 - i % 2}
             for i in range(8)]
    sel = gp.pre_prune(model, items, gp.PrePruneConfig(n_samples=4, topk=5),
                       lambda m, b, t: nn.functional.cross_entropy(m(b["x"]), b[t]))
    save_selection(sel, tmp_path / "s.safetensors")
    idx, imp = load_selection(tmp_path / "s.safetensors")
    assert sum(len(v) for v in idx.values()) == 5
    assert all(torch.equal(imp[n], sel.importance[n].cpu()) for n in imp)
    with pytest.raises(ValueError, match="not a mask file"):
        torch_state = {"w": torch.ones(2)}
        import safetensors.torch as st
        st.save_file(torch_state, str(tmp_path / "bad.safetensors"))
        load_masks(tmp_path / "bad.safetensors")
    with pytest.raises(TypeError, match="must be a bool tensor"):
        save_masks({"w": torch.ones(2)}, tmp_path / "x.safetensors")
