"""Peak memory of gate-gradient scoring and of the export (not a test), on the shared 6.3M
LLaMA-GQA model of ``benchmarks/llm_model.py``, against the formulas of
``gradprune.structured.checkpointing`` and the goal of issue #16: the weights ``W`` x 1.5 plus
one layer's activations, ``W + (0.5 W + B*T*a)``.

**Scoring.** For each batch size ``B`` (sequences of ``T = 128`` tokens), with and without
activation checkpointing, with the plain loss ``model(ids, labels=ids).loss`` and with the chunked
loss ``gp.causal_lm_loss()`` (``chunk="auto"``): the resident-memory increase during
``gate_statistics`` over 2 batches (Linux ``VmHWM`` reset through ``/proc/self/clear_refs``, after
``malloc_trim``; one unmeasured warm-up run of the same configuration first, in the same process), and the formula's
terms measured with ``torch.autograd.graph.saved_tensors_hooks`` on one forward: ``a`` = bytes
autograd saves per token in one decoder layer (gates attached), ``r`` = bytes saved per token
outside the layers (embedding, final norm, logits and the loss), ``h`` = a layer input's bytes
per token. Predicted increase: ``B*T*(L*a + r)`` without checkpointing, ``B*T*(L*h + a + r)``
with it; weights ``W`` are resident before scoring and get no gradient (no ``W``-sized buffers).
The weights are resident before and after, so the goal is an increase of at most
``0.5 W + B*T*a``.

Every figure is measured in a fresh process (a run's freed blocks would change the next one's
allocator state), twice: with glibc's default ``malloc`` and with ``MALLOC_MMAP_THRESHOLD_=65536``:
by default glibc raises its mmap threshold after
the first large ``free`` and then keeps freed blocks of the heap, so the resident size counts
memory that no tensor holds any more; with a fixed threshold every block above 64 KiB is handed
back to the system when the tensor is freed, and the resident size follows the tensors.

**Export.** The resident-memory increase while exporting (a) the width search's result at 50 % of
the parameters (uniform heads and MLP widths) with ``export_model`` and (b) half of the hidden
size with ``export_hidden``, against the export's own size ``W_small`` (the least any export
can add while the model is kept) and against the previous code run in the same process (a deep
copy of the model sliced afterwards; a sliced state dict loaded into a new model).

    OMP_NUM_THREADS=1 python benchmarks/llm_scoring_memory.py

Writes ``benchmarks/results/llm_scoring_memory.json`` and ``.md``.

**At scale.** ``--scale 1b [DTYPE ...]`` measures the scoring at real scale instead: a random-weight
``LlamaForCausalLM`` with Llama-3.2-1B's config (``llm_scale.llama_3_2_1b_config``), the chunked
loss and checkpointing, ``B`` in {1, 4}, ``T = 128``, dtypes ``float32`` (default) and optionally
``bfloat16``, each in a fresh process with both ``malloc`` settings; it writes
``benchmarks/results/llm_scoring_memory_1b.json`` and ``.md``.

    OMP_NUM_THREADS=1 python benchmarks/llm_scoring_memory.py --scale 1b
"""
from __future__ import annotations

import copy
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import llm_model  # noqa: E402
from llm_structured import PeakRSS  # noqa: E402

import gradprune as gp  # noqa: E402
from gradprune.structured import Gates, find_groups  # noqa: E402
from gradprune.structured.export import _slice_all, export_model  # noqa: E402
from gradprune.structured.hidden import _build, _config_with, export_hidden, residual_map  # noqa: E402
from gradprune.structured.scoring import gate_statistics  # noqa: E402

OUT = Path(__file__).parent / "results"
COMMAND = "OMP_NUM_THREADS=1 python benchmarks/llm_scoring_memory.py"


def plain_loss(model, batch):
    return model(input_ids=batch, labels=batch).loss


LOSSES = {"plain": plain_loss, "chunked": gp.causal_lm_loss()}


def saved_bytes(model, analysis, batch, loss_fn):
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


def nbytes(model) -> int:
    """Bytes of the parameters and buffers (a tied weight once)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def measure(fn):
    """(peak resident increase MiB during fn(), its result's bytes)."""
    gc.collect()
    with PeakRSS() as mem:
        out = fn()
    size = nbytes(out)
    del out
    gc.collect()
    return mem.delta_mib, size


def old_export_model(analysis, keep, uniform):  # the previous code: a deep copy, sliced
    new = copy.deepcopy(analysis.model)
    _slice_all(new, analysis, keep, uniform)
    return new


def old_export_hidden(rmap, keep):  # the previous code: a sliced state dict loaded into a new model
    model = rmap.model
    slices = rmap.slices()
    state = {key: t if slices.get(key) is None else t.index_select(slices[key], keep)
             for key, t in model.state_dict().items()}
    new = _build(model, _config_with(model.config, len(keep), rmap.head_dim))
    new.load_state_dict(state, strict=True)
    return new


def setup():
    torch.set_num_threads(1)
    model = llm_model.load()
    return model, llm_model.token_ids()


def scoring_row(B: int, loss_name: str, ckpt: bool) -> dict:
    """One configuration, measured in a fresh process (see ``main``)."""
    model, ids = setup()
    cfg = model.config
    W = nbytes(model)
    L, T = cfg.num_hidden_layers, llm_model.SEQ_LEN
    h = cfg.hidden_size * 4
    loss_fn = LOSSES[loss_name]
    data = list(llm_model.sequences(ids["train"], n=2 * B, seed=7).split(B))
    analysis = find_groups(model, data[0][:1])
    a, rest = saved_bytes(model, analysis, data[0], loss_fn)

    def run():
        gate_statistics(analysis, data, loss_fn, n_batches=2, show_progress=False, gradient_checkpointing=ckpt)
    run()  # warm-up
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        run()
        secs = time.perf_counter() - t0
    predicted = B * T * ((L * h + a + rest) if ckpt else (L * a + rest))
    return {"batch": B, "tokens": B * T, "loss": loss_name, "checkpointing": ckpt,
            "peak_increase_mib": mem.delta_mib, "predicted_mib": predicted / 2**20,
            "goal_mib": (0.5 * W + B * T * a) / 2**20, "a_per_token": a, "rest_per_token": rest,
            "h_per_token": h, "seconds": secs, "weights_mib": W / 2**20, "layers": L, "seq_len": T,
            "vocab": cfg.vocab_size, "hidden": cfg.hidden_size}


EXPORTS = ("widths 50% (export_model)", "hidden size 1/2 (export_hidden)")


def export_row(name: str, previous: bool) -> dict:
    """One export (or the previous code's), measured in a fresh process after a warm-up run."""
    model, ids = setup()
    if name == EXPORTS[0]:
        x = llm_model.sequences(ids["train"], n=1, seed=7)
        found = gp.search(model, {"params": "50%"}, [x], plain_loss, example_input=x, uniform=True,
                          show_progress=False)
        keep = dict(found.keep)
        fn = (lambda: old_export_model(found.analysis, keep, True)) if previous else \
            (lambda: export_model(found.analysis, keep, True))
    else:
        rmap, half = residual_map(model), torch.arange(0, model.config.hidden_size, 2)
        fn = (lambda: old_export_hidden(rmap, half)) if previous else (lambda: export_hidden(rmap, half))
    measure(fn)  # warm-up
    mib, size = measure(fn)
    return {"export": name, "previous_code": previous, "export_mib": size / 2**20, "peak_increase_mib": mib}


def child(spec: list, mmap: bool) -> dict:
    env = dict(os.environ)
    if mmap:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    else:
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
    out = subprocess.run([sys.executable, __file__, "--row", json.dumps(spec)], env=env, check=True,
                         capture_output=True, text=True).stdout
    row = json.loads(out.strip().splitlines()[-1])
    print(("mmap64k " if mmap else "default ") + json.dumps(row), flush=True)
    return row


def both_mallocs(spec: list) -> dict:
    """A scoring row measured with the default malloc, with the mmap64k figures added."""
    r, f = child(spec, mmap=False), child(spec, mmap=True)
    r["meets_goal"] = None if r["peak_increase_mib"] is None else r["peak_increase_mib"] <= r["goal_mib"]
    r["peak_increase_mib_mmap64k"] = f["peak_increase_mib"]
    r["meets_goal_mmap64k"] = None if f["peak_increase_mib"] is None else \
        f["peak_increase_mib"] <= r["goal_mib"]
    r["seconds_mmap64k"] = f["seconds"]
    return r


SCALE_COMMAND = "OMP_NUM_THREADS=1 python benchmarks/llm_scoring_memory.py --scale 1b"
SCALE_BATCHES = (1, 4)
SCALE_N_BATCHES = 1


def scale_row(B: int, dtype_name: str) -> dict:
    """Gate scoring of a random-weight Llama-3.2-1B (``llm_scale``'s config) with the chunked loss
    and checkpointing, on ``SCALE_N_BATCHES`` batch(es) of ``B`` random sequences of ``T = 128``
    tokens; one unmeasured warm-up run first, as in ``scoring_row``."""
    import llm_scale

    torch.set_num_threads(1)
    model = llm_scale.dense_model().to(getattr(torch, dtype_name))
    cfg, T, loss_fn = model.config, 128, LOSSES["chunked"]
    W, L, h = nbytes(model), cfg.num_hidden_layers, cfg.hidden_size * model.dtype.itemsize
    gen = torch.Generator().manual_seed(7)
    data = list(torch.randint(0, cfg.vocab_size, (SCALE_N_BATCHES * B, T), generator=gen).split(B))
    analysis = find_groups(model, data[0][:1])
    a, rest = saved_bytes(model, analysis, data[0][:1], loss_fn)  # per token: the same for every B
    for p in model.parameters():
        p.requires_grad_(False)

    def run():
        gate_statistics(analysis, data, loss_fn, n_batches=SCALE_N_BATCHES, show_progress=False,
                        gradient_checkpointing=True)
    t0 = time.perf_counter()
    run()  # warm-up
    warm = time.perf_counter() - t0
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        run()
        secs = time.perf_counter() - t0
    return {"batch": B, "tokens": B * T, "dtype": dtype_name, "loss": "chunked", "checkpointing": True,
            "n_batches": SCALE_N_BATCHES, "peak_increase_mib": mem.delta_mib,
            "predicted_mib": B * T * (L * h + a + rest) / 2**20, "goal_mib": (0.5 * W + B * T * a) / 2**20,
            "half_weights_mib": 0.5 * W / 2**20, "a_per_token": a, "rest_per_token": rest,
            "h_per_token": h, "seconds": secs, "warmup_seconds": warm, "weights_mib": W / 2**20,
            "layers": L, "seq_len": T, "vocab": cfg.vocab_size, "hidden": cfg.hidden_size}


def scale_main(dtypes: list[str]):
    prev = OUT / "llm_scoring_memory_1b.json"  # rows of other dtypes from an earlier run are kept
    rows = [r for r in json.loads(prev.read_text())["rows"] if r["dtype"] not in dtypes] if prev.exists() else []
    for dtype_name in dtypes:
        for B in SCALE_BATCHES:
            rows.append(both_mallocs(["scale", B, dtype_name]))
            result = {"rows": rows, "command": SCALE_COMMAND, "torch": torch.__version__,
                      "model": "random-weight LlamaForCausalLM, Llama-3.2-1B config (benchmarks/llm_scale.py)",
                      "machine": "2 shared CPU cores (other jobs running), 1 thread; every figure "
                                 "measured in a fresh process"}
            OUT.mkdir(exist_ok=True)  # written after every row: a cut run keeps the rows it finished
            (OUT / "llm_scoring_memory_1b.json").write_text(json.dumps(result, indent=1))
            (OUT / "llm_scoring_memory_1b.md").write_text(scale_markdown(result))


def fmt(v) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def yes(v) -> str:
    return "n/a" if v is None else ("yes" if v else "no")


def scale_markdown(result) -> str:
    r0 = result["rows"][0]
    lines = ["# Gate-scoring peak memory on a random-weight Llama-3.2-1B", "",
             f"`{result['command']}`. {result['model']}: L = {r0['layers']} layers, hidden size "
             f"{r0['hidden']}, vocabulary {r0['vocab']}, T = {r0['seq_len']} tokens per sequence, "
             f"{r0['n_batches']} batch(es) after an unmeasured warm-up run; chunked loss "
             "`gp.causal_lm_loss()` and `gradient_checkpointing=True`. a = bytes autograd saves per token in "
             "one decoder layer, r = outside the layers, h = a layer input per token (see the script). "
             "Goal (issue #16): an increase over the resident weights of at most 0.5 W + B*T*a.", "",
             "| dtype | weights W MiB | batch B | a KiB/token | increase MiB (default malloc) | increase MiB "
             "(mmap 64 KiB) | formula B*T*(L*h + a + r) MiB | goal 0.5W + B*T*a MiB | meets goal "
             "(default / mmap) | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['dtype']} | {r['weights_mib']:.1f} | {r['batch']} | {r['a_per_token'] / 1024:.1f} | "
                     f"{fmt(r['peak_increase_mib'])} | {fmt(r.get('peak_increase_mib_mmap64k'))} | "
                     f"{r['predicted_mib']:.1f} | {r['goal_mib']:.1f} | "
                     f"{yes(r['meets_goal'])} / {yes(r.get('meets_goal_mmap64k'))} | {r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--row":  # one measurement, in this fresh process
        spec = json.loads(sys.argv[2])
        rows = {"scoring": scoring_row, "export": export_row, "scale": scale_row}
        print(json.dumps(rows[spec[0]](*spec[1:])))
        return
    if len(sys.argv) >= 3 and sys.argv[1] == "--scale":
        if sys.argv[2] != "1b":
            raise ValueError(f"--scale: only '1b' is known, got {sys.argv[2]!r}")
        scale_main(sys.argv[3:] or ["float32"])
        return
    rows, exports = [], []
    for B in (1, 8):
        for loss_name in LOSSES:
            for ckpt in (False, True):
                rows.append(both_mallocs(["scoring", B, loss_name, ckpt]))
    for name in EXPORTS:
        e = {"export": name}
        for previous in (False, True):
            for mmap in (False, True):
                got = child(["export", name, previous], mmap=mmap)
                if not previous:
                    e["export_mib"] = got["export_mib"]
                key = ("previous_code_" if previous else "") + "peak_increase_mib" + ("_mmap64k" if mmap else "")
                e[key] = got["peak_increase_mib"]
        exports.append(e)
    first = rows[0]
    result = {k: first[k] for k in ("weights_mib", "layers", "seq_len", "vocab", "hidden")}
    result.update({"rows": rows, "exports": exports, "command": COMMAND, "torch": torch.__version__,
                   "machine": "2 shared CPU cores (other jobs running), 1 thread; every figure "
                              "measured in a fresh process"})
    OUT.mkdir(exist_ok=True)
    (OUT / "llm_scoring_memory.json").write_text(json.dumps(result, indent=1))
    (OUT / "llm_scoring_memory.md").write_text(markdown(result))


def markdown(result) -> str:
    rows = result["rows"]
    W = result["weights_mib"]
    by = {(r["loss"], r["batch"]): r for r in rows}
    lines = ["# Gate-scoring and export peak memory on the 6.3M LLaMA-GQA model", "",
             f"`{result['command']}`. Weights W = {W:.1f} MiB (fp32), L = {result['layers']} layers, "
             f"T = {result['seq_len']} tokens per sequence, vocabulary {result['vocab']}, hidden size "
             f"{result['hidden']}; h = {rows[0]['h_per_token'] / 1024:.1f} KiB per token (a layer input). "
             "Saved by autograd per token: a in one decoder layer, r outside the layers "
             f"(plain loss: a = {by['plain', 1]['a_per_token'] / 1024:.1f} KiB, "
             f"r = {by['plain', 1]['rest_per_token'] / 1024:.1f} KiB; chunked loss: "
             f"a = {by['chunked', 1]['a_per_token'] / 1024:.1f} KiB, "
             f"r = {by['chunked', 1]['rest_per_token'] / 1024:.1f} KiB). "
             "Goal (issue #16): peak <= 1.5 W + one layer's activations, i.e. an increase over the "
             "resident weights of at most 0.5 W + B*T*a.", "",
             "Measured: the resident-size increase, each in a fresh process, with glibc's default malloc and "
             "with MALLOC_MMAP_THRESHOLD_=65536 (freed blocks go back to the system; see the script).", "",
             "| batch B | loss | checkpointing | increase MiB (default malloc) | increase MiB (mmap 64 KiB) "
             "| saved-tensor formula MiB | formula | goal 0.5W + B*T*a MiB | meets goal (default / mmap) "
             "| seconds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = "B*T*(L*h + a + r)" if r["checkpointing"] else "B*T*(L*a + r)"
        lines.append(f"| {r['batch']} | {r['loss']} | {'yes' if r['checkpointing'] else 'no'} | "
                     f"{fmt(r['peak_increase_mib'])} | {fmt(r.get('peak_increase_mib_mmap64k'))} | "
                     f"{r['predicted_mib']:.1f} | {f} | {r['goal_mib']:.1f} | "
                     f"{yes(r['meets_goal'])} / {yes(r.get('meets_goal_mmap64k'))} | {r['seconds']:.1f} |")
    lines += ["", "Export: resident-memory increase while exporting (the model stays resident and "
              "unchanged); the least possible is the export's own size.", "",
              "| export | export size MiB | increase MiB (default / mmap 64 KiB) | previous code: increase "
              "MiB (default / mmap 64 KiB) |",
              "|---|---|---|---|"]
    for e in result["exports"]:
        lines.append(f"| {e['export']} | {e['export_mib']:.1f} | {fmt(e['peak_increase_mib'])} / "
                     f"{fmt(e.get('peak_increase_mib_mmap64k'))} | {fmt(e['previous_code_peak_increase_mib'])} / "
                     f"{fmt(e.get('previous_code_peak_increase_mib_mmap64k'))} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
