"""Dependency groups: which slices of which layers must be pruned together.

How groups are found
--------------------
1. The model is traced with :mod:`torch.fx` (symbolic tracing). Built-in ``torch.nn`` modules are
   leaves; user modules are traced through. When tracing a user module fails (data-dependent
   control flow, …) that module becomes an opaque leaf and tracing is retried; an opaque module is
   listed in :attr:`Analysis.skipped` and nothing flowing into it is pruned.
2. The traced graph is run once on ``example_input`` while a *channel layout* is propagated along
   every tensor. A layout says which dimension of the tensor carries prunable channels (``cdim``) and
   where those channels come from: a list of segments ``(space, inner)`` along ``cdim``, where a
   *space* is one producer's output channels (a ``Linear``'s out features, a ``Conv``'s or
   ``ConvTranspose``'s out channels) and ``inner`` is how many consecutive positions one channel
   occupies (1, or ``H*W`` after a flatten of a ``[N, C, H, W]`` map into a ``Linear``).
3. Rules per operation:

   - producers (``Linear``, ``Conv*d`` and ``ConvTranspose*d`` with ``groups=1``) consume the
     layout of their input (their input columns are sliced) and start a new space;
   - per-channel layers (``BatchNorm*``, ``InstanceNorm*``, ``LayerNorm`` over the channel dim,
     ``GroupNorm``, a depthwise conv with ``groups == in == out``) pass the layout through and are
     sliced with it;
   - activations, dropout, pooling, upsampling, ``flatten``/``view``/``reshape`` (channel units must
     stay contiguous), ``permute``/``transpose``, ``mean``/``sum`` over other dims and indexing of
     other dims keep (and move) the layout;
   - ``a + b``, ``a - b``, ``a * b`` of two channel tensors *merge* their spaces (a residual stream
     is one group); ``torch.cat`` along the channel dim concatenates segments (channel offsets);
   - anything else that touches a channel dimension (an unknown function or module, a matmul, a
     split, a scalar added to channels, a parameter used outside its module, a grouped conv that is
     not depthwise…) *blocks* the spaces involved: they are not pruned and the reason is listed;
   - the model's outputs are blocked: the final layer's outputs are never pruned.
4. Spaces merged by step 3 form one :class:`Group` (union-find). A group's unit ``k`` is channel
   ``k`` of every space in it, and its *slices* are every ``(module, dim, index range)`` that unit
   touches: producers' output rows, per-channel layers' entries, consumers' input columns.

Example:
    >>> import torch, torch.nn as nn
    >>> from gradprune.structured import find_groups
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
    ...                       nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    >>> analysis = find_groups(model, torch.randn(2, 3, 6, 6))
    >>> [(g.name, g.size) for g in analysis.groups]
    [('0', 8)]
    >>> [s.describe() for s in analysis.groups[0].slices]
    ['0.weight[dim 0]', '1[channels]', '4.weight[dim 1] (16 per unit)']
    >>> analysis.skipped
    [{'module': '4', 'reason': 'output is a model output'}]
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.nn import functional as F

__all__ = ["find_groups", "register_analyser", "Analysis", "Group", "Slice", "Layout"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVT = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_IN = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
# element-wise modules with f(0) == 0: a pruned (zeroed) channel stays zero through them
_ZERO_KEEPING = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Hardswish, nn.ELU,
                 nn.Mish, nn.Hardtanh, nn.Softsign, nn.Tanhshrink, nn.Softshrink, nn.Hardshrink,
                 nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
# element-wise modules with f(0) != 0: pruned channels are re-zeroed at their output
_ZERO_MOVING = (nn.Sigmoid, nn.Hardsigmoid, nn.Softplus, nn.LogSigmoid)
_POOL = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
         nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
         nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d, nn.Upsample,
         nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)

_ZERO_KEEPING_FUNCS = {
    F.relu, torch.relu, F.relu6, F.gelu, F.silu, torch.tanh, F.tanh, F.leaky_relu, F.hardswish,
    F.elu, F.mish, F.hardtanh, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, torch.neg,
    operator.neg, torch.abs, operator.abs,
}
_ZERO_KEEPING_METHODS = {"relu", "tanh", "contiguous", "clone", "neg", "abs", "detach", "float",
                         "to", "type_as", "relu_"}
_POOL_FUNCS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
               F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
               F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate}
_RESHAPE_FUNCS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze"}
_MERGE_FUNCS = {operator.add, operator.sub, operator.mul, torch.add, torch.sub, torch.mul,
                operator.iadd, operator.isub, operator.imul}
_MERGE_METHODS = {"add", "sub", "mul", "add_", "sub_", "mul_"}
_META_METHODS = {"size", "dim", "numel", "ndimension", "nelement", "get_device"}
_KNOWN_FUNCS = (_ZERO_KEEPING_FUNCS | _POOL_FUNCS | _RESHAPE_FUNCS | _MERGE_FUNCS
                | {torch.cat, torch.concat, getattr, operator.getitem, operator.truediv, torch.div,
                   operator.itruediv, torch.transpose, torch.swapaxes, torch.permute, torch.mean,
                   torch.sum, torch.chunk})


def is_conv1d(mod: nn.Module) -> bool:
    """A Hugging Face ``Conv1D`` (GPT-2): a ``Linear`` with a transposed ``[in, out]`` weight."""
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "nf") and hasattr(mod, "nx")


def _prod(xs) -> int:
    return int(math.prod(xs))


@dataclass(frozen=True)
class Layout:
    """Where a tensor's prunable channels are: dim ``cdim`` of an ``ndim``-dim tensor holds the
    segments ``((space, inner), ...)`` in order; each channel of a segment spans ``inner``
    consecutive positions."""

    cdim: int
    ndim: int
    segs: tuple

    def moved(self, cdim: int, ndim: int, segs=None) -> "Layout":
        return Layout(cdim, ndim, self.segs if segs is None else segs)

    @property
    def rel(self) -> int:  # the channel dim counted from the end
        return self.cdim - self.ndim


@dataclass
class Slice:
    """One coupled slice of a group: ``module``'s parameter dim ``dim`` (``role`` is ``"out"`` for
    a producer's output rows, ``"in"`` for a consumer's input columns, ``"channel"`` for a
    per-channel layer), at ``offset`` (in positions of that dim) with ``inner`` positions per unit."""

    module: str
    role: str
    dim: int
    offset: int
    inner: int
    size: int
    param: str = "weight"

    def describe(self) -> str:
        if self.role == "channel":
            return f"{self.module}[channels]" + (f" at offset {self.offset}" if self.offset else "")
        text = f"{self.module}.{self.param}[dim {self.dim}]"
        if self.offset:
            text += f" at offset {self.offset}"
        if self.inner != 1:
            text += f" ({self.inner} per unit)"
        return text

    def index_range(self) -> tuple:
        return (self.offset, self.offset + self.size * self.inner)


@dataclass
class Group:
    """Units pruned together: unit ``k`` is output channel ``k`` of every producer in
    ``producers``, with every slice in ``slices``."""

    name: str
    size: int
    producers: list
    slices: list
    owners: list  # (module name, module type) whose search-space rules apply
    balance: int = 1  # kept units must be spread equally over ``balance`` contiguous chunks (GroupNorm)
    handler: Any = None  # attention heads: a :class:`~gradprune.structured.attention.HeadHandler`
    rule_type: str | None = None  # rule key for the owners (default: handler's, else the class)
    kind: str | None = None  # family across layers ("bert.ffn", "llama.heads"…) for uniform widths

    @property
    def unit(self) -> str:
        return getattr(self.handler, "unit", "heads") if self.handler is not None else "channels"

    def modules(self) -> list:
        return sorted({s.module for s in self.slices})


@dataclass
class Analysis:
    """Result of :func:`find_groups`: the ``groups``, what was ``skipped`` (and why), and the
    per-module layouts used by gates, costs and export."""

    model: nn.Module
    groups: list
    skipped: list
    roles: dict  # module name -> {"out": Layout|None, "in": Layout|None, "through": Layout|None}
    mask_points: dict  # module name -> (Layout, kind) with kind in {"mul", "layernorm", "groupnorm"}
    space_group: dict  # space id -> group index
    space_size: list

    def group(self, name: str) -> Group:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(f"no group named {name!r}; groups: {', '.join(g.name for g in self.groups)}")

    def width_of(self, layout: Layout, widths: dict) -> int:
        """Number of positions along ``layout.cdim`` when group ``i`` keeps ``widths[i]`` units."""
        total = 0
        for space, inner in layout.segs:
            gi = self.space_group.get(space)
            n = self.space_size[space] if gi is None else widths.get(gi, self.space_size[space])
            total += n * inner
        return total

    def indices_of(self, layout: Layout, keep: dict) -> torch.Tensor:
        """Kept positions along ``layout.cdim`` when group ``i`` keeps units ``keep[i]``."""
        parts, base = [], 0
        for space, inner in layout.segs:
            size = self.space_size[space]
            gi = self.space_group.get(space)
            units = torch.arange(size) if gi is None or gi not in keep else torch.as_tensor(keep[gi])
            idx = (units.view(-1, 1) * inner + torch.arange(inner).view(1, -1)).reshape(-1)
            parts.append(idx + base)
            base += size * inner
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


# --------------------------------------------------------------------------------------------
# tracing


class _Tracer(fx.Tracer):
    def __init__(self, opaque: set, leaves: frozenset = frozenset()):
        super().__init__()
        self.opaque = opaque
        self.leaves = leaves
        self.failed: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.opaque or qualname in self.leaves or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        qual = self.path_of_module(m)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed is None:
                self.failed = qual
            raise


def _trace(model: nn.Module, max_retries: int = 64, leaves: frozenset = frozenset()):
    opaque: dict = {}
    for _ in range(max_retries):
        tracer = _Tracer(set(opaque), leaves)
        try:
            graph = tracer.trace(model)
            return fx.GraphModule(model, graph), opaque
        except Exception as exc:  # noqa: BLE001 - any tracing failure makes a module opaque
            if tracer.failed is None or tracer.failed in opaque:
                return None, {"": f"torch.fx cannot trace the model: {type(exc).__name__}: {exc}"}
            opaque[tracer.failed] = f"torch.fx cannot trace it ({type(exc).__name__}: {exc})"
    return None, {"": "torch.fx tracing kept failing"}


# --------------------------------------------------------------------------------------------
# layout propagation


class _Propagator(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, opaque: dict, functional: dict | None = None):
        super().__init__(gm)
        self.functional = functional or {}  # module name -> FunctionalAttention (traced as leaves)
        self.modules = dict(gm.named_modules())
        self.opaque = opaque
        self.layouts: dict = {}
        self.space_size: list = []
        self.space_owner: list = []
        self.parent: list = []
        self.blocked: dict = {}
        self.module_space: dict = {}
        self.roles: dict = {}
        self.mask_points: dict = {}
        self.head_handlers: dict = {}  # space id -> HeadHandler
        # channel counts read as numbers (``x.shape``, ``x.size()``): see :meth:`_track_sizes`
        self.shapes: dict = {}  # node -> Layout of the tensor whose shape it is
        self.sizes: dict = {}  # node -> layouts whose channel counts the value is computed from
        self.size_uses: list = []  # (node name, size layouts, layouts of the tensors it sizes)
        self.param_owner = {}
        for mname, mod in self.modules.items():
            for pname, p in mod.named_parameters(recurse=False):
                self.param_owner[f"{mname}.{pname}" if mname else pname] = mname

    # -- union-find over spaces ---------------------------------------------------------------
    def new_space(self, size: int, owner: str) -> int:
        self.space_size.append(size)
        self.space_owner.append(owner)
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def block(self, layouts, reason: str) -> None:
        for lay in layouts:
            if isinstance(lay, _Parts):
                self.block(lay, reason)
                continue
            if lay is None:
                continue
            for space, _ in lay.segs:
                reasons = self.blocked.setdefault(space, [])
                if reason not in reasons:
                    reasons.append(reason)

    def unify(self, a: Layout, b: Layout, reason: str, same_dims: bool = True) -> bool:
        ok = len(a.segs) == len(b.segs) and all(
            ia == ib and self.space_size[sa] == self.space_size[sb]
            for (sa, ia), (sb, ib) in zip(a.segs, b.segs))
        if same_dims:
            ok = ok and a.cdim == b.cdim and a.ndim == b.ndim
        else:
            ok = ok and a.rel == b.rel
        if not ok:
            self.block([a, b], reason)
            return False
        for (sa, _), (sb, _) in zip(a.segs, b.segs):
            self.union(sa, sb)
        return True

    def record(self, module: str, role: str, lay: Layout | None) -> None:
        if lay is None:
            return
        slot = self.roles.setdefault(module, {})
        if role in slot:
            self.unify(slot[role], lay, f"{module} is called on differently laid-out inputs",
                       same_dims=False)
        else:
            slot[role] = lay

    def add_mask_point(self, module: str, lay: Layout, kind: str) -> None:
        old = self.mask_points.get(module)
        if old is None:
            self.mask_points[module] = (lay, kind)
        elif old[0] != lay and not self.unify(old[0], lay, f"{module} is reused with other channels",
                                              same_dims=False):
            pass

    # -- interpreter ----------------------------------------------------------------------------
    def run_node(self, n: fx.Node):
        from .blocks import identity_probe, is_identity
        before = identity_probe(n, self.env, self.layouts, _KNOWN_FUNCS)
        result = super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        ins = [self.layouts.get(a) for a in n.all_input_nodes]
        ins_present = [lay for lay in ins if lay is not None]
        try:
            if before is not None and is_identity(before, args, result):
                out = self.layouts[n.args[0]]  # e.g. stochastic depth in eval mode: x returned as is
            else:
                out = self._propagate(n, args, kwargs, result, ins_present)
        except _Unsupported as exc:
            self.block(ins_present, str(exc))
            out = None
        if isinstance(out, _Parts):
            if not (isinstance(result, (tuple, list)) and len(result) == len(out)):
                self.block([out], f"{n.name}: unexpected output")
                out = None
        elif out is not None and not (isinstance(result, torch.Tensor) and result.dim() == out.ndim):
            self.block([out], f"{n.name}: unexpected output")
            out = None
        self.layouts[n] = out
        self._track_sizes(n, args, kwargs, result)
        return result

    def _track_sizes(self, n, args, kwargs, result) -> None:
        """Follow channel counts read as numbers. ``B, N, C = x.shape`` makes ``C`` the width of
        ``x``'s channels; arithmetic on it keeps that; a tensor op given such a number (``reshape``,
        ``view``, ``expand``, ``torch.zeros``…) is checked in :meth:`finish`: its tensor inputs
        must carry those channels (``x.view(B, C, H, W)``), else the number sizes something that
        does not shrink with them (MaxViT's ``out.reshape(B, G, P, D)`` of the heads' output with
        ``D`` read from the residual stream), and both are left unpruned."""
        if n.op in ("placeholder", "get_attr", "output"):
            return
        first = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
        lay = self.layouts.get(first) if first is not None else None
        if isinstance(lay, Layout):
            if n.op == "call_function" and n.target is getattr and args[1] == "shape":
                self.shapes[n] = lay
                return
            if n.op == "call_method" and n.target == "size":
                dim = args[1] if len(args) > 1 else kwargs.get("dim")
                if dim is None:
                    self.shapes[n] = lay
                elif isinstance(dim, int) and dim % lay.ndim == lay.cdim:
                    self.sizes[n] = (lay,)
                return
            if n.op == "call_method" and n.target in ("numel", "nelement"):
                self.sizes[n] = (lay,)
                return
        if (n.op == "call_function" and n.target is operator.getitem and first in self.shapes
                and isinstance(args[1], (int, slice))):
            shape_of = self.shapes[first]
            picked = range(shape_of.ndim)[args[1]]
            if shape_of.cdim in (picked if isinstance(picked, range) else (picked,)):
                self.sizes[n] = (shape_of,)
            return
        from_sizes: list = []
        for a in n.all_input_nodes:
            for size_lay in self.sizes.get(a, ()) + ((self.shapes[a],) if a in self.shapes else ()):
                if size_lay not in from_sizes:
                    from_sizes.append(size_lay)
        if not from_sizes:
            return
        if isinstance(result, torch.Tensor) or n.op == "call_module" or (
                isinstance(result, (tuple, list)) and any(isinstance(r, torch.Tensor) for r in result)):
            tensors = [self.layouts.get(a) for a in n.all_input_nodes if a not in self.sizes
                       and a not in self.shapes]
            self.size_uses.append((n.name, tuple(from_sizes), [t for t in tensors if t is not None]))
        else:
            self.sizes[n] = tuple(from_sizes)

    def _propagate(self, n, args, kwargs, result, ins):
        if n.op == "placeholder":
            return None
        if n.op == "get_attr":
            owner = self.param_owner.get(n.target)
            if owner is not None:
                users = sorted({getattr(u.target, "__name__", str(u.target)) for u in n.users})
                self._taint(owner, f"parameter {n.target} is used outside its module"
                            + (f" (by {', '.join(users)})" if users else ""))
            return None
        if n.op == "output":
            self.block(ins, "output is a model output")
            return None
        if n.op == "call_module":
            return self._module(n, self.modules[n.target], args, kwargs, result, ins)
        if not ins:
            return None
        if n.op == "call_function":
            return self._function(n, n.target, args, kwargs, result, ins)
        if n.op == "call_method":
            return self._method(n, n.target, args, kwargs, result, ins)
        raise _Unsupported(f"{n.name}: unsupported node {n.op}")

    def _taint(self, module: str, reason: str) -> None:
        self.roles.setdefault(module, {})["taint"] = reason

    def _in_layout(self, n) -> Layout | None:
        first = n.args[0] if n.args else None
        return self.layouts.get(first) if isinstance(first, fx.Node) else None

    # -- modules --------------------------------------------------------------------------------
    def _module(self, n, m, args, kwargs, result, ins):
        name = n.target
        if isinstance(m, (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerEncoder)):
            return self._transformer(name, m, args, ins)
        if name in self.functional and name not in self.opaque:
            return self._functional(n, name, m, args, result, ins)
        x = self._in_layout(n)
        extra = [lay for lay in ins if lay is not x]
        if extra:
            raise _Unsupported(f"{name}: channels enter through a second argument")
        if name in self.opaque:
            raise _Unsupported(f"{name}: opaque (cannot be traced)")
        if isinstance(m, nn.Linear):
            if x is not None:
                if x.cdim != x.ndim - 1:
                    raise _Unsupported(f"{name}: channels are not on the last dim of its input")
                self.record(name, "in", x)
            return self._produce(name, m.out_features, result, result.dim() - 1)
        if isinstance(m, _CONV + _CONVT):
            transposed = isinstance(m, _CONVT)
            # a unit may span several consecutive channels (inner > 1, behind a channel shuffle)
            if x is not None and (x.cdim != 1 or (transposed and any(i != 1 for _, i in x.segs))):
                raise _Unsupported(f"{name}: channels are not dim 1 of its input")
            if m.groups == 1:
                self.record(name, "in", x)
                return self._produce(name, m.out_channels, result, 1)
            if (not transposed and m.groups == m.in_channels == m.out_channels
                    and m.padding_mode == "zeros"):
                if x is None:
                    self._skip_producer(name, "depthwise conv on channels that are not pruned (the "
                                        "model's input, or layers listed with their reason)")
                    return None
                self.record(name, "through", x)
                self.add_mask_point(name, x, "mul")
                return x
            self.block([x], f"{name}: grouped convolution (groups={m.groups}) that is not depthwise")
            self._skip_producer(name, f"grouped convolution (groups={m.groups}) that is not "
                                      "depthwise: its channels stay")
            return None
        if x is None:
            return None
        if isinstance(m, _BN + _IN + (nn.GroupNorm,)):
            if x.cdim != 1 or (isinstance(m, nn.GroupNorm) and any(i != 1 for _, i in x.segs)):
                raise _Unsupported(f"{name}: channels are not dim 1 of its input")
            self.record(name, "through", x)
            self.add_mask_point(name, x, "groupnorm" if isinstance(m, nn.GroupNorm) else "mul")
            return x
        if isinstance(m, nn.LayerNorm):
            if len(m.normalized_shape) != 1 or x.cdim != x.ndim - 1 or any(i != 1 for _, i in x.segs):
                raise _Unsupported(f"{name}: LayerNorm not over the channel dim alone")
            self.record(name, "through", x)
            self.add_mask_point(name, x, "layernorm")
            return x
        if isinstance(m, _ZERO_KEEPING):
            return x
        if isinstance(m, nn.PReLU) and m.num_parameters == 1:
            return x
        if isinstance(m, _ZERO_MOVING):
            self.add_mask_point(name, x, "mul")
            return x
        if isinstance(m, _POOL):
            if x.cdim != 1 or x.ndim < 3:
                raise _Unsupported(f"{name}: pooling over the channel dim")
            return x.moved(1, result.dim())
        if isinstance(m, nn.Flatten):
            return self._reshape(n, args[0].shape, result.shape, x)
        raise _Unsupported(f"{name}: unsupported module {type(m).__name__} consumes channels")

    # -- attention ------------------------------------------------------------------------------
    def _transformer(self, name, m, args, ins):
        """``MultiheadAttention`` (heads), ``TransformerEncoderLayer`` (heads and FFN neurons) and
        ``TransformerEncoder`` (each of its layers): the embed dim (residual stream) stays."""
        kind = type(m).__name__
        self.block(ins, f"{name}: the embed dim of {kind} is not pruned")
        if self.opaque and name in self.opaque:
            return None
        if isinstance(m, nn.MultiheadAttention):
            self._heads(name, m)
        elif isinstance(m, nn.TransformerEncoderLayer):
            self._encoder_layer(name, m, args[0].dim() if args else 3)
        else:
            for i, layer in enumerate(m.layers):
                if isinstance(layer, nn.TransformerEncoderLayer):
                    self._encoder_layer(f"{name}.layers.{i}", layer, args[0].dim() if args else 3)
                else:
                    self._skip_producer(f"{name}.layers.{i}", f"{type(layer).__name__} inside a "
                                        "TransformerEncoder is not analysed")
        return None

    def _heads(self, name, m):
        if name in self.module_space:
            return
        from .attention import MHAHeads, mha_unsupported
        reason = mha_unsupported(m)
        if reason is not None:
            self._skip_producer(name, reason)
            return
        space = self.new_space(m.num_heads, name)
        self.module_space[name] = space
        self.head_handlers[space] = MHAHeads(name, m)

    def _functional(self, n, name, m, args, result, ins):
        """An attention module that passes its projections' weights to a function (a registered
        :class:`~gradprune.structured.attention.FunctionalAttention`, traced as a leaf): its heads
        are a group once its behaviour checks out; its embed dim (the residual stream) stays."""
        from .attention import FunctionalHeads, check_functional
        from .blocks import PRUNABLE
        spec = self.functional[name]
        self.block(ins, f"{name}: the embed dim of {type(m).__name__} is not pruned")
        # its output is on the same (unpruned) embed dim: the residual stream stays one group,
        # listed with this reason
        x = self._in_layout(n)
        same = (x if x is not None and len(args) == 1 and isinstance(result, torch.Tensor)
                and result.shape == args[0].shape and x.cdim == x.ndim - 1 else None)
        if name in self.module_space:
            return same
        reason = None
        if len(args) != 1 or not isinstance(args[0], torch.Tensor):
            reason = f"{type(m).__name__} ({spec.name} functional attention) called with other arguments than one tensor"
        else:
            reason = check_functional(m, spec, args[0], result)
        if reason is not None:
            self._skip_producer(name, reason)
            return same
        handler = FunctionalHeads(name, m, spec)
        space = self.new_space(handler.n_heads, name)
        self.module_space[name] = space
        self.head_handlers[space] = handler
        sliced = handler.sliced_modules()
        for sub, mod in m.named_modules():
            if sub and sub not in sliced and isinstance(mod, PRUNABLE):
                self._skip_producer(f"{name}.{sub}", f"inside {name}, whose heads are pruned "
                                    f"({spec.name} functional attention); its own units stay")
        return same

    def _encoder_layer(self, name, m, ndim):
        self._heads(f"{name}.self_attn", m.self_attn)
        fc1, fc2 = f"{name}.linear1", f"{name}.linear2"
        if fc1 in self.module_space:
            return
        if not (isinstance(m.linear1, nn.Linear) and isinstance(m.linear2, nn.Linear)
                and isinstance(m.dropout, nn.Dropout)):
            self._skip_producer(fc1, "unexpected TransformerEncoderLayer feed-forward block")
            return
        space = self.new_space(m.linear1.out_features, fc1)
        self.module_space[fc1] = space
        lay = Layout(ndim - 1, ndim, ((space, 1),))
        self.record(fc1, "out", lay)
        self.record(fc2, "in", lay)
        # the gate goes after the activation (any activation), on the dropout before linear2
        self.add_mask_point(f"{name}.dropout", lay, "mul")

    def _produce(self, name, size, result, cdim):
        if not isinstance(result, torch.Tensor) or result.dim() < 2 or cdim == 0:
            self._skip_producer(name, "output has no batch dim")
            return None
        space = self.module_space.get(name)
        if space is None:
            space = self.new_space(size, name)
            self.module_space[name] = space
        lay = Layout(cdim, result.dim(), ((space, 1),))
        self.record(name, "out", lay)
        self.add_mask_point(name, lay, "mul")
        return lay

    def _skip_producer(self, name, reason):
        self.roles.setdefault(name, {}).setdefault("skip", reason)

    # -- functions and methods -------------------------------------------------------------------
    def _function(self, n, fn, args, kwargs, result, ins):
        x = self._in_layout(n)
        if fn is torch.cat or fn is torch.concat:
            return self._cat(n, args, kwargs, result)
        if fn in _MERGE_FUNCS:
            return self._merge(n, fn.__name__, args, result)
        if fn in (operator.truediv, torch.div, operator.itruediv):
            if x is not None and len(ins) == 1 and not isinstance(args[1], torch.Tensor):
                return x
            raise _Unsupported(f"{n.name}: division involving channels")
        if fn is getattr:
            return None  # .shape and the like
        if fn is operator.getitem:
            return self._getitem(n, args, result, x)
        if x is None or len(ins) != 1:
            raise _Unsupported(f"{n.name}: {getattr(fn, '__name__', fn)} mixes channel tensors")
        if fn in _ZERO_KEEPING_FUNCS:
            return x.moved(x.cdim, result.dim())
        if fn in _POOL_FUNCS:
            if x.cdim != 1 or x.ndim < 3:
                raise _Unsupported(f"{n.name}: pooling over the channel dim")
            return x.moved(1, result.dim())
        if fn in _RESHAPE_FUNCS:
            return self._reshape(n, args[0].shape, result.shape, x)
        if fn in (torch.transpose, torch.swapaxes):
            return self._transpose(x, args[1], args[2])
        if fn is torch.permute:
            return self._permute(x, args[1])
        if fn in (torch.mean, torch.sum):
            return self._reduce(n, args, kwargs, result, x)
        if fn is torch.chunk:
            return self._chunk(n, args, kwargs, result, x)
        raise _Unsupported(f"{n.name}: unsupported function {getattr(fn, '__name__', fn)} on channels")

    def _method(self, n, name, args, kwargs, result, ins):
        x = self._in_layout(n)
        if name in _META_METHODS:
            return None
        if name in _MERGE_METHODS:
            return self._merge(n, name, args, result)
        if name in ("div", "div_") and x is not None and len(ins) == 1 \
                and not isinstance(args[1], torch.Tensor):
            return x
        if x is None or len(ins) != 1:
            raise _Unsupported(f"{n.name}: .{name}() mixes channel tensors")
        if name in _ZERO_KEEPING_METHODS:
            if not isinstance(result, torch.Tensor):
                return None
            return x
        if name in _RESHAPE_METHODS:
            return self._reshape(n, args[0].shape, result.shape, x)
        if name in ("transpose", "swapaxes"):
            return self._transpose(x, args[1], args[2])
        if name == "permute":
            dims = args[1:] if not isinstance(args[1], (tuple, list)) else args[1]
            return self._permute(x, dims)
        if name in ("mean", "sum"):
            return self._reduce(n, args, kwargs, result, x)
        if name == "chunk":
            return self._chunk(n, args, kwargs, result, x)
        raise _Unsupported(f"{n.name}: unsupported method .{name}() on channels")

    def _merge(self, n, opname, args, result):
        a, b = args[0], args[1]
        la = self.layouts.get(n.args[0]) if isinstance(n.args[0], fx.Node) else None
        lb = self.layouts.get(n.args[1]) if isinstance(n.args[1], fx.Node) else None
        mul = "mul" in opname
        if la is not None and lb is not None:
            if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
                raise _Unsupported(f"{n.name}: {opname} of channel tensors of different shapes")
            if a.shape == b.shape:
                self.unify(la, lb, f"{n.name}: {opname} of differently laid-out channels")
                return la
            from .blocks import broadcast_merge  # squeeze-and-excitation: x * scale[N, C, 1, 1]
            lay = broadcast_merge(la, lb, a, b, result)
            if lay is None:
                raise _Unsupported(f"{n.name}: {opname} of channel tensors of different shapes")
            self.unify(la, lb, f"{n.name}: {opname} of differently laid-out channels", same_dims=False)
            return lay
        lay = la if la is not None else lb
        other = b if la is not None else a
        if mul and not isinstance(other, torch.Tensor):
            return lay  # scaling by a number keeps zeros
        raise _Unsupported(f"{n.name}: {opname} of channels with a non-channel operand")

    def _cat(self, n, args, kwargs, result):
        nodes = n.args[0]
        dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
        ndim = result.dim()
        dim = dim % ndim
        lays = [self.layouts.get(nd) if isinstance(nd, fx.Node) else None for nd in nodes]
        present = [lay for lay in lays if lay is not None]
        if not present:
            return None
        if all(lay is not None and lay.cdim == dim for lay in lays):
            segs = tuple(s for lay in lays for s in lay.segs)
            return Layout(dim, ndim, segs)
        if any(lay is None for lay in lays) or any(lay.cdim == dim for lay in present):
            # channels next to free positions: the free part has no producer to slice with it
            raise _Unsupported(f"{n.name}: cat mixes channel tensors with other tensors")
        first = present[0]
        for lay in present[1:]:
            self.unify(first, lay, f"{n.name}: cat of differently laid-out channels")
        return first

    def _getitem(self, n, args, result, x):
        if x is None:
            return None
        if isinstance(x, _Parts):  # a piece of a chunk
            if not isinstance(args[1], int):
                raise _Unsupported(f"{n.name}: indexing the pieces of a chunk")
            return x[args[1]]
        if not isinstance(result, torch.Tensor):
            raise _Unsupported(f"{n.name}: indexing a channel tensor")
        idx = args[1]
        if not isinstance(idx, tuple):
            idx = (idx,)
        ndim = x.ndim
        if sum(1 for i in idx if i is Ellipsis) > 1:
            raise _Unsupported(f"{n.name}: indexing")
        n_used = sum(1 for i in idx if i is not None and i is not Ellipsis)
        expanded = []
        for i in idx:
            if i is Ellipsis:
                expanded.extend([slice(None)] * (ndim - n_used))
            else:
                expanded.append(i)
        in_dim = out_dim = 0
        new_cdim = None
        for i in expanded:
            if i is None:
                out_dim += 1
                continue
            if in_dim == x.cdim:
                if not (isinstance(i, slice) and i == slice(None)):
                    raise _Unsupported(f"{n.name}: indexing the channel dim")
                new_cdim = out_dim
            if isinstance(i, int):
                in_dim += 1
            elif isinstance(i, slice):
                in_dim += 1
                out_dim += 1
            else:
                raise _Unsupported(f"{n.name}: advanced indexing of a channel tensor")
        if new_cdim is None:  # channel dim among the untouched trailing dims
            new_cdim = out_dim + (x.cdim - in_dim)
        return x.moved(new_cdim, result.dim())

    def _reduce(self, n, args, kwargs, result, x):
        dims = kwargs.get("dim", args[1] if len(args) > 1 else None)
        keep = kwargs.get("keepdim", args[2] if len(args) > 2 else False)
        if dims is None:
            raise _Unsupported(f"{n.name}: reduction over all dims")
        dims = [d % x.ndim for d in (dims if isinstance(dims, (tuple, list)) else (dims,))]
        if x.cdim in dims:
            raise _Unsupported(f"{n.name}: reduction over the channel dim")
        cdim = x.cdim if keep else x.cdim - sum(1 for d in dims if d < x.cdim)
        return x.moved(cdim, result.dim())

    def _transpose(self, x, d0, d1):
        d0, d1 = d0 % x.ndim, d1 % x.ndim
        cdim = d1 if x.cdim == d0 else d0 if x.cdim == d1 else x.cdim
        return x.moved(cdim, x.ndim)

    def _permute(self, x, dims):
        dims = [d % x.ndim for d in dims]
        return x.moved(dims.index(x.cdim), x.ndim)

    def _reshape(self, n, in_shape, out_shape, x):
        in_shape, out_shape = list(in_shape), list(out_shape)
        pre = _prod(in_shape[: x.cdim])
        rest = _prod(in_shape[x.cdim + 1:])
        j, acc = 0, 1
        while j < len(out_shape) and acc < pre:
            acc *= out_shape[j]
            j += 1
        while j < len(out_shape) - 1 and out_shape[j] == 1 and in_shape[x.cdim] != 1:
            j += 1
        if acc != pre or j >= len(out_shape):
            raise _Unsupported(f"{n.name}: reshape splits the channel dim")
        rest_out = _prod(out_shape[j + 1:])
        segs = []
        for space, inner in x.segs:
            span = inner * rest
            if span % rest_out:
                segs = None
                break
            segs.append((space, span // rest_out))
        if segs is None or sum(self.space_size[s] * i for s, i in segs) != out_shape[j]:
            c = in_shape[x.cdim]
            if (j + 1 < len(out_shape) and 1 < out_shape[j] < c and out_shape[j] * out_shape[j + 1] == c
                    and _prod(out_shape[j + 2:]) == rest):
                # [N, C, ...] -> [N, g, C/g, ...], a channel shuffle's first step
                first = self._equal_pieces(n, x.segs, out_shape[j], "a reshape into channel groups")[0]
                return Layout(j + 1, len(out_shape), first)
            raise _Unsupported(f"{n.name}: reshape splits " + ("channel units" if segs is None else "the channel dim"))
        return Layout(j, len(out_shape), tuple(segs))

    def _equal_pieces(self, n, segs, g: int, what: str) -> list:
        """Split ``segs`` into ``g`` pieces of equal width made of whole segments with the same
        structure, and merge piece ``k``'s spaces with piece 0's (unit ``u`` of every piece is cut
        together, so the pieces stay equal, as a channel shuffle or ``chunk`` of the pruned model
        needs); ``_Unsupported`` when a piece boundary cuts through one layer's channels."""
        total = sum(self.space_size[s] * i for s, i in segs)
        if total % g:
            raise _Unsupported(f"{n.name}: {what} of {total} channels into {g} unequal pieces")
        per, pieces, cur, pos = total // g, [], [], 0
        for space, inner in segs:
            cur.append((space, inner))
            pos += self.space_size[space] * inner
            if pos == per:
                pieces.append(tuple(cur))
                cur, pos = [], 0
            elif pos > per:
                raise _Unsupported(
                    f"{n.name}: {what} cuts through the channels of {self.space_owner[space]} (pieces of "
                    f"{per} channels); pruning them would couple channels within that layer (e.g. a "
                    "ShuffleNetV2 unit's split after the previous unit's shuffle), so they stay")
        first = pieces[0]
        for piece in pieces[1:]:
            if len(piece) != len(first) or any(
                    ia != ib or self.space_size[sa] != self.space_size[sb]
                    for (sa, ia), (sb, ib) in zip(first, piece)):
                raise _Unsupported(f"{n.name}: {what} into pieces made of different layers")
        for piece in pieces[1:]:
            for (sa, _), (sb, _) in zip(first, piece):
                self.union(sa, sb)
        return pieces

    def _chunk(self, n, args, kwargs, result, x):
        """``chunk`` along the channel dim into pieces of whole, equally built layers (merged
        piece by piece, see :meth:`_equal_pieces`); along another dim it keeps the layout."""
        dim = kwargs.get("dim", args[2] if len(args) > 2 else 0) % x.ndim
        if not isinstance(result, (tuple, list)) or not all(
                u.op == "call_function" and u.target is operator.getitem for u in n.users):
            raise _Unsupported(f"{n.name}: chunk whose pieces are not taken one by one")
        if dim != x.cdim:
            return _Parts(x.moved(x.cdim, r.dim()) for r in result)
        pieces = self._equal_pieces(n, x.segs, len(result), "chunk")
        return _Parts(Layout(x.cdim, x.ndim, p) for p in pieces)

    # -- finishing --------------------------------------------------------------------------------
    def finish(self, model: nn.Module) -> Analysis:
        # a module whose parameters are used elsewhere or shared cannot be sliced
        seen: dict = {}
        for mname, mod in model.named_modules(remove_duplicate=False):
            for p in mod.parameters(recurse=False):
                if id(p) in seen and seen[id(p)] != mname:
                    self._taint(mname, f"shares a parameter with {seen[id(p)]}")
                    self._taint(seen[id(p)], f"shares a parameter with {mname}")
                seen.setdefault(id(p), mname)
        for mname, slot in self.roles.items():
            if "taint" in slot:
                self.block([slot.get(r) for r in ("out", "in", "through")], f"{mname}: {slot['taint']}")
        listed: set = set()  # one reason per residual stream is enough
        for node, sized, tensors in self.size_uses:
            carried = {self.find(s) for t in _flat_layouts(tensors) for s, _ in t.segs}
            needed = {self.find(s) for t in sized for s, _ in t.segs}
            if not needed <= carried and not needed <= listed:
                listed |= needed
                owners = sorted({self.space_owner[s] for t in sized for s, _ in t.segs})
                self.block(list(sized) + tensors,
                           f"{node}: the channel count of {', '.join(owners)} (read with .shape or "
                           ".size()) sizes a tensor that does not carry those channels")
        # a group is blocked when any of its spaces is
        blocked_roots: dict = {}
        for space, reasons in self.blocked.items():
            acc = blocked_roots.setdefault(self.find(space), [])
            acc += [r for r in reasons if r not in acc]
        skipped = [{"module": name, "reason": reason} for name, reason in self.opaque.items()]
        for mname, slot in self.roles.items():
            if "skip" in slot:
                skipped.append({"module": mname, "reason": slot["skip"]})
        order = {name: i for i, name in enumerate(self.modules)}
        roots: dict = {}
        for space in sorted(range(len(self.parent)), key=lambda s: order[self.space_owner[s]]):
            root = self.find(space)
            if root in blocked_roots:
                skipped.append({"module": self.space_owner[space],
                                "reason": "; ".join(blocked_roots[root])})
                continue
            roots.setdefault(root, []).append(space)
        space_group = {}
        groups = []
        for gi, (root, spaces) in enumerate(roots.items()):
            for s in spaces:
                space_group[s] = gi
            groups.append(Group(name=self.space_owner[spaces[0]], size=self.space_size[root],
                                producers=[self.space_owner[s] for s in spaces], slices=[],
                                owners=[]))
            handler = self.head_handlers.get(spaces[0])
            if handler is not None:
                groups[-1].handler = handler
                groups[-1].slices = handler.slices()
                groups[-1].owners = handler.owners(self.modules)
        roles = {m: {r: slot[r] for r in ("out", "in", "through") if r in slot}
                 for m, slot in self.roles.items()
                 if "taint" not in slot and any(r in slot for r in ("out", "in", "through"))}
        for mname in sorted(roles, key=lambda m: order.get(m, 0)):
            mod = self.modules[mname]
            for role in ("out", "through", "in"):
                lay = roles[mname].get(role)
                if lay is None:
                    continue
                offset = 0
                for space, inner in lay.segs:
                    gi = space_group.get(space)
                    if gi is not None:
                        g = groups[gi]
                        dim = _param_dim(mod, role)
                        g.slices.append(Slice(mname, "channel" if role == "through" else role,
                                              dim, offset, inner, g.size))
                        if role != "in" and (mname, type(mod)) not in g.owners:
                            g.owners.append((mname, type(mod)))
                        if isinstance(mod, nn.GroupNorm):
                            g.balance = math.lcm(g.balance, mod.num_groups)
                    offset += self.space_size[space] * inner
        mask_points = {m: v for m, v in self.mask_points.items()
                       if any(s in space_group for s, _ in v[0].segs)}
        # groups whose GroupNorm balance does not divide the width cannot be pruned evenly
        for g in groups:
            if g.size % g.balance:
                g.balance = g.size
        return Analysis(model=model, groups=groups, skipped=skipped, roles=roles,
                        mask_points=mask_points, space_group=space_group,
                        space_size=list(self.space_size))


def _param_dim(mod: nn.Module, role: str) -> int:
    if isinstance(mod, _CONVT):
        return 1 if role == "out" else 0
    if role == "in":
        return 1
    return 0


class _Unsupported(Exception):
    pass


class _Parts(tuple):
    """The layouts of the pieces of a ``chunk`` (one per piece)."""


def _flat_layouts(layouts) -> list:
    out = []
    for lay in layouts:
        out += _flat_layouts(lay) if isinstance(lay, _Parts) else [lay] if lay is not None else []
    return out


def _as_args(example_input) -> tuple:
    if isinstance(example_input, torch.Tensor):
        return (example_input,)
    if isinstance(example_input, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in example_input):
        return tuple(example_input)
    raise TypeError(
        f"example_input must be a tensor or a tuple of tensors, got {type(example_input).__name__}")


# analysers of models torch.fx cannot trace (Hugging Face: structured.hf registers its own), tried
# in order before tracing: fn(model, example_input, mlp_gate=...) -> Analysis | None (not theirs)
_ANALYSERS: list = []


def register_analyser(fn):
    """Register ``fn(model, example_input, mlp_gate=...) -> Analysis | None``, tried by
    :func:`find_groups` before tracing (``None``: not a model it knows).

    Example: ``register_analyser(lambda model, example_input, mlp_gate: None)``."""
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if fn not in _ANALYSERS:
        _ANALYSERS.append(fn)
    return fn


# checks of a finished analysis, run in order by :func:`find_groups`:
# fn(analysis, example_input) -> Analysis (the same, or one with groups moved to ``skipped``)
_CHECKS: list = []


def register_check(fn):
    """Register ``fn(analysis, example_input) -> Analysis``, run by :func:`find_groups` on every
    analysis it returns (e.g. ``structured.export`` checks that slicing the heads of attention
    classes recognised by structure alone reproduces the gated output).

    Example: ``register_check(lambda analysis, example_input: analysis)``."""
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if fn not in _CHECKS:
        _CHECKS.append(fn)
    return fn


def _checked(analysis: Analysis, example_input) -> Analysis:
    for check in _CHECKS:
        analysis = check(analysis, example_input)
    return analysis


def find_groups(model: nn.Module, example_input, mlp_gate: str = "post_activation") -> Analysis:
    """Find the dependency groups of ``model`` by tracing it and running it on ``example_input``.

    Returns an :class:`Analysis` with the prunable ``groups`` and the ``skipped`` modules (each a
    ``{"module": name, "reason": text}``). The model is run once in eval mode without gradients
    and is not modified. ``mlp_gate`` (recognised transformer MLPs, e.g. Hugging Face models):
    gate FFN neurons after the activation (``"post_activation"``) or on the up projection's
    output (``"pre_activation"``, ModelOpt's position).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if mlp_gate not in ("post_activation", "pre_activation"):
        raise ValueError(f"mlp_gate must be 'post_activation' or 'pre_activation', got {mlp_gate!r}")
    args = _as_args(example_input)
    from .blocks import list_unpruned
    for analyse in _ANALYSERS:
        found = analyse(model, example_input, mlp_gate=mlp_gate)
        if found is not None:
            return list_unpruned(_checked(found, example_input))
    was_training = model.training
    try:
        model.eval()  # traced and run in eval mode: stochastic depth, dropout are identities
        from .attention import functional_attention_spec
        functional = {name: spec for name, mod in model.named_modules()
                      if name and (spec := functional_attention_spec(mod)) is not None}
        gm, opaque = _trace(model, leaves=frozenset(functional))
        if gm is None:
            return Analysis(model=model, groups=[], skipped=[{"module": k, "reason": v}
                                                             for k, v in opaque.items()],
                            roles={}, mask_points={}, space_group={}, space_size=[])
        prop = _Propagator(gm, opaque, functional)
        with torch.no_grad():
            prop.run(*args)
    finally:
        model.train(was_training)
    taints = {m: slot["taint"] for m, slot in prop.roles.items() if "taint" in slot}
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    return list_unpruned(prop.finish(model), taints, called)
