"""Depth pruning: whole decoder layers as units (the ``"layers"`` axis of :func:`~gradprune.structured.search`).

The decoder layers are found structurally (:func:`decoder_layers`): the model's ``layers``
``ModuleList`` of repeated blocks of one class (LLaMA, Mistral, Qwen2/3, Gemma, Phi-3, ... in
Hugging Face ``transformers``). Each layer ``i`` gets a scalar gate ``g_i`` on its residual branch,
``output = input + g_i * (block(input) - input)`` (``g_i = 1`` is the model as it is, ``g_i = 0``
skips the layer), and a score (higher = more important; weights get no gradients):

- ``"gradnas"``: ``(dL/dg_i)^2`` at ``g = 1``, averaged over the batches;
- ``"block_influence"``: ``1 - cos(input, output)`` of the layer, averaged over all tokens of all
  batches (ShortGPT's block influence; padding tokens included);
- ``"loss_drop"``: ``L(model with g_i = 0) - L(model)``, averaged over the batches (one forward
  per layer and batch).

The budget (``params``, ``flops``, ``kv_cache``) is met by dropping the lowest-scored layers, as
few as needed; the counts are exact: params are the dense count minus the dropped layers' own
parameters, FLOPs the dense ``FlopCounterMode`` count minus the dropped layers' share of it,
KV-cache bytes per token the dense count times the fraction of layers kept. At least one layer
is kept. :meth:`LayerSearchResult.export` deletes the layers from the ``ModuleList``, renumbers
``layer_idx`` (so the KV cache works) and updates the config (``num_hidden_layers``, per-layer
lists such as ``layer_types``, ``max_window_layers``), so ``save_pretrained`` /
``AutoModelForCausalLM.from_pretrained`` round-trip.

Example:
    >>> import torch
    >>> import gradprune as gp
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...     num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1))
    >>> ids = torch.randint(0, 32, (2, 8))
    >>> loss_fn = lambda m, b: m(b, labels=b).loss
    >>> found = gp.search(model, {"params": "85%"}, [ids], loss_fn, method="block_influence",
    ...                   example_input=ids, axes=("layers",))
    >>> small = found.export()
    >>> small.config.num_hidden_layers == 4 - len(found.dropped)
    True
    >>> sum(p.numel() for p in small.parameters()) == found.params <= 0.85 * found.dense_params
    True
"""

from __future__ import annotations

import copy
import itertools
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_choice, check_int
from .._modes import preserve_modes
from .._progress import progress
from .._report import Report
from .checkpointing import checkpointed_layers
from .groups import _as_args
from .measured import latency_extra, latency_lines

__all__ = ["AXES", "DEFAULT_AXES", "LAYER_METHODS", "check_axes", "group_axis",
           "decoder_layers", "layer_scores", "LayerGates", "LayerReport", "LayerSearchResult",
           "search_layers", "drop_layers"]

AXES = ("heads", "mlp", "hidden", "layers", "experts")
DEFAULT_AXES = ("heads", "mlp")
LAYER_METHODS = ("gradnas", "block_influence", "loss_drop")
LAYER_CONSTRAINTS = ("params", "flops", "kv_cache")

# config fields that count layers from the front (Qwen2: layers >= max_window_layers slide)
_CONFIG_PREFIX_COUNTS = ("max_window_layers",)
# config fields that list layer indices (Qwen2-MoE: dense-MLP layers)
_CONFIG_INDEX_LISTS = ("mlp_only_layers",)


def check_axes(axes) -> tuple:
    """Validate ``axes`` (``None``: :data:`DEFAULT_AXES`, today's heads + MLP widths).

    Unknown names raise ``ValueError``.

    Example:
        >>> check_axes(None), check_axes(["layers"])
        (('heads', 'mlp'), ('layers',))
    """
    if axes is None:
        return DEFAULT_AXES
    if isinstance(axes, str) or not isinstance(axes, (tuple, list)):
        raise TypeError(f"axes must be a tuple of axis names such as ('heads', 'mlp') or ('layers',), "
                        f"got {type(axes).__name__} {axes!r}")
    if not axes:
        raise ValueError(f"axes must name at least one of {', '.join(AXES)}; got {axes!r}")
    for a in axes:
        if a not in AXES:
            raise ValueError(f"axes has an unknown axis {a!r}; known axes: {', '.join(AXES)}")
    out = tuple(dict.fromkeys(axes))
    return out


def group_axis(group) -> str:
    """The width axis a dependency group belongs to: ``"heads"`` for attention heads / KV
    groups, ``"mlp"`` for every other group of neurons or channels."""
    return "heads" if group.unit == "heads" else "mlp"


def decoder_layers(model: nn.Module) -> tuple:
    """``(qualified name, ModuleList)`` of the model's decoder layers: the one ``ModuleList``
    named ``layers`` whose children are all of one class (the repeated block).

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> m = LlamaForCausalLM(LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8,
        ...                      num_hidden_layers=2, num_attention_heads=2))
        >>> decoder_layers(m)[0]
        'model.layers'
    """
    found = [(name, mod) for name, mod in model.named_modules()
             if isinstance(mod, nn.ModuleList) and name.rsplit(".", 1)[-1] == "layers" and len(mod) > 0
             and len({type(c) for c in mod}) == 1]
    if len(found) != 1:
        what = "none" if not found else ", ".join(repr(n) for n, _ in found)
        raise ValueError(f"axes=('layers',) needs exactly one 'layers' ModuleList of repeated decoder "
                         f"blocks in {type(model).__name__}; found {what}")
    return found[0]


def _block_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


class LayerGates:
    """Forward hooks that put a scalar gate on each decoder layer's residual branch,
    ``out = in + g_i * (block(in) - in)``; a context manager that removes them on exit.

    ``values`` (a 1-D tensor, one entry per layer; may require grad) are the gates; layers whose
    gate is exactly 1 and needs no gradient run untouched. ``record`` (optional) is called as
    ``record(i, input, output)`` with the layer's input and (gated) output.

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> m = LlamaForCausalLM(LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8,
        ...                      num_hidden_layers=2, num_attention_heads=2)).eval()
        >>> ids = torch.tensor([[1, 2, 3]])
        >>> with LayerGates(m, torch.tensor([0.0, 0.0])):   # every layer skipped
        ...     out = m(ids, output_hidden_states=True).hidden_states
        >>> torch.equal(out[0], out[1])
        True
    """

    def __init__(self, model: nn.Module, values: torch.Tensor, record: Callable | None = None):
        self.name, self.layers = decoder_layers(model)
        if values.shape != (len(self.layers),):
            raise ValueError(f"values must have one gate per decoder layer ({len(self.layers)}), "
                             f"got shape {tuple(values.shape)}")
        self.values, self.record, self.handles = values, record, []

    def __enter__(self):
        for i, layer in enumerate(self.layers):
            self.handles.append(layer.register_forward_hook(self._hook(i), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []

    def _hook(self, i: int):
        def hook(mod, args, kwargs, output):
            x = _block_input(args, kwargs)
            y = output[0] if isinstance(output, tuple) else output
            g = self.values[i]
            if g.requires_grad or float(g) not in (0.0, 1.0):
                y = x + g.to(x.dtype) * (y - x)
            elif float(g) == 0.0:
                y = x
            if self.record is not None:
                self.record(i, x, y)
            return (y,) + tuple(output[1:]) if isinstance(output, tuple) else y
        return hook


@contextmanager
def _frozen(model: nn.Module):
    """No parameter requires grad inside (restored on exit)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def scoring_batches(model: nn.Module, data: Iterable, max_batches: int, what: str, method: str,
                    show_progress: bool | None):
    """Yield up to ``max_batches`` batches of ``data`` with ``model`` in eval mode and its
    parameters frozen (both restored after, also on error), with a progress bar; the frame of
    every axis's score loop (layers, hidden channels, experts). ``ValueError`` once ``data`` is
    exhausted without a batch."""
    bar = progress(total=None, desc=f"{what} ({method})", enable=show_progress)
    n = 0
    try:
        with _frozen(model), preserve_modes(model):
            model.eval()  # deterministic: a loss difference must not be dropout noise
            for batch in itertools.islice(iter(data), max_batches):
                n += 1
                bar.update(1)
                yield batch
    finally:
        bar.close()
    if n == 0:
        raise ValueError(f"data yielded no batches: {what} need at least one")


def _loss(loss_fn, model, batch) -> torch.Tensor:
    loss = loss_fn(model, batch)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}")
    return loss


def check_score_args(method: str, methods: tuple, max_batches: int, loss_fn) -> None:
    """The argument checks of every axis's score function (layers, hidden channels, experts):
    ``method`` one of ``methods``, ``max_batches >= 1``, ``loss_fn`` callable."""
    check_choice("method", method, methods)
    check_int("max_batches", max_batches, min_value=1)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(model, batch), got {type(loss_fn).__name__}")


def layer_scores(model: nn.Module, data: Iterable, loss_fn: Callable, method: str = "gradnas",
                 max_batches: int = 128, show_progress: bool | None = None,
                 gradient_checkpointing: bool = False) -> tuple:
    """Score every decoder layer (see the module docs); returns ``(scores, batches)`` with
    ``scores`` a float64 tensor, one entry per layer, higher = more important. The model runs in
    eval mode (restored after), its parameters with ``requires_grad=False`` (restored after).

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> m = LlamaForCausalLM(LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8,
        ...                      num_hidden_layers=3, num_attention_heads=2))
        >>> ids = torch.randint(0, 8, (2, 5))
        >>> s, n = layer_scores(m, [ids], lambda m, b: m(b, labels=b).loss, "loss_drop")
        >>> s.shape, n
        (torch.Size([3]), 1)
    """
    check_score_args(method, LAYER_METHODS, max_batches, loss_fn)
    _, layers = decoder_layers(model)
    n = len(layers)
    p = next(model.parameters())
    total = torch.zeros(n, dtype=torch.float64)
    count = torch.zeros(n, dtype=torch.float64)
    batches = 0
    for batch in scoring_batches(model, data, max_batches, "layer scores", method, show_progress):
        batches += 1
        if method == "gradnas":
            g = torch.ones(n, device=p.device, dtype=torch.float32, requires_grad=True)
            with LayerGates(model, g), (checkpointed_layers(model) if gradient_checkpointing
                                        else nullcontext()):
                loss = _loss(loss_fn, model, batch)
                (grad,) = torch.autograd.grad(loss, g)
            total += grad.detach().double().cpu() ** 2
            count += 1
        elif method == "block_influence":
            def record(i, x, y):
                cos = F.cosine_similarity(x.detach().double(), y.detach().double(), dim=-1)
                total[i] += float((1.0 - cos).sum())
                count[i] += cos.numel()
            with torch.no_grad(), LayerGates(model, torch.ones(n, device=p.device), record):
                _loss(loss_fn, model, batch)
        else:
            with torch.no_grad():
                base = float(_loss(loss_fn, model, batch))
                for i in range(n):
                    g = torch.ones(n, device=p.device)
                    g[i] = 0.0
                    with LayerGates(model, g):
                        total[i] += float(_loss(loss_fn, model, batch)) - base
                count += 1
    return total / count.clamp_min(1), batches


def _unique_numel(module: nn.Module, seen: set) -> int:
    out = 0
    for prm in module.parameters():
        if id(prm) not in seen:
            seen.add(id(prm))
            out += prm.numel()
    return out


class _LayerCosts:
    """Exact params, FLOPs and KV-cache bytes per token of the model with a set of layers dropped."""

    def __init__(self, model: nn.Module, example_input):
        from .flops import flop_counter
        from .kvcache import _config_elements, _element_size
        self.name, layers = decoder_layers(model)
        self.n = len(layers)
        self.dense_params = sum(prm.numel() for prm in model.parameters())
        # a parameter shared with the rest of the model stays when the layer goes
        outside = {id(prm) for prm in model.parameters()} - {id(prm) for prm in layers.parameters()}
        self.layer_params = [_unique_numel(layer, set(outside)) for layer in layers]
        counter = flop_counter(model, example_input)
        self.dense_flops = int(counter.get_total_flops())
        per_module = counter.get_flop_counts()
        self.layer_flops = []
        for i in range(self.n):
            suffix = f"{self.name}.{i}" if self.name else str(i)
            keys = [k for k in per_module if k == suffix or k.endswith("." + suffix)]
            self.layer_flops.append(int(sum(per_module[keys[0]].values())) if keys else 0)
        elements = _config_elements(model)
        cfg_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
        self.dense_kv = None if elements is None else elements * _element_size(model)
        self.layer_kv = (None if elements is None or cfg_layers != self.n
                         else elements * _element_size(model) // self.n)

    def of(self, dropped) -> dict:
        dropped = list(dropped)
        out = {"params": self.dense_params - sum(self.layer_params[i] for i in dropped),
               "flops": self.dense_flops - sum(self.layer_flops[i] for i in dropped)}
        if self.layer_kv is not None:
            out["kv_cache"] = self.dense_kv - self.layer_kv * len(dropped)
        return out

    def smallest(self) -> dict:
        """The smallest value of each count over every way of keeping one layer."""
        keeps = [self.of(j for j in range(self.n) if j != i) for i in range(self.n)]
        return {k: min(v[k] for v in keeps) for k in keeps[0]}

    def text(self, values: dict) -> str:
        dense = {"params": self.dense_params, "flops": self.dense_flops, "kv_cache": self.dense_kv}
        unit = {"kv_cache": " bytes/token"}
        return ", ".join(f"{k}={v}{unit.get(k, '')} ({v / max(dense[k], 1):.1%})" for k, v in values.items())


class LayerReport(Report):
    """What ``search(..., axes=("layers",))`` found: one row per decoder layer (``layer``,
    ``score``, ``kept``), then the layer count, params, FLOPs (and KV cache) of the dense model
    and of the subnet."""

    name_key = "layer"

    def __init__(self, rows: list, lines, extra):
        for r in rows:
            r.setdefault("density", 1.0 if r["kept"] else 0.0)
        super().__init__("layers", rows, ("layer", "score", "kept"), lines, extra)

    def plot_title(self) -> str:
        return "depth search: kept (1) or dropped (0) per decoder layer"


@dataclass
class LayerSearchResult:
    """What ``search(..., axes=("layers",))`` found: which decoder layers go. Nothing is cut
    until :meth:`export`.

    Attributes: ``model``, ``layers_name`` (qualified name of the layer list), ``method``,
    ``scores`` (one per layer, higher = more important), ``dropped`` / ``kept`` (layer indices),
    ``params`` / ``flops`` / ``kv_cache`` of the subnet and ``dense_*`` of the model,
    ``constraints`` (absolute bounds), ``batches``, ``axes``.
    """

    model: nn.Module
    layers_name: str
    method: str
    scores: torch.Tensor
    dropped: list
    kept: list
    params: int
    flops: int
    dense_params: int
    dense_flops: int
    constraints: dict
    batches: int = 0
    kv_cache: int | None = None
    dense_kv_cache: int | None = None
    axes: tuple = ("layers",)
    example_input: Any = None
    uniform: bool = True  # the export is a plain config: from_pretrained loads it
    extra: dict = field(default_factory=dict)

    def rows(self) -> list:
        return [{"layer": i, "score": f"{float(s):.4g}", "kept": i in self.kept}
                for i, s in enumerate(self.scores)]

    @property
    def report(self) -> "LayerReport":
        """Per-layer scores and whether each is kept, then params, FLOPs (and KV cache), as a
        :class:`~gradprune.report.Report` (``print(found.report)``, ``to_dict()``,
        ``to_markdown()``, ``plot()``)."""
        lines = [f"layers: {len(self.scores)} -> {len(self.kept)} (dropped {self.dropped}; "
                 f"scored by {self.method})",
                 f"params: {self.dense_params} -> {self.params} "
                 f"({self.params / max(self.dense_params, 1):.1%})",
                 f"flops:  {self.dense_flops} -> {self.flops} ({self.flops / max(self.dense_flops, 1):.1%})"]
        if self.kv_cache is not None:
            lines.append(f"kv_cache: {self.dense_kv_cache} -> {self.kv_cache} bytes/token "
                         f"({self.kv_cache / max(self.dense_kv_cache, 1):.1%})")
        lines += latency_lines(self)
        return LayerReport(self.rows(), lines, {
            "method": self.method, "dropped": list(self.dropped), "kept_layers": list(self.kept),
            "params": {"dense": self.dense_params, "subnet": self.params},
            "flops": {"dense": self.dense_flops, "subnet": self.flops},
            "kv_cache": {"dense": self.dense_kv_cache, "subnet": self.kv_cache}, **latency_extra(self)})

    def gates(self) -> LayerGates:
        """Gates with the dropped layers at 0 (skipped), the rest at 1 (a context manager)."""
        p = next(self.model.parameters())
        values = torch.ones(len(self.scores), device=p.device)
        values[self.dropped] = 0.0
        return LayerGates(self.model, values)

    def export(self, uniform: bool | None = None) -> nn.Module:
        """A deep copy of the model without the dropped layers (see :func:`drop_layers`)."""
        if uniform is not None and not isinstance(uniform, bool):
            raise TypeError(f"uniform must be bool or None, got {type(uniform).__name__}")
        # drop the layers from a weight-sharing copy first: only the kept layers' weights are copied
        return copy.deepcopy(drop_layers(_weight_sharing_copy(self.model), self.dropped))


def _weight_sharing_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s modules that shares its parameters and buffers (no weight memory):
    dropping layers from it leaves ``model`` intact, and a 1B model is not held twice."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def drop_layers(model: nn.Module, drop: Iterable[int]) -> nn.Module:
    """Delete decoder layers ``drop`` from ``model`` in place and return it: the layer list
    shrinks, every ``layer_idx`` attribute inside a kept layer is renumbered, and a Hugging Face
    config gets ``num_hidden_layers``, its per-layer lists (``layer_types``, any list with one
    entry per layer), ``max_window_layers`` and layer-index lists (``mlp_only_layers``) updated.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> m = LlamaForCausalLM(LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8,
        ...                      num_hidden_layers=3, num_attention_heads=2))
        >>> m = drop_layers(m, [0])
        >>> m.config.num_hidden_layers, m.model.layers[1].self_attn.layer_idx
        (2, 1)
    """
    name, layers = decoder_layers(model)
    n = len(layers)
    drop = sorted(set(int(i) for i in drop))
    if any(not 0 <= i < n for i in drop) or len(drop) >= n:
        raise ValueError(f"drop must be distinct layer indices in [0, {n}) keeping at least one, got {drop}")
    kept = [i for i in range(n) if i not in drop]
    new = nn.ModuleList([layers[i] for i in kept])
    for j, layer in enumerate(new):
        for mod in layer.modules():
            if isinstance(getattr(mod, "layer_idx", None), int):
                mod.layer_idx = j
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    setattr(parent, name.rsplit(".", 1)[-1], new)
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "num_hidden_layers", None) == n:
        _update_config(cfg, kept, n)
    return model


def _update_config(cfg, kept: list, n: int) -> None:
    for key, value in list(vars(cfg).items()):
        if isinstance(value, (list, tuple)) and len(value) == n and key not in _CONFIG_INDEX_LISTS:
            setattr(cfg, key, type(value)(value[i] for i in kept))
    for key in _CONFIG_PREFIX_COUNTS:
        value = getattr(cfg, key, None)
        if isinstance(value, int) and not isinstance(value, bool):
            setattr(cfg, key, sum(1 for i in kept if i < value))
    for key in _CONFIG_INDEX_LISTS:
        value = getattr(cfg, key, None)
        if isinstance(value, (list, tuple)):
            new_index = {old: j for j, old in enumerate(kept)}
            setattr(cfg, key, type(value)(new_index[i] for i in value if i in new_index))
    cfg.num_hidden_layers = len(kept)


def check_axis_inputs(what: str, data, loss_fn, constraints: dict, allowed, example_input,
                      max_batches: int) -> None:
    """Checks shared by the searches of the layer, expert and hidden axes and their staged
    combination (``what`` names the axis in the messages): ``example_input`` given (a tensor or
    a tuple of tensors), ``max_iter_data_loader`` (``max_batches``) at least 1, ``data`` given,
    ``loss_fn`` callable, ``constraints`` valid and each of its keys in ``allowed``."""
    from .search import CONSTRAINT_KEYS, parse_constraints

    if example_input is None:
        raise ValueError("example_input must be given (a tensor or a tuple of tensors), got None")
    _as_args(example_input)
    check_int("max_iter_data_loader", max_batches, min_value=1)
    if data is None:
        raise ValueError(f"data must be an iterable of batches for {what}, got None")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(model, batch) for {what}, "
                        f"got {type(loss_fn).__name__}")
    parse_constraints(constraints, {k: 1.0 for k in CONSTRAINT_KEYS})
    for key in constraints:
        if key not in allowed:
            raise ValueError(f"constraints[{key!r}] is not supported with {what} yet; "
                             f"use {', '.join(allowed)}")


def search_layers(model: nn.Module, constraints: dict, data: Iterable | None, loss_fn: Callable | None,
                  method: str, example_input, *, max_iter_data_loader: int = 128,
                  show_progress: bool | None = None, gradient_checkpointing: bool = False,
                  accept: Callable | None = None) -> LayerSearchResult:
    """``search(..., axes=("layers",))``: score the decoder layers with ``method`` (one of
    :data:`LAYER_METHODS`) and drop the lowest-scored ones until every constraint holds.
    ``accept(key, build)``: a further test of a candidate that meets the counted bounds (the
    measured latency bounds of :func:`~gradprune.structured.search.search`; ``build()`` returns the
    candidate model); its ``text()`` describes the last candidate it rejected."""
    from .search import parse_constraints

    check_choice("method", method, LAYER_METHODS)
    check_axis_inputs("axes=('layers',)", data, loss_fn, constraints, LAYER_CONSTRAINTS, example_input,
                      max_iter_data_loader)
    decoder_layers(model)
    costs = _LayerCosts(model, example_input)
    if "kv_cache" in constraints and costs.layer_kv is None:
        raise ValueError("constraints['kv_cache']: the model has no Hugging Face attention config "
                         "whose key/value cache gradprune can count")
    bounds = parse_constraints(constraints, {"params": costs.dense_params, "flops": costs.dense_flops,
                                             "kv_cache": costs.dense_kv or 0})
    asked = ", ".join(f"{k} <= {b:g}" for k, b in bounds.items())
    smallest = costs.smallest()
    if any(smallest[k] > b for k, b in bounds.items()):
        raise ValueError(f"no subnet meets constraints ({asked}) by dropping decoder layers: the "
                         f"smallest reachable (one of {costs.n} layers kept) are {costs.text(smallest)}")

    scores, batches = layer_scores(model, data, loss_fn, method, max_iter_data_loader, show_progress,
                                   gradient_checkpointing)
    order = sorted(range(costs.n), key=lambda i: (float(scores[i]), i))  # ties: lower index first
    for k in range(costs.n):
        values = costs.of(order[:k])
        if all(values[key] <= b for key, b in bounds.items()) and (
                accept is None or accept(k, lambda k=k: drop_layers(_weight_sharing_copy(model), order[:k]))):
            break
    else:  # the best-scored layer alone is still too big (layers of different sizes) or too slow
        raise ValueError(f"no subnet meets constraints ({asked}{accept.asked() if accept else ''}): keeping "
                         f"only the best-scored layer {order[-1]} gives {costs.text(costs.of(order[:-1]))}"
                         f"{accept.text() if accept else ''}")
    dropped = sorted(order[:k])
    return LayerSearchResult(
        model=model, layers_name=costs.name, method=method, scores=scores, dropped=dropped,
        kept=[i for i in range(costs.n) if i not in dropped], params=values["params"],
        flops=values["flops"], dense_params=costs.dense_params, dense_flops=costs.dense_flops,
        constraints=bounds, batches=batches, kv_cache=values.get("kv_cache"),
        dense_kv_cache=costs.dense_kv, example_input=example_input)
