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
checkpoint folder) restores it. On a ``fully_shard``-ed model (accelerate's ``fsdp_version: 2``)
the masks are sharded: ``on_save`` then writes a ``torch.distributed.checkpoint`` folder
``gradprune_state/`` instead, every rank its own rows (a collective, as the Trainer's own sharded
save is), which ``resume_from=`` loads on any world size (see ``docs/distributed.md``). The ``Trainer`` loads the model's weights and the optimizer's state
before ``on_train_begin`` builds the pruner or sparse trainer; ``load_state_dict`` then puts back
what the fresh initial masks zeroed, so the run continues exactly (see ``docs/resume.md``).

Recovery by distillation inside ``Trainer``: :class:`DistillTrainer` computes the loss of
:func:`gradprune.distill` (logit KL, hidden states, hard labels) in ``compute_loss`` (see
``docs/distill.md``).
"""

from __future__ import annotations

import os

import torch

from .._io import atomic_write, load_torch
from ..config import PruneConfig
from ..distill import DistillConfig, DistillLoss, check_teacher
from ..masks import MaskSet
from ..prune import make_config
from ..pruner import Pruner
from ..sparse_training import SparseConfig, SparseTrainer

__all__ = ["PruningCallback", "SparseTrainingCallback", "DistillTrainer", "STATE_FILE", "STATE_DIR"]

STATE_FILE = "gradprune_state.pt"
STATE_DIR = "gradprune_state"  # a torch.distributed.checkpoint folder: the state of a sharded (FSDP2) run

try:  # the callbacks subclass TrainerCallback when transformers is installed
    from transformers import TrainerCallback as _Base
except ImportError:  # pragma: no cover - depends on the environment
    _Base = object

try:
    from transformers import Trainer as _Trainer
except ImportError:  # pragma: no cover - depends on the environment
    _Trainer = object


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
        if resume_from is not None and not (os.path.isfile(os.path.join(resume_from, STATE_FILE))
                                            or os.path.isdir(os.path.join(resume_from, STATE_DIR))):
            raise FileNotFoundError(f"resume_from has no {STATE_FILE} (nor a {STATE_DIR}/ folder of a "
                                    f"sharded run): {resume_from}")
        self.resume_from = resume_from

    def _restore(self, engine) -> None:
        if self.resume_from is None:
            return
        from .distributed import is_sharded, load_sharded_state

        folder = os.path.join(self.resume_from, STATE_DIR)
        if os.path.isdir(folder):
            load_sharded_state(engine, folder)
        elif is_sharded(engine):
            raise ValueError(f"resume_from {self.resume_from!r} holds {STATE_FILE}, the whole masks of an "
                             f"unsharded run; a fully_shard-ed (FSDP2) run resumes from the {STATE_DIR}/ "
                             "folder that a sharded run writes")
        else:
            engine.load_state_dict(load_torch(os.path.join(self.resume_from, STATE_FILE)))

    def _save(self, engine, args, state) -> None:
        if engine is None:
            return
        from .distributed import is_sharded, save_sharded_state

        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if is_sharded(engine):  # every rank writes its own rows (DCP creates the folders)
            save_sharded_state(engine, os.path.join(folder, STATE_DIR))
        elif os.path.isdir(folder):
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



class _KeepMasks(_Base):
    """Zero the masked weights (and their optimizer state) after every optimizer step."""

    def __init__(self, masks: MaskSet):
        self.masks = masks

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.masks.apply(_unwrap(optimizer) if optimizer is not None else None)

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.masks.apply(_unwrap(optimizer) if optimizer is not None else None)


class DistillTrainer(_Trainer):
    """A ``transformers.Trainer`` whose loss is the distillation loss of :func:`gradprune.distill`.

    Args:
        teacher: the reference model: put in eval mode, run under ``torch.no_grad()`` on the device
            its parameters are on (the Trainer does not move it), never updated.
        distill_config: a :class:`~gradprune.DistillConfig` (or a dict of its fields); default:
            logit KL at temperature 1.
        masks: a :class:`~gradprune.MaskSet` of the student: its gradients are masked after each
            backward pass (before clipping) and its weights after each optimizer step.
        other arguments: those of ``Trainer`` (``model`` is the student).

    The loss is a mean over a micro-batch's tokens; the Trainer divides it by the gradient
    accumulation steps. A hidden-state loss needs equal widths here (the projection for pruned
    widths is trained by :func:`gradprune.distill` only). Example::

        trainer = DistillTrainer(model=small, teacher=model, args=args, train_dataset=ds,
                                 distill_config=gp.DistillConfig(temperature=2.0))
        trainer.train()
    """

    def __init__(self, *args, teacher, distill_config: DistillConfig | dict | None = None,
                 masks: MaskSet | None = None, **kwargs):
        if _Trainer is object:
            raise ImportError("DistillTrainer needs transformers: pip install 'gradprune[hf]'")
        model = kwargs.get("model", args[0] if args else None)
        check_teacher(model, teacher)
        if isinstance(distill_config, dict):
            distill_config = DistillConfig.from_dict(distill_config)
        elif distill_config is None:
            distill_config = DistillConfig()
        elif not isinstance(distill_config, DistillConfig):
            raise TypeError(f"distill_config must be a DistillConfig or a dict, got {type(distill_config).__name__}")
        loss = DistillLoss(model, teacher, distill_config)
        if len(loss.projections):
            raise ValueError(f"hidden_states widths differ (student, teacher: {loss.widths}); DistillTrainer "
                             "compares equal widths only: use gradprune.distill, which trains a projection, "
                             "or choose hidden states of equal width")
        if masks is not None and (not isinstance(masks, MaskSet) or masks.model is not model):
            raise ValueError("masks must be a gradprune.MaskSet of the student (the Trainer's model)")
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval()
        self.distill_config = distill_config
        self.distill_loss = loss
        self.masks = masks
        self.loss_is_scaled_for_ga = False  # a mean per micro-batch: the Trainer divides by the steps
        if masks is not None:
            self.add_callback(_KeepMasks(masks))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.teacher.eval()
        loss, parts, outputs = self.distill_loss(model, self.teacher, inputs)
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.masks is not None:
            self.masks.apply_to_grads()
        return loss
