"""Scale and speed of structured LLM pruning on a real 1B config (not a test).

A ``LlamaForCausalLM`` with Llama-3.2-1B's config values (typed in below, nothing is downloaded),
randomly initialised (seed 0) in fp32, is scored and exported by ``gp.search`` to 50% of its
parameters along several axes (width: heads + mlp, uniform; depth: layers; width + depth; hidden),
one variant after another in ONE process. Random weights make the scores meaningless for quality:
this benchmark measures time, memory and speed only (no perplexity).

Per variant: search time, export time, peak resident memory of the search and of the export
(Linux ``VmHWM``, reset through ``/proc/self/clear_refs`` before each phase) and of the whole
process (``ru_maxrss``), params (total and without the tied 128k-vocab embedding), batch-1 prefill
latency on ``PREFILL`` random tokens and batch-1 greedy decode tokens/s (``DECODE`` new tokens
after a 16-token prompt, KV cache, only the single-token steps timed). Dense and pruned are timed
interleaved (dense, pruned, dense, pruned, ...) to share the load noise of this shared 2-core
machine; the 1-minute load average is recorded at each measurement.

Calibration data: ``CALIB`` sequences of 128 uniformly random token ids, batch 1.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/llm_scale.py [--variants width,depth,...]

Writes ``benchmarks/results/llm_scale.json`` and ``.md`` (rewritten after every variant).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

import gradprune as gp

OUT = Path(__file__).parent / "results"
THREADS = int(os.environ.get("OMP_NUM_THREADS", "1"))
SEQ = 128          # calibration sequence length
CALIB = 2          # calibration batches ([1, SEQ] each)
PREFILL = 128      # prefill tokens at batch 1
PROMPT = 16        # decode prompt tokens
DECODE = 16        # decode new tokens per run
REPEATS = 3        # timed repeats (median)

VARIANTS = {  # name -> search keyword arguments
    "width": dict(axes=("heads", "mlp"), uniform=True),
    "depth": dict(axes=("layers",)),
    "hidden": dict(axes=("hidden",)),
    "width+depth": dict(axes=("layers", "heads", "mlp"), uniform=True),
}


def llama_3_2_1b_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                       num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                       head_dim=64, max_position_embeddings=131072, rope_theta=500000.0,
                       rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu",
                       attention_bias=False, mlp_bias=False, bos_token_id=128000,
                       eos_token_id=128001, torch_dtype="float32")


def dense_model():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_3_2_1b_config()).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def loss_fn(model, batch):
    return model(input_ids=batch, labels=batch).loss


def params(model) -> tuple[int, int]:
    """(all parameters, parameters outside the embedding / LM head), shared tensors counted once."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    emb = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    emb_n = sum(model.get_input_embeddings().weight.numel() if i == id(model.get_input_embeddings().weight)
                else model.get_output_embeddings().weight.numel() for i in emb)
    return total, total - emb_n


def _status_kib(field: str) -> int | None:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


class Phase:
    """``with Phase() as ph:`` -> ``ph.seconds``, ``ph.peak_gib`` (process peak resident size during
    the block), ``ph.before_gib`` (resident size before it)."""

    def __enter__(self):
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self.ok = True
        except OSError:
            self.ok = False
        self.before_gib = _status_kib("VmRSS") / 2**20
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.peak_gib = _status_kib("VmHWM") / 2**20 if self.ok else None


def ru_maxrss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


@torch.no_grad()
def prefill_s(model, ids) -> float:
    t0 = time.perf_counter()
    model(input_ids=ids, use_cache=False)
    return time.perf_counter() - t0


@torch.no_grad()
def decode_tokens_per_s(model, prompt, tokens: int) -> float:
    """Greedy decode at batch 1 with the KV cache; only the ``tokens`` single-token steps timed."""
    out = model(input_ids=prompt, use_cache=True)
    past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(tokens):
        out = model(input_ids=nxt, past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return tokens / (time.perf_counter() - t0)


def timed_pair(dense, small, vocab: int) -> dict:
    """Interleaved dense / pruned timings (median of REPEATS), one warm-up each."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (1, PREFILL), generator=g)
    prompt = torch.randint(0, vocab, (1, PROMPT), generator=g)
    for m in (dense, small):  # warm-up
        prefill_s(m, ids[:, :16])
        decode_tokens_per_s(m, prompt, 2)
    rec = {k: [] for k in ("dense_prefill_s", "pruned_prefill_s", "dense_decode_tps", "pruned_decode_tps")}
    loads = []
    for _ in range(REPEATS):
        loads.append(os.getloadavg()[0])
        rec["dense_prefill_s"].append(prefill_s(dense, ids))
        rec["pruned_prefill_s"].append(prefill_s(small, ids))
        rec["dense_decode_tps"].append(decode_tokens_per_s(dense, prompt, DECODE))
        rec["pruned_decode_tps"].append(decode_tokens_per_s(small, prompt, DECODE))
    row = {k: statistics.median(v) for k, v in rec.items()}
    row["raw"] = rec
    row["load_1min"] = loads
    return row


def run_variant(name, dense, calib, dense_params):
    kw = VARIANTS[name]
    row = {"variant": name, "search_kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()}}
    try:
        with Phase() as ph:
            found = gp.search(dense, {"params": "50%"}, calib, loss_fn, method="gradnas",
                              example_input=calib[0], max_iter_data_loader=len(calib), show_progress=False, **kw)
        row.update(search_s=ph.seconds, search_peak_rss_gib=ph.peak_gib, rss_before_search_gib=ph.before_gib)
        print(f"[{name}] search {ph.seconds:.1f}s peak {ph.peak_gib:.2f} GiB", flush=True)
        with Phase() as ph:
            small = found.export()
        row.update(export_s=ph.seconds, export_peak_rss_gib=ph.peak_gib)
        del found
        gc.collect()
        for p in small.parameters():
            p.requires_grad_(False)
        small.eval()
        n, ne = params(small)
        row.update(params=n, non_embedding_params=ne, params_ratio=n / dense_params[0],
                   non_embedding_params_ratio=ne / dense_params[1],
                   config={k: getattr(small.config, k) for k in
                           ("hidden_size", "intermediate_size", "num_hidden_layers",
                            "num_attention_heads", "num_key_value_heads", "head_dim")})
        print(f"[{name}] export {row['export_s']:.1f}s params {n:,} ({row['params_ratio']:.3f})", flush=True)
        row.update(timed_pair(dense, small, dense.config.vocab_size))
        row["decode_speedup"] = row["pruned_decode_tps"] / row["dense_decode_tps"]
        row["prefill_speedup"] = row["dense_prefill_s"] / row["pruned_prefill_s"]
        row["inverse_params_ratio"] = 1 / row["params_ratio"]
        row["inverse_non_embedding_params_ratio"] = 1 / row["non_embedding_params_ratio"]
        row["decode_speedup_vs_inverse_params"] = row["decode_speedup"] / row["inverse_params_ratio"]
        row["goal_within_15pct"] = abs(1 - row["decode_speedup_vs_inverse_params"]) <= 0.15
        print(f"[{name}] decode x{row['decode_speedup']:.2f} (inverse params x{row['inverse_params_ratio']:.2f}), "
              f"prefill x{row['prefill_speedup']:.2f}", flush=True)
        del small
    except Exception as exc:  # a failure at this size is a finding: record it
        row["error"] = f"{type(exc).__name__}: {exc}"
        row["traceback"] = traceback.format_exc()
        print(f"[{name}] FAILED {row['error']}", flush=True)
    gc.collect()
    row["process_peak_rss_gib_so_far"] = ru_maxrss_gib()
    return row


def _process_peak(result) -> float:
    peaks = [r.get(k) or 0 for r in result["variants"] for k in ("search_peak_rss_gib", "export_peak_rss_gib")]
    return max(peaks + [result.get("process_peak_rss_gib") or 0])


def _label(row) -> str:
    return row["variant"] + (f" ({row['note']})" if row.get("note") else "")


def write(result):
    OUT.mkdir(exist_ok=True)
    (OUT / "llm_scale.json").write_text(json.dumps(result, indent=1) + "\n")
    d = result["dense"]
    lines = [
        "# Structured pruning at 1B scale: time, memory, speed",
        "",
        "Random-weight `LlamaForCausalLM` with Llama-3.2-1B's config (hidden 2048, intermediate 8192, "
        "16 layers, 32 heads, 8 KV heads, head_dim 64, vocab 128256, tied embeddings), fp32, seed 0; "
        f"gradnas scores on random-token sequences of {SEQ} (batch 1; how many: `calib` per variant); budget `params: 50%`. "
        "Random weights: the scores say nothing about quality; only time, memory and speed are measured.",
        "",
        f"CPU: {result['cpu']}, {result['threads']} thread(s) (`OMP_NUM_THREADS`, `torch.set_num_threads`), "
        "machine shared with other jobs (1-min load average per variant below). torch "
        f"{result['torch']}, transformers {result['transformers']}.",
        "",
        f"Dense: {d['params']:,} params ({d['non_embedding_params']:,} outside the embedding / LM head), "
        f"random init {d['init_s']:.1f} s, resident {d['rss_gib']:.2f} GiB. "
        f"Process peak resident size (the largest phase peak; `ru_maxrss` is reset with `VmHWM` by "
        f"`clear_refs`, so it is no lifetime peak here): {_process_peak(result):.2f} GiB.",
        "",
        "Timings: prefill = one forward of [1, %d] tokens; decode = greedy, batch 1, KV cache, %d new tokens "
        "after a %d-token prompt; median of %d, dense and pruned interleaved." % (PREFILL, DECODE, PROMPT, REPEATS),
        "",
        "| variant | calib | config (h / ffn / L / heads / kv) | params (ratio) | non-emb ratio | search s | search peak GiB "
        "| export s | export peak GiB | prefill s dense → pruned | decode tok/s dense → pruned | decode speed-up "
        "| 1/params | 1/non-emb | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["variants"]:
        if "error" in r:
            lines.append(f"| {_label(r)} | {r.get('calibration_batches', CALIB)} | FAILED: "
                         f"{r['error'][:200].replace('|', '/')} |" + " |" * 12)
            continue
        c = r["config"]
        lines.append(
            f"| {_label(r)} | {r.get('calibration_batches', CALIB)} | {c['hidden_size']} / {c['intermediate_size']} / {c['num_hidden_layers']} / "
            f"{c['num_attention_heads']} / {c['num_key_value_heads']} | {r['params']:,} ({r['params_ratio']:.3f}) | "
            f"{r['non_embedding_params_ratio']:.3f} | {r['search_s']:.0f} | {r['search_peak_rss_gib']:.2f} | "
            f"{r['export_s']:.1f} | {r['export_peak_rss_gib']:.2f} | {r['dense_prefill_s']:.2f} → "
            f"{r['pruned_prefill_s']:.2f} | {r['dense_decode_tps']:.2f} → {r['pruned_decode_tps']:.2f} | "
            f"x{r['decode_speedup']:.2f} | x{r['inverse_params_ratio']:.2f} | "
            f"x{r['inverse_non_embedding_params_ratio']:.2f} | "
            f"{min(r['load_1min']):.1f}–{max(r['load_1min']):.1f} |")
    lines += ["", "Goal (issue 16, item 8): decode speed-up within 15% of the inverse params ratio "
              "(total params, embedding included). The speed-up above is the ratio of the medians; under "
              "this load the single runs vary a lot, so the median and range of the per-repeat ratios "
              "(pruned / dense of the same interleaved repeat) are given too.", ""]
    for r in result["variants"]:
        if "error" not in r:
            raw = r["raw"]
            pair = sorted(p / d for p, d in zip(raw["pruned_decode_tps"], raw["dense_decode_tps"]))
            lines.append(f"- {_label(r)}: decode speed-up x{r['decode_speedup']:.2f} (per-repeat "
                         f"x{statistics.median(pair):.2f}, x{pair[0]:.2f}–x{pair[-1]:.2f}); "
                         f"/ (1/params ratio) = {r['decode_speedup_vs_inverse_params']:.2f} "
                         f"({'met' if r['goal_within_15pct'] else 'not met'}); / (1/non-emb ratio) = "
                         f"{r['decode_speedup'] / r['inverse_non_embedding_params_ratio']:.2f}")
    lines += ["", "Commands (one process each; `--append` adds to the results of the one before):", ""]
    for i, run in enumerate(result.get("runs", [{"variant_names": result["variant_names"], "calib": CALIB}])):
        lines.append("    OMP_NUM_THREADS=%d PYTHONPATH=src python benchmarks/llm_scale.py --variants %s --calib %d%s"
                     % (result["threads"], ",".join(run["variant_names"]), run["calib"], " --append" if i else ""))
    lines.append("")
    (OUT / "llm_scale.md").write_text("\n".join(lines))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default="width,depth,width+depth,hidden")
    ap.add_argument("--calib", type=int, default=CALIB, help="calibration batches [1, 128] per search")
    ap.add_argument("--report", action="store_true", help="only rewrite the Markdown from the JSON")
    ap.add_argument("--append", action="store_true",
                    help="add these variants to the existing results JSON (a second process)")
    args = ap.parse_args()
    if args.report:
        write(json.loads((OUT / "llm_scale.json").read_text()))
        return True
    names = args.variants.split(",")
    for n in names:
        if n not in VARIANTS:
            raise ValueError(f"--variants: unknown variant {n!r}; choose from {', '.join(VARIANTS)}")
    torch.set_num_threads(THREADS)
    import transformers

    with Phase() as ph:
        dense = dense_model()
    n, ne = params(dense)
    result = {"cpu": platform.processor() or platform.machine(), "threads": THREADS,
              "torch": torch.__version__, "transformers": transformers.__version__,
              "variant_names": names, "dtype": "float32", "calibration": f"{CALIB} x [1, {SEQ}] random ids",
              "dense": {"params": n, "non_embedding_params": ne, "init_s": ph.seconds,
                        "rss_gib": _status_kib("VmRSS") / 2**20},
              "variants": []}
    try:
        with open("/proc/cpuinfo") as fh:
            result["cpu"] = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"dense {n:,} params, init {ph.seconds:.1f}s, rss {result['dense']['rss_gib']:.2f} GiB", flush=True)
    g = torch.Generator().manual_seed(0)
    calib = [torch.randint(0, dense.config.vocab_size, (1, SEQ), generator=g) for _ in range(max(CALIB, args.calib))]
    calib = calib[:args.calib]
    runs = []
    if args.append:
        previous = json.loads((OUT / "llm_scale.json").read_text())
        runs = previous.get("runs", [{k: previous[k] for k in ("variant_names", "process_peak_rss_gib")}
                                     | {"calib": CALIB}])
        result["variants"] = previous["variants"]
    runs.append({"variant_names": names, "calib": args.calib, "process_peak_rss_gib": None})
    result["runs"] = runs
    for name in names:
        row = run_variant(name, dense, calib, (n, ne))
        row["calibration_batches"] = len(calib)
        result["variants"].append(row)
        result["process_peak_rss_gib"] = runs[-1]["process_peak_rss_gib"] = ru_maxrss_gib()
        result["process_peak_rss_gib"] = max(r["process_peak_rss_gib"] or 0 for r in runs)
        write(result)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
