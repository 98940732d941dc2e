"""Integrations with the tools users already run (each submodule imports its optional dependency
lazily): :mod:`gradprune.integrations.distributed` for ``torch.distributed`` (DDP, FSDP)."""
