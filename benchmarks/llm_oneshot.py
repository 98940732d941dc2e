"""One-shot LLM sparsity benchmark (not a test): gradprune's magnitude / wanda / sparsegpt / gblm /
ria, sequential and not, on the shared small LLaMA-GQA model (``benchmarks/llm_model.py``).

Measures held-out perplexity (test split), calibration time and the counted peak of the sequential
pass against the documented formula, per calibration seed; plus CPU prefill/decode latency of the
dense and the 2:4-masked model. Writes ``benchmarks/results/llm_oneshot.json`` and ``.md``.

    OMP_NUM_THREADS=1 PYTHONPATH=src nice -n 10 python benchmarks/llm_oneshot.py --seeds 0 1 2
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/llm_oneshot.py --gpu   # GPU 2:4 kernels only

Memory of a sequential run: the process's resident-set rise above its level before the call
(sampled every 0.5 ms; the script re-executes itself with ``MALLOC_MMAP_THRESHOLD_=65536`` so that
freed buffers go back to the OS and the sampled RSS follows the live tensors) against the
documented bound ``P_block + 2 A + S_block + max(F, R)`` (``gradprune.oneshot``), with ``F`` (one
batch's forward transients in a block) measured here on the dense first block. On the CPU without
offload the block's parameters are already resident before the call, so the RSS rise is compared
with the bound minus ``P_block``.

``--gpu`` (needs CUDA; without it the script says so and exits): the 2:4-masked model's Linear
weights converted with ``torch.sparse.to_sparse_semi_structured`` (float16), per-layer matmul time
and end-to-end prefill/decode time against dense float16 in the same process; conversions or
kernels that fail are recorded as failed. Writes ``results/llm_oneshot_gpu.{json,md}``.

Also measures each pruned Linear's reconstruction error on its dense calibration inputs for
magnitude / wanda / sparsegpt (first seed). Cells already in the JSON that this run does not redo
(other seeds, settings or methods) are kept.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import llm_model  # noqa: E402
from llm_oneshot_peers import PeakRSS  # noqa: E402

import gradprune as gp  # noqa: E402

SETTINGS = {  # name -> (sparsity, pattern, allocation)
    "50%": (0.5, "1x1", "uniform"),
    "2:4": (0.5, "2:4", "uniform"),
    "4:8": (0.5, "4:8", "uniform"),
    "70%": (0.7, "1x1", "uniform"),
    "50%+OWL": (0.5, "1x1", "owl"),
    "70%+OWL": (0.7, "1x1", "owl"),
}
METHODS = ["magnitude", "wanda", "sparsegpt", "gblm", "ria"]
OUT = Path(__file__).parent / "results"
log = logging.getLogger("llm_oneshot")


def loss_fn(model, batch):
    return model(input_ids=batch, labels=batch).loss


def formula_terms(model, n_tokens, criterion, forward_peak):
    """The documented bound ``P_block + 2 A + S_block + max(F, R)`` (see gradprune.oneshot), term
    by term, for one LLaMA block: ``F`` is measured (``forward_peak``), the others are counted;
    ``masks``: the result's keep masks (1 byte per pruned weight), which accumulate on the CPU."""
    block = model.model.layers[0]
    p_block = sum(p.numel() * p.element_size() for p in block.parameters())
    hidden = model.config.hidden_size
    # hidden states, plus the position tables (cos, sin) and ids that travel with them
    acts = n_tokens * hidden * 4 + n_tokens * (hidden // model.config.num_attention_heads) * 4 * 2
    lins = [m for m in block.modules() if isinstance(m, torch.nn.Linear)]
    stats = sum(4 * m.in_features for m in lins)
    if criterion == "sparsegpt":
        stats += sum(4 * m.in_features ** 2 for m in lins)
        work = max(16 * m.in_features ** 2 + 5 * m.weight.numel() for m in lins)
    else:
        work = max(40 * m.weight.numel() for m in lins)
    if criterion == "gblm":
        stats += sum(4 * m.weight.numel() for m in lins)
    masks = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    return {"P_block": p_block, "A": acts, "S_block": stats, "F": forward_peak, "R": work,
            "bound": p_block + 2 * acts + stats + max(forward_peak, work), "masks": masks}


def block_forward_peak(model, calib):
    """``F``: the RSS rise of one dense forward of the first block on one calibration batch."""
    from gradprune.oneshot import _capture_block_inputs

    block = model.model.layers[0]
    args, kwargs = _capture_block_inputs(model, block, calib[:1], loss_fn, 1, torch.device("cpu"))[0]
    peaks = []
    with torch.no_grad():
        for _ in range(3):
            with PeakRSS(period=0.0005) as mem:
                block(*args, **kwargs)
            peaks.append(mem.peak)
    return min(peaks)


def reconstruction_errors(base, seqs, batch, settings):
    """Per-layer relative output error ``||X W^T - X W'^T||^2 / ||X W^T||^2`` of every pruned
    Linear on its dense calibration inputs ``X`` (sequential=False, so every method sees the same
    ``X``), for magnitude, wanda and sparsegpt: ``{setting: {method: [error per layer]}}``, the
    layer names under ``"layers"``. Unstructured settings add the comparison-group controls:
    ``wanda (layer)`` (``criterion_options={"comparison": "layer"}``, one ranking per layer as
    magnitude's) and ``magnitude (row)`` (the same exact per-row counts as wanda's default); the
    spread of each layer's input norms (std / mean of ``||X_j||``) is under ``"input_norm_cv"``."""
    from gradprune.oneshot import _row_prune
    from gradprune.scores.llm import layer_inputs_error

    names = list(gp.find_targets(base))
    xs, handles = {n: [] for n in names}, []
    for n in names:
        mod = base.get_submodule(n.rsplit(".", 1)[0])
        handles.append(mod.register_forward_pre_hook(
            lambda m, a, n=n: xs[n].append(a[0].detach().reshape(-1, a[0].shape[-1]))))
    with torch.no_grad():
        for b in seqs.split(batch):
            loss_fn(base, b)
    for h in handles:
        h.remove()
    xs = {n: torch.cat(v) for n, v in xs.items()}
    out = {"layers": names}
    norms = {n: xs[n].norm(dim=0) for n in names}
    out["input_norm_cv"] = [float(norms[n].std() / norms[n].mean()) for n in names]
    for setting in settings:
        sparsity, pattern, allocation = SETTINGS[setting]
        out[setting] = {}
        for method in ("magnitude", "wanda", "sparsegpt"):
            model = copy.deepcopy(base)
            gp.prune(model, sparsity=sparsity, criterion=method, pattern=pattern, data=list(seqs.split(batch)),
                     loss_fn=loss_fn)
            out[setting][method] = [layer_inputs_error(base.get_parameter(n), model.get_parameter(n), xs[n])
                                    for n in names]
        if pattern == "1x1":
            model = copy.deepcopy(base)
            gp.prune(model, sparsity=sparsity, criterion="wanda", criterion_options={"comparison": "layer"},
                     data=list(seqs.split(batch)), loss_fn=loss_fn)
            out[setting]["wanda (layer)"] = [layer_inputs_error(base.get_parameter(n), model.get_parameter(n),
                                                                xs[n]) for n in names]
            errs = []
            for n in names:  # magnitude with wanda's per-row exact counts (round_half_up(s * numel))
                w = base.get_parameter(n).detach()
                k = int(sparsity * w.numel() + 0.5)
                errs.append(layer_inputs_error(w, w * ~_row_prune(w.abs(), k), xs[n]))
            out[setting]["magnitude (row)"] = errs
        log.info("reconstruction %s: %s", setting,
                 {m: statistics.mean(v) for m, v in out[setting].items()})
    return out


@torch.no_grad()
def latency(model, prompt, new_tokens=32, repeats=3):
    """Median prefill seconds (one forward over ``prompt``) and decode seconds per token."""
    pre, dec = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True)
        _sync()
        pre.append(time.perf_counter() - t)
        cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=tok, past_key_values=cache, use_cache=True)
            cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _sync()
        dec.append((time.perf_counter() - t) / new_tokens)
    return statistics.median(pre), statistics.median(dec)


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def gpu_latency(base, test, repeats=20):
    """GPU 2:4 kernels: convert the 2:4-masked model's decoder Linear weights with
    ``torch.sparse.to_sparse_semi_structured`` (float16) and time them against dense float16 in the
    same process: per distinct layer shape (``F.linear`` on 2048 tokens, median of ``repeats``) and
    end to end (prefill of 16 x 128 tokens, decode per token). A conversion or kernel that fails is
    recorded with its error; outputs are checked against the dense masked layer."""
    import torch.nn.functional as F
    from torch.sparse import to_sparse_semi_structured

    dev, dtype = torch.device("cuda"), torch.float16
    masked = copy.deepcopy(base)
    gp.prune(masked, sparsity=0.5, criterion="magnitude", pattern="2:4")
    dense = copy.deepcopy(masked).to(dev, dtype)      # same weights, dense kernels
    sparse = copy.deepcopy(masked).to(dev, dtype)
    failed, shapes = {}, {}
    for name, mod in sparse.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.startswith("model.layers."):
            try:
                mod.weight = torch.nn.Parameter(to_sparse_semi_structured(mod.weight.detach()), requires_grad=False)
                shapes.setdefault(tuple(mod.weight.shape), name)
            except Exception as e:  # noqa: BLE001 - a refused conversion is a result
                failed[name] = f"{type(e).__name__}: {e}"

    def timed(fn):
        fn()
        _sync()
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            _sync()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    per_layer = []
    with torch.no_grad():
        for shape, name in shapes.items():
            wd, ws = dense.get_parameter(name + ".weight"), sparse.get_parameter(name + ".weight")
            x = torch.randn(2048, shape[1], device=dev, dtype=dtype)
            row = {"layer": name, "shape": list(shape)}
            try:
                err = float((F.linear(x, ws) - F.linear(x, wd)).abs().max())
                row.update(dense_s=timed(lambda: F.linear(x, wd)), sparse_s=timed(lambda: F.linear(x, ws)),
                           max_abs_diff=err)
                row["speedup"] = row["dense_s"] / row["sparse_s"]
            except Exception as e:  # noqa: BLE001
                row["failed"] = f"{type(e).__name__}: {e}"
            per_layer.append(row)
            log.info("%s", row)
        prompt = test[:16].to(dev)
        e2e = {}
        for label, model in (("dense fp16", dense), ("2:4 semi-structured fp16", sparse)):
            try:
                e2e[label] = {"prefill_s": timed(lambda: model(input_ids=prompt)),
                              "decode_s_per_token": latency(model, test[:1].to(dev))[1]}
            except Exception as e:  # noqa: BLE001
                e2e[label] = {"failed": f"{type(e).__name__}: {e}"}
            log.info("%s %s", label, e2e[label])
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "conversion_failed": failed,
              "per_layer": per_layer, "end_to_end": e2e, "repeats": repeats}
    (OUT / "llm_oneshot_gpu.json").write_text(json.dumps(result, indent=1))
    lines = [f"GPU 2:4 kernels on {result['device']}, torch {result['torch']}, float16, median of {repeats}; "
             "`python benchmarks/llm_oneshot.py --gpu`.", "", "| layer shape | dense ms | 2:4 ms | speed-up | max abs diff |",
             "|---|---|---|---|---|"]
    for r in per_layer:
        if "failed" in r:
            lines.append(f"| {r['shape']} | failed: {r['failed']} | | | |")
        else:
            lines.append(f"| {r['shape']} | {1e3 * r['dense_s']:.3f} | {1e3 * r['sparse_s']:.3f} | "
                         f"{r['speedup']:.2f} | {r['max_abs_diff']:.2e} |")
    lines += ["", "| model | prefill 16x128 ms | decode ms/token |", "|---|---|---|"]
    for label, r in e2e.items():
        lines.append(f"| {label} | failed: {r['failed']} | |" if "failed" in r else
                     f"| {label} | {1e3 * r['prefill_s']:.2f} | {1e3 * r['decode_s_per_token']:.2f} |")
    if failed:
        lines += ["", "Conversions that failed: " + "; ".join(f"{n}: {e}" for n, e in failed.items())]
    (OUT / "llm_oneshot_gpu.md").write_text("\n".join(lines) + "\n")
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS))
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--n-calib", type=int, default=16)
    ap.add_argument("--n-eval", type=int, default=32)
    ap.add_argument("--calib-batch", type=int, default=4)
    ap.add_argument("--gpu", action="store_true", help="only the GPU 2:4 kernel latency (needs CUDA)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    if args.gpu:
        if not torch.cuda.is_available():
            log.warning("--gpu: CUDA is not available on this machine; the GPU 2:4 latency was NOT measured "
                        "and nothing was written")
            return
        base = llm_model.load()
        return gpu_latency(base, llm_model.sequences(llm_model.token_ids()["test"], n=args.n_eval))
    base = llm_model.load()
    ids = llm_model.token_ids()
    test = llm_model.sequences(ids["test"], n=args.n_eval)
    forward_peak = block_forward_peak(base, list(llm_model.sequences(ids["train"], n=args.n_calib,
                                                                     seed=1000).split(args.calib_batch)))
    log.info("one batch's forward transients in a block (F): %.0f KiB", forward_peak / 1024)
    dense_ppl = llm_model.perplexity(base, test)
    log.info("dense ppl %.2f", dense_ppl)
    rows, path = [], OUT / "llm_oneshot.json"
    if path.exists():  # keep the cells this run does not redo
        redo = {(sd, st, m) for sd in args.seeds for st in args.settings for m in args.methods}
        rows = [r for r in json.loads(path.read_text())["rows"] if (r["seed"], r["setting"], r["method"]) not in redo]
    recon = reconstruction_errors(base, llm_model.sequences(ids["train"], n=args.n_calib, seed=1000 + args.seeds[0]),
                                  args.calib_batch, ["50%", "2:4", "4:8", "70%"])
    for seed in args.seeds:
        seqs = llm_model.sequences(ids["train"], n=args.n_calib, seed=1000 + seed)
        calib = list(seqs.split(args.calib_batch))
        torch.save(seqs, OUT / f"llm_oneshot_calib_seed{seed}.pt")  # the same sequences for the peers
        for setting in args.settings:
            sparsity, pattern, allocation = SETTINGS[setting]
            for method in args.methods:
                for sequential in (False, True):
                    if method == "magnitude" and sequential:
                        continue  # magnitude reads no inputs: sequential changes nothing
                    model = copy.deepcopy(base)
                    with PeakRSS(period=0.0005) as mem:
                        t = time.perf_counter()
                        res = gp.prune(model, sparsity=sparsity, criterion=method, pattern=pattern,
                                       allocation=allocation, data=calib, loss_fn=loss_fn, sequential=sequential)
                        seconds = time.perf_counter() - t
                    ppl = llm_model.perplexity(model, test)
                    row = {"seed": seed, "setting": setting, "method": method, "sequential": sequential,
                           "ppl": ppl, "calib_seconds": seconds, "sparsity": res.masks.sparsity(),
                           "peak_device_bytes": res.details.get("peak_device_bytes"), "peak_rss_bytes": mem.peak,
                           "formula": formula_terms(base, seqs.numel(), method, forward_peak) if sequential
                           else None}
                    rows.append(row)
                    log.info("%s", row)
                    partial = {"dense_ppl": dense_ppl, "rows": rows, "args": vars(args),
                               "reconstruction": recon, "forward_peak_bytes": forward_peak,
                               "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_")}
                    (OUT / "llm_oneshot.json").write_text(json.dumps(partial, indent=1))
                    write_markdown(partial)
    # latency: dense vs 2:4 masked, same process, same thread count
    prompt = test[:1]
    masked = copy.deepcopy(base)
    gp.prune(masked, sparsity=0.5, criterion="magnitude", pattern="2:4")
    lat = {"dense": latency(base, prompt), "2:4 masked": latency(masked, prompt)}
    result = {"dense_ppl": dense_ppl, "rows": rows, "args": vars(args), "latency": lat, "reconstruction": recon,
              "forward_peak_bytes": forward_peak, "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
              "model": {"params": sum(p.numel() for p in base.parameters()),
                        "history": json.loads((llm_model.MODEL_DIR / "history.json").read_text())}}
    (OUT / "llm_oneshot.json").write_text(json.dumps(result, indent=1))
    write_markdown(result)


def write_markdown(result):
    rows = result["rows"]
    keys = []
    for r in rows:
        k = (r["setting"], r["method"], r["sequential"])
        if k not in keys:
            keys.append(k)
    keys.sort(key=lambda k: (list(SETTINGS).index(k[0]), METHODS.index(k[1]), k[2]))
    lines = [f"Dense held-out perplexity: {result['dense_ppl']:.2f}. Seeds: {sorted({r['seed'] for r in rows})}.",
             "", "Memory of the sequential pass (lowest seed's row): *counted* = tensors held on the compute device "
             "(`details['peak_device_bytes']`) / the bound P_block + 2A + S_block + max(F, R); *RSS* = measured "
             "resident-set rise above the level before the call / the bound − P_block (the block is already "
             "resident on the CPU) + the keep masks (1 byte per weight; the result, held on the CPU). gblm's RSS "
             "includes its whole-model backward pass first, which the bound does not cover. Rows without RSS "
             "predate the measurement (their bound was the former P_block + 2A + S_block, without the transients). "
             "*calib s* of rows with RSS ran with the 0.5 ms RSS sampler thread (it takes the GIL) on a loaded "
             "machine: times are compared in llm_oneshot_peers_timing.md, not here.", "",
             "| setting | method | sequential | ppl (mean ± sd over seeds) | calib s | counted / bound KiB | "
             "RSS / bound − P_block + masks KiB |", "|---|---|---|---|---|---|---|"]
    for k in keys:
        rs = [r for r in rows if (r["setting"], r["method"], r["sequential"]) == k]
        p = [r["ppl"] for r in rs]
        sd = statistics.stdev(p) if len(p) > 1 else 0.0
        counted = rss = ""
        r0 = min(rs, key=lambda r: (r.get("formula") is None, r["seed"]))  # a row with the bound, if any
        f = r0.get("formula")
        if r0["peak_device_bytes"] and f:
            counted = f"{r0['peak_device_bytes'] / 1024:.0f} / {f['bound'] / 1024:.0f}"
            rss = f"{r0['peak_rss_bytes'] / 1024:.0f} / {(f['bound'] - f['P_block'] + f['masks']) / 1024:.0f}"
        elif r0["peak_device_bytes"]:  # older rows: the former bound, without max(F, R)
            counted = f"{r0['peak_device_bytes'] / 1024:.0f} / {r0['formula_bytes'] / 1024:.0f} (old bound)"
        lines.append(f"| {k[0]} | {k[1]} | {'yes' if k[2] else 'no'} | {statistics.mean(p):.2f} ± {sd:.2f} | "
                     f"{statistics.mean(r['calib_seconds'] for r in rs):.2f} | {counted} | {rss} |")
    recon = result.get("reconstruction")
    if recon:
        names = recon["layers"]
        n_layers = len(names)
        settings = [k for k in recon if k not in ("layers", "input_norm_cv")]

        def below(a, b):
            return f"{sum(x < y for x, y in zip(a, b))}/{n_layers}" if a and b else "–"

        lines += ["", f"Per-layer reconstruction error on the dense calibration inputs (seed {result['args']['seeds'][0]}, "
                  f"sequential=False; relative output error of each of the {n_layers} pruned Linear layers). "
                  "wanda compares within each output row (the paper's default), magnitude over the whole layer; "
                  "the controls put both in the same comparison group: `wanda (layer)` = "
                  "`criterion_options={'comparison': 'layer'}`, `magnitude (row)` = the lowest |W| of each row with "
                  "wanda's exact per-row counts.", "",
                  "| setting | magnitude | wanda | sparsegpt | sparsegpt < wanda | wanda < magnitude | "
                  "wanda (layer) < magnitude | wanda < magnitude (row) |", "|---|---|---|---|---|---|---|---|"]
        for setting in settings:
            e = recon[setting]
            mg, wa, sg = e["magnitude"], e["wanda"], e["sparsegpt"]
            lines.append(f"| {setting} | {statistics.mean(mg):.4f} | {statistics.mean(wa):.4f} | "
                         f"{statistics.mean(sg):.4f} | {below(sg, wa)} | {below(wa, mg)} | "
                         f"{below(e.get('wanda (layer)'), mg)} | {below(wa, e.get('magnitude (row)'))} |")
        kinds = sorted({n.split(".")[-2] for n in names}, key=[n.split(".")[-2] for n in names].index)
        cv = recon.get("input_norm_cv")
        for setting in [s for s in settings if "wanda (layer)" in recon[s]]:
            e = recon[setting]
            methods = ["magnitude", "magnitude (row)", "wanda", "wanda (layer)", "sparsegpt"]
            lines += ["", f"{setting}: mean error per layer kind (6 layers each), and the spread of the input norms "
                      "(std / mean of ||X_j||, mean over the kind's layers):", "",
                      "| layer | input-norm spread | " + " | ".join(methods) + " | layers with wanda ≥ magnitude |",
                      "|---" * (len(methods) + 3) + "|"]
            for kind in kinds:
                idx = [i for i, n in enumerate(names) if n.split(".")[-2] == kind]
                worse = [names[i].split(".")[2] for i in idx if not e["wanda"][i] < e["magnitude"][i]]
                lines.append(f"| {kind} | {statistics.mean(cv[i] for i in idx):.2f} | " +
                             " | ".join(f"{statistics.mean(e[m][i] for i in idx):.4f}" for m in methods) +
                             f" | {len(worse)} (blocks {', '.join(worse) or '–'}) |")
    if "latency" in result:
        lines += ["", "CPU latency (1 thread, median of 3; prefill = 128 tokens, decode = s/token):", "",
                  "| model | prefill s | decode s/token |", "|---|---|---|"]
        for name, (pre, dec) in result["latency"].items():
            lines.append(f"| {name} | {pre:.4f} | {dec:.4f} |")
    (OUT / "llm_oneshot.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:  # see the module doc: RSS that follows frees
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    main()
