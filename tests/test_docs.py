"""Every example in the README and in the docstrings runs."""

import doctest
import importlib
import pathlib
import pkgutil
import re

import pytest

import gradprune

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _modules():
    names = ["gradprune"]
    for info in pkgutil.walk_packages(gradprune.__path__, "gradprune."):
        if info.name.endswith("__main__"):
            continue
        names.append(info.name)
    return names


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


def _readme_blocks():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_python_examples_run(capsys):
    blocks = _readme_blocks()
    assert len(blocks) >= 3
    namespace = {}
    for block in blocks:  # blocks build on each other, as a reader would run them
        exec(compile(block, "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert "overall sparsity" in out


def test_readme_commands_match_ci():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    test_cmd = [line for line in ci.splitlines() if "pytest" in line and not line.startswith("#")]
    assert len(test_cmd) == 1
    assert test_cmd[0].strip() in readme
    assert "gradprune demo" in readme
