#!/usr/bin/env python
"""Why a narrowed CNN's CPU latency falls less than its FLOPs: two measurements (not a test).

1. Throughput (GFLOP/s) of single ``Conv1d`` layers (kernel 7, batch 32, one thread) at the
   widths and sequence lengths of the structured benchmark's MNIST-1D ResNet: if narrow
   convolutions ran as many FLOPs per second as wide ones, latency would follow FLOPs.
2. The dense ResNet (96/192/384) against uniformly narrowed copies (~50% and ~30% of its FLOPs),
   each as it is and with every BatchNorm folded into the convolution before it
   (``gradprune.structured.fold_batchnorm``, the usual inference rewrite; outputs checked equal): if BatchNorm, which FLOPs counts leave out, were the
   cause, folding would close the gap between the latency ratio and the FLOPs ratio.
3. The same models' convolutions alone (each run on the input it receives inside the model, in
   the same rounds): the latency ratio of the convolutions against the FLOPs ratio, and the time
   of everything else in the forward (BatchNorm, ReLU, additions, pooling, the Linear head, the
   Python calls), which does not shrink with the widths the way FLOPs do.

Timings are medians over interleaved repeats in one process; FLOPs are 2 x MACs counted with
``torch.utils.flop_counter`` (convolutions and the final Linear).

Usage: ``.venv/bin/python benchmarks/conv_width_efficiency.py`` (under a minute); writes
``benchmarks/results/conv_width_efficiency.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from structured_vs_peers import CNN_KERNEL, ResNet1d, count_flops, median_ms  # noqa: E402


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with each BatchNorm folded into the convolution before it
    (``gradprune.structured.fold_batchnorm``)."""
    from gradprune.structured import fold_batchnorm as fold
    m = copy.deepcopy(model).eval()
    fold(m)
    return m


def conv_calls(model: nn.Module, x: torch.Tensor) -> list:
    """``[(conv, its input)]`` for every ``Conv1d`` of ``model`` in one forward on ``x``."""
    calls = []
    hooks = [c.register_forward_pre_hook(lambda mod, args: calls.append((mod, args[0])))
             for c in model.modules() if isinstance(c, nn.Conv1d)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return calls


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--out", default=str(HERE / "results" / "conv_width_efficiency"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    t_all = time.perf_counter()
    load0 = os.getloadavg()

    # 1. single convolutions
    conv_rows = []
    for length in (40, 20, 10):
        for c in (32, 48, 64, 96, 128, 192, 256, 384):
            conv = nn.Conv1d(c, c, CNN_KERNEL, 1, CNN_KERNEL // 2, bias=False).eval()
            x = torch.randn(32, c, length)
            flops = 2 * c * c * CNN_KERNEL * length * 32
            with torch.no_grad():
                ms = median_ms({"conv": lambda: conv(x)}, args.repeats)["conv"]
            conv_rows.append({"channels": c, "length": length, "ms": ms, "gflops_per_s": flops / ms / 1e6})
            print(f"conv {c:4d} ch, length {length:3d}: {ms:7.3f} ms, {flops / ms / 1e6:5.1f} GFLOP/s", flush=True)

    # 2. whole models, with and without BatchNorm folded
    x = torch.randn(32, 1, 40)
    x1 = x[:1]
    models = {}
    for name, widths in (("dense", (96, 192, 384)), ("narrow ~50%", (64, 128, 288)), ("narrow ~30%", (48, 96, 224))):
        m = ResNet1d(widths).eval()
        with torch.no_grad():  # non-trivial statistics, so folding is a real rewrite
            for bn in m.modules():
                if isinstance(bn, nn.BatchNorm1d):
                    bn.running_mean.uniform_(-0.5, 0.5)
                    bn.running_var.uniform_(0.5, 2.0)
        f = fold_batchnorm(m)
        with torch.no_grad():
            err = float((m(x) - f(x)).abs().max())
        models[name] = (m, f, count_flops(m, (x1,)), err)
    fns = {}
    for name, (m, f, _, _) in models.items():
        fns[(name, "as is")] = (lambda m=m: m(x))
        fns[(name, "BN folded")] = (lambda f=f: f(x))
        fns[(name, "convolutions alone")] = (lambda calls=conv_calls(m, x): [c(a) for c, a in calls])
    with torch.no_grad():
        lat = median_ms(fns, args.repeats)
    model_rows = []
    d_flops = models["dense"][2]
    for name, (m, f, flops, err) in models.items():
        for variant in ("as is", "BN folded", "convolutions alone"):
            ms = lat[(name, variant)]
            ratio = ms / lat[("dense", variant)]
            model_rows.append({"model": name, "variant": variant, "flops_ratio": flops / d_flops,
                               "ms_b32": ms, "latency_ratio": ratio,
                               "gap_vs_flops": ratio / (flops / d_flops) - 1.0, "fold_max_abs_err": err,
                               "rest_ms": lat[(name, "as is")] - ms if variant == "convolutions alone" else None})
            print(f"{name:12s} {variant:9s}: FLOPs {flops / d_flops:.3f}, {ms:7.2f} ms, latency ratio "
                  f"{ratio:.3f} ({ratio / (flops / d_flops) - 1.0:+.0%} vs FLOPs)", flush=True)

    meta = {"command": " ".join(sys.argv),
            "python": platform.python_version(), "torch": torch.__version__, "threads": 1,
            "repeats": args.repeats, "wall_s": time.perf_counter() - t_all,
            "loadavg_start": load0, "loadavg_end": os.getloadavg(), "machine": platform.machine()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"meta": meta, "conv": conv_rows, "models": model_rows}, indent=1))
    os.replace(tmp, out.with_suffix(".json"))

    L = ["# Conv width efficiency and BatchNorm folding (CPU, one thread)", "",
         f"Produced by `.venv/bin/python benchmarks/conv_width_efficiency.py` ({meta['wall_s'] / 60:.1f} min; "
         f"torch {torch.__version__}, load average {load0[0]:.2f} at the start, {meta['loadavg_end'][0]:.2f} at the end).",
         "", "## Single Conv1d (kernel 7, batch 32): GFLOP/s", "",
         "| channels in = out | length 40 | length 20 | length 10 |", "|---|---|---|---|"]
    for c in sorted({r["channels"] for r in conv_rows}):
        cells = [f"{next(r for r in conv_rows if r['channels'] == c and r['length'] == n)['gflops_per_s']:.1f}"
                 for n in (40, 20, 10)]
        L.append(f"| {c} | " + " | ".join(cells) + " |")
    L += ["", "## ResNet1d, dense vs uniformly narrowed, batch 32", "",
          "| model (widths) | variant | FLOPs / dense | latency b32 (ms) | latency / dense | latency ratio vs FLOPs ratio |",
          "|---|---|---|---|---|---|"]
    for r in model_rows:
        L.append(f"| {r['model']} | {r['variant']} | {r['flops_ratio']:.3f} | {r['ms_b32']:.2f} | "
                 f"{r['latency_ratio']:.3f} | {r['gap_vs_flops']:+.0%} |")
    rest = {r["model"]: r["rest_ms"] for r in model_rows if r["rest_ms"] is not None}
    L += ["", "Everything but the convolutions (as is minus convolutions alone, ms): "
          + ", ".join(f"{k} {v:.2f}" for k, v in rest.items()) + "."]
    L += ["", "Widths: dense 96/192/384, ~50% 64/128/288, ~30% 48/96/224 (stem and stage 1, stage 2, stage 3). "
          "Folded models equal the originals to "
          f"{max(r['fold_max_abs_err'] for r in model_rows):.1e} (max abs difference of the outputs).", ""]
    out.with_suffix(".md").write_text("\n".join(L))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
