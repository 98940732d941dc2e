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

import copy
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from .groups import Slice

__all__ = ["FUNCTIONAL_ATTENTION", "FunctionalAttention", "FunctionalHeads", "HeadHandler", "MHAHeads",
           "PrunedMultiheadAttention", "functional_attention_spec", "mha_forward", "mha_unsupported",
           "register_functional_attention", "relative_window_attention", "window_attention"]


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


# --------------------------------------------------------------------------------------------
# attention modules that pass their projections' weights to a function (torchvision's Swin)


@dataclass(frozen=True)
class FunctionalAttention:
    """How to read an attention module that calls a *function* with its projections' weights
    (data only; register with :func:`register_functional_attention`).

    A module matches when it has a ``Linear`` ``qkv`` (fused ``[Q | K | V]``, each head-major),
    a ``Linear`` ``proj`` whose input is the heads' outputs (``3 * proj.in_features ==
    qkv.out_features``), an int attribute ``heads`` dividing ``proj.in_features``, and every
    attribute in ``requires``. ``per_head``: ``(parameter, dim)`` pairs holding one entry per
    head along ``dim`` (sliced with the heads where present); ``per_head_linear``: child
    ``Linear`` layers whose output units are the heads (sliced too). ``forward(module, x,
    gate=None)`` computes the module's output for any number of heads (``head_dim`` is
    ``proj.in_features // heads``) with an optional per-head gate (``[heads]`` or
    ``[batch, heads]``) on the values; a pruned module runs it.

    The analysis checks the behaviour before it prunes anything: on the example input ``forward``
    must reproduce the module's output, the gated output must equal the output of a copy with
    the gated-off head sliced away, and per-sample gates must act per sample; otherwise the
    module is listed in ``skipped`` with the reason."""

    name: str
    forward: Callable
    qkv: str = "qkv"
    proj: str = "proj"
    heads: str = "num_heads"
    requires: tuple = ()
    per_head: tuple = ()
    per_head_linear: tuple = ()


#: the registered layouts, tried in order (:func:`functional_attention_spec`)
FUNCTIONAL_ATTENTION: list = []


def register_functional_attention(spec: FunctionalAttention) -> FunctionalAttention:
    """Add ``spec`` to :data:`FUNCTIONAL_ATTENTION` (returns it).

    Example: ``register_functional_attention(FunctionalAttention("mine", forward=my_forward,
    requires=("window_size",)))``."""
    if not isinstance(spec, FunctionalAttention):
        raise TypeError(f"spec must be a FunctionalAttention, got {type(spec).__name__}")
    if not callable(spec.forward):
        raise TypeError(f"spec.forward must be callable, got {type(spec.forward).__name__}")
    if spec not in FUNCTIONAL_ATTENTION:
        FUNCTIONAL_ATTENTION.append(spec)
    return spec


def functional_attention_spec(mod: nn.Module) -> FunctionalAttention | None:
    """The registered :class:`FunctionalAttention` that ``mod`` matches by its attributes
    (``None``: none)."""
    for spec in FUNCTIONAL_ATTENTION:
        qkv, proj = getattr(mod, spec.qkv, None), getattr(mod, spec.proj, None)
        h = getattr(mod, spec.heads, None)
        if not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear)
                and isinstance(h, int) and not isinstance(h, bool) and h >= 1):
            continue
        if any(not hasattr(mod, a) for a in spec.requires):
            continue
        if qkv.out_features != 3 * proj.in_features or proj.in_features % h:
            continue
        return spec
    return None


def _narrow_linear(lin: nn.Linear, rows=None, cols=None) -> None:
    w = lin.weight
    if rows is not None:
        w = w.index_select(0, rows)
        if lin.bias is not None:
            lin.bias = nn.Parameter(lin.bias.detach().index_select(0, rows).clone(),
                                    requires_grad=lin.bias.requires_grad)
        lin.out_features = len(rows)
    if cols is not None:
        w = w.index_select(1, cols)
        lin.in_features = len(cols)
    lin.weight = nn.Parameter(w.detach().clone(), requires_grad=lin.weight.requires_grad)


_PRUNED_CLASSES: dict = {}


def _pruned_class(cls: type, spec: FunctionalAttention) -> type:
    """``cls`` with ``forward`` replaced by ``spec.forward`` (cached; named ``Pruned<cls>``)."""
    if cls.__dict__.get("_functional_spec") is spec:
        return cls
    if cls not in _PRUNED_CLASSES:
        def forward(self, x):
            return spec.forward(self, x)
        _PRUNED_CLASSES[cls] = type(f"Pruned{cls.__name__}", (cls,), {
            "forward": forward, "_functional_spec": spec, "__module__": __name__,
            "__doc__": f"{cls.__name__} with fewer heads (exported by gradprune; runs "
                       f"{getattr(spec.forward, '__name__', 'the registered forward')})."})
    return _PRUNED_CLASSES[cls]


def narrow_functional(mod: nn.Module, spec: FunctionalAttention, keep: torch.Tensor) -> None:
    """Keep heads ``keep`` of ``mod`` (in place): ``qkv`` rows, ``proj`` columns, the per-head
    parameters and layers, the head count, and the class (its ``forward`` becomes
    ``spec.forward``, which allows ``heads * head_dim`` to differ from the embed dim)."""
    h = getattr(mod, spec.heads)
    qkv, proj = getattr(mod, spec.qkv), getattr(mod, spec.proj)
    inner = proj.in_features
    d = inner // h
    keep = torch.as_tensor(keep, dtype=torch.long)
    rows = (keep.view(-1, 1) * d + torch.arange(d).view(1, -1)).reshape(-1)
    with torch.no_grad():
        _narrow_linear(qkv, rows=torch.cat([rows + j * inner for j in range(3)]))
        _narrow_linear(proj, cols=rows)
        for pname, dim in spec.per_head:
            p = getattr(mod, pname, None)
            if isinstance(p, torch.Tensor) and p.dim() > dim and p.shape[dim] == h:
                setattr(mod, pname, nn.Parameter(p.detach().index_select(dim, keep).clone(),
                                                 requires_grad=p.requires_grad))
        for path in spec.per_head_linear:
            lin = _child(mod, path)
            if isinstance(lin, nn.Linear) and lin.out_features == h:
                _narrow_linear(lin, rows=keep)
    setattr(mod, spec.heads, len(keep))
    mod.__class__ = _pruned_class(type(mod), spec)


def restore_pruned_class(mod: nn.Module, saved_type: str) -> bool:
    """For :func:`~gradprune.structured.load_pruned`: give a fresh ``mod`` the class of its
    saved, pruned version (``Pruned<cls>``) when it is a registered functional attention."""
    spec = functional_attention_spec(mod)
    if spec is None or saved_type != f"Pruned{type(mod).__name__}":
        return False
    mod.__class__ = _pruned_class(type(mod), spec)
    return True


def _child(mod: nn.Module, path: str):
    try:
        return mod.get_submodule(path)
    except AttributeError:
        return None


def _close(a, b) -> bool:
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
            and bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(b.abs().max())))))


def check_functional(mod: nn.Module, spec: FunctionalAttention, x: torch.Tensor, y) -> str | None:
    """Why the heads of ``mod`` (output ``y`` on ``x``) cannot be pruned with ``spec``
    (``None``: they can). See :class:`FunctionalAttention`."""
    from torch.utils.flop_counter import FlopCounterMode

    h = getattr(mod, spec.heads)
    where = f"{type(mod).__name__} ({spec.name} functional attention)"
    if h < 2:
        return f"{where} with a single head: heads are not pruned"
    try:
        with torch.no_grad():
            with FlopCounterMode(display=False) as ours:
                y1 = spec.forward(mod, x)
            with FlopCounterMode(display=False) as theirs:
                mod(x)
            if not _close(y1, y) or ours.get_total_flops() != theirs.get_total_flops():
                return f"{where}: the registered forward does not reproduce its output; heads are not pruned"
            gate = torch.ones(h, dtype=x.dtype, device=x.device)
            gate[0] = 0
            yg = spec.forward(mod, x, gate=gate)
            small = copy.deepcopy(mod)
            narrow_functional(small, spec, torch.arange(1, h))
            if not _close(small(x), yg):
                return f"{where}: slicing a head away does not give the gated output; heads are not pruned"
            if x.dim() > 1 and x.shape[0] > 1:
                per = torch.ones(x.shape[0], h, dtype=x.dtype, device=x.device)
                per[0, 0] = 0
                y2 = spec.forward(mod, x, gate=per)
                if not (_close(y2[:1], yg[:1]) and _close(y2[1:], y1[1:])):
                    return f"{where}: per-sample gates do not act per sample; heads are not pruned"
    except Exception as exc:  # noqa: BLE001 - any failure leaves the module unpruned, with the reason
        return f"{where}: {type(exc).__name__}: {str(exc)[:200]}; heads are not pruned"
    return None


class FunctionalHeads(HeadHandler):
    """Heads of a module matching a :class:`FunctionalAttention` (torchvision's Swin): gated by a
    forward hook that recomputes the output with ``spec.forward`` and the gate; exported by
    :func:`narrow_functional`. Its parameters and FLOPs are affine in the head count; both are
    measured on the recorded inputs with all heads and with one (:meth:`extra_cost`)."""

    rule_type = "MultiheadAttention"

    def __init__(self, module: str, m: nn.Module, spec: FunctionalAttention):
        h = getattr(m, spec.heads)
        super().__init__(module, h, getattr(m, spec.proj).in_features // h)
        self.spec = spec
        self._mod = m
        self._line = None

    def slices(self) -> list:
        h, d, s = self.n_heads, self.head_dim, self.spec
        inner = h * d
        out = [Slice(f"{self.module}.{s.qkv}", "out", 0, j * inner, d, h) for j in range(3)]
        out.append(Slice(f"{self.module}.{s.proj}", "in", 1, 0, d, h))
        for pname, dim in s.per_head:
            p = getattr(self._mod, pname, None)
            if isinstance(p, torch.Tensor) and p.dim() > dim and p.shape[dim] == h:
                out.append(Slice(self.module, "head", dim, 0, 1, h, pname))
        for path in s.per_head_linear:
            lin = _child(self._mod, path)
            if isinstance(lin, nn.Linear) and lin.out_features == h:
                out.append(Slice(f"{self.module}.{path}", "out", 0, 0, 1, h))
        return out

    def sliced_modules(self) -> set:
        """Child paths (relative to the module) whose weights the heads slice."""
        return {s.module[len(self.module) + 1:] for s in self.slices() if s.module != self.module}

    def hooks(self, modules, gates, gi) -> list:
        spec = self.spec

        def hook(module, args, output):
            x = args[0]
            gate = gates.head_gate(gi, x.shape[0] if x.dim() > 1 else None, x)
            return spec.forward(module, x, gate=gate)
        return [modules[self.module].register_forward_hook(hook)]

    def recorder(self, modules, calls) -> list:
        def hook(module, args, output):
            calls.append(args[0].detach())
        return [modules[self.module].register_forward_hook(hook)]

    def extra_cost(self, h: int, calls: list) -> tuple:
        from .flops import count_flops, count_params
        H = self.n_heads
        if self._line is None or self._line[0] != len(calls):
            small = copy.deepcopy(self._mod)
            narrow_functional(small, self.spec, torch.tensor([0]))
            f_all = sum(count_flops(self._mod, x) for x in calls)
            f_one = sum(count_flops(small, x) for x in calls)
            self._line = (len(calls), count_params(small), count_params(self._mod), f_one, f_all)
        _, p1, ph, f1, fh = self._line
        params = p1 + (ph - p1) * (h - 1) // (H - 1)
        flops = f1 + (fh - f1) * (h - 1) // (H - 1)
        return params, flops // 2

    def export(self, root, modules, keep) -> None:
        keep = torch.as_tensor(keep, dtype=torch.long)
        if len(keep) == self.n_heads:
            return
        narrow_functional(modules[self.module], self.spec, keep)

    def magnitude(self, modules, norm) -> torch.Tensor:
        h, d = self.n_heads, self.head_dim
        w = getattr(modules[self.module], self.spec.qkv).weight.detach().to(torch.float64)
        w = w.view(3, h, d, -1).transpose(0, 1).reshape(h, -1)
        return w.abs().sum(1) if norm == "l1" else (w * w).sum(1).sqrt()


def window_attention(mod: nn.Module, x: torch.Tensor, gate=None) -> torch.Tensor:
    """Swin's shifted-window attention (``torchvision.models.swin_transformer``'s
    ``shifted_window_attention``: v1, and v2's cosine attention with ``logit_scale``) for
    ``mod.num_heads`` heads of ``mod.proj.in_features // mod.num_heads`` each, with an optional
    per-head ``gate`` (``[heads]`` or ``[batch, heads]``) on the values. Same padding, cyclic
    shift, mask, dropout and FLOPs as the torchvision function (which takes the head size from
    the input width, so it cannot run fewer heads).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> class W(nn.Module):  # torchvision's ShiftedWindowAttention, in small
        ...     def __init__(self, dim=8, heads=2):
        ...         super().__init__()
        ...         self.qkv, self.proj, self.num_heads = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), heads
        ...         self.window_size, self.shift_size = [2, 2], [1, 1]
        ...         self.attention_dropout = self.dropout = 0.0
        ...         self.table = nn.Parameter(torch.zeros(1, heads, 4, 4))
        ...     def get_relative_position_bias(self):
        ...         return self.table
        >>> window_attention(W(), torch.randn(1, 4, 4, 8)).shape
        torch.Size([1, 4, 4, 8])
    """
    B, H, W, C = x.shape
    ws, shift = mod.window_size, list(mod.shift_size)
    h = mod.num_heads
    inner = mod.proj.in_features
    d = inner // h
    pad_r = (ws[1] - W % ws[1]) % ws[1]
    pad_b = (ws[0] - H % ws[0]) % ws[0]
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    _, pad_h, pad_w, _ = x.shape
    if ws[0] >= pad_h:
        shift[0] = 0
    if ws[1] >= pad_w:
        shift[1] = 0
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    n_win = (pad_h // ws[0]) * (pad_w // ws[1])
    x = x.view(B, pad_h // ws[0], ws[0], pad_w // ws[1], ws[1], C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B * n_win, ws[0] * ws[1], C)
    n = x.size(1)
    logit_scale = getattr(mod, "logit_scale", getattr(mod, "v2_logit_scale", None))
    qkv_bias = mod.qkv.bias
    if logit_scale is not None and qkv_bias is not None:
        qkv_bias = qkv_bias.clone()
        qkv_bias[inner:2 * inner].zero_()
    qkv = F.linear(x, mod.qkv.weight, qkv_bias).reshape(x.size(0), n, 3, h, d).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if logit_scale is not None:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * d ** -0.5).matmul(k.transpose(-2, -1))
    attn = attn + mod.get_relative_position_bias()
    if sum(shift) > 0:
        mask = x.new_zeros((pad_h, pad_w))
        hs = ((0, -ws[0]), (-ws[0], -shift[0]), (-shift[0], None))
        wsl = ((0, -ws[1]), (-ws[1], -shift[1]), (-shift[1], None))
        count = 0
        for a in hs:
            for b in wsl:
                mask[a[0]:a[1], b[0]:b[1]] = count
                count += 1
        mask = mask.view(pad_h // ws[0], ws[0], pad_w // ws[1], ws[1]).permute(0, 2, 1, 3)
        mask = mask.reshape(n_win, ws[0] * ws[1])
        mask = mask.unsqueeze(1) - mask.unsqueeze(2)
        mask = mask.masked_fill(mask != 0, float(-100.0)).masked_fill(mask == 0, float(0.0))
        attn = attn.view(x.size(0) // n_win, n_win, h, n, n) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, h, n, n)
    attn = F.softmax(attn, dim=-1)
    attn = F.dropout(attn, p=mod.attention_dropout, training=mod.training)
    if gate is not None:
        g = gate.to(v.dtype)
        g = g.view(1, 1, h, 1, 1) if g.dim() == 1 else g.view(B, 1, h, 1, 1)
        v = (v.view(B, n_win, h, n, d) * g).view(B * n_win, h, n, d)
    x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), n, inner)
    x = F.linear(x, mod.proj.weight, mod.proj.bias)
    x = F.dropout(x, p=mod.dropout, training=mod.training)
    x = x.view(B, pad_h // ws[0], pad_w // ws[1], ws[0], ws[1], C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, pad_h, pad_w, C)
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
    return x[:, :H, :W, :].contiguous()


register_functional_attention(FunctionalAttention(
    "swin", forward=window_attention,
    requires=("window_size", "shift_size", "attention_dropout", "dropout", "get_relative_position_bias"),
    per_head=(("relative_position_bias_table", 1), ("logit_scale", 0), ("v2_logit_scale", 0)),
    per_head_linear=("cpb_mlp.2",)))


def relative_window_attention(mod: nn.Module, x: torch.Tensor, gate=None) -> torch.Tensor:
    """MaxViT's attention within windows or grid cells (torchvision's
    ``RelativePositionalMultiHeadAttention``) for ``mod.n_heads`` heads of ``mod.head_dim`` each,
    with an optional per-head ``gate`` (``[heads]`` or ``[batch, heads]``) on the values. The
    same computation and FLOPs as torchvision's forward, except that the heads' output is
    reshaped to ``n_heads * head_dim`` features (torchvision reshapes it to the input width,
    which only holds with every head kept). ``mod.scale_factor`` is used as it is
    (torchvision's is ``feat_dim ** -0.5`` of the unpruned embed dim).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> class A(nn.Module):  # torchvision's RelativePositionalMultiHeadAttention, in small
        ...     def __init__(self, dim=8, head_dim=4, p=2):
        ...         super().__init__()
        ...         self.n_heads, self.head_dim, self.max_seq_len = dim // head_dim, head_dim, p * p
        ...         self.to_qkv, self.merge = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        ...         self.scale_factor = dim ** -0.5
        ...         self.table = nn.Parameter(torch.zeros(1, self.n_heads, p * p, p * p))
        ...     def get_relative_positional_bias(self):
        ...         return self.table
        >>> relative_window_attention(A(), torch.randn(1, 3, 4, 8)).shape  # [B, windows, P*P, C]
        torch.Size([1, 3, 4, 8])
    """
    B, G, P, _ = x.shape
    h, d = mod.n_heads, mod.head_dim
    q, k, v = (t.reshape(B, G, P, h, d).permute(0, 1, 3, 2, 4) for t in mod.to_qkv(x).chunk(3, dim=-1))
    scores = torch.einsum("bghid,bghjd->bghij", q, k * mod.scale_factor)
    attn = F.softmax(scores + mod.get_relative_positional_bias(), dim=-1)
    if gate is not None:
        g = gate.to(v.dtype)
        v = v * (g.view(1, 1, h, 1, 1) if g.dim() == 1 else g.view(B, 1, h, 1, 1))
    out = torch.einsum("bghij,bghjd->bghid", attn, v).permute(0, 1, 3, 2, 4).reshape(B, G, P, h * d)
    return mod.merge(out)


register_functional_attention(FunctionalAttention(
    "maxvit", forward=relative_window_attention, qkv="to_qkv", proj="merge", heads="n_heads",
    requires=("head_dim", "scale_factor", "get_relative_positional_bias"),
    per_head=(("relative_position_bias_table", 1),)))
