"""One report API (#19.1): every object that has a report holds it in the attribute ``.report``;
every report prints, serialises to JSON, renders Markdown and plots; the old spellings
(``obj.report()``, ``sel.report["key"]``) still work with a ``DeprecationWarning``."""

import json
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gradprune as gp
from gradprune.structured.depth import LayerReport
from gradprune.report import PRUNABLE, Report, SearchReport, SelectionReport, SparsityReport

N_LAYERS = 17  # 16 prunable Linear layers (the last is the classifier, left dense): 15+ series


def _mlp():
    torch.manual_seed(0)
    layers = []
    for i in range(N_LAYERS):
        layers.append(nn.Linear(6, 6 if i < N_LAYERS - 1 else 2))
        if i < N_LAYERS - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, generator=g), torch.randint(0, 2, (8,), generator=g)) for _ in range(3)]


def _loss(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def _prune_result():
    return gp.prune(_mlp(), sparsity=0.5, criterion="magnitude")


def _pruner():
    model, data = _mlp(), _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    pruner = gp.Pruner(model, gp.PruneConfig(criterion="magnitude", target_sparsity=0.5, schedule="cubic",
                                             start_step=0, end_step=2, frequency=1), optimizer=opt)
    for step in range(3):
        pruner.on_step_begin()
        opt.zero_grad()
        _loss(model, data[step % len(data)]).backward()
        pruner.on_before_optimizer_step()
        opt.step()
        pruner.on_after_optimizer_step()
    return pruner


def _sparse_trainer():
    model, data = _mlp(), _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sparse = gp.SparseTrainer(model, opt, gp.SparseConfig.rigl(density=0.5, total_steps=4, update_interval=2))
    for step in range(3):
        opt.zero_grad()
        _loss(model, data[step % len(data)]).backward()
        sparse.step()
    return sparse


def _selection():
    items = [{"x": torch.randn(6), "feature_class_id": i % 2, "factual": i % 2, "alternative": 1 - i % 2}
             for i in range(12)]

    def loss(model, batch, target):
        return nn.functional.cross_entropy(model(batch["x"]), batch[target])

    return gp.pre_prune(_mlp(), items, gp.PrePruneConfig(n_samples=4, topk=20, source="diff"), loss)


def _search_result():
    data = _data()
    return gp.search(_mlp(), {"params": "60%"}, data, _loss, method="gradnas", example_input=data[0][0],
                     rules={"nn.Linear": {"feature_divisor": 1}})


def _layer_search_result():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=N_LAYERS - 1,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    ids = [torch.randint(0, 32, (2, 6))]
    return gp.search(model, {"params": "80%"}, ids, lambda m, b: m(b, labels=b).loss, method="block_influence",
                     example_input=ids[0], axes=("layers",))


BUILDERS = {"PruneResult": _prune_result, "Pruner": _pruner, "SparseTrainer": _sparse_trainer,
            "PrePruneSelection": _selection, "SearchResult": _search_result,
            "LayerSearchResult": _layer_search_result}
REPORT_TYPE = {"PruneResult": SparsityReport, "Pruner": SparsityReport, "SparseTrainer": SparsityReport,
               "PrePruneSelection": SelectionReport, "SearchResult": SearchReport,
               "LayerSearchResult": LayerReport}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def made(request):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # building and reading: no old spelling inside
        obj = BUILDERS[request.param]()
    return request.param, obj


def _layer_names(rep):
    return [str(r[rep.name_key]) for r in rep.rows]


def test_one_convention_report_is_an_attribute_holding_a_report(made):
    kind, obj = made
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        rep = obj.report
    assert isinstance(rep, Report) and type(rep) is REPORT_TYPE[kind]
    assert len(rep.rows) >= 15
    if isinstance(getattr(type(obj), "report", None), property):  # stateful objects: read-only
        with pytest.raises(AttributeError):
            obj.report = rep


def test_str_is_the_table_and_overall_says_what_it_counts(made):
    kind, obj = made
    text = str(obj.report)
    assert all(name in text for name in _layer_names(obj.report))
    assert repr(obj.report) == text
    if isinstance(obj.report, SparsityReport):
        overall = [ln for ln in text.splitlines() if ln.startswith("overall")]
        assert overall == [f"overall sparsity of {PRUNABLE}: {obj.masks.sparsity():.4f} "
                           f"({obj.report.to_dict()['zeros']:,} of {obj.report.to_dict()['total']:,} entries zero)"]
    if kind in ("SearchResult", "LayerSearchResult"):
        assert "params:" in text and "flops:" in text


def test_to_dict_round_trips_through_json(made):
    _, obj = made
    d = obj.report.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert [str(r[obj.report.name_key]) for r in d["layers"]] == _layer_names(obj.report)
    if isinstance(obj.report, SparsityReport):
        assert d["overall"] == obj.masks.sparsity() and d["overall_counts"] == PRUNABLE


def test_to_markdown_has_a_header_row_and_one_row_per_layer(made):
    _, obj = made
    rep = obj.report
    table = [ln for ln in rep.to_markdown().splitlines() if ln.startswith("|")]
    assert table[0] == "| " + " | ".join(rep.columns) + " |"
    assert set(table[1].replace("|", "")) == {"-"}
    body = table[2:]
    assert len(body) == len(rep.rows)
    assert [ln.split("|")[1].strip() for ln in body] == _layer_names(rep)


def test_plot_writes_a_readable_png_with_one_series_per_layer(made, tmp_path):
    from matplotlib.figure import Figure
    from matplotlib.image import imread

    _, obj = made
    rep = obj.report
    path = tmp_path / "report.png"
    assert rep.plot(str(path)) == str(path)
    pixels = imread(str(path))
    assert pixels.ndim == 3 and pixels[..., :3].std() > 0.05  # not a blank image

    ax = Figure().add_subplot(1, 1, 1)
    assert rep.plot(ax=ax) is ax
    series = [ln for ln in ax.lines if not ln.get_label().startswith("_")]
    assert len(series) == len(rep.rows) >= 15
    styles = {(tuple(np.round(np.asarray(__import__("matplotlib").colors.to_rgba(ln.get_color())), 4)),
               ln.get_marker()) for ln in series}
    assert len(styles) == len(series)  # every series differs in colour or marker
    assert ax.get_title()
    assert isinstance(rep.plot(), Figure)


@pytest.mark.parametrize("kind", ["Pruner", "SparseTrainer", "SearchResult"])
def test_calling_report_warns_and_returns_what_the_method_returned(kind):
    obj = BUILDERS[kind]()
    with pytest.warns(DeprecationWarning, match=r"report\(\) is deprecated"):
        old = obj.report()
    if kind == "SearchResult":  # the method returned the text
        assert isinstance(old, str) and old == str(obj.report)
    else:  # the method returned the report object
        assert isinstance(old, SparsityReport) and str(old) == str(obj.report)
        assert old.to_dict() == obj.report.to_dict()


def test_selection_report_reads_as_the_old_dict_with_a_warning():
    sel = _selection()
    new = sel.report.to_dict()
    for key in SelectionReport.FIELDS:
        with pytest.warns(DeprecationWarning, match="report.kept_total"):
            value = sel.report[key]
        assert value == getattr(sel.report, key)
        assert json.loads(json.dumps({key: value})) == {key: new[key]}
    with pytest.warns(DeprecationWarning):
        assert "kept_total" in sel.report
    with pytest.warns(DeprecationWarning):
        assert sel.report.get("total") == sel.report.total
    with pytest.warns(DeprecationWarning):
        assert dict(sel.report.items())["kept"] == sel.report.kept
    with pytest.warns(DeprecationWarning):
        assert set(sel.report.keys()) == set(SelectionReport.FIELDS)
    assert sel.report.kept_total == sum(int(i.numel()) for i in sel.indices.values()) == 20


def test_a_selection_built_with_the_old_dict_gets_a_report_object():
    sel = _selection()
    with pytest.warns(DeprecationWarning):
        old = dict(sel.report.items())
    again = gp.PrePruneSelection(sel.masks, sel.indices, sel.importance, old)
    assert isinstance(again.report, SelectionReport) and str(again.report) == str(sel.report)


def test_unknown_report_attribute_is_an_attribute_error():
    sel = _selection()
    with pytest.raises(AttributeError, match="no attribute 'kept_totl'"):
        sel.report.kept_totl


def test_plot_rejects_a_bad_path_before_drawing():
    with pytest.raises(TypeError, match="path must be a str or os.PathLike, got int"):
        _prune_result().report.plot(3)


def _old_spellings(source: str) -> list:
    """Line numbers of ``x.report()`` calls and ``x.report["key"]`` reads in Python ``source``."""
    import ast

    found = []
    for node in ast.walk(ast.parse(source)):
        target = node.func if isinstance(node, ast.Call) else node.value if isinstance(node, ast.Subscript) else None
        if isinstance(target, ast.Attribute) and target.attr == "report":
            found.append(node.lineno)
    return found


def test_nothing_in_the_repo_uses_an_old_spelling():
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1]
    bad = []
    for path in sorted([root / "README.md", *(root / "docs").rglob("*.md")]):
        for i, block in enumerate(re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S)):
            bad += [f"{path.relative_to(root)} block {i} line {n}" for n in _old_spellings(block)]
    for path in sorted([*(root / "src").rglob("*.py"), *(root / "examples").rglob("*.py"),
                        *(root / "benchmarks").rglob("*.py")]):
        bad += [f"{path.relative_to(root)}:{n}" for n in _old_spellings(path.read_text(encoding="utf-8"))]
    assert not bad, f"old report spellings (use .report, report.<field>): {bad}"


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.tuples(st.integers(1, 5), st.integers(1, 5)), min_size=1, max_size=5),
       seed=st.integers(0, 2**16), skip=st.booleans())
def test_sparsity_report_counts_match_the_masks(sizes, seed, skip):
    model = nn.Sequential(*[nn.Linear(i, o) for i, o in sizes])
    g = torch.Generator().manual_seed(seed)
    names = [f"{k}.weight" for k in range(len(sizes))]
    masks = gp.MaskSet(model, names=names, masks={n: torch.rand(o, i, generator=g) < 0.5
                                                 for n, (i, o) in zip(names, sizes)})
    skipped = {"extra.weight": "too small"} if skip else {}
    rep = SparsityReport(masks, skipped, {"extra.weight": torch.Size([2, 3])})
    d = rep.to_dict()
    zeros = sum(int((~m).sum()) for _, m in masks.items())
    total = sum(m.numel() for _, m in masks.items())
    assert (d["zeros"], d["total"], d["overall"]) == (zeros, total, masks.sparsity())
    assert json.loads(json.dumps(d)) == d
    assert len([ln for ln in rep.to_markdown().splitlines() if ln.startswith("|")]) == 2 + len(sizes) + skip
    assert str(rep).splitlines()[-1] == (f"overall sparsity of {PRUNABLE}: {masks.sparsity():.4f} "
                                         f"({zeros:,} of {total:,} entries zero)")
    assert [r["density"] for r in d["layers"]][:len(sizes)] == pytest.approx(
        [float(m.float().mean()) for _, m in masks.items()])
