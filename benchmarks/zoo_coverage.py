#!/usr/bin/env python
"""Coverage of the torchvision classification zoo (and small transformers configs): gradprune vs
Torch-Pruning 1.6.1, side by side. A benchmark, not a test.

The transformers models are ``hf_*`` (four task models) and ``hfz_<family>``: every family of the
coverage matrix of tests/test_structured_hf_zoo.py, its config imported from there with the width
fields times ``HFZ_SCALE`` (``--models hfz`` runs them all).

Per model and budget (50% of the dense FLOPs, 50% of the dense params), each library prunes a
fresh copy of the same randomly initialised model (10 classes, small input):

- gradprune: ``gp.search(model, {key: "50%"}, method=...)`` with ``magnitude`` and ``gradnas`` (2
  random batches of 2, cross entropy to random labels) scores, rules with divisor 8 for every
  layer type, then ``export()`` and ``save_pruned`` / ``load_pruned``.
- Torch-Pruning: ``tp.pruner.MetaPruner`` with ``GroupMagnitudeImportance(p=2)``, the final
  classifier ignored, ``round_to=8``, ``num_heads`` of every ``nn.MultiheadAttention``; the
  ``pruning_ratio`` is found by bisection (8 steps) so that the measured FLOPs/params meet the
  budget; saved with ``tp.state_dict`` and rebuilt with ``tp.load_state_dict`` on a fresh model.

A run is **ok** when the pruned model (1) meets the budget, measured by this script for every
library with ``torch.utils.flop_counter.FlopCounterMode`` and a parameter count, (2) runs and gives
the dense output shape, (3) for gradprune, gives the same outputs as the gated model
(``SearchResult.gates()``: the units it removes switched off), and (4) survives the save/load round
trip with the same outputs. A model is ok for a library when every run is. The pruned fraction is
reported too (an ok run at 99% of the budget prunes what was asked; one far below it cut past it).

torchvision 0.28.0 is a CUDA build: its C++ ops are absent on this CPU torch, so ``torchvision::nms``
and ``qnms`` are defined with ``torch.library`` before the import (here only, never in gradprune).

Usage (in the peers' venv, see the README):
    /work/venvs/zoo/bin/python benchmarks/zoo_coverage.py                      # full matrix
    /work/venvs/zoo/bin/python benchmarks/zoo_coverage.py --models resnet18,vit_b_32
    /work/venvs/zoo/bin/python benchmarks/zoo_coverage.py --from-json benchmarks/results/zoo_coverage.json
    # merge runs: a later file's rows replace the rows of the models it ran, new models are appended
    python benchmarks/zoo_coverage.py --merge benchmarks/results/zoo_coverage.json,new.json --out zoo_coverage
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results"

# name -> (builder kwargs, input height/width)
TORCHVISION = {
    "alexnet": ({}, 64), "convnext_tiny": ({}, 64), "densenet121": ({}, 64),
    "efficientnet_b0": ({}, 64), "efficientnet_v2_s": ({}, 64), "googlenet": ({"aux_logits": False, "init_weights": True}, 64),
    "inception_v3": ({"aux_logits": False, "init_weights": True}, 80), "maxvit_t": ({}, 224),
    "mnasnet0_5": ({}, 64), "mobilenet_v2": ({}, 64), "mobilenet_v3_small": ({}, 64),
    "mobilenet_v3_large": ({}, 64), "regnet_x_400mf": ({}, 64), "regnet_y_400mf": ({}, 64),
    "resnet18": ({}, 64), "resnet50": ({}, 64), "resnext50_32x4d": ({}, 64),
    "wide_resnet50_2": ({}, 64), "shufflenet_v2_x0_5": ({}, 64), "squeezenet1_0": ({}, 64),
    "swin_t": ({}, 64), "swin_v2_t": ({}, 64), "vgg11_bn": ({}, 64),
    "vit_b_32": ({"image_size": 64}, 64),
}
HF = {  # transformers tiny configs (whatever the installed gradprune supports is counted)
    "hf_bert": "BertForSequenceClassification", "hf_gpt2": "GPT2LMHeadModel",
    "hf_llama": "LlamaForCausalLM", "hf_vit": "ViTForImageClassification",
}
TESTS = ROOT / "tests" / "test_structured_hf_zoo.py"


def _hf_zoo():
    """The Hugging Face coverage matrix of the tests (``ZOO``, ``_model``, ``_input``, ``_loss``,
    ``_out`` of tests/test_structured_hf_zoo.py, imported from there: one table), or None when
    pytest or transformers is not installed."""
    if getattr(_hf_zoo, "mod", None) is None:
        import importlib.util
        if any(importlib.util.find_spec(p) is None for p in ("pytest", "transformers")):
            return None
        _import_torchvision()  # transformers imports an installed torchvision
        spec = importlib.util.spec_from_file_location("_gp_test_hf_zoo", TESTS)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _hf_zoo.mod = mod
    return _hf_zoo.mod


# width fields of the tests' configs (their real names, as ``to_dict`` writes them), scaled by
# HFZ_SCALE: the tests' hidden width 16 leaves the embeddings too large a share for a 50% params
# budget; 4x (hidden 64, 4 heads of 16) is the size of the hf_* rows
HFZ_WIDTHS = ("hidden_size", "intermediate_size", "d_model", "d_kv", "d_ff", "dim", "hidden_dim",
              "n_embd", "n_inner", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim", "ffn_hidden_size",
              "embedding_size", "word_embed_proj_dim", "head_dim", "embed_dim")
HFZ_SCALE = 4


def _hfz_config(family):
    """The tests' config of ``family`` with every width field in HFZ_WIDTHS times HFZ_SCALE."""
    cfg = _hf_zoo().ZOO[family][1]()
    d = cfg.to_dict()
    d.update({k: v * HFZ_SCALE for k, v in d.items() if k in HFZ_WIDTHS and isinstance(v, int)})
    cfg = type(cfg).from_dict(d)
    cfg._attn_implementation = "eager"  # FlopCounterMode counts its matmuls
    return cfg


def hf_zoo_names() -> list:
    """``hfz_<family>`` for every family of the tests' matrix (base models: last_hidden_state)."""
    zoo = _hf_zoo()
    return [f"hfz_{f}" for f in zoo.ZOO] if zoo is not None else []
BUDGETS = (("flops", 0.5), ("params", 0.5))
GP_METHODS = ("magnitude", "gradnas")
RULES = {t: {"channel_divisor": 8} for t in ("nn.Conv1d", "nn.Conv2d", "nn.Conv3d", "nn.GroupNorm")}
RULES.update({t: {"feature_divisor": 8} for t in ("nn.Linear", "nn.BatchNorm2d", "nn.LayerNorm",
                                                   "nn.BatchNorm1d")})


def _import_torchvision():
    lib = torch.library.Library("torchvision", "DEF")  # noqa: F841 - kept alive by the registry
    for op in ("nms", "qnms"):
        try:
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        except RuntimeError:
            pass
    _import_torchvision.lib = lib
    import torchvision
    return torchvision


def count_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def count_flops(m: nn.Module, args: tuple) -> int:
    """FlopCounterMode on one forward in eval mode, the MHA fast path off (its fused kernel is not
    counted), CPU flash attention counted (``gradprune.structured.flops.count_flops``)."""
    from gradprune.structured.flops import count_flops as _count
    return _count(m, args)


def _logits(out):
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    return out[0]


def build(name: str):
    """(factory, example args, loss_fn, batches)."""
    torch.manual_seed(0)
    if name in TORCHVISION:
        tv = _import_torchvision()
        kwargs, hw = TORCHVISION[name]

        def factory():
            torch.manual_seed(0)
            return getattr(tv.models, name)(num_classes=10, **kwargs).eval()
        x = torch.randn(2, 3, hw, hw)
        batches = [(torch.randn(2, 3, hw, hw), torch.randint(0, 10, (2,))) for _ in range(2)]

        def loss_fn(m, b):
            return nn.functional.cross_entropy(_logits(m(b[0])), b[1])
        return factory, (x,), loss_fn, batches
    if name.startswith("hfz_"):
        zoo, family = _hf_zoo(), name[len("hfz_"):]
        if zoo is None:
            raise ValueError(f"model {name!r} needs pytest and transformers (the tests' matrix)")
        x = zoo._input(family)
        batches = [zoo._input(family, seed=s) for s in (2, 3)]

        import transformers
        cls, cfg = getattr(transformers, zoo.ZOO[family][0]), _hfz_config(family)

        def factory():
            torch.manual_seed(0)
            return cls(cfg).eval()

        def loss_fn(m, b):
            return zoo._loss(m, b)
        return factory, x, loss_fn, batches
    _import_torchvision()  # transformers imports an installed torchvision
    import transformers as T
    cls = getattr(T, HF[name])
    if name == "hf_vit":
        cfg = T.ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                          num_attention_heads=4, intermediate_size=128, num_labels=10)
        x = torch.randn(2, 3, 32, 32)
        batches = [(torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))) for _ in range(2)]
    else:
        cfgcls = {"hf_bert": T.BertConfig, "hf_gpt2": T.GPT2Config, "hf_llama": T.LlamaConfig}[name]
        kw = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=128, num_labels=10, max_position_embeddings=32)
        if name == "hf_gpt2":
            kw = dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=32)
        if name == "hf_llama":
            kw.update(num_key_value_heads=2)
        cfg = cfgcls(**kw)
        x = torch.randint(0, 128, (2, 16))
        batches = [(torch.randint(0, 128, (2, 16)), torch.randint(0, 10, (2,))) for _ in range(2)]
    cfg._attn_implementation = "eager"

    def factory():
        torch.manual_seed(0)
        return cls(cfg).eval()

    def loss_fn(m, b):
        out = _logits(m(b[0]))
        if out.dim() == 3:  # language model: next-token loss on the ids
            return nn.functional.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), b[0][:, 1:].reshape(-1))
        return nn.functional.cross_entropy(out, b[1])
    return factory, (x,), loss_fn, batches


def _close(a, b) -> bool:
    a, b = _logits(a), _logits(b)
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-3, atol=1e-4 * max(1.0, float(b.abs().max()))))


def run_gradprune(name, factory, args, loss_fn, batches, key, frac, method) -> dict:
    import gradprune as gp
    from gradprune.structured import load_pruned, save_pruned
    dense = factory()
    d_flops, d_params = count_flops(dense, args), count_params(dense)
    rec = {"lib": "gradprune", "method": method, "budget": key, "frac": frac}
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = gp.search(dense, {key: f"{frac * 100:g}%"}, batches, loss_fn, method,
                          example_input=args[0] if len(args) == 1 else args, rules=RULES,
                          max_iter_data_loader=2, show_progress=False)
        small = found.export()
    rec["search_s"] = time.perf_counter() - t0
    rec["warnings"] = sorted({str(w.message)[:160] for w in caught if "score" in str(w.message)})
    rec["skipped"] = len(found.skipped)
    small.eval()
    rec["flops"], rec["params"] = count_flops(small, args) / d_flops, count_params(small) / d_params
    with torch.no_grad():
        with found.gates():
            gated = dense(*args)
        out = small(*args)
    rec["equal_to_gated"] = _close(out, gated)
    with tempfile.TemporaryDirectory() as tmp:
        if name.startswith(("hf_", "hfz_")):
            small.save_pretrained(tmp)
            from gradprune.structured.hf import load_pruned_pretrained
            back = load_pruned_pretrained(type(small), tmp).eval()
        else:
            save_pruned(small, tmp)
            back = load_pruned(factory, tmp).eval()
        with torch.no_grad():
            rec["reload_equal"] = _close(back(*args), out)
    return rec


def run_tp(name, factory, args, key, frac) -> dict:
    import torch_pruning as tp
    rec = {"lib": "torch-pruning", "method": "magnitude", "budget": key, "frac": frac}
    dense = factory()
    d_flops, d_params = count_flops(dense, args), count_params(dense)
    measure = (lambda m: count_flops(m, args) / d_flops) if key == "flops" else (lambda m: count_params(m) / d_params)

    def prune(ratio):
        m = copy.deepcopy(dense)
        heads = {mod: mod.num_heads for mod in m.modules() if isinstance(mod, nn.MultiheadAttention)}
        for mod in m.modules():  # head counts of other attention modules (TP's examples do this)
            n_q = getattr(mod, "num_attention_heads", getattr(mod, "num_heads", None))
            n_kv = getattr(getattr(mod, "config", None), "num_key_value_heads", None) or n_q
            if isinstance(n_q, int) and not isinstance(mod, nn.MultiheadAttention):
                for attr in ("query", "key", "value", "q_proj", "k_proj", "v_proj", "qkv"):
                    sub = getattr(mod, attr, None)
                    if isinstance(sub, nn.Linear):
                        heads[sub] = n_kv if attr in ("k_proj", "v_proj") else n_q
        last = [mod for mod in m.modules() if isinstance(mod, nn.Linear) and mod.out_features in (10, 128)]
        pruner = tp.pruner.MetaPruner(m, args[0] if len(args) == 1 else args,
                                      importance=tp.importance.GroupMagnitudeImportance(p=2),
                                      pruning_ratio=ratio, ignored_layers=last[-1:], round_to=8,
                                      num_heads=heads, output_transform=_logits)
        pruner.step()
        return m
    t0 = time.perf_counter()
    lo, hi, best = 0.0, 0.95, None
    for _ in range(8):
        mid = (lo + hi) / 2
        m = prune(mid)
        if measure(m) <= frac:
            hi, best = mid, m
        else:
            lo = mid
    if best is None:
        best = prune(hi)
    rec["search_s"] = time.perf_counter() - t0
    rec["pruning_ratio"] = hi
    best.eval()
    rec["flops"], rec["params"] = count_flops(best, args) / d_flops, count_params(best) / d_params
    with torch.no_grad():
        out = best(*args)
        rec["shape_ok"] = _logits(out).shape == _logits(dense(*args)).shape
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "tp.pth")
        torch.save(tp.state_dict(best), path)
        fresh = factory()
        try:  # a failure here is the round trip's: the pruned figures above stay in the record
            tp.load_state_dict(fresh, state_dict=torch.load(path, weights_only=False))
            fresh.eval()
            with torch.no_grad():
                rec["reload_equal"] = _close(fresh(*args), out)
        except Exception as exc:  # noqa: BLE001 - a failure is a result
            rec["reload_equal"] = False
            rec["reload_error"] = f"{type(exc).__name__}: {str(exc).strip()[:200]}"
    return rec


def _ok(rec) -> bool:
    if "error" in rec:
        return False
    budget_ok = rec[rec["budget"]] <= rec["frac"] + 1e-9
    return bool(budget_ok and rec.get("reload_equal") and rec.get("equal_to_gated", rec.get("shape_ok")))


def run_one(name: str, libs=("gradprune", "torch-pruning")) -> list:
    torch.set_num_threads(1)
    factory, args, loss_fn, batches = build(name)
    recs = []
    for key, frac in BUDGETS:
        jobs = [("gradprune", m) for m in GP_METHODS] + [("torch-pruning", "magnitude")]
        for lib, method in [j for j in jobs if j[0] in libs]:
            try:
                if lib == "gradprune":
                    rec = run_gradprune(name, factory, args, loss_fn, batches, key, frac, method)
                else:
                    rec = run_tp(name, factory, args, key, frac)
            except Exception as exc:  # noqa: BLE001 - a failure is a result
                rec = {"lib": lib, "method": method, "budget": key, "frac": frac,
                       "error": f"{type(exc).__name__}: {str(exc).strip()[:300]}"}
                if os.environ.get("BENCH_DEBUG"):
                    traceback.print_exc()
            rec["model"] = name
            rec["ok"] = _ok(rec)
            recs.append(rec)
            print(json.dumps(rec), flush=True)
    return recs


def summarise(recs: list, models: list) -> dict:
    out = {}
    for lib in ("gradprune", "torch-pruning"):
        ok = [m for m in models if all(r["ok"] for r in recs if r["model"] == m and r["lib"] == lib)
              and any(r["model"] == m and r["lib"] == lib for r in recs)]
        out[lib] = ok
    return out


def markdown(data: dict) -> str:
    recs, models = data["records"], data["models"]
    ok = summarise(recs, models)
    L = ["# Zoo coverage: gradprune vs Torch-Pruning 1.6.1", "",
         f"gradprune {len(ok['gradprune'])}/{len(models)}, Torch-Pruning {len(ok['torch-pruning'])}/{len(models)} "
         "(a model counts when every run on it is ok).", "",
         f"Command: `{data['command']}`  ", f"Environment: {data['env']}", "",
         "Each cell: ok/FAIL, then FLOPs and params of the pruned model as fractions of the dense one "
         "(measured with FlopCounterMode and a parameter count), then the search time. Budget 50%.", "",
         "| model | budget | gradprune magnitude | gradprune gradnas | Torch-Pruning |", "|---|---|---|---|---|"]

    def cell(r, m=None, lib=None):
        if r is None:
            late = next((x for x in recs if x["model"] == m and x["lib"] == lib and x["budget"] == "-"), None)
            return f"FAIL: {late['error']}" if late else "-"
        if "error" in r:
            return f"FAIL: {r['error'][:90]}"
        tag = "ok" if r["ok"] else "FAIL"
        extra = ""
        if not r["ok"]:
            bits = [k for k in ("equal_to_gated", "reload_equal", "shape_ok") if r.get(k) is False]
            bits += [r["reload_error"][:70]] if "reload_error" in r else []
            if r[r["budget"]] > r["frac"] + 1e-9:
                bits.append("over budget")
            extra = " (" + ", ".join(bits) + ")"
        return f"{tag}{extra} F {r['flops']:.3f} P {r['params']:.3f} {r['search_s']:.1f}s"
    for m in models:
        for key, _ in BUDGETS:
            get = lambda lib, meth: next((r for r in recs if r["model"] == m and r["budget"] == key  # noqa: E731
                                          and r["lib"] == lib and r["method"] == meth), None)
            L.append(f"| {m} | {key} | {cell(get('gradprune', 'magnitude'), m, 'gradprune')} "
                     f"| {cell(get('gradprune', 'gradnas'), m, 'gradprune')} "
                     f"| {cell(get('torch-pruning', 'magnitude'), m, 'torch-pruning')} |")
    behind = [m for m in ok["torch-pruning"] if m not in ok["gradprune"]]
    ahead = [m for m in ok["gradprune"] if m not in ok["torch-pruning"]]
    L += ["", f"gradprune only: {', '.join(ahead) or 'none'}.  ",
          f"Torch-Pruning only: {', '.join(behind) or 'none'}.  ",
          f"Neither: {', '.join(m for m in models if m not in ok['gradprune'] + ok['torch-pruning']) or 'none'}.  ",
          "gradprune >= Torch-Pruning on every model (every model Torch-Pruning is ok on, gradprune is ok on): "
          f"{'yes' if not behind else 'no'}."]
    if data.get("notes"):
        L += ["", "Notes:", ""] + [f"- {n}" for n in data["notes"]]
    return "\n".join(L) + "\n"


def merge_results(runs: list) -> dict:
    """One result from several runs (in order): a model's rows come from the last run that has
    it; models keep their first position, new ones are appended; commands are chained with
    ``then``, environments and notes kept once each."""
    models, rows, commands, envs, notes = [], {}, [], [], []
    for run in runs:
        for key in ("command", "env", "models", "records"):
            if key not in run:
                raise ValueError(f"a result file to merge has no {key!r} field")
        for m in run["models"]:
            if m not in models:
                models.append(m)
            rows[m] = [r for r in run["records"] if r["model"] == m]
        commands.append(run["command"])
        envs += [run["env"]] if run["env"] not in envs else []
        notes += [n for n in run.get("notes", []) if n not in notes]
    out = {"command": "` then `".join(commands), "env": "; ".join(envs), "models": models,
           "records": [r for m in models for r in rows[m]]}
    if notes:
        out["notes"] = notes
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", help="comma-separated; 'hfz' stands for every hfz_* family "
                    "(default: all torchvision, hf_* and hfz_* models)")
    ap.add_argument("--one", help="run one model in this process and print JSON lines")
    ap.add_argument("--lib", choices=("gradprune", "torch-pruning"), help="with --one: one library")
    ap.add_argument("--from-json")
    ap.add_argument("--merge", help="comma-separated result JSON files to merge into --out (no model is run)")
    ap.add_argument("--out", default="zoo_coverage")
    ap.add_argument("--timeout", type=int, default=420, help="seconds per model and library")
    a = ap.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    if a.one:
        run_one(a.one, (a.lib,) if a.lib else ("gradprune", "torch-pruning"))
        return
    OUT.mkdir(parents=True, exist_ok=True)
    if a.merge:
        data = merge_results([json.loads(Path(f).read_text()) for f in a.merge.split(",")])
    elif a.from_json:
        data = json.loads(Path(a.from_json).read_text())
    else:
        names = a.models.split(",") if a.models else list(TORCHVISION) + list(HF) + ["hfz"]
        models = [m for n in names for m in (hf_zoo_names() if n == "hfz" else [n])]
        recs = []
        for m in models:
            t0 = time.perf_counter()
            lines = []
            for lib in ("gradprune", "torch-pruning"):  # each library in its own process and time
                try:
                    p = subprocess.run([sys.executable, __file__, "--one", m, "--lib", lib],
                                       capture_output=True, text=True, timeout=a.timeout)
                    got = [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")]
                    if not got:
                        got = [{"model": m, "lib": lib, "method": "-", "budget": "flops", "frac": 0.5,
                                "ok": False, "error": (p.stderr.strip().splitlines() or ["no output"])[-1][:300]}]
                except subprocess.TimeoutExpired as exc:
                    done = [json.loads(x) for x in (exc.stdout or b"").decode().splitlines() if x.startswith("{")]
                    got = done + [{"model": m, "lib": lib, "method": "-", "budget": "-", "frac": 0.5, "ok": False,
                                   "error": f"timeout after {a.timeout}s"}]
                lines += got
            recs += lines
            Path(OUT / f"{a.out}.partial.jsonl").open("a").write("".join(json.dumps(r) + "\n" for r in lines))
            s = summarise(lines, [m])
            print(f"{m}: gradprune {'ok' if s['gradprune'] else 'FAIL'}, torch-pruning "
                  f"{'ok' if s['torch-pruning'] else 'FAIL'} ({time.perf_counter() - t0:.0f}s)", flush=True)
        import torch_pruning
        env = (f"torch {torch.__version__}, torch-pruning {torch_pruning.__version__}, "
               f"torchvision {_import_torchvision().__version__}, python {platform.python_version()}, "
               f"{platform.machine()}, 1 thread")
        try:
            import transformers
            env += f", transformers {transformers.__version__}"
        except ImportError:
            pass
        data = {"command": "python " + " ".join(["benchmarks/zoo_coverage.py"] + sys.argv[1:]),
                "env": env, "models": models, "records": recs}
    if not (a.from_json or a.merge):
        (OUT / f"{a.out}.partial.jsonl").unlink(missing_ok=True)
    (OUT / f"{a.out}.json").write_text(json.dumps(data, indent=1))
    (OUT / f"{a.out}.md").write_text(markdown(data))
    s = summarise(data["records"], data["models"])
    print(f"gradprune {len(s['gradprune'])}/{len(data['models'])}, "
          f"Torch-Pruning {len(s['torch-pruning'])}/{len(data['models'])}")


if __name__ == "__main__":
    main()
