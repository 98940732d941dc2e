"""Lightning callbacks on CPU with a tiny LightningModule."""

import pytest
import torch
from torch import nn

import gradprune as gp

L = pytest.importorskip("lightning", reason="optional dependency lightning not installed")
from gradprune.integrations.lightning import PruningCallback, SparseTrainingCallback  # noqa: E402


class Tiny(L.LightningModule):
    def __init__(self, opt="adam"):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
        self.opt = opt

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        if self.opt == "sgd":
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def _loader():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 8, generator=g), torch.randint(0, 3, (96,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


def _trainer(steps, cb, **kw):
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=[cb], **kw)


def test_lightning_pruning_callback_counts_optimizer_steps(tmp_path):
    module = Tiny()
    cb = PruningCallback(criterion="snip_momentum", pattern="4x1", target_sparsity=0.75,
                         start_step=0, end_step=8, frequency=2)
    _trainer(10, cb, accumulate_grad_batches=2, default_root_dir=str(tmp_path)).fit(module, _loader())
    assert cb.pruner.step == 10                      # optimizer steps (20 micro-batches)
    assert cb.pruner.masks.sparsity() == 0.75
    params = dict(module.named_parameters())
    for n, m in cb.pruner.masks.items():
        assert torch.all(params[n].detach()[~m] == 0)
    assert cb._handle is None                         # the optimizer hook was removed at the end


def test_lightning_sparse_training_callback_keeps_exact_counts(tmp_path):
    module = Tiny("sgd")
    cb = SparseTrainingCallback(gp.SparseConfig.set(density=0.25, total_steps=24, update_interval=6))
    counts = {}

    class Record(L.Callback):
        def on_train_start(self, trainer, pl_module):
            counts.update({n: int(m.sum()) for n, m in cb.sparse.masks.items()})

    L.Trainer(max_steps=24, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[cb, Record()], default_root_dir=str(tmp_path)).fit(module, _loader())
    assert cb.sparse.step_count == 24 and cb.sparse.updates == 2   # steps 6 and 12 (< end_step 18)
    assert {n: int(m.sum()) for n, m in cb.sparse.masks.items()} == counts
    params = dict(module.named_parameters())
    for n, m in cb.sparse.masks.items():
        assert torch.all(params[n].detach()[~m] == 0)
