"""Tied and shared weights, and transformer layers, by default (issue #13 point 5), plus the target
checks of points 6 and 8: unknown mask names, meta parameters, include/exclude globs matching nothing."""
import warnings

import pytest
import torch
from torch import nn

import gradprune as gp

transformers = pytest.importorskip("transformers")


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def _llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, vocab_size=100,
                                   tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg)


def _bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, vocab_size=100)
    return transformers.BertForMaskedLM(cfg)


BUILDERS = {"gpt2": (_gpt2, "transformer.wte.weight", "attn.c_attn"),
            "llama": (_llama, "model.embed_tokens.weight", "self_attn.q_proj"),
            "bert": (_bert, "bert.embeddings.word_embeddings.weight", "attention.self.query")}


def _blocks(model, key):
    return {n: p for n, p in model.named_parameters() if ".0." in n or ".1." in n
            if n.endswith("weight") and p.dim() == 2 and "norm" not in n.lower()}


def _check(model, masks, emb_name, block_key, emb_before):
    names = set(masks)
    assert emb_name not in names
    assert not any("lm_head" in n or "decoder" in n for n in names)
    assert any(block_key in n for n in names)
    assert torch.equal(dict(model.named_parameters())[emb_name].detach(), emb_before)
    # every block weight is pruned to the target
    for n, p in _blocks(model, block_key).items():
        assert n in names, n
        assert abs(float((p.detach() == 0).float().mean()) - 0.5) < 0.02, n


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_prune_prunes_blocks_not_tied_embeddings(arch):
    build, emb, block = BUILDERS[arch]
    model = build()
    emb_before = dict(model.named_parameters())[emb].detach().clone()
    res = gp.prune(model, sparsity=0.5, criterion="magnitude")
    _check(model, res.masks, emb, block, emb_before)
    assert abs(res.masks.sparsity() - 0.5) < 1e-3


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_pruner_and_sparse_trainer_defaults(arch):
    build, emb, block = BUILDERS[arch]
    model = build()
    emb_before = dict(model.named_parameters())[emb].detach().clone()
    pruner = gp.Pruner(model, gp.PruneConfig(target_sparsity=0.5, criterion="magnitude"))
    assert emb not in pruner.masks and any(block in n for n in pruner.masks)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sparse = gp.SparseTrainer(model, opt, gp.SparseConfig.rigl(density=0.5, total_steps=4))
    assert set(sparse.masks) == set(pruner.masks)
    assert torch.equal(dict(model.named_parameters())[emb].detach(), emb_before)


def test_hf_callbacks_prune_conv1d_not_the_tied_head():
    from gradprune.integrations.hf import PruningCallback, SparseTrainingCallback

    model = _gpt2()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cb = PruningCallback(target_sparsity=0.5, criterion="magnitude")
    cb.on_train_begin(None, None, None, model=model, optimizer=opt)
    sb = SparseTrainingCallback(gp.SparseConfig.rigl(density=0.5, total_steps=4))
    sb.on_train_begin(None, None, None, model=model, optimizer=opt)
    for masks in (cb.pruner.masks, sb.sparse.masks):
        assert "lm_head.weight" not in masks and "transformer.wte.weight" not in masks
        assert "transformer.h.0.attn.c_attn.weight" in masks
        assert "transformer.h.1.mlp.c_proj.weight" in masks


def test_one_classifier_default_everywhere():
    assert gp.PruneConfig().include_classifier is False
    assert gp.SparseConfig().include_classifier is False
    assert gp.SparseConfig.rigl(density=0.5, total_steps=10).include_classifier is False


def test_tied_head_needs_an_explicit_include():
    model = _gpt2()
    assert "lm_head.weight" not in gp.find_targets(model, include_classifier=True)
    assert "transformer.wte.weight" not in gp.find_targets(model, include_classifier=True)
    # naming it (under either of its names) opts in, once
    got = gp.find_targets(model, include=["lm_head.weight"])
    assert len(got) == 1


def test_conv1d_nm_groups_run_along_the_input_dimension():
    model = _gpt2()
    res = gp.prune(model, pattern="2:4", criterion="magnitude", module_types=["Conv1D"])
    w = model.transformer.h[0].attn.c_attn.weight  # Conv1D: [in=32, out=96]
    m = res.masks["transformer.h.0.attn.c_attn.weight"]
    assert m.shape == w.shape
    # each output neuron keeps 2 of every 4 consecutive inputs
    per_group = m.t().reshape(w.shape[1], -1, 4).sum(-1)
    assert bool((per_group == 2).all())


def test_conv1d_channels_are_output_neurons():
    model = _gpt2()
    res = gp.prune(model, pattern="channel", sparsity=0.5, criterion="magnitude",
                   include=["transformer.h.0.mlp.c_fc.weight"], module_types=["Conv1D"])
    m = res.masks["transformer.h.0.mlp.c_fc.weight"]  # [in=32, out=128]
    cols = m.all(dim=0) | (~m).all(dim=0)
    assert bool(cols.all()) and int(m.all(dim=0).sum()) == 64


def test_shared_tensor_is_one_unit_counted_once():
    lin = nn.Linear(6, 6)
    model = nn.Sequential(lin, nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    model[2].weight = lin.weight
    masks = gp.MaskSet(model, names=["0.weight", "2.weight", "4.weight"])
    assert list(masks) == ["0.weight", "4.weight"]
    assert masks.count() == (36 + 12, 36 + 12)
    masks["2.weight"][0] = False  # the alias edits the one mask
    assert masks.count()[0] == 48 - 6
    assert masks["0.weight"] is masks["2.weight"]


def test_prune_rejects_mask_names_it_does_not_prune():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="typo.weight"):
        gp.prune(model, sparsity=0.5, criterion="magnitude",
                 mask={"typo.weight": torch.ones(4, 4, dtype=torch.bool)})


def test_meta_parameters_are_named():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"meta.*0\.weight|0\.weight.*meta"):
        gp.prune(model, sparsity=0.5, criterion="magnitude")
    with pytest.raises(ValueError, match=r"meta"):
        gp.MaskSet(model, names=["0.weight"])


@pytest.mark.parametrize("field", ["include", "exclude"])
def test_glob_matching_nothing_warns(field):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    kw = {field: ["0.weight", "encodr.*"]}
    with pytest.warns(UserWarning, match=rf"{field} pattern 'encodr\.\*' matches no parameter"):
        gp.find_targets(model, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gp.find_targets(model, **{field: ["0.weight"]})


def test_training_flops_counts_gpt2_conv1d():
    model = _gpt2()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sparse = gp.SparseTrainer(model, opt, gp.SparseConfig.rigl(density=0.5, total_steps=4))
    ids = torch.randint(0, 100, (2, 8))
    macs = gp.sparse_training.layer_macs(model, ids, set(sparse.params))
    w = model.transformer.h[0].mlp.c_fc.weight  # [in=32, out=128]
    assert macs["transformer.h.0.mlp.c_fc.weight"] == 2 * 8 * w.numel()
    assert set(macs) == set(sparse.params)


@pytest.mark.parametrize("spec", ["1x1", "4x1", "1x4", "2x2", "2:4", "1:4", "channel"])
def test_conv1d_masks_are_the_transpose_of_the_equivalent_linear(spec):
    """A Conv1D weight [in, out] is pruned exactly as a Linear holding its transpose [out, in]."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = nn.Sequential(Conv1D(16, 8), nn.ReLU(), Conv1D(8, 16))  # Conv1D(nf=out, nx=in)
    lin = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    with torch.no_grad():
        for c, l in ((conv[0], lin[0]), (conv[2], lin[2])):
            l.weight.copy_(c.weight.t())
    kw = dict(criterion="magnitude", pattern=spec, include_classifier=True, module_types=["Linear", "Conv1D"])
    if ":" not in spec:
        kw["sparsity"] = 0.5
    mc = gp.prune(conv, **kw).masks
    ml = gp.prune(lin, **kw).masks
    for n in ("0.weight", "2.weight"):
        assert torch.equal(mc[n].t(), ml[n]), n


def test_pruner_nm_on_conv1d_runs_along_the_input_dimension():
    model = _gpt2()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    pruner = gp.Pruner(model, pattern="2:4", criterion="magnitude", schedule="linear", start_step=0,
                       end_step=2, frequency=1, optimizer=opt, module_types=["Conv1D"])
    ids = torch.randint(0, 100, (2, 8))
    for _ in range(3):
        pruner.on_step_begin()
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        pruner.on_before_optimizer_step()
        opt.step()
        pruner.on_after_optimizer_step()
    m = pruner.masks["transformer.h.1.mlp.c_proj.weight"]  # [in=128, out=32]
    assert bool(((~m).t().reshape(m.shape[1], -1, 4).sum(-1) == 2).all())
