"""Peak memory of gate-gradient scoring (not a test), with and without activation checkpointing,
on the shared 6.3M LLaMA-GQA model of ``benchmarks/llm_model.py``, against the formula of
``gradprune.structured.checkpointing``.

For each batch size ``B`` (sequences of ``T = 128`` tokens): the resident-memory increase during
``gate_statistics`` over 2 batches (Linux ``VmHWM`` reset through ``/proc/self/clear_refs``, after
``malloc_trim``), and the formula's terms measured with ``torch.autograd.graph.saved_tensors_hooks``
on one forward: ``a`` = bytes autograd saves per token in one decoder layer (gates attached),
``r`` = bytes saved per token outside the layers (embedding, final norm, logits and the loss),
``h`` = a layer input's bytes per token. Predicted increase: ``B*T*(L*a + r)`` without
checkpointing, ``B*T*(L*h + a + r)`` with it; weights ``W`` are resident before scoring and get no
gradient (no ``W``-sized buffers are added).

    OMP_NUM_THREADS=1 python benchmarks/llm_scoring_memory.py

Writes ``benchmarks/results/llm_scoring_memory.json`` and ``.md``.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import llm_model  # noqa: E402
from llm_structured import PeakRSS, loss_fn  # noqa: E402

from gradprune.structured import Gates, find_groups  # noqa: E402
from gradprune.structured.scoring import gate_statistics  # noqa: E402

OUT = Path(__file__).parent / "results"


def saved_bytes(model, analysis, batch):
    """(bytes saved per token in each decoder layer, bytes saved per token elsewhere)."""
    seen, total = set(), [0]
    per_layer = []

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total[0] += t.untyped_storage().nbytes()
        return t

    starts = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.register_forward_pre_hook(lambda m, a, i=i: starts.__setitem__(i, total[0])))
        hooks.append(layer.register_forward_hook(lambda m, a, o, i=i: per_layer.append(total[0] - starts[i])))
    seen.update((p.untyped_storage().data_ptr(), p.untyped_storage().nbytes()) for p in model.parameters())
    try:
        with Gates(analysis), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            for p in model.parameters():
                p.requires_grad_(False)
            loss = loss_fn(model, batch)
    finally:
        for h in hooks:
            h.remove()
        for p in model.parameters():
            p.requires_grad_(True)
    del loss
    tokens = batch.numel()
    a = max(per_layer) / tokens
    rest = (total[0] - sum(per_layer)) / tokens
    return a, rest


def main():
    torch.set_num_threads(1)
    model = llm_model.load()
    ids = llm_model.token_ids()
    cfg = model.config
    W = sum(p.numel() * p.element_size() for p in model.parameters())
    L, T = cfg.num_hidden_layers, llm_model.SEQ_LEN
    h = cfg.hidden_size * 4
    rows = []
    for B in (1, 8):
        data = list(llm_model.sequences(ids["train"], n=2 * B, seed=7).split(B))
        analysis = find_groups(model, data[0][:1])
        a, rest = saved_bytes(model, analysis, data[0])
        for ckpt in (False, True):
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                gate_statistics(analysis, data, loss_fn, n_batches=2, show_progress=False,
                                gradient_checkpointing=ckpt)
                secs = time.perf_counter() - t0
            predicted = B * T * ((L * h + a + rest) if ckpt else (L * a + rest))
            rows.append({"batch": B, "tokens": B * T, "checkpointing": ckpt, "peak_increase_mib": mem.delta_mib,
                         "predicted_mib": predicted / 2**20, "a_per_token": a, "rest_per_token": rest,
                         "h_per_token": h, "seconds": secs})
            print(rows[-1], flush=True)
    result = {"weights_mib": W / 2**20, "layers": L, "seq_len": T, "rows": rows,
              "command": "OMP_NUM_THREADS=1 python benchmarks/llm_scoring_memory.py",
              "machine": "2 shared CPU cores (other jobs running), 1 thread"}
    OUT.mkdir(exist_ok=True)
    (OUT / "llm_scoring_memory.json").write_text(json.dumps(result, indent=1))
    lines = ["# Gate-scoring peak memory on the 6.3M LLaMA-GQA model", "",
             f"`{result['command']}`. Weights W = {W / 2**20:.1f} MiB (fp32), L = {L} layers, T = {T} tokens per "
             f"sequence; a = {rows[0]['a_per_token'] / 1024:.1f} KiB saved per token per layer, "
             f"r = {rows[0]['rest_per_token'] / 1024:.1f} KiB per token outside the layers (logits and loss), "
             f"h = {h / 1024:.1f} KiB per token (a layer input).", "",
             "| batch (sequences) | checkpointing | measured increase MiB | formula MiB | formula | seconds |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        f = "B*T*(L*h + a + r)" if r["checkpointing"] else "B*T*(L*a + r)"
        m = "n/a" if r["peak_increase_mib"] is None else f"{r['peak_increase_mib']:.1f}"
        lines.append(f"| {r['batch']} | {'yes' if r['checkpointing'] else 'no'} | {m} | {r['predicted_mib']:.1f} | "
                     f"{f} | {r['seconds']:.1f} |")
    (OUT / "llm_scoring_memory.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
