"""One-shot LLM sparsity: wanda / sparsegpt / gblm / ria, sequential calibration, OWL allocation."""
from __future__ import annotations

import copy

import pytest
import torch

import gradprune as gp
from conftest import round_half_up

transformers = pytest.importorskip("transformers")

LLM_CRITERIA = [c for c in gp.list_criteria()
                if getattr(gp.scores.criterion_class(c), "reads_inputs", False)]


def tiny_llama(layers=2, seed=0):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def calib(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (2, 16), generator=g) for _ in range(n)]


def loss_fn(model, batch):
    return model(input_ids=batch, labels=batch).loss


def weights(model):
    return {n: p for n, p in gp.find_targets(model).items()}


def test_registry_lists_the_llm_criteria():
    assert {"wanda", "sparsegpt", "gblm", "ria"} <= set(LLM_CRITERIA)


# -- contract: every input-reading criterion x pattern x sequential: exact counts, structure -------

PATTERNS = {"1x1": 0.3, "4x1": 0.3, "1x4": 0.55, "2:4": 0.5, "4:8": 0.5}


@pytest.mark.parametrize("sequential", [False, True], ids=["dense-inputs", "sequential"])
@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("criterion", LLM_CRITERIA)
def test_exact_counts_structure_and_zeros(criterion, pattern, sequential):
    model = tiny_llama()
    s = PATTERNS[pattern]
    res = gp.prune(model, sparsity=s, criterion=criterion, pattern=pattern, data=calib(), loss_fn=loss_fn,
                   sequential=sequential)
    assert res.details["weights_changed"] is (criterion == "sparsegpt")
    for name, t in weights(model).items():
        m = res.masks[name]
        w = t.param.detach()
        assert (w[~m] == 0).all(), name
        out, inp = m.shape
        if ":" in pattern:
            n, mm = map(int, pattern.split(":"))
            groups = (~m).reshape(out, inp // mm, mm).sum(-1)
            assert (groups == mm - n).all(), name
            continue
        rows, cols = map(int, pattern.split("x"))
        blocks = m.reshape(out // rows, rows, inp // cols, cols)
        assert (blocks == blocks[:, :1, :, :1]).all(), f"{name}: not whole {pattern} blocks"
        units = (out // rows) * (inp // cols)
        assert int((~blocks[:, 0, :, 0]).sum()) == round_half_up(s * units), name
        comparison = getattr(gp.get_criterion(criterion, {"w": t.param}), "comparison", "layer")
        if comparison == "row":  # every row of the unit grid prunes k // R or k // R + 1
            per_row = (~blocks[:, 0, :, 0]).sum(1)
            assert int(per_row.max() - per_row.min()) <= 1, name


@pytest.mark.parametrize("criterion", LLM_CRITERIA)
def test_deterministic(criterion):
    runs = []
    for _ in range(2):
        model = tiny_llama()
        res = gp.prune(model, sparsity=0.5, criterion=criterion, data=calib(), loss_fn=loss_fn, sequential=True)
        runs.append(res.masks.state_dict())
    for k in runs[0]:
        assert torch.equal(runs[0][k], runs[1][k]), k


# -- wanda is the formula ------------------------------------------------------------------------

def dense_inputs(model, names, data):
    """``{param name: [tokens, in]}`` of every calibration token, by our own hooks."""
    xs, handles = {n: [] for n in names}, []
    for n in names:
        mod = model.get_submodule(n.rsplit(".", 1)[0])
        handles.append(mod.register_forward_pre_hook(lambda m, a, n=n: xs[n].append(a[0].reshape(-1, a[0].shape[-1]))))
    with torch.no_grad():
        for b in data:
            loss_fn(model, b)
    for h in handles:
        h.remove()
    return {n: torch.cat(v) for n, v in xs.items()}


def test_wanda_equals_the_formula_per_output_row():
    model = tiny_llama()
    dense = copy.deepcopy(model)
    names = list(weights(model))
    xs = dense_inputs(dense, names, calib())
    res = gp.prune(model, sparsity=0.5, criterion="wanda", data=calib(), loss_fn=loss_fn)
    for n in names:
        w = dense.get_parameter(n).detach()
        score = w.abs() * xs[n].pow(2).sum(0).sqrt()        # |W_ij| * ||X_j||_2, not squared
        k = w.shape[1] // 2                                    # every row prunes half (even width)
        expected = torch.ones_like(w, dtype=torch.bool)
        expected.scatter_(1, score.argsort(dim=1, stable=True)[:, :k], False)
        assert torch.equal(res.masks[n], expected), n
    crit = gp.get_criterion("wanda", {names[0]: dense.get_parameter(names[0])})
    crit.add_inputs(names[0], xs[names[0]])
    w0 = dense.get_parameter(names[0]).detach()
    torch.testing.assert_close(crit.scores[names[0]], w0.abs() * xs[names[0]].norm(dim=0))


def test_input_criterion_without_inputs_says_how_to_feed_it():
    w = torch.nn.Parameter(torch.ones(2, 2))
    with pytest.raises(ValueError, match="reads layer inputs"):
        gp.get_criterion("wanda", {"w": w}).scores


# -- sparsegpt reconstructs ----------------------------------------------------------------------

def test_sparsegpt_has_lower_layer_reconstruction_error_than_wanda_and_magnitude():
    from gradprune.scores.llm import layer_inputs_error

    base = tiny_llama()
    names = list(weights(base))
    xs = dense_inputs(copy.deepcopy(base), names, calib(8))
    errs = {}
    for crit in ("sparsegpt", "wanda", "magnitude"):
        model = copy.deepcopy(base)
        if crit == "magnitude":
            gp.prune(model, sparsity=0.5, criterion=crit, data=calib(8), loss_fn=loss_fn, sequential=False,
                     allocation="uniform")
        else:
            gp.prune(model, sparsity=0.5, criterion=crit, data=calib(8), loss_fn=loss_fn)
        errs[crit] = {n: layer_inputs_error(base.get_parameter(n), model.get_parameter(n), xs[n]) for n in names}
    for n in names:
        assert errs["sparsegpt"][n] < errs["wanda"][n], n
        assert errs["sparsegpt"][n] < errs["magnitude"][n], n


def reference_sparsegpt(w, h, pattern, k_total, percdamp=0.01, blocksize=128):
    """The previous implementation, kept here as the reference: float64 factorisation with an
    identity-matrix damping term, column-by-column OBS steps, and N:M selection through
    ``NMPattern.expand`` (a stable sort per M-column group); for block patterns the per-block
    chooser. Returns (pruned weight, keep mask)."""
    from gradprune.oneshot import _sparsegpt_chooser
    from gradprune.patterns import NMPattern

    h = h.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h += percdamp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    w = w.float().clone()
    w[:, dead] = 0.0
    nm = isinstance(pattern, NMPattern)
    choose = None if nm else _sparsegpt_chooser(pattern, k_total, w.shape)
    step = pattern.m if nm else pattern.cols
    bs = max(step, (blocksize // step) * step)
    prune = torch.zeros_like(w, dtype=torch.bool)
    for i1 in range(0, w.shape[1], bs):
        i2 = min(i1 + bs, w.shape[1])
        w1, h1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        d = torch.diag(h1)
        err = torch.empty_like(w1)
        if not nm:
            prune[:, i1:i2] = choose(w1.pow(2) / d.pow(2), i1)
        pm = prune[:, i1:i2]
        for i in range(i2 - i1):
            if nm and i % pattern.m == 0:
                sal = w1[:, i:i + pattern.m].pow(2) / d[i:i + pattern.m].pow(2)
                pm[:, i:i + pattern.m] = ~pattern.expand(torch.zeros(sal.shape[0], dtype=torch.bool), sal)
            e = torch.mul(w1[:, i], pm[:, i]).div_(d[i])
            w1[:, i:].addr_(e, h1[i, i:], alpha=-1.0)
            err[:, i] = e
        w[:, i1:i2] = w1
        w[:, i2:].addmm_(err, hinv[i1:i2, i2:], alpha=-1.0)
    return w * ~prune, ~prune


@pytest.mark.parametrize("spec,blocksize", [("2:4", 128), ("4:8", 16), ("1:4", 8), ("1x1", 128), ("1x1", 24)])
@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
def test_sparsegpt_vectorised_nm_selection_is_bitwise_the_reference(spec, blocksize, ties):
    """The N:M mask is chosen per M-column group as the OBS steps reach it (it reads the weights
    the earlier steps updated, as in the paper); the comparison-based choice replaced a sort per
    group. Same arithmetic in the same order: weights and masks are bitwise the reference's."""
    from gradprune.oneshot import _sparsegpt_chooser
    from gradprune.patterns import get_pattern

    g = torch.Generator().manual_seed(3)
    out, inp = 24, 64
    w = torch.randn(out, inp, generator=g)
    x = torch.randn(200, inp, generator=g)
    if ties:  # equal saliencies inside groups: integer weights, H = 3 I (equal [H^-1]_jj)
        w = w.round()
        x = torch.eye(inp).repeat(3, 1)
    x[:, 5] = 0.0                          # one dead input
    lin = torch.nn.Linear(inp, out, bias=False)
    lin.weight.data.copy_(w)
    pattern = get_pattern(spec)
    k_total = round_half_up(0.5 * pattern.n_units(w.shape))
    crit = gp.get_criterion("sparsegpt", {"weight": lin.weight}, blocksize=blocksize)
    crit.add_inputs("weight", x)
    h = crit.hessian["weight"].clone()
    keep = crit.prune_layer("weight", _sparsegpt_chooser(pattern, k_total, w.shape))
    ref_w, ref_keep = reference_sparsegpt(w, h, pattern, k_total, blocksize=blocksize)
    assert torch.equal(keep, ref_keep)
    assert torch.equal(lin.weight.detach(), ref_w)
    if ":" in spec:                        # exactly N kept in every group of M
        n, m = map(int, spec.split(":"))
        assert (keep.reshape(out, -1, m).sum(-1) == n).all()
    else:
        assert int((~keep).sum()) == k_total
    if ties:                               # ties really occurred inside groups
        assert any(len(set(r.tolist())) < 4 for r in w.pow(2).reshape(-1, 4))


# -- sequential: pruned inputs, one block resident -------------------------------------------------

def test_sequential_scores_each_block_on_the_pruned_blocks_outputs():
    model = tiny_llama()
    res = gp.prune(model, sparsity=0.5, criterion="wanda", data=calib(), loss_fn=loss_fn, sequential=True)
    # by hand: block 0 pruned with its own masks, then block 1 scored on the resulting inputs
    ref = tiny_llama()
    block0 = {n: m for n, m in res.masks.items() if n.startswith("model.layers.0.")}
    with torch.no_grad():
        for n, m in block0.items():
            ref.get_parameter(n).mul_(m)
    res1 = gp.prune(ref, sparsity=0.5, criterion="wanda", data=calib(), loss_fn=loss_fn,
                    include=["model.layers.1.*"])
    dense = gp.prune(tiny_llama(), sparsity=0.5, criterion="wanda", data=calib(), loss_fn=loss_fn)

    def differ(a, b):  # share of block-1 entries whose keep/prune decision differs
        return sum(int((a.masks[n] != b.masks[n]).sum()) for n in res1.masks) / \
            sum(m.numel() for m in res1.masks.values())

    # the same decisions up to float rounding (block-by-block vs whole-model forward reorders sums)
    assert differ(res, res1) <= 0.001
    assert differ(res, dense) > 0.005


def test_sequential_offload_keeps_one_block_resident(tmp_path):
    model = tiny_llama(layers=4)
    reference = gp.prune(tiny_llama(layers=4), sparsity=0.5, criterion="sparsegpt", data=calib(), loss_fn=loss_fn,
                         sequential=True)
    blocks = list(model.model.layers)
    block_bytes = sum(p.numel() * p.element_size() for p in blocks[0].parameters())
    total = sum(p.numel() * p.element_size() for b in blocks for p in b.parameters())
    budget = int(1.5 * block_bytes)
    assert total > budget
    peak = [0]

    def resident():  # bytes of block parameters materialised (not on 'meta')
        return sum(p.numel() * p.element_size() for b in blocks for p in b.parameters() if p.device.type != "meta")

    def watch(_m, _a):
        peak[0] = max(peak[0], resident())

    handles = [b.register_forward_pre_hook(watch) for b in blocks]
    res = gp.prune(model, sparsity=0.5, criterion="sparsegpt", data=calib(), loss_fn=loss_fn, sequential=True,
                   offload=tmp_path / "blocks")
    for h in handles:
        h.remove()
    assert peak[0] <= budget
    assert peak[0] == block_bytes
    assert all(p.device.type == "cpu" for p in model.parameters())
    for n, m in reference.masks.items():
        assert torch.equal(res.masks[n], m), n
        torch.testing.assert_close(model.get_parameter(n), reference.masks.params()[n])
    # the documented bound: one block + 2 x activations (+ kwargs) + statistics
    tokens, hidden = 4 * 2 * 16, 32
    acts = 2 * tokens * hidden * 4
    hessians = sum(t.shape[1] ** 2 * 4 + t.shape[1] * 4 for n, t in weights(model).items()
                   if n.startswith("model.layers.0."))
    assert 0 < res.details["peak_device_bytes"] <= block_bytes + 2 * acts + hessians + 2 * acts


def test_sequential_blocks_can_be_named():
    model = tiny_llama()
    res = gp.prune(model, sparsity=0.5, criterion="wanda", data=calib(), loss_fn=loss_fn, sequential=True,
                   blocks=["model.layers.0", "model.layers.1"])
    auto = gp.prune(tiny_llama(), sparsity=0.5, criterion="wanda", data=calib(), loss_fn=loss_fn, sequential=True)
    for n, m in auto.masks.items():
        assert torch.equal(res.masks[n], m)


def test_find_blocks_finds_gpt2_and_bert_layers():
    from gradprune.oneshot import find_blocks

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=50))
    assert [n for n, _ in find_blocks(gpt2)] == ["transformer.h.0", "transformer.h.1", "transformer.h.2"]
    bert = transformers.BertModel(transformers.BertConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2,
                                                          intermediate_size=32, vocab_size=50))
    assert [n for n, _ in find_blocks(bert)] == ["encoder.layer.0", "encoder.layer.1"]


def test_sequential_gpt2_conv1d_weights():
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64,
                                                                 n_positions=32))
    res = gp.prune(model, sparsity=0.5, criterion="sparsegpt", pattern="2:4", data=calib(), loss_fn=loss_fn,
                   sequential=True)
    for n, m in res.masks.items():  # Conv1D is [in, out]: groups of 4 run along the input (dim 0)
        assert ((~m).t().reshape(m.shape[1], -1, 4).sum(-1) == 2).all(), n


# -- OWL -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sequential", [False, True])
def test_owl_overall_count_is_exact_and_layers_differ(sequential):
    model = tiny_llama(layers=3)
    names = weights(model)
    total = sum(t.param.numel() for t in names.values())
    res = gp.prune(model, sparsity=0.7, criterion="wanda", allocation="owl", data=calib(), loss_fn=loss_fn,
                   sequential=sequential, owl_m=3.0, owl_lambda=0.1)
    pruned = sum(int((~m).sum()) for m in res.masks.values())
    assert pruned == round_half_up(0.7 * total)
    per_block = [sum(int((~m).sum()) for n, m in res.masks.items() if n.startswith(f"model.layers.{i}."))
                 for i in range(3)]
    ratios = res.details["owl_outlier_ratios"]
    assert len(set(per_block)) > 1
    hi, lo = max(range(3), key=lambda i: ratios[i]), min(range(3), key=lambda i: ratios[i])
    assert per_block[hi] < per_block[lo]            # more outliers -> kept denser


# -- bad input: clear errors before any work -------------------------------------------------------

@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(criterion="wanda", allocation="owl", pattern="2:4"), ValueError, "owl.*sets per-layer sparsities"),
    (dict(criterion="sparsegpt", pattern="2:4", sparsity=0.3), ValueError, "2:4"),
    (dict(criterion="wanda", sequential=True, blocks=["model.nope"]), ValueError, "model.nope"),
    (dict(criterion="wanda", allocation="owl", owl_lambda=0.6), ValueError, "owl_lambda must be"),
    (dict(criterion="wanda", sequential=1), TypeError, "sequential"),
    (dict(criterion="wanda", criterion_options={"comparison": "col"}), ValueError, "comparison"),
    (dict(criterion="ria", criterion_options={"a": -1.0}), ValueError, r"\ba must be"),
    (dict(criterion="wanda", offload="/tmp/x"), ValueError, "offload= is used with sequential=True"),
    (dict(criterion="wanda", sequential=True, include=["lm_head"], include_classifier=True), ValueError, "outside"),
])
def test_bad_input_raises_before_any_work(kwargs, exc, match):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def counting_loss(m, b):
        calls.append(1)
        return loss_fn(m, b)

    kwargs = {"sparsity": 0.5, **kwargs}
    with pytest.raises(exc, match=match):
        gp.prune(model, data=calib(), loss_fn=counting_loss, **kwargs)
    assert calls == []
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_input_criteria_need_data():
    with pytest.raises(ValueError, match="data="):
        gp.prune(tiny_llama(), sparsity=0.5, criterion="ria")


# -- convolutions: inputs unfolded -----------------------------------------------------------------

class TinyConvNet(torch.nn.Module):
    """Conv2d (zero padding), Conv2d (stride 2, reflect padding), Conv1d ('same', dilation 2), head."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.c2 = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1, padding_mode="reflect")
        self.c3 = torch.nn.Conv1d(8, 8, 3, padding="same", dilation=2)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        x = torch.relu(self.c3(x.flatten(2)))
        return self.fc(x.mean(-1))


def conv_model(seed=0):
    torch.manual_seed(seed)
    return TinyConvNet().eval()


def conv_data(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(3, 4, 8, 8, generator=g), torch.randint(0, 4, (3,), generator=g)) for _ in range(n)]


def conv_loss(model, batch):
    return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])


CONVS = ["c1.weight", "c2.weight", "c3.weight"]


def conv_inputs(model, data):
    """``{name: (module, [raw inputs])}`` of each conv layer on ``data``."""
    xs, handles = {n: [] for n in CONVS}, []
    for n in CONVS:
        handles.append(model.get_submodule(n[:-7]).register_forward_pre_hook(
            lambda m, a, n=n: xs[n].append(a[0].detach())))
    with torch.no_grad():
        for b in data:
            conv_loss(model, b)
    for h in handles:
        h.remove()
    return xs


def test_unfolded_conv_inputs_reproduce_the_convolution():
    from gradprune.scores.llm import input_matrix

    model = conv_model()
    for n, xs in conv_inputs(model, conv_data(1)).items():
        conv, x = model.get_submodule(n[:-7]), xs[0]
        X = input_matrix(conv, x)                                   # [batch * positions, in * kernel]
        y = X @ conv.weight.reshape(conv.out_channels, -1).t() + conv.bias
        ref = conv(x).flatten(2).transpose(1, 2).reshape(-1, conv.out_channels)
        torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pattern", ["1x1", "1x4", "2:4"])
@pytest.mark.parametrize("criterion", LLM_CRITERIA)
def test_conv_weights_exact_counts_and_structure(criterion, pattern):
    model = conv_model()
    res = gp.prune(model, sparsity=0.5, criterion=criterion, pattern=pattern, data=conv_data(),
                   loss_fn=conv_loss, include=CONVS)
    assert sorted(res.masks) == CONVS
    for n, m in res.masks.items():
        w = model.get_parameter(n).detach()
        assert (w[~m] == 0).all(), n
        if pattern == "2:4":  # 'channels' layout: 4 consecutive input channels at one kernel position
            assert ((~m).movedim(1, -1).reshape(m.shape[0], -1, 4).sum(-1) == 2).all(), n
        elif pattern == "1x4":
            blocks = m.reshape(m.shape[0], -1, 4)
            assert (blocks == blocks[..., :1]).all(), n
            assert int((~blocks[..., 0]).sum()) == round_half_up(0.5 * blocks[..., 0].numel()), n
        else:
            assert int((~m).sum()) == m.numel() // 2, n


def test_conv_wanda_equals_the_formula_on_unfolded_inputs():
    from gradprune.scores.llm import input_matrix

    model, dense = conv_model(), conv_model()
    xs = conv_inputs(dense, conv_data())
    res = gp.prune(model, sparsity=0.5, criterion="wanda", data=conv_data(), loss_fn=conv_loss, include=CONVS)
    for n in CONVS:
        conv = dense.get_submodule(n[:-7])
        X = torch.cat([input_matrix(conv, x) for x in xs[n]])
        w = conv.weight.detach().reshape(conv.out_channels, -1)
        score = w.abs() * X.pow(2).sum(0).sqrt()
        expected = torch.ones_like(w, dtype=torch.bool)
        expected.scatter_(1, score.argsort(dim=1, stable=True)[:, : w.shape[1] // 2], False)
        assert torch.equal(res.masks[n].reshape(w.shape), expected), n


@pytest.mark.parametrize("pattern", ["1x1", "2:4"])
def test_conv_sparsegpt_reconstructs_better_than_wanda_and_magnitude(pattern):
    from gradprune.scores.llm import input_matrix, layer_inputs_error

    base = conv_model()
    xs = conv_inputs(copy.deepcopy(base), conv_data(8))
    errs = {}
    for crit in ("sparsegpt", "wanda", "magnitude"):
        model = copy.deepcopy(base)
        res = gp.prune(model, sparsity=0.5, criterion=crit, pattern=pattern, data=conv_data(8), loss_fn=conv_loss,
                       include=CONVS, allocation="uniform")
        assert res.details.get("weights_changed", False) is (crit == "sparsegpt")
        errs[crit] = {}
        for n in CONVS:
            conv = base.get_submodule(n[:-7])
            X = torch.cat([input_matrix(conv, x) for x in xs[n]])
            errs[crit][n] = layer_inputs_error(base.get_parameter(n).reshape(8, -1),
                                               model.get_parameter(n).reshape(8, -1), X)
    for n in CONVS:
        assert errs["sparsegpt"][n] < errs["wanda"][n], (n, errs)
        assert errs["sparsegpt"][n] < errs["magnitude"][n], (n, errs)


def test_conv_sequential_with_named_blocks():
    class Blocks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(
                [torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.ReLU()) for _ in range(3)])

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return x.mean()

    torch.manual_seed(0)
    model = Blocks()
    data = [torch.randn(2, 4, 6, 6) for _ in range(3)]
    res = gp.prune(model, sparsity=0.5, criterion="sparsegpt", data=data, loss_fn=lambda m, b: m(b),
                   sequential=True)
    assert res.details["sequential"] and res.details["peak_device_bytes"] > 0
    for n, m in res.masks.items():
        assert int((~m).sum()) == m.numel() // 2, n


def test_gpt2_conv1d_wanda_equals_the_formula_transposed():
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64,
                                                                 n_positions=32)).eval()
    dense = copy.deepcopy(model)
    names = list(weights(model))
    assert any(n.endswith("c_attn.weight") for n in names)
    xs = dense_inputs(dense, names, calib())
    res = gp.prune(model, sparsity=0.5, criterion="wanda", data=calib(), loss_fn=loss_fn)
    for n in names:
        w = dense.get_parameter(n).detach().t()                # Conv1D stores [in, out]
        score = w.abs() * xs[n].pow(2).sum(0).sqrt()
        expected = torch.ones_like(w, dtype=torch.bool)
        expected.scatter_(1, score.argsort(dim=1, stable=True)[:, : w.shape[1] // 2], False)
        assert torch.equal(res.masks[n], expected.t()), n


@pytest.mark.parametrize("layer,match", [
    (torch.nn.Conv2d(4, 8, 3, groups=2), r"'c\.weight'.*grouped convolution \(groups=2\)"),
    (torch.nn.Conv3d(4, 8, 3), r"'c\.weight'.*Conv3d"),
])
def test_unsupported_convs_are_refused_naming_the_layer(layer, match):
    model = torch.nn.Sequential()
    model.add_module("c", layer)
    calls = []

    def loss(m, b):
        calls.append(1)
        return m(b).sum()

    for criterion in LLM_CRITERIA:
        with pytest.raises(ValueError, match=match):
            gp.prune(model, sparsity=0.5, criterion=criterion, data=[torch.randn(1, 4, 5, 5, 5)], loss_fn=loss)
    assert calls == []


# -- scope="global": one exact count over every layer ----------------------------------------------

@pytest.mark.parametrize("pattern", ["1x1", "4x1"])
@pytest.mark.parametrize("criterion", [c for c in LLM_CRITERIA if c != "sparsegpt"])
def test_global_scope_exact_count_over_all_layers(criterion, pattern):
    model = tiny_llama()
    res = gp.prune(model, sparsity=0.6, criterion=criterion, pattern=pattern, scope="global", data=calib(),
                   loss_fn=loss_fn, max_sparsity=1.0)
    assert res.details["scope"] == "global"
    total = sum(m.numel() for m in res.masks.values())
    unit = 1 if pattern == "1x1" else 4
    assert sum(int((~m).sum()) for m in res.masks.values()) == round_half_up(0.6 * total / unit) * unit
    per_layer = [float((~m).float().mean()) for m in res.masks.values()]
    assert max(per_layer) - min(per_layer) > 0.05          # layers compete: sparsities differ


def test_global_wanda_prunes_the_globally_lowest_scores():
    model = tiny_llama()
    dense = copy.deepcopy(model)
    names = list(weights(model))
    xs = dense_inputs(dense, names, calib())
    res = gp.prune(model, sparsity=0.5, criterion="wanda", scope="global", data=calib(), loss_fn=loss_fn,
                   max_sparsity=1.0)
    scores = torch.cat([(dense.get_parameter(n).detach().abs() * xs[n].norm(dim=0)).reshape(-1) for n in names])
    k = round_half_up(0.5 * scores.numel())
    threshold = scores.sort().values[k - 1]
    pruned = torch.cat([(~res.masks[n]).reshape(-1) for n in names])
    assert int(pruned.sum()) == k
    assert bool((scores[pruned] <= threshold).all()) and bool((scores[~pruned] >= threshold).all())


@pytest.mark.parametrize("kwargs,match", [
    (dict(criterion="sparsegpt"), "per layer.*own Hessian"),
    (dict(criterion="wanda", sequential=True), "sequential=True scores each block only after"),
])
def test_global_scope_refusals_name_why(kwargs, match):
    calls = []

    def counting_loss(m, b):
        calls.append(1)
        return loss_fn(m, b)

    with pytest.raises(ValueError, match=match):
        gp.prune(tiny_llama(), sparsity=0.5, scope="global", data=calib(), loss_fn=counting_loss, **kwargs)
    assert calls == []


# -- sequential on the other decoder families ------------------------------------------------------

@pytest.mark.parametrize("family", ["Qwen2", "Qwen3", "Gemma", "Phi3", "Mistral"])
def test_sequential_runs_block_by_block_on_other_decoders(family):
    cfg = getattr(transformers, f"{family}Config")(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, head_dim=8, pad_token_id=0, bos_token_id=1,
        eos_token_id=2)
    torch.manual_seed(0)
    model = getattr(transformers, f"{family}ForCausalLM")(cfg).eval()
    dense = copy.deepcopy(model)
    res = gp.prune(model, sparsity=0.5, criterion="wanda", data=calib(), loss_fn=loss_fn, sequential=True)
    assert res.details["sequential"] and res.details["peak_device_bytes"] > 0
    names = [n for n in weights(model) if ".layers." in n]
    assert sorted(res.masks) == sorted(names)
    for n, m in res.masks.items():
        assert int((~m).sum()) == m.numel() // 2, n
    # block 0 sees the dense model's inputs: its masks equal a non-sequential run restricted to it
    ref = gp.prune(dense, sparsity=0.5, criterion="wanda", data=calib(), loss_fn=loss_fn,
                   include=["*.layers.0.*"])
    for n, m in ref.masks.items():
        assert float((m != res.masks[n]).float().mean()) <= 0.001, n
    assert torch.isfinite(loss_fn(model, calib()[0]))


def test_an_input_criterion_without_score_one_cannot_be_built():
    from gradprune.scores.llm import InputCriterion

    class NoScore(InputCriterion):
        pass

    with pytest.raises(TypeError, match="score_one"):
        NoScore({"w": torch.zeros(2, 2)})
