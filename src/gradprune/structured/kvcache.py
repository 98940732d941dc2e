"""Key/value-cache size per token, for the ``kv_cache`` constraint of :func:`~gradprune.structured.search`.

While a decoder generates, every attention layer caches one key and one value vector per
key/value head for every token of context, so the cache grows by

    ``kv_cache = Σ_layers 2 · num_key_value_heads · head_dim · bytes per element``

per token (full attention assumed; the element size is that of the model's floating-point
parameters, e.g. 2 for bf16). Pruning KV groups of a grouped-query attention shrinks it; pruning
query heads under one shared key/value head (multi-query attention) or MLP neurons does not.

The count comes from the head groups that :func:`~gradprune.structured.find_groups` found: a group
keeping ``n`` units caches ``handler.widths(n)["num_key_value_heads"]`` key/value heads (a
LLaMA-style KV group is one; with a single key/value head it stays 1; a plain multi-head
attention caches one per kept head) of ``handler.head_dim``. Attention layers outside any group
(left unpruned) count as the Hugging Face config gives them: ``num_hidden_layers`` layers of
``num_key_value_heads`` heads of ``head_dim`` (or ``hidden_size / num_attention_heads``).

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from gradprune.structured import find_groups
    >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64,
    ...                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    >>> kv = KVCache(find_groups(model, torch.zeros(1, 4, dtype=torch.long)))
    >>> kv.dense                      # 2 layers x 2 (K and V) x 2 heads x 8 dims x 4 bytes
    256
    >>> kv.of({0: 1})                 # one KV group kept in the first layer's attention
    192
"""

from __future__ import annotations

from torch import nn

from .groups import Analysis

__all__ = ["KVCache", "kv_heads"]


def kv_heads(handler, n: int) -> int:
    """Key/value heads a head group caches when it keeps ``n`` units."""
    widths = getattr(handler, "widths", None)
    if callable(widths):
        w = widths(n)
        for key in ("num_key_value_heads", "num_kv_heads"):  # (Falcon: num_kv_heads)
            if key in w:
                return int(w[key])
    return n


def _config_elements(model: nn.Module) -> int | None:
    """``num_hidden_layers · 2 · num_key_value_heads · head_dim`` from a Hugging Face config."""
    cfg = getattr(model, "config", None)
    layers = getattr(cfg, "num_hidden_layers", None)
    heads = getattr(cfg, "num_attention_heads", None)
    if not isinstance(layers, int) or not isinstance(heads, int) or heads < 1:
        return None
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    d = getattr(cfg, "head_dim", None) or getattr(cfg, "hidden_size", 0) // heads
    return layers * 2 * int(kv) * int(d)


def _element_size(model: nn.Module) -> int:
    for p in model.parameters():
        if p.is_floating_point():
            return p.element_size()
    return 4


class KVCache:
    """KV-cache bytes per token of ``analysis.model`` for any choice of group widths (see the
    module docs). ``dense`` is the unpruned model's; ``of(widths)`` a subnet's (groups not in
    ``widths`` keep their size)."""

    def __init__(self, analysis: Analysis):
        self.bytes = _element_size(analysis.model)
        self.heads = {gi: g for gi, g in enumerate(analysis.groups) if g.unit == "heads"}
        grouped = self._elements({})
        config = _config_elements(analysis.model)
        self.fixed = max(0, config - grouped) if config is not None else 0  # unpruned attention
        self.dense = self.of({})

    def _elements(self, widths: dict) -> int:
        return sum(2 * kv_heads(g.handler, widths.get(gi, g.size)) * g.handler.head_dim
                   * getattr(g.handler, "copies", 1)  # layers tied into one group (T5)
                   for gi, g in self.heads.items())

    def of(self, widths: dict) -> int:
        """Bytes per token with group ``i`` keeping ``widths[i]`` units."""
        return self.bytes * (self.fixed + self._elements(widths))
