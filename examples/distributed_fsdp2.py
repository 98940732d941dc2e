# torchrun --standalone --nproc_per_node 2
"""gradprune under FSDP2 (``fully_shard``): gradual pruning, sparse training (SNFS: momentum growth
and redistribution), one-shot pruning and a sharded checkpoint, on the sharded model as it is.

One machine, 2 processes (CPU, gloo; NCCL where there are GPUs):
    torchrun --standalone --nproc_per_node 2 examples/distributed_fsdp2.py
"""

import os
import shutil
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
from torch.distributed.fsdp import fully_shard

import gradprune as gp
from gradprune.integrations.distributed import Checkpointable


def build_model(device: torch.device) -> nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)).to(device)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)  # each parameter becomes a DTensor sharded on dim 0
    fully_shard(model)
    return model


def batches(rank: int, device: torch.device, steps: int = 12):
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    return [(torch.randn(16, 8, generator=gen).to(device), torch.randint(0, 4, (16,), generator=gen).to(device))
            for _ in range(steps)]


def loss_fn(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def main() -> dict:
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")  # torchrun sets the rest
    rank = dist.get_rank()
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)

    # 1. gradual pruning: the Pruner takes the sharded model; each rank keeps its rows' masks
    model = build_model(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner = gp.Pruner(model, gp.PruneConfig(criterion="snip_momentum", pattern="4x1", scope="global",
                                             target_sparsity=0.5, start_step=0, end_step=8, frequency=2),
                       optimizer=opt)
    for batch in batches(rank, device):
        pruner.on_step_begin()
        opt.zero_grad()
        loss_fn(model, batch).backward()
        pruner.on_before_optimizer_step()
        opt.step()
        pruner.on_after_optimizer_step()

    # 2. sparse training with SNFS (reads the optimizer's momentum, sharded like the weights)
    model = build_model(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    trainer = gp.SparseTrainer(model, opt, gp.SparseConfig.snfs(density=0.3, total_steps=12, update_interval=3))
    for batch in batches(rank, device):
        opt.zero_grad()
        loss_fn(model, batch).backward()
        trainer.step()

    # 3. a sharded checkpoint through torch.distributed.checkpoint: model, optimizer and trainer
    path = [tempfile.mkdtemp() if rank == 0 else None]
    dist.broadcast_object_list(path, src=0)  # one directory for every rank
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt),
             "sparse": Checkpointable(trainer)}
    dcp.save(state, checkpoint_id=path[0])
    fresh = build_model(device)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    resumed = gp.SparseTrainer(fresh, fresh_opt, gp.SparseConfig.snfs(density=0.3, total_steps=12, update_interval=3))
    dcp.load({"sparse": Checkpointable(resumed)}, checkpoint_id=path[0])  # masks, counters, generator
    same = all(torch.equal(a, b) for a, b in zip(resumed.masks.values(), trainer.masks.values()))
    dist.barrier()
    if rank == 0:
        shutil.rmtree(path[0])

    # 4. one-shot pruning to a global sparsity: FSDP2 averages the gradients of every rank's batches
    model = build_model(device)
    result = gp.prune(model, criterion="snip", sparsity=0.75, scope="global", data=batches(rank, device, 4),
                      loss_fn=loss_fn)

    # sparsities are over the whole weights (small all-reduces of per-rank counts)
    summary = {"gradual": pruner.masks.sparsity(), "density": 1 - trainer.masks.sparsity(),
               "updates": trainer.updates, "resumed": same, "oneshot": result.masks.sparsity()}
    if rank == 0:
        print(f"FSDP2 gradual: sparsity {summary['gradual']:.2f}; SNFS: {trainer.updates} updates, density "
              f"{summary['density']:.2f}, checkpoint resumed: {same}; one-shot: sparsity {summary['oneshot']:.2f}")
    return summary


if __name__ == "__main__":
    main()
    dist.barrier()  # every rank is done with its collectives before the group goes away
    dist.destroy_process_group()
