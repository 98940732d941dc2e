"""Multi-file outputs are written as a set: a failure at any point leaves the previous set intact and
loadable, killed writes leave no temporaries behind after the next write, files get the umask's
permissions, and every damaged file is reported by its path."""

import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

import gradprune as gp
from gradprune import cli
from gradprune.config import atomic_write
from gradprune.structured import export as export_mod
from gradprune.structured import load_pruned, save_pruned

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def _make():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def _small(width=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 2))


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _entries(root):
    return sorted(os.path.relpath(os.path.join(d, n), root)
                  for d, dirs, files in os.walk(root) for n in dirs + files)


# ---------------------------------------------------------------------------------------------
# save_pruned

@pytest.mark.parametrize("swap", ["exchange", "two_renames"])
def test_save_pruned_failure_on_the_second_file_keeps_the_previous_set(tmp_path, monkeypatch, swap):
    if swap == "two_renames":  # where the OS has no atomic exchange
        from gradprune import _io
        monkeypatch.setattr(_io, "_exchange", lambda a, b: False)
    path = tmp_path / "small"
    old = _small(3)
    save_pruned(old, path)
    before = _entries(tmp_path)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(export_mod.json, "dump", boom)  # writing architecture.json fails
        with pytest.raises(OSError, match="disk full"):
            save_pruned(_small(5, seed=1), path)
    assert _same(load_pruned(_make, path), old)        # the previous pair, not new weights + old record
    assert _entries(tmp_path) == before                 # no temporaries left
    new = _small(5, seed=1)
    save_pruned(new, path)
    assert _same(load_pruned(_make, path), new)
    assert _entries(tmp_path) == before


def test_save_pruned_into_the_working_directory(tmp_path, monkeypatch):
    path = tmp_path / "small"
    save_pruned(_small(3), path)
    monkeypatch.chdir(path)
    save_pruned(_small(5), ".")
    assert load_pruned(_make, path)[0].out_features == 5
    assert sorted(os.listdir(tmp_path)) == ["small"]
    assert sorted(os.listdir(path)) == ["architecture.json", "model.pt"]


def test_save_pruned_keeps_other_files_in_the_folder(tmp_path):
    path = tmp_path / "small"
    save_pruned(_small(3), path)
    (path / "notes.txt").write_text("mine")
    save_pruned(_small(5), path)
    assert (path / "notes.txt").read_text() == "mine"
    assert load_pruned(_make, path)[0].out_features == 5


_KILLED = textwrap.dedent("""
    import os, sys, torch, torch.nn as nn
    sys.path.insert(0, {src!r})
    from gradprune.structured import save_pruned
    from gradprune.config import atomic_write
    real = torch.save
    def dying_save(obj, f, *a, **k):
        real(obj, f, *a, **k)
        os._exit(3)                       # killed mid-set: after the first file, before the rename
    torch.save = dying_save
    if sys.argv[1] == "swap":             # killed between moving the old folder aside and the new in
        from gradprune import _io
        torch.save = real
        _io._exchange = lambda a, b: False
        real_rename = os.rename
        def dying_rename(a, b):
            real_rename(a, b)
            if ".gradprune-old-" in os.fspath(b):
                os._exit(3)
        os.rename = dying_rename
        save_pruned(nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2)), sys.argv[2])
    elif sys.argv[1] == "set":
        save_pruned(nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2)), sys.argv[2])
    else:
        atomic_write(sys.argv[2], lambda t: torch.save({{"a": torch.ones(2)}}, t))
""")


@pytest.mark.parametrize("kind", ["set", "file", "swap"])
def test_killed_write_leaves_old_output_and_next_write_cleans_up(tmp_path, kind):
    target = tmp_path / ("x.pt" if kind == "file" else "small")
    old = _small(3)
    if kind != "file":
        save_pruned(old, target)
        (target / "notes.txt").write_text("mine")
    else:
        atomic_write(target, lambda t: torch.save({"a": torch.zeros(2)}, t))
    before = _entries(tmp_path)
    proc = subprocess.run([sys.executable, "-c", _KILLED.format(src=SRC), kind, str(target)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    if kind == "set":
        assert _same(load_pruned(_make, target), old)
    elif kind == "file":
        assert torch.equal(torch.load(target, weights_only=True)["a"], torch.zeros(2))
    assert _entries(tmp_path) != before                 # the killed process left a temporary
    if kind != "file":
        save_pruned(old, target)                        # "swap": the folder moved aside is restored first
        assert (target / "notes.txt").read_text() == "mine"
    else:
        atomic_write(target, lambda t: torch.save({"a": torch.zeros(2)}, t))
    assert _entries(tmp_path) == before                 # ... which the next write removed


# ---------------------------------------------------------------------------------------------
# recipe outputs

_RECIPE = """
workflow: prune
model: tiny:make_model
output: out
prune:
  target_sparsity: 0.5
"""


def test_recipe_outputs_are_one_set(tmp_path, monkeypatch, capsys):
    (tmp_path / "tiny.py").write_text("import torch.nn as nn\n"
                                      "def make_model():\n"
                                      "    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))\n")
    (tmp_path / "r.yaml").write_text(_RECIPE)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert cli.main(["run", str(tmp_path / "r.yaml")]) == 0
    out = tmp_path / "out"
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    assert sorted(before) == ["masks.pt", "pruned_model.pt", "report.json"]
    real, calls = torch.save, []

    def second_fails(obj, f, *a, **k):
        calls.append(f)
        if len(calls) == 2:
            raise OSError("disk full")
        with open(f, "wb") as fh:
            fh.write(b"new and different")

    monkeypatch.setattr(torch, "save", second_fails)
    assert cli.main(["run", str(tmp_path / "r.yaml"), "--overwrite"]) != 0
    assert "disk full" in capsys.readouterr().err
    monkeypatch.setattr(torch, "save", real)
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before
    assert sorted(os.listdir(tmp_path)) == ["out", "r.yaml", "tiny.py"] + (
        ["__pycache__"] if (tmp_path / "__pycache__").exists() else [])
    sys.modules.pop("tiny", None)


# ---------------------------------------------------------------------------------------------
# loading: the record against the weights, damaged files by path

def test_load_pruned_checks_the_record_against_the_weights(tmp_path):
    path = tmp_path / "small"
    save_pruned(_small(3), path)
    arch = json.loads((path / "architecture.json").read_text())
    arch["modules"]["0"]["out_features"] = 5
    arch["modules"]["2"]["in_features"] = 5
    (path / "architecture.json").write_text(json.dumps(arch))
    with pytest.raises(ValueError) as err:
        load_pruned(_make, path)
    msg = str(err.value)
    assert str(path / "model.pt") in msg and "'0.weight'" in msg


def test_load_pruned_rejects_a_model_instance():
    with pytest.raises(TypeError, match="not a model instance"):
        load_pruned(_make(), "anywhere")


@pytest.mark.parametrize("damage", ["truncated_pt", "truncated_json", "invalid_json"])
def test_damaged_files_are_named(tmp_path, damage):
    path = tmp_path / "small"
    save_pruned(_small(3), path)
    if damage == "truncated_pt":
        bad = path / "model.pt"
        bad.write_bytes(bad.read_bytes()[:50])
    else:
        bad = path / "architecture.json"
        bad.write_text(bad.read_text()[:20] if damage == "truncated_json" else "{'single': quotes}")
    with pytest.raises(ValueError, match="(?s)" + str(bad).replace(".", r"\.")):
        load_pruned(_make, path)


@pytest.mark.parametrize("loader", ["load_masks", "load_selection"])
def test_non_safetensors_file_is_named(tmp_path, loader):
    st = pytest.importorskip("gradprune.integrations.safetensors")
    pytest.importorskip("safetensors")
    bad = tmp_path / "masks.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not js}")
    with pytest.raises(ValueError, match=str(bad).replace(".", r"\.")):
        getattr(st, loader)(bad)
    st.save_masks({"w": torch.ones(3, dtype=torch.bool)}, bad)
    good = bad.read_bytes()
    bad.write_bytes(good[: len(good) - 2])                  # truncated
    with pytest.raises(ValueError, match=str(bad).replace(".", r"\.")):
        getattr(st, loader)(bad)


# ---------------------------------------------------------------------------------------------
# permissions

@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_outputs_get_the_umask_permissions(tmp_path, umask):
    old = os.umask(umask)
    try:
        save_pruned(_small(3), tmp_path / "small")
        save_pruned(_small(3), tmp_path / "small")          # a replaced set too
        atomic_write(tmp_path / "x.pt", lambda t: torch.save({}, t))
        gp.PruneConfig().to_yaml(tmp_path / "c.yaml")
    finally:
        os.umask(old)
    for f in ("small/model.pt", "small/architecture.json", "x.pt", "c.yaml"):
        assert stat.S_IMODE(os.stat(tmp_path / f).st_mode) == 0o666 & ~umask, f
    assert stat.S_IMODE(os.stat(tmp_path / "small").st_mode) == 0o777 & ~umask


def test_damaged_pretrained_weights_are_named(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    from gradprune.structured import load_pruned_pretrained

    cfg = transformers.BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=16, max_position_embeddings=16)
    transformers.BertModel(cfg).save_pretrained(tmp_path / "bert")
    weights = tmp_path / "bert" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=str(weights).replace(".", r"\.")):
        load_pruned_pretrained(transformers.BertModel, tmp_path / "bert")


def test_a_linked_output_folder_stays_a_link(tmp_path):
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    save_pruned(_small(3), tmp_path / "link")
    save_pruned(_small(5), tmp_path / "link")
    assert os.path.islink(tmp_path / "link")
    assert load_pruned(_make, tmp_path / "real")[0].out_features == 5
