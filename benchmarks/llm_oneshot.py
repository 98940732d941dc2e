"""One-shot LLM sparsity benchmark (not a test): gradprune's magnitude / wanda / sparsegpt / gblm /
ria, sequential and not, on the shared small LLaMA-GQA model (``benchmarks/llm_model.py``).

Measures held-out perplexity (test split), calibration time and the counted peak of the sequential
pass against the documented formula, per calibration seed; plus CPU prefill/decode latency of the
dense and the 2:4-masked model. Writes ``benchmarks/results/llm_oneshot.json`` and ``.md``.

    OMP_NUM_THREADS=1 PYTHONPATH=src nice -n 10 python benchmarks/llm_oneshot.py --seeds 0 1 2

Also measures each pruned Linear's reconstruction error on its dense calibration inputs for
magnitude / wanda / sparsegpt (first seed). Cells already in the JSON that this run does not redo
(other seeds, settings or methods) are kept.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import llm_model  # noqa: E402

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


def formula_bytes(model, n_tokens, criterion):
    """The documented bound: P_block + 2*A + S_block (see gradprune.oneshot)."""
    block = model.model.layers[0]
    p_block = sum(p.numel() * p.element_size() for p in block.parameters())
    hidden = model.config.hidden_size
    acts = n_tokens * hidden * 4
    lins = [m for m in block.modules() if isinstance(m, torch.nn.Linear)]
    stats = sum(4 * m.in_features for m in lins)
    if criterion == "sparsegpt":
        stats += sum(4 * m.in_features ** 2 for m in lins)
    if criterion == "gblm":
        stats += sum(4 * m.weight.numel() for m in lins)
    # position tables (cos, sin) and position ids travel with the activations
    extra = 2 * n_tokens * (model.config.hidden_size // model.config.num_attention_heads) * 4 * 2
    return p_block + 2 * acts + stats + extra


def reconstruction_errors(base, seqs, batch, settings):
    """Per-layer relative output error ``||X W^T - X W'^T||^2 / ||X W^T||^2`` of every pruned
    Linear on its dense calibration inputs ``X`` (sequential=False, so every method sees the same
    ``X``), for magnitude, wanda and sparsegpt: ``{setting: {method: [error per layer]}}``, the
    layer names under ``"layers"``."""
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
    for setting in settings:
        sparsity, pattern, allocation = SETTINGS[setting]
        out[setting] = {}
        for method in ("magnitude", "wanda", "sparsegpt"):
            model = copy.deepcopy(base)
            gp.prune(model, sparsity=sparsity, criterion=method, pattern=pattern, data=list(seqs.split(batch)),
                     loss_fn=loss_fn)
            out[setting][method] = [layer_inputs_error(base.get_parameter(n), model.get_parameter(n), xs[n])
                                    for n in names]
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
        pre.append(time.perf_counter() - t)
        cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=tok, past_key_values=cache, use_cache=True)
            cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        dec.append((time.perf_counter() - t) / new_tokens)
    return statistics.median(pre), statistics.median(dec)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS))
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--n-calib", type=int, default=16)
    ap.add_argument("--n-eval", type=int, default=32)
    ap.add_argument("--calib-batch", type=int, default=4)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    base = llm_model.load()
    ids = llm_model.token_ids()
    test = llm_model.sequences(ids["test"], n=args.n_eval)
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
                    t = time.perf_counter()
                    res = gp.prune(model, sparsity=sparsity, criterion=method, pattern=pattern,
                                   allocation=allocation, data=calib, loss_fn=loss_fn, sequential=sequential)
                    seconds = time.perf_counter() - t
                    ppl = llm_model.perplexity(model, test)
                    row = {"seed": seed, "setting": setting, "method": method, "sequential": sequential,
                           "ppl": ppl, "calib_seconds": seconds, "sparsity": res.masks.sparsity(),
                           "peak_device_bytes": res.details.get("peak_device_bytes"),
                           "formula_bytes": formula_bytes(base, seqs.numel(), method) if sequential else None}
                    rows.append(row)
                    log.info("%s", row)
                    partial = {"dense_ppl": dense_ppl, "rows": rows, "args": vars(args),
                               "reconstruction": recon}
                    (OUT / "llm_oneshot.json").write_text(json.dumps(partial, indent=1))
                    write_markdown(partial)
    # latency: dense vs 2:4 masked, same process, same thread count
    prompt = test[:1]
    masked = copy.deepcopy(base)
    gp.prune(masked, sparsity=0.5, criterion="magnitude", pattern="2:4")
    lat = {"dense": latency(base, prompt), "2:4 masked": latency(masked, prompt)}
    result = {"dense_ppl": dense_ppl, "rows": rows, "args": vars(args), "latency": lat, "reconstruction": recon,
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
    lines = [f"Dense held-out perplexity: {result['dense_ppl']:.2f}. Seeds: {sorted({r['seed'] for r in rows})}.",
             "", "| setting | method | sequential | ppl (mean ± sd over seeds) | calib s | peak / formula (KiB) |",
             "|---|---|---|---|---|---|"]
    for k in keys:
        rs = [r for r in rows if (r["setting"], r["method"], r["sequential"]) == k]
        p = [r["ppl"] for r in rs]
        sd = statistics.stdev(p) if len(p) > 1 else 0.0
        mem = ""
        if rs[0]["peak_device_bytes"]:
            mem = f"{rs[0]['peak_device_bytes'] / 1024:.0f} / {rs[0]['formula_bytes'] / 1024:.0f}"
        lines.append(f"| {k[0]} | {k[1]} | {'yes' if k[2] else 'no'} | {statistics.mean(p):.2f} ± {sd:.2f} | "
                     f"{statistics.mean(r['calib_seconds'] for r in rs):.2f} | {mem} |")
    recon = result.get("reconstruction")
    if recon:
        n_layers = len(recon["layers"])
        lines += ["", f"Per-layer reconstruction error on the dense calibration inputs (seed {result['args']['seeds'][0]}, "
                  f"sequential=False; relative output error of each of the {n_layers} pruned Linear layers):", "",
                  "| setting | magnitude (mean) | wanda (mean) | sparsegpt (mean) | layers with sparsegpt < wanda | "
                  "layers with wanda < magnitude |", "|---|---|---|---|---|---|"]
        for setting, errs in recon.items():
            if setting == "layers":
                continue
            mg, wa, sg = errs["magnitude"], errs["wanda"], errs["sparsegpt"]
            lines.append(f"| {setting} | {statistics.mean(mg):.4f} | {statistics.mean(wa):.4f} | "
                         f"{statistics.mean(sg):.4f} | {sum(s < w for s, w in zip(sg, wa))}/{n_layers} | "
                         f"{sum(w < m for w, m in zip(wa, mg))}/{n_layers} |")
    if "latency" in result:
        lines += ["", "CPU latency (1 thread, median of 3; prefill = 128 tokens, decode = s/token):", "",
                  "| model | prefill s | decode s/token |", "|---|---|---|"]
        for name, (pre, dec) in result["latency"].items():
            lines.append(f"| {name} | {pre:.4f} | {dec:.4f} |")
    (OUT / "llm_oneshot.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
