# torchrun --standalone --nproc_per_node 2
"""gradprune's Hugging Face callbacks, unchanged, in a ``transformers.Trainer`` under accelerate's
FSDP2 (``fsdp_version: 2``: ``fully_shard``, parameters are DTensors sharded on dim 0).

The masks are sharded like the weights; each checkpoint folder gets the pruner's state as a
``torch.distributed.checkpoint`` folder ``gradprune_state/`` (every rank writes its rows), and
``resume_from=`` continues from it, next to the Trainer's own sharded checkpoint.

    torchrun --standalone --nproc_per_node 2 examples/hf_trainer_fsdp2.py

On GPUs the Trainer runs accelerate's FSDP2 as configured. accelerate (1.16) enables FSDP only on
accelerators: on CPU it silently falls back to DDP, so on CPU (gloo) this script forces its FSDP2
path with ``CPUFSDPTrainer`` (a few lines; for trying it out and for the tests).
"""

import os
import shutil
import sys
import tempfile

import torch
import torch.distributed as dist
import transformers

import gradprune as gp
from gradprune.integrations.hf import STATE_DIR, PruningCallback, SparseTrainingCallback


class CPUFSDPTrainer(transformers.Trainer):
    """The Trainer with accelerate's FSDP plugin on CPU too (accelerate turns it off there)."""

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        state = self.accelerator.state
        if state.distributed_type == DistributedType.MULTI_CPU and self.args.fsdp_plugin_args is not None:
            state.distributed_type = DistributedType.FSDP
            state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            self.is_fsdp_enabled = True


def build_model():
    config = transformers.BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=2)
    torch.manual_seed(0)  # the same initial weights on every rank
    return transformers.BertForSequenceClassification(config)


def dataset(n=64):
    gen = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 60, (8,), generator=gen), "labels": torch.tensor(i % 2)}
            for i in range(n)]


def arguments(output_dir, steps):
    return transformers.TrainingArguments(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-3,
        save_strategy="steps", save_steps=4, logging_strategy="no", report_to=[], disable_tqdm=True, seed=0,
        use_cpu=not torch.cuda.is_available(),
        fsdp=True, fsdp_config={"fsdp_version": 2, "reshard_after_forward": True,
                                "transformer_layer_cls_to_wrap": ["BertLayer"],
                                "state_dict_type": "SHARDED_STATE_DICT"})


def train(callback, output_dir, steps=8, resume=None):
    trainer_cls = transformers.Trainer if torch.cuda.is_available() else CPUFSDPTrainer
    trainer = trainer_cls(model=build_model(), args=arguments(output_dir, steps), train_dataset=dataset(),
                          callbacks=[callback])
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def local_masks(masks):
    return {n: m.detach().cpu().clone() for n, m in masks.items()}


def main() -> dict:
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")  # torchrun sets the rest
    rank = dist.get_rank()
    out = [tempfile.mkdtemp() if rank == 0 else None]
    dist.broadcast_object_list(out, src=0)  # one output folder for every rank
    config = gp.PruneConfig(criterion="snip_momentum", pattern="4x1", target_sparsity=0.5, start_step=0,
                            end_step=6, frequency=2, include=["bert.encoder.*"])

    # 1. gradual pruning: the callback hands the fully_shard-ed model to gp.Pruner as it is
    pruning = PruningCallback(config)
    trainer = train(pruning, out[0])
    sharded = type(next(trainer.model.parameters())).__name__ == "DTensor"
    ckpt = os.path.join(out[0], "checkpoint-4")
    saved = os.path.isdir(os.path.join(ckpt, STATE_DIR))

    # 2. resume from the checkpoint at step 4: the pruner's state comes from gradprune_state/
    resumed = PruningCallback(config, resume_from=ckpt)
    train(resumed, os.path.join(out[0], "resumed"), resume=ckpt)
    same = all(torch.equal(a, b) for a, b in zip(local_masks(resumed.pruner.masks).values(),
                                                 local_masks(pruning.pruner.masks).values()))

    # 3. sparse training (SNFS: momentum growth and redistribution; the momentum is sharded too)
    sparse = SparseTrainingCallback(gp.SparseConfig.snfs(density=0.3, total_steps=8, update_interval=2,
                                                         include=["bert.encoder.*"]))
    train(sparse, os.path.join(out[0], "snfs"))

    summary = {"sharded": sharded, "saved": saved, "resumed": same, "step": resumed.pruner.step,
               "sparsity": pruning.pruner.masks.sparsity(), "updates": sparse.sparse.updates,
               "density": 1 - sparse.sparse.masks.sparsity()}  # sparsities: collectives
    dist.barrier()
    if rank == 0:
        shutil.rmtree(out[0])
        print(f"HF Trainer FSDP2: sharded {sharded}; gradual: sparsity {summary['sparsity']:.2f}, state saved "
              f"{saved}, resumed {same} at step {summary['step']}; SNFS: {summary['updates']} updates, "
              f"density {summary['density']:.2f}")
    return summary


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    if dist.is_initialized():  # a clean exit: no gloo threads left running at interpreter teardown
        dist.barrier()
        dist.destroy_process_group()
