"""Tests for ``gradprune.targets.find_targets``: defaults, globs, module types, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradprune.targets import Target, find_targets


class Zoo(nn.Module):
    """Embedding, norms, convs, a nested block and a classifier, registered in this order."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.conv1d = nn.Conv1d(4, 4, 3)
        self.block = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 8))
        self.gn = nn.GroupNorm(2, 8)
        self.head = nn.Linear(8, 3)


def test_defaults_on_the_conftest_models(mlp, cnn, transformer):
    assert list(find_targets(mlp.build())) == ["0.weight", "2.weight"]
    assert list(find_targets(cnn.build())) == ["0.weight", "2.weight", "6.weight"]
    assert list(find_targets(transformer.build())) == [
        "enc.self_attn.in_proj_weight", "enc.self_attn.out_proj.weight",
        "enc.linear1.weight", "enc.linear2.weight"]


def test_defaults_weights_only_no_biases_norms_embeddings_or_classifier():
    model = Zoo()
    got = find_targets(model)
    assert list(got) == ["conv.weight", "conv1d.weight", "block.0.weight", "block.3.weight"]
    assert all(not n.endswith("bias") for n in got)
    with_head = find_targets(model, include_classifier=True)
    assert list(with_head) == list(got) + ["head.weight"]
    # embeddings and norms are never picked by default, even when asked for everything by glob
    everything = find_targets(model, include=["*"], include_classifier=True)
    assert not {"emb.weight", "bn.weight", "block.1.weight", "gn.weight"} & set(everything)


def test_target_objects():
    model = Zoo()
    t = find_targets(model)["block.0.weight"]
    assert isinstance(t, Target)
    assert t.param is model.block[0].weight and t.module is model.block[0]
    assert t.module_type == "Linear" and t.shape == torch.Size([16, 8])
    assert "block.0.weight" in repr(t)
    c = find_targets(model)["conv.weight"]
    assert c.module_type == "Conv2d" and c.param is model.conv.weight


def test_classifier_is_the_last_linear_in_registration_order():
    class HeadFirst(nn.Module):  # registered first, but the last Linear is "late"
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 2)
            self.body = nn.Linear(4, 4)
            self.late = nn.Linear(4, 4)

    assert list(find_targets(HeadFirst())) == ["head.weight", "body.weight"]


def test_include_globs():
    model = Zoo()
    assert list(find_targets(model, include=["block.*"])) == ["block.0.weight", "block.3.weight"]
    assert list(find_targets(model, include="conv*.weight")) == ["conv.weight", "conv1d.weight"]
    assert list(find_targets(model, include=["conv.weight", "block.3.*"])) == [
        "conv.weight", "block.3.weight"]
    # naming the classifier explicitly includes it
    assert list(find_targets(model, include=["head.weight"])) == ["head.weight"]
    # globs are case-sensitive fnmatch on the qualified name
    with pytest.raises(ValueError):
        find_targets(model, include=["BLOCK.*"])


def test_exclude_globs():
    model = Zoo()
    assert list(find_targets(model, exclude=["block.*"])) == ["conv.weight", "conv1d.weight"]
    assert list(find_targets(model, exclude="conv*")) == ["block.0.weight", "block.3.weight"]
    # exclude wins over include
    assert list(find_targets(model, include=["block.*"], exclude=["*.3.*"])) == ["block.0.weight"]
    assert list(find_targets(model, include=["head.weight", "conv.weight"],
                             exclude=["head.*"])) == ["conv.weight"]


def test_module_types():
    model = Zoo()
    assert list(find_targets(model, module_types=["Conv2d"])) == ["conv.weight"]
    assert list(find_targets(model, module_types=("Conv1d", "Conv2d"))) == [
        "conv.weight", "conv1d.weight"]
    assert list(find_targets(model, module_types=["Linear"])) == ["block.0.weight", "block.3.weight"]
    assert list(find_targets(model, module_types=["Linear"], include_classifier=True)) == [
        "block.0.weight", "block.3.weight", "head.weight"]
    # other types can be asked for explicitly
    assert list(find_targets(model, module_types=["Embedding"])) == ["emb.weight"]


def test_module_types_match_subclasses():
    class MyLinear(nn.Linear):
        pass

    model = nn.Sequential(MyLinear(4, 8), nn.ReLU(), MyLinear(8, 8), nn.Linear(8, 2))
    got = find_targets(model)
    assert list(got) == ["0.weight", "2.weight"]
    assert got["0.weight"].module_type == "Linear"


def test_multihead_attention():
    class Attn(nn.Module):
        def __init__(self, **kw):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, **kw)
            self.head = nn.Linear(8, 2)

    got = find_targets(Attn())
    assert list(got) == ["attn.in_proj_weight", "attn.out_proj.weight"]
    assert got["attn.in_proj_weight"].shape == torch.Size([24, 8])
    assert got["attn.in_proj_weight"].module_type == "MultiheadAttention"
    # separate q/k/v projections when kdim/vdim differ from embed_dim
    sep = find_targets(Attn(kdim=4, vdim=6))
    assert list(sep) == ["attn.q_proj_weight", "attn.k_proj_weight", "attn.v_proj_weight",
                         "attn.out_proj.weight"]
    assert sep["attn.k_proj_weight"].shape == torch.Size([8, 4])
    assert list(find_targets(Attn(), module_types=["MultiheadAttention"])) == ["attn.in_proj_weight"]


def test_tied_weights_are_listed_once():
    a, b = nn.Linear(8, 8), nn.Linear(8, 8)
    b.weight = a.weight
    model = nn.Sequential(a, nn.ReLU(), b, nn.ReLU(), nn.Linear(8, 2))
    assert list(find_targets(model)) == ["0.weight"]


def test_single_linear_model():
    # the only candidate is pruned (there is no separate classifier to protect)
    assert list(find_targets(nn.Linear(4, 4))) == ["weight"]


@pytest.mark.parametrize("model, kw", [
    (nn.Sequential(), {}),
    (nn.Sequential(nn.Embedding(5, 4), nn.LayerNorm(4)), {}),
    (Zoo(), dict(exclude=["*"])),
    (Zoo(), dict(include=["nothing.*"])),
    (Zoo(), dict(module_types=["Conv3d"])),
    (nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), dict(exclude=["0.*"])),
])
def test_nothing_to_prune_names_the_filters(model, kw):
    with pytest.raises(ValueError) as exc:
        find_targets(model, **kw)
    msg = str(exc.value)
    assert "no prunable parameters" in msg and type(model).__name__ in msg
    for f in ("include=", "exclude=", "module_types=", "include_classifier="):
        assert f in msg
    for v in kw.values():
        assert repr(v) in msg


def test_argument_types():
    model = Zoo()
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got dict"):
        find_targets({})
    with pytest.raises(TypeError, match="include must be a list of str, got int"):
        find_targets(model, include=3)
    with pytest.raises(TypeError, match="exclude must be a list of str, got an item of type int"):
        find_targets(model, exclude=["a", 1])
    with pytest.raises(TypeError, match="module_types"):
        find_targets(model, module_types=None)
    with pytest.raises(TypeError, match="include_classifier must be bool, got str"):
        find_targets(model, include_classifier="yes")
