"""Torch-Pruning 1.6.1 LLM pruning peer for ``benchmarks/llm_structured.py`` (not a test).

Runs in Torch-Pruning's own environment (``/work/venvs/zoo``: torch 2.13.0, torch-pruning 1.6.1,
transformers 5.25). Follows Torch-Pruning's ``examples/LLMs/prune_llm.py``: ``BasePruner`` with
``GroupMagnitudeImportance(p=2, group_reduction="mean")``, local (uniform) pruning of the hidden
size, MLP channels and whole attention heads (``prune_num_heads=True``, ``prune_head_dims=False``
so RoPE is untouched, GQA via ``num_heads`` per projection), ``lm_head`` ignored, ``round_to=4``.
The one ``pruning_ratio`` (also the head ratio) is searched (secant steps) so that the pruned model
has at most ``--params`` parameters; the config is updated as the example does, the weights are
written to ``--out/model.safetensors`` and the widths to ``--out/tp_info.json``.

    /work/venvs/zoo/bin/python benchmarks/llm_structured_tp.py --model DIR --params N --out DIR
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time

import torch

# The zoo environment's torchvision wheel fails at import (pulled in by transformers) unless these
# two operators exist; the same shim as benchmarks/setup_structured_peers.sh. Nothing here uses them.
for _op in ("nms", "qnms"):
    try:
        torch.library.define(f"torchvision::{_op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    except RuntimeError:
        pass


def _rotate_half(x):
    """transformers' ``rotate_half`` with the concatenation dimension written as a non-negative
    number; the same values."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=x.dim() - 1)


def _patch_rotate_half():
    """Let Torch-Pruning 1.6.1 trace RoPE under torch 2.13.

    transformers' ``rotate_half`` concatenates with ``dim=-1``; torch 2.13 stores that in
    ``CatBackward0._saved_dim`` as 2**64 - 1 (unsigned). Torch-Pruning only skips a concatenation
    on a non-channel dimension when ``_saved_dim < MAX_VALID_DIM`` (it takes larger values for the
    uninitialised field of old torch versions), so it maps RoPE's concatenation as a channel
    concatenation with offsets; RoPE's ``q * cos + rotate_half(q) * sin`` is a cycle, and each
    turn of ``DependencyGraph.get_pruning_group`` shifts the indices by the offset, so the group
    never closes (measured: indices 2112, 4256, 6400, ... after each 2000 dependencies, on a
    1-layer model with 4 tokens, with eager and SDPA attention, transformers 5.25 and 4.48.3
    alike). With the dimension written as 3 the concatenation is skipped as Torch-Pruning intends;
    the model's outputs do not change."""
    import transformers.models.llama.modeling_llama as modeling_llama

    modeling_llama.rotate_half = _rotate_half


def prune(model, ratio):
    import torch_pruning as tp

    model = copy.deepcopy(model)
    cfg = model.config
    num_heads = {}
    for name, m in model.named_modules():
        if name.endswith("self_attn"):
            num_heads[m.q_proj] = cfg.num_attention_heads
            num_heads[m.k_proj] = cfg.num_key_value_heads
            num_heads[m.v_proj] = cfg.num_key_value_heads
    inputs = torch.randint(0, cfg.vocab_size, (1, 64))
    pruner = tp.pruner.BasePruner(
        model, example_inputs=inputs,
        importance=tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"),
        global_pruning=False, output_transform=lambda x: x.logits, pruning_ratio=ratio,
        ignored_layers=[model.lm_head], num_heads=num_heads, prune_num_heads=True,
        prune_head_dims=False, head_pruning_ratio=ratio, round_to=4)
    pruner.step()
    if cfg.tie_word_embeddings:
        # Torch-Pruning prunes the shared weight twice (embedding columns, LM-head inputs, the same
        # indices) and leaves two equal Parameters; tie them again, as loading the saved model does
        assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
        model.lm_head.weight = model.model.embed_tokens.weight
    head_dim = cfg.head_dim if getattr(cfg, "head_dim", None) else cfg.hidden_size // cfg.num_attention_heads
    cfg.head_dim = head_dim
    cfg.hidden_size = model.lm_head.in_features
    for layer in model.model.layers:
        attn = layer.self_attn
        attn.num_heads = attn.q_proj.out_features // head_dim
        attn.num_key_value_heads = attn.k_proj.out_features // head_dim
        attn.num_key_value_groups = attn.num_heads // attn.num_key_value_heads
        cfg.num_attention_heads = attn.num_heads
        cfg.num_key_value_heads = attn.num_key_value_heads
        cfg.intermediate_size = layer.mlp.gate_proj.out_features
    return model


def predicted_params(cfg, r: float) -> int:
    """Parameters after ``prune(model, r)``, from Torch-Pruning 1.6.1's rules (local pruning: keep
    ``int(C * (1 - r))`` channels rounded down to a multiple of 4; GQA heads: ``ceil(ceil(r * H) /
    KV)`` query heads removed per KV group), for a tied-embedding LLaMA."""
    def keep(c):
        k = int(c * (1 - r))
        return k - k % 4
    hd = cfg.head_dim or cfg.hidden_size // cfg.num_attention_heads
    h, i = keep(cfg.hidden_size), keep(cfg.intermediate_size)
    kv = cfg.num_key_value_heads
    q = cfg.num_attention_heads - kv * math.ceil(math.ceil(r * cfg.num_attention_heads) / kv) if r > 0 else cfg.num_attention_heads
    layer = h * q * hd * 2 + h * kv * hd * 2 + 3 * h * i + 2 * h
    return cfg.vocab_size * h + cfg.num_hidden_layers * layer + h


def predicted_ratio(cfg, budget: int) -> float:
    for k in range(1, 1000):
        if predicted_params(cfg, k / 1000) <= budget:
            return k / 1000
    return 0.999


def _status_kib(field):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--params", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--one-call", action="store_true",
                    help="no search: predict the ratio from Torch-Pruning's rounding rules and prune once")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import torch_pruning  # noqa: F401
    _patch_rotate_half()
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(args.model).eval()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset the peak resident size (VmHWM) to the current one
    before = _status_kib("VmRSS")
    t0 = time.perf_counter()
    dense = count(base)
    tries = []

    def size(r):
        m = prune(base, r)
        tries.append({"ratio": r, "params": count(m)})
        return count(m), m

    if args.one_call:
        r = predicted_ratio(base.config, args.params)
        n, m = size(r)
        best = (r, m)
    # the smallest ratio whose model meets the budget: secant steps on params(ratio) (smooth, about
    # quadratic), then the ratio is raised in small steps until the budget holds
    lo, n_lo, best = 0.0, dense, None
    r = 1 - math.sqrt(args.params / dense)
    for _ in range(0 if args.one_call else 4):
        n, m = size(r)
        if n <= args.params:
            if best is None or r < best[0]:
                best = (r, m)
            hi, n_hi = r, n
        else:
            lo, n_lo = max(lo, r), n
        if best is not None and lo > 0 and best[0] - lo < 0.01:
            break
        if best is None:  # move up along the secant from (lo, n_lo)
            r = min(0.95, r + max(0.01, (n - args.params) / max(dense - n, 1) * r))
        else:  # interpolate between the failing lo and the passing hi
            r = lo + (hi - lo) * (n_lo - args.params) / max(n_lo - n_hi, 1)
            r = min(max(r, lo + 0.002), hi - 0.002) if hi - lo > 0.004 else hi
    while best is None:
        r = min(0.95, r + 0.02)
        n, m = size(r)
        if n <= args.params:
            best = (r, m)
    search_s = time.perf_counter() - t0
    ratio, model = best
    peak_mib = (_status_kib("VmHWM") - before) / 1024  # over the whole search, as for the other methods
    t1 = time.perf_counter()
    prune(base, ratio)
    once_s = time.perf_counter() - t1
    # the weights only: transformers 5 refuses to write (and to load) a LLaMA config whose hidden size
    # is not a multiple of the query heads (e.g. 212 and 6), though the model runs with an explicit
    # head_dim; the benchmark rebuilds the config from the dense one and the widths in tp_info.json
    from safetensors.torch import save_model

    os.makedirs(args.out, exist_ok=True)
    save_model(model, os.path.join(args.out, "model.safetensors"))
    info = {"ratio": ratio, "params": count(model), "search_seconds": search_s,
            "prune_seconds": once_s, "peak_mib": peak_mib, "tries": tries,
            "hidden_size": model.config.hidden_size, "intermediate_size": model.config.intermediate_size,
            "num_attention_heads": model.config.num_attention_heads,
            "num_key_value_heads": model.config.num_key_value_heads}
    with open(f"{args.out}/tp_info.json", "w") as fh:
        json.dump(info, fh, indent=1)
    print(json.dumps({k: v for k, v in info.items() if k != "tries"}))


if __name__ == "__main__":
    main()
