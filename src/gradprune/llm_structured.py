"""Structured LLM pruning end to end: score, search, export, distil, evaluate (the
``llm_structured`` recipe workflow, ``gradprune run llm.yaml``), and the measurements it reports.

Measurements (all on the model's device, eval mode, no grad, batch 1 for speed):

- :func:`perplexity`: ``exp`` of the mean next-token cross-entropy over every position of
  held-out token windows ``[n, T]``.
- :func:`prefill_ms`: median wall time of one forward over a ``[1, prompt_len]`` prompt.
- :func:`decode_tokens_per_s`: after an untimed prefill that fills the KV cache, the median over
  ``repeats`` of ``tokens / time`` for ``tokens`` greedy single-token steps, each reusing the cache.
- :func:`layer_widths` / :func:`plot_layer_widths`: per decoder layer, the kept fraction of
  KV groups (heads) and MLP neurons (0 for a dropped layer), as rows and as a bar chart.

The recipe section ``llm:`` (validated before any work by :func:`validate_section`)::

    workflow: llm_structured
    model: tiny_llm:make_model        # a Hugging Face causal LM (factory)
    data: tiny_llm:train_batches      # batches of token ids [B, T] (scoring and distillation)
    eval_data: tiny_llm:heldout       # held-out token windows [n, T] (perplexity)
    llm:
      constraints: {params: "60%"}    # also flops, kv_cache, latency, decode_latency, at once
      method: gradnas                 # a width score; an axis's own score with [layers],
      axes: [heads, mlp]              # [hidden] or [experts] alone; gradnas for combinations
      uniform: true
      max_iter_data_loader: 8
      distill: {steps: 20, lr: 0.001, temperature: 1.0}
      eval: {prompt_len: 32, decode_tokens: 16, repeats: 3}

``loss_fn`` (scoring) defaults to :data:`causal_lm_loss`, the library's chunked causal-LM loss
``gp.causal_lm_loss()`` (``chunk="auto"``, :mod:`gradprune.structured.lm_loss`): the same loss as
``model(ids, labels=ids).loss`` with the logits of one chunk of tokens at a time, so scoring memory
stays bounded with a large vocabulary (a model it cannot chunk falls back to the plain loss, with
a warning); ``example_input`` defaults to the first batch. The output folder gets ``pruned/`` (``save_pretrained``: safetensors and config),
``report.json``, ``report.md`` and ``widths.png`` (when matplotlib is installed).

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> m = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1))
    >>> ids = torch.randint(0, 32, (2, 8))
    >>> 20 < perplexity(m, ids) < 60        # an untrained model: about the vocabulary size
    True
    >>> decode_tokens_per_s(m, ids[:1], tokens=4, repeats=1) > 0
    True
"""

from __future__ import annotations

import inspect
import itertools
import json
import math
import os
import re
import statistics
import time
from typing import Any, Callable

import torch
from torch import nn

from ._checks import check_bool, check_choice, check_int
from .structured.lm_loss import CausalLMLoss

__all__ = ["perplexity", "prefill_ms", "decode_tokens_per_s", "layer_widths", "plot_layer_widths",
           "causal_lm_loss", "validate_section", "run", "LLM_KEYS", "EVAL_KEYS"]

LLM_KEYS = ("constraints", "method", "axes", "uniform", "max_iter_data_loader", "rules",
            "example_input", "distill", "eval")
EVAL_KEYS = ("prompt_len", "decode_tokens", "repeats", "batch_size")


#: The recipe's default ``loss_fn(model, batch)``: ``gp.causal_lm_loss()`` already called, a
#: :class:`~gradprune.structured.lm_loss.CausalLMLoss` with ``chunk="auto"`` (not a second loss:
#: ``gradprune.causal_lm_loss(chunk)`` builds one, this is the one the recipe uses). A batch is a
#: tensor of token ids (the labels) or a mapping with ``input_ids`` and optional
#: ``attention_mask`` and ``labels``.
causal_lm_loss = CausalLMLoss("auto")


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def perplexity(model: nn.Module, seqs: torch.Tensor, batch_size: int = 16) -> float:
    """``exp(mean next-token cross-entropy)`` over ``seqs`` (``[n, T]`` token ids)."""
    if not isinstance(seqs, torch.Tensor) or seqs.dim() != 2:
        raise TypeError(f"seqs must be a 2-D tensor of token ids [n, T], got "
                        f"{type(seqs).__name__}{tuple(seqs.shape) if isinstance(seqs, torch.Tensor) else ''}")
    check_int("batch_size", batch_size, min_value=1)
    was = model.training
    model.eval()
    dev = _device(model)
    total, count = 0.0, 0
    try:
        for i in range(0, len(seqs), batch_size):
            x = seqs[i:i + batch_size].to(dev)
            logits = model(input_ids=x).logits[:, :-1].float()
            loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                               x[:, 1:].reshape(-1), reduction="sum")
            total += float(loss)
            count += x[:, 1:].numel()
    finally:
        model.train(was)
    return math.exp(total / count)


@torch.no_grad()
def prefill_ms(model: nn.Module, prompt: torch.Tensor, repeats: int = 5, warmup: int = 1) -> float:
    """Median milliseconds of one forward over ``prompt`` (``[1, T]`` token ids)."""
    check_int("repeats", repeats, min_value=1)
    model.eval()
    dev = _device(model)
    prompt = prompt.to(dev)
    times = []
    for i in range(warmup + repeats):
        _sync(dev)
        t0 = time.perf_counter()
        model(input_ids=prompt, use_cache=False)
        _sync(dev)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return float(statistics.median(times))


@torch.no_grad()
def decode_tokens_per_s(model: nn.Module, prompt: torch.Tensor, tokens: int = 32, repeats: int = 3) -> float:
    """Greedy per-token decode speed at batch 1: the median over ``repeats`` of ``tokens`` divided
    by the time of ``tokens`` single-token forwards that reuse the KV cache (the prefill that
    fills the cache is not timed)."""
    check_int("tokens", tokens, min_value=1)
    check_int("repeats", repeats, min_value=1)
    model.eval()
    dev = _device(model)
    prompt = prompt[:1].to(dev)
    # transformers 5.2x calls the KV cache ``cache``; earlier versions ``past_key_values``
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    rates = []
    for i in range(repeats + 1):  # the first run warms up
        out = model(input_ids=prompt, use_cache=True)
        cache, nxt = out[key], out.logits[:, -1:].argmax(-1)
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(tokens):
            out = model(input_ids=nxt, use_cache=True, **{key: cache})
            cache, nxt = out[key], out.logits[:, -1:].argmax(-1)
        _sync(dev)
        if i:
            rates.append(tokens / (time.perf_counter() - t0))
    return float(statistics.median(rates))


def layer_widths(found, n_layers: int | None = None) -> list:
    """Per decoder layer of the dense model: ``{"layer", "kept", "heads", "heads_total", "mlp",
    "mlp_total"}`` (kept and total KV groups and MLP neurons; a dropped layer keeps 0), for a
    width, depth or width + depth search result."""
    from .structured.depth import LayerSearchResult, decoder_layers

    if not hasattr(found, "analysis"):  # the layer, hidden or expert axis alone
        model = found.rmap.model if hasattr(found, "rmap") else found.model
        layers = decoder_layers(model)[1]
        kept_layers = found.kept if isinstance(found, LayerSearchResult) else range(len(layers))
        rows = []
        for i, layer in enumerate(layers):
            heads, mlp = _layer_sizes(layer)
            kept = i in kept_layers
            rows.append({"layer": i, "kept": kept, "heads": heads if kept else 0, "heads_total": heads,
                         "mlp": mlp if kept else 0, "mlp_total": mlp})
        return rows
    model = found.analysis.model
    name, layers = decoder_layers(model)
    dropped = sorted(getattr(found, "dropped_layers", None) or [])
    total = len(layers) + len(dropped) if n_layers is None else n_layers
    original = [i for i in range(total) if i not in dropped]  # layer j of the copy is original[j]
    pat = re.compile(re.escape(name) + r"\.(\d+)\.")
    per = {}
    for gi, g in enumerate(found.analysis.groups):
        m = pat.match(g.name + ".")
        if not m:
            continue
        j = int(m.group(1))
        kind = "heads" if g.unit == "heads" else "mlp"
        d = per.setdefault(j, {})
        w, t = d.get(kind, (0, 0))
        d[kind] = (w + found.widths[gi], t + g.size)
    rows = []
    ref = {}
    for j, layer in enumerate(layers):
        h, m_ = _layer_sizes(layer)
        d = per.get(j, {})
        hk, ht = d.get("heads", (h, h))
        mk, mt = d.get("mlp", (m_, m_))
        ref = {"heads_total": ht, "mlp_total": mt}
        rows.append({"layer": original[j], "kept": True, "heads": hk, "heads_total": ht, "mlp": mk,
                     "mlp_total": mt})
    for i in dropped:
        rows.append({"layer": i, "kept": False, "heads": 0, "mlp": 0, **ref})
    return sorted(rows, key=lambda r: r["layer"])


def _layer_sizes(layer: nn.Module) -> tuple:
    """(KV groups, MLP neurons) of one decoder layer, read from its projections' shapes."""
    attn = getattr(layer, "self_attn", None)
    heads = 0
    if attn is not None:
        kv = getattr(attn, "k_proj", None)
        hd = getattr(attn, "head_dim", None)
        if kv is not None and hd:
            heads = kv.out_features // hd
    mlp = getattr(layer, "mlp", None)
    down = getattr(mlp, "down_proj", None) if mlp is not None else None
    return heads, (down.in_features if down is not None else 0)


def plot_layer_widths(rows: list, path: str, title: str = "kept width per decoder layer") -> str | None:
    """Bar chart of the kept fraction of heads (KV groups) and MLP neurons per layer; returns
    ``path``, or ``None`` when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    x = [r["layer"] for r in rows]
    frac = lambda k: [r[k] / r[f"{k}_total"] if r[f"{k}_total"] else 0.0 for r in rows]  # noqa: E731
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(rows) + 2), 3.0))
    ax.bar([i - 0.2 for i in x], frac("heads"), width=0.4, label="heads (KV groups)")
    ax.bar([i + 0.2 for i in x], frac("mlp"), width=0.4, label="MLP neurons")
    for r in rows:
        if not r["kept"]:
            ax.text(r["layer"], 0.02, "dropped", rotation=90, ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("kept fraction")
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# -- the recipe workflow -----------------------------------------------------------------------

def validate_section(section: Any, error=ValueError) -> dict:
    """Check the ``llm:`` section of a recipe (see the module docs) before any work; returns it
    with defaults filled in. Raises ``error`` (the recipe's ``RecipeError``) naming the field."""
    from .distill import make_distill_config
    from .structured.depth import LAYER_METHODS, check_axes
    from .structured.experts import EXPERT_METHODS
    from .structured.hidden import HIDDEN_METHODS
    from .structured.staged import STAGES
    from .structured.scoring import WIDTH_SCORES
    from .structured.search import parse_constraints, CONSTRAINT_KEYS

    if not isinstance(section, dict):
        raise error(f"llm must be a mapping with at least constraints:, got {type(section).__name__}")
    unknown = sorted(set(section) - set(LLM_KEYS))
    if unknown:
        raise error(f"unknown llm key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(LLM_KEYS)}")
    sec = dict(section)
    if "constraints" not in sec:
        raise error("llm needs constraints, e.g. {params: '50%'}")
    for key in ("example_input",):
        if key in sec and (not isinstance(sec[key], str) or ":" not in sec[key]):
            raise error(f"llm.{key} must be 'package.module:name', got {sec[key]!r}")
    try:
        parse_constraints(sec["constraints"], {k: 1.0 for k in CONSTRAINT_KEYS})
        axes = check_axes(tuple(sec["axes"]) if isinstance(sec.get("axes"), list) else sec.get("axes"))
        sec["axes"] = list(axes)
        sec["uniform"] = check_bool("llm.uniform", sec.get("uniform", True))
        sec["max_iter_data_loader"] = check_int("llm.max_iter_data_loader",
                                                sec.get("max_iter_data_loader", 32), min_value=1)
        method = sec.setdefault("method", "gradnas")
        staged = [a for a in STAGES if a in axes]
        if len(axes) == 1 and staged:  # the layer, hidden or expert axis alone: its own scores
            methods = {"layers": LAYER_METHODS, "hidden": HIDDEN_METHODS, "experts": EXPERT_METHODS}
            check_choice("llm.method", method, methods[axes[0]])
        elif staged:
            if method != "gradnas":
                raise ValueError(f"llm.method={method!r}: combining axes {list(axes)} needs method gradnas "
                                 "(the scores of every axis are then squared gate gradients, which add up)")
        else:
            check_choice("llm.method", method, [m for m in WIDTH_SCORES if m != "fastnas"])
        dist = dict(sec.get("distill") or {})
        steps = check_int("llm.distill.steps", dist.pop("steps", 0), min_value=0)
        config = make_distill_config(None, dist)
        sec["distill"] = {"steps": steps, **{k: v for k, v in config.to_dict().items()
                                             if k in dist or k == "lr"}}
        ev = sec.get("eval") or {}
        if not isinstance(ev, dict):
            raise TypeError(f"llm.eval must be a mapping, got {type(ev).__name__}")
        bad = sorted(set(ev) - set(EVAL_KEYS))
        if bad:
            raise ValueError(f"unknown llm.eval key(s) {', '.join(map(repr, bad))}; valid keys: {', '.join(EVAL_KEYS)}")
        sec["eval"] = {"prompt_len": check_int("llm.eval.prompt_len", ev.get("prompt_len", 64), min_value=1),
                       "decode_tokens": check_int("llm.eval.decode_tokens", ev.get("decode_tokens", 32), min_value=1),
                       "repeats": check_int("llm.eval.repeats", ev.get("repeats", 5), min_value=1),
                       "batch_size": check_int("llm.eval.batch_size", ev.get("batch_size", 16), min_value=1)}
    except (TypeError, ValueError, NotImplementedError) as exc:
        raise error(str(exc)) from None
    return sec


def _measure(model, heldout, prompt, ev) -> dict:
    return {"params": sum(p.numel() for p in model.parameters()),
            "ppl": perplexity(model, heldout, ev["batch_size"]) if heldout is not None else None,
            "prefill_ms": prefill_ms(model, prompt, ev["repeats"]),
            "decode_tokens_per_s": decode_tokens_per_s(model, prompt, ev["decode_tokens"], ev["repeats"])}


def run(model: nn.Module, data, sec: dict, out_files: dict, *, loss_fn: Callable | None = None,
        heldout: torch.Tensor | None = None, example_input=None, show_progress: bool | None = None) -> tuple:
    """Run a validated ``llm:`` section on ``model``: returns ``(report, text)`` and fills
    ``out_files`` (file name -> writer) with ``pruned``, ``report.json``, ``report.md`` and
    ``widths.png``. The model itself is not changed (it is the distillation teacher)."""
    from .distill import distill
    from .structured import search

    loss_fn = loss_fn or causal_lm_loss
    batches = list(itertools.islice(iter(data), max(sec["max_iter_data_loader"], 1)))
    if not batches:
        raise ValueError("data yielded no batches")
    first = batches[0]["input_ids"] if isinstance(batches[0], dict) else batches[0]
    if example_input is None:
        example_input = first
    ev = sec["eval"]
    prompt = first[:1, :ev["prompt_len"]]
    teacher = model.eval()
    dense = _measure(teacher, heldout, prompt, ev)

    t0 = time.perf_counter()
    found = search(teacher, sec["constraints"], batches, loss_fn, method=sec["method"],
                   example_input=example_input, axes=tuple(sec["axes"]),
                   max_iter_data_loader=sec["max_iter_data_loader"], show_progress=show_progress,
                   **({"uniform": sec["uniform"]} if sec["axes"] != ["layers"] else {}),
                   **({"rules": sec["rules"]} if sec.get("rules") is not None else {}))
    small = found.export()
    search_s = time.perf_counter() - t0
    oneshot = _measure(small, heldout, prompt, ev)
    report = {"workflow": "llm_structured", "method": sec["method"], "axes": sec["axes"],
              "constraints": sec["constraints"], "dense": dense, "oneshot": oneshot,
              "search_seconds": search_s, "searched_params": found.params,
              "dense_flops": found.dense_flops, "flops": found.flops}
    steps = sec["distill"]["steps"]
    if steps:
        fields = {k: v for k, v in sec["distill"].items() if k != "steps"}
        t0 = time.perf_counter()
        run_ = distill(small, teacher=teacher, data=batches, steps=steps, show_progress=show_progress,
                       **fields)
        report["distill"] = {"steps": steps, **fields, "seconds": time.perf_counter() - t0,
                             "first_loss": run_.history[0].get("loss") if run_.history else None,
                             "last_loss": run_.history[-1].get("loss") if run_.history else None}
        report["distilled"] = _measure(small, heldout, prompt, ev)
    small.eval()
    rows = layer_widths(found)
    report["layers"] = rows
    plain = bool(getattr(found, "uniform", False))  # one width per family: the config says it all
    report["uniform"] = plain
    report["loads_with"] = ("AutoModelForCausalLM.from_pretrained" if plain
                            else "gradprune.structured.load_pruned_pretrained")
    text = _markdown(report)

    def write_pruned(path):
        small.save_pretrained(path)

    def write_json(path):
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2, default=str)

    def write_md(path):
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)

    out_files.update({"pruned": write_pruned, "report.json": write_json, "report.md": write_md})
    try:
        import matplotlib  # noqa: F401
        out_files["widths.png"] = lambda path: plot_layer_widths(
            rows, path, f"{sec['method']} {', '.join(sec['axes'])}: kept width per layer")
    except ImportError:
        report["plot"] = "matplotlib is not installed: no widths.png"
    return report, text


def _markdown(r: dict) -> str:
    def fmt(v, spec):
        return "n/a" if v is None else format(v, spec)

    lines = [f"# Structured LLM pruning: {r['method']} on {', '.join(r['axes'])}, {r['constraints']}", "",
             "| model | params | held-out ppl | prefill ms | decode tokens/s |", "|---|---|---|---|---|"]
    for key in ("dense", "oneshot", "distilled"):
        if key in r:
            m = r[key]
            lines.append(f"| {key} | {m['params']:,} | {fmt(m['ppl'], '.2f')} | {m['prefill_ms']:.2f} | "
                         f"{m['decode_tokens_per_s']:.1f} |")
    lines += ["", f"search: {r['search_seconds']:.1f} s; FLOPs {r['dense_flops']:,} -> {r['flops']:,}; "
              f"the pruned model loads with `{r['loads_with']}`.", "",
              "| layer | kept | heads (KV groups) | MLP neurons |", "|---|---|---|---|"]
    for row in r["layers"]:
        lines.append(f"| {row['layer']} | {'yes' if row['kept'] else 'dropped'} | "
                     f"{row['heads']}/{row['heads_total']} | {row['mlp']}/{row['mlp_total']} |")
    return "\n".join(lines) + "\n"
