"""PyTorch Lightning callbacks for gradual pruning and sparse training (optional dependency).

    import lightning as L
    from gradprune.integrations.lightning import PruningCallback
    trainer = L.Trainer(max_steps=1000, callbacks=[PruningCallback(gp.PruneConfig(
        criterion="snip_momentum", pattern="4x1", target_sparsity=0.8, end_step=800, frequency=50))])
    trainer.fit(module, loader)

Scores are updated in Lightning's ``on_before_optimizer_step`` (gradients unscaled and clipped);
masks are re-applied by a removable post-step hook on the optimizer, so exactly once per real
optimizer step (gradient accumulation and AMP-skipped steps included). ``SparseTrainingCallback``
uses :meth:`gradprune.SparseTrainer.before_optimizer_step`: on a connectivity update it sets every
gradient to ``None`` so the optimizer step that follows changes nothing.
"""

from __future__ import annotations

from ..config import PruneConfig
from ..prune import make_config
from ..pruner import Pruner
from ..sparse_training import SparseConfig, SparseTrainer

__all__ = ["PruningCallback", "SparseTrainingCallback"]

try:
    from lightning.pytorch.callbacks import Callback as _Base
except ImportError:  # pragma: no cover - depends on the environment
    try:
        from pytorch_lightning.callbacks import Callback as _Base
    except ImportError:
        _Base = object


def _single_optimizer(trainer):
    opts = trainer.optimizers
    if len(opts) != 1:
        raise ValueError(f"gradprune's Lightning callbacks need exactly one optimizer, got {len(opts)}")
    return opts[0]


class _Base2(_Base):
    def __init__(self):
        if _Base is object:
            raise ImportError("the Lightning callbacks need lightning: pip install lightning")
        self._handle = None

    def on_train_end(self, trainer, pl_module):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


class PruningCallback(_Base2):
    """Gradual pruning (:class:`gradprune.Pruner`) in a Lightning ``Trainer``; ``callback.pruner``."""

    def __init__(self, config: PruneConfig | None = None, **fields):
        super().__init__()
        self.config = make_config(config, fields)
        self.pruner: Pruner | None = None

    def on_train_start(self, trainer, pl_module):
        optimizer = _single_optimizer(trainer)
        self.pruner = Pruner(pl_module, self.config, optimizer=optimizer)
        self._handle = optimizer.register_step_post_hook(lambda *a: self.pruner.on_after_optimizer_step())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.pruner.on_step_begin()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.pruner.on_before_optimizer_step()

    def state_dict(self):
        return {} if self.pruner is None else self.pruner.state_dict()


class SparseTrainingCallback(_Base2):
    """Dynamic sparse training (:class:`gradprune.SparseTrainer`) in a Lightning ``Trainer``."""

    def __init__(self, config: SparseConfig):
        super().__init__()
        if not isinstance(config, SparseConfig):
            raise TypeError(f"config must be a SparseConfig, got {type(config).__name__}")
        self.config = config
        self.sparse: SparseTrainer | None = None

    def on_train_start(self, trainer, pl_module):
        optimizer = _single_optimizer(trainer)
        self.sparse = SparseTrainer(pl_module, optimizer, self.config)
        self._handle = optimizer.register_step_post_hook(lambda *a: self.sparse.after_optimizer_step())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.sparse.before_optimizer_step()

    def on_train_epoch_end(self, trainer, pl_module):
        if self.config.update_on == "epoch":
            self.sparse.on_epoch_end()

    def state_dict(self):
        return {} if self.sparse is None else self.sparse.state_dict()
