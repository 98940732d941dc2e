"""Registered width scores (gradnas, taylor, fisher, michel, activation, magnitude, fastnas):
formulas checked against direct computations on a tiny LLaMA, frozen weights, bf16."""

import pytest
import torch

import gradprune as gp
from gradprune.structured import find_groups
from gradprune.structured.scoring import (WIDTH_SCORES, activation_scores, gate_statistics,
                                          width_score)
from gradprune.structured.search import METHODS

transformers = pytest.importorskip("transformers")


def tiny_llama(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def batches(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (4, 12), generator=g) for _ in range(n)]


def loss_fn(model, batch):
    return model(batch, labels=batch).loss


def test_registry_lists_every_method_with_a_formula():
    assert set(METHODS) == set(WIDTH_SCORES)
    for name in ("gradnas", "taylor", "fisher", "activation"):
        spec = width_score(name)
        assert spec.name == name and spec.formula and spec.needs_data
    with pytest.raises(ValueError, match="method must be one of gradnas, taylor, fisher.*activation.*got 'fishr'"):
        width_score("fishr")
    with pytest.raises(ValueError, match="got 'fishr'"):
        gp.search(tiny_llama(), {"params": "80%"}, batches(), loss_fn, method="fishr",
                  example_input=batches(1)[0])
    with pytest.raises(TypeError, match="method must be str"):
        width_score(3)


def test_activation_scores_are_mean_consumer_input_norms():
    model, data = tiny_llama(), batches()
    analysis = find_groups(model, data[0])
    scores, n = activation_scores(analysis, data, loss_fn)
    assert n == len(data)
    seen = {}
    hooks = [model.model.layers[0].mlp.down_proj.register_forward_pre_hook(
                 lambda m, a: seen.setdefault("mlp", []).append(a[0].detach())),
             model.model.layers[0].self_attn.o_proj.register_forward_pre_hook(
                 lambda m, a: seen.setdefault("attn", []).append(a[0].detach()))]
    with torch.no_grad():
        for b in data:
            model(b)
    for h in hooks:
        h.remove()
    mlp = torch.cat(seen["mlp"]).reshape(-1, 48).double()
    gi_mlp = [i for i, g in enumerate(analysis.groups) if g.name == "model.layers.0.mlp.up_proj"][0]
    assert torch.allclose(scores[gi_mlp], mlp.abs().mean(0))
    attn = torch.cat(seen["attn"]).reshape(-1, 2, 16).double()  # 2 KV groups x (2 heads x 8 dims)
    gi_attn = [i for i, g in enumerate(analysis.groups) if g.name == "model.layers.0.self_attn"][0]
    assert torch.allclose(scores[gi_attn], attn.norm(dim=-1).mean(0))


def test_fisher_is_per_sample_gradnas_and_taylor_is_the_weight_taylor():
    model, data = tiny_llama(), batches(1)
    fisher = gp.search(model, {"params": "80%"}, data, loss_fn, method="fisher", example_input=data[0])
    per = gp.search(model, {"params": "80%"}, data, loss_fn, method="gradnas", per_sample=True,
                    example_input=data[0])
    assert all(torch.equal(fisher.scores[gi], per.scores[gi]) for gi in fisher.scores)
    assert fisher.widths == per.widths
    # taylor (gate form) = |sum_j W_up[u, j] dL/dW_up[u, j]|: the gate sits on up_proj's output
    analysis = find_groups(model, data[0])
    stats = gate_statistics(analysis, data, loss_fn)
    gi = [i for i, g in enumerate(analysis.groups) if g.name == "model.layers.1.mlp.up_proj"][0]
    w = model.model.layers[1].mlp.up_proj.weight
    (grad,) = torch.autograd.grad(loss_fn(model, data[0]), w)
    weight_form = (w.detach() * grad).sum(1).abs().double()
    assert torch.allclose(stats.score("taylor")[gi], weight_form, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("method", ["gradnas", "taylor", "fisher", "michel"])
def test_weights_get_no_gradients_while_scoring(method):
    model, data = tiny_llama(), batches()
    model.model.layers[0].mlp.up_proj.weight.grad = torch.ones_like(model.model.layers[0].mlp.up_proj.weight)
    flags = []

    def checking_loss(m, b):
        flags.append([p.requires_grad for p in m.parameters()])
        return loss_fn(m, b)

    found = gp.search(model, {"params": "80%"}, data, checking_loss, method=method,
                      example_input=data[0])
    assert len(flags) >= len(data) and not any(any(f) for f in flags)  # frozen in every batch
    assert all(p.requires_grad for p in model.parameters())  # restored
    grads = [n for n, p in model.named_parameters() if p.grad is not None]
    assert grads == ["model.layers.0.mlp.up_proj.weight"]  # the user's own .grad, untouched
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight.grad,
                       torch.ones_like(model.model.layers[0].mlp.up_proj.weight))
    assert any(float(s.abs().sum()) > 0 for s in found.scores.values())  # the gates did get gradients


@pytest.mark.parametrize("method", ["gradnas", "taylor", "fisher", "activation"])
def test_scoring_runs_in_bf16_on_a_tiny_llama(method):
    model, data = tiny_llama(torch.bfloat16), batches()
    found = gp.search(model, {"params": "80%"}, data, loss_fn, method=method, example_input=data[0],
                      uniform=True)
    assert found.params <= 0.8 * found.dense_params
    assert all(torch.isfinite(s).all() and s.dtype == torch.float64 for s in found.scores.values())
    assert any(float(s.abs().sum()) > 0 for s in found.scores.values())
    small = found.export()
    assert next(small.parameters()).dtype == torch.bfloat16
    out = small.generate(data[0][:1, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)


@pytest.mark.parametrize("method, axes", [("gradnas", ("heads", "mlp")), ("fisher", ("heads", "mlp")),
                                          ("gradnas", ("layers",))])
def test_gradient_checkpointing_gives_the_same_scores(method, axes):
    model, data = tiny_llama(), batches(2)
    plain = gp.search(model, {"params": "80%"}, data, loss_fn, method=method, example_input=data[0],
                      axes=axes)
    ckpt = gp.search(model, {"params": "80%"}, data, loss_fn, method=method, example_input=data[0],
                     axes=axes, gradient_checkpointing=True)
    if axes == ("layers",):
        assert torch.allclose(plain.scores, ckpt.scores, rtol=1e-5, atol=0) and plain.dropped == ckpt.dropped
    else:
        assert all(torch.allclose(plain.scores[gi], ckpt.scores[gi], rtol=1e-5, atol=1e-12)
                   for gi in plain.scores)
        assert plain.widths == ckpt.widths
    assert model.config.use_cache is True
    assert all("forward" not in vars(layer) for layer in model.model.layers)  # restored
    with pytest.raises(TypeError, match="gradient_checkpointing must be bool"):
        gp.search(model, {"params": "80%"}, data, loss_fn, example_input=data[0], gradient_checkpointing=1)
