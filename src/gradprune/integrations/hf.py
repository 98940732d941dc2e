"""Hugging Face ``transformers`` integration: ``Trainer`` callbacks for gradual pruning and sparse
training, and saving pruned models.

Gradual pruning inside ``Trainer`` (the optimizer steps, gradient accumulation, AMP and
checkpointing stay the Trainer's)::

    from gradprune.integrations.hf import PruningCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[PruningCallback(gp.PruneConfig(criterion="snip_momentum",
                                 pattern="4x1", target_sparsity=0.8, end_step=1000, frequency=100))])
    trainer.train()
    model.save_pretrained("pruned")   # pruned weights are exactly 0: masks are folded in

Sparse training from scratch: ``SparseTrainingCallback(gp.SparseConfig.rigl(density=0.1,
total_steps=args.max_steps))``. On a connectivity update the callback sets every gradient to
``None`` before the Trainer's ``optimizer.step()``, so that step changes nothing: the update
replaces it, as in RigL.

The callbacks use ``on_step_begin``, ``on_pre_optimizer_step`` (after gradient clipping, which
also unscales AMP gradients) and ``on_optimizer_step``; ``on_save`` writes the pruner's or sparse
trainer's state (``gradprune_state.pt``) into each checkpoint folder, and ``resume_from=`` (a
checkpoint folder) restores it. The ``Trainer`` loads the model's weights and the optimizer's state
before ``on_train_begin`` builds the pruner or sparse trainer; ``load_state_dict`` then puts back
what the fresh initial masks zeroed, so the run continues exactly (see ``docs/resume.md``).
"""

from __future__ import annotations

import os

import torch

from .._io import atomic_write, load_torch
from ..config import PruneConfig
from ..prune import make_config
from ..pruner import Pruner
from ..sparse_training import SparseConfig, SparseTrainer

__all__ = ["PruningCallback", "SparseTrainingCallback", "STATE_FILE"]

STATE_FILE = "gradprune_state.pt"

try:  # the callbacks subclass TrainerCallback when transformers is installed
    from transformers import TrainerCallback as _Base
except ImportError:  # pragma: no cover - depends on the environment
    _Base = object


def _unwrap(optimizer):
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (or the optimizer itself)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if not isinstance(inner, torch.optim.Optimizer):
        raise TypeError(f"expected a torch optimizer from the Trainer, got {type(optimizer).__name__}")
    return inner


class _StatefulCallback(_Base):
    def __init__(self, resume_from: str | None = None):
        if _Base is object:
            raise ImportError("the Hugging Face callbacks need transformers: pip install 'gradprune[hf]'")
        if resume_from is not None and not os.path.isfile(os.path.join(resume_from, STATE_FILE)):
            raise FileNotFoundError(f"resume_from has no {STATE_FILE}: {resume_from}")
        self.resume_from = resume_from

    def _restore(self, engine) -> None:
        if self.resume_from is not None:
            engine.load_state_dict(load_torch(os.path.join(self.resume_from, STATE_FILE)))

    def _save(self, engine, args, state) -> None:
        if engine is None:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder):
            atomic_write(os.path.join(folder, STATE_FILE), lambda t: torch.save(engine.state_dict(), t))


class PruningCallback(_StatefulCallback):
    """Gradual pruning (:class:`gradprune.Pruner`) inside a ``transformers.Trainer``.

    Args:
        config: a :class:`~gradprune.PruneConfig` (keyword ``fields`` override or build it).
        resume_from: a checkpoint folder holding ``gradprune_state.pt`` to continue from.

    ``callback.pruner`` is the :class:`~gradprune.Pruner` once training has begun.
    """

    def __init__(self, config: PruneConfig | None = None, *, resume_from: str | None = None, **fields):
        super().__init__(resume_from)
        self.config = make_config(config, fields)
        if self.config.effective_target() is None:
            raise ValueError("PruningCallback needs target_sparsity (or an N:M pattern)")
        self.pruner: Pruner | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.pruner = Pruner(model, self.config, optimizer=_unwrap(optimizer) if optimizer is not None else None)
        self._restore(self.pruner)

    def on_step_begin(self, args, state, control, **kwargs):
        self.pruner.on_step_begin()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.pruner.on_before_optimizer_step()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.pruner.on_after_optimizer_step()

    def on_save(self, args, state, control, **kwargs):
        self._save(self.pruner, args, state)


class SparseTrainingCallback(_StatefulCallback):
    """Dynamic sparse training (:class:`gradprune.SparseTrainer`) inside a ``transformers.Trainer``.

    ``callback.sparse`` is the :class:`~gradprune.SparseTrainer` once training has begun.
    """

    def __init__(self, config: SparseConfig, *, resume_from: str | None = None):
        super().__init__(resume_from)
        if not isinstance(config, SparseConfig):
            raise TypeError(f"config must be a SparseConfig, got {type(config).__name__}")
        self.config = config
        self.sparse: SparseTrainer | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if optimizer is None:
            raise ValueError("SparseTrainingCallback needs the Trainer's optimizer at on_train_begin")
        self.sparse = SparseTrainer(model, _unwrap(optimizer), self.config)
        self._restore(self.sparse)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.sparse.before_optimizer_step()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.sparse.after_optimizer_step()

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.config.update_on == "epoch":
            self.sparse.on_epoch_end()

    def on_save(self, args, state, control, **kwargs):
        self._save(self.sparse, args, state)

