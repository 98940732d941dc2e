"""Every combination of ``axes`` (issue 16): the issue's call, ``axes=("heads", "mlp", "hidden",
"layers", "experts")`` with ``uniform=True``, on every decoder family built tiny in code (dense:
``"experts"`` is reported as having no MoE blocks; MoE: the hidden size through the routers and
stacked experts), and every combination of the five axes on Mixtral, per-layer widths. Checked:
budgets met and counted exactly (params, measured FLOPs, KV cache), the export equal to the gated
model of the search, config fields consistent (plain ``from_pretrained`` rebuilds exactly the
exported weights), ``generate()``, tied embeddings still tied; bad input refused before any
scoring."""

from __future__ import annotations

import itertools

import pytest
import torch

transformers = pytest.importorskip("transformers")

import gradprune as gp  # noqa: E402
from gradprune.structured import count_flops, load_pruned_pretrained  # noqa: E402
from gradprune.structured.hidden import residual_map  # noqa: E402
from test_structured_experts import FAMILIES as MOE_FAMILIES  # noqa: E402
from test_structured_experts import _ids, _model as moe_model  # noqa: E402
from test_structured_hidden import FAMILIES as DENSE_FAMILIES  # noqa: E402
from test_structured_hidden import _batches, _model as dense_model  # noqa: E402

torch.set_num_threads(1)

ALL = ("heads", "mlp", "hidden", "layers", "experts")


def loss_fn(m, b):
    return m(b, labels=b).loss


def _numel(m) -> int:
    return sum(p.numel() for p in m.parameters())


def _tied(m) -> bool:
    return m.get_output_embeddings().weight is m.get_input_embeddings().weight


def _kv_per_token(m) -> int:
    """Key/value-cache bytes per token of a Hugging Face decoder, from its modules' shapes."""
    total = 0
    for mod in m.modules():
        for name in ("k_proj", "v_proj"):
            proj = getattr(mod, name, None)
            if isinstance(proj, torch.nn.Linear):
                total += proj.out_features * proj.weight.element_size()
    return total


def _check_export(model, found, data, tmp_path, *, uniform: bool):
    """The export: counts as the result says, equal to the gated model, reloaded exactly
    (plain ``from_pretrained`` under uniform widths), ``generate()`` works."""
    ids = data[0]
    small = found.export()
    assert _numel(small) == found.params <= found.constraints["params"]
    assert found.dense_params == _numel(model) and found.dense_flops == count_flops(model, ids)
    assert count_flops(small, ids) == found.flops
    if "flops" in found.constraints:
        assert found.flops <= found.constraints["flops"]
    with torch.no_grad():
        with found.gates():  # the copy pruned on layers / hidden / experts, its widths gated
            gated = found.analysis.model(ids).logits
        torch.testing.assert_close(small(ids).logits, gated, rtol=1e-4, atol=1e-5)
    cfg = small.config
    assert cfg.hidden_size == small.get_input_embeddings().embedding_dim
    dropped = getattr(found, "dropped_layers", [])
    assert cfg.num_hidden_layers == len(small.model.layers) == model.config.num_hidden_layers - len(dropped)
    if getattr(cfg, "layer_types", None) is not None:
        kept = [i for i in range(model.config.num_hidden_layers) if i not in dropped]
        assert list(cfg.layer_types) == [model.config.layer_types[i] for i in kept]
    if _tied(model):
        assert _tied(small)
    small.save_pretrained(tmp_path)
    if uniform:
        again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    else:
        again = load_pruned_pretrained(type(small), tmp_path).eval()
    state, want = again.state_dict(), small.state_dict()
    assert state.keys() == want.keys()
    for k in want:  # built from the saved config alone: every shape (and weight) as exported
        assert torch.equal(state[k], want[k]), k
    out = again.generate(ids[:1], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, ids.shape[1] + 3)
    return small


@pytest.mark.parametrize("family", list(DENSE_FAMILIES))
def test_all_axes_on_dense_families(family, tmp_path):
    model, data = dense_model(family), _batches()
    found = gp.search(model, {"params": "50%"}, data, loss_fn, method="gradnas", example_input=data[0],
                      axes=ALL, uniform=True, hidden_divisor=8)
    assert found.axes_skipped == {"experts": "no MoE blocks (nothing to remove on this axis)"}
    text = str(found.report)
    assert "experts: no MoE blocks" in text and "decoder layers dropped" in text and "hidden_size:" in text
    small = _check_export(model, found, data, tmp_path, uniform=True)
    assert small.config.hidden_size == found.hidden_size


@pytest.mark.parametrize("family", ["llama-tied", "mixtral"])
def test_the_issue_call_verbatim(family, tmp_path):
    """No ``hidden_divisor``: the default (the largest power of two up to 64 dividing the hidden
    size) leaves these tiny models one hidden size, the dense one."""
    model, data = (dense_model(family), _batches()) if family in DENSE_FAMILIES else (moe_model(family), [_ids()])
    ids = data[0]
    found = gp.search(model, {"params": "50%"}, data, loss_fn, method="gradnas",
                      example_input=ids, axes=("heads", "mlp", "hidden", "layers", "experts"),
                      uniform=True)
    small = found.export()              # an ordinary transformers model
    assert isinstance(small, type(model))
    assert found.hidden_size == found.dense_hidden_size == model.config.hidden_size
    _check_export(model, found, data, tmp_path, uniform=True)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_all_axes_on_moe_families(family, tmp_path):
    model, ids = moe_model(family), _ids()
    found = gp.search(model, {"params": "50%"}, [ids], loss_fn, method="gradnas", example_input=ids,
                      axes=ALL, uniform=True, hidden_divisor=4)
    assert found.axes_skipped.keys() <= {"hidden"}
    small = _check_export(model, found, [ids], tmp_path, uniform=True)
    count = next(getattr(small.config, f) for f in ("num_local_experts", "num_experts")
                 if hasattr(small.config, f))
    kept = {len(small.get_submodule(f"{b}.experts").gate_up_proj) for b in found.dropped_experts}
    assert kept == {count} and small.config.num_experts_per_tok == min(2, count)
    assert count == 4 - len(next(iter(found.dropped_experts.values())))
    if family == "olmoe":  # q_norm over every head: its width is the hidden size (left unpruned)
        assert "cannot express hidden_size" in found.axes_skipped["hidden"]
    else:
        assert small.config.hidden_size == found.hidden_size


COMBINATIONS = [c for n in range(2, 6) for c in itertools.combinations(ALL, n)
                if set(c) & {"hidden", "layers", "experts"}]


@pytest.mark.parametrize("axes", COMBINATIONS, ids=["+".join(c) for c in COMBINATIONS])
def test_every_combination_per_layer_widths(axes, tmp_path):
    model, ids = moe_model("mixtral"), _ids()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    found = gp.search(model, {"params": "60%"}, [ids], loss_fn, example_input=ids, axes=axes,
                      hidden_divisor=8 if "hidden" in axes else None)
    assert found.axes == axes and found.axes_skipped == {}
    _check_export(model, found, [ids], tmp_path, uniform=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the user's model
    # only the searched axes are pruned
    small = found.export()
    if "hidden" not in axes:
        assert small.config.hidden_size == 16
    if "layers" not in axes:
        assert not hasattr(found, "dropped_layers") and small.config.num_hidden_layers == 2
    if "experts" not in axes:
        assert all(len(small.get_submodule(f"model.layers.{i}.mlp.experts").gate_up_proj) == 4
                   for i in range(small.config.num_hidden_layers))
    for axis in ("heads", "mlp"):
        if axis not in axes:
            assert all(found.widths[gi] == g.size for gi, g in enumerate(found.groups)
                       if (g.unit == "heads") == (axis == "heads"))


def test_several_budgets_at_once_kv_cache_counted():
    model, data = dense_model("llama"), _batches()
    found = gp.search(model, {"params": "60%", "flops": "60%", "kv_cache": "50%"}, data, loss_fn,
                      example_input=data[0], axes=ALL, uniform=True, hidden_divisor=8)
    small = found.export()
    assert _kv_per_token(small) == found.kv_cache <= 0.5 * found.dense_kv_cache
    assert found.dense_kv_cache == _kv_per_token(model) and found.flops <= 0.6 * found.dense_flops
    assert "kv_cache:" in str(found.report)


def test_moe_hidden_size_alone_equals_the_gated_model(tmp_path):
    """The hidden axis through the routers ([E, hidden]) and stacked experts of MoE blocks."""
    model, ids = moe_model("qwen2_moe"), _ids()
    rmap = residual_map(model)
    assert rmap.stacked["model.layers.0.mlp.experts.gate_up_proj"] == 2
    assert rmap.stacked["model.layers.0.mlp.experts.down_proj"] == 1
    assert "model.layers.0.mlp.shared_expert_gate" in rmap.readers
    found = gp.search(model, {"params": "75%"}, [ids], loss_fn, example_input=ids, axes=("hidden",),
                      hidden_divisor=4)
    small = found.export()
    assert small.config.hidden_size == found.hidden_size < 16
    assert _numel(small) == found.params <= 0.75 * found.dense_params
    assert count_flops(small, ids) == found.flops
    with torch.no_grad():
        with found.gates():
            gated = model(ids).logits
        torch.testing.assert_close(small(ids).logits, gated, rtol=1e-4, atol=1e-5)


def test_combination_errors_before_scoring():
    model, data = dense_model("llama"), _batches()

    def never(*a):
        raise AssertionError("scored before the input was checked")
    for kw, words in [
        (dict(method="taylor"), ["method='taylor'", "gradnas"]),
        (dict(constraints={"decode_latency": "150%"}), ["decode_latency", "percentage in (0%, 100%]"]),
        (dict(constraints={"params": "3%"}), ["smallest reachable", "one of 2 decoder layers kept"]),
        (dict(hidden_divisor=64), ["hidden_divisor=64", "larger than hidden_size 32"]),
    ]:
        args = dict(constraints={"params": "50%"}, method="gradnas")
        args.update(kw)
        constraints = args.pop("constraints")
        with pytest.raises(ValueError) as info:
            gp.search(model, constraints, data, never, example_input=data[0], axes=ALL, **args)
        for w in words:
            assert w in str(info.value), (kw, str(info.value))
