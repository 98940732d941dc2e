"""Peers for benchmarks/llm_oneshot.py (not a test): llm-compressor 0.14 (``SparseGPTModifier``,
``WandaPruningModifier``) and torchao 0.18 (``WandaSparsifier``) against gradprune's ``sparsegpt``
/ ``wanda`` / ``magnitude`` on the same model (``llm_model.py``), the same calibration sequences
(``results/llm_oneshot_calib_seed*.pt``, written by llm_oneshot.py) and the same held-out test
sequences, **in one process of the peers' environment** (same torch, same thread), so the time
ratios are measured side by side. Build the environment, then run it:

    python3 -m venv /work/venvs/llmc
    /work/venvs/llmc/bin/pip install torch==2.13.0 "llmcompressor==0.14.*" "torchao==0.18.*"
    OMP_NUM_THREADS=1 PYTHONPATH=src nice -n 10 /work/venvs/llmc/bin/python benchmarks/llm_oneshot_peers.py
    OMP_NUM_THREADS=1 PYTHONPATH=src nice -n 10 /work/venvs/llmc/bin/python benchmarks/llm_oneshot_peers.py \
        --timing-repeats 5          # paired, alternating timing of each gradprune/peer pair

Per (seed, setting, method): held-out perplexity, calibration wall time (the pruning call,
calibration forwards included; imports and
first-call costs are paid by one untimed warm-up run of every method) and peak memory = the process's resident-set high-water mark above
its level just before the call, sampled every 2 ms by a thread (CPU only; the gradprune sequential
pass also reports its counted device peak). Both llm-compressor modifiers run its default
sequential pipeline (each decoder layer calibrated on the pruned layers' outputs), so they are
compared with gradprune ``sequential=True``; torchao's sparsifier calibrates once on the dense
model, so it is compared with ``sequential=False``. Writes ``results/llm_oneshot_peers.json`` and
``.md`` (after every row, so a cut run keeps what it measured).
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import logging
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import llm_model  # noqa: E402

OUT = Path(__file__).parent / "results"
# setting -> (sparsity, N:M or None, OWL)
SETTINGS = {"50%": (0.5, None, False), "2:4": (0.5, (2, 4), False), "4:8": (0.5, (4, 8), False),
            "70%": (0.7, None, False), "70%+OWL": (0.7, None, True)}
METHODS = ["gradprune sparsegpt", "llmcompressor SparseGPTModifier", "gradprune wanda",
           "llmcompressor WandaPruningModifier", "gradprune wanda (dense inputs)", "torchao WandaSparsifier",
           "gradprune magnitude"]
OWL_M, OWL_LAMBDA = 5, 0.08          # the same outlier threshold and lambda for every OWL run
log = logging.getLogger("llm_oneshot_peers")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Resident-set high-water mark above the level at entry, sampled every ``period`` s."""

    def __init__(self, period=0.002):
        self.period, self.peak, self._stop = period, 0, threading.Event()

    def __enter__(self):
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.base = rss()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss() - self.base)
            time.sleep(self.period)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss() - self.base)


def linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")]


def run_gradprune(model, seqs, setting, criterion, sequential, batch):
    import gradprune as gp

    sparsity, nm, owl = SETTINGS[setting]
    res = gp.prune(model, sparsity=sparsity, criterion=criterion, pattern=f"{nm[0]}:{nm[1]}" if nm else "1x1",
                   allocation="owl" if owl else "uniform", data=list(seqs.split(batch)),
                   loss_fn=lambda m, b: m(input_ids=b, labels=b).loss, sequential=sequential,
                   owl_m=OWL_M, owl_lambda=OWL_LAMBDA)
    return {"peak_device_bytes": res.details.get("peak_device_bytes")}


def run_llmcompressor(model, seqs, setting, modifier, batch):
    from llmcompressor import oneshot
    from torch.utils.data import DataLoader
    from transformers import PreTrainedTokenizerFast
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier

    sparsity, nm, owl = SETTINGS[setting]
    kw = dict(sparsity=sparsity, mask_structure=f"{nm[0]}:{nm[1]}" if nm else "0:0",
              targets=["Linear"], ignore=["re:.*lm_head"])
    if owl:
        kw.update(sparsity_profile="owl", owl_m=OWL_M, owl_lmbda=OWL_LAMBDA)
    mod = (SparseGPTModifier(**kw) if modifier == "SparseGPTModifier" else WandaPruningModifier(**kw))
    # the same batches as gradprune's (a DataLoader is used as given); the processor is only required
    # by oneshot's argument checks: our BPE tokenizer, wrapped
    batches = [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in seqs.split(batch)]
    processor = PreTrainedTokenizerFast(tokenizer_object=llm_model.tokenizer(), eos_token="<eos>")
    oneshot(model=model, processor=processor, dataset=DataLoader(batches, batch_size=None), recipe=[mod],
            log_dir=None)
    return {}


def run_torchao(model, seqs, setting, batch):
    from torchao.sparsity.wanda import WandaSparsifier

    sparsity, nm, owl = SETTINGS[setting]
    if owl:
        raise NotImplementedError("torchao WandaSparsifier has no OWL allocation")
    if nm and nm[1] - nm[0] != nm[0]:
        raise NotImplementedError("torchao semi-structured blocks prune half of each block")
    sp = WandaSparsifier(sparsity_level=sparsity, semi_structured_block_size=nm[1] if nm else None)
    sp.prepare(model, config=[{"tensor_fqn": n + ".weight"} for n in linear_names(model)])
    with torch.no_grad():
        for b in seqs.split(batch):
            model(input_ids=b)
    sp.step()
    sp.squash_mask()
    return {}


def run(method, model, seqs, setting, batch):
    if method == "gradprune sparsegpt":
        return run_gradprune(model, seqs, setting, "sparsegpt", True, batch)
    if method == "gradprune wanda":
        return run_gradprune(model, seqs, setting, "wanda", True, batch)
    if method == "gradprune wanda (dense inputs)":
        return run_gradprune(model, seqs, setting, "wanda", False, batch)
    if method == "gradprune magnitude":
        return run_gradprune(model, seqs, setting, "magnitude", False, batch)
    if method.startswith("llmcompressor "):
        return run_llmcompressor(model, seqs, setting, method.split()[1], batch)
    if method == "torchao WandaSparsifier":
        return run_torchao(model, seqs, setting, batch)
    raise ValueError(method)


def sparsity_of(model):
    ws = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


def versions():
    import importlib.metadata as md

    out = {"torch": torch.__version__, "python": sys.version.split()[0]}
    for pkg in ("llmcompressor", "torchao", "transformers", "compressed-tensors"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS))
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--n-eval", type=int, default=32)
    ap.add_argument("--calib-batch", type=int, default=4)
    ap.add_argument("--out", default="llm_oneshot_peers")
    ap.add_argument("--timing-repeats", type=int, default=0,
                    help="instead of the grid: time each PAIRS pair this many times, alternating, seed 0")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    base = llm_model.load()
    test = llm_model.sequences(llm_model.token_ids()["test"], n=args.n_eval)
    dense_ppl = llm_model.perplexity(base, test)
    # imports and first-call costs outside the timings: every method runs once, untimed, first
    import gradprune  # noqa: F401
    import llmcompressor  # noqa: F401
    import torchao.sparsity.wanda  # noqa: F401

    warm = torch.load(OUT / "llm_oneshot_calib_seed0.pt", weights_only=True)[:4]
    for method in args.methods:
        run(method, copy.deepcopy(base), warm, "50%", args.calib_batch)
    if args.timing_repeats:
        return paired_timing(base, args)
    path = OUT / f"{args.out}.json"
    rows = []
    if path.exists():  # keep the cells this run does not redo
        old = json.loads(path.read_text()).get("rows", [])
        redo = {(s, st, m) for s in args.seeds for st in args.settings for m in args.methods}
        rows = [r for r in old if (r["seed"], r["setting"], r["method"]) not in redo]
    for seed in args.seeds:
        seqs = torch.load(OUT / f"llm_oneshot_calib_seed{seed}.pt", weights_only=True)
        for setting in args.settings:
            for method in args.methods:
                model = copy.deepcopy(base)
                row = {"seed": seed, "setting": setting, "method": method}
                try:
                    with PeakRSS() as mem:
                        t = time.perf_counter()
                        extra = run(method, model, seqs, setting, args.calib_batch)
                        row["calib_seconds"] = time.perf_counter() - t
                    row.update(extra, ppl=llm_model.perplexity(model, test), sparsity=sparsity_of(model),
                               peak_rss_bytes=mem.peak)
                except NotImplementedError as e:
                    row["unsupported"] = str(e)
                except Exception as e:  # a peer that fails is reported as failed, with its error
                    if method.startswith("gradprune"):
                        raise
                    row["failed"] = f"{type(e).__name__}: {e}"
                rows.append(row)
                log.info("%s", row)
                result = {"dense_ppl": dense_ppl, "versions": versions(), "args": vars(args), "rows": rows,
                          "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
                          "threads": torch.get_num_threads(), "owl": {"m": OWL_M, "lambda": OWL_LAMBDA}}
                path.write_text(json.dumps(result, indent=1))
                write_markdown(result, OUT / f"{args.out}.md")


def paired_timing(base, args):
    """Calibration time of each (gradprune, peer) pair on seed 0, alternating which runs first, so
    load changes on a shared machine hit both alike; min and median over ``--timing-repeats``."""
    seqs = torch.load(OUT / f"llm_oneshot_calib_seed{args.seeds[0]}.pt", weights_only=True)
    out = {"versions": versions(), "threads": torch.get_num_threads(), "repeats": args.timing_repeats,
           "seed": args.seeds[0], "cells": []}
    for setting in args.settings:
        if SETTINGS[setting][2]:
            continue  # OWL: llm-compressor's OWL fails (see the grid), torchao has none
        for ours, peer in PAIRS:
            times = {ours: [], peer: []}
            for i in range(args.timing_repeats):
                for method in ((ours, peer) if i % 2 == 0 else (peer, ours)):
                    model = copy.deepcopy(base)
                    t = time.perf_counter()
                    run(method, model, seqs, setting, args.calib_batch)
                    times[method].append(time.perf_counter() - t)
            cell = {"setting": setting, "gradprune": ours, "peer": peer, "seconds": times,
                    "min_ratio_peer_over_gradprune": min(times[peer]) / min(times[ours]),
                    "median_ratio_peer_over_gradprune": statistics.median(times[peer]) / statistics.median(times[ours])}
            out["cells"].append(cell)
            log.info("%s", cell)
            (OUT / f"{args.out}_timing.json").write_text(json.dumps(out, indent=1))
    lines = [f"Paired calibration time, seed {out['seed']}, {out['repeats']} alternating repeats each, one process, "
             f"{out['threads']} thread, torch {out['versions']['torch']}, llm-compressor "
             f"{out['versions']['llmcompressor']}, torchao {out['versions']['torchao']}; shared, loaded 2-core machine.",
             "", "| setting | gradprune | peer | gradprune s (min / median) | peer s (min / median) | "
             "peer / gradprune (min, median) |", "|---|---|---|---|---|---|"]
    for c in out["cells"]:
        a, b = c["seconds"][c["gradprune"]], c["seconds"][c["peer"]]
        lines.append(f"| {c['setting']} | {c['gradprune']} | {c['peer']} | {min(a):.2f} / {statistics.median(a):.2f} | "
                     f"{min(b):.2f} / {statistics.median(b):.2f} | {c['min_ratio_peer_over_gradprune']:.2f}, "
                     f"{c['median_ratio_peer_over_gradprune']:.2f} |")
    (OUT / f"{args.out}_timing.md").write_text("\n".join(lines) + "\n")


PAIRS = [("gradprune sparsegpt", "llmcompressor SparseGPTModifier"),
         ("gradprune wanda", "llmcompressor WandaPruningModifier"),
         ("gradprune wanda (dense inputs)", "torchao WandaSparsifier")]


def write_markdown(result, path):
    rows = [r for r in result["rows"] if "ppl" in r]
    settings = [s for s in SETTINGS if any(r["setting"] == s for r in rows)]
    v = result["versions"]
    lines = [f"Dense held-out perplexity {result['dense_ppl']:.2f}; one process, {result['threads']} thread, "
             f"torch {v['torch']}, llm-compressor {v['llmcompressor']}, torchao {v['torchao']}, transformers "
             f"{v['transformers']}. Seeds: {sorted({r['seed'] for r in rows})}. Shared 2-core machine (loaded "
             "by other jobs): times are not compared here (see below). Peak RSS = resident-set high-water mark above the "
             "level before the call; " + (
                 f"run with MALLOC_MMAP_THRESHOLD_={result['malloc_mmap_threshold']}: buffers of that size and more "
                 "go back to the OS when freed, so the RSS follows the live tensors." if result.get("malloc_mmap_threshold")
                 else "glibc's default allocator: freed buffers may stay in the heap, so it also depends on "
                 "allocation history (an upper bound of the live memory)."), "",
             "| setting | method | ppl (mean ± sd) | n | calib s (mean) | peak RSS MiB (mean) |", "|---|---|---|---|---|---|"]
    for s in settings:
        for m in METHODS:  # every method with rows (a run may redo only some; the others are kept)
            rs = [r for r in rows if r["setting"] == s and r["method"] == m]
            if not rs:
                continue
            p = [r["ppl"] for r in rs]
            sd = statistics.stdev(p) if len(p) > 1 else 0.0
            lines.append(f"| {s} | {m} | {statistics.mean(p):.2f} ± {sd:.2f} | {len(p)} | "
                         f"{statistics.mean(r['calib_seconds'] for r in rs):.2f} | "
                         f"{statistics.mean(r['peak_rss_bytes'] for r in rs) / 2**20:.1f} |")
    lines += ["", "Paired by seed (gradprune minus peer, perplexity). Calibration times: a run may redo only some "
              "methods (the other rows are kept), so times are compared in the paired timing run "
              "(`--timing-repeats`, `llm_oneshot_peers_timing.md`), not here:", "",
              "| setting | gradprune | peer | Δppl mean (min, max) |", "|---|---|---|---|"]
    for s in settings:
        for ours, peer in PAIRS:
            a = {r["seed"]: r for r in rows if r["setting"] == s and r["method"] == ours}
            b = {r["seed"]: r for r in rows if r["setting"] == s and r["method"] == peer}
            seeds = sorted(set(a) & set(b))
            if not seeds:
                continue
            d = [a[k]["ppl"] - b[k]["ppl"] for k in seeds]
            lines.append(f"| {s} | {ours} | {peer} | {statistics.mean(d):+.2f} ({min(d):+.2f}, {max(d):+.2f}) |")
    for key, what in (("unsupported", "Not run (unsupported by the peer)"), ("failed", "Failed (peer error)")):
        bad = sorted({(r["setting"], r["method"], r[key]) for r in result["rows"] if key in r})
        if bad:
            lines += ["", f"{what}: " + "; ".join(f"{m} {s}: {why}" for s, m, why in bad)]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
