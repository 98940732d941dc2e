"""gradnas gate position of FFN neurons (issue 14.3): ``mlp_gate="post_activation"`` (after the
activation) or ``"pre_activation"`` (the up projection's output, ModelOpt's position on BERT's
``intermediate.dense``); validated, different, and equal to a hand-computed gate gradient."""

from __future__ import annotations

import pytest
import torch

import gradprune.structured as st
from gradprune.structured.scoring import gate_statistics

transformers = pytest.importorskip("transformers")

torch.set_num_threads(1)


def _bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=24,
                                  max_position_embeddings=16, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    return transformers.BertModel(cfg).eval()


BATCH = (torch.randint(0, 40, (3, 7), generator=torch.Generator().manual_seed(1)),)


PROBE = torch.randn(16, generator=torch.Generator().manual_seed(2))


def _loss(model, batch):  # a loss that the last LayerNorm does not make constant
    return (model(batch[0]).last_hidden_state @ PROBE).pow(2).mean()


def _hand_gradient(model, module):
    """The gradient of the loss with respect to a shared all-ones gate on ``module``'s output."""
    gate = torch.ones(24, requires_grad=True)
    handle = dict(model.named_modules())[module].register_forward_hook(lambda m, a, out: out * gate)
    try:
        _loss(model, BATCH).backward()
    finally:
        handle.remove()
    return gate.grad.double()


@pytest.mark.parametrize("position, module", [("pre_activation", "encoder.layer.0.intermediate.dense"),
                                              ("post_activation", "encoder.layer.0.intermediate")])
def test_ffn_gate_gradient_is_taken_at_the_named_position(position, module):
    model = _bert()
    analysis = st.find_groups(model, BATCH, mlp_gate=position)
    (gi,) = [i for i, g in enumerate(analysis.groups) if g.name == "encoder.layer.0.intermediate.dense"]
    stats = gate_statistics(analysis, [BATCH], _loss, n_batches=1)
    torch.testing.assert_close(stats.sum_grad[gi], _hand_gradient(model, module), rtol=1e-5, atol=1e-9)


def test_the_two_positions_give_different_scores_and_heads_alike():
    model = _bert()
    pre = gate_statistics(st.find_groups(model, BATCH, mlp_gate="pre_activation"), [BATCH], _loss, n_batches=1)
    post = gate_statistics(st.find_groups(model, BATCH), [BATCH], _loss, n_batches=1)
    torch.testing.assert_close(pre.sum_sq[0], post.sum_sq[0])  # heads: the same gate
    assert not torch.allclose(pre.sum_sq[1], post.sum_sq[1], rtol=1e-2, atol=0)  # FFN neurons: GELU in between


def test_mlp_gate_is_validated_before_any_work():
    model = _bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="mlp_gate must be one of post_activation, pre_activation; got 'pre'"):
        st.search(model, {"params": "80%"}, [BATCH], _loss, "gradnas", BATCH, mlp_gate="pre")
    with pytest.raises(TypeError, match="mlp_gate must be str"):
        st.search(model, {"params": "80%"}, [BATCH], _loss, "gradnas", BATCH, mlp_gate=None)
    with pytest.raises(ValueError, match="mlp_gate"):
        st.find_groups(model, BATCH, mlp_gate="after")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_search_with_pre_activation_gates_exports_the_gated_model():
    model = _bert()
    found = st.search(model, {"params": "85%"}, [BATCH], _loss, "gradnas", BATCH,
                      rules={"nn.Linear": {"feature_divisor": 1}}, mlp_gate="pre_activation")
    assert found.analysis.mask_points.keys() >= {"encoder.layer.0.intermediate.dense"}
    small = found.export()
    with torch.no_grad(), st.Gates(found.analysis, found.keep):
        gated = model(BATCH[0]).last_hidden_state
    torch.testing.assert_close(small(BATCH[0]).last_hidden_state, gated, rtol=1e-4, atol=1e-5)
