#!/usr/bin/env python
"""Dynamic sparse training from scratch: gradprune ``SparseTrainer`` presets vs rigl-torch 0.5.2.

Runs in the virtualenv built by ``benchmarks/setup_dst_peers.sh`` (``.dst-venv``); it is a benchmark,
not a test.

Setting: MNIST-1D (generated offline with ``mnist1d.data.make_dataset``), two models (an MLP
40-256-256-10 and a small 1D CNN). Every method trains the same initialisation (per seed) from
scratch with the same optimizer (SGD, momentum 0.9, weight decay 5e-4, cosine learning rate), the
same number of steps, the same batch order, the same connectivity-update interval (100 steps),
drop fraction alpha = 0.3 (RigL; the SET and SNFS presets use their own 0.5) with cosine decay, and
the last update before 3/4 of training. Methods:

* dense;
* gradprune: static ERK mask, SET, RigL-ERK, RigL-uniform, RigL-uniform with the first layer kept
  dense (rigl-torch's allocation), SNFS, gradual magnitude pruning (Zhu & Gupta);
* rigl-torch ``RigLScheduler`` (uniform, first layer dense: the only allocation it has).

Reported, all measured by this script:

* test accuracy after training (mean +- std over seeds);
* density = fraction of nonzero weights in every Linear/Conv weight after training, per layer and
  overall (the same layer set for every method), and the library's own mask density next to it;
* wall time of a training step relative to dense training of the same model and seed, timed in
  the same process with interleaved chunks (see ``--help`` and the Markdown report).

Usage:
    .dst-venv/bin/python benchmarks/dst_vs_peers.py            # full run (3 seeds, ~20 min)
    .dst-venv/bin/python benchmarks/dst_vs_peers.py --quick    # smoke run (1 seed, 300 steps, 90%)
    .dst-venv/bin/python benchmarks/dst_vs_peers.py --merge A.json B.json --out STEM
        # one table from runs that differ only in their seeds and sparsities (e.g. more run later)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent

# --------------------------------------------------------------------------------------------
# rigl-torch imports torchvision (rigl_torch/util.py), which it does not declare. The only
# torchvision wheel available here (0.28.0, the release for torch 2.13.0) is a CUDA build whose
# import fails with "operator torchvision::nms does not exist" because its compiled operators do
# not load; its Python side then registers fake kernels for nms/qnms. Defining the two operator
# schemas (copied from torchvision/csrc/ops/nms.cpp and quantized/cpu/qnms_kernel.cpp) first lets
# it import; model classes work, torchvision.ops kernels do not (rigl-torch only needs isinstance
# checks against torchvision.models.resnet blocks).
# --------------------------------------------------------------------------------------------
for _op in ("nms", "qnms"):
    try:
        torch.library.define(f"torchvision::{_op}",
                             "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    except RuntimeError:  # already defined (a working torchvision was imported first)
        pass

try:
    from rigl_torch.RigL import RigLScheduler
    import torchvision
    RIGL_ERROR = None
except Exception as exc:
    RigLScheduler = None
    torchvision = None
    RIGL_ERROR = f"{type(exc).__name__}: {exc}"

try:
    import gradprune as gp
    GP_ERROR = None if hasattr(gp, "SparseTrainer") else "gradprune has no SparseTrainer yet"
except Exception as exc:
    gp = None
    GP_ERROR = f"{type(exc).__name__}: {exc}"


# --------------------------------------------------------------------------------------------
# data and models
# --------------------------------------------------------------------------------------------
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mnist1d_common import CNN1d, MLP, load_mnist1d  # noqa: E402  (shared with the other benchmark)


MODELS = {"mlp": MLP, "cnn": CNN1d}
MODEL_TEXT = {
    "mlp": "MLP 40→256→256→10 (ReLU)",
    "cnn": "1D CNN Conv1d(1→32,k5) → Conv1d(32→64,k5,s2) → Conv1d(64→64,k5,s2) → Linear(640→10) (ReLU)",
}


def weight_layers(model):
    """Every Linear/Conv weight, in forward order: the layers both libraries sparsify here."""
    return {f"{n}.weight": m.weight for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv1d))}


# --------------------------------------------------------------------------------------------
# methods
# --------------------------------------------------------------------------------------------
# key -> (label, family); gradprune configs are built in make_run
METHODS = {
    "dense": ("dense", "baseline"),
    "dense2": ("dense, 2nd identical copy (timing noise floor)", "baseline"),
    "gp_static": ("gradprune static (ERK random mask)", "gradprune"),
    "gp_set": ("gradprune SET (ER, random growth, α=0.5)", "gradprune"),
    "gp_set_signed": ("gradprune SET, prune=\"set_signed\" (smallest positive + largest negative, "
                      "Mocanu et al.'s drop)", "gradprune"),
    "gp_rigl_erk": ("gradprune RigL-ERK", "gradprune"),
    "gp_rigl_uniform": ("gradprune RigL-uniform (all layers)", "gradprune"),
    "gp_rigl_uniform_dfl": ("gradprune RigL-uniform, dense first layer (= rigl-torch allocation)", "gradprune"),
    "gp_rigl_uniform_dfl_regrow": ("gradprune RigL-uniform, dense first layer, regrow_dropped=True "
                                   "(= rigl-torch allocation and regrowth)", "gradprune"),
    "gp_rigl_uniform_dfl_disjoint": ("gradprune RigL-uniform, dense first layer, regrow_dropped=False, "
                                     "drop_rounding=\"half_up\" (the disjoint variant)", "gradprune"),
    "gp_snfs": ("gradprune SNFS (momentum growth + redistribution, α=0.5)", "gradprune"),
    "gp_gmp": ("gradprune gradual magnitude pruning (Zhu & Gupta)", "gradprune"),
    "rigl_torch": ("rigl-torch RigL (uniform, dense first layer)", "rigl-torch"),
}
SPARSE_METHODS = [k for k in METHODS if k not in ("dense", "dense2")]
# run by default (the regrow_dropped and set_signed variants only when asked for: --methods ...)
DEFAULT_METHODS = [k for k in SPARSE_METHODS
                   if k not in ("gp_rigl_uniform_dfl_regrow", "gp_rigl_uniform_dfl_disjoint", "gp_set_signed")]
# the extended-training block (RigL paper's "RigL_Nx"): these methods again, N times the steps
EXTENDED_METHODS = ["gp_rigl_erk", "gp_rigl_uniform_dfl", "rigl_torch"]


def method_label(key):
    """Label of a method key; ``<key>@xN`` is the same method trained N times as long."""
    base, _, mult = key.partition("@x")
    label = METHODS[base][0]
    return f"{label}, {mult}× steps" if mult else label


STATIC_NOTES = [
    "How rigl-torch 0.5.2 was made to import: rigl_torch/util.py imports torchvision, which "
    "rigl-torch does not declare; the only torchvision wheel here (0.28.0, built for torch 2.13.0) is "
    "a CUDA build that fails at import (\"operator torchvision::nms does not exist\"). This script "
    "defines `torchvision::nms` and `torchvision::qnms` with `torch.library.define(..., \"(Tensor dets, "
    "Tensor scores, float iou_threshold) -> Tensor\")` before importing rigl_torch; torchvision then "
    "imports (its model classes work, its ops kernels do not; rigl-torch only uses isinstance checks).",
    "Remaining differences between rigl-torch RigL and gradprune RigL-uniform with a dense first "
    "layer (same allocation, ΔT, α, cosine decay, T_end, 11 updates in the full run; measured update "
    "steps, 0-based: rigl-torch 99, 199, …, 1099 (it counts the call itself), gradprune 100, 200, …, "
    "1100 (after 100 optimizer steps); the RigL authors' code would also update at step 0); both drop "
    "floor(f·n_active) per layer and grow among every connection inactive after the drop, so a just-dropped "
    "connection may be regrown and keeps its value (gradprune's RigL preset since `drop_rounding=\"floor\"`, "
    "`regrow_dropped=True`; results made before that used round-half-up and disjoint growth, or the "
    "row says so); rigl-torch resets "
    "only SGD's momentum buffer, gradprune every optimizer state tensor shaped like the weight (same "
    "thing for SGD); rigl-torch masks gradients with a tensor hook during backward, gradprune after "
    "backward inside `step()`; ties: rigl-torch topk order, gradprune seeded random. Initial random "
    "masks differ (different random generators) but have the same per-layer counts.",
]


def gp_config(key, density, steps, interval, seed):
    common = dict(total_steps=steps, update_interval=interval, seed=seed, include_classifier=True)
    if key == "gp_static":
        return gp.SparseConfig.static(density=density, total_steps=steps, seed=seed, include_classifier=True)
    if key == "gp_set":
        return gp.SparseConfig.set(density=density, **common)
    if key == "gp_set_signed":
        return gp.SparseConfig.set(density=density, prune="set_signed", **common)
    if key == "gp_rigl_erk":
        return gp.SparseConfig.rigl(density=density, **common)
    if key == "gp_rigl_uniform":
        return gp.SparseConfig.rigl(density=density, init="uniform", **common)
    if key == "gp_rigl_uniform_dfl":
        return gp.SparseConfig.rigl(density=density, init="uniform", dense_first_layer=True, **common)
    if key == "gp_rigl_uniform_dfl_regrow":  # the preset's default since drop_rounding="floor" too
        return gp.SparseConfig.rigl(density=density, init="uniform", dense_first_layer=True,
                                    regrow_dropped=True, drop_rounding="half_up", **common)
    if key == "gp_rigl_uniform_dfl_disjoint":
        return gp.SparseConfig.rigl(density=density, init="uniform", dense_first_layer=True,
                                    regrow_dropped=False, drop_rounding="half_up", **common)
    if key == "gp_snfs":
        return gp.SparseConfig.snfs(density=density, **common)
    if key == "gp_gmp":
        return gp.SparseConfig.pruning(density=density, **common)
    raise KeyError(key)


class Run:
    """One model being trained by one method; advanced a chunk of steps at a time."""

    def __init__(self, kind, key, sparsity, init_state, args, seed, tag=""):
        self.kind, self.key, self.sparsity, self.seed = kind, key + tag, sparsity, seed
        self.model = MODELS[kind]()
        self.model.load_state_dict(init_state)
        self.model.train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=args.lr, momentum=0.9,
                                   weight_decay=args.weight_decay)
        self.sparse = self.sched = None
        self.error = None
        t_end = (3 * args.steps) // 4
        if key.startswith("gp_"):
            self.sparse = gp.SparseTrainer(self.model, self.opt,
                                           gp_config(key, 1.0 - sparsity, args.steps, args.interval, seed))
        elif key == "rigl_torch":
            torch.manual_seed(seed)  # rigl-torch draws its random masks from the global RNG
            self.sched = RigLScheduler(self.model, self.opt, dense_allocation=1.0 - sparsity,
                                       T_end=t_end, delta=args.interval, alpha=args.alpha,
                                       ignore_linear_layers=False)
        self.count0 = self.mask_counts()
        self.step_s: list[float] = []     # wall time of every step
        self.update: list[bool] = []      # whether that step was a connectivity update
        self.step = 0

    def one_step(self, x, y, lr):
        for g in self.opt.param_groups:
            g["lr"] = lr
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        if self.sparse is not None:
            upd = bool(self.sparse.step())
        elif self.sched is not None:
            upd = not self.sched()
            if not upd:
                self.opt.step()
        else:
            self.opt.step()
            upd = False
        self.step_s.append(time.perf_counter() - t0)
        self.update.append(upd)
        self.step += 1

    def mask_counts(self):
        """Active entries per masked layer according to the library (None: unmasked layer)."""
        layers = weight_layers(self.model)
        out = {n: None for n in layers}
        if self.sparse is not None:
            for n, m in self.sparse.masks.items():
                out[n] = int(m.sum())
        elif self.sched is not None:
            by_id = {id(w): n for n, w in layers.items()}
            for w, m in zip(self.sched.W, self.sched.backward_masks):
                if m is not None:
                    out[by_id[id(w)]] = int(m.sum())
        return out

    def nonzero_outside_mask(self):
        """Weights that are nonzero although the library's mask says inactive (should be 0)."""
        layers = weight_layers(self.model)
        masks = {}
        if self.sparse is not None:
            masks = dict(self.sparse.masks.items())
        elif self.sched is not None:
            by_id = {id(w): n for n, w in layers.items()}
            masks = {by_id[id(w)]: m for w, m in zip(self.sched.W, self.sched.backward_masks) if m is not None}
        return sum(int(((layers[n] != 0) & ~m.bool()).sum()) for n, m in masks.items())

    def mask_density(self):
        """The library's own view: active entries per masked layer (1.0 for unmasked layers)."""
        layers = weight_layers(self.model)
        out = {n: 1.0 for n in layers}
        if self.sparse is not None:
            for n, m in self.sparse.masks.items():
                out[n] = float(m.sum()) / m.numel()
        elif self.sched is not None:
            by_id = {id(w): n for n, w in layers.items()}
            for w, m in zip(self.sched.W, self.sched.backward_masks):
                if m is not None:
                    out[by_id[id(w)]] = float(m.sum()) / m.numel()
        return out


@torch.no_grad()
def accuracy(model, x, y):
    model.eval()
    acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return acc


def measured_density(model):
    ws = weight_layers(model)
    per = {n: float((w != 0).sum()) / w.numel() for n, w in ws.items()}
    nz = sum(int((w != 0).sum()) for w in ws.values())
    tot = sum(w.numel() for w in ws.values())
    return nz / tot, per


def batches(n, batch, steps, seed):
    """Batch index sequence: reshuffled each epoch, fixed by the seed (same for every method)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    out, perm, pos = [], torch.randperm(n, generator=g), 0
    for _ in range(steps):
        if pos + batch > n:
            perm, pos = torch.randperm(n, generator=g), 0
        out.append(perm[pos:pos + batch])
        pos += batch
    return out


def lr_at(step, steps, base):
    return 0.5 * base * (1.0 + math.cos(math.pi * step / steps))


# --------------------------------------------------------------------------------------------
# one (model, seed) block: all runs interleaved in chunks
# --------------------------------------------------------------------------------------------
def run_block(kind, seed, data, args, methods, sparsities, log, baselines=("dense", "dense2"), tag=""):
    """Train every method of ``methods`` (plus ``baselines``) for ``args.steps`` steps, interleaved in
    chunks; record keys get ``tag`` appended (the extended block uses ``@xN``)."""
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    init_state = {k: v.clone() for k, v in MODELS[kind]().state_dict().items()}
    order = batches(len(xtr), args.batch, args.steps, seed)
    runs, skipped = [], []
    for key in list(baselines) + [m for m in methods if m in SPARSE_METHODS]:
        if key.startswith("gp_") and GP_ERROR:
            skipped.append((key, GP_ERROR)); continue
        if key == "rigl_torch" and RIGL_ERROR:
            skipped.append((key, RIGL_ERROR)); continue
        for s in ([None] if key in ("dense", "dense2") else sparsities):
            try:
                runs.append(Run(kind, key, s, init_state, args, seed, tag))
            except Exception as exc:
                skipped.append((f"{key}@{s}", f"{type(exc).__name__}: {exc}"))
    # warm-up outside the timed steps: one forward/backward per model shape is enough for the
    # allocator; nothing is stepped (so training is unaffected)
    for r in runs[:1]:
        F.cross_entropy(r.model(xtr[:args.batch]), ytr[:args.batch]).backward()
        r.model.zero_grad(set_to_none=True)
    n_chunks = math.ceil(args.steps / args.chunk)
    t_block = time.perf_counter()
    for c in range(n_chunks):
        lo, hi = c * args.chunk, min(args.steps, (c + 1) * args.chunk)
        rot = c % len(runs)  # rotate the order so no run is always first/last in a chunk
        for r in runs[rot:] + runs[:rot]:
            if r.error:
                continue
            try:
                for t in range(lo, hi):
                    idx = order[t]
                    r.one_step(xtr[idx], ytr[idx], lr_at(t, args.steps, args.lr))
            except Exception as exc:
                r.error = f"{type(exc).__name__}: {exc}"
                log(f"  {kind} seed {seed} {r.key}@{r.sparsity}: FAILED at step {r.step}: {r.error}")
    log(f"  {kind} seed {seed}: {len(runs)} runs x {args.steps} steps in {time.perf_counter() - t_block:.0f} s")

    dense = next(r for r in runs if r.key == "dense" + tag)
    records = []
    for r in runs:
        rec = {"model": kind, "seed": seed, "method": r.key, "target_sparsity": r.sparsity}
        if r.error:
            rec["error"] = r.error
            records.append(rec)
            continue
        rec["test_acc"] = accuracy(r.model, xte, yte)
        rec["train_acc"] = accuracy(r.model, xtr, ytr)
        rec["density"], rec["density_per_layer"] = measured_density(r.model)
        rec["mask_density_per_layer"] = r.mask_density()
        rec["mask_count_initial"], rec["mask_count_final"] = r.count0, r.mask_counts()
        rec["nonzero_outside_mask"] = r.nonzero_outside_mask()
        rec["nonzero_count_final"] = {n: int((w != 0).sum()) for n, w in weight_layers(r.model).items()}
        rec["steps"] = args.steps
        if r.sparse is not None:
            rec["gradprune_reported_sparsity_per_layer"] = r.sparse.masks.sparsity(per_layer=True)
            rec["updates"] = int(r.sparse.updates)
            # RigL's accounting of one training step, relative to a dense step (gradprune's estimate)
            rec["train_flops_per_step_over_dense"] = r.sparse.training_flops(xtr[:1])["ratio"]
        elif r.sched is not None:
            rec["updates"] = int(r.sched.rigl_steps)
        else:
            rec["updates"] = 0
        # timing: per chunk, median step of this run / median dense step in the same chunk
        ratios, upd_ratios = [], []
        for c in range(n_chunks):
            lo, hi = c * args.chunk, min(args.steps, (c + 1) * args.chunk)
            d_med = statistics.median(dense.step_s[lo:hi])
            ratios.append(statistics.median(r.step_s[lo:hi]) / d_med)
            upd_ratios += [r.step_s[t] / d_med for t in range(lo, hi) if r.update[t]]
        rec["step_ms_median"] = 1000 * statistics.median(r.step_s)
        rec["step_over_dense"] = statistics.median(ratios)
        rec["update_step_over_dense"] = statistics.median(upd_ratios) if upd_ratios else None
        rec["n_update_steps"] = int(sum(r.update))
        rec["total_over_dense"] = sum(r.step_s) / sum(dense.step_s)
        records.append(rec)
    return records, skipped


# --------------------------------------------------------------------------------------------
# summary and report
# --------------------------------------------------------------------------------------------
BASE_STEPS = [1500]  # the main block's steps (set in main; the extended block trains N times longer)


def sort_key(r):
    base, _, mult = r["method"].partition("@x")
    return (r["target_sparsity"] or 0, int(mult or 1), list(METHODS).index(base))


def mean_std(v):
    v = [x for x in v if x is not None]
    if not v:
        return None
    return (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)


def summarise(records):
    groups = {}
    for r in records:
        groups.setdefault((r["model"], r["method"], r["target_sparsity"]), []).append(r)
    rows = []
    for (kind, key, s), rs in groups.items():
        ok = [r for r in rs if "error" not in r]
        row = {"model": kind, "method": key, "label": method_label(key), "target_sparsity": s,
               "n_seeds": len(ok), "errors": [r["error"] for r in rs if "error" in r]}
        if ok:
            for f in ("test_acc", "train_acc", "density", "step_over_dense", "update_step_over_dense",
                      "total_over_dense", "step_ms_median", "updates", "train_flops_per_step_over_dense"):
                row[f] = mean_std([r.get(f) for r in ok])
            # whole-run training FLOPs over a dense run of the base length (RigL's accounting)
            row["train_flops_total_over_dense"] = mean_std(
                [r["train_flops_per_step_over_dense"] * r["steps"] / BASE_STEPS[0]
                 if r.get("train_flops_per_step_over_dense") is not None else
                 (r["steps"] / BASE_STEPS[0] if r["method"].startswith("dense") else None) for r in ok])
            layers = list(ok[0]["density_per_layer"])
            row["density_per_layer"] = {n: mean_std([r["density_per_layer"][n] for r in ok]) for n in layers}
            row["mask_density_per_layer"] = {n: mean_std([r["mask_density_per_layer"][n] for r in ok])
                                             for n in layers}
        rows.append(row)
    return rows


def count_checks(records):
    """Plain-language results of the mask bookkeeping checks over all runs."""
    notes = []
    ok = [r for r in records if "error" not in r and r["method"] not in ("dense", "dense2")]
    outside = [r for r in ok if r["nonzero_outside_mask"]]
    notes.append("Weights nonzero outside the library's mask after training: "
                 + ("none in any run." if not outside else
                    "; ".join(f"{r['model']} {r['method']}@{r['target_sparsity']} seed {r['seed']}: "
                              f"{r['nonzero_outside_mask']}" for r in outside)))
    per_layer_methods = {"gp_static", "gp_set", "gp_set_signed", "gp_rigl_erk", "gp_rigl_uniform", "gp_rigl_uniform_dfl",
                         "rigl_torch"}
    bad = []
    for r in ok:
        a, b = r["mask_count_initial"], r["mask_count_final"]
        if r["method"].partition("@x")[0] in per_layer_methods and a != b:
            bad.append(f"{r['model']} {r['method']}@{r['target_sparsity']} seed {r['seed']}: {a} -> {b}")
        if r["method"] == "gp_snfs" and sum(v or 0 for v in a.values()) != sum(v or 0 for v in b.values()):
            bad.append(f"{r['model']} SNFS total changed seed {r['seed']}")
    notes.append("Active-connection counts from the first to the last step (per layer for static/SET/RigL "
                 "in both libraries, total for SNFS, which redistributes): "
                 + ("preserved exactly in every run." if not bad else "CHANGED: " + "; ".join(bad)))
    gap = [(r, n) for r in ok for n, c in r["nonzero_count_final"].items()
           if r["mask_count_final"].get(n) is not None and c < r["mask_count_final"][n]]
    if gap:
        runs = {(r["model"], r["method"], r["target_sparsity"], r["seed"]) for r, _ in gap}
        by_method = sorted({METHODS[m.partition("@x")[0]][0] for _, m, _, _ in runs})
        notes.append(f"In {len(runs)} runs ({', '.join(by_method)}) some ACTIVE weights are exactly 0 at the "
                     "end (measured density below mask density, shown in brackets in the per-layer tables "
                     "where the difference is large enough): connections grown at 0 that never received a "
                     "nonzero gradient afterwards because they lead into or out of ReLU units that are dead "
                     "on the training data. Random growth (SET) can pick such connections by design; "
                     "gradprune's score-based growth (RigL, SNFS) never grows a connection whose score is "
                     "exactly 0 (`grow_zero_score=False`, the default), so budget is not spent on them there.")
    else:
        notes.append("Active weights that are exactly 0 at the end: none in any run.")
    return notes


def fmt(ms, d=3, pct=False):
    if ms is None:
        return "–"
    m, s = ms
    if pct:
        return f"{100 * m:.1f} ± {100 * s:.1f}"
    return f"{m:.{d}f} ± {s:.{d}f}"


def write_markdown(path, meta, rows, skipped, records=()):
    a = meta["args"]
    L = []
    L.append("# Dynamic sparse training from scratch: gradprune vs rigl-torch")
    L.append("")
    L.append(f"Produced by: `{meta['command']}` (wall time {meta['wall_s'] / 60:.1f} min).")
    L.append("")
    L.append(f"Machine: {meta['machine']}; load average {meta['loadavg_start'][0]:.2f} at the start, "
             f"{meta['loadavg_end'][0]:.2f} at the end; `torch.set_num_threads({meta['threads']})` "
             "(one thread per process is steadier on a 2-core machine shared with other work and gives "
             "every method the same compute)"
             + ("; 1-min load before/after each (model, seed) block: " + ", ".join(
                 f"{b['model']} s{b['seed']} {b['load1_before']:.1f}/{b['load1_after']:.1f}"
                 for b in meta["loadavg_per_block"]) if meta.get("loadavg_per_block") else "")
             + ". Versions: "
             + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".")
    g = meta.get("git") or {}
    if g.get("per_run"):  # a merge of runs made from different commits
        L.append("")
        L.append("gradprune source, per merged run: " + "; ".join(
            f"`{x['path']}` commit `{str(x.get('commit', ''))[:10]}`"
            + (" plus uncommitted changes" if x.get("dirty_gradprune_files") else " (clean)")
            for x in g["per_run"]) + ".")
    elif g.get("commit"):
        dirty = [x.split()[-1] for x in g.get("dirty_gradprune_files", [])]
        L.append("")
        L.append(f"gradprune source: commit `{g['commit'][:10]}`"
                 + (f" plus uncommitted changes in {', '.join(f'`{x}`' for x in dirty)} (the working tree "
                    "as it was when the run started)" if dirty else " (clean)") + ".")
    L.append("")
    L.append("## Setting")
    L.append("")
    L.append("- Data: MNIST-1D generated offline (`make_dataset(get_dataset_args())`): 4000 train / 1000 "
             "test sequences of length 40, 10 classes.")
    L.append("- Models: " + "; ".join(MODEL_TEXT[k] for k in a["models"]) + ". Sparsified: every "
             "Linear/Conv weight (classifier included, biases never) — rigl-torch with "
             "`ignore_linear_layers=False`, gradprune with `include_classifier=True`.")
    L.append(f"- Seeds {a['seeds']}: the seed fixes the initialisation (one state dict loaded into every "
             "method's model), the batch order (identical for every method) and the libraries' mask "
             "randomness (gradprune `seed=`; rigl-torch draws from the global RNG, seeded just before "
             "its scheduler is built).")
    L.append(f"- Training, identical for every method: {a['steps']} steps, batch {a['batch']} "
             f"({a['steps'] * a['batch'] / 4000:.0f} epochs), SGD momentum 0.9, weight decay "
             f"{a['weight_decay']}, learning rate {a['lr']} with cosine decay to 0 (set by hand each step, "
             "so no LR-scheduler wrapper interferes with rigl-torch's patched `optimizer.step`). SGD "
             "rather than Adam because rigl-torch only masks SGD's momentum buffer (it does not touch "
             "Adam moments); the dense models reach the accuracies known for MNIST-1D.")
    L.append(f"- Connectivity updates every ΔT = {a['interval']} steps while step < T_end = "
             f"{(3 * a['steps']) // 4} (3/4 of training), cosine decay of the drop fraction, α = {a['alpha']} "
             "for RigL (both libraries); the SET and SNFS presets keep their published α = 0.5. On an "
             "update step the optimizer step is replaced by the update in both libraries. Gradual "
             "magnitude pruning (gradprune `SparseConfig.pruning`): cubic schedule from dense to the "
             "target, uniform per layer, prune events every ΔT between T/8 and 3T/4.")
    L.append("- rigl-torch 0.5.2 has one allocation, `uniform`, and it always keeps the first layer "
             "dense; `gradprune RigL-uniform, dense first layer` (`init=\"uniform\", "
             "dense_first_layer=True`) gives the same per-layer budget, so it is the like-for-like "
             "comparison. Both therefore use MORE weights than the target overall (see the density "
             "column); RigL-ERK, RigL-uniform (all layers), SET, SNFS, static and GMP meet the target "
             "overall.")
    L.append("- Call pattern: gradprune `sparse.step()` replaces `optimizer.step()`; rigl-torch "
             "`if scheduler(): optimizer.step()`; dense `optimizer.step()`.")
    L.append("")
    L.append("## Metrics")
    L.append("")
    L.append("- **test acc**: after the last step, mean ± std over seeds.")
    L.append("- **density**: fraction of NONZERO entries over all Linear/Conv weights after training, "
             "measured on the weights (not taken from the library); per-layer values in the second table.")
    L.append("- **step / dense**: wall time of a training step (zero_grad, forward, backward, the library's "
             "step) divided by a dense step of the same model and seed. Timing protocol: all runs of one "
             f"model and seed are built together and advanced in chunks of {a['chunk']} steps in rotating "
             "order, so every run is timed under the same machine load as the dense steps it is divided "
             "by; ratio = median over chunks of (median step of the run in the chunk / median dense step "
             "in the same chunk), then mean ± std over seeds. The median hides the rare update steps; "
             "the dense 2nd copy row shows the noise floor (ideally 1.00).")
    L.append("- **update step / dense**: median over the connectivity-update steps of (update step time / "
             "median dense step in the same chunk).")
    L.append("- **total / dense**: total training wall time (update steps included) over the dense run's.")
    L.append("- **training FLOPs / dense run**: FLOPs of the whole run over a dense run of the base length, "
             "RigL's accounting (forward 1x, backward 2x, sparse layers at their mask density, the dense "
             "gradient on update steps), from gradprune's `SparseTrainer.training_flops` (gradprune runs "
             "only; dense rows: the number of steps relative to the base run).")
    if a.get("extended"):
        L.append(f"- **{a['extended']}× steps** rows (the RigL paper's \"RigL_{a['extended']}x\" protocol): the "
                 f"same method trained {a['extended']} times as long at "
                 + ", ".join(f"{100 * x:.0f}%" for x in a["extended_sparsities"]) + f" sparsity ({a['extended'] * a['steps']} steps, "
                 "the cosine learning rate, ΔT, T_end = 3/4 of training and the batch order stretched with "
                 "it), in a second block with its own dense run of that length for timing. Sparse "
                 "training costs a fraction of dense training per step, so a longer sparse run can still "
                 "cost fewer FLOPs than the dense run of the base length (last column).")
    L.append("")
    for kind in a["models"]:
        mrows = [r for r in rows if r["model"] == kind]
        if not mrows:
            continue
        L.append(f"## {kind.upper()}: {MODEL_TEXT[kind]}")
        L.append("")
        dense = next((r for r in mrows if r["method"] == "dense"), None)
        if dense and "test_acc" in dense:
            L.append(f"Dense: test acc {fmt(dense['test_acc'])}, train acc {fmt(dense['train_acc'])}, "
                     f"dense step {fmt(dense['step_ms_median'], 2)} ms (median).")
            L.append("")
        L.append("| target sparsity | method | test acc | density (measured, %) | step / dense | "
                 "update step / dense | total / dense | updates | training FLOPs / dense run |")
        L.append("|---|---|---|---|---|---|---|---|---|")
        srt = sorted(mrows, key=sort_key)
        for r in srt:
            tgt = "none" if r["target_sparsity"] is None else f"{100 * r['target_sparsity']:.0f}%"
            if "test_acc" not in r:
                L.append(f"| {tgt} | {r['label']} | failed: {'; '.join(r['errors'])[:200]} | | | | | | |")
                continue
            upd = r["updates"][0] if r["updates"] else 0
            fl = r.get("train_flops_total_over_dense")
            L.append(f"| {tgt} | {r['label']} | {fmt(r['test_acc'])} | {fmt(r['density'], pct=True)} | "
                     f"{fmt(r['step_over_dense'], 2)} | {fmt(r['update_step_over_dense'], 2)} | "
                     f"{fmt(r['total_over_dense'], 2)} | {upd:.0f} | {f'{fl[0]:.2f}' if fl else '–'} |")
        L.append("")
        layers = None
        for r in srt:
            if "density_per_layer" in r:
                layers = list(r["density_per_layer"])
                break
        if layers:
            L.append(f"Per-layer density after training, % nonzero weights measured (the library's own "
                     f"mask density in brackets where it differs by more than 0.05 points), mean over seeds:")
            L.append("")
            L.append("| target sparsity | method | " + " | ".join(f"{n} ({n_el})" for n, n_el in
                                                         meta["layer_sizes"][kind].items()) + " |")
            L.append("|---|---|" + "---|" * len(layers))
            for r in srt:
                if "density_per_layer" not in r or r["method"] == "dense2":
                    continue
                tgt = "none" if r["target_sparsity"] is None else f"{100 * r['target_sparsity']:.0f}%"
                cells = []
                for n in layers:
                    d = 100 * r["density_per_layer"][n][0]
                    m = 100 * r["mask_density_per_layer"][n][0]
                    cells.append(f"{d:.2f}" + (f" [{m:.2f}]" if abs(d - m) > 0.05 else ""))
                L.append(f"| {tgt} | {r['label']} | " + " | ".join(cells) + " |")
            L.append("")
    if skipped:
        L.append("## Skipped")
        L.append("")
        for k, why in sorted(set(skipped)):
            L.append(f"- {k}: {why}")
        L.append("")
    L += goals(rows, a, records)
    notes = list(meta.get("notes") or []) + list(meta.get("extra_notes") or [])
    if notes:
        L.append("## Notes")
        L.append("")
        for n in notes:
            L.append(f"- {n}")
        L.append("")
    Path(path).write_text("\n".join(L))


def goals(rows, a, records=()):
    """The issue's goals, checked on the means of this run (the ± columns give the spread)."""
    def row(kind, key, s):
        return next((r for r in rows if r["model"] == kind and r["method"] == key
                     and r["target_sparsity"] == s and "test_acc" in r), None)
    def paired(kind, k1, k2, s, ahead="gradprune", verdict=False):
        """Per-seed differences (same seed: same initial weights and batch order for both);
        ``verdict``: also say whether k1 is significantly behind (paired t <= -2)."""
        acc = {(r["method"], r["seed"]): r["test_acc"] for r in records
               if r.get("model") == kind and r.get("target_sparsity") == s and "test_acc" in r}
        d = [acc[(k1, sd)] - acc[(k2, sd)] for (m, sd) in acc if m == k1 and (k2, sd) in acc]
        if len(d) < 2:
            return ""
        se = statistics.stdev(d) / math.sqrt(len(d))
        t = statistics.mean(d) / se if se > 0 else float("nan")
        return (f"; paired over {len(d)} seeds: mean difference {statistics.mean(d):+.4f} ± {se:.4f} (s.e.), "
                f"t = {t:+.2f}, {ahead} ahead in {sum(x > 0 for x in d)}, behind in {sum(x < 0 for x in d)}"
                + (("; not significantly behind (t > -2)" if t > -2 else "; significantly behind (t <= -2)")
                   if verdict and t == t else ""))

    L = ["## Goals (checked on the means of this run)", ""]
    if "cnn" in a["models"]:
        dense = row("cnn", "dense", None)
        for key in ("gp_rigl_erk", f"gp_rigl_erk@x{a.get('extended')}"):
            r = row("cnn", key, 0.9)
            if dense and r:
                gap = dense["test_acc"][0] - r["test_acc"][0]
                fl = r.get("train_flops_total_over_dense")
                L.append(f"- CNN, {r['label']} at 90%: {r['test_acc'][0]:.3f} vs dense {dense['test_acc'][0]:.3f} "
                         f"({a['steps']} steps): {100 * gap:+.1f} points below dense -> "
                         + ("within 1 point" if gap <= 0.01 else "NOT within 1 point")
                         + (f" (training FLOPs {fl[0]:.2f}x the dense run's)" if fl else ""))
    tags = [""] + ([f"@x{a['extended']}"] if a.get("extended") else [])
    like = {"gp_rigl_uniform_dfl": "gradprune RigL (rigl-torch's allocation)",
            "gp_rigl_uniform_dfl_regrow": "gradprune RigL (rigl-torch's allocation, regrow_dropped=True)",
            # dst_rigl_details.py's experiment: every remaining rigl-torch detail matched
            "gp_rigl_matched": "gradprune RigL (rigl-torch's allocation, timing, drop count, regrowth)"}
    for kind in a["models"]:
        for s, tag in [(s, tag) for tag in tags for s in a["sparsities"]]:
            for key, label in like.items():
                g, t = row(kind, key + tag, s), row(kind, "rigl_torch" + tag, s)
                if not (g and t):
                    continue
                d = g["test_acc"][0] - t["test_acc"][0]
                L.append(f"- {kind.upper()} {100 * s:.0f}%{', ' + tag[2:] + '× steps' if tag else ''}: {label} "
                         f"{g['test_acc'][0]:.3f} ± {g['test_acc'][1]:.3f} vs rigl-torch {t['test_acc'][0]:.3f} "
                         f"± {t['test_acc'][1]:.3f} -> mean " + ("at or above" if d >= 0 else "below")
                         + f" rigl-torch's ({d:+.3f}"
                         + paired(kind, key + tag, "rigl_torch" + tag, s, verdict=True) + ")")
    for kind in a["models"]:  # the sign-split SET drop against the preset's magnitude drop
        for s in a["sparsities"]:
            g, t = row(kind, "gp_set_signed", s), row(kind, "gp_set", s)
            if g and t:
                d = g["test_acc"][0] - t["test_acc"][0]
                L.append(f"- {kind.upper()} {100 * s:.0f}%: SET with prune=\"set_signed\" {g['test_acc'][0]:.3f} "
                         f"± {g['test_acc'][1]:.3f} vs SET preset (magnitude drop) {t['test_acc'][0]:.3f} ± "
                         f"{t['test_acc'][1]:.3f} ({d:+.3f}" + paired(kind, "gp_set_signed", "gp_set", s, "set_signed")
                         + ")")
    over = {}
    for r in rows:
        base = r["method"].partition("@x")[0]
        if base.startswith("gp_") and "@x" not in r["method"] and r.get("step_over_dense"):
            over.setdefault(r["model"], []).append(r["step_over_dense"][0] - 1)
    tor = {r["model"]: [] for r in rows}
    for r in rows:
        if r["method"] == "rigl_torch" and r.get("step_over_dense"):
            tor[r["model"]].append(r["step_over_dense"][0] - 1)
    allv = [v for vs in over.values() for v in vs]
    if allv:
        per = "; ".join(f"{k.upper()} {100 * statistics.mean(v):+.1f}% (max {100 * max(v):+.1f}%)"
                        + (f", rigl-torch {100 * statistics.mean(tor[k]):+.1f}%" if tor.get(k) else "")
                        for k, v in over.items())
        m = statistics.mean(allv)
        L.append(f"- Per-step overhead vs dense (median step, ΔT = {a['interval']}), mean over every gradprune "
                 f"method and sparsity: {100 * m:+.1f}% -> " + ("met (≤ 5%)" if m <= 0.05 else "NOT met (> 5%)")
                 + f"; per model: {per}.")
    L.append("")
    return L


# --------------------------------------------------------------------------------------------
def script_path() -> str:
    """How the running script is named in the recorded command (this one, or a script that
    imports it, such as ``dst_rigl_details.py``)."""
    name = Path(sys.argv[0]).name
    return f"benchmarks/{name}" if name.endswith(".py") else "benchmarks/dst_vs_peers.py"


MERGE_MAY_DIFFER = ("seeds", "extended", "extended_sparsities", "out", "render", "merge", "no_noise_floor", "peers_from")


def peer_records(paths, runs, peer_paths):
    """The records of the peers' methods the runs did not train (rigl-torch: never gradprune's or
    the baselines', which a gradprune change may affect or which each run times itself)
    taken from earlier runs, for the (model, seed) pairs the runs trained: a peer's result depends
    only on the seed (the same initial weights, batches and global-RNG seed in every run) on one
    machine and environment (the dense runs must agree exactly, checked), so ``--peers-from`` saves
    rerunning it. The settings must agree as for ``--merge``."""
    a0 = runs[0]["meta"]["args"]
    have = {(r.get("model"), r.get("seed")) for d in runs for r in d["records"]}
    mine = {r.get("method") for d in runs for r in d["records"]}
    tags = {m.partition("@x")[2] for m in mine}  # only the step lengths and sparsities the runs trained
    levels = {r.get("target_sparsity") for d in runs for r in d["records"]}
    base_dense = {(r.get("model"), r.get("seed")): r.get("test_acc") for d in runs for r in d["records"]
                  if r.get("method") == "dense"}
    out, seen = [], set()
    for p in peer_paths:
        d = json.load(open(p))
        diff = sorted(k for k in set(a0) | set(d["meta"]["args"])
                      if k not in MERGE_MAY_DIFFER + ("methods", "sparsities") and a0.get(k) != d["meta"]["args"].get(k))
        if diff:
            raise ValueError(f"{p} differs from {paths[0]} in {', '.join(diff)}")
        # the same seed gives the same result only on the same machine and environment: the dense
        # runs of both must agree exactly, or the peer's rows are not this run's
        dense = {(r.get("model"), r.get("seed")): r.get("test_acc") for r in d["records"] if r.get("method") == "dense"}
        differ = sorted(k for k, v in base_dense.items() if k in dense and dense[k] != v)
        if differ or not set(base_dense) & set(dense):
            raise ValueError(f"{p}: its dense runs differ from these runs' ({differ[:5]}...): another machine "
                             "or environment, so its peer rows cannot be paired with these runs'")
        for r in d["records"]:
            key = (r.get("model"), r.get("method"), r.get("target_sparsity"), r.get("seed"))
            if METHODS.get(r.get("method", "").partition("@x")[0], ("", "gradprune"))[1] in ("gradprune", "baseline") \
                    or r.get("method") in mine or (r.get("model"), r.get("seed")) not in have or key in seen \
                    or r.get("method", "").partition("@x")[2] not in tags or r.get("target_sparsity") not in levels:
                continue
            seen.add(key)
            out.append(r)
    return out


# what a run's result is (same seed, machine and environment: the same values); the timing
# fields are not part of it (each run times itself)
RESULT_FIELDS = ("test_acc", "train_acc", "density", "nonzero_count_final")


def check_mergeable(paths, runs):
    """Raise ValueError unless the runs agree on every setting but those in ``MERGE_MAY_DIFFER``
    and the sparsity levels (the merged run covers the union of those)."""
    a0 = runs[0]["meta"]["args"]
    for p, d in zip(paths[1:], runs[1:]):
        diff = sorted(k for k in set(a0) | set(d["meta"]["args"])
                      if k not in MERGE_MAY_DIFFER + ("sparsities",) and a0.get(k) != d["meta"]["args"].get(k))
        if diff:
            raise ValueError(f"{p} differs from {paths[0]} in "
                             + ", ".join(f"{k} ({d['meta']['args'].get(k)!r} vs {a0.get(k)!r})" for k in diff)
                             + ": only the seeds and sparsities may differ")


def merged_records(paths, runs):
    """The records of every run, each (model, method, sparsity, seed) once. A baseline run (dense)
    that several runs trained for the same seed is kept once if its results (``RESULT_FIELDS``)
    are identical in all of them (the same seed on the same machine and environment gives the
    same result); a baseline that differs, or any other record found twice, is refused."""
    records, first = [], {}
    for p, d in zip(paths, runs):
        for r in d["records"]:
            key = (r.get("model"), r.get("method"), r.get("target_sparsity"), r.get("seed"))
            if key not in first:
                first[key] = (p, r)
                records.append(r)
                continue
            p0, r0 = first[key]
            model, method, sparsity, seed = key
            if METHODS.get(method or "", ("", ""))[1] != "baseline" or sparsity is not None:
                raise ValueError(f"{p}: {method} at sparsity {sparsity} for model {model}, seed {seed} is "
                                 f"already in {p0}: a sparse run may appear in one run only")
            diff = [f"{k} {r.get(k)!r} vs {r0.get(k)!r}" for k in RESULT_FIELDS if r.get(k) != r0.get(k)]
            if diff:
                raise ValueError(f"{p}: its {method} run for model {model}, seed {seed} differs from the one "
                                 f"in {p0} ({'; '.join(diff)}): the runs were not made on the same machine "
                                 "and environment, so their records cannot be paired")
    return records


def merge_runs(paths, out, peer_paths=()):
    """Write one result from several runs' JSON files (e.g. more seeds or sparsity levels run
    later). The runs must agree on every setting but the seeds, the sparsity levels and the
    extended runs (:func:`check_mergeable`); no sparse (model, method, sparsity, seed) may appear
    twice, and a dense run trained by several of them must give the same result in each
    (:func:`merged_records`); the Markdown then reports every seed and level of every run.
    ``peer_paths``: earlier runs whose records of the methods these runs did not train are added
    (see :func:`peer_records`)."""
    runs = [json.load(open(p)) for p in paths]
    a0 = runs[0]["meta"]["args"]
    check_mergeable(paths, runs)
    records = merged_records(paths, runs)
    peers = peer_records(paths, runs, peer_paths) if peer_paths else []
    records += peers
    meta = dict(runs[0]["meta"])
    args = dict(a0)
    if peers:
        args["methods"] = list(a0["methods"]) + sorted({r["method"].partition("@x")[0] for r in peers}
                                                       - set(a0["methods"]))
    args["seeds"] = sorted({sd for d in runs for sd in d["meta"]["args"]["seeds"]})
    args["sparsities"] = sorted({sp for d in runs for sp in d["meta"]["args"]["sparsities"]})
    args["extended"] = max((d["meta"]["args"].get("extended") or 0) for d in runs)
    args["out"] = str(out)
    meta["args"] = args
    meta["command"] = " ".join([".dst-venv/bin/python", script_path(), "--merge"]
                               + [str(p) for p in paths]
                               + (["--peers-from"] + [str(p) for p in peer_paths] if peer_paths else [])
                               + ["--out", str(out)])
    meta["merged_from"] = [{"path": str(p), "command": d["meta"]["command"], "git": d["meta"].get("git"),
                            "seeds": d["meta"]["args"]["seeds"], "sparsities": d["meta"]["args"]["sparsities"],
                            "wall_s": d["meta"].get("wall_s"),
                            **({"merged_from": d["meta"]["merged_from"]} if d["meta"].get("merged_from") else {})}
                           for p, d in zip(paths, runs)]
    commits = {json.dumps(d["meta"].get("git"), sort_keys=True) for d in runs}
    if len(commits) > 1:  # the runs were made from different sources: name each (see write_markdown)
        meta["git"] = {"per_run": [{"path": m["path"], **(m["git"] or {})} for m in meta["merged_from"]]}
    meta["wall_s"] = sum(d["meta"].get("wall_s") or 0.0 for d in runs)
    meta["loadavg_per_block"] = [b for d in runs for b in d["meta"].get("loadavg_per_block", [])]
    meta["notes"] = list(STATIC_NOTES) + count_checks(records)
    meta["extra_notes"] = [f"Merged from {len(runs)} runs: " + "; ".join(
        f"`{m['command']}` (seeds {m['seeds'][0]}-{m['seeds'][-1]}, sparsities "
        f"{', '.join(f'{100 * x:g}%' for x in m['sparsities'])}, git {str((m['git'] or {}).get('commit', ''))[:10]})"
        for m in meta["merged_from"]) + ". Timing ratios are per run (each divides by its own dense "
        "steps), so averaging them over the runs is fair; runs with extended steps contribute the "
        "extended rows alone; a dense run trained by several runs (same seed, identical results, "
        "checked) is reported once, timed by the first; the wall time above is the sum of the runs' "
        "(they may have run at the same time)."]
    for p, d in zip(paths, runs):  # what an already merged input said about its own parts
        meta["extra_notes"] += [f"From `{p}`: {n}" for n in d["meta"].get("extra_notes") or []]
    if peers:
        meta["extra_notes"].append(
            f"The rows of {', '.join(sorted({method_label(r['method']) for r in peers}))} are taken "
            f"from {', '.join(f'`{p}`' for p in peer_paths)} ({len(peers)} records, the same seeds; "
            "`--peers-from`, its dense runs identical to these runs'): a peer's result depends only "
            "on the seed there, so it was not trained again in these runs; its timing ratios divide by "
            "that run's own dense steps.")
    BASE_STEPS[0] = args["steps"]
    skipped = [x for d in runs for x in d.get("skipped", [])]
    rows = summarise(records)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    json.dump({"meta": meta, "summary": rows, "records": records, "skipped": skipped},
              open(tmp, "w"), indent=1, default=str)
    os.replace(tmp, out.with_suffix(".json"))
    write_markdown(out.with_suffix(".md"), meta, rows, skipped, records)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 300 steps, 90%% only")
    p.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=list(MODELS))
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=SPARSE_METHODS)
    p.add_argument("--sparsities", nargs="+", type=float, default=None)
    p.add_argument("--seeds", nargs="+", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--interval", type=int, default=100, help="ΔT: steps between connectivity updates")
    p.add_argument("--alpha", type=float, default=0.3, help="rigl-torch's alpha (gradprune RigL preset: 0.3)")
    p.add_argument("--chunk", type=int, default=50, help="steps per timing chunk")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--extended", type=int, default=None,
                   help="also train RigL-ERK and both RigL-uniform-dense-first-layer runs N times as long "
                        "(RigL_Nx; full run: 5, quick: off)")
    p.add_argument("--extended-sparsities", nargs="+", type=float, default=[0.9])
    p.add_argument("--out", default=None, help="output stem (default benchmarks/results/dst_vs_peers[_quick])")
    p.add_argument("--render", metavar="JSON", default=None,
                   help="only rewrite the Markdown next to JSON from its records (no training)")
    p.add_argument("--merge", metavar="JSON", nargs="+", default=None,
                   help="combine the records of runs that differ only in their seeds and sparsities (and "
                        "--extended) into --out (JSON + Markdown; no training); a dense run several of "
                        "them trained must give identical results in each")
    p.add_argument("--no-noise-floor", action="store_true",
                   help="skip the second dense copy (the timing noise floor row): less compute")
    p.add_argument("--peers-from", metavar="JSON", nargs="+", default=None,
                   help="with --merge: add the records of the methods the merged runs did not train "
                        "(e.g. rigl_torch, which a gradprune change cannot affect) from earlier runs, "
                        "for the same seeds")
    args = p.parse_args(argv)
    if args.merge:
        if not args.out:
            p.error("--merge needs --out")
        merge_runs([Path(x) for x in args.merge], Path(args.out), [Path(x) for x in args.peers_from or ()])
        return
    if args.render:
        src = Path(args.render)
        d = json.load(open(src))
        BASE_STEPS[0] = d["meta"]["args"]["steps"]
        d["meta"]["notes"] = list(STATIC_NOTES) + count_checks(d["records"])
        write_markdown(src.with_suffix(".md"), d["meta"], summarise(d["records"]), d.get("skipped", []), d["records"])
        json.dump(d, open(src, "w"), indent=1, default=str)
        print(f"rewrote {src.with_suffix('.md')}")
        return
    if args.quick:
        args.seeds = args.seeds or [0]
        args.steps = args.steps or 300
        args.sparsities = args.sparsities or [0.9]
    elif args.extended is None:
        args.extended = 5
    args.seeds = args.seeds or [0, 1, 2]
    args.steps = args.steps or 1500
    BASE_STEPS[0] = args.steps
    args.sparsities = args.sparsities or [0.8, 0.9, 0.95]
    torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else HERE / "results" / ("dst_vs_peers_quick" if args.quick else "dst_vs_peers")
    out.parent.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore", message=".*lr_scheduler.*")

    def log(msg):
        print(msg, flush=True)

    t0 = time.perf_counter()
    load_start = os.getloadavg()
    log(f"load average at start: {load_start}")
    if GP_ERROR:
        log(f"gradprune unavailable: {GP_ERROR}")
    if RIGL_ERROR:
        log(f"rigl-torch unavailable: {RIGL_ERROR}")
    data = load_mnist1d()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except Exception:
        cpu = platform.processor() or "unknown CPU"
    import importlib.metadata as md

    def ver(name):
        try:
            return md.version(name)
        except Exception:
            return "not installed"
    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                "gradprune": ver("gradprune"), "rigl-torch": ver("rigl-torch"),
                "torchvision": ver("torchvision"), "mnist1d": ver("mnist1d")}
    def git(*cmd):
        import subprocess
        try:
            return subprocess.run(["git", *cmd], cwd=HERE.parent, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except Exception:
            return ""
    meta_git = {"commit": git("rev-parse", "HEAD"),
                "dirty_gradprune_files": git("status", "--porcelain", "--", "src/gradprune").splitlines()}
    meta = {
        "git": meta_git,
        "command": " ".join([".dst-venv/bin/python", script_path()] +
                            [shlex.quote(x) for x in (sys.argv[1:] if argv is None else argv)]),
        "machine": f"{os.cpu_count()}-core CPU ({cpu}), {platform.system()} {platform.machine()}, no GPU",
        "threads": args.threads, "versions": versions, "args": vars(args),
        "layer_sizes": {k: {n: w.numel() for n, w in weight_layers(MODELS[k]()).items()} for k in args.models},
        "notes": list(STATIC_NOTES),
    }
    records, skipped = [], []

    def dump(final=False):
        meta["loadavg_end"] = os.getloadavg()
        meta["wall_s"] = time.perf_counter() - t0
        meta["loadavg_start"] = load_start
        meta["complete"] = final
        rows = summarise(records)
        json.dump({"meta": meta, "summary": rows, "records": records, "skipped": skipped},
                  open(out.with_suffix(".json"), "w"), indent=1, default=str)
        write_markdown(out.with_suffix(".md"), meta, rows, skipped, records)

    for kind in args.models:
        for seed in args.seeds:
            load_before = os.getloadavg()[0]
            recs, sk = run_block(kind, seed, data, args, args.methods, args.sparsities, log,
                                 baselines=("dense",) if args.no_noise_floor else ("dense", "dense2"))
            if args.extended and args.extended > 1:
                ext = argparse.Namespace(**{**vars(args), "steps": args.steps * args.extended})
                r2, s2 = run_block(kind, seed, data, ext, [m for m in EXTENDED_METHODS if m in args.methods],
                                   args.extended_sparsities, log, baselines=("dense",), tag=f"@x{args.extended}")
                recs, sk = recs + r2, sk + s2
            meta.setdefault("loadavg_per_block", []).append(
                {"model": kind, "seed": seed, "load1_before": load_before, "load1_after": os.getloadavg()[0]})
            records += recs
            skipped += sk
            for r in recs:
                if "error" in r:
                    continue
                log(f"    {r['method']:20s} {str(r['target_sparsity']):5s} acc {r['test_acc']:.3f} "
                    f"density {r['density']:.4f} step/dense {r['step_over_dense']:.2f} "
                    f"total/dense {r['total_over_dense']:.2f}")
            dump()
    meta["notes"] += count_checks(records)
    dump(final=True)
    log(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')} in {(time.perf_counter() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
