"""Structured LLM pruning benchmark (not a test): gradprune's width, depth and width + depth
searches against uniform-width magnitude, ShortGPT and Torch-Pruning 1.6.1, on the shared small
LLaMA-GQA model of ``benchmarks/llm_model.py`` (6.3M parameters, 6 layers, 8 query / 2 KV heads,
tied embeddings; cached in ``~/.cache/gradprune-bench``).

For each budget (a fraction of the dense parameter count) and method: the pruned model's
parameters, FLOPs (``torch.utils.flop_counter`` of one ``[1, 128]`` forward), held-out perplexity
(the test split's first ``--n-eval`` windows of 128 tokens) one-shot and after ``--distill-steps``
steps of ``gp.distill`` from the dense model (logit KL, T = 1, AdamW, the same batches for every
method), CPU prefill latency (``[1, 128]``) and decode tokens/s at batch 1 (greedy, KV cache),
search time and the peak resident-memory increase during the search (Linux ``VmHWM`` after
resetting it through ``/proc/self/clear_refs``, minus the resident size before the search).

Methods:

* ``gp_width_{gradnas,taylor,activation}``: ``gp.search(axes=("heads", "mlp"))``, per-layer
  widths (KV groups and MLP neurons, default rules: MLP widths multiples of 32);
* ``gp_depth_gate`` / ``gp_depth_block_influence`` / ``gp_depth_loss_drop``:
  ``gp.search(axes=("layers",))`` with the residual-gate gradient, ShortGPT's block influence or
  the measured loss increase when the layer alone is skipped as the layer score;
* ``gp_width_depth``: ``gp.search(axes=("layers", "heads", "mlp"), method="gradnas")``;
* ``peer_uniform_magnitude``: uniform widths, units ranked by the L2 norm of their weights
  (``gp.search(method="magnitude", uniform=True)``: the baseline every structured method must beat);
* ``peer_shortgpt``: a re-implementation of ShortGPT (Men et al., 2024) written here, independent of
  gradprune: block influence ``BI_i = 1 - mean_tokens cos(x_i, x_{i+1})`` on the calibration
  batches, the lowest-BI layers removed until the budget holds;
* ``peer_torch_pruning``: Torch-Pruning 1.6.1's LLM pruning (magnitude, uniform; hidden size, MLP
  and whole heads; ``benchmarks/llm_structured_tp.py`` run in ``/work/venvs/zoo``).

Run one process at a time, 1 thread::

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/llm_structured.py --seeds 0 --distill-steps 100

Writes ``benchmarks/results/llm_structured.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import llm_model  # noqa: E402

import gradprune as gp  # noqa: E402
from gradprune.llm_structured import decode_tokens_per_s, prefill_ms  # noqa: E402

OUT = Path(__file__).parent / "results"
TP_PYTHON = Path("/work/venvs/zoo/bin/python")
log = logging.getLogger("llm_structured")

GP_METHODS = {
    "gp_width_gradnas": ("gradnas", ("heads", "mlp")),
    "gp_width_taylor": ("taylor", ("heads", "mlp")),
    "gp_width_activation": ("activation", ("heads", "mlp")),
    "gp_depth_gate": ("gradnas", ("layers",)),
    "gp_depth_block_influence": ("block_influence", ("layers",)),
    "gp_depth_loss_drop": ("loss_drop", ("layers",)),
    "gp_width_depth": ("gradnas", ("layers", "heads", "mlp")),
}
PEERS = ("peer_uniform_magnitude", "peer_shortgpt", "peer_torch_pruning")
METHODS = tuple(GP_METHODS) + PEERS


def loss_fn(model, batch):
    return model(input_ids=batch, labels=batch).loss


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def flops(model) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(input_ids=torch.zeros(1, llm_model.SEQ_LEN, dtype=torch.long))
    return int(fc.get_total_flops())


# -- peak resident memory of a phase (Linux) --------------------------------------------------

def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakRSS:
    """``with PeakRSS() as m: ...`` -> ``m.delta_mib``: peak resident size during the block minus
    the resident size before it (``None`` where ``/proc/self/clear_refs`` is not writable)."""

    def __enter__(self):
        gc.collect()
        try:  # hand freed heap back to the system, so the block's growth is seen, not reused memory
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        self.ok = True
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # resets VmHWM to the current resident size
        except OSError:
            self.ok = False
        self.before = _status_kib("VmRSS")
        return self

    def __exit__(self, *exc):
        peak = _status_kib("VmHWM")
        self.delta_mib = (peak - self.before) / 1024 if self.ok and peak and self.before else None


# -- ShortGPT, re-implemented (independent of gradprune) ---------------------------------------

@torch.no_grad()
def shortgpt_block_influence(model, batches) -> torch.Tensor:
    """``BI_i = 1 - mean over tokens of cos(input of layer i, output of layer i)``."""
    layers = model.model.layers
    total = torch.zeros(len(layers), dtype=torch.float64)
    n = torch.zeros(len(layers), dtype=torch.float64)
    handles = []
    for i, layer in enumerate(layers):
        def hook(mod, args, kwargs, out, i=i):
            x = args[0] if args else kwargs["hidden_states"]
            y = out[0] if isinstance(out, tuple) else out
            cos = F.cosine_similarity(x.double(), y.double(), dim=-1)
            total[i] += float((1 - cos).sum())
            n[i] += cos.numel()
        handles.append(layer.register_forward_hook(hook, with_kwargs=True))
    try:
        model.eval()
        for b in batches:
            model(input_ids=b)
    finally:
        for h in handles:
            h.remove()
    return total / n


def remove_layers(model, drop):
    """A copy of ``model`` without decoder layers ``drop`` (renumbered, config updated)."""
    small = copy.deepcopy(model)
    keep = [i for i in range(len(small.model.layers)) if i not in set(drop)]
    small.model.layers = torch.nn.ModuleList([small.model.layers[i] for i in keep])
    for j, layer in enumerate(small.model.layers):
        layer.self_attn.layer_idx = j
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = j
    small.config.num_hidden_layers = len(keep)
    if getattr(small.config, "layer_types", None):
        small.config.layer_types = [small.config.layer_types[i] for i in keep]
    return small


def shortgpt(model, batches, max_params):
    bi = shortgpt_block_influence(model, batches)
    order = sorted(range(len(bi)), key=lambda i: float(bi[i]))
    per_layer = [sum(p.numel() for p in layer.parameters()) for layer in model.model.layers]
    total, drop = count(model), []
    for i in order:
        if total <= max_params or len(drop) == len(order) - 1:
            break
        drop.append(i)
        total -= per_layer[i]
    return remove_layers(model, drop), {"block_influence": [float(v) for v in bi], "dropped": sorted(drop)}


# -- Torch-Pruning, in its own environment -------------------------------------------------------

def torch_pruning(max_params: int, workdir: str):
    from safetensors.torch import load_model
    from transformers import LlamaConfig, LlamaForCausalLM

    # data-free and deterministic: pruned once per budget, cached next to the model
    out = os.path.join(llm_model.CACHE, f"tp-llm-v2-{max_params}")
    if not Path(out, "tp_info.json").exists():
        cmd = [str(TP_PYTHON), str(Path(__file__).parent / "llm_structured_tp.py"),
               "--model", str(llm_model.MODEL_DIR), "--params", str(max_params), "--out", out]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
    info = json.loads(Path(out, "tp_info.json").read_text())
    # transformers validates hidden_size % num_attention_heads only when a config is read or written,
    # and Torch-Pruning's uniform ratio can give e.g. 212 and 6 heads of head_dim 32 (the model runs):
    # the dense config with the pruned widths set, then the saved weights
    config = LlamaConfig.from_pretrained(llm_model.MODEL_DIR)
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads"):
        setattr(config, key, info[key])
    model = LlamaForCausalLM(config)
    missing, unexpected = load_model(model, os.path.join(out, "model.safetensors"), strict=True)
    if count(model) != info["params"]:
        raise RuntimeError(f"Torch-Pruning model reloaded with {count(model)} params, not {info['params']}")
    return model.eval(), info


# -- one run ---------------------------------------------------------------------------------------

def prune(method: str, base, calib, max_params: int, workdir: str):
    """``(small model, search seconds, peak MiB, details)``."""
    extra = {}
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        if method in GP_METHODS:
            score, axes = GP_METHODS[method]
            found = gp.search(base, {"params": max_params}, calib, loss_fn, method=score,
                              example_input=calib[0][:1], axes=axes, max_iter_data_loader=len(calib),
                              show_progress=False)
            small = found.export()
            extra["dropped_layers"] = list(getattr(found, "dropped", None) or getattr(found, "dropped_layers", None) or [])
            if hasattr(found, "widths"):
                extra["widths"] = {found.analysis.groups[gi].name: w for gi, w in found.widths.items()}
        elif method == "peer_uniform_magnitude":
            found = gp.search(base, {"params": max_params}, None, None, method="magnitude",
                              example_input=calib[0][:1], uniform=True)
            small = found.export()
            extra["widths"] = {found.analysis.groups[gi].name: w for gi, w in found.widths.items()}
        elif method == "peer_shortgpt":
            small, extra = shortgpt(base, calib, max_params)
        elif method == "peer_torch_pruning":
            small, extra = torch_pruning(max_params, workdir)
        else:
            raise ValueError(method)
        seconds = time.perf_counter() - t0
    if method == "peer_torch_pruning":  # its own process: its own measurements
        seconds, peak = extra["search_seconds"], extra.get("peak_mib")
    else:
        peak = mem.delta_mib
    return small.eval(), seconds, peak, extra


def ppl(model, test) -> float:
    return llm_model.perplexity(model, test)


def summarise(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--budgets", type=int, nargs="+", default=[75, 50], help="percent of dense params")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--n-calib", type=int, default=32, help="calibration windows (scoring)")
    ap.add_argument("--calib-batch", type=int, default=8)
    ap.add_argument("--n-eval", type=int, default=32)
    ap.add_argument("--distill-steps", type=int, default=100)
    ap.add_argument("--distill-batch", type=int, default=8)
    ap.add_argument("--distill-lr", type=float, default=2e-4, help="default: the final learning rate of the model's own training")
    ap.add_argument("--name", default="llm_structured")
    ap.add_argument("--append", action="store_true",
                    help="keep the runs of other seeds already in results/<name>.json (same settings)")
    ap.add_argument("--merge", nargs="+", metavar="NAME",
                    help="run nothing: add the runs of results/NAME.json (other seeds, same settings, "
                         "e.g. run at the same time under another --name) to results/<name>.json and "
                         "rewrite its Markdown")
    args = ap.parse_args()
    if args.merge:
        return merge(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    if "peer_torch_pruning" in args.methods and not TP_PYTHON.exists():
        raise SystemExit(f"{TP_PYTHON} not found: build Torch-Pruning's environment or drop peer_torch_pruning")
    base = llm_model.load()
    ids = llm_model.token_ids()
    test = llm_model.sequences(ids["test"], n=args.n_eval)
    prompt = test[:1]
    dense = {"params": count(base), "flops": flops(base), "ppl": ppl(base, test),
             "prefill_ms": prefill_ms(base, prompt, repeats=5),
             "decode_tokens_per_s": decode_tokens_per_s(base, prompt, tokens=32, repeats=3),
             "weights_mib": sum(p.numel() * p.element_size() for p in base.parameters()) / 2**20}
    log.info("dense %s", dense)
    runs, commands, run_seeds, run_budgets, run_methods = [], [], list(args.seeds), list(args.budgets), list(args.methods)
    if args.append and (OUT / f"{args.name}.json").exists():
        old = json.loads((OUT / f"{args.name}.json").read_text())
        planned = {(b, s_, m) for b in args.budgets for s_ in args.seeds for m in args.methods}
        runs = [r for r in old["runs"] if (r["budget"], r["seed"], r["method"]) not in planned]
        args.budgets = sorted({r["budget"] for r in runs} | set(args.budgets), reverse=True)
        args.methods = [m for m in METHODS if m in {r["method"] for r in runs} | set(args.methods)]
        commands = old["meta"].get("commands", [old["meta"]["command"]])
        args.seeds = sorted({r["seed"] for r in runs} | set(args.seeds))
    args.commands = commands + ["OMP_NUM_THREADS=1 python benchmarks/llm_structured.py " + " ".join(sys.argv[1:])]
    workdir = tempfile.mkdtemp(prefix="llm-structured-")
    tp_cache = {}
    for budget in run_budgets:
        max_params = int(budget / 100 * dense["params"])
        for seed in run_seeds:
            calib = list(llm_model.sequences(ids["train"], n=args.n_calib, seed=1000 + seed).split(args.calib_batch))
            dist = list(llm_model.sequences(ids["train"], n=args.distill_steps * args.distill_batch,
                                            seed=2000 + seed).split(args.distill_batch))
            for method in run_methods:
                row = {"budget": budget, "seed": seed, "method": method}
                try:
                    if method == "peer_torch_pruning" and budget in tp_cache:  # data-free: prune once
                        small, secs, peak, extra = copy.deepcopy(tp_cache[budget])
                    else:
                        small, secs, peak, extra = prune(method, base, calib, max_params, workdir)
                        if method == "peer_torch_pruning":
                            tp_cache[budget] = copy.deepcopy((small, secs, peak, extra))
                except Exception as exc:  # a method that cannot reach the budget: say so
                    log.exception("%s at %d%% failed", method, budget)
                    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                    runs.append(row)
                    continue
                row.update(params=count(small), flops=flops(small), search_seconds=secs, peak_mib=peak,
                           details=extra, ppl_oneshot=ppl(small, test))
                row["prefill_ms"] = prefill_ms(small, prompt, repeats=5)
                row["decode_tokens_per_s"] = decode_tokens_per_s(small, prompt, tokens=32, repeats=3)
                if args.distill_steps:
                    t0 = time.perf_counter()
                    gp.distill(small, teacher=base, data=dist, steps=args.distill_steps,
                               lr=args.distill_lr, temperature=1.0, seed=seed, show_progress=False)
                    row["distill_seconds"] = time.perf_counter() - t0
                    row["ppl_distilled"] = ppl(small, test)
                log.info("%d%% seed %d %-26s params %.1f%% ppl %.2f -> %s (%.1fs)", budget, seed, method,
                         100 * row["params"] / dense["params"], row["ppl_oneshot"],
                         f"{row.get('ppl_distilled', float('nan')):.2f}", secs)
                runs.append(row)
                write(args, dense, runs)
    write(args, dense, runs)


def merge(args):
    """``--merge``: one result from several runs of the script with the same settings."""
    main_res = json.loads((OUT / f"{args.name}.json").read_text())
    runs, commands = main_res["runs"], list(main_res["meta"]["commands"])
    settings = ("n_calib", "calib_batch", "n_eval", "distill_steps", "distill_batch", "distill_lr")
    for name in args.merge:
        other = json.loads((OUT / f"{name}.json").read_text())
        for key in settings:
            if other["meta"][key] != main_res["meta"][key]:
                raise SystemExit(f"{name}.json has {key}={other['meta'][key]}, "
                                 f"{args.name}.json {main_res['meta'][key]}: not mergeable")
        new = {(r["budget"], r["seed"], r["method"]) for r in other["runs"]}
        runs = [r for r in runs if (r["budget"], r["seed"], r["method"]) not in new] + other["runs"]
        commands += [c for c in other["meta"]["commands"] if c not in commands]
    meta = main_res["meta"]
    for key in settings:
        setattr(args, key, meta[key])
    this = "python benchmarks/llm_structured.py " + " ".join(sys.argv[1:])
    args.commands = commands + ([this] if this not in commands else [])
    args.seeds = sorted({r["seed"] for r in runs})
    args.budgets = sorted({r["budget"] for r in runs}, reverse=True)
    args.methods = [m for m in METHODS if m in {r["method"] for r in runs}]
    runs.sort(key=lambda r: (-r["budget"], r["seed"], METHODS.index(r["method"])))
    write(args, main_res["dense"], runs)


def write(args, dense, runs):
    OUT.mkdir(exist_ok=True)
    meta = {"command": " && ".join(args.commands), "commands": args.commands,
            "seeds": args.seeds, "budgets": args.budgets, "n_calib": args.n_calib,
            "calib_batch": args.calib_batch, "n_eval": args.n_eval, "distill_steps": args.distill_steps,
            "distill_batch": args.distill_batch, "distill_lr": args.distill_lr,
            "machine": "2 shared CPU cores (other jobs running), 1 thread; timings are noisy",
            "torch": torch.__version__}
    (OUT / f"{args.name}.json").write_text(json.dumps({"meta": meta, "dense": dense, "runs": runs},
                                                      indent=1, default=str))
    lines = [f"# Structured LLM pruning on the 6.3M LLaMA-GQA model ({len(args.seeds)} seed(s): {args.seeds})", "",
             f"`{meta['command']}`", "",
             f"Dense: {dense['params']:,} params, held-out ppl {dense['ppl']:.2f}, prefill "
             f"{dense['prefill_ms']:.1f} ms, decode {dense['decode_tokens_per_s']:.0f} tokens/s, weights "
             f"{dense['weights_mib']:.1f} MiB. Distillation: {args.distill_steps} steps of batch "
             f"{args.distill_batch} x 128 tokens, lr {args.distill_lr}. {meta['machine']}.", "",
             "| budget | method | params | FLOPs | ppl one-shot | ppl distilled | prefill ms | decode tok/s | search s | peak MiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for budget in args.budgets:
        for method in args.methods:
            rs = [r for r in runs if r["budget"] == budget and r["method"] == method]
            if not rs:
                continue
            ok = [r for r in rs if "error" not in r]
            if not ok:
                lines.append(f"| {budget}% | {method} | fails: {rs[0]['error'][:120]} |  |  |  |  |  |  |  |")
                continue
            m1, s1 = summarise([r["ppl_oneshot"] for r in ok])
            m2, s2 = summarise([r.get("ppl_distilled") for r in ok])
            fmt = lambda m, s: "n/a" if m is None else (f"{m:.2f}" + (f" ± {s:.2f}" if len(ok) > 1 else ""))  # noqa: E731
            peak = summarise([r["peak_mib"] for r in ok])[0]
            span = lambda key: "–".join(dict.fromkeys(  # noqa: E731
                f"{v / dense[key]:.1%}" for v in (min(r[key] for r in ok), max(r[key] for r in ok))))
            lines.append(
                f"| {budget}% | {method} | {span('params')} | {span('flops')} | "
                f"{fmt(m1, s1)} | {fmt(m2, s2)} | {statistics.median(r['prefill_ms'] for r in ok):.1f} | "
                f"{statistics.median(r['decode_tokens_per_s'] for r in ok):.0f} | "
                f"{statistics.mean(r['search_seconds'] for r in ok):.1f} | "
                f"{'n/a' if peak is None else f'{peak:.1f}'} |")
    lines += ["", "Params and FLOPs as a fraction of the dense model (lowest–highest over seeds); FLOPs of one [1, 128] forward. "
              "Peak MiB: resident-memory increase during the search (Torch-Pruning: in its own "
              "process). Perplexity: mean ± sd over seeds (calibration and distillation windows "
              "change with the seed; Torch-Pruning is data-free, so only its distillation changes). "
              "Prefill, decode and search times were measured on 2 CPU cores shared with other "
              "jobs: they are noisy and only indicative.", ""] + goal_lines(args, runs)
    (OUT / f"{args.name}.md").write_text("\n".join(lines) + "\n")


def goal_lines(args, runs) -> list:
    """The issue's goal, per budget and phase: the best gradprune method's mean perplexity below
    every peer's mean (a peer that failed counts as not measured, not as beaten)."""
    out = ["## Goal: perplexity of gradprune's best method below every peer's, at every budget", "",
           "Best gradprune method: the gp_* row with the lowest mean at that budget and phase (picked "
           "after the fact, on the same held-out windows). Met: its mean is below every peer's mean.", ""]
    for budget in args.budgets:
        for key, phase in (("ppl_oneshot", "one-shot"), ("ppl_distilled", "distilled")):
            means = {}
            for method in args.methods:
                vals = [r[key] for r in runs if r["budget"] == budget and r["method"] == method
                        and "error" not in r and r.get(key) is not None]
                if vals:
                    means[method] = summarise(vals) + (len(vals),)
            gp_m = {m: v for m, v in means.items() if m.startswith("gp_")}
            peers = {m: v for m, v in means.items() if m.startswith("peer_")}
            if not gp_m or not peers:
                continue
            best = min(gp_m, key=lambda m: gp_m[m][0])
            missing = [m for m in PEERS if m in args.methods and m not in peers]
            met = all(gp_m[best][0] < v[0] for v in peers.values()) and not missing
            peer_text = ", ".join(f"{m} {v[0]:.2f} ± {v[1]:.2f}" for m, v in sorted(peers.items(), key=lambda kv: kv[1][0]))
            out.append(f"- {budget}%, {phase}: **{'met' if met else 'not met'}**. Best gradprune: {best} "
                       f"{gp_m[best][0]:.2f} ± {gp_m[best][1]:.2f} (n={gp_m[best][2]}); peers: {peer_text}"
                       + (f"; not measured: {', '.join(missing)}" if missing else "") + ".")
    return out


if __name__ == "__main__":
    main()
