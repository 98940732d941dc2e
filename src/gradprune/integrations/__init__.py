"""Layer 9: integrations with the tools users already run. Each submodule imports its optional
dependency lazily, so ``import gradprune`` never needs them:

- :mod:`gradprune.integrations.distributed` — ``torch.distributed`` (DDP, FSDP1), mask checks;
- :mod:`gradprune.integrations.hf` — Hugging Face ``Trainer`` callbacks;
- :mod:`gradprune.integrations.lightning` — PyTorch Lightning callbacks;
- :mod:`gradprune.integrations.safetensors` — masks and selections as safetensors files.
"""
