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
