"""The gradprune command: demo, prune from a recipe, help, one-line errors."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from gradprune import cli
from gradprune.demo import run_demo

RECIPE_MODULE = textwrap.dedent(
    """
    import torch, torch.nn as nn

    def make_model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))

    def make_data():
        g = torch.Generator().manual_seed(1)
        return [(torch.randn(4, 8, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(6)]

    def loss_fn(model, batch):
        return nn.functional.cross_entropy(model(batch[0]), batch[1])
    """
)


@pytest.fixture
def recipe_dir(tmp_path):
    mod = tmp_path / "recipe_mod_gp.py"
    mod.write_text(RECIPE_MODULE)
    yield tmp_path
    sys.modules.pop("recipe_mod_gp", None)


def _write(path, text):
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_prune_from_recipe_writes_outputs(recipe_dir, capsys):
    cfg = _write(recipe_dir / "recipe.yaml", """
        model: recipe_mod_gp:make_model
        data: recipe_mod_gp:make_data
        loss_fn: recipe_mod_gp:loss_fn
        n_batches: 4
        output: out
        prune: {sparsity: 0.75, criterion: snip, pattern: 4x1, scope: global}
    """)
    assert cli.main(["prune", "--config", cfg]) == 0
    out = recipe_dir / "out"
    state = torch.load(out / "pruned_model.pt", weights_only=True)
    masks = torch.load(out / "masks.pt", weights_only=True)
    report = json.loads((out / "report.json").read_text())
    assert set(masks) == {"0.weight", "2.weight"}
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    assert kept == total // 4
    for name, m in masks.items():
        assert torch.all(state[name][~m] == 0)
    assert report["overall"] == pytest.approx(0.75)
    assert "overall sparsity" in capsys.readouterr().out


@pytest.mark.parametrize("body, needle", [
    ("model: recipe_mod_gp:make_model\nprune: {sparsity: 2.0}\n", "target_sparsity must be in"),
    ("model: recipe_mod_gp:make_model\nprune: {sparsity: 0.5, colour: red}\n", "unknown PruneConfig key"),
    ("model: recipe_mod_gp:make_model\nmodle: x\n", "unknown recipe key"),
    ("model: recipe_mod_gp:nope\nprune: {sparsity: 0.5}\n", "has no attribute"),
    ("model: not_a_module_xyz:f\nprune: {sparsity: 0.5}\n", "cannot import module"),
    ("model: recipe_mod_gp:make_model\nprune: {sparsity: 0.5, criterion: snip}\n", "reads gradients"),
    ("prune: {sparsity: 0.5}\n", "recipe needs 'model"),
    ("model: [unclosed\n", "not valid YAML"),
])
def test_bad_recipes_give_one_line_errors(recipe_dir, capsys, body, needle):
    cfg = _write(recipe_dir / "bad.yaml", body)
    assert cli.main(["prune", "--config", cfg]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gradprune: error:")
    assert needle in err
    assert len(err.splitlines()) == 1
    assert not (recipe_dir / "bad-out").exists()  # nothing written on failure


def test_missing_config_file(capsys):
    assert cli.main(["prune", "--config", "/no/such/recipe.yaml"]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_help_lists_examples():
    proc = subprocess.run([sys.executable, "-m", "gradprune", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    assert "gradprune demo" in proc.stdout and "gradprune prune --config" in proc.stdout


def test_no_command_prints_help_and_fails(capsys):
    assert cli.main([]) == 2
    assert "usage" in capsys.readouterr().out


def test_demo_small_grid_writes_results(tmp_path):
    pytest.importorskip("sklearn")
    res = run_demo(str(tmp_path), criteria=("magnitude", "snip"), patterns=("1x1", "2:4"),
                   sparsities=(0.5, 0.9), epochs=2, finetune_epochs=1, verbose=False)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["runs"] == res["runs"]
    assert len(res["runs"]) == 2 * (2 + 1)  # 2:4 has its one sparsity
    for run in res["runs"]:
        assert run["sparsity"] == pytest.approx(run["target_sparsity"], abs=1e-3)
        assert 0.0 <= run["accuracy"] <= 1.0
    assert any("skipping 0.weight" in w for r in res["runs"] if r["pattern"] == "2:4" for w in r["skipped"])
    best = torch.load(tmp_path / "best_model.pt", weights_only=True)
    assert best["sparsity"] == pytest.approx(0.9, abs=1e-3)
    for name, m in best["masks"].items():
        assert torch.all(best["model"][name][~m] == 0)
    # same seed, same results
    again = run_demo(str(tmp_path / "again"), criteria=("magnitude", "snip"), patterns=("1x1", "2:4"),
                     sparsities=(0.5, 0.9), epochs=2, finetune_epochs=1, verbose=False)
    assert again["runs"] == res["runs"]
