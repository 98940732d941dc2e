"""gradprune under DistributedDataParallel: gradual pruning, sparse training and one-shot pruning.

One machine, 2 processes (CPU, gloo):
    torchrun --standalone --nproc_per_node 2 examples/distributed_ddp.py
Two machines (see docs/distributed.md).
"""

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import gradprune as gp
from gradprune.integrations.distributed import check_masks_in_sync


def build_model() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def loss_fn(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def main(epochs: int = 2) -> dict:
    if not dist.is_initialized():
        dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT ("nccl" on GPUs)
    rank, world = dist.get_rank(), dist.get_world_size()

    # the same data on every rank; DistributedSampler gives each rank its own shard of every epoch
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(256, 8, generator=gen), torch.randint(0, 4, (256,), generator=gen))
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=16, sampler=sampler)  # 16 per rank, 16 * world per step

    # 1. gradual pruning: the usual Pruner hooks around a DDP model (DDP averages the gradients)
    torch.manual_seed(0)  # the same seed on every rank (DDP also broadcasts rank 0's weights)
    model = DDP(build_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner = gp.Pruner(model, gp.PruneConfig(criterion="snip_momentum", pattern="4x1", target_sparsity=0.5,
                                             start_step=0, end_step=8, frequency=2), optimizer=opt)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for x, y in loader:
            pruner.on_step_begin()
            opt.zero_grad()
            loss_fn(model, (x, y)).backward()
            pruner.on_before_optimizer_step()
            opt.step()
            pruner.on_after_optimizer_step()
    gradual = check_masks_in_sync(pruner.masks)  # raises MasksOutOfSyncError if ranks disagree

    # 2. sparse training (RigL): trainer.step() replaces opt.step()
    torch.manual_seed(0)
    model = DDP(build_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    trainer = gp.SparseTrainer(model, opt, gp.SparseConfig.rigl(density=0.3, total_steps=16, update_interval=4))
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model, (x, y)).backward()
            trainer.step()
    sparse = check_masks_in_sync(trainer.masks)

    # 3. one-shot pruning: each rank scores its shard of every batch; gradients are averaged
    torch.manual_seed(0)
    model = DDP(build_model())
    result = gp.prune(model, criterion="snip", sparsity=0.75, pattern="4x1", data=loader,
                      loss_fn=loss_fn, n_batches=4)
    oneshot = check_masks_in_sync(result.masks)

    if rank == 0:
        print(f"gradual: sparsity {pruner.masks.sparsity():.2f}; sparse training: "
              f"{trainer.updates} updates, density {1 - trainer.masks.sparsity():.2f}; one-shot: "
              f"sparsity {result.masks.sparsity():.2f} from {result.batches} batches of {16 * world}")
    return {"digests": (gradual, sparse, oneshot), "sparsity": pruner.masks.sparsity(),
            "updates": trainer.updates, "batches": result.batches}


if __name__ == "__main__":
    main()
    dist.barrier()  # every rank is done with its collectives before the group goes away
    dist.destroy_process_group()
