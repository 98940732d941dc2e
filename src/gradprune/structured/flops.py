"""Analytic parameter and FLOP counts for any choice of group widths.

The dense model is measured once on ``example_input``: its parameter count and its FLOPs with
:class:`torch.utils.flop_counter.FlopCounterMode` (2 x multiply-accumulates of matmuls and
convolutions; element-wise ops, norms and pooling count zero), and how many output positions each
sliced ``Linear``/conv computes. A choice of widths then changes only the sliced layers, whose
parameters and MACs are closed-form in their input and output widths:

- ``Linear`` (and Hugging Face ``Conv1D``): ``o*i (+o)`` params, ``positions*o*i`` MACs;
- ``Conv`` (``groups=1``): ``o*i*K (+o)`` params, ``out_positions*o*i*K`` MACs (``K`` = kernel
  volume); depthwise: ``c*K (+c)`` params, ``out_positions*c*K`` MACs;
- ``ConvTranspose`` (``groups=1``): ``i*o*K (+o)`` params, ``in_positions*i*o*K`` MACs;
- norms: one weight and one bias entry per kept channel when affine.

- attention heads (``h`` kept of ``head_dim`` ``d``): Q/K/V and output projections plus the
  score and attention-times-value matmuls, ``h*d*(B*T*E + B*S*kdim + B*S*vdim + 2*B*T*S + B*T*E)``
  MACs for a batch ``B`` with ``T`` queries and ``S`` keys (for Hugging Face attention the
  projections are ``Linear``/``Conv1D`` layers counted above and only the ``2*B*T*S*h*d`` term
  is added, ``h`` the kept query heads: for LLaMA, kept KV groups x ``num_key_value_groups``).

so ``flops(widths) = dense_flops + 2 * sum(MACs(widths) - MACs(dense))`` with no re-profiling.
``count_flops`` counts CPU ``scaled_dot_product_attention`` too (``FlopCounterMode`` has no formula
for ``_scaled_dot_product_flash_attention_for_cpu``; the same one as for the CUDA kernels is used)
and the grouped matmuls of MoE experts (``aten._grouped_mm`` and transformers' fallback op: 2 x
rows x inner x output size, each token counted for the experts it is routed to)
and runs with torch's fused multi-head-attention fast path off, so attention is counted as the
matmuls it is.

Example:
    >>> import torch, torch.nn as nn
    >>> from gradprune.structured import find_groups
    >>> from gradprune.structured.flops import CostModel
    >>> model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3))
    >>> x = torch.randn(4, 10)
    >>> cost = CostModel(find_groups(model, x), x)
    >>> cost.dense_params, cost.dense_flops
    (283, 2080)
    >>> cost.params({0: 5}), cost.flops({0: 5})
    (73, 520)
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from .groups import _BN, _CONV, _CONVT, _IN, Analysis, _as_args, is_conv1d

__all__ = ["CostModel", "count_params", "count_flops"]


def count_params(model: nn.Module) -> int:
    """Number of distinct parameter entries of ``model``."""
    return sum(p.numel() for p in model.parameters())


def _sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _grouped_mm_flop(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """2 x MACs of a grouped matmul (MoE experts): ``[S, K] @ [G, K, N]`` (each row by one
    group's matrix), ``[G, M, K] @ [G, K, N]``, or 2-D ``[M, K] @ [K, N]`` split by offsets."""
    batch = a_shape[0] if len(a_shape) == 3 and len(b_shape) == 3 else 1
    rows, inner = a_shape[-2], a_shape[-1]
    return 2 * batch * rows * inner * b_shape[-1]


def _custom_flops() -> dict:
    out = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        out[op] = _sdpa_flop
    op = getattr(torch.ops.aten, "_grouped_mm", None)  # transformers 5 MoE experts
    if op is not None:
        out[op] = _grouped_mm_flop
    try:  # transformers' own fallback op for grouped matmuls (registered when its MoE code loads)
        out[torch.ops.transformers.grouped_mm_fallback] = _grouped_mm_flop
    except (AttributeError, RuntimeError):
        pass
    return out


def count_flops(model: nn.Module, example_input) -> int:
    """FLOPs (2 x MACs) of one forward on ``example_input``, measured by ``FlopCounterMode``."""
    return int(flop_counter(model, example_input).get_total_flops())


def flop_counter(model: nn.Module, example_input) -> FlopCounterMode:
    """The ``FlopCounterMode`` of one forward (per-module counts: ``get_flop_counts()``)."""
    args = _as_args(example_input)
    was_training = model.training
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        model.eval()
        torch.backends.mha.set_fastpath_enabled(False)
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_custom_flops()) as counter:
            model(*args)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        model.train(was_training)
    return counter


def _kvol(mod) -> int:
    return int(math.prod(mod.kernel_size))


def module_cost(mod: nn.Module, o: int, i: int, positions: int) -> tuple:
    """``(params, MACs)`` of a sliced layer with ``o`` outputs and ``i`` inputs (or channels)."""
    has_bias = getattr(mod, "bias", None) is not None
    if isinstance(mod, nn.Linear) or is_conv1d(mod):
        return o * i + (o if has_bias else 0), positions * o * i
    if isinstance(mod, _CONV + _CONVT):
        k = _kvol(mod)
        if mod.groups != 1:  # depthwise: o == i == channels
            return o * k + (o if has_bias else 0), positions * o * k
        return o * i * k + (o if has_bias else 0), positions * o * i * k
    n_affine = int(getattr(mod, "weight", None) is not None) + int(has_bias)
    return n_affine * o, 0


def _dims(analysis: Analysis, name: str, mod: nn.Module, widths: dict) -> tuple:
    roles = analysis.roles[name]
    if "through" in roles:
        c = analysis.width_of(roles["through"], widths)
        return c, c
    o, i = _dense_dims(mod)
    if "out" in roles:
        o = analysis.width_of(roles["out"], widths)
    if "in" in roles:
        i = analysis.width_of(roles["in"], widths)
    return o, i


def _dense_dims(mod: nn.Module) -> tuple:
    if isinstance(mod, nn.Linear):
        return mod.out_features, mod.in_features
    if is_conv1d(mod):
        return mod.nf, mod.nx
    if isinstance(mod, _CONV + _CONVT):
        return mod.out_channels, mod.in_channels
    if isinstance(mod, _BN + _IN):
        return mod.num_features, mod.num_features
    if isinstance(mod, nn.GroupNorm):
        return mod.num_channels, mod.num_channels
    if isinstance(mod, nn.LayerNorm):
        return mod.normalized_shape[0], mod.normalized_shape[0]
    raise TypeError(f"cannot size a {type(mod).__name__}")


class CostModel:
    """Params and FLOPs of the model for any ``{group index: width}`` (missing groups: dense)."""

    def __init__(self, analysis: Analysis, example_input):
        self.analysis = analysis
        model = analysis.model
        modules = dict(model.named_modules())
        self.members = [(name, modules[name]) for name in analysis.roles]
        positions = {name: 0 for name, _ in self.members}

        def make_hook(name):
            def hook(mod, inputs, output):
                if isinstance(mod, _CONVT):
                    x = inputs[0]
                    positions[name] += x.numel() // x.shape[1]
                elif isinstance(mod, nn.Linear) or is_conv1d(mod):
                    positions[name] += output.numel() // output.shape[-1]
                elif isinstance(mod, _CONV):
                    positions[name] += output.numel() // output.shape[1]
            return hook

        handles = [mod.register_forward_hook(make_hook(name)) for name, mod in self.members]
        self.heads = [(gi, g.handler) for gi, g in enumerate(analysis.groups) if g.handler is not None]
        self.head_calls = {gi: [] for gi, _ in self.heads}
        for gi, handler in self.heads:
            handles += handler.recorder(modules, self.head_calls[gi])
        try:
            self.dense_flops = count_flops(model, example_input)
        finally:
            for h in handles:
                h.remove()
        self.positions = positions
        self.dense_params = count_params(model)
        self._dense = {name: module_cost(mod, *_dense_dims(mod), positions[name])
                       for name, mod in self.members}
        self._dense_heads = {gi: handler.extra_cost(analysis.groups[gi].size, self.head_calls[gi])
                             for gi, handler in self.heads}

    def costs(self, widths: dict) -> tuple:
        """``(params, flops)`` for ``widths``."""
        dp = dm = 0
        for name, mod in self.members:
            o, i = _dims(self.analysis, name, mod, widths)
            p, m = module_cost(mod, o, i, self.positions[name])
            p0, m0 = self._dense[name]
            dp += p - p0
            dm += m - m0
        for gi, handler in self.heads:
            p, m = handler.extra_cost(widths.get(gi, self.analysis.groups[gi].size),
                                      self.head_calls[gi])
            p0, m0 = self._dense_heads[gi]
            dp += p - p0
            dm += m - m0
        return self.dense_params + dp, self.dense_flops + 2 * dm

    def params(self, widths: dict) -> int:
        return self.costs(widths)[0]

    def flops(self, widths: dict) -> int:
        return self.costs(widths)[1]
