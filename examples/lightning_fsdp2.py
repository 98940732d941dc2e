# torchrun --standalone --nproc_per_node 2
"""gradprune's Lightning callbacks, unchanged, under Lightning's ``ModelParallelStrategy`` (FSDP2:
``fully_shard`` in ``configure_model``).

One machine, 2 processes (CPU, gloo; Lightning picks NCCL on GPUs with accelerator="auto"):
    torchrun --standalone --nproc_per_node 2 examples/lightning_fsdp2.py
"""

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, TensorDataset

import gradprune as gp
from gradprune.integrations.lightning import PruningCallback, SparseTrainingCallback


class Classifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)  # the same initial weights on every rank
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))

    def configure_model(self):  # FSDP2: each Linear's parameters become DTensors sharded on dim 0
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def fit(callback) -> None:
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(192, 8, generator=gen), torch.randint(0, 4, (192,), generator=gen))
    trainer = L.Trainer(accelerator="cpu", devices=2, max_steps=12, callbacks=[callback],
                        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(Classifier(), DataLoader(data, batch_size=8))  # Lightning adds a DistributedSampler


if __name__ == "__main__":
    pruning = PruningCallback(criterion="snip_momentum", target_sparsity=0.5, start_step=0, end_step=8, frequency=2)
    fit(pruning)
    sparse = SparseTrainingCallback(gp.SparseConfig.snfs(density=0.3, total_steps=12, update_interval=3))
    fit(sparse)
    gradual, density = pruning.pruner.masks.sparsity(), 1 - sparse.sparse.masks.sparsity()  # collectives
    if torch.distributed.get_rank() == 0:
        print(f"Lightning FSDP2 gradual: sparsity {gradual:.2f}; SNFS: {sparse.sparse.updates} updates, "
              f"density {density:.2f}")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()  # a clean exit: no gloo threads left running at teardown
