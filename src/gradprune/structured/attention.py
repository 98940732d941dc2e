"""Attention heads as prunable units.

A *head group* has one unit per attention head (for grouped-query attention: per key/value
group). Its handler (a :class:`HeadHandler`) knows what the generic channel machinery cannot:

- ``torch.nn.MultiheadAttention`` keeps its Q/K/V projections in one ``in_proj_weight`` and calls
  its ``out_proj`` functionally, so no submodule hook sees a head. :class:`MHAHeads` gates it with a
  removable forward hook on the attention module that recomputes the output with
  :func:`mha_forward`, scaling each head's value vectors by its gate — exactly a multiplier on the
  head's output before ``out_proj`` (a head's output is linear in its values). Export replaces the
  module by :class:`PrunedMultiheadAttention`, a subclass with ``in_proj_weight``/``in_proj_bias``
  rows and ``out_proj`` columns of the kept heads, ``num_heads`` updated and ``embed_dim`` unchanged
  (stock ``MultiheadAttention.forward`` requires ``num_heads * head_dim == embed_dim``, so the
  subclass runs :func:`mha_forward`; its state-dict keys are the stock ones).
- Hugging Face attention modules (:class:`BertHeads`) are gated through the channel machinery: the
  value projection's output is a channel tensor whose unit ``k`` spans ``head_dim`` positions, so
  an ordinary gate on it scales head ``k``'s output; the handler adds the attention matmul FLOPs
  and updates ``num_attention_heads``/``all_head_size`` on export.

Both are gated before ``out_proj``/the output dense, so a gate at 0 is the exported model and a
gate at 1 changes nothing; gradients of the gates are gradnas' head scores.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .groups import Slice

__all__ = ["HeadHandler", "MHAHeads", "PrunedMultiheadAttention", "mha_forward", "mha_unsupported"]


class HeadHandler:
    """What a head group needs beyond slices of ``Linear`` layers (see the module docstring)."""

    rule_type = "MultiheadAttention"

    def __init__(self, module: str, n_heads: int, head_dim: int):
        self.module = module
        self.n_heads = n_heads
        self.head_dim = head_dim

    def owners(self, modules: dict) -> list:
        return [(self.module, type(modules[self.module]))]

    def slices(self) -> list:
        return []

    def hooks(self, modules: dict, gates, gi: int) -> list:
        """Gate hooks beyond the group's mask points (removable handles)."""
        return []

    def recorder(self, modules: dict, calls: list) -> list:
        """Forward hooks appending ``(batch, target length, source length)`` of every call to
        ``calls``, for :meth:`extra_cost`."""
        return []

    def extra_cost(self, h: int, calls: list) -> tuple:
        """``(params, MACs)`` with ``h`` heads of what the ``Linear`` roles do not count."""
        return 0, 0

    def export(self, root: nn.Module, modules: dict, keep: torch.Tensor) -> None:
        """Update the exported copy (``modules`` are its modules) to keep heads ``keep``."""

    def magnitude(self, modules: dict, norm: str) -> torch.Tensor | None:
        return None


# --------------------------------------------------------------------------------------------
# torch.nn.MultiheadAttention


def mha_unsupported(m: nn.MultiheadAttention) -> str | None:
    """Why the heads of ``m`` cannot be pruned (``None``: they can)."""
    if m.bias_k is not None or m.bias_v is not None:
        return "MultiheadAttention with add_bias_kv=True: heads are not pruned"
    if m.add_zero_attn:
        return "MultiheadAttention with add_zero_attn=True: heads are not pruned"
    if m.num_heads < 2:
        return "MultiheadAttention with a single head: heads are not pruned"
    return None


def _float_mask(mask, dtype):
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    if torch.is_floating_point(mask):
        return mask.to(dtype)
    raise TypeError(f"attention masks must be bool or float, got {mask.dtype}")


def mha_forward(mod: nn.MultiheadAttention, query, key, value, key_padding_mask=None,
                need_weights: bool = True, attn_mask=None, average_attn_weights: bool = True,
                is_causal: bool = False, gate=None):
    """``MultiheadAttention.forward`` for ``mod.num_heads`` heads of ``mod.head_dim`` each (which
    need not multiply to ``embed_dim``), with an optional per-head ``gate`` (``[heads]`` or
    ``[batch, heads]``) on the values. Same masks, dropout and ``batch_first`` semantics as torch;
    ``is_causal`` is a hint, as in torch: ``attn_mask`` must be given and is used."""
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint (as torch does)")
    batched = query.dim() == 3
    if not batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    elif mod.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    tgt, bsz, embed = query.shape
    src = key.shape[0]
    h, d = mod.num_heads, mod.head_dim
    inner = h * d
    if mod._qkv_same_embed_dim:
        wq, wk, wv = mod.in_proj_weight.split(inner, dim=0)
    else:
        wq, wk, wv = mod.q_proj_weight, mod.k_proj_weight, mod.v_proj_weight
    bq = bk = bv = None
    if mod.in_proj_bias is not None:
        bq, bk, bv = mod.in_proj_bias.split(inner, dim=0)
    q = F.linear(query, wq, bq).view(tgt, bsz * h, d).transpose(0, 1)
    k = F.linear(key, wk, bk).view(src, bsz * h, d).transpose(0, 1)
    v = F.linear(value, wv, bv).view(src, bsz * h, d).transpose(0, 1)
    if gate is not None:
        g = gate.to(v.dtype)
        g = g.view(1, h) if g.dim() == 1 else g.view(bsz, h)
        v = (v.view(bsz, h, src, d) * g.view(-1, h, 1, 1)).view(bsz * h, src, d)
    mask = _float_mask(attn_mask, q.dtype)
    if mask is not None:
        if mask.dim() == 2:
            mask = mask.view(1, tgt, src)
        elif mask.shape[0] != bsz * h:
            raise RuntimeError(f"a 3-D attn_mask must have shape ({bsz * h}, {tgt}, {src}) for "
                               f"{h} heads, got {tuple(mask.shape)}")
    kpm = _float_mask(key_padding_mask, q.dtype)
    if kpm is not None:
        kpm = kpm.view(bsz, 1, 1, src).expand(-1, h, -1, -1).reshape(bsz * h, 1, src)
        mask = kpm if mask is None else mask + kpm
    p = mod.dropout if mod.training else 0.0
    if need_weights:
        q = q * (1.0 / math.sqrt(d))
        scores = torch.bmm(q, k.transpose(-2, -1)) if mask is None else torch.baddbmm(
            mask, q, k.transpose(-2, -1))
        weights = torch.softmax(scores, dim=-1)
        if p > 0.0:
            weights = F.dropout(weights, p=p)
        out = torch.bmm(weights, v)
    else:
        if mask is not None:
            mask = mask.view(-1, h, mask.shape[-2], src) if mask.shape[0] == bsz * h else \
                mask.view(1, 1, tgt, src)
        out = F.scaled_dot_product_attention(q.view(bsz, h, tgt, d), k.view(bsz, h, src, d),
                                             v.view(bsz, h, src, d), attn_mask=mask, dropout_p=p)
        out = out.view(bsz * h, tgt, d)
        weights = None
    out = out.transpose(0, 1).contiguous().view(tgt * bsz, inner)
    out = F.linear(out, mod.out_proj.weight, mod.out_proj.bias).view(tgt, bsz, -1)
    if weights is not None:
        weights = weights.view(bsz, h, tgt, src)
        if average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            weights = weights.squeeze(0)
    if not batched:
        out = out.squeeze(1)
    elif mod.batch_first:
        out = out.transpose(0, 1)
    return out, weights


_MHA_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
             "average_attn_weights", "is_causal")


def _bind(args, kwargs) -> dict:
    bound = dict(zip(_MHA_ARGS, args))
    bound.update(kwargs)
    return bound


class PrunedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with fewer heads than ``embed_dim / head_dim``: ``num_heads``
    heads of ``head_dim`` each, ``embed_dim`` unchanged (same parameters and state-dict keys,
    narrower). Built by export; ``forward`` is :func:`mha_forward`."""

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        return mha_forward(self, query, key, value, key_padding_mask, need_weights, attn_mask,
                           average_attn_weights, is_causal)

    @classmethod
    def narrowed(cls, mod: nn.MultiheadAttention, n_heads: int) -> "PrunedMultiheadAttention":
        """An uninitialised copy of ``mod``'s configuration with ``n_heads`` heads."""
        p = mod.out_proj.weight
        new = cls(mod.embed_dim, mod.num_heads, dropout=mod.dropout,
                  bias=mod.in_proj_bias is not None, kdim=mod.kdim, vdim=mod.vdim,
                  batch_first=mod.batch_first, device=p.device, dtype=p.dtype)
        new.head_dim = mod.head_dim
        new.num_heads = n_heads
        inner = n_heads * mod.head_dim
        with torch.no_grad():
            def empty(*shape):
                return nn.Parameter(torch.empty(*shape, device=p.device, dtype=p.dtype))
            if new._qkv_same_embed_dim:
                new.in_proj_weight = empty(3 * inner, mod.embed_dim)
            else:
                new.q_proj_weight = empty(inner, mod.embed_dim)
                new.k_proj_weight = empty(inner, mod.kdim)
                new.v_proj_weight = empty(inner, mod.vdim)
            if new.in_proj_bias is not None:
                new.in_proj_bias = empty(3 * inner)
            new.out_proj.weight = empty(mod.embed_dim, inner)
            new.out_proj.in_features = inner
        new.train(mod.training)
        return new


def _set_child(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def disable_encoder_fast_paths(root: nn.Module, name: str) -> None:
    """The fused ``TransformerEncoderLayer``/``TransformerEncoder`` fast paths assume
    ``num_heads * head_dim == embed_dim``: turn them off on the ancestors of attention ``name``."""
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        anc = root.get_submodule(".".join(parts[:i])) if i else root
        if isinstance(anc, nn.TransformerEncoderLayer):
            anc.activation_relu_or_gelu = 0  # only selects the fused path; forward uses .activation
        elif isinstance(anc, nn.TransformerEncoder):
            anc.use_nested_tensor = False


class MHAHeads(HeadHandler):
    """Heads of a ``torch.nn.MultiheadAttention`` (see the module docstring)."""

    rule_type = "MultiheadAttention"

    def __init__(self, module: str, m: nn.MultiheadAttention):
        super().__init__(module, m.num_heads, m.head_dim)
        self.embed_dim = m.embed_dim
        self.kdim, self.vdim = m.kdim, m.vdim
        self.same = m._qkv_same_embed_dim
        self.in_bias = m.in_proj_bias is not None
        self.out_bias = m.out_proj.bias is not None

    def slices(self) -> list:
        h, d, e = self.n_heads, self.head_dim, self.embed_dim
        if self.same:
            out = [Slice(self.module, "head", 0, k * e, d, h, "in_proj_weight") for k in range(3)]
        else:
            out = [Slice(self.module, "head", 0, 0, d, h, f"{w}_proj_weight") for w in "qkv"]
        return out + [Slice(f"{self.module}.out_proj", "in", 1, 0, d, h)]

    def hooks(self, modules, gates, gi) -> list:
        mod = modules[self.module]

        def hook(module, args, kwargs, output):
            bound = _bind(args, kwargs)
            query = bound["query"]
            if query.dim() == 3:
                batch = query.shape[0] if module.batch_first else query.shape[1]
            else:
                batch = None
            gate = gates.head_gate(gi, batch, query)
            return mha_forward(module, gate=gate, **bound)
        return [mod.register_forward_hook(hook, with_kwargs=True)]

    def recorder(self, modules, calls) -> list:
        def hook(module, args, kwargs, output):
            bound = _bind(args, kwargs)
            q, k = bound["query"], bound["key"]
            if q.dim() == 3:
                bdim, sdim = (0, 1) if module.batch_first else (1, 0)
                calls.append((q.shape[bdim], q.shape[sdim], k.shape[sdim]))
            else:
                calls.append((1, q.shape[0], k.shape[0]))
        return [modules[self.module].register_forward_hook(hook, with_kwargs=True)]

    def extra_cost(self, h: int, calls: list) -> tuple:
        d, e = self.head_dim, self.embed_dim
        inner = h * d
        params = inner * (e + self.kdim + self.vdim) + (3 * inner if self.in_bias else 0)
        params += e * inner + (e if self.out_bias else 0)
        macs = 0
        for b, t, s in calls:
            macs += inner * (b * t * e + b * s * self.kdim + b * s * self.vdim  # q, k, v
                             + 2 * b * t * s                                    # scores, AV
                             + b * t * e)                                       # out_proj
        return params, macs

    def export(self, root, modules, keep) -> None:
        mod = modules[self.module]
        h, d = self.n_heads, self.head_dim
        keep = torch.as_tensor(keep, dtype=torch.long)
        if len(keep) == h:
            return
        rows = (keep.view(-1, 1) * d + torch.arange(d).view(1, -1)).reshape(-1)
        new = PrunedMultiheadAttention.narrowed(mod, len(keep))
        inner = h * d
        with torch.no_grad():
            if self.same:
                idx = torch.cat([rows + k * inner for k in range(3)])
                new.in_proj_weight.copy_(mod.in_proj_weight.index_select(0, idx))
            else:
                for w in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
                    getattr(new, w).copy_(getattr(mod, w).index_select(0, rows))
            if self.in_bias:
                idx = torch.cat([rows + k * inner for k in range(3)])
                new.in_proj_bias.copy_(mod.in_proj_bias.index_select(0, idx))
            new.out_proj.weight.copy_(mod.out_proj.weight.index_select(1, rows))
            if self.out_bias:
                new.out_proj.bias.copy_(mod.out_proj.bias)
        for p_new, p_old in zip(new.parameters(), mod.parameters()):
            p_new.requires_grad_(p_old.requires_grad)
        _set_child(root, self.module, new)
        disable_encoder_fast_paths(root, self.module)

    def magnitude(self, modules, norm) -> torch.Tensor:
        from .._distributed import RowShard, all_reduce_tensors, is_dtensor, local

        mod = modules[self.module]
        h, d = self.n_heads, self.head_dim
        ws = [mod.in_proj_weight] if self.same else [mod.q_proj_weight, mod.k_proj_weight, mod.v_proj_weight]
        acc = torch.zeros(h, dtype=torch.float64)
        group = None
        for w in ws:  # row r of a projection belongs to head (r mod h*d) // d
            start = 0
            if is_dtensor(w):  # FSDP2: this rank's rows; the per-head sums are added over the ranks
                shard = RowShard(self.module, w)
                start, group = shard.start, shard.group if shard.sharded else group
            rows = local(w.detach()).to(torch.float64)
            rows = rows.reshape(rows.shape[0], -1)
            per_row = rows.abs().sum(1) if norm == "l1" else (rows * rows).sum(1)
            heads = torch.div(torch.arange(start, start + rows.shape[0]) % (h * d), d, rounding_mode="floor")
            acc.index_add_(0, heads, per_row)
        if group is not None:
            all_reduce_tensors([acc], group)
        return acc if norm == "l1" else acc.sqrt()
