"""Hidden-size pruning (``search(..., axes=("hidden",))``, issue 16): residual-stream channels
sliced through the embedding, every norm, every reading and writing projection and the LM head,
on every decoder family (tied and untied embeddings, Gemma's embedding scale, Phi-3's fused
projections): budgets met and counted exactly (params and measured FLOPs), outputs equal to the
gated model, ``save_pretrained`` / ``AutoModelForCausalLM.from_pretrained`` round trips,
``generate()``, the scores against dead channels, and the staged search with heads and MLP."""

from __future__ import annotations

import tempfile

import pytest
import torch

import gradprune as gp
from gradprune.structured import count_flops
from gradprune.structured.hidden import HiddenGates, hidden_scores, residual_map

transformers = pytest.importorskip("transformers")
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma2ForCausalLM,  # noqa: E402
                          Gemma3ForCausalLM, Gemma3TextConfig, GemmaConfig, GemmaForCausalLM,
                          LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          Phi3Config, Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM)

torch.set_num_threads(1)

VOCAB = 40
H = 32
BASE = dict(vocab_size=VOCAB, hidden_size=H, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            bos_token_id=0, eos_token_id=0, pad_token_id=0)
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {"tie_word_embeddings": False}),
    "llama-tied": (LlamaConfig, LlamaForCausalLM, {"tie_word_embeddings": True}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": 4}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"tie_word_embeddings": True}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 8}),
    # embeddings times sqrt(hidden_size); tied by default, (1 + weight) norms
    "gemma": (GemmaConfig, GemmaForCausalLM, {"head_dim": 8}),
    "gemma-untied": (GemmaConfig, GemmaForCausalLM, {"head_dim": 8, "tie_word_embeddings": False}),
    # pre- and post-norms, soft-capping, head_dim independent of the hidden size
    "gemma2": (Gemma2Config, Gemma2ForCausalLM, {"head_dim": 8, "sliding_window": 3}),
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM,
               {"head_dim": 8, "sliding_window": 3, "sliding_window_pattern": 2}),
    # fused qkv_proj and gate_up_proj
    "phi3": (Phi3Config, Phi3ForCausalLM, {}),
}


def _model(family="llama", seed=0, **kw):
    config_cls, lm_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    model = lm_cls(config_cls(**{**BASE, **extra, **kw})).eval()
    with torch.no_grad():  # Gemma's norms start at 0 (1 + weight): make every norm non-trivial
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _batches(n=2, seed=1, batch=2, length=7):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (batch, length), generator=gen) for _ in range(n)]


def loss_fn(model, batch):
    return model(batch, labels=batch).loss


def _tied(model) -> bool:
    return model.get_output_embeddings().weight is model.get_input_embeddings().weight


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_search_export_round_trip(family):
    model = _model(family)
    data = _batches()
    ids = data[0]
    found = gp.search(model, {"params": "85%"}, data, loss_fn, example_input=ids, axes=("hidden",),
                      hidden_divisor=8)
    assert found.hidden_size < H and found.hidden_size % 8 == 0 and len(found.keep) == found.hidden_size
    small = found.export()
    assert small.config.hidden_size == found.hidden_size
    assert small.get_input_embeddings().weight.shape == (VOCAB, found.hidden_size)
    n_params = sum(p.numel() for p in small.parameters())
    assert n_params == found.params <= found.constraints["params"] < found.dense_params
    assert count_flops(small, ids) == found.flops < found.dense_flops
    assert _tied(small) == _tied(model)
    with torch.no_grad():
        with found.gates():
            gated = model(ids).logits
        out = small(ids).logits
    torch.testing.assert_close(out, gated, rtol=1e-4, atol=1e-5)
    with tempfile.TemporaryDirectory() as folder:
        small.save_pretrained(folder)
        reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(reloaded) is type(model) and _tied(reloaded) == _tied(model)
    assert reloaded.config.hidden_size == found.hidden_size
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, gated, rtol=1e-4, atol=1e-5)
    gen = reloaded.generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(gen, small.generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0))
    assert gen.shape == (1, ids.shape[1] + 4)


def test_residual_map_structure():
    r = residual_map(_model("gemma2"))
    # four norms per layer plus the final one; q/k/v, gate/up read; o/down write
    assert len(r.norms) == 2 * 4 + 1 and r.final_norm == "model.norm"
    assert len(r.readers) == 2 * 5 and len(r.writers) == 2 * 2 and r.tied
    r3 = residual_map(_model("qwen3"))
    assert not any("q_norm" in n or "k_norm" in n for n in r3.norms)  # per head_dim, untouched
    phi = residual_map(_model("phi3"))
    assert "model.layers.0.self_attn.qkv_proj" in phi.readers
    assert "model.layers.0.mlp.gate_up_proj" in phi.readers


def _with_dead_channels(model, dead):
    """Channels ``dead`` carry nothing: zero embedding columns and zero rows of every writer."""
    r = residual_map(model)
    mods = dict(model.named_modules())
    with torch.no_grad():
        mods[r.embed].weight[:, dead] = 0.0
        for n in r.writers:
            mods[n].weight[dead, :] = 0.0
    return r


@pytest.mark.parametrize("method", ["gradnas", "activation"])
def test_scores_put_dead_channels_last(method):
    model = _model("llama")
    dead = [3, 10, 17, 30]
    r = _with_dead_channels(model, dead)
    scores, batches = hidden_scores(model, _batches(), loss_fn, method, rmap=r)
    assert batches == 2
    assert torch.all(scores[dead] == 0) and torch.all(scores[[c for c in range(H) if c not in dead]] > 0)
    found = gp.search(model, {"params": "90%"}, _batches(), loss_fn, method=method,
                      example_input=_batches()[0], axes=("hidden",), hidden_divisor=4)
    assert found.hidden_size == H - 4 and not set(dead) & set(found.keep.tolist())
    assert not any(p.requires_grad is False for p in model.parameters())  # restored


def test_gradnas_score_is_the_squared_gate_gradient():
    model = _model("mistral")
    data = _batches(n=2)
    scores, _ = hidden_scores(model, data, loss_fn, "gradnas")
    r = residual_map(model)
    expected = torch.zeros(H, dtype=torch.float64)
    for b in data:
        g = torch.ones(H, requires_grad=True)
        with HiddenGates(r, g, normalise=False):
            (grad,) = torch.autograd.grad(loss_fn(model, b), g)
        expected += grad.double() ** 2
    torch.testing.assert_close(scores, expected / len(data))


def test_gated_model_zeroes_the_stream_and_norms_average_over_kept_channels():
    model = _model("llama")
    r = residual_map(model)
    mask = torch.ones(H)
    mask[[0, 5, 9, 20]] = 0.0
    ids = _batches()[0]
    with torch.no_grad(), HiddenGates(r, mask):
        states = model(ids, output_hidden_states=True).hidden_states
    for s in states[:-1]:  # the last one is after the final norm
        assert float(s[..., [0, 5, 9, 20]].abs().max()) == 0.0
    # a norm over the kept channels: the RMS of the 28 kept entries, not of all 32
    norm = model.model.layers[0].input_layernorm
    x = torch.randn(3, H) * mask
    with torch.no_grad(), HiddenGates(r, mask):
        y = norm(x)
    kept = x[:, mask.bool()]
    ref = kept / torch.sqrt(kept.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight[mask.bool()]
    torch.testing.assert_close(y[:, mask.bool()], ref)


def test_flops_budget_and_unreachable_budget_raise_before_scoring():
    model = _model("qwen2")
    ids = _batches()[0]
    found = gp.search(model, {"flops": "80%"}, _batches(), loss_fn, example_input=ids,
                      axes=("hidden",), hidden_divisor=8)
    assert count_flops(found.export(), ids) == found.flops <= found.constraints["flops"]

    def never(m, b):
        raise AssertionError("scored although the budget is unreachable")
    with pytest.raises(ValueError, match="smallest reachable"):
        gp.search(model, {"params": "5%"}, _batches(), never, example_input=ids, axes=("hidden",),
                  hidden_divisor=8)


def test_bad_input_is_named():
    model = _model("llama")
    ids = _batches()[0]
    kw = dict(example_input=ids, axes=("hidden",))
    with pytest.raises(ValueError, match="hidden_divisor"):
        gp.search(model, {"params": "80%"}, _batches(), loss_fn, hidden_divisor=0, **kw)
    with pytest.raises(ValueError, match="hidden_divisor"):
        gp.search(model, {"params": "80%"}, _batches(), loss_fn, example_input=ids, hidden_divisor=8)
    with pytest.raises(ValueError, match="method"):
        gp.search(model, {"params": "80%"}, _batches(), loss_fn, method="taylor", **kw)
    # (latency bounds and measure_latency work on this axis: tests/test_structured_latency_axes.py)
    with pytest.raises(ValueError, match="per_sample"):
        gp.search(model, {"params": "80%"}, _batches(), loss_fn, per_sample=True, **kw)


OTHER = {  # decoders of the same building blocks: no new code
    # nn.LayerNorm (mean and variance over the kept channels), parallel attention and MLP, fc1/fc2
    "phi": ("PhiConfig", "PhiForCausalLM", {}),
    # a bias-free layer norm of its own class, parallel blocks, logit scale
    "cohere": ("CohereConfig", "CohereForCausalLM", {}),
    # q_norm over every head (its width equals the hidden size here), post-norms
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
}


@pytest.mark.parametrize("family", list(OTHER))
def test_other_decoders_with_the_same_blocks(family):
    config_name, lm_name, extra = OTHER[family]
    torch.manual_seed(0)
    model = getattr(transformers, lm_name)(getattr(transformers, config_name)(**{**BASE, **extra})).eval()
    ids = _batches()[0]
    found = gp.search(model, {"params": "85%"}, _batches(), loss_fn, example_input=ids,
                      axes=("hidden",), hidden_divisor=8)
    small = found.export()
    assert sum(p.numel() for p in small.parameters()) == found.params and found.hidden_size < H
    with torch.no_grad():
        with found.gates():
            gated = model(ids).logits
        torch.testing.assert_close(small(ids).logits, gated, rtol=1e-4, atol=1e-5)


def _never(m, b):
    raise AssertionError("scored although the hidden size cannot be pruned")


@pytest.mark.parametrize("config_name, lm_name, extra, words", [
    # a learned position embedding of the hidden size
    ("OPTConfig", "OPTForCausalLM", {"ffn_dim": 32, "word_embed_proj_dim": H}, ["embed_positions"]),
    # OLMoE: q_norm over every head at once, its width derived from hidden_size
    ("OlmoeConfig", "OlmoeForCausalLM", {"num_experts": 4, "num_experts_per_tok": 2},
     ["cannot express hidden_size", "q_norm"]),
    # StableLM derives the head size from hidden_size whatever head_dim says
    ("StableLmConfig", "StableLmForCausalLM", {}, ["cannot express hidden_size", "q_proj"]),
])
def test_not_understood_models_are_refused_before_scoring(config_name, lm_name, extra, words):
    torch.manual_seed(0)
    model = getattr(transformers, lm_name)(getattr(transformers, config_name)(**{**BASE, **extra})).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as info:
        gp.search(model, {"params": "85%"}, _batches(), _never, example_input=_batches()[0],
                  axes=("hidden",), hidden_divisor=8)
    assert "left unpruned" in str(info.value)
    for w in words:
        assert w in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bf16_search_and_export():
    model = _model("llama").to(torch.bfloat16)
    ids = _batches()[0]
    found = gp.search(model, {"params": "85%"}, _batches(), loss_fn, example_input=ids,
                      axes=("hidden",), hidden_divisor=8)
    small = found.export()
    assert next(small.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        with found.gates():
            gated = model(ids).logits.float()
        torch.testing.assert_close(small(ids).logits.float(), gated, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_staged_search_with_heads_and_mlp(family):
    model = _model(family)
    data = _batches()
    ids = data[0]
    found = gp.search(model, {"params": "70%"}, data, loss_fn, example_input=ids,
                      axes=("heads", "mlp", "hidden"), uniform=True, hidden_divisor=8)
    assert found.dense_hidden_size == H and found.hidden_size <= H
    small = found.export()
    n_params = sum(p.numel() for p in small.parameters())
    assert n_params == found.params <= found.constraints["params"] <= 0.7 * found.dense_params
    with torch.no_grad():
        with found.gates():
            gated = found.analysis.model(ids).logits
        torch.testing.assert_close(small(ids).logits, gated, rtol=1e-4, atol=1e-5)
    with tempfile.TemporaryDirectory() as folder:
        small.save_pretrained(folder)
        reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, gated, rtol=1e-4, atol=1e-5)
    assert reloaded.generate(ids[:1], max_new_tokens=3, do_sample=False, pad_token_id=0).shape == (1, ids.shape[1] + 3)


def test_staged_search_per_layer_widths_load_with_load_pruned_pretrained():
    model = _model("llama")
    data = _batches()
    ids = data[0]
    found = gp.search(model, {"params": "55%"}, data, loss_fn, example_input=ids,
                      axes=("heads", "mlp", "hidden"), hidden_divisor=8)
    assert found.hidden_size < H and "hidden_size: 32 -> " in str(found.report)
    assert not any(s["module"] == "<hidden size>" for s in found.skipped)
    with tempfile.TemporaryDirectory() as folder:
        found.export().save_pretrained(folder)
        reloaded = gp.structured.load_pruned_pretrained(LlamaForCausalLM, folder)
    assert sum(p.numel() for p in reloaded.parameters()) == found.params <= 0.55 * found.dense_params
    with torch.no_grad():
        with found.gates():
            gated = found.analysis.model(ids).logits
        torch.testing.assert_close(reloaded(ids).logits, gated, rtol=1e-4, atol=1e-5)
