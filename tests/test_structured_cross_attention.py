"""Hugging Face cross-attention heads (BERT decoders' ``crossattention``, GPT-2's
``add_cross_attention``), in ``EncoderDecoderModel`` s with a BERT encoder: queries from the
decoder, keys and values from the encoder (of another length), gates that are multipliers before
the output projection, export, analytic params/FLOPs, save/load round trips, search, uniform
widths."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

import gradprune.structured as st

transformers = pytest.importorskip("transformers")
from transformers import (
    BertConfig,
    BertLMHeadModel,
    BertModel,
    EncoderDecoderModel,
    GPT2Config,
    GPT2LMHeadModel,
)

torch.set_num_threads(1)

VOCAB = 40
FINE = {"nn.Linear": {"feature_divisor": 1}}


def _bert_config(**kw):
    return BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=24, max_position_embeddings=16, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0, **kw)


def _decoder(kind, **kw):
    if kind == "bert":
        return BertLMHeadModel(_bert_config(is_decoder=True, add_cross_attention=True, **kw))
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=4,
                                      n_positions=16, n_inner=24, attn_pdrop=0.0, resid_pdrop=0.0,
                                      embd_pdrop=0.0, add_cross_attention=True, bos_token_id=0,
                                      eos_token_id=0, pad_token_id=0, **kw))


def _seq2seq(kind="bert", seed=0, **kw):
    torch.manual_seed(seed)
    model = EncoderDecoderModel(encoder=BertModel(_bert_config(**kw)), decoder=_decoder(kind, **kw))
    model.config.decoder_start_token_id = model.config.pad_token_id = 0
    return model.eval()


def _batch(seed=1, batch=3):
    """(source ids, source mask, target ids, target mask): 9 source and 7 target tokens."""
    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(1, VOCAB, (batch, 9), generator=gen)
    tgt = torch.randint(1, VOCAB, (batch, 7), generator=gen)
    src_mask = torch.ones(batch, 9, dtype=torch.long)
    tgt_mask = torch.ones(batch, 7, dtype=torch.long)
    src_mask[0, 6:] = 0
    tgt_mask[1, 5:] = 0
    return src, src_mask, tgt, tgt_mask


# the decoder's cross-attention module and its output projection, per decoder kind
CROSS = {"bert": ("decoder.bert.encoder.layer.{}.crossattention.self",
                  "decoder.bert.encoder.layer.{}.crossattention.output.dense"),
         "gpt2": ("decoder.transformer.h.{}.crossattention",
                  "decoder.transformer.h.{}.crossattention.c_proj")}


def _cross_groups(analysis):
    return [gi for gi, g in enumerate(analysis.groups) if g.kind and g.kind.endswith("cross_heads")]


def test_cross_attention_heads_are_groups_like_self_attention_heads():
    analysis = st.find_groups(_seq2seq("bert"), _batch())
    names = [analysis.groups[gi].name for gi in _cross_groups(analysis)]
    assert names == [CROSS["bert"][0].format(i) for i in range(2)]
    assert [s.describe() for s in analysis.groups[_cross_groups(analysis)[0]].slices] == [
        f"{names[0]}.{p}.weight[dim 0] (4 per unit)" for p in ("query", "key", "value")] + [
        "decoder.bert.encoder.layer.0.crossattention.output.dense.weight[dim 1] (4 per unit)"]
    # the hidden size, and the Linear layers outside attention and MLP blocks (pooler, LM head)
    assert [s["module"] for s in analysis.skipped if "outside" not in s["reason"]] == ["<hidden size>"]
    # a BERT encoder and a GPT-2 decoder: both families are analysed
    analysis = st.find_groups(_seq2seq("gpt2"), _batch())
    assert {g.kind for g in analysis.groups} == {"bert.heads", "bert.ffn", "gpt2.heads",
                                                 "gpt2.cross_heads", "gpt2.ffn"}
    g = analysis.groups[_cross_groups(analysis)[0]]
    # cross-attention: q_attn holds Q; c_attn holds K and V (16 columns each)
    assert [s.describe() for s in g.slices] == [
        "decoder.transformer.h.0.crossattention.q_attn.weight[dim 1] (4 per unit)",
        "decoder.transformer.h.0.crossattention.c_attn.weight[dim 1] (4 per unit)",
        "decoder.transformer.h.0.crossattention.c_attn.weight[dim 1] at offset 16 (4 per unit)",
        "decoder.transformer.h.0.crossattention.c_proj.weight[dim 0] (4 per unit)"]


def _keep(analysis):
    """Cross-attention: heads 1, 3 in layer 0 and head 2 in layer 1; every other group keeps
    every other unit."""
    keep = {gi: torch.arange(0, g.size, 2) for gi, g in enumerate(analysis.groups)}
    c0, c1 = _cross_groups(analysis)
    keep[c0], keep[c1] = torch.tensor([1, 3]), torch.tensor([2])
    return keep


@pytest.mark.parametrize("kind,attn", [("bert", "sdpa"), ("bert", "eager"), ("gpt2", "sdpa"),
                                       ("gpt2", "eager")])
def test_export_equals_gated_model_and_counts_use_the_encoder_length(kind, attn):
    model = _seq2seq(kind, attn_implementation=attn)
    batch = _batch()
    analysis = st.find_groups(model, batch)
    ref = model(*batch).logits
    with st.Gates(analysis):
        torch.testing.assert_close(model(*batch).logits, ref)
    keep = _keep(analysis)
    with st.Gates(analysis, keep=keep):
        gated = model(*batch).logits
    small = st.export_model(analysis, keep)
    cross = small.get_submodule(CROSS[kind][0].format(1))
    if kind == "bert":
        assert (cross.num_attention_heads, cross.all_head_size) == (1, 4)
        assert cross.key.weight.shape == (4, 16)
    else:
        assert (cross.num_heads, cross.split_size) == (1, 4)
        assert cross.q_attn.weight.shape == (16, 4) and cross.c_attn.weight.shape == (16, 8)
    torch.testing.assert_close(small(*batch).logits, gated, rtol=1e-4, atol=1e-5)
    cost = st.CostModel(analysis, batch)
    assert (cost.dense_params, cost.dense_flops) == (st.count_params(model),
                                                     st.count_flops(model, batch))
    widths = {gi: len(k) for gi, k in keep.items()}
    assert cost.costs(widths) == (st.count_params(small), st.count_flops(small, batch))


def _loss(m, batch):
    logits = m(*batch).logits  # predict each target token from itself (a loss to score with)
    return F.cross_entropy(logits.reshape(-1, VOCAB), batch[2].reshape(-1))


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_cross_head_gates_are_multipliers_before_the_output_projection(kind):
    model = _seq2seq(kind)
    batch = _batch()
    analysis = st.find_groups(model, batch)
    stats = st.gate_statistics(analysis, [batch], _loss, n_batches=1)
    gates = [torch.ones(4, requires_grad=True) for _ in range(2)]
    handles = [model.get_submodule(CROSS[kind][1].format(i)).register_forward_pre_hook(
        lambda mod, args, g=g: (args[0] * g.repeat_interleave(4),)) for i, g in enumerate(gates)]
    try:
        grads = torch.autograd.grad(_loss(model, batch), gates)
    finally:
        for h in handles:
            h.remove()
    for gi, grad in zip(_cross_groups(analysis), grads):
        torch.testing.assert_close(stats.score("gradnas")[gi], grad.double() ** 2,
                                   rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_save_and_load_round_trips(kind, tmp_path):
    model = _seq2seq(kind)
    batch = _batch()
    analysis = st.find_groups(model, batch)
    small = st.export_model(analysis, _keep(analysis))
    small.save_pretrained(tmp_path / "hf")
    again = st.load_pruned_pretrained(EncoderDecoderModel, tmp_path / "hf")
    record = again.config.gradprune_widths[CROSS[kind][0].format(0)]
    assert record == ({"num_attention_heads": 2, "all_head_size": 8} if kind == "bert" else
                      {"num_heads": 2, "split_size": 8})
    torch.testing.assert_close(again(*batch).logits, small(*batch).logits)
    st.save_pruned(small, tmp_path / "p")
    again = st.load_pruned(lambda: _seq2seq(kind), tmp_path / "p").eval()
    torch.testing.assert_close(again(*batch).logits, small(*batch).logits)
    assert st.count_params(again) == st.count_params(small)


def _data():
    return [_batch(seed) for seed in (3, 4)]


def test_search_on_an_encoder_decoder_with_a_cross_attention_rule():
    model = _seq2seq("bert")
    data = _data()
    found = st.search(model, {"params": "80%"}, data, _loss, "gradnas", data[0], rules=FINE)
    assert found.params <= 0.8 * found.dense_params
    small = found.export()
    assert (st.count_params(small), st.count_flops(small, data[0])) == (found.params, found.flops)
    with found.gates():
        gated = model(*data[1]).logits
    torch.testing.assert_close(small(*data[1]).logits, gated, rtol=1e-4, atol=1e-5)
    rules = {**FINE, "hf.BertSelfAttention": None, "hf.BertCrossAttention": {"n_heads_divisor": 2}}
    found = st.search(model, {"params": "85%"}, data, _loss, "magnitude", data[0], rules=rules)
    cross = _cross_groups(found.analysis)
    assert {found.choices[gi] for gi in cross} == {(2, 4)}  # hf.BertCrossAttention rules them
    assert 2 in {found.widths[gi] for gi in cross}
    assert all(found.widths[gi] == 4 for gi, g in enumerate(found.groups)
               if g.kind == "bert.heads")
    assert found.params <= 0.85 * found.dense_params
    # GPT-2's cross-attention is a GPT2Attention too: a glob keeps it
    model = _seq2seq("gpt2")
    rules = {**FINE, "hf.GPT2Attention": {"*": {}, "*crossattention": None}}
    found = st.search(model, {"params": "85%"}, data, _loss, "magnitude", data[0], rules=rules)
    assert {found.choices[gi] for gi in _cross_groups(found.analysis)} == {(4,)}
    assert all(len(found.choices[gi]) == 4 for gi, g in enumerate(found.groups)
               if g.kind == "gpt2.heads")


def test_uniform_widths_need_one_config():
    # the uniform widths of a decoder with cross-attention on its own: test_structured_decoders
    model = _seq2seq("bert")
    data = _data()
    with pytest.raises(ValueError, match="encoder-decoder"):
        st.search(model, {"params": "80%"}, data, _loss, "gradnas", data[0], uniform=True)
    found = st.search(model, {"params": "80%"}, data, _loss, "magnitude", data[0], rules=FINE)
    with pytest.raises(ValueError, match="config.encoder and config.decoder"):
        found.export(uniform=True)
