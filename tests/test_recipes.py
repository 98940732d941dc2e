"""`gradprune run` runs every example recipe; recipes are validated like the configs;
`gradprune report` reads a checkpoint."""

import json
import pathlib
import shutil
import sys

import pytest
import torch

from gradprune import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
RECIPES = ROOT / "examples" / "recipes"


@pytest.fixture
def recipe_dir(tmp_path):
    for f in RECIPES.iterdir():
        if f.suffix in (".py", ".yaml"):
            shutil.copy(f, tmp_path / f.name)
    yield tmp_path
    sys.modules.pop("tiny", None)


@pytest.mark.parametrize("name", sorted(p.stem for p in RECIPES.glob("*.yaml") if p.stem != "llm"))  # llm: tests/test_llm_recipe.py
def test_example_recipe_runs(recipe_dir, name, capsys):
    assert cli.main(["run", str(recipe_dir / f"{name}.yaml")]) == 0, capsys.readouterr().err
    out = recipe_dir / "out" / name
    report = json.loads((out / "report.json").read_text())
    assert report["workflow"] == {"oneshot": "prune"}.get(name, name)
    if name in ("oneshot", "gradual", "sparse"):
        state = torch.load(out / "pruned_model.pt", weights_only=True)
        masks = torch.load(out / "masks.pt", weights_only=True)
        for layer, m in masks.items():
            assert m.dtype == torch.bool
            assert torch.all(state[layer][~m] == 0)
        kept = sum(int(m.sum()) for m in masks.values())
        total = sum(m.numel() for m in masks.values())
        expected = {"oneshot": 0.75, "gradual": 0.5, "sparse": 0.8}[name]
        assert 1 - kept / total == pytest.approx(expected, abs=0.002)
    elif name == "search":
        arch = json.loads((out / "pruned" / "architecture.json").read_text())
        assert arch["modules"]
        dense = sum(p.numel() for p in __import__("tiny").make_model().parameters())
        assert report["params"] < dense
    else:
        sel = torch.load(out / "selection.pt", weights_only=True)
        assert sum(len(v) for v in sel["indices"].values()) == report["kept_total"] == 18


@pytest.mark.parametrize("body, needle", [
    ("workflow: train\nmodel: tiny:make_model\n", "workflow must be one of prune, gradual, sparse, search, preprune"),
    ("model: tiny:make_model\nprune: {sparsity: 0.5}\n", "recipe needs 'workflow"),
    ("workflow: sparse\nmodel: tiny:make_model\nprune: {sparsity: 0.5}\n", "do not apply to workflow 'sparse'"),
    ("workflow: gradual\nmodel: tiny:make_model\nprune: {target_sparsity: 0.5}\ntrain: {stpes: 3}\n",
     "unknown train key(s) 'stpes'"),
    ("workflow: gradual\nmodel: tiny:make_model\nprune: {target_sparsity: 0.5}\ntrain: {lr: -1}\n",
     "train.lr must be in"),
    ("workflow: sparse\nmodel: tiny:make_model\nsparse: {preset: rigl, densty: 0.1}\n", "unknown SparseConfig key"),
    ("workflow: sparse\nmodel: tiny:make_model\nsparse: {preset: magic}\n", "sparse.preset must be one of"),
    ("workflow: preprune\nmodel: tiny:make_model\npreprune: {n_samples: 4}\n", "at least one of topk or threshold"),
    ("workflow: search\nmodel: tiny:make_model\nsearch: {method: gradnas}\n", "search needs constraints"),
    ("workflow: gradual\nmodel: tiny:make_model\nprune: {target_sparsity: 0.5}\n", "needs data: and loss_fn:"),
])
def test_bad_recipes_fail_in_one_line_before_running(recipe_dir, capsys, body, needle):
    path = recipe_dir / "bad.yaml"
    path.write_text(body)
    assert cli.main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gradprune: error:") and len(err.splitlines()) == 1
    assert needle in err
    assert not (recipe_dir / "bad-out").exists()


def test_report_command(recipe_dir, capsys):
    assert cli.main(["run", str(recipe_dir / "oneshot.yaml")]) == 0
    ckpt = recipe_dir / "out" / "oneshot" / "pruned_model.pt"
    capsys.readouterr()
    rc = cli.main(["report", str(ckpt), "--model", "tiny:make_model", "--example-input", "tiny:example_input",
                   "--json", str(recipe_dir / "rep.json")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "0.weight" in text and "overall" in text and "FLOPs per forward" in text
    rep = json.loads((recipe_dir / "rep.json").read_text())
    state = torch.load(ckpt, weights_only=True)
    zeros = sum(int((state[k] == 0).sum()) for k in ("0.weight", "2.weight", "4.weight"))
    total = sum(state[k].numel() for k in ("0.weight", "2.weight", "4.weight"))
    assert rep["weights"] == total and rep["weights"] - rep["nonzero_weights"] == zeros
    # FLOPs: 2 x MACs per Linear for a batch of 2, dense and scaled by each layer's density
    dense = 2 * 2 * (16 * 32 + 32 * 32 + 32 * 4)
    assert rep["flops_dense"] == dense
    assert rep["flops_sparse"] < dense
    if pytest.importorskip("matplotlib"):
        assert (recipe_dir / "out" / "oneshot" / "pruned_model_report.png").is_file()


def test_report_rejects_non_checkpoints(tmp_path, capsys):
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"nope")
    assert cli.main(["report", str(bad)]) == 2
    assert "is not a checkpoint" in capsys.readouterr().err
    assert cli.main(["report", str(tmp_path / "missing.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
