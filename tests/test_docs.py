"""Every example in the README, in docs/ and in the docstrings runs.

Every fenced code block of ``README.md`` and ``docs/**/*.md`` is found here automatically, so a new
page or block is covered without editing this file:

- ``python``/``py`` blocks are executed, each in a fresh namespace in a temporary working
  directory. A page whose blocks deliberately build on each other (a walkthrough) says so in its
  prose and carries ``<!-- doc-test: in-order REASON -->``: its blocks then run top to bottom in one
  namespace, as a reader would run them. A block marked ``<!-- doc-test: torchrun -->`` (a script
  for several processes) is written to a file and run under
  ``torchrun --standalone --nproc_per_node 2`` (CPU, gloo), unless it is a verbatim copy of a script
  that a shell block runs under torchrun. Tests that start torchrun are marked ``slow``.
- ``yaml`` blocks are parsed with ``yaml.safe_load``; a gradprune recipe (a mapping with
  ``workflow:``) is also validated by the recipe loader.
- ``bash``/``sh``/``console`` blocks: each command that calls ``gradprune``, ``torchrun`` or
  ``python`` runs in a temporary directory holding copies of the repository files it names
  (``gradprune`` through its entry point ``gradprune.cli.main``, in this process). The README's set-up
  commands, which build a virtual environment, are listed in ``SETUP_COMMANDS`` with the reason
  they are not run here; any other command fails this test.
- ``text`` blocks (upstream code quoted by the migration guides, program output) are not run.

A block opts out only with ``<!-- doc-test: skip REASON -->`` on the line before it, and the reason
must be given. ``OPT_OUTS`` lists every such block, so a new opt-out is a visible change here.
"""

from __future__ import annotations

import dataclasses
import doctest
import importlib
import io
import os
import pathlib
import pkgutil
import re
import shlex
import shutil
import subprocess
import sys
from contextlib import redirect_stdout

import pytest
import torch
import yaml

import gradprune
from gradprune.recipes import validate_recipe

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

PYTHON, SHELL, YAML, NOT_RUN = {"python", "py"}, {"bash", "sh", "shell", "console"}, {"yaml", "yml"}, {"text"}
_FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", flags=re.S | re.M)
_MARKER = re.compile(r"<!--\s*doc-test:\s*([\w-]+)(.*?)-->", flags=re.S)
MARKERS = {"skip", "in-order", "torchrun"}

# The README's two set-up commands build a virtual environment and install the package into it
# (minutes, and the network or a pip cache); the second then runs this very test suite. They are
# checked by a new-user run on a fresh clone, and test_readme_commands_match_ci pins the second.
SETUP_COMMANDS = {
    'python3 -m venv .venv && .venv/bin/pip install -q -c constraints.txt -e ".[demo]" && '
    '.venv/bin/gradprune demo': "creates a virtual environment and installs the package",
    'python3 -m venv .venv && .venv/bin/pip install -q -c constraints.txt -e ".[dev]" && '
    '.venv/bin/python -m pytest': "creates a virtual environment and runs this test suite",
}
# Every block that opts out, as (page, reason): keep this list short.
OPT_OUTS = {
    ("docs/distributed.md", "needs two machines"),
    ("docs/distributed.md", "needs two machines with 8 processes each, and your own train.py"),
}


@dataclasses.dataclass(frozen=True)
class Block:
    page: str          # relative to the repository root
    line: int          # line of the opening fence
    lang: str
    body: str
    markers: tuple     # (name, argument) of the doc-test markers on the line before the fence

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def _blocks(page: pathlib.Path) -> list[Block]:
    text = page.read_text(encoding="utf-8")
    rel = page.relative_to(ROOT).as_posix()
    out, end = [], 0
    for m in _FENCE.finditer(text):
        before = text[end:m.start()].rstrip("\n").splitlines()
        last = before[-1].strip() if before else ""
        markers = tuple((k, arg.strip()) for k, arg in _MARKER.findall(last))
        out.append(Block(rel, text.count("\n", 0, m.start()) + 1, m.group(1).strip(), m.group(2), markers))
        end = m.end()
    return out


def _page_markers(page: pathlib.Path) -> list[tuple[str, str]]:
    prose = _FENCE.sub("", page.read_text(encoding="utf-8"))
    return [(k, arg.strip()) for k, arg in _MARKER.findall(prose)]


BLOCKS = [b for page in PAGES for b in _blocks(page)]
IN_ORDER = {page.relative_to(ROOT).as_posix() for page in PAGES
            if any(k == "in-order" for k, _ in _page_markers(page))}


def _marker(block: Block, name: str):
    return next((arg for k, arg in block.markers if k == name), None)


def _uses_torchrun(block: Block) -> bool:
    return _marker(block, "torchrun") is not None or (
        block.lang in SHELL and any(c.split()[0] == "torchrun" for c in _commands(block)))


def _selected(langs, *, in_order: bool | None = None, torchrun: bool = False):
    # two processes under torchrun take 20-60 s on 2 shared cores: marked slow (-m "not slow" skips)
    return [pytest.param(b, id=b.id, marks=[pytest.mark.slow] if _uses_torchrun(b) else [])
            for b in BLOCKS
            if b.lang in langs and _marker(b, "skip") is None
            and (in_order is None or (b.page in IN_ORDER) == in_order)
            and (_marker(b, "torchrun") is not None) == torchrun]


# ---------------------------------------------------------------------------------------------
# the blocks are well-formed, and the opt-outs are few and explained

def test_every_page_has_balanced_fences_and_known_block_kinds():
    assert len(PAGES) >= 8 and len(BLOCKS) >= 80
    for page in PAGES:
        lines = page.read_text(encoding="utf-8").splitlines()
        assert sum(1 for ln in lines if ln.startswith("```")) % 2 == 0, f"{page}: an unclosed code fence"
    for b in BLOCKS:
        assert b.lang in PYTHON | SHELL | YAML | NOT_RUN, \
            f"{b.id}: a ```{b.lang} block; name its language (python, bash, yaml or text)"


def test_every_marker_is_known_and_every_opt_out_gives_its_reason():
    for page in PAGES:
        for name, _ in _MARKER.findall(page.read_text(encoding="utf-8")):
            assert name in MARKERS, f"{page}: unknown marker doc-test: {name}"
        rel = page.relative_to(ROOT).as_posix()
        skips = [arg for name, arg in _page_markers(page) if name == "skip"]
        assert len(skips) == sum(1 for b in BLOCKS if b.page == rel and _marker(b, "skip") is not None), \
            f"{page}: a skip marker must be on the line right before a code block"
        for name, arg in _page_markers(page):
            if name == "in-order":
                assert arg, f"{page}: say why the page's blocks build on each other"
    skipped = {(b.page, _marker(b, "skip")) for b in BLOCKS if _marker(b, "skip") is not None}
    for b in BLOCKS:
        reason = _marker(b, "skip")
        assert reason is None or reason.strip(), f"{b.id}: an opt-out without a reason"
    assert skipped == OPT_OUTS


# ---------------------------------------------------------------------------------------------
# python

def _check_files_md(out, ns):
    assert out.split() == ["None", "selection", "None"]


def _check_structured_search(out, ns):
    assert "params:" in out
    found = ns["found"]
    assert found.flops <= 0.5 * found.dense_flops and found.params <= 0.7 * found.dense_params


# What a block prints or leaves behind, beyond running: (page, python block number) -> check.
OUTPUT_CHECKS = {
    ("README.md", 1): lambda out, ns: ("overall sparsity" in out) or pytest.fail(out),
    ("docs/files.md", 1): _check_files_md,
    ("docs/structured.md", 1): _check_structured_search,
    ("docs/structured.md", 2): lambda out, ns: ("output is a model output" in out) or pytest.fail(out),
}


def _python_number(block: Block) -> int:
    same_page = [b for b in BLOCKS if b.page == block.page and b.lang in PYTHON]
    return same_page.index(block) + 1


def _exec(block: Block, namespace: dict):
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        exec(compile(block.body, f"{block.page} (block at line {block.line})", "exec"), namespace)
    out = buffer.getvalue()
    sys.stdout.write(out)
    check = OUTPUT_CHECKS.get((block.page, _python_number(block)))
    if check is not None:
        check(out, namespace)


@pytest.fixture
def doc_env(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)          # anything a block writes lands in a temporary directory
    monkeypatch.setenv("MPLBACKEND", "Agg")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)             # tiny tensors: one thread is fastest on a shared machine
    torch.manual_seed(0)
    yield tmp_path
    torch.set_num_threads(threads)


@pytest.mark.parametrize("block", _selected(PYTHON, in_order=False))
def test_python_block_runs_on_its_own(block, doc_env):
    _exec(block, {"__name__": "__doc_block__"})


@pytest.mark.parametrize("page", sorted(IN_ORDER))
def test_python_blocks_of_a_walkthrough_run_in_order(page, doc_env):
    blocks = [b for b in BLOCKS if b.page == page and b.lang in PYTHON and _marker(b, "skip") is None]
    assert blocks
    namespace = {"__name__": "__doc_block__"}
    for block in blocks:
        _exec(block, namespace)


def test_every_output_check_names_a_python_block():
    python = {(b.page, _python_number(b)) for b in BLOCKS if b.lang in PYTHON}
    assert set(OUTPUT_CHECKS) <= python


# ---------------------------------------------------------------------------------------------
# yaml

@pytest.mark.parametrize("block", _selected(YAML))
def test_yaml_block_parses(block):
    data = yaml.safe_load(block.body)
    assert data is not None, f"{block.id}: an empty YAML block"
    if isinstance(data, dict) and "workflow" in data:   # a gradprune recipe
        validate_recipe(data)
    first, _, rest = block.body.partition("\n")
    named = ROOT / first.lstrip("# ").strip()
    if first.startswith("# ") and named.is_file():       # "# path/to/file.yaml": a copy of that file
        assert rest == named.read_text(encoding="utf-8"), f"{block.id} differs from {named}"


# ---------------------------------------------------------------------------------------------
# shell, and scripts for several processes

def _commands(block: Block) -> list[str]:
    lines = block.body.splitlines()
    if block.lang == "console":     # commands follow "$ "; the other lines are output
        lines = [ln[2:] for ln in lines if ln.startswith("$ ")]
    commands, current = [], ""
    for line in lines:
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        command = re.sub(r"(^|\s)#.*$", "", current).strip()
        current = ""
        if command:
            commands.append(command)
    return commands


def _torchrun() -> str:
    path = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if path is None:
        pytest.skip("torchrun is not installed next to this Python")
    return path


def _env() -> dict:
    src = str(ROOT / "src")
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg",
                PYTHONPATH=src if not path else src + os.pathsep + path)


def _copy_named_files(args: list[str], workdir: pathlib.Path):
    """Copy the repository files a command names (with the rest of their folder: a recipe's
    ``tiny.py``) into the working directory, so nothing is written into the repository."""
    for arg in args:
        source = ROOT / arg
        if arg.startswith("-") or os.path.isabs(arg) or not source.exists() or source == ROOT:
            continue
        folder = source if source.is_dir() else source.parent
        if folder == ROOT:
            shutil.copy(source, workdir / arg)
        else:
            target = workdir / folder.relative_to(ROOT)
            if not target.exists():
                shutil.copytree(folder, target)


def _gradprune(args: list[str], workdir: pathlib.Path, monkeypatch) -> None:
    """``gradprune ARGS`` through the CLI entry point, in this process (no second torch import)."""
    from gradprune.cli import main

    monkeypatch.chdir(workdir)
    path, modules = list(sys.path), set(sys.modules)
    try:
        rc = main(args)
    finally:                            # a recipe imports its own modules (tiny.py) from its folder
        sys.path[:] = path
        for name in set(sys.modules) - modules:
            if str(getattr(sys.modules[name], "__file__", None) or "").startswith(str(workdir)):
                del sys.modules[name]
    assert rc == 0, f"gradprune {shlex.join(args)} exited with {rc}"


def _run(argv: list[str], workdir: pathlib.Path) -> str:
    from test_distributed import run_torchrun  # repeats a run only on gloo's teardown abort

    if os.path.basename(argv[0]) == "torchrun":
        proc = run_torchrun(argv, timeout=600, env=_env(), cwd=workdir)
    else:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=_env(), cwd=workdir)
    assert proc.returncode == 0, f"{shlex.join(argv)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.parametrize("block", _selected(SHELL))
def test_shell_block_runs(block, tmp_path, monkeypatch):
    commands = _commands(block)
    assert commands, f"{block.id}: a shell block without a command"
    outputs = []
    for command in commands:
        if command in SETUP_COMMANDS:
            continue
        args = shlex.split(command)
        program, args = args[0], args[1:]
        _copy_named_files(args, tmp_path)
        if program == "gradprune":
            _gradprune(args, tmp_path, monkeypatch)
            continue
        if program == "torchrun":
            argv = [_torchrun(), *args]
        elif program in ("python", "python3"):
            argv = [sys.executable, *args]
        else:
            pytest.fail(f"{block.id}: `{command}` cannot be run by the tests; list it in SETUP_COMMANDS "
                        "with a reason, or mark the block <!-- doc-test: skip REASON -->")
        outputs.append(_run(argv, tmp_path))
    if any("examples/distributed_ddp.py" in c for c in commands):
        assert "gradual: sparsity 0.50" in "".join(outputs)


@pytest.mark.parametrize("block", _selected(PYTHON, torchrun=True))
def test_torchrun_block_runs_in_two_processes(block, tmp_path):
    for shell in BLOCKS:                # a copy of a script that a shell block runs: run there once
        if shell.lang in SHELL and _marker(shell, "skip") is None:
            for args in map(shlex.split, _commands(shell)):
                files = [ROOT / a for a in args if args[0] == "torchrun" and (ROOT / a).is_file()]
                if any(f.read_text(encoding="utf-8") == block.body for f in files):
                    pytest.skip(f"runs as {files[0].relative_to(ROOT)} by the command in {shell.id}")
    script = tmp_path / "block.py"
    script.write_text(block.body, encoding="utf-8")
    _run([_torchrun(), "--standalone", "--nproc_per_node", "2", str(script)], tmp_path)


# ---------------------------------------------------------------------------------------------
# the README's commands and the docstrings

def test_readme_commands_match_ci():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    test_cmd = [line for line in ci.splitlines() if "pytest" in line and not line.startswith("#")]
    assert len(test_cmd) == 1
    assert test_cmd[0].strip() in readme
    assert test_cmd[0].strip() in SETUP_COMMANDS
    assert "gradprune demo" in readme


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
