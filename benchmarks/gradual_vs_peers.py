#!/usr/bin/env python
"""Gradual pruning during fine-tuning: gradprune vs Intel Neural Compressor 3.7.1 vs torch.nn.utils.prune.

Runs in the peer virtualenv built by ``benchmarks/setup_peers.sh`` (``.bench-venv``); it is a
benchmark, not a test.

Setting: MNIST-1D (generated offline with ``mnist1d.data.make_dataset``), two models (an MLP
40-256-256-10 and a small 1D CNN). For every seed a dense model is trained first; every method then
fine-tunes a copy of that same dense model with the same optimizer (fresh Adam), the same number of
steps and the same batch order, pruning gradually with the same pattern, target sparsity and
schedule (start/end/frequency, exp decay). Reported, all measured by this script:

* test accuracy after fine-tuning (mean +- std over seeds);
* achieved sparsity = fraction of exact zeros in the weights of the pruned layers after training,
  and whether those zeros follow the requested pattern;
* time per fine-tuning step (median over steps) relative to a dense fine-tuning run of the same
  model/seed in the same process; the time spent inside the pruning library's hooks per step after
  the last prune event (mask enforcement), relative to the dense step.

Usage:
    .bench-venv/bin/python benchmarks/gradual_vs_peers.py            # full run (3 seeds)
    .bench-venv/bin/python benchmarks/gradual_vs_peers.py --quick    # smoke test (1 seed, few steps)
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
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

warnings.filterwarnings("ignore", message=".*pkg_resources.*")

HERE = Path(__file__).resolve().parent

# --------------------------------------------------------------------------------------------
# optional libraries
# --------------------------------------------------------------------------------------------
try:
    import gradprune as gp
    GP_ERROR = None if hasattr(gp, "Pruner") else "gradprune has no Pruner yet"
except Exception as exc:  # the package is being written; the peers still run
    gp = None
    GP_ERROR = f"{type(exc).__name__}: {exc}"

try:
    from neural_compressor.training import WeightPruningConfig, prepare_compression
    import neural_compressor
    INC_ERROR = None
except Exception as exc:
    neural_compressor = None
    INC_ERROR = f"{type(exc).__name__}: {exc}"

import torch.nn.utils.prune as tprune


def quiet_inc():
    # INC logs every prune event at INFO; logging costs time inside its hooks, so silence it.
    for name in ("neural_compressor", ""):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        from neural_compressor.utils.logger import Logger
        Logger().get_logger().setLevel(logging.WARNING)
    except Exception:
        pass


# --------------------------------------------------------------------------------------------
# data and models
# --------------------------------------------------------------------------------------------
def load_mnist1d():
    from mnist1d.data import get_dataset_args, make_dataset
    d = make_dataset(get_dataset_args())  # generated locally; never get_dataset() (it downloads)
    return (torch.tensor(d["x"], dtype=torch.float32), torch.tensor(d["y"], dtype=torch.long),
            torch.tensor(d["x_test"], dtype=torch.float32), torch.tensor(d["y_test"], dtype=torch.long))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(40, 256)
        self.fc2 = nn.Linear(256, 256)
        self.head = nn.Linear(256, 10)

    def forward(self, x):
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))


class CNN1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(1, 32, 5, padding=2)             # 40 -> 40
        self.conv2 = nn.Conv1d(32, 64, 5, stride=2, padding=2)  # 40 -> 20
        self.conv3 = nn.Conv1d(64, 64, 5, stride=2, padding=2)  # 20 -> 10
        self.head = nn.Linear(64 * 10, 10)

    def forward(self, x):
        x = x.unsqueeze(1)
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return self.head(x.flatten(1))


MODELS = {"mlp": MLP, "cnn": CNN1d}
# Modules whose .weight is pruned: every hidden layer, never the final classifier, never biases.
# conv1 (32x1x5) has 5 inputs per row, which no N:M pattern of M=4 divides (in either library's
# layout), so both libraries leave it out for 2:4.
TARGETS = {
    ("mlp", "1x1"): ["fc1", "fc2"], ("mlp", "4x1"): ["fc1", "fc2"], ("mlp", "2:4"): ["fc1", "fc2"],
    ("cnn", "1x1"): ["conv1", "conv2", "conv3"], ("cnn", "4x1"): ["conv1", "conv2", "conv3"],
    ("cnn", "2:4"): ["conv2", "conv3"],
}

# pattern name -> (gradprune spelling, INC spelling, target sparsity)
SETTINGS = {
    "1x1": ("1x1", "1x1", 0.90),
    "4x1": ("4x1", "4x1", 0.80),
    "2:4": ("2:4", "2:4", 0.50),  # gradprune: 2 KEPT of 4; INC: 2 PRUNED of 4 -- same at 50%
}


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def batches(n, batch, steps, seed, tag):
    """The batch index sequence for `steps` steps: reshuffled each epoch, fixed by (seed, tag)."""
    g = torch.Generator().manual_seed(seed * 1000 + tag)
    out, perm, pos = [], torch.randperm(n, generator=g), 0
    for _ in range(steps):
        if pos + batch > n:
            perm, pos = torch.randperm(n, generator=g), 0
        out.append(perm[pos:pos + batch])
        pos += batch
    return out


@torch.no_grad()
def accuracy(model, x, y):
    model.eval()
    acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return acc


def target_weights(model, names):
    """The tensors as the forward pass sees them (torch.nn.utils.prune: weight = weight_orig * mask)."""
    return {n: getattr(model, n).weight.detach() for n in names}


def measured_sparsity(model, names):
    ws = target_weights(model, names)
    zeros = sum(int((w == 0).sum()) for w in ws.values())
    total = sum(w.numel() for w in ws.values())
    per_layer = {n: float((w == 0).float().mean()) for n, w in ws.items()}
    return zeros / total, per_layer


def pattern_compliance(model, names, pattern):
    """How well the zeros follow the pattern, measured on the weights.

    4x1: fraction of zero entries lying in all-zero blocks of 4 consecutive output rows x 1 input
    column (the block set is the same for any ordering of a conv's input x kernel columns).
    2:4: fraction of groups of 4 consecutive inputs with at most 2 nonzeros. A conv's inputs can be
    laid out as (in, k) with k fastest (gradprune, torch's own layout) or (k, in) with in fastest
    (INC permutes to cout,k,cin); both are reported, as 'io' and 'ki'.
    """
    ws = target_weights(model, names)
    if pattern == "1x1":
        return None
    if pattern == "4x1":
        inblock = zeros = 0
        for w in ws.values():
            m = (w.reshape(w.shape[0], -1) == 0)
            blk = m.reshape(m.shape[0] // 4, 4, m.shape[1]).all(1, keepdim=True).expand_as(
                m.reshape(m.shape[0] // 4, 4, m.shape[1]))
            inblock += int(blk.sum())
            zeros += int(m.sum())
        return {"zeros_in_all_zero_4x1_blocks": inblock / max(zeros, 1)}
    if pattern == "2:4":
        res = {}
        for layout in ("io", "ki"):
            ok = tot = 0
            for w in ws.values():
                v = w if (w.dim() == 2 or layout == "io") else w.permute(0, 2, 1)
                nz = (v.reshape(v.shape[0], -1, 4) != 0).sum(-1)
                ok += int((nz <= 2).sum())
                tot += nz.numel()
            res[f"groups_with_le2_nonzeros_{layout}"] = ok / tot
        return res
    raise ValueError(pattern)


def inc_event_steps(start, end, freq):
    return [s for s in range(start, end + 1) if (s - start) % freq == 0]


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------
def train_dense(kind, seed, data, steps, lr, batch):
    x, y, xt, yt = data
    torch.manual_seed(seed)
    model = MODELS[kind]()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for idx in batches(len(x), batch, steps, seed, tag=1):
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model


class NoHooks:
    name = "none"
    claimed = None

    def step_begin(self, step): pass
    def before_opt(self): pass
    def after_opt(self): pass
    def train_end(self): pass


class GPHooks(NoHooks):
    def __init__(self, model, names, pattern, target, criterion, sched):
        self.cfg = gp.PruneConfig(
            criterion=criterion, pattern=pattern, target_sparsity=target, schedule="exp",
            start_step=sched["start"], end_step=sched["end"], frequency=sched["freq"],
            scope="global", include=[f"{n}.weight" for n in names], seed=sched["seed"])
        self.pruner = gp.Pruner(model, self.cfg)

    def step_begin(self, step): self.pruner.on_step_begin()
    def before_opt(self): self.pruner.on_before_optimizer_step()
    def after_opt(self): self.pruner.on_after_optimizer_step()

    def train_end(self):
        try:
            self.claimed = float(self.pruner.masks.sparsity())
        except Exception as exc:  # pragma: no cover
            self.claimed = f"error: {exc}"
        self.targets = sorted(getattr(self.pruner, "targets", {}) or self.pruner.masks.keys())


class INCHooks(NoHooks):
    def __init__(self, model, names, pattern, target, criterion, sched):
        quiet_inc()
        # Pass fresh lists: INC mutates its default excluded_op_names list (appends the classifier
        # head it detects) and reuses it in every later WeightPruningConfig; its op names are regexes
        # used with re.search, so anchor them.
        cfg = WeightPruningConfig(
            [{"op_names": [f"^{n}$" for n in names]}],
            op_names=[f"^{n}$" for n in names], excluded_op_names=[],
            pruning_type=criterion, pattern=pattern, target_sparsity=target,
            start_step=sched["start"], end_step=sched["end"], pruning_frequency=sched["freq"],
            pruning_scope="global", sparsity_decay_type="exp")
        self.cm = prepare_compression(model, cfg)
        self.cm.callbacks.on_train_begin()
        pruners = self.cm.callbacks.callbacks_list[0].pruners if hasattr(
            self.cm.callbacks, "callbacks_list") else None
        self.pruned_modules = None
        try:
            self.pruned_modules = sorted(k for p in pruners for k in p.modules)
        except Exception:
            pass

    def step_begin(self, step): self.cm.callbacks.on_step_begin(step)
    def before_opt(self): self.cm.callbacks.on_before_optimizer_step()
    def after_opt(self): self.cm.callbacks.on_after_optimizer_step()
    def train_end(self): self.cm.callbacks.on_train_end()


def finetune(kind, dense_state, names, data, method, setting, sched, steps, lr, batch, seed):
    """Fine-tune a copy of the dense model with one pruning method; time every step."""
    x, y, xt, yt = data
    model = MODELS[kind]()
    model.load_state_dict(dense_state)
    gpat, ipat, target = SETTINGS[setting] if setting else (None, None, None)
    lib, crit = method.split(":") if ":" in method else (method, None)
    t_setup = time.perf_counter()
    if lib == "dense":
        hooks = NoHooks()
    elif lib == "gradprune":
        hooks = GPHooks(model, names, gpat, target, crit, dict(sched, seed=seed))
    elif lib == "inc":
        hooks = INCHooks(model, names, ipat, target, crit, sched)
    elif lib == "torch_prune":  # one-shot global L1 magnitude at step 0, then the same fine-tuning
        tprune.global_unstructured([(getattr(model, n), "weight") for n in names],
                                   pruning_method=tprune.L1Unstructured, amount=target)
        hooks = NoHooks()
    else:
        raise ValueError(method)
    setup_s = time.perf_counter() - t_setup
    opt = torch.optim.Adam(model.parameters(), lr=lr)  # after torch prune renamed weight -> weight_orig

    events = set(inc_event_steps(sched["start"], sched["end"], sched["freq"]))
    step_t, hook_t, trajectory = [], [], []
    pc = time.perf_counter
    for step, idx in enumerate(batches(len(x), batch, steps, seed, tag=2)):
        t0 = pc()
        h0 = pc(); hooks.step_begin(step); h = pc() - h0
        xb, yb = x[idx], y[idx]
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        h0 = pc(); hooks.before_opt(); h += pc() - h0
        opt.step()
        h0 = pc(); hooks.after_opt(); h += pc() - h0
        t1 = pc()
        step_t.append(t1 - t0)
        hook_t.append(h)
        if step in events or step == sched["end"] + 1 or step == steps - 1:  # untimed bookkeeping
            if lib != "dense":
                trajectory.append((step, measured_sparsity(model, names)[0]))
    hooks.train_end()

    after = [i for i in range(len(step_t)) if i > sched["end"]] if lib != "torch_prune" else \
        list(range(1, len(step_t)))
    rec = {
        "model": kind, "seed": seed, "setting": setting, "method": method,
        "test_acc": accuracy(model, xt, yt),
        "train_acc": accuracy(model, x, y),
        "setup_s": setup_s,
        "step_median_s": statistics.median(step_t),
        "step_median_after_last_event_s": statistics.median(step_t[i] for i in after),
        "hook_median_after_last_event_s": statistics.median(hook_t[i] for i in after),
        "hook_total_s": float(sum(hook_t)),
        "total_s": float(sum(step_t)),
        "sparsity_trajectory": trajectory,
    }
    if names and lib != "dense":
        s, per = measured_sparsity(model, names)
        rec.update(measured_sparsity=s, measured_sparsity_per_layer=per,
                   pattern_check=pattern_compliance(model, names, setting),
                   target_sparsity=target, pruned_layers_requested=names)
        # zeros outside the target layers would mean the library pruned something it should not
        others = [n for n, m in model.named_modules()
                  if isinstance(m, (nn.Linear, nn.Conv1d)) and n not in names]
        rec["zeros_in_untargeted_layers"] = {n: float((getattr(model, n).weight == 0).float().mean())
                                             for n in others}
        rec["library_claimed_sparsity"] = hooks.claimed
        if lib == "inc":
            rec["library_pruned_modules"] = hooks.pruned_modules
        if lib == "gradprune":
            rec["library_pruned_modules"] = getattr(hooks, "targets", None)
    return rec


# --------------------------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------------------------
def mean_std(v):
    v = [a for a in v if a is not None]
    if not v:
        return None, None
    return float(np.mean(v)), (float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)


def summarise(records):
    dense = {(r["model"], r["seed"]): r for r in records if r["method"] == "dense"}
    groups = {}
    for r in records:
        groups.setdefault((r["model"], r["setting"], r["method"]), []).append(r)
    rows = []
    for (kind, setting, method), rs in groups.items():
        d = [dense[(r["model"], r["seed"])] for r in rs]
        step_ratio = [r["step_median_s"] / dd["step_median_s"] for r, dd in zip(rs, d)]
        after_ratio = [r["step_median_after_last_event_s"] / dd["step_median_s"] for r, dd in zip(rs, d)]
        hook_ratio = [r["hook_median_after_last_event_s"] / dd["step_median_s"] for r, dd in zip(rs, d)]
        total_ratio = [r["total_s"] / dd["total_s"] for r, dd in zip(rs, d)]
        rows.append({
            "model": kind, "setting": setting, "method": method, "n_seeds": len(rs),
            "test_acc": mean_std([r["test_acc"] for r in rs]),
            "measured_sparsity": mean_std([r.get("measured_sparsity") for r in rs]),
            "pattern_check": [r.get("pattern_check") for r in rs],
            "step_ratio": mean_std(step_ratio),
            "step_after_last_event_ratio": mean_std(after_ratio),
            "hook_after_last_event_ratio": mean_std(hook_ratio),
            "total_time_ratio": mean_std(total_ratio),
            "dense_step_ms": mean_std([dd["step_median_s"] * 1e3 for dd in d]),
        })
    return rows


def fmt(ms, digits=3, pct=False):
    m, s = ms
    if m is None:
        return "n/a"
    if pct:
        return f"{100 * m:.{digits}f} ± {100 * s:.{digits}f}"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def pattern_cell(checks, setting):
    checks = [c for c in checks if c]
    if setting == "1x1" or not checks:
        return "–"
    if setting == "4x1":
        return f"{min(c['zeros_in_all_zero_4x1_blocks'] for c in checks) * 100:.1f}% in 4x1 blocks"
    io = min(c["groups_with_le2_nonzeros_io"] for c in checks) * 100
    ki = min(c["groups_with_le2_nonzeros_ki"] for c in checks) * 100
    return f"{io:.1f}% (in,k) / {ki:.1f}% (k,in)"


METHOD_LABEL = {
    "dense": "dense fine-tune (reference)",
    "gradprune:snip_momentum": "gradprune snip_momentum",
    "gradprune:magnitude": "gradprune magnitude",
    "inc:snip_momentum": "Neural Compressor snip_momentum",
    "inc:magnitude": "Neural Compressor magnitude",
    "torch_prune": "torch.nn.utils.prune global L1 (one-shot at step 0)",
}


def write_markdown(path, meta, rows, records, skipped):
    L = []
    L.append("# Gradual pruning during fine-tuning: gradprune vs Neural Compressor vs torch.nn.utils.prune")
    L.append("")
    L.append(f"Produced by: `{meta['command']}` (wall time {meta['wall_s'] / 60:.1f} min).")
    L.append("")
    L.append(f"Machine: {meta['machine']}; torch threads = {meta['threads']} "
             "(one thread per process is steadier on a 2-core machine and gives every method the same "
             "compute). Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".")
    L.append("")
    a = meta["args"]
    L.append("## Setting")
    L.append("")
    L.append(f"- Data: MNIST-1D generated offline (`make_dataset(get_dataset_args())`): "
             f"{meta['n_train']} train / {meta['n_test']} test sequences of length 40, 10 classes.")
    L.append("- Models: MLP 40→256→256→10 (ReLU); 1D CNN Conv1d(1→32,k5) → Conv1d(32→64,k5,s2) → "
             "Conv1d(64→64,k5,s2) → Linear(640→10) (ReLU).")
    L.append(f"- Seeds {a['seeds']}: the seed fixes the initialisation and both batch orders. Per seed, "
             f"one dense model is trained ({a['pretrain_steps']} steps, Adam lr {a['lr']}, batch {a['batch']}); "
             f"every method fine-tunes a copy of it for {a['finetune_steps']} steps with a fresh Adam "
             f"(lr {a['lr']}) and the same batch order.")
    L.append(f"- Gradual schedule, identical for both libraries: start_step {a['start']}, end_step {a['end']}, "
             f"frequency {a['freq']}, global scope, **exp** decay "
             "s_k = 1 − (1−s_0)((1−s_T)/(1−s_0))^{k/K} (INC `sparsity_decay_type=\"exp\"`, its default; "
             "gradprune `schedule=\"exp\"`). The measured sparsity at each prune event is in the JSON "
             "(`sparsity_trajectory`).")
    L.append("- Pruned layers (same for every method, checked on the weights afterwards): MLP fc1, fc2; "
             "CNN conv1, conv2, conv3 (conv2, conv3 only for 2:4: conv1 has 1×5 inputs per output, not a "
             "multiple of 4). Never the classifier `head`, never biases. INC is given anchored `op_names` and "
             "an explicit empty `excluded_op_names` (it adds the detected classifier head to that list "
             "itself); gradprune is given `include=[...weight]`.")
    L.append("- Patterns: 90% unstructured (`1x1`); 80% `4x1` (blocks of 4 output rows × 1 input); 50% `2:4`. "
             "gradprune's `\"2:4\"` keeps 2 of every 4, INC's `\"2:4\"` prunes 2 of every 4: at 50% both mean "
             "the same. For convs the libraries group the 4 inputs differently: gradprune along the "
             "flattened (in, kernel) axis, INC along input channels at a fixed kernel position; the "
             "pattern column reports both layouts.")
    L.append("- torch.nn.utils.prune: `global_unstructured(..., L1Unstructured, amount=0.9)` once before "
             "fine-tuning, then the same fine-tuning (its mask is re-applied in every forward). It has no "
             "4x1 or 2:4 equivalent (n/a).")
    L.append("")
    L.append("## Metrics")
    L.append("")
    L.append("- **test acc**: after fine-tuning, mean ± std over seeds.")
    L.append("- **sparsity**: fraction of exact zeros in the pruned layers' weights (as the forward pass "
             "sees them) after training — measured, not taken from the library.")
    L.append("- **pattern**: 4x1: share of the zeros that lie in all-zero 4×1 blocks; 2:4: share of groups "
             "of 4 inputs with ≤ 2 nonzeros, in the (in,k) and (k,in) layouts (identical for the MLP); worst seed.")
    L.append("- **step / dense**: median wall time of a fine-tuning step (forward, backward, optimizer, "
             "library hooks) divided by the median dense fine-tuning step of the same model and seed, "
             "measured in the same process.")
    L.append("- **step after last prune / dense**: the same, over the steps after end_step only "
             "(steady state: masks enforced, no more prune events).")
    L.append("- **hook time after last prune / dense step**: time inside the library's three hooks per "
             "step (median over the steps after end_step) divided by the median dense step: the pure "
             "mask-enforcement overhead. torch.nn.utils.prune has no hooks (its cost is inside "
             "forward/backward, visible in the previous column).")
    L.append("- **total / dense**: total fine-tuning wall time (includes the prune events) over the dense run's.")
    L.append("")
    for kind in ("mlp", "cnn"):
        kr = [r for r in rows if r["model"] == kind]
        if not kr:
            continue
        dense = next((r for r in kr if r["method"] == "dense"), None)
        pre = [rec["pretrained_test_acc"] for rec in meta["pretrained"] if rec["model"] == kind]
        L.append(f"## {kind.upper()}")
        L.append("")
        L.append(f"Dense model before fine-tuning: test acc {fmt(mean_std(pre))}; dense fine-tuning "
                 f"(same steps, no pruning): test acc {fmt(dense['test_acc'])}; dense step "
                 f"{fmt(dense['dense_step_ms'], 2)} ms (median).")
        L.append("")
        L.append("| pattern @ target | method | test acc | sparsity (%) | pattern | step / dense | "
                 "step after last prune / dense | hook time after last prune / dense step | total / dense |")
        L.append("|---|---|---|---|---|---|---|---|---|")
        order = ["gradprune:snip_momentum", "inc:snip_momentum", "gradprune:magnitude", "inc:magnitude",
                 "torch_prune"]
        for setting in SETTINGS:
            tgt = SETTINGS[setting][2]
            for method in order:
                r = next((r for r in kr if r["setting"] == setting and r["method"] == method), None)
                if r is None:
                    why = skipped.get((kind, setting, method))
                    if why:
                        L.append(f"| {setting} @ {tgt:.0%} | {METHOD_LABEL[method]} | {why} | | | | | | |")
                    continue
                hook = "n/a (inside forward)" if method == "torch_prune" else fmt(r["hook_after_last_event_ratio"], 3)
                L.append(f"| {setting} @ {tgt:.0%} | {METHOD_LABEL[method]} | {fmt(r['test_acc'])} | "
                         f"{fmt(r['measured_sparsity'], 2, pct=True)} | {pattern_cell(r['pattern_check'], setting)} | "
                         f"{fmt(r['step_ratio'], 2)} | {fmt(r['step_after_last_event_ratio'], 2)} | {hook} | "
                         f"{fmt(r['total_time_ratio'], 2)} |")
        L.append("")
    if meta.get("notes"):
        L.append("## Notes")
        L.append("")
        for n in meta["notes"]:
            L.append(f"- {n}")
        L.append("")
    Path(path).write_text("\n".join(L), encoding="utf-8")


# --------------------------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, few steps: a smoke test")
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=list(MODELS))
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--pretrain-steps", type=int, default=None)
    ap.add_argument("--finetune-steps", type=int, default=None)
    ap.add_argument("--no-inc-magnitude", action="store_true",
                    help="skip the extra Neural Compressor magnitude runs")
    ap.add_argument("--out", default=str(HERE / "results"),
                    help="directory for gradual_vs_peers.json/.md")
    args = ap.parse_args(argv)

    if args.quick:
        seeds = args.seeds or [0]
        pre, ft = args.pretrain_steps or 300, args.finetune_steps or 240
        start, end, freq = 20, 160, 20
    else:
        seeds = args.seeds or [0, 1, 2]
        pre, ft = args.pretrain_steps or 1500, args.finetune_steps or 1500
        start, end, freq = 100, 1000, 50
    if end >= ft - 10:
        raise SystemExit("fine-tune steps must exceed end_step")
    sched = {"start": start, "end": end, "freq": freq}
    torch.set_num_threads(args.threads)

    t_all = time.perf_counter()
    data = load_mnist1d()
    methods = ["gradprune:snip_momentum", "gradprune:magnitude", "inc:snip_momentum"]
    if not args.no_inc_magnitude:
        methods.append("inc:magnitude")
    records, pretrained, skipped, notes = [], [], {}, []
    if GP_ERROR:
        notes.append(f"gradprune was not importable, its rows are missing: {GP_ERROR}")
    if INC_ERROR:
        notes.append(f"Neural Compressor was not importable: {INC_ERROR}")
    for kind in args.models:
        for seed in seeds:
            t0 = time.perf_counter()
            dense = train_dense(kind, seed, data, pre, args.lr, args.batch)
            pretrained.append({"model": kind, "seed": seed,
                               "pretrained_test_acc": accuracy(dense, data[2], data[3]),
                               "pretrain_s": time.perf_counter() - t0})
            state = copy.deepcopy(dense.state_dict())
            common = dict(data=data, sched=sched, steps=ft, lr=args.lr, batch=args.batch, seed=seed)
            records.append(finetune(kind, state, [], method="dense", setting=None, **common))
            for setting in args.settings:
                names = TARGETS[(kind, setting)]
                todo = list(methods) + (["torch_prune"] if setting == "1x1" else [])
                if setting != "1x1":
                    skipped[(kind, setting, "torch_prune")] = "n/a (no equivalent pattern)"
                for method in todo:
                    lib = method.split(":")[0]
                    if lib == "gradprune" and GP_ERROR:
                        skipped[(kind, setting, method)] = "not run (gradprune unavailable)"
                        continue
                    if lib == "inc" and INC_ERROR:
                        skipped[(kind, setting, method)] = "not run (INC unavailable)"
                        continue
                    try:
                        rec = finetune(kind, state, names, method=method, setting=setting, **common)
                    except Exception as exc:
                        import traceback
                        traceback.print_exc()
                        skipped[(kind, setting, method)] = f"error: {type(exc).__name__}: {exc}"[:200]
                        notes.append(f"{kind} seed {seed} {setting} {method} failed: {type(exc).__name__}: {exc}")
                        continue
                    records.append(rec)
                    print(f"[{time.perf_counter() - t_all:7.1f}s] {kind} seed={seed} {setting:4s} {method:24s} "
                          f"acc={rec['test_acc']:.3f} sparsity={rec['measured_sparsity']:.4f} "
                          f"step={rec['step_median_s'] * 1e3:.2f}ms hook_after={rec['hook_median_after_last_event_s'] * 1e3:.3f}ms",
                          flush=True)
            d = [r for r in records if r["method"] == "dense" and r["model"] == kind and r["seed"] == seed][0]
            print(f"[{time.perf_counter() - t_all:7.1f}s] {kind} seed={seed} dense pre-acc="
                  f"{pretrained[-1]['pretrained_test_acc']:.3f} ft-acc={d['test_acc']:.3f} "
                  f"step={d['step_median_s'] * 1e3:.2f}ms", flush=True)

    wall = time.perf_counter() - t_all
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "numpy": np.__version__}
    if neural_compressor is not None:
        versions["neural-compressor"] = neural_compressor.__version__
    if gp is not None:
        versions["gradprune"] = getattr(gp, "__version__", "?")
    try:
        import importlib.metadata as im
        versions["mnist1d"] = im.version("mnist1d")
    except Exception:
        pass
    cpu = "?"
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except Exception:
        pass
    cmd = " ".join(shlex.quote(a) for a in [".bench-venv/bin/python", "benchmarks/gradual_vs_peers.py",
                                             *(sys.argv[1:] if argv is None else argv)])
    meta = {
        "command": cmd, "wall_s": wall,
        "machine": f"{os.cpu_count()}-core CPU ({cpu}), {platform.system()} {platform.machine()}, no GPU",
        "threads": args.threads, "versions": versions,
        "args": {"seeds": seeds, "pretrain_steps": pre, "finetune_steps": ft, "lr": args.lr,
                 "batch": args.batch, **sched, "models": args.models, "settings": args.settings,
                 "quick": args.quick},
        "n_train": len(data[0]), "n_test": len(data[2]), "pretrained": pretrained, "notes": notes,
    }
    rows = summarise(records)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "gradual_vs_peers" + ("_quick" if args.quick else "")
    with open(out / f"{stem}.json", "w") as fh:
        json.dump({"meta": meta, "summary": rows, "runs": records,
                   "skipped": {" | ".join(k): v for k, v in skipped.items()}}, fh, indent=1)
    write_markdown(out / f"{stem}.md", meta, rows, records, skipped)
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '.md')} in {wall / 60:.1f} min")


if __name__ == "__main__":
    main()
