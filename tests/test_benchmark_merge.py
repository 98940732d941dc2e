"""``benchmarks/dst_vs_peers.py --merge``: which runs it combines into one result.

The runs are built from the records of a committed result (real records, so the Markdown writer
sees what a real run writes). The benchmark's module is driven in a subprocess: importing it
defines two ``torchvision::`` operator schemas (its workaround for rigl-torch's torchvision
import), which must not leak into the test process.
"""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "benchmarks" / "results" / "dst_rigl_reference_cnn_10seeds.json"

DRIVER = r"""
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import dst_vs_peers as b
out = {}
for case, paths in json.loads(sys.argv[2]).items():
    stem = Path(sys.argv[3]) / f"merged_{case}"
    try:
        b.merge_runs([Path(p) for p in paths], stem)
    except ValueError as exc:
        out[case] = {"error": str(exc)}
        continue
    d = json.load(open(stem.with_suffix(".json")))
    out[case] = {"sparsities": d["meta"]["args"]["sparsities"], "seeds": d["meta"]["args"]["seeds"],
                 "keys": sorted([r["method"], r["target_sparsity"] or 0, r["seed"]] for r in d["records"]),
                 "md": stem.with_suffix(".md").read_text()}
print(json.dumps(out))
"""


def _run(tmp_path, seeds, sparsity, relabel=None, edit=None, args=None):
    """A run's JSON: the dense and gradprune records of ``seeds`` at ``sparsity`` from SOURCE,
    their sparsity relabelled to ``relabel`` (a run at another level), ``edit`` applied to
    each record and ``args`` to the settings."""
    d = json.loads(SOURCE.read_text())
    recs = [dict(r) for r in d["records"] if r["seed"] in seeds and r["method"] != "rigl_torch"
            and r["target_sparsity"] in (None, sparsity)]
    for r in recs:
        if r["target_sparsity"] is not None and relabel is not None:
            r["target_sparsity"] = relabel
        if edit:
            edit(r)
    meta = d["meta"]
    meta["args"] = {**meta["args"], "seeds": list(seeds), "sparsities": [relabel or sparsity],
                    "methods": ["gp_rigl_uniform_dfl"], **(args or {})}
    meta.pop("merged_from", None)
    meta.pop("extra_notes", None)
    path = tmp_path / f"run{len(list(tmp_path.glob('run*.json')))}.json"
    path.write_text(json.dumps({"meta": meta, "summary": [], "records": recs, "skipped": []}))
    return str(path)


def _merge(tmp_path, cases):
    res = subprocess.run([sys.executable, "-c", DRIVER, str(ROOT / "benchmarks"), json.dumps(cases),
                          str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def _bump(r):
    if r["method"] == "dense" and r["seed"] == 1:
        r["test_acc"] += 0.001


def test_merge_takes_the_union_of_sparsities_and_checks_repeated_dense_runs(tmp_path):
    at_90 = _run(tmp_path, [0, 1], 0.9)
    at_80 = _run(tmp_path, [0, 1], 0.9, relabel=0.8)  # the same dense runs, gradprune rows at "80%"
    more_seeds = _run(tmp_path, [2], 0.9)
    other_dense = _run(tmp_path, [0, 1], 0.9, relabel=0.8, edit=_bump)
    other_lr = _run(tmp_path, [2], 0.9, relabel=0.8, args={"lr": 0.05})
    out = _merge(tmp_path, {"levels": [at_90, at_80, more_seeds], "dense_differs": [at_90, other_dense],
                            "sparse_twice": [at_90, at_90], "lr_differs": [at_90, other_lr]})

    ok = out["levels"]
    assert ok["sparsities"] == [0.8, 0.9] and ok["seeds"] == [0, 1, 2]
    # each dense run once; every sparse (method, level, seed) of every run
    assert ok["keys"] == sorted([["dense", 0, s] for s in (0, 1, 2)]
                                + [["gp_rigl_uniform_dfl", 0.8, s] for s in (0, 1)]
                                + [["gp_rigl_uniform_dfl", 0.9, s] for s in (0, 1, 2)])
    assert "| 80% | gradprune RigL-uniform" in ok["md"] and "| 90% | gradprune RigL-uniform" in ok["md"]

    err = out["dense_differs"]["error"]
    assert "dense run for model cnn, seed 1 differs" in err and "test_acc" in err
    assert "already in" in out["sparse_twice"]["error"]
    assert "lr (0.05 vs 0.1)" in out["lr_differs"]["error"]
