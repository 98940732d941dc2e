"""Activation checkpointing while scoring: each decoder layer's activations are recomputed in the
backward pass instead of being kept from the forward (``gradient_checkpointing=True`` of
:func:`~gradprune.structured.search` and :func:`~gradprune.structured.scoring.gate_statistics`).

Gate-gradient scoring keeps, without checkpointing, every activation autograd saves in every
layer until the backward reaches it: ``W + B*T*(L*a + c*V)`` bytes for a batch of ``B``
sequences of ``T`` tokens, with ``W`` the weight bytes (weights get no gradient and no optimizer
state), ``L`` layers saving ``a`` bytes per token each, and the logits' ``c*V`` bytes per token
(the logits, their log-softmax and its gradient). With checkpointing only each layer's input
(``h`` bytes per token, the hidden size in the model's dtype) is kept, plus one layer's saved
activations while it is recomputed: ``W + B*T*(L*h + a + c*V)``. The logits' term goes with
the chunked loss :func:`gradprune.causal_lm_loss` (:mod:`gradprune.structured.lm_loss`), which
builds one chunk of tokens' logits at a time: ``W + B*T*(L*h + a + r)`` with ``r`` about two
hidden vectors per token, plus one chunk's logits.

The decoder layers are found structurally (:func:`~gradprune.structured.depth.decoder_layers`);
their ``forward`` runs under :func:`torch.utils.checkpoint.checkpoint` (non-reentrant) while grad
is enabled, and the model's ``config.use_cache`` is off (a KV cache would be written twice).
Everything is restored on exit. Gate hooks inside a layer run again in the recomputation; their
second set of gates gets no gradient and adds nothing.

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> m = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16,
    ...                      num_hidden_layers=2, num_attention_heads=2)).eval()
    >>> ids = torch.randint(0, 16, (2, 5))
    >>> with checkpointed_layers(m):
    ...     loss = m(ids, labels=ids).loss
    >>> loss.backward()
    >>> m.model.layers[0].mlp.up_proj.weight.grad is not None, "forward" in vars(m.model.layers[0])
    (True, False)
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["checkpointed_layers"]


@contextmanager
def checkpointed_layers(model: nn.Module):
    """Recompute every decoder layer's activations in the backward pass (see the module docs)."""
    from .depth import decoder_layers

    _, layers = decoder_layers(model)
    saved = []
    for layer in layers:
        own = vars(layer).get("forward")  # an instance-level forward (e.g. an accelerate hook)
        fwd = layer.forward

        def run(*args, _fwd=fwd, **kwargs):
            if not torch.is_grad_enabled():
                return _fwd(*args, **kwargs)
            return checkpoint(_fwd, *args, use_reentrant=False, **kwargs)

        saved.append((layer, own))
        layer.forward = run
    cfg = getattr(model, "config", None)
    use_cache = getattr(cfg, "use_cache", None)
    if use_cache is not None:
        cfg.use_cache = False
    try:
        yield model
    finally:
        for layer, own in saved:
            if own is None:
                del layer.forward
            else:
                layer.forward = own
        if use_cache is not None:
            cfg.use_cache = use_cache
