"""gp.causal_lm_loss: the chunked causal-LM loss gives the unchunked loss and the same gate
scores on every axis, with at most one chunk's logits at a time; unknown heads fall back."""

import warnings

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

import gradprune as gp
from gradprune.structured import find_groups
from gradprune.structured.depth import layer_scores
from gradprune.structured.hidden import hidden_scores
from gradprune.structured.lm_loss import CausalLMLoss, chunked_cross_entropy
from gradprune.structured.scoring import gate_statistics

V = 96


def plain(m, b):
    return m(b, labels=b).loss


def llama(tie=False):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, tie_word_embeddings=tie)).eval()


def batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, V, (3, 11), generator=g) for _ in range(2)]


def close(a, b):
    return all(torch.allclose(a[k], b[k], rtol=2e-4, atol=1e-12) for k in a)


@pytest.mark.parametrize("tie", [False, True])
def test_scores_on_every_axis_equal_the_unchunked_loss(tie):
    m, data = llama(tie), batches()
    assert (m.lm_head.weight is m.model.embed_tokens.weight) == tie
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback
        for chunk in (5, "auto"):
            loss = gp.causal_lm_loss(chunk)
            a = find_groups(m, data[0])
            assert len(a.groups) == 4  # heads (KV groups) and MLP neurons of 2 layers
            for ckpt in (False, True):
                s0 = gate_statistics(a, data, plain, gradient_checkpointing=ckpt)
                s1 = gate_statistics(a, data, loss, gradient_checkpointing=ckpt)
                for kind in ("gradnas", "gradnas_per_sample", "taylor"):
                    assert close(s0.score(kind), s1.score(kind)), (chunk, ckpt, kind)
            h0, _ = hidden_scores(m, data, plain)
            h1, _ = hidden_scores(m, data, loss)
            assert torch.allclose(h0, h1, rtol=2e-4, atol=0)
            l0, _ = layer_scores(m, data, plain)
            l1, _ = layer_scores(m, data, loss, gradient_checkpointing=True)
            assert torch.allclose(l0, l1, rtol=2e-4, atol=0)
            assert float(h0.min()) > 0 and float(l0.min()) > 0  # real gradients, not zeros


def test_search_with_the_chunked_loss_finds_the_same_subnet():
    m, data = llama(), batches()
    kw = dict(example_input=data[0], axes=("heads", "mlp"), uniform=True)
    a = gp.search(m, {"params": "80%"}, data, plain, **kw)
    b = gp.search(m, {"params": "80%"}, data, gp.causal_lm_loss(8), **kw)
    assert a.widths == b.widths and a.params == b.params


def test_only_one_chunk_of_logits_exists_at_a_time():
    m, (ids, _) = llama(), batches()
    shapes = []
    m.lm_head.register_forward_hook(lambda mod, args, out: shapes.append(tuple(out.shape)))
    loss = gp.causal_lm_loss(6)(m, ids)  # 6 tokens over 3 sequences: 2 positions per chunk
    loss.backward()
    assert shapes[:2] == [(3, 1, V), (3, 1, V)]  # the model's last position, and its check
    chunks = shapes[2:]
    assert chunks and max(s[1] for s in chunks) == 2 and sum(s[1] for s in chunks) == 2 * 10
    shapes.clear()
    plain(m, ids)
    assert shapes == [(3, 11, V)]


def test_loss_values_labels_mask_and_softcapping():
    m, (ids, _) = llama(), batches()
    labels = ids.clone()
    labels[0, 4:] = -100
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    ref = m(**batch).loss
    for chunk in (1, 4, "auto", None):
        with torch.no_grad():
            assert torch.allclose(gp.causal_lm_loss(chunk)(m, batch), ref, atol=1e-6)
    torch.manual_seed(0)
    g = Gemma2ForCausalLM(Gemma2Config(vocab_size=V, hidden_size=32, intermediate_size=48,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       head_dim=8, final_logit_softcapping=3.0)).eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")
        assert torch.allclose(gp.causal_lm_loss(4)(g, ids), plain(g, ids), atol=1e-6)
    head, h, y = torch.nn.Linear(4, 10), torch.randn(2, 6, 4), torch.randint(0, 10, (2, 6))
    with pytest.raises(ValueError, match="vocab"):
        chunked_cross_entropy(h, y, head, "auto")


class Doubled(LlamaForCausalLM):  # a head this module does not know: logits x 2
    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2
        if out.loss is not None:
            out.loss = out.loss * 2
        return out


def test_an_unknown_head_falls_back_to_the_models_own_loss_with_a_warning():
    cfg = llama().config
    torch.manual_seed(0)
    m, (ids, _) = Doubled(cfg).eval(), batches()
    loss_fn = gp.causal_lm_loss(4)
    with pytest.warns(UserWarning, match="logits are not its LM head"):
        got = loss_fn(m, ids)
    assert torch.allclose(got, m(ids, labels=ids).loss)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per model
        loss_fn(m, ids)
    m = llama()
    m.config.output_router_logits = True  # a loss term beyond cross-entropy (MoE auxiliary loss)
    with pytest.warns(UserWarning, match="output_router_logits"):
        got = gp.causal_lm_loss(4)(m, ids)
    assert torch.allclose(got, plain(m, ids))


class NoKeep(LlamaForCausalLM):  # takes **kwargs but refuses logits_to_keep
    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        if "logits_to_keep" in kwargs:
            raise TypeError("forward() got an unexpected keyword argument 'logits_to_keep'")
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def test_a_forward_refusing_logits_to_keep_falls_back():
    torch.manual_seed(0)
    m, (ids, _) = NoKeep(llama().config).eval(), batches()
    with pytest.warns(UserWarning, match="does not take logits_to_keep"):
        got = gp.causal_lm_loss(4)(m, ids)
    assert torch.allclose(got, plain(m, ids))


@pytest.mark.parametrize("chunk, exc, match", [
    (0, ValueError, "chunk must be a positive"), (-3, ValueError, "got -3"), (2.5, TypeError, "float"),
    (True, TypeError, "bool"), ("all", TypeError, "'all'")])
def test_bad_chunk_is_named(chunk, exc, match):
    with pytest.raises(exc, match=match):
        gp.causal_lm_loss(chunk)


def test_bad_batches_are_named():
    m = llama()
    loss = CausalLMLoss(4)
    with pytest.raises(TypeError, match="batch must be a tensor"):
        loss(m, [1, 2, 3])
    with pytest.raises(ValueError, match="'input_ids'"):
        loss(m, {"ids": torch.zeros(1, 3, dtype=torch.long)})
    with pytest.raises(ValueError, match="labels must be a tensor of the shape"):
        loss(m, {"input_ids": torch.zeros(1, 3, dtype=torch.long), "labels": torch.zeros(1, 2)})
    assert repr(gp.causal_lm_loss()) == "CausalLMLoss(chunk='auto')"
