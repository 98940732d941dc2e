"""How uncalibrated width scores are put on one scale across kinds of groups (not a test).

On the 6.3M LLaMA-GQA bench model (``benchmarks/llm_model.py``), seed 0's 32 calibration windows
of ``benchmarks/llm_structured.py``: ``gp.search(axes=("heads", "mlp"))`` with
``method="activation"`` (per-layer widths) and ``method="magnitude", uniform=True`` (the
benchmark's uniform-magnitude peer) at 75% and 50% of the parameters, one-shot held-out
perplexity (32 test windows), under three rules for comparing KV groups with MLP neurons:

* ``raw``: the scores as they are (gradprune before ``WidthScore.calibrated``);
* ``sum per kind``: each kind's scores divided by the mean group total of that kind
  (``gradprune.structured.scoring.per_kind_scale``, the rule gradprune now uses);
* ``mean per unit``: each kind's scores divided by its mean unit score.

Run with 1 thread::

    OMP_NUM_THREADS=1 python benchmarks/llm_kind_scale.py

Writes ``benchmarks/results/llm_kind_scale.json`` and ``.md``.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import llm_model  # noqa: E402
import llm_structured as bench  # noqa: E402

import gradprune as gp  # noqa: E402
from gradprune.structured import scoring  # noqa: E402

search_module = sys.modules["gradprune.structured.search"]
OUT = Path(__file__).parent / "results"


def mean_per_unit(analysis, scores, groups):
    """``{kind: mean unit score}`` (the alternative rule measured here)."""
    per = {}
    for gi in groups:
        per.setdefault(analysis.groups[gi].unit, []).append(scores[gi].to(torch.float64))
    return {k: float(torch.cat(v).mean()) or 1.0 for k, v in per.items()}


RULES = {"raw": None, "sum per kind": scoring.per_kind_scale, "mean per unit": mean_per_unit}


def main():
    torch.set_num_threads(1)
    base = llm_model.load()
    ids = llm_model.token_ids()
    test = llm_model.sequences(ids["test"], n=32)
    calib = list(llm_model.sequences(ids["train"], n=32, seed=1000).split(8))
    dense = bench.count(base)
    registered = dict(scoring.WIDTH_SCORES)
    rows = []
    try:
        for method, uniform in (("activation", False), ("magnitude", True)):
            for rule, scale in RULES.items():
                for name in ("activation", "magnitude"):
                    scoring.WIDTH_SCORES[name] = dataclasses.replace(registered[name], calibrated=scale is None)
                search_module.per_kind_scale = scale or scoring.per_kind_scale
                for budget in (75, 50):
                    data = calib if method == "activation" else None
                    found = gp.search(base, {"params": int(budget / 100 * dense)}, data,
                                      bench.loss_fn if data else None, method=method,
                                      example_input=calib[0][:1], axes=("heads", "mlp"),
                                      max_iter_data_loader=len(calib), show_progress=False, uniform=uniform)
                    small = found.export().eval()
                    groups = found.analysis.groups
                    rows.append({"method": method, "uniform": uniform, "rule": rule, "budget": budget,
                                 "params": bench.count(small) / dense, "ppl_oneshot": bench.ppl(small, test),
                                 "kv_groups": [found.widths[gi] for gi, g in enumerate(groups) if g.unit == "heads"],
                                 "mlp": [found.widths[gi] for gi, g in enumerate(groups) if g.unit != "heads"]})
                    print(rows[-1], flush=True)
    finally:
        scoring.WIDTH_SCORES.update(registered)
        search_module.per_kind_scale = scoring.per_kind_scale
    OUT.mkdir(exist_ok=True)
    cmd = "OMP_NUM_THREADS=1 python benchmarks/llm_kind_scale.py"
    (OUT / "llm_kind_scale.json").write_text(json.dumps({"command": cmd, "dense_params": dense,
                                                         "rows": rows}, indent=1))
    lines = ["# Comparing KV groups with MLP neurons: uncalibrated scores on the 6.3M LLaMA-GQA model", "",
             f"`{cmd}` (seed 0's calibration windows, one-shot, no distillation)", "",
             "| score | budget | rule | params | ppl one-shot | KV groups kept per layer (of 2) | MLP width per layer |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        score = r["method"] + (" (uniform)" if r["uniform"] else "")
        lines.append(f"| {score} | {r['budget']}% | {r['rule']} | {r['params']:.1%} | {r['ppl_oneshot']:.1f} | "
                     f"{r['kv_groups']} | {r['mlp']} |")
    (OUT / "llm_kind_scale.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
