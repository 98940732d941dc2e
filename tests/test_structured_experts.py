"""search(..., axes=("experts",)): whole MoE experts removed per layer (Mixtral, Qwen2-MoE,
Qwen3-MoE, OLMoE built tiny in code), and heads/MLP widths on the same families."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import gradprune as gp  # noqa: E402
from gradprune.structured import find_groups, load_pruned_pretrained  # noqa: E402
from gradprune.structured.experts import ExpertGates, expert_scores, find_moe_blocks  # noqa: E402

V = 64
COMMON = dict(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, num_experts_per_tok=2)


def _config(family: str):
    if family == "mixtral":
        return transformers.MixtralConfig(intermediate_size=24, num_local_experts=4, **COMMON)
    if family == "qwen2_moe":
        return transformers.Qwen2MoeConfig(intermediate_size=24, moe_intermediate_size=12,
                                           shared_expert_intermediate_size=20, num_experts=4, **COMMON)
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(intermediate_size=24, moe_intermediate_size=12, num_experts=4,
                                           head_dim=4, **COMMON)
    return transformers.OlmoeConfig(intermediate_size=12, num_experts=4, pad_token_id=0, eos_token_id=1,
                                    bos_token_id=None, **COMMON)


FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


def _model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(_config(family)).eval()


def _ids(seed: int = 1, shape=(2, 6)):
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


def loss_fn(m, b):
    return m(b, labels=b).loss


def _numel(m):
    return sum(p.numel() for p in m.parameters())


def _assert_reloads(small, ids, tmp_path):
    """``save_pretrained`` -> plain ``from_pretrained`` gives the same logits."""
    small.save_pretrained(tmp_path)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, small(ids).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_blocks_recognised_by_structure(family):
    blocks, skipped = find_moe_blocks(_model(family))
    assert [(b.name, b.n_experts, b.top_k) for b in blocks] == [
        ("model.layers.0.mlp", 4, 2), ("model.layers.1.mlp", 4, 2)]
    assert skipped == []


@pytest.mark.parametrize("family", FAMILIES)
def test_uniform_export_budget_gated_round_trip_generate(family, tmp_path):
    model, ids = _model(family), _ids()
    found = gp.search(model, {"params": "80%"}, [ids, _ids(2)], loss_fn, method="gradnas",
                      example_input=ids, axes=("experts",), uniform=True)
    small = found.export()
    assert _numel(small) == found.params <= 0.8 * found.dense_params
    kept = {len(k) for k in found.keep.values()}
    assert len(kept) == 1 and kept.pop() < 4
    k = len(found.keep["model.layers.0.mlp"])
    count_field = "num_local_experts" if family == "mixtral" else "num_experts"
    assert getattr(small.config, count_field) == k
    assert small.config.num_experts_per_tok == min(2, k)
    assert getattr(model.config, count_field) == 4  # the searched model is untouched
    with torch.no_grad():
        with found.gates():
            gated = model(ids).logits
        dense = model(ids).logits
        out = small(ids).logits
    torch.testing.assert_close(out, gated, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, dense)  # the experts really went
    assert found.report.to_dict()["loader"] == "from_pretrained"
    small.save_pretrained(tmp_path)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, out)
    gen = again.generate(ids, max_new_tokens=3, do_sample=False)
    assert gen.shape == (2, ids.shape[1] + 3)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_per_layer_counts_load_pruned_pretrained(family, tmp_path):
    model, ids = _model(family), _ids()
    # layer 0's experts matter little: drive the per-layer search with fixed scores
    found = gp.search(model, {"params": "75%"}, [ids], loss_fn, method="frequency",
                      example_input=ids, axes=("experts",))
    found.scores = {"model.layers.0.mlp": torch.tensor([0.0, 0.1, 0.2, 9.0], dtype=torch.float64),
                    "model.layers.1.mlp": torch.tensor([5.0, 6.0, 7.0, 8.0], dtype=torch.float64)}
    found.keep = {"model.layers.0.mlp": torch.tensor([3]), "model.layers.1.mlp": torch.tensor([0, 1, 2, 3])}
    small = found.export()
    assert [len(small.model.layers[i].mlp.experts.down_proj) for i in (0, 1)] == [1, 4]
    assert small.model.layers[0].mlp.gate.top_k == 1 and small.model.layers[1].mlp.gate.top_k == 2
    rep = found.report
    assert rep.to_dict()["loader"] == "load_pruned_pretrained" and "load_pruned_pretrained" in str(rep)
    with torch.no_grad():
        with found.gates():
            gated = model(ids).logits
        out = small(ids).logits
    torch.testing.assert_close(out, gated, rtol=1e-5, atol=1e-5)
    small.save_pretrained(tmp_path)
    again = load_pruned_pretrained(type(model), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, out)
    assert again.generate(ids, max_new_tokens=2, do_sample=False).shape == (2, ids.shape[1] + 2)
    # uniform=True on a per-layer result: every layer keeps the smallest count, its best experts
    uni = found.export(uniform=True)
    assert [len(uni.model.layers[i].mlp.experts.down_proj) for i in (0, 1)] == [1, 1]
    assert uni.config.num_experts_per_tok == 1


def test_per_layer_search_meets_budget_and_keeps_one_per_layer():
    model, ids = _model("qwen3_moe"), _ids()
    found = gp.search(model, {"params": "70%"}, [ids], loss_fn, method="reap", example_input=ids,
                      axes=("experts",))
    assert all(len(k) >= 1 for k in found.keep.values())
    small = found.export(uniform=False)
    assert _numel(small) == found.params <= 0.7 * found.dense_params
    # a lower-scored expert never stays while a higher-scored one of the same block goes
    for name, keep in found.keep.items():
        s = found.scores[name]
        gone = [e for e in range(4) if e not in keep.tolist()]
        if gone:
            assert float(s[gone].max()) <= float(s[keep].min())


def _capture(model, block):
    """The experts' input, routing indices and weights of ``block`` on one forward."""
    mods = dict(model.named_modules())
    seen = {}

    def hook(mod, args, out):
        seen["x"], seen["idx"], seen["w"] = args[0].detach(), args[1], args[2].detach()
    h = mods[block + ".experts"].register_forward_hook(hook)
    return seen, h


def _expert(experts, e, x):
    """Expert ``e`` on ``x``, computed here from its stacked weights (not by gradprune)."""
    gate, up = torch.nn.functional.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
    return torch.nn.functional.linear(experts.act_fn(gate) * up, experts.down_proj[e])


def test_scores_match_direct_computation():
    model, ids = _model("mixtral"), _ids(shape=(3, 7))
    block = "model.layers.1.mlp"
    experts = model.model.layers[1].mlp.experts
    blocks = find_moe_blocks(model)[0]
    seen, h = _capture(model, block)
    with torch.no_grad():
        model(ids)
    h.remove()
    x, idx, w = seen["x"], seen["idx"], seen["w"]
    tokens = x.shape[0]
    # frequency: fraction of tokens whose top-k holds the expert
    freq, n = expert_scores(model, blocks, [ids], loss_fn, "frequency")
    want = torch.tensor([float((idx == e).any(-1).sum()) / tokens for e in range(4)], dtype=torch.float64)
    torch.testing.assert_close(freq[block], want)
    # reap: mean over routed tokens of router weight x ||expert output||
    reap, _ = expert_scores(model, blocks, [ids], loss_fn, "reap")
    with torch.no_grad():
        want = []
        for e in range(4):
            t, j = torch.where(idx == e)
            v = w[t, j].double() * _expert(experts, e, x[t]).double().norm(dim=-1)
            want.append(float(v.mean()) if len(t) else 0.0)
    torch.testing.assert_close(reap[block], torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-7)
    # gradnas: (dL/dg_e)^2 with dL/dg_e = sum over routed tokens of w <dL/dy, E_e(x)>
    grads, _ = expert_scores(model, blocks, [ids], loss_fn, "gradnas")
    ref = copy.deepcopy(model)
    out = {}
    ref_experts = ref.model.layers[1].mlp.experts

    def keep_grad(mod, args, y):
        y.retain_grad()
        out["y"] = y
    h = ref_experts.register_forward_hook(keep_grad)
    for p in ref.parameters():  # the reference needs a graph; gradprune's scoring does not
        p.requires_grad_(True)
    loss_fn(ref, ids).backward()
    h.remove()
    dy = out["y"].grad
    with torch.no_grad():
        want = []
        for e in range(4):
            t, j = torch.where(idx == e)
            g = (w[t, j, None] * _expert(ref_experts, e, x[t]) * dy[t]).sum()
            want.append(float(g) ** 2)
    torch.testing.assert_close(grads[block], torch.tensor(want, dtype=torch.float64), rtol=1e-4, atol=1e-12)


def test_scoring_gives_weights_no_gradients():
    model, ids = _model("olmoe"), _ids()
    model.train()
    flags = [p.requires_grad for p in model.parameters()]
    for method in ("gradnas", "reap", "frequency"):
        expert_scores(model, find_moe_blocks(model)[0], [ids], loss_fn, method)
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == flags and model.training


def test_gated_model_is_softmax_over_remaining_experts():
    """The removed experts' logits are -inf: the kept experts' routing weights are a softmax over
    the kept experts alone (not the dense softmax with some outputs zeroed)."""
    model, ids = _model("qwen3_moe"), _ids()  # norm_topk_prob=False: raw softmax weights
    assert model.config.norm_topk_prob is False
    blocks = find_moe_blocks(model)[0]
    block = blocks[0].name
    keep = torch.tensor([0, 2, 3])
    logits = {}
    def grab(mod, args, out):
        logits["l"] = out[0]
    h = model.model.layers[0].mlp.gate.register_forward_hook(grab)
    got = {}
    with torch.no_grad(), ExpertGates(model, blocks, keep={block: keep},
                                      record=lambda b, i, w: got.setdefault(b, (i, w))):
        model(ids)
    h.remove()
    idx, w = got[block]
    probs = torch.softmax(logits["l"][:, keep].float(), dim=-1)
    want_w, want_i = torch.topk(probs, 2, dim=-1)
    assert torch.equal(idx, keep[want_i])
    torch.testing.assert_close(w, want_w.to(w.dtype))


def test_unreachable_budget_and_bad_input_fail_before_scoring():
    model, ids = _model("mixtral"), _ids()

    def never(*a):
        raise AssertionError("scored before validating")
    with pytest.raises(ValueError, match=r"smallest reachable .*one expert kept.*params="):
        gp.search(model, {"params": "10%"}, [ids], never, example_input=ids, axes=("experts",))
    with pytest.raises(ValueError, match=r"smallest reachable .*flops="):
        gp.search(model, {"flops": "50%"}, [ids], never, example_input=ids, axes=("experts",))
    with pytest.raises(ValueError, match=r"constraints\['kv_cache'\].*params, flops"):
        gp.search(model, {"kv_cache": "50%"}, [ids], never, example_input=ids, axes=("experts",))
    with pytest.raises(ValueError, match="method"):
        gp.search(model, {"params": "90%"}, [ids], never, method="taylor", example_input=ids,
                  axes=("experts",))
    with pytest.raises(ValueError, match=r"smallest reachable.*one expert kept"):
        gp.search(model, {"params": "10%"}, [ids], never, example_input=ids, axes=("heads", "experts"))
    dense = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V, hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ValueError, match="no MoE block"):
        gp.search(dense, {"params": "90%"}, [ids], never, example_input=ids, axes=("experts",))


def test_heads_on_moe_families_uniform_round_trip(tmp_path):
    model, ids = _model("mixtral"), _ids()
    found = gp.search(model, {"params": "97%"}, [ids], loss_fn, example_input=ids, axes=("heads",),
                      uniform=True)
    small = found.export()
    assert small.config.num_attention_heads < 4 and _numel(small) == found.params
    with torch.no_grad():
        with found.gates():
            gated = model(ids).logits
        torch.testing.assert_close(small(ids).logits, gated, rtol=1e-5, atol=1e-5)
    _assert_reloads(small, ids, tmp_path)


def test_olmoe_heads_normalised_together_are_skipped_not_broken():
    model, ids = _model("olmoe"), _ids()
    analysis = find_groups(model, ids)
    assert not any(g.unit == "heads" for g in analysis.groups)
    reasons = [s["reason"] for s in analysis.skipped if s["module"].endswith("self_attn")]
    assert len(reasons) == 2 and all("q_norm" in r and "across all heads" in r for r in reasons)


def test_qwen2_moe_shared_expert_width_uses_its_own_config_field(tmp_path):
    model, ids = _model("qwen2_moe"), _ids()
    rules = {"nn.Linear": {"feature_divisor": 4}}
    found = gp.search(model, {"params": "95%"}, [ids], loss_fn, example_input=ids, axes=("mlp",),
                      uniform=True, rules=rules)
    small = found.export()
    shared = small.model.layers[0].mlp.shared_expert.up_proj.out_features
    assert shared < 20 and small.config.shared_expert_intermediate_size == shared
    assert small.config.intermediate_size == 24
    _assert_reloads(small, ids, tmp_path)


@pytest.mark.parametrize("uniform", [True, False])
def test_experts_with_width_axes(uniform, tmp_path):
    model, ids = _model("qwen2_moe"), _ids()
    rules = {"nn.Linear": {"feature_divisor": 4}}
    found = gp.search(model, {"params": "70%"}, [ids], loss_fn, example_input=ids,
                      axes=("heads", "mlp", "experts"), uniform=uniform, rules=rules)
    assert set(found.dropped_experts) == {"model.layers.0.mlp", "model.layers.1.mlp"}
    assert "MoE experts dropped" in str(found.report)
    small = found.export()
    assert _numel(small) == found.params <= 0.7 * found.dense_params
    assert found.dense_params == _numel(model)
    small.save_pretrained(tmp_path)
    again = (transformers.AutoModelForCausalLM.from_pretrained(tmp_path) if uniform
             else load_pruned_pretrained(type(model), tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, small(ids).logits)
    with pytest.raises(ValueError, match="gradnas"):
        gp.search(model, {"params": "70%"}, [ids], loss_fn, method="reap", example_input=ids,
                  axes=("mlp", "experts"))


def test_expert_neurons_are_mlp_groups():
    model, ids = _model("mixtral"), _ids()
    analysis = find_groups(model, ids)
    groups = {g.name: g for g in analysis.groups}
    for i in (0, 1):
        g = groups[f"model.layers.{i}.mlp.experts"]
        assert (g.size, g.balance, g.unit, g.kind) == (4 * 24, 4 * 4, "channels", "mixtral.experts_ffn")
    assert not any("experts" in s["module"] for s in analysis.skipped)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("uniform", [True, False])
def test_expert_neurons_mlp_axis(family, uniform, tmp_path):
    from gradprune.structured.flops import count_flops
    model, ids = _model(family), _ids()
    found = gp.search(model, {"params": "75%"}, [ids], loss_fn, example_input=ids, axes=("mlp",),
                      uniform=uniform, rules={"nn.Linear": {"feature_divisor": 4}})
    cut = [gi for gi, g in enumerate(found.groups) if g.kind.endswith("experts_ffn")
           and found.widths[gi] < g.size]
    assert cut, "the experts' neurons carry most MLP parameters: some must go"
    small = found.export()
    assert _numel(small) == found.params <= 0.75 * found.dense_params
    assert count_flops(small, ids) == found.flops
    for i in (0, 1):
        experts = small.model.layers[i].mlp.experts
        assert experts.down_proj.shape[2] == experts.intermediate_dim == experts.gate_up_proj.shape[1] // 2
        assert experts.intermediate_dim % 4 == 0  # 16-byte strides of the grouped matmul (fp32)
    with torch.no_grad():
        with found.gates():
            gated = model(ids).logits
        torch.testing.assert_close(small(ids).logits, gated, rtol=1e-5, atol=1e-5)
    small.save_pretrained(tmp_path)
    again = (transformers.AutoModelForCausalLM.from_pretrained(tmp_path) if uniform
             else load_pruned_pretrained(type(model), tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, small(ids).logits)
    if uniform:
        field = "intermediate_size" if family in ("mixtral", "olmoe") else "moe_intermediate_size"
        assert getattr(again.config, field) == again.model.layers[0].mlp.experts.intermediate_dim


def test_expert_neurons_magnitude_save_pruned_and_per_sample_refused(tmp_path):
    model, ids = _model("qwen3_moe"), _ids()
    found = gp.search(model, {"params": "80%"}, None, None, method="magnitude", example_input=ids,
                      axes=("mlp",), rules={"nn.Linear": {"feature_divisor": 4}})
    small = found.export()
    gp.save_pruned(small, tmp_path)
    again = gp.load_pruned(lambda: _model("qwen3_moe", seed=3), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, small(ids).logits)

    def never(*a):
        raise AssertionError("scored before validating")
    for kw in (dict(per_sample=True), dict(method="michel")):
        with pytest.raises(ValueError, match="per-sample"):
            gp.search(model, {"params": "80%"}, [ids], never, example_input=ids, axes=("mlp",), **kw)
    # heads alone never touch the experts: per-sample scores stay available
    gp.search(model, {"params": "99%"}, [ids], loss_fn, example_input=ids, axes=("heads",),
              per_sample=True)


def test_bf16_scores_and_export():
    config = _config("mixtral")
    config.intermediate_size = 16  # bf16 grouped_mm on CPU needs 16-byte strides
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).eval()
    ids = _ids()
    for method in ("gradnas", "reap", "frequency"):
        found = gp.search(model, {"params": "80%"}, [ids], loss_fn, method=method, example_input=ids,
                          axes=("experts",), uniform=True)
        assert all(torch.isfinite(s).all() for s in found.scores.values())
        small = found.export()
        assert small.dtype == torch.bfloat16 and _numel(small) == found.params
        with torch.no_grad():
            with found.gates():
                gated = model(ids).logits
            torch.testing.assert_close(small(ids).logits, gated)


def test_qwen2_moe_with_dense_layers_round_trip(tmp_path):
    config = transformers.Qwen2MoeConfig(intermediate_size=24, moe_intermediate_size=12,
                                         shared_expert_intermediate_size=20, num_experts=4,
                                         mlp_only_layers=[0], **{**COMMON, "num_hidden_layers": 3})
    torch.manual_seed(0)
    model, ids = transformers.AutoModelForCausalLM.from_config(config).eval(), _ids()
    found = gp.search(model, {"params": "85%"}, [ids], loss_fn, example_input=ids, axes=("experts",),
                      uniform=True)
    assert list(found.keep) == ["model.layers.1.mlp", "model.layers.2.mlp"]  # layer 0 is dense
    small = found.export()
    _assert_reloads(small, ids, tmp_path)


def test_blocks_not_understood_are_listed_and_left_whole():
    model, ids = _model("qwen3_moe"), _ids()
    router = model.model.layers[1].mlp.gate

    def sigmoid_routing(hidden):  # another routing rule: the softmax -> top-k check must catch it
        logits = torch.nn.functional.linear(hidden.reshape(-1, router.hidden_dim), router.weight)
        w, i = torch.topk(torch.sigmoid(logits), router.top_k, dim=-1)
        return logits, w, i
    router.forward = sigmoid_routing
    found = gp.search(model, {"params": "90%"}, [ids], loss_fn, example_input=ids, axes=("experts",))
    assert list(found.keep) == ["model.layers.0.mlp"]
    assert any(s["module"] == "model.layers.1.mlp" and "softmax" in s["reason"] for s in found.skipped)
    small = found.export()
    assert small.model.layers[1].mlp.experts.down_proj.shape[0] == 4  # left whole

    class OldMoE(torch.nn.Module):  # transformers 4.x: a Linear router and a ModuleList of experts
        def __init__(self):
            super().__init__()
            self.gate = torch.nn.Linear(8, 3, bias=False)
            self.experts = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(3))
    blocks, skipped = find_moe_blocks(torch.nn.Sequential(OldMoE()))
    assert blocks == [] and "ModuleList" in skipped[0]["reason"]


def test_flops_count_the_experts_grouped_matmuls():
    from gradprune.structured.flops import count_flops
    model, ids = _model("mixtral"), _ids()
    grouped = count_flops(model, ids)
    model.config._experts_implementation = "eager"  # one mm per expert: counted by torch itself
    try:
        eager = count_flops(model, ids)
    finally:
        model.config._experts_implementation = "grouped_mm"
    tokens, h, i = ids.numel(), 16, 24
    experts = 2 * tokens * 2 * (h * 2 * i + i * h)  # top-2 routed tokens x (gate_up + down)
    assert grouped == eager and grouped > experts * 2  # two MoE layers, plus attention


def test_experts_with_widths_flops_bound():
    model, ids = _model("mixtral"), _ids()
    found = gp.search(model, {"flops": "90%"}, [ids], loss_fn, example_input=ids,
                      axes=("heads", "experts"), uniform=True)
    from gradprune.structured.flops import count_flops
    small = found.export()
    assert count_flops(small, ids) <= 0.9 * found.dense_flops == 0.9 * count_flops(model, ids)


@pytest.mark.parametrize("uniform", [True, False])
def test_flops_bound_on_experts_alone(uniform):
    from gradprune.structured.flops import count_flops
    model, ids = _model("qwen3_moe"), _ids()
    found = gp.search(model, {"flops": "80%", "params": "90%"}, [ids], loss_fn, method="frequency",
                      example_input=ids, axes=("experts",), uniform=uniform)
    small = found.export()
    # counted, not estimated: the export's measured FLOPs and params are the result's
    assert count_flops(small, ids) == found.flops <= 0.8 * found.dense_flops
    assert _numel(small) == found.params <= 0.9 * found.dense_params
    assert "flops:" in str(found.report)
    assert min(len(k) for k in found.keep.values()) < 2  # only top-k below 2 saves expert FLOPs
    with pytest.raises(ValueError, match=r"smallest reachable.*flops="):
        gp.search(model, {"flops": "20%"}, [ids], loss_fn, example_input=ids, axes=("experts",))


def test_save_pruned_load_pruned_per_layer_counts(tmp_path):
    model, ids = _model("olmoe"), _ids()
    found = gp.search(model, {"params": "75%"}, [ids], loss_fn, method="reap", example_input=ids,
                      axes=("experts",))
    small = found.export()
    gp.save_pruned(small, tmp_path)
    again = gp.load_pruned(lambda: _model("olmoe", seed=5), tmp_path)
    for i in (0, 1):
        kept = len(found.keep[f"model.layers.{i}.mlp"])
        assert again.model.layers[i].mlp.experts.num_experts == kept
        assert again.model.layers[i].mlp.gate.top_k == min(2, kept)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, small(ids).logits)


@pytest.mark.parametrize("axes", [("layers", "experts"), ("layers", "heads", "experts")])
def test_layers_with_experts(axes, tmp_path):
    config = _config("mixtral")
    config.num_hidden_layers = 3
    torch.manual_seed(0)
    model, ids = transformers.AutoModelForCausalLM.from_config(config).eval(), _ids()
    found = gp.search(model, {"params": "55%"}, [ids], loss_fn, example_input=ids, axes=axes,
                      uniform=True)
    assert "decoder layers dropped" in str(found.report)
    small = found.export()
    assert _numel(small) == found.params <= 0.55 * found.dense_params == 0.55 * _numel(model)
    assert small.config.num_hidden_layers == 3 - len(found.dropped_layers)
    assert small.config.num_local_experts < 4
    _assert_reloads(small, ids, tmp_path)
