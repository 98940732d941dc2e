#!/usr/bin/env python
"""Gradual pruning during fine-tuning: gradprune vs Intel Neural Compressor 3.7.1 vs torch.nn.utils.prune.

Runs in the peer virtualenv built by ``benchmarks/setup_peers.sh`` (``.bench-venv``); it is a
benchmark, not a test.

Setting: MNIST-1D (generated offline with ``mnist1d.data.make_dataset``), two models (an MLP
40-256-256-10 and a small 1D CNN). For every seed a dense model is trained first; every method then
fine-tunes a copy of that same dense model with the same optimizer (fresh Adam), the same number of
steps and the same batch order, pruning gradually with the same pattern, target sparsity and
sparsity schedule (exp decay, the same sparsity at the same steps; gradprune follows the recipe of
docs/migration/from_neural_compressor.md, checked step by step by benchmarks/equivalence.py:
start_step = INC start + frequency - 1, end_step = INC end - 1, count_rounding="floor"). Reported, all measured by this script:

* test accuracy after fine-tuning (mean +- std over seeds);
* achieved sparsity = fraction of exact zeros in the weights of the pruned layers after training,
  and whether those zeros follow the requested pattern;
* time per fine-tuning step (median over steps) relative to a dense fine-tuning run of the same
  model/seed in the same process; the time spent inside the pruning library's hooks per step after
  the last prune event (mask enforcement), relative to the dense step.

Usage:
    .bench-venv/bin/python benchmarks/gradual_vs_peers.py            # full run (3 seeds)
    .bench-venv/bin/python benchmarks/gradual_vs_peers.py --quick    # smoke test (1 seed, few steps)
    .bench-venv/bin/python benchmarks/gradual_vs_peers.py --from-json benchmarks/results/gradual_vs_peers.json
                                                                     # re-render the Markdown only
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mnist1d_common import CNN1d, MLP, load_mnist1d  # noqa: E402  (shared with the other benchmark)


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
        # Neural Compressor's first event (at start_step) is event k=0 of its exp formula and prunes
        # nothing, and INC prunes at the START of its step g where gradprune prunes at the END of step
        # g - 1. Unless told otherwise, gradprune follows the migration guide's recipe, checked mask for
        # mask by benchmarks/equivalence.py: start = INC start + frequency - 1, end = INC end - 1, and
        # INC's truncated unit counts (count_rounding="floor").
        align = sched.get("align", True)
        start = sched["start"] + sched["freq"] - 1 if align else sched["start"]
        end = sched["end"] - 1 if align else sched["end"]
        self.cfg = gp.PruneConfig(
            criterion=criterion, pattern=pattern, target_sparsity=target, schedule="exp",
            start_step=min(start, end), end_step=end, frequency=sched["freq"],
            count_rounding="floor" if align else "half_up",
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
        self.pruned_modules = sorted(self.pruner.masks.keys())


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
        self.pruners = pruners or []
        self.pruned_modules = sorted(k for p in self.pruners for k in p.modules) if pruners else None

    def step_begin(self, step): self.cm.callbacks.on_step_begin(step)
    def before_opt(self): self.cm.callbacks.on_before_optimizer_step()
    def after_opt(self): self.cm.callbacks.on_after_optimizer_step()
    def train_end(self):
        self.cm.callbacks.on_train_end()
        masks = [m for p in self.pruners for m in p.masks.values()]
        if masks:  # what INC's own masks say (not what the weights say)
            self.claimed = sum(int((~m.bool()).sum()) for m in masks) / sum(m.numel() for m in masks)


class Run:
    """One fine-tuning run (a copy of the dense model + one pruning method), advanced step by step.

    All runs of one (model, seed) are advanced together, a chunk of steps at a time in rotating
    order, so that every method sees the same machine load as the dense reference it is timed
    against (the machine is shared: absolute step times drift by tens of percent).
    """

    def __init__(self, kind, dense_state, names, data, method, setting, sched, steps, lr, batch, seed):
        self.kind, self.names, self.data, self.method, self.setting = kind, names, data, method, setting
        self.sched, self.steps, self.seed = sched, steps, seed
        self.model = model = MODELS[kind]()
        model.load_state_dict(dense_state)
        gpat, ipat, target = SETTINGS[setting] if setting else (None, None, None)
        self.target = target
        self.lib = lib = method.split(":")[0]
        crit = method.split(":")[1] if ":" in method else None
        t = time.perf_counter()
        if lib == "dense":
            self.hooks = NoHooks()
        elif lib == "gradprune":
            self.hooks = GPHooks(model, names, gpat, target, crit, dict(sched, seed=seed))
        elif lib == "inc":
            self.hooks = INCHooks(model, names, ipat, target, crit, sched)
        elif lib == "torch_prune":  # one-shot global L1 magnitude at step 0, then the same fine-tuning
            tprune.global_unstructured([(getattr(model, n), "weight") for n in names],
                                       pruning_method=tprune.L1Unstructured, amount=target)
            self.hooks = NoHooks()
        else:
            raise ValueError(method)
        self.setup_s = time.perf_counter() - t
        # created after torch.nn.utils.prune renamed weight -> weight_orig
        self.opt = torch.optim.Adam(model.parameters(), lr=lr)
        self.order = batches(len(data[0]), batch, steps, seed, tag=2)
        self.events = set(inc_event_steps(sched["start"], sched["end"], sched["freq"]))
        self.step_t = [0.0] * steps
        self.hook_t = [0.0] * steps
        self.trajectory = []

    def run_steps(self, lo, hi):
        x, y = self.data[0], self.data[1]
        model, opt, hooks, pc = self.model, self.opt, self.hooks, time.perf_counter
        for step in range(lo, hi):
            idx = self.order[step]
            t0 = pc()
            hooks.step_begin(step)
            h = pc() - t0
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            h0 = pc(); hooks.before_opt(); h += pc() - h0
            opt.step()
            h0 = pc(); hooks.after_opt(); t1 = pc()
            h += t1 - h0
            self.step_t[step] = t1 - t0
            self.hook_t[step] = h
            if self.lib != "dense" and (step in self.events or step == self.sched["end"] + 1
                                        or step == self.steps - 1):  # untimed bookkeeping
                self.trajectory.append((step, measured_sparsity(model, self.names)[0]))

    def finish(self, dense, chunk):
        """Record; `dense` is the dense reference Run of the same model/seed (timed alongside)."""
        self.hooks.train_end()
        xt, yt = self.data[2], self.data[3]
        end = self.sched["end"]
        first_after = 1 if self.lib == "torch_prune" else end + 1
        chunks = [(lo, min(lo + chunk, self.steps)) for lo in range(0, self.steps, chunk)]

        def ratio(num, lo_min):  # median over chunks of (median of num in chunk / median dense step)
            rs = []
            for lo, hi in chunks:
                if lo < lo_min:
                    continue
                rs.append(statistics.median(num[lo:hi]) / statistics.median(dense.step_t[lo:hi]))
            return statistics.median(rs) if rs else None

        after_chunk_start = next(lo for lo, hi in chunks if lo >= first_after) if any(
            lo >= first_after for lo, hi in chunks) else self.steps
        rec = {
            "model": self.kind, "seed": self.seed, "setting": self.setting, "method": self.method,
            "test_acc": accuracy(self.model, xt, yt),
            "train_acc": accuracy(self.model, self.data[0], self.data[1]),
            "setup_s": self.setup_s,
            "step_median_s": statistics.median(self.step_t),
            "step_median_after_last_event_s": statistics.median(self.step_t[first_after:]),
            "hook_median_after_last_event_s": statistics.median(self.hook_t[first_after:]),
            "hook_total_s": float(sum(self.hook_t)),
            "total_s": float(sum(self.step_t)),
            "step_ratio": ratio(self.step_t, 0),
            "step_after_last_event_ratio": ratio(self.step_t, after_chunk_start),
            "hook_after_last_event_ratio": ratio(self.hook_t, after_chunk_start),
            "total_time_ratio": float(sum(self.step_t)) / float(sum(dense.step_t)),
            "sparsity_trajectory": self.trajectory,
        }
        if self.lib != "dense":
            s, per = measured_sparsity(self.model, self.names)
            rec.update(measured_sparsity=s, measured_sparsity_per_layer=per,
                       pattern_check=pattern_compliance(self.model, self.names, self.setting),
                       target_sparsity=self.target, pruned_layers_requested=self.names)
            # zeros outside the target layers would mean a library pruned something it should not
            others = [n for n, m in self.model.named_modules()
                      if isinstance(m, (nn.Linear, nn.Conv1d)) and n not in self.names]
            rec["zeros_in_untargeted_layers"] = {
                n: float((getattr(self.model, n).weight == 0).float().mean()) for n in others}
            rec["library_claimed_sparsity"] = self.hooks.claimed
            if self.lib in ("inc", "gradprune"):
                rec["library_pruned_modules"] = getattr(self.hooks, "pruned_modules", None)
        return rec


def run_all(kind, dense_state, plan, data, sched, steps, lr, batch, seed, chunk, skipped, notes):
    """Build every run of `plan` [(method, setting)], advance them together, return records."""
    runs = []
    for method, setting in plan:
        names = TARGETS[(kind, setting)] if setting else []
        try:
            runs.append(Run(kind, dense_state, names, data, method, setting, sched, steps, lr, batch, seed))
        except Exception as exc:
            import traceback
            traceback.print_exc()
            skipped[(kind, setting, method)] = f"error: {type(exc).__name__}: {exc}"[:200]
            notes.append(f"{kind} seed {seed} {setting} {method} failed at setup: {type(exc).__name__}: {exc}")
    dense = runs[0]
    assert dense.method == "dense"
    failed = set()
    for c, lo in enumerate(range(0, steps, chunk)):
        hi = min(lo + chunk, steps)
        k = c % len(runs)
        for r in runs[k:] + runs[:k]:  # rotate who goes first
            if id(r) in failed:
                continue
            try:
                r.run_steps(lo, hi)
            except Exception as exc:
                import traceback
                traceback.print_exc()
                failed.add(id(r))
                skipped[(kind, r.setting, r.method)] = f"error: {type(exc).__name__}: {exc}"[:200]
                notes.append(f"{kind} seed {seed} {r.setting} {r.method} failed at a step: "
                             f"{type(exc).__name__}: {exc}")
    return [r.finish(dense, chunk) for r in runs if id(r) not in failed]


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
        rows.append({
            "model": kind, "setting": setting, "method": method, "n_seeds": len(rs),
            "test_acc": mean_std([r["test_acc"] for r in rs]),
            "measured_sparsity": mean_std([r.get("measured_sparsity") for r in rs]),
            "pattern_check": [r.get("pattern_check") for r in rs],
            "step_ratio": mean_std([r["step_ratio"] for r in rs]),
            "step_after_last_event_ratio": mean_std([r["step_after_last_event_ratio"] for r in rs]),
            "hook_after_last_event_ratio": mean_std([r["hook_after_last_event_ratio"] for r in rs]),
            "total_time_ratio": mean_std([r["total_time_ratio"] for r in rs]),
            "dense_step_ms": mean_std([dense[(r["model"], r["seed"])]["step_median_s"] * 1e3 for r in rs]),
            "hook_after_last_event_ms": mean_std([r["hook_median_after_last_event_s"] * 1e3 for r in rs]),
        })
    return rows


def fmt(ms, digits=3, pct=False):
    m, s = ms
    if m is None:
        return "n/a"
    if pct:
        return f"{100 * m:.{digits}f} ± {100 * s:.{digits}f}"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def pct_floor(v):
    """A percentage rounded DOWN to 2 decimals, so 99.995% never shows as 100.00%."""
    return f"{math.floor(v * 10000) / 100:.2f}%"


def pattern_cell(checks, setting):
    checks = [c for c in checks if c]
    if setting == "1x1" or not checks:
        return "–"
    if setting == "4x1":
        return f"{pct_floor(min(c['zeros_in_all_zero_4x1_blocks'] for c in checks))} in 4x1 blocks"
    io = min(c["groups_with_le2_nonzeros_io"] for c in checks)
    ki = min(c["groups_with_le2_nonzeros_ki"] for c in checks)
    return f"{pct_floor(io)} (in,k) / {pct_floor(ki)} (k,in)"


METHOD_LABEL = {
    "dense": "dense fine-tune (reference)",
    "dense:copy": "dense fine-tune, 2nd identical copy (timing noise floor)",
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
    L.append(f"Machine: {meta['machine']}, shared with other work while this ran (1-minute load average "
             f"{meta['loadavg_start'][0]:.1f} at the start, {meta['loadavg_end'][0]:.1f} at the end); torch threads = {meta['threads']} "
             "(one thread per process is steadier on a 2-core machine and gives every method the same "
             "compute). Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".")
    prov = meta.get("provenance") or {}
    if prov.get("git_head"):
        dirty = prov.get("src_uncommitted") or []
        L.append(f"gradprune source: git {prov['git_head']}"
                 + (f" plus uncommitted changes in {len(dirty)} file(s) under src/ (listed in the JSON)"
                    if dirty else " (src/ clean)") + ".")
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
    if a.get("align", True):
        if a.get("mapping") == "start+freq-1":
            sched_txt = (f"INC start_step {a['start']}, end_step {a['end']}; gradprune start_step "
                         f"{a['start'] + a['freq'] - 1}, end_step {a['end'] - 1}, count_rounding=\"floor\"; "
                         f"frequency {a['freq']}: the migration guide's recipe, which "
                         "`benchmarks/equivalence.py` checks mask for mask (INC prunes at the start of its step g, "
                         "gradprune at the end of step g − 1; INC's first event is k=0 of its formula and prunes "
                         "nothing; `--same-start` gives both the same start_step instead)")
        else:  # results written before the checked mapping (start + freq, same end, half-up counts)
            sched_txt = (f"INC start_step {a['start']}, gradprune start_step {a['start'] + a['freq']}; both end_step "
                         f"{a['end']}, frequency {a['freq']}. INC's first event (at its start_step) is k=0 of its "
                         "formula and prunes nothing, gradprune's first event is k=1 and already prunes; starting "
                         "gradprune one frequency later was meant to give both the same sparsity at the same steps "
                         "(**this mapping is one step late**: these results predate the checked recipe "
                         "start + freq − 1 / end − 1 with `count_rounding=\"floor\"`, which the script now uses)")
    else:
        sched_txt = (f"start_step {a['start']}, end_step {a['end']}, frequency {a['freq']} for both (so gradprune "
                     "is one event ahead of INC, whose first event prunes 0%)")
    L.append(f"- Gradual schedule: {sched_txt}. Global scope, **exp** decay "
             "s_k = 1 − (1−s_0)((1−s_T)/(1−s_0))^{k/K} (INC `sparsity_decay_type=\"exp\"`, its default; "
             "gradprune `schedule=\"exp\"`). Fine-tuning continues "
             f"{a['finetune_steps'] - a['end'] - 1} steps after the last prune event.")
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
    L.append(f"- Timing protocol: all runs of one model and seed (dense reference, a second dense copy, every "
             f"method) are built together and advanced in chunks of {meta['args']['chunk']} steps in rotating "
             "order, so each method is timed under the same machine load as the dense steps it is divided by. "
             "Each ratio is the median over chunks of (median step in the chunk / median dense step in the "
             "same chunk), then mean ± std over seeds. The second dense copy shows the noise floor "
             "(ideally 1.00).")
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
        cp = next((r for r in kr if r["method"] == "dense:copy"), None)
        if cp is not None:
            L.append(f"| none | {METHOD_LABEL['dense:copy']} | {fmt(cp['test_acc'])} | 0 | – | "
                     f"{fmt(cp['step_ratio'], 2)} | {fmt(cp['step_after_last_event_ratio'], 2)} | – | "
                     f"{fmt(cp['total_time_ratio'], 2)} |")
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
    traj = [r for r in records if r["seed"] == records[0]["seed"] and r["setting"] == "1x1"
            and r["method"] in ("gradprune:snip_momentum", "inc:snip_momentum")]
    if traj:
        L.append("## Measured sparsity trajectory (seed %d, 1x1 @ 90%%, after each prune-event step)" % records[0]["seed"])
        L.append("")
        for r in traj:
            pts = ", ".join(f"{st}: {100 * sp:.1f}" for st, sp in r["sparsity_trajectory"])
            L.append(f"- {r['model']} {METHOD_LABEL[r['method']]}: {pts}")
        L.append("")
    L.append("## Automatic checks (every run, every seed)")
    L.append("")
    bad = []
    for r in records:
        if r["method"].startswith("dense"):
            continue
        dev = r["measured_sparsity"] - r["target_sparsity"]
        if abs(dev) > 5e-4:
            bad.append(f"{r['model']} seed {r['seed']} {r['setting']} {METHOD_LABEL[r['method']]}: measured "
                       f"sparsity {100 * r['measured_sparsity']:.2f}% vs target {100 * r['target_sparsity']:.0f}%")
        pc = r.get("pattern_check") or {}
        if r["setting"] == "4x1" and pc.get("zeros_in_all_zero_4x1_blocks", 1.0) < 1.0:
            bad.append(f"{r['model']} seed {r['seed']} 4x1 {METHOD_LABEL[r['method']]}: "
                       f"{100 * (1 - pc['zeros_in_all_zero_4x1_blocks']):.3f}% of zeros outside all-zero 4x1 blocks")
        if r["setting"] == "2:4" and pc:
            best = max(pc.get("groups_with_le2_nonzeros_io", 0), pc.get("groups_with_le2_nonzeros_ki", 0))
            if best < 1.0:
                bad.append(f"{r['model']} seed {r['seed']} 2:4 {METHOD_LABEL[r['method']]}: in its best layout "
                           f"{100 * (1 - best):.4f}% of groups of 4 keep more than 2 nonzeros")
        leaked = {n: v for n, v in (r.get("zeros_in_untargeted_layers") or {}).items() if v > 0}
        if leaked:
            bad.append(f"{r['model']} seed {r['seed']} {r['setting']} {METHOD_LABEL[r['method']]}: zeros in "
                       f"layers that were not to be pruned: {leaked}")
    if bad:
        L.extend(f"- {b}" for b in bad)
    else:
        L.append("- every run reached its target sparsity (±0.05 pp) with its pattern intact.")
    L.append("- Untargeted layers (classifier `head`, CNN conv1 at 2:4) were checked for zeros in every run; "
             "any found are listed above.")
    L.append("")
    if meta.get("notes"):
        L.append("## Notes")
        L.append("")
        for n in meta["notes"]:
            L.append(f"- {n}")
        L.append("")
    Path(path).write_text("\n".join(L), encoding="utf-8")


# --------------------------------------------------------------------------------------------
def provenance():
    """Which gradprune source this run imported (taken at start: the package is edited live)."""
    prov = {}
    try:
        import subprocess
        root = HERE.parent
        prov["git_head"] = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                                          capture_output=True, text=True).stdout.strip()
        out = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "src"],
                             capture_output=True, text=True).stdout.split("\n")
        prov["src_uncommitted"] = [l.strip() for l in out if l.strip()]
    except Exception:
        pass
    return prov


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
    ap.add_argument("--chunk", type=int, default=10,
                    help="runs are interleaved in chunks of this many steps (timing fairness)")
    ap.add_argument("--same-start", action="store_true",
                    help="give gradprune the same start/end steps as INC and its default rounding (by "
                         "default gradprune follows the migration guide's checked recipe: start + "
                         "frequency - 1, end - 1, count_rounding='floor')")
    ap.add_argument("--no-inc-magnitude", action="store_true",
                    help="skip the extra Neural Compressor magnitude runs")
    ap.add_argument("--out", default=str(HERE / "results"),
                    help="directory for gradual_vs_peers.json/.md")
    ap.add_argument("--from-json", default=None,
                    help="only re-render the Markdown from a JSON this script wrote earlier")
    args = ap.parse_args(argv)
    if args.from_json:
        saved = json.load(open(args.from_json))
        skipped = {tuple(k.split(" | ")): v for k, v in saved["skipped"].items()}
        md = Path(args.from_json).with_suffix(".md")
        write_markdown(md, saved["meta"], saved["summary"], saved["runs"], skipped)
        print(f"wrote {md}")
        return

    if args.quick:
        seeds = args.seeds or [0]
        pre, ft = args.pretrain_steps or 300, args.finetune_steps or 240
        start, end, freq = 20, 160, 20
    else:
        seeds = args.seeds or [0, 1, 2]
        pre, ft = args.pretrain_steps or 1500, args.finetune_steps or 1000
        start, end, freq = 100, 600, 50
    if end >= ft - 10:
        raise SystemExit("fine-tune steps must exceed end_step")
    sched = {"start": start, "end": end, "freq": freq, "align": not args.same_start,
             "mapping": "start+freq-1"}
    torch.set_num_threads(args.threads)

    t_all = time.perf_counter()
    load_start = os.getloadavg()
    prov = provenance()
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
            plan = [("dense", None), ("dense:copy", None)]
            for setting in args.settings:
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
                    plan.append((method, setting))
            recs = run_all(kind, state, plan, data, sched, ft, args.lr, args.batch, seed, args.chunk,
                           skipped, notes)
            records.extend(recs)
            for rec in recs:
                if rec["method"].startswith("dense"):
                    continue
                print(f"[{time.perf_counter() - t_all:7.1f}s] {kind} seed={seed} {rec['setting']:4s} "
                      f"{rec['method']:24s} acc={rec['test_acc']:.3f} sparsity={rec['measured_sparsity']:.4f} "
                      f"step/dense={rec['step_ratio']:.3f} after/dense={rec['step_after_last_event_ratio']:.3f} "
                      f"hook/dense={rec['hook_after_last_event_ratio']:.4f}", flush=True)
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
        "loadavg_start": load_start, "loadavg_end": os.getloadavg(), "provenance": prov,
        "args": {"seeds": seeds, "pretrain_steps": pre, "finetune_steps": ft, "lr": args.lr,
                 "batch": args.batch, "chunk": args.chunk, **sched, "models": args.models, "settings": args.settings,
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
