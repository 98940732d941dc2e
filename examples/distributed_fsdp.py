"""gradprune under FSDP (use_orig_params=True): gradual pruning and RigL sparse training.

One machine, 2 processes (CPU, gloo):
    torchrun --standalone --nproc_per_node 2 examples/distributed_fsdp.py
"""

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

import gradprune as gp
from gradprune.integrations.distributed import FSDPPruner, FSDPSparseTrainer, check_masks_in_sync


def build_fsdp_model() -> FSDP:
    torch.manual_seed(0)  # the same initial weights on every rank
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    return FSDP(model, use_orig_params=True, device_id=device, auto_wrap_policy=ModuleWrapPolicy({nn.Linear}))


def batches(rank: int, steps: int = 12):
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    return [(torch.randn(16, 8, generator=gen), torch.randint(0, 4, (16,), generator=gen)) for _ in range(steps)]


def main() -> dict:
    if not dist.is_initialized():
        dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT
    rank = dist.get_rank()

    # gradual pruning: build the pruner from the FSDP model; the three hooks as usual
    model = build_fsdp_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # after wrapping
    pruner = FSDPPruner(model, gp.PruneConfig(criterion="snip_momentum", pattern="4x1", target_sparsity=0.5,
                                              start_step=0, end_step=8, frequency=2), optimizer=opt)
    for x, y in batches(rank):
        pruner.on_step_begin()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        pruner.on_before_optimizer_step()
        opt.step()
        pruner.on_after_optimizer_step()
    gradual = check_masks_in_sync(pruner.masks)

    # sparse training: trainer.step() replaces opt.step()
    model = build_fsdp_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    trainer = FSDPSparseTrainer(model, opt, gp.SparseConfig.rigl(density=0.3, total_steps=12, update_interval=3))
    for x, y in batches(rank):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        trainer.step()
    sparse = check_masks_in_sync(trainer.masks)

    with FSDP.summon_full_params(model):  # whole weights, e.g. to save them on rank 0
        zeros = sum(int((p == 0).sum()) for n, p in model.named_parameters() if n.endswith("weight"))
    if rank == 0:
        print(f"FSDP gradual: sparsity {pruner.masks.sparsity():.2f}; RigL: {trainer.updates} updates, "
              f"density {1 - trainer.masks.sparsity():.2f}, {zeros} zero weights")
    return {"digests": (gradual, sparse), "sparsity": pruner.masks.sparsity(), "updates": trainer.updates,
            "zeros": zeros, "kept": trainer.masks.count()}


if __name__ == "__main__":
    main()
    dist.barrier()  # every rank is done with its collectives before the group goes away
    dist.destroy_process_group()
