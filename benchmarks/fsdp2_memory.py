"""Per-rank peak memory of gradprune's steps on a FSDP2 (``fully_shard``) model, on CPU (gloo).

Each rank measures, around one step of each workflow, its peak resident memory above the resident
memory just before the step (``VmHWM`` reset through ``/proc/self/clear_refs``, minus ``VmRSS``).
glibc is told to map every allocation above 64 KiB on its own (``MALLOC_MMAP_THRESHOLD_=65536``),
so a freed tensor leaves the resident set at once and the peak follows the live tensors. The
same step without gradprune (FSDP2's own forward/backward all-gathers, activations, gradients and
the optimizer step) is measured in the same process as the baseline. Figures are compared with the
model's whole size (what gathering every parameter would cost, before gradients and scores) and
with the size of this rank's shard.

    OMP_NUM_THREADS=1 python benchmarks/fsdp2_memory.py     # runs torchrun with 2, then 4 processes

Writes benchmarks/results/fsdp2_memory.json and .md. The machine may be shared: memory
figures do not depend on load, timings are not reported.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
WIDTH, DEPTH, BATCH, REPEATS = 1024, 6, 64, 3
MIB = 1024 * 1024


def _kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_mib(step) -> float:
    """Peak resident memory during ``step()`` above the resident memory before it, in MiB."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM to the current VmRSS
    before = _kib("VmRSS")
    step()
    return (_kib("VmHWM") - before) / 1024


def _worker() -> None:
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    sys.path.insert(0, os.path.join(ROOT, "src"))
    import gradprune as gp
    from gradprune._distributed import local

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    def build():
        torch.manual_seed(0)
        layers = []
        for _ in range(DEPTH):
            layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
        model = nn.Sequential(*layers, nn.Linear(WIDTH, 16))
        for m in model:
            if isinstance(m, nn.Linear):
                fully_shard(m)
        fully_shard(model)
        return model

    gen = torch.Generator().manual_seed(rank)
    batches = [(torch.randn(BATCH, WIDTH, generator=gen), torch.randint(0, 16, (BATCH,), generator=gen))
               for _ in range(REPEATS + 2)]

    def loss(model, batch):
        return nn.functional.cross_entropy(model(batch[0]), batch[1])

    def measure(model, opt, step) -> list:
        for batch in batches[:2]:  # warm: gradients and optimizer state exist, as in a long run
            step(model, opt, batch)
        return [_peak_mib(lambda: step(model, opt, b)) for b in batches[2:]]

    out = {}
    model = build()
    full = sum(p.numel() * p.element_size() for p in model.parameters()) / MIB
    shard = sum(local(p.detach()).numel() * p.element_size() for p in model.parameters()) / MIB
    layer = max(p.numel() * p.element_size() for p in model.parameters()) / MIB
    out["sizes_mib"] = {"whole_model": full, "this_rank_shard": shard, "largest_whole_parameter": layer}

    def dense(model, opt, batch):
        opt.zero_grad()
        loss(model, batch).backward()
        opt.step()

    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    out["dense_step"] = measure(model, opt, dense)

    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    before = _kib("VmRSS")
    pruner = gp.Pruner(model, gp.PruneConfig(criterion="snip_momentum", scope="global", target_sparsity=0.9,
                                             start_step=0, end_step=1000, frequency=1), optimizer=opt)
    out["pruner_resident"] = (_kib("VmRSS") - before) / 1024

    def pruned(model, opt, batch):
        pruner.on_step_begin()
        opt.zero_grad()
        loss(model, batch).backward()
        pruner.on_before_optimizer_step()
        opt.step()
        pruner.on_after_optimizer_step()  # a prune event every step: a global selection

    out["pruner_step_prune_event"] = measure(model, opt, pruned)

    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    trainer = gp.SparseTrainer(model, opt, gp.SparseConfig.rigl(density=0.1, total_steps=1000, update_interval=1))

    def sparse(model, opt, batch):
        opt.zero_grad()
        loss(model, batch).backward()
        trainer.step()  # a connectivity update every step (drop and grow)

    out["rigl_update_step"] = measure(model, opt, sparse)

    fresh = [build() for _ in range(3)]  # a fresh model for each one-shot prune, built beforehand

    def one_shot():
        gp.prune(fresh.pop(), criterion="snip", sparsity=0.9, scope="global", data=batches[:2], loss_fn=loss)

    one_shot()
    out["one_shot_prune_global"] = [_peak_mib(one_shot)]
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(out, gathered, dst=0)
    if rank == 0:
        _write(gathered, world, torch.__version__)
    dist.barrier()
    dist.destroy_process_group()


PHASES = [("dense_step", "training step without gradprune (baseline)"),
          ("pruner_step_prune_event", "`Pruner` step with a global snip_momentum prune event"),
          ("rigl_update_step", "`SparseTrainer` RigL step with a connectivity update"),
          ("one_shot_prune_global", "`gp.prune` snip, global, 2 batches (masks created)")]
WORLDS = (2, 4)


def _write(per_rank: list, world: int, torch_version: str) -> None:
    os.makedirs(RESULTS, exist_ok=True)
    part = {"world_size": world, "torch": torch_version, "ranks": per_rank}
    with open(os.path.join(RESULTS, f".fsdp2_memory_world{world}.json"), "w") as fh:
        json.dump(part, fh)


def _summarise() -> None:
    parts = []
    for world in WORLDS:
        path = os.path.join(RESULTS, f".fsdp2_memory_world{world}.json")
        with open(path) as fh:
            parts.append(json.load(fh))
        os.remove(path)
    result = {"command": "OMP_NUM_THREADS=1 python benchmarks/fsdp2_memory.py",
              "model": f"{DEPTH} x Linear({WIDTH}, {WIDTH}) + Linear({WIDTH}, 16), fp32, fully_shard per Linear",
              "batch_per_rank": BATCH, "repeats": REPEATS,
              "method": "peak VmHWM minus VmRSS before the step (MiB), MALLOC_MMAP_THRESHOLD_=65536",
              "python": platform.python_version(), "runs": parts}
    with open(os.path.join(RESULTS, "fsdp2_memory.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    sizes = parts[0]["ranks"][0]["sizes_mib"]
    lines = ["# Per-rank peak memory of gradprune steps under FSDP2 (CPU, gloo)", "",
             f"`{result['command']}` (runs torchrun with {' and '.join(map(str, WORLDS))} processes; "
             f"{result['model']}; {BATCH} samples per rank and step; torch {parts[0]['torch']}; a shared 2-core machine: memory figures do not depend on load). Each figure is a rank's peak resident memory during one step above its resident memory just before it (VmHWM reset through /proc/self/clear_refs; glibc maps every allocation above 64 KiB on its own, so freed tensors leave the resident set).",
             "", f"Whole model: {sizes['whole_model']:.1f} MiB; largest whole parameter (what FSDP2 all-gathers "
             f"at a time): {sizes['largest_whole_parameter']:.1f} MiB.", "",
             f"Peak (MiB, max over the ranks, median of {REPEATS} steps; one for the one-shot prune), and its increase over the step without gradprune: in MiB, in shards of this rank, in whole models:", "",
             "| ranks | shard per rank (MiB) | step | peak | over baseline | in shards | in whole models |",
             "|---|---|---|---|---|---|---|"]
    whole = sizes["whole_model"]
    for part in parts:
        ranks = part["ranks"]
        shard = max(r["sizes_mib"]["this_rank_shard"] for r in ranks)
        base = [statistics.median(r["dense_step"]) for r in ranks]
        for key, text in PHASES:
            vals = [statistics.median(r[key]) for r in ranks]
            over = max(v - b for v, b in zip(vals, base))
            cells = ["—"] * 3 if key == "dense_step" else [f"{over:+.1f}", f"{over / shard:.2f}", f"{over / whole:.2f}"]
            lines.append(f"| {part['world_size']} | {shard:.1f} | {text} | {max(vals):.1f} | " + " | ".join(cells) + " |")
    lines += ["", "Resident memory a `Pruner` (snip_momentum) keeps once built: its bool masks and score statistics of this rank's rows: " + "; ".join(
                  f"{p['world_size']} ranks: {max(r['pruner_resident'] for r in p['ranks']):.1f} MiB" for p in parts)
              + ".", "", "A prune event or a connectivity update holds, for a moment, temporaries of this rank's rows only, never a whole parameter, gradient or score. A global selection (`gradprune/select.py`) copies no layer's scores: besides the masks it returns (a bool per unit, a quarter shard) it compares one chunk of 2^20 units at a time into a reused buffer (a layer at most a quarter free: a compact copy of its free scores, at most a quarter shard). Temporaries raise the step's peak only where they exceed FSDP2's own peak of the backward (whole per-layer all-gathers and reduce-scatter buffers, the same in the baseline). The RigL update here drops and grows layer by layer (`gradprune/sparse_training.py`, not the global selection). The one-shot prune peaks after its selection, while it applies the masks, with the score accumulators (one shard, float32) it created and its backward's gradients still held."]
    with open(os.path.join(RESULTS, "fsdp2_memory.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    if "RANK" in os.environ:
        _worker()
        return
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    for world in WORLDS:
        code = subprocess.call([torchrun, "--standalone", "--nproc_per_node", str(world), os.path.abspath(__file__)],
                               env=env)
        if code:
            sys.exit(code)
    _summarise()


if __name__ == "__main__":
    main()
