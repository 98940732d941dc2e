"""A first user's experience: progress bars and logging, commands that do what their help says,
a fair demo."""

import io
import logging
import sys
import textwrap

import pytest
import torch
from torch import nn

import gradprune as gp
from gradprune import cli

MODULE = textwrap.dedent(
    """
    import logging
    import torch, torch.nn as nn

    def make_model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))

    def make_data():
        g = torch.Generator().manual_seed(1)
        return [(torch.randn(4, 8, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(4)]

    def loss_fn(model, batch):
        logging.getLogger("gradprune.firstuse").info("LOGLINE")
        return nn.functional.cross_entropy(model(batch[0]), batch[1])
    """
)


class Terminal(io.StringIO):
    """A stream that says it is a terminal, as a user's console does."""

    def isatty(self):
        return True


@pytest.fixture
def recipes(tmp_path, monkeypatch):
    (tmp_path / "firstuse_mod.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("firstuse_mod", None)


def _recipe(folder, name, body):
    path = folder / name
    path.write_text("model: firstuse_mod:make_model\ndata: firstuse_mod:make_data\n"
                    "loss_fn: firstuse_mod:loss_fn\n" + textwrap.dedent(body))
    return str(path)


def _model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, 8, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(4)]
    return model, data


def _loss(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


# ---------------------------------------------------------------------------------------------
# progress bars (tqdm) and logging


@pytest.mark.parametrize("show_progress, terminal, drawn", [
    (False, True, False),   # asked to be quiet: quiet even on a terminal
    (None, False, False),   # default, output not a terminal (a pipe, a log file, CI)
    (None, True, True),     # default on a terminal: a bar
    (True, False, True),    # forced
])
def test_progress_bar_only_where_asked_and_watched(monkeypatch, capsys, show_progress, terminal, drawn):
    model, data = _model_and_data()
    stream = Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    gp.prune(model, criterion="snip", sparsity=0.5, data=data, loss_fn=_loss, show_progress=show_progress)
    text = stream.getvalue()
    assert ("scoring (snip)" in text) == drawn, text
    assert capsys.readouterr().out == ""


def test_library_logs_instead_of_printing(recipes, capsys, caplog):
    from gradprune.demo import run_demo
    from gradprune.recipes import load_recipe, run_recipe

    recipe = load_recipe(_recipe(recipes, "one.yaml", "workflow: prune\noutput: out\nprune: {sparsity: 0.5}\n"))
    with caplog.at_level(logging.INFO, logger="gradprune"):
        run_recipe(recipe, base_dir=str(recipes), verbose=True)
        run_demo(str(recipes / "demo"), criteria=("magnitude",), patterns=("1x1",), sparsities=(0.5,),
                 epochs=1, finetune_epochs=1, verbose=True)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    messages = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("gradprune"))
    assert "overall sparsity" in messages and "dense CNN" in messages and "wrote" in messages


def test_command_log_lines_do_not_break_bars(recipes, monkeypatch, capsys):
    path = _recipe(recipes, "snip.yaml", "workflow: prune\noutput: out\nprune: {criterion: snip, sparsity: 0.5}\n")
    stream = Terminal()
    monkeypatch.setattr(sys, "stderr", stream)
    assert cli.main(["prune", "--config", path]) == 0
    text = stream.getvalue()
    assert "scoring (snip)" in text  # a bar was drawn
    lines = [line for line in text.split("\n") if "LOGLINE" in line]
    assert len(lines) == 4  # every log record arrives, once ...
    assert all(line.split("\r")[-1] == "LOGLINE" for line in lines)  # ... on a line of its own
    assert "overall sparsity" in capsys.readouterr().out  # the command's result, on stdout


# ---------------------------------------------------------------------------------------------
# commands do what their help says

GRADUAL = """\
workflow: gradual
prune: {criterion: magnitude, target_sparsity: 0.5, end_step: 4, frequency: 2}
train: {steps: 4}
"""


def test_prune_command_runs_one_shot_only(recipes, capsys):
    path = _recipe(recipes, "gradual.yaml", GRADUAL)
    assert cli.main(["prune", "--config", path]) == 2
    err = capsys.readouterr().err
    assert "'gradual' recipe" in err and "gradprune run" in err
    assert sorted(p.name for p in recipes.iterdir() if p.is_dir() and p.name != "__pycache__") == []
    with pytest.raises(SystemExit):
        cli.main(["prune", "--help"])
    assert "workflow: prune" in capsys.readouterr().out  # the help says so
    assert cli.main(["run", path]) == 0  # `run` is the command for it


@pytest.mark.parametrize("workflow", ["prune", "gradual"])
def test_default_output_folders_are_distinct_per_recipe(recipes, capsys, workflow):
    body = GRADUAL if workflow == "gradual" else "workflow: prune\nprune: {sparsity: 0.5}\n"
    for name in ("a.yaml", "b.yaml"):
        assert cli.main(["run", _recipe(recipes, name, body)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    for name in ("a", "b"):
        folder = recipes / f"{name}-out"
        assert sorted(p.name for p in folder.iterdir()) == ["masks.pt", "pruned_model.pt", "report.json"]
        assert str(folder) in out  # the output names the folder
    assert not (recipes / "gradprune-out").exists()


def test_second_run_is_refused_before_any_work_unless_overwrite(recipes, capsys, monkeypatch):
    path = _recipe(recipes, "one.yaml", "workflow: prune\noutput: results\nprune: {sparsity: 0.5}\n")
    assert cli.main(["prune", "--config", path]) == 0
    folder = recipes / "results"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    capsys.readouterr()

    import firstuse_mod

    make_model = firstuse_mod.make_model

    def no_work():
        raise AssertionError("the model was built although the run is refused")

    monkeypatch.setattr(firstuse_mod, "make_model", no_work)
    for argv in (["prune", "--config", path], ["run", path]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert str(folder) in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    monkeypatch.setattr(firstuse_mod, "make_model", make_model)
    assert cli.main(["prune", "--config", path, "--overwrite"]) == 0


def test_sparse_recipe_needs_train(recipes, capsys):
    path = _recipe(recipes, "s.yaml", "workflow: sparse\nsparse: {preset: rigl, density: 0.5}\n")
    assert cli.main(["run", path]) == 2
    assert "train" in capsys.readouterr().err
    assert not (recipes / "s-out").exists()
    from gradprune.recipes import RecipeError, validate_recipe

    with pytest.raises(RecipeError, match="train"):
        validate_recipe({"workflow": "sparse", "model": "firstuse_mod:make_model"})


# ---------------------------------------------------------------------------------------------
# a fair demo


def test_demo_dense_baseline_gets_the_same_extra_steps(tmp_path, monkeypatch):
    from gradprune.demo import format_summary, run_demo

    calls = []
    step = torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, *a, **k: (calls.append(1), step(self, *a, **k))[1])
    res = run_demo(str(tmp_path), criteria=("magnitude", "random"), patterns=("1x1",), sparsities=(0.5,),
                   epochs=1, finetune_epochs=2, verbose=False)
    steps = res["steps"]
    per_epoch = steps["pretrain"]
    assert per_epoch > 0 and steps["dense_finetune"] == 2 * per_epoch
    assert [r["finetune_steps"] for r in res["runs"]] == [steps["dense_finetune"]] * 2
    assert steps["finetune"] == steps["dense_finetune"]
    # every optimizer step taken is accounted for: pretraining, the dense baseline's extra steps, runs
    assert len(calls) == steps["pretrain"] + steps["dense_finetune"] + 2 * steps["finetune"]
    text = format_summary(res)
    assert "highest target sparsity" in text and "most accurate" in text  # what "best" means
    assert f"the same {steps['dense_finetune']} extra steps" in text
    assert res["best"]["rule"] in text


def test_every_command_option_is_described():
    parser = cli._parser()
    sub = next(a for a in parser._actions if a.choices and "demo" in a.choices)
    for name, command in [("gradprune", parser)] + sorted(sub.choices.items()):
        for action in command._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
    assert "--version" in parser.format_help()


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"gradprune {gp.__version__}"
