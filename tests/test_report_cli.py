"""`gradprune report` reads every file gradprune writes (masks.pt, selection.pt, a pruned model
checkpoint, a save_pruned folder, a save_pretrained folder), says what each overall sparsity
counts, rejects anything else with a clear error and a non-zero exit, and draws readable plots."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch
from torch import nn

from gradprune import cli, report
from gradprune.integrations.safetensors import save_masks, save_selection

ROOT = pathlib.Path(__file__).resolve().parents[1]
RECIPES = ROOT / "examples" / "recipes"


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """The files the recipes write, made by the library's own writers (one run per workflow)."""
    d = tmp_path_factory.mktemp("recipes")
    for f in RECIPES.iterdir():
        if f.suffix in (".py", ".yaml"):
            shutil.copy(f, d / f.name)
    try:
        for name in ("oneshot", "preprune", "search"):
            assert cli.main(["run", str(d / f"{name}.yaml")]) == 0
    finally:
        sys.modules.pop("tiny", None)
    return d / "out"


def _run(argv, capsys):
    rc = cli.main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _report(path, tmp_path, capsys, kind):
    """Run `gradprune report path` (plot and JSON into tmp_path); returns (JSON report, stdout)."""
    rc, out, err = _run(["report", path, "--plot", tmp_path / "r.png", "--json", tmp_path / "r.json"], capsys)
    assert rc == 0, err
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["kind"] == kind
    return rep, out


def _overall_lines(text):
    return [line for line in text.splitlines() if line.startswith("overall")]


def test_masks_file(outputs, tmp_path, capsys):
    masks = torch.load(outputs / "oneshot" / "masks.pt", weights_only=True)
    plot = tmp_path / "m.png"
    rc, out, err = _run(["report", outputs / "oneshot" / "masks.pt", "--plot", plot,
                         "--json", tmp_path / "m.json"], capsys)
    assert rc == 0, err
    rep = json.loads((tmp_path / "m.json").read_text())
    assert rep["kind"] == "masks"
    assert {r["name"]: (r["kept"], r["numel"]) for r in rep["layers"]} == {
        n: (int(m.sum()), m.numel()) for n, m in masks.items()}
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    assert rep["overall_sparsity"] == pytest.approx(1 - kept / total)
    for n in masks:
        assert n in out
    assert _overall_lines(out) == [
        f"overall sparsity of {report.PRUNABLE}: {1 - kept / total:.4f} ({total - kept:,} of {total:,} entries zero)"]
    if pytest.importorskip("matplotlib"):
        assert plot.stat().st_size > 0


def test_selection_file(outputs, tmp_path, capsys):
    sel = torch.load(outputs / "preprune" / "selection.pt", weights_only=True)
    rep, out = _report(outputs / "preprune" / "selection.pt", tmp_path, capsys, "selection")
    kept = {r["name"]: r["kept"] for r in rep["layers"]}
    assert kept == {n: int(m.sum()) for n, m in sel["masks"].items()}
    assert sum(kept.values()) == sum(len(v) for v in sel["indices"].values())
    assert report.PRUNABLE in out


def test_pruned_checkpoint_counts_all_weight_tensors(outputs, tmp_path, capsys):
    state = torch.load(outputs / "oneshot" / "pruned_model.pt", weights_only=True)
    rep, out = _report(outputs / "oneshot" / "pruned_model.pt", tmp_path, capsys, "checkpoint")
    weights = {k: v for k, v in state.items() if v.dim() >= 2}
    assert {r["name"]: r["zeros"] for r in rep["layers"]} == {k: int((v == 0).sum()) for k, v in weights.items()}
    lines = _overall_lines(out)
    assert len(lines) == 1 and report.ALL_WEIGHTS in lines[0]


def test_demo_checkpoint_says_both_overall_sparsities(tmp_path, capsys):
    """A checkpoint with masks (the demo's best_model.pt): the prunable sparsity is the one the
    demo prints (MaskSet.sparsity()), the other one counts every weight tensor."""
    import gradprune as gp
    from gradprune.demo import format_summary

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    res = gp.prune(model, sparsity=0.9, criterion="magnitude")
    path = tmp_path / "best_model.pt"
    torch.save({"model": model.state_dict(), "masks": res.masks.state_dict(), "criterion": "magnitude",
                "pattern": "1x1", "sparsity": res.masks.sparsity(), "accuracy": 0.5}, path)
    rep, out = _report(path, tmp_path, capsys, "checkpoint")
    by = {o["counts"]: o["sparsity"] for o in rep["overall"]}
    assert by[report.PRUNABLE] == pytest.approx(res.masks.sparsity())
    weights = [p for p in model.parameters() if p.dim() >= 2]
    all_sp = sum(int((p == 0).sum()) for p in weights) / sum(p.numel() for p in weights)
    assert by[report.ALL_WEIGHTS] == pytest.approx(all_sp)
    assert by[report.ALL_WEIGHTS] != pytest.approx(by[report.PRUNABLE])  # the last layer is not pruned
    lines = _overall_lines(out)
    assert any(report.PRUNABLE in line and f"{res.masks.sparsity():.4f}" in line for line in lines)
    assert any(report.ALL_WEIGHTS in line and f"{all_sp:.4f}" in line for line in lines)
    # the demo's own line says what its sparsity counts, with the same number
    summary = {"runs": [{"criterion": "magnitude", "pattern": "1x1", "target_sparsity": 0.9,
                         "sparsity": res.masks.sparsity(), "accuracy": 0.5}],
               "dense_accuracy": 0.6, "best": {"criterion": "magnitude", "pattern": "1x1",
                                               "sparsity": res.masks.sparsity(), "accuracy": 0.5},
               "files": [], "seconds": 1.0}
    best_line = [line for line in format_summary(summary).splitlines() if line.startswith("best")][0]
    assert f"{res.masks.sparsity():.4f} of {report.PRUNABLE}" in best_line


def test_save_pruned_folder(outputs, tmp_path, capsys):
    folder = outputs / "search" / "pruned"
    state = torch.load(folder / "model.pt", weights_only=True)
    for arg in (folder, str(folder) + os.sep):
        rc, out, err = _run(["report", arg, "--json", tmp_path / "f.json"], capsys)
        assert rc == 0, err
        assert "not found" not in out + err
        rep = json.loads((tmp_path / "f.json").read_text())
        assert rep["kind"] == "save_pruned"
        assert [r["name"] for r in rep["layers"]] == [k for k, v in state.items() if v.dim() >= 2]
        assert report.ALL_WEIGHTS in out
    if pytest.importorskip("matplotlib"):  # the default plot goes next to the folder, not into it
        assert (outputs / "search" / "pruned_report.png").is_file()


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_save_pretrained_folder(tmp_path, capsys, safe):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16)
    model = transformers.BertModel(cfg)
    with torch.no_grad():
        model.encoder.layer[0].intermediate.dense.weight[:8] = 0
    model.save_pretrained(tmp_path / "bert", safe_serialization=safe)
    rep, out = _report(tmp_path / "bert", tmp_path, capsys, "save_pretrained")
    rows = {r["name"]: r for r in rep["layers"]}
    assert rows["encoder.layer.0.intermediate.dense.weight"]["zeros"] == 8 * 16
    assert report.ALL_WEIGHTS in out


def test_safetensors_masks_and_selection(outputs, tmp_path):
    masks = torch.load(outputs / "oneshot" / "masks.pt", weights_only=True)
    save_masks(masks, tmp_path / "m.safetensors")
    rep = report.checkpoint_report(tmp_path / "m.safetensors")
    assert rep["kind"] == "masks"
    assert {r["name"]: r["kept"] for r in rep["layers"]} == {n: int(m.sum()) for n, m in masks.items()}

    class Sel:  # what save_selection reads from a pre_prune result
        indices = {"w": torch.tensor([0, 3])}
        importance = {"w": torch.rand(2, 3)}
        report = {"kept_total": 2}

    save_selection(Sel(), tmp_path / "s.safetensors")
    rep = report.checkpoint_report(tmp_path / "s.safetensors")
    assert rep["kind"] == "selection" and rep["layers"][0]["kept"] == 2 and rep["layers"][0]["numel"] == 6


def _bad_inputs(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    other = tmp_path / "other.pt"
    torch.save({"steps": 3, "names": ["a", "b"]}, other)
    ints = tmp_path / "ints.pt"
    torch.save({"a": torch.arange(3)}, ints)
    return {"text file": (text, "is not a checkpoint"), "empty folder": (empty, "is not one gradprune writes"),
            "missing": (tmp_path / "missing.pt", "not found"),
            "pt holding something else": (other, "not a file gradprune report reads"),
            "pt of integer tensors": (ints, "not a file gradprune report reads")}


def test_anything_else_is_a_clear_error(tmp_path, capsys):
    for what, (path, message) in _bad_inputs(tmp_path).items():
        rc, out, err = _run(["report", path, "--plot", tmp_path / "x.png"], capsys)
        assert rc != 0, what
        assert err.startswith("gradprune: error:") and message in err and str(path) in err, (what, err)
        assert "Traceback" not in err and out == "", what
        assert not (tmp_path / "x.png").exists(), what


def test_flops_of_every_kind(outputs, tmp_path, capsys, monkeypatch):
    """--model/--example-input count every weight layer of the model: masks give the same FLOPs as
    the pruned checkpoint they came with; a save_pruned folder is rebuilt at its saved widths."""
    monkeypatch.chdir(outputs.parent)  # tiny.py is there
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "tiny", raising=False)
    flops = {}
    for path in ("oneshot/masks.pt", "oneshot/pruned_model.pt", "search/pruned"):
        rc, out, err = _run(["report", outputs / path, "--model", "tiny:make_model", "--example-input",
                             "tiny:example_input", "--plot", tmp_path / "x.png", "--json", tmp_path / "r.json"],
                            capsys)
        assert rc == 0, err
        rep = json.loads((tmp_path / "r.json").read_text())
        flops[path] = rep["flops_dense"], rep["flops_sparse"]
    assert flops["oneshot/masks.pt"] == flops["oneshot/pruned_model.pt"]
    assert flops["oneshot/masks.pt"][0] == 2 * 2 * (16 * 32 + 32 * 32 + 32 * 4)  # batch of 2
    narrow = torch.load(outputs / "search" / "pruned" / "model.pt", weights_only=True)
    assert flops["search/pruned"] == (2 * 2 * sum(v.numel() for v in narrow.values() if v.dim() >= 2),) * 2
    # a factory whose model does not fit the weights: one clear line
    torch.save({"0.weight": torch.zeros(3, 3)}, tmp_path / "odd.pt")
    rc, out, err = _run(["report", tmp_path / "odd.pt", "--model", "tiny:make_model", "--example-input",
                         "tiny:example_input", "--plot", tmp_path / "y.png"], capsys)
    assert rc == 2 and "--model builds a model whose tensors do not match" in err and "0.weight" in err
    sys.modules.pop("tiny", None)


def test_results_must_be_a_demo_results_file(outputs, tmp_path, capsys):
    (tmp_path / "results.json").write_text(json.dumps({"runs": [{"criterion": "snip"}]}))
    rc, out, err = _run(["report", outputs / "oneshot" / "masks.pt", "--results", tmp_path / "results.json",
                         "--plot", tmp_path / "x.png"], capsys)
    assert rc == 2 and "is not a results.json of `gradprune demo`" in err
    assert not (tmp_path / "x.png").exists()
    (tmp_path / "results.json").write_text(json.dumps(_results(3)))
    rc, out, err = _run(["report", outputs / "oneshot" / "masks.pt", "--results", tmp_path / "results.json",
                         "--plot", tmp_path / "x.png"], capsys)
    assert rc == 0, err
    if pytest.importorskip("matplotlib"):
        assert (tmp_path / "x.png").is_file()


def test_subprocess_exit_codes(outputs, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    ok = subprocess.run([sys.executable, "-m", "gradprune", "report", str(outputs / "oneshot" / "masks.pt"),
                         "--plot", str(tmp_path / "m.png")], capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert report.PRUNABLE in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "gradprune", "report", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode != 0 and "is not one gradprune writes" in bad.stderr


def _results(n_series):
    runs = []
    for i in range(n_series):
        for s in (0.5, 0.9):
            runs.append({"criterion": f"crit{i}", "pattern": "1x1", "sparsity": s, "accuracy": 0.9 - s / 10 - i / 100})
    return {"runs": runs, "dense_accuracy": 0.95}


@pytest.mark.parametrize("n_series", [15, 20, 24])
def test_plots_readable_with_many_series(outputs, n_series):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex

    rep = report.checkpoint_report(outputs / "oneshot" / "masks.pt")
    fig = report.report_figure(rep, _results(n_series))
    try:
        assert all(ax.get_title() for ax in fig.axes)
        lines = [ln for ln in fig.axes[1].get_lines() if ln.get_label().startswith("crit")]
        assert len(lines) == n_series
        colours = [to_hex(ln.get_color()) for ln in lines]
        markers = [ln.get_marker() for ln in lines]
        assert len(set(colours)) == min(n_series, 20)
        assert len(set(zip(colours, markers, (ln.get_linestyle() for ln in lines)))) == n_series
        assert all(m not in (None, "", "None") for m in markers)
        assert len(set(markers)) > 1
    finally:
        plt.close(fig)


def test_demo_plot_readable_with_many_series(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex

    from gradprune import demo

    figs, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: figs.append(fig))  # keep the figure to inspect it
    runs = [dict(r, accuracy_one_shot=r["accuracy"]) for r in _results(16)["runs"]]
    assert demo._plot({"runs": runs, "dense_accuracy": 0.95}, str(tmp_path / "d.png"))
    (fig,) = figs
    assert all(ax.get_title() for ax in fig.axes)
    for ax in fig.axes:
        lines = [ln for ln in ax.get_lines() if ln.get_label().startswith("crit")]
        assert len({to_hex(ln.get_color()) for ln in lines}) == 16
    close(fig)
