"""Hidden-size pruning: residual-stream channels (the ``"hidden"`` axis of :func:`~gradprune.structured.search`).

Minitron's embedding-channel pruning for Hugging Face decoder models. Channel ``c`` of the
residual stream is removed everywhere at once: column ``c`` of the token embedding, entry ``c``
of every norm over the hidden size (weight and bias), input column ``c`` of every projection that
reads the residual stream (``q/k/v_proj``, ``gate/up_proj``, fused ``qkv_proj`` /
``gate_up_proj``, the LM head), output row ``c`` (and bias entry) of every projection that writes
to it (``o_proj``, ``down_proj``). Tied embeddings stay tied.

**Recognised by structure** (:func:`residual_map`): the embedding is
``model.get_input_embeddings()``, the LM head ``model.get_output_embeddings()``; the projections
are those of the attention and MLP blocks of the registry in :mod:`~gradprune.structured.hf`
(readers: their query/key/value and up/gate projections, writers: their output and down
projections); the norms are the modules with a 1-D ``weight`` (and optional ``bias``) of the
hidden size outside the attention blocks (per-head ``q_norm`` / ``k_norm`` are not touched);
the MoE blocks of the registry in :mod:`~gradprune.structured.experts` contribute their router
weight (``[E, hidden]``, a reader), their stacked experts (``gate_up [E, 2I, hidden]`` reads,
``down [E, hidden, I]`` writes: the experts module's output is gated) and any other projection of
the block reading the stream (Qwen2-MoE's ``shared_expert_gate``). A
norm must behave as an RMS norm (probed: scale-invariant, not shift-invariant, zero in, zero out
per channel) or as a layer norm (probed: ``(x - mean) / sqrt(var + eps) * weight (+ bias)``, as
``nn.LayerNorm``). Any other parameter or persistent buffer with a
dimension of the hidden size is *not understood*: the hidden size is then not pruned and the
error lists each such tensor with its reason.

**The gated model** (:class:`HiddenGates`): a gate ``g`` (one entry per channel) multiplies the
embedding output and the output of every writer, so ``g_c = 0`` makes channel ``c`` of the
residual stream exactly zero in every layer. An RMS norm over the hidden size divides by the
root mean square over *all* channels; after export it averages over the kept ones only, so the
gated model evaluates every norm over the kept channels (an RMS norm on ``alpha * x`` divided by
``alpha``, ``alpha = sqrt(hidden / kept)``, which is exactly the RMS over the kept channels, eps
included; a layer norm with its mean and variance over the kept channels). The exported
model then equals the gated model up to float rounding.

**Scores** (higher = more important; weights get no gradients; eval mode):

- ``"gradnas"``: ``(dL/dg_c)^2`` at ``g = 1``, averaged over the batches. ``g`` is the gate
  above, so the gradient sums channel ``c``'s effect at the embedding and at every layer's
  writes (a gate on the embedding output alone would miss the writes);
- ``"activation"`` (Minitron): the mean ``|x_c|`` over every token of the output of each norm
  over the hidden size, summed over the norms (every layer's and the final one; padding tokens
  included).

The denominator change of the norms is not part of the gradnas score (``g = 1`` keeps every
channel); it is part of the gated and exported models.

**Embedding scale.** Gemma multiplies the embeddings by ``sqrt(config.hidden_size)``; the export
has a smaller ``hidden_size`` and so a smaller factor. The factor of the dense and of the exported
model are measured (the first decoder layer's input over the embedding row) and their ratio is
folded into the embedding weights. With tied embeddings that would scale the LM head too, so the
inverse ratio is folded into the final norm's weight (``w / r`` for a norm that multiplies by
``w``, ``(1 + w) / r - 1`` for Gemma's ``1 + w``; the form is probed). Outputs stay equal.

**Budget.** Every kept channel costs the same parameters (one embedding column, one norm
entry per norm, one input column per reader, one output row per writer, one LM head column
when untied) and FLOPs (each reader, writer and the LM head is linear in the hidden size), so
``params(k)`` and ``flops(k)`` are exact: the dense counts (``FlopCounterMode``) minus
``hidden - k`` times the per-channel cost. The hidden size is a multiple of ``hidden_divisor``
(default: the largest power of two up to 64 dividing ``hidden_size``) that the model's config
accepts (LLaMA / Gemma configs require ``hidden_size % num_attention_heads == 0``).

**Export** (:func:`export_hidden`): a new model of the same class built from a config with
``hidden_size`` (and an explicit ``head_dim``, which LLaMA-style configs otherwise derive from
``hidden_size``) changed, its tensors filled with the sliced weights (sliced straight into them:
the model and the export are in memory, nothing else of their size): exactly what ``from_pretrained`` builds
from ``save_pretrained``, so plain ``AutoModelForCausalLM.from_pretrained`` loads it.

Example:
    >>> import torch
    >>> import gradprune as gp
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=32,
    ...     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)).eval()
    >>> ids = torch.randint(0, 32, (2, 8))
    >>> loss_fn = lambda m, b: m(b, labels=b).loss
    >>> found = gp.search(model, {"params": "80%"}, [ids], loss_fn, example_input=ids,
    ...                   axes=("hidden",), hidden_divisor=8)
    >>> small = found.export()
    >>> small.config.hidden_size == found.hidden_size < 32
    True
    >>> sum(p.numel() for p in small.parameters()) == found.params <= 0.8 * found.dense_params
    True
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .._checks import check_choice, check_int
from .._modes import preserve_modes
from .._report import Report
from .measured import latency_extra, latency_lines

__all__ = ["HIDDEN_METHODS", "HIDDEN_CONSTRAINTS", "ResidualMap", "residual_map", "HiddenGates",
           "hidden_scores", "hidden_widths", "HiddenSearchResult", "search_hidden",
           "export_hidden"]

HIDDEN_METHODS = ("gradnas", "activation")
HIDDEN_CONSTRAINTS = ("params", "flops")


# --------------------------------------------------------------------------------------------
# the residual stream of a model


@dataclass
class ResidualMap:
    """Where the hidden size (residual stream) of ``model`` lives (see :func:`residual_map`).

    ``embed`` / ``lm_head``: module names (``lm_head`` ``None`` when the model has no output
    embeddings); ``tied``: the LM head shares the embedding's weight; ``norms``: name -> kind
    (``"rms"`` or ``"layernorm"``); ``final_norm``: the norm outside the decoder layers (``None``
    if there is not exactly one); ``readers`` / ``writers``: projections reading the stream
    (input columns) and writing to it (output rows); ``head_dim``: the attention head size (for
    the exported config); ``stacked``: ``{parameter: dim}`` of the MoE blocks' router weights
    (``[E, hidden]``) and stacked expert weights (``gate_up [E, 2I, hidden]``, ``down [E, hidden,
    I]``); ``moe``: the names of those routers and experts modules; ``moe_writers``: the experts
    modules (their output is added to the stream)."""

    model: nn.Module
    hidden_size: int
    embed: str
    lm_head: str | None
    tied: bool
    norms: dict
    final_norm: str | None
    readers: list
    writers: list
    layers_name: str
    head_dim: int | None = None
    stacked: dict = field(default_factory=dict)
    moe: list = field(default_factory=list)
    moe_writers: list = field(default_factory=list)

    def slices(self) -> dict:
        """``{state-dict key: dim}``: the dimension of each tensor that holds the hidden size."""
        out = {f"{self.embed}.weight": 1}
        if self.lm_head is not None:
            out[f"{self.lm_head}.weight"] = 1
        modules = dict(self.model.named_modules())
        for n in self.norms:
            out[f"{n}.weight"] = 0
            if getattr(modules[n], "bias", None) is not None:
                out[f"{n}.bias"] = 0
        for n in self.readers:
            out[f"{n}.weight"] = 1
        for n in self.writers:
            out[f"{n}.weight"] = 0
            if getattr(modules[n], "bias", None) is not None:
                out[f"{n}.bias"] = 0
        out.update(self.stacked)
        return out

    def channel_params(self) -> int:
        """Parameters per residual channel (a tied weight counted once)."""
        params = dict(self.model.named_parameters(remove_duplicate=False))
        seen, total = set(), 0
        for key, dim in self.slices().items():
            p = params[key]
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() // p.shape[dim]
        return total


def _is_proj(mod) -> bool:
    from .hf import _is_proj as is_proj
    return is_proj(mod)


def _dims_of(mod) -> tuple:
    """(input features, output features) of a ``Linear`` / ``Conv1D``."""
    from .groups import is_conv1d
    return (mod.nx, mod.nf) if is_conv1d(mod) else (mod.in_features, mod.out_features)


def _eps(mod: nn.Module) -> float | None:
    for a in ("eps", "variance_epsilon", "epsilon"):
        v = getattr(mod, a, None)
        if isinstance(v, float) and not isinstance(v, bool):
            return v
    return None


def _layernorm(mod: nn.Module, x: torch.Tensor, mask: torch.Tensor, kept: int) -> torch.Tensor:
    """A layer norm with weight, optional bias and eps of ``mod`` over the channels of ``mask``."""
    m = mask.to(dtype=torch.float32, device=x.device)
    xf = x.float()
    mean = (xf * m).sum(-1, keepdim=True) / kept
    var = (((xf - mean) * m) ** 2).sum(-1, keepdim=True) / kept
    y = (xf - mean) / torch.sqrt(var + _eps(mod))
    if getattr(mod, "weight", None) is not None:
        y = y * mod.weight.float()
    if getattr(mod, "bias", None) is not None:
        y = y + mod.bias.float()
    return y * m


def _norm_kind(mod: nn.Module, size: int) -> str | None:
    """``"rms"`` for a norm that behaves as an RMS norm on a probe (scale-invariant, not
    shift-invariant, a zero channel stays zero); ``"layernorm"`` for one that is scale- and
    shift-invariant and computes ``(x - mean) / sqrt(var + eps) * weight (+ bias)`` with its own
    ``eps`` (``nn.LayerNorm``, Cohere's bias-free layer norm...); else ``None``."""
    if isinstance(mod, nn.LayerNorm) and mod.normalized_shape != (size,):
        return None
    p = mod.weight
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, size, generator=gen).to(device=p.device, dtype=p.dtype)
    x[:, 0] = 0.0
    tol = dict(rtol=1e-2, atol=1e-2) if p.dtype in (torch.float16, torch.bfloat16) else dict(rtol=1e-4, atol=1e-5)
    try:
        with torch.no_grad():
            y, y3, ys = mod(x), mod(3.0 * x), mod(x + 2.0)
    except Exception:  # noqa: BLE001 - a module that is not a norm over the last dim
        return None
    if y.shape != x.shape or not torch.allclose(y.float(), y3.float(), **tol):
        return None
    if torch.allclose(y.float(), ys.float(), **tol):  # mean-subtracting
        if _eps(mod) is None:
            return None
        with torch.no_grad():
            ref = _layernorm(mod, x, torch.ones(size), size)
        return "layernorm" if torch.allclose(y.float(), ref, **tol) else None
    if bool(y[:, 0].abs().max() > 0):
        return None
    return "rms"


def _weight_offset(mod: nn.Module) -> float | None:
    """``a`` of a norm that multiplies by ``a + weight`` (0: LLaMA's ``weight``; 1: Gemma's
    ``1 + weight``), probed with the weight set to 0 and to 1; ``None`` if neither."""
    w = mod.weight
    x = torch.randn(2, w.numel(), generator=torch.Generator().manual_seed(1)).to(w.device, w.dtype)
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            w.zero_()
            y0 = mod(x).float()
            w.fill_(1.0)
            y1 = mod(x).float()
    finally:
        with torch.no_grad():
            w.copy_(saved)
    tol = 1e-2 if w.dtype in (torch.float16, torch.bfloat16) else 1e-5
    if float(y0.abs().max()) <= tol * float(y1.abs().max()):
        return 0.0
    if torch.allclose(y1, 2.0 * y0, rtol=tol, atol=tol):
        return 1.0
    return None


def residual_map(model: nn.Module) -> ResidualMap:
    """The :class:`ResidualMap` of a Hugging Face decoder ``model`` (see the module docs), or
    ``ValueError`` listing every tensor of the hidden size that is not understood.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> m = LlamaForCausalLM(LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8,
        ...                      num_hidden_layers=1, num_attention_heads=2))
        >>> r = residual_map(m)
        >>> r.embed, r.lm_head, r.final_norm, r.writers
        ('model.embed_tokens', 'lm_head', 'model.norm', ['model.layers.0.self_attn.o_proj', 'model.layers.0.mlp.down_proj'])
    """
    from .depth import decoder_layers
    from .hf import _Builder, _is_hf, _match_attention, _match_mlp

    if not _is_hf(model):
        raise ValueError(f"the 'hidden' axis needs a Hugging Face PreTrainedModel, got {type(model).__name__}")
    embed_mod = model.get_input_embeddings()
    if not isinstance(embed_mod, nn.Embedding):
        raise ValueError(f"the 'hidden' axis needs an nn.Embedding as input embeddings, got "
                         f"{type(embed_mod).__name__}")
    h = embed_mod.embedding_dim
    cfg_h = getattr(getattr(model, "config", None), "hidden_size", None)
    if cfg_h != h:
        raise ValueError(f"config.hidden_size ({cfg_h}) differs from the embedding width ({h})")
    layers_name, _ = decoder_layers(model)
    names = {id(m): n for n, m in model.named_modules()}
    embed = names[id(embed_mod)]
    head_mod = model.get_output_embeddings()
    lm_head = names.get(id(head_mod)) if isinstance(head_mod, nn.Module) else None
    problems = []
    if lm_head is not None and (not _is_proj(head_mod) or _dims_of(head_mod)[0] != h):
        problems.append(f"{lm_head}: output embeddings of type {type(head_mod).__name__} do not read "
                        f"the hidden size {h} as a Linear")
    tied = lm_head is not None and head_mod.weight is embed_mod.weight

    b = _Builder(model)
    readers, writers, attention, head_dims = [], [], [], set()
    for name, mod in b.modules.items():
        match = _match_attention(b, name, mod)
        if match is None:
            continue
        _, projs, o = match
        b.claimed.update(projs.values())
        b.claimed.add(o)
        attention.append(name)
        readers += [p for p in projs.values() if p not in readers]
        writers.append(o)
        d = getattr(mod, "head_dim", None)
        if isinstance(d, int):
            head_dims.add(d)
    for name in b.modules:
        match = _match_mlp(b, name)
        if match is None:
            continue
        _, up, gate, _, down = match
        b.claimed.update(p for p in (up, gate, down) if p)
        readers += [p for p in (gate, up) if p]
        writers.append(down)
    stacked, moe, moe_writers = _moe_parts(model, b, h, readers, problems)
    for n in readers:
        if _dims_of(b.modules[n])[0] != h:
            problems.append(f"{n}: a recognised projection that reads {_dims_of(b.modules[n])[0]} "
                            f"features, not the hidden size {h} (cross-attention?)")
    for n in writers:
        if _dims_of(b.modules[n])[1] != h:
            problems.append(f"{n}: a recognised projection that writes {_dims_of(b.modules[n])[1]} "
                            f"features, not the hidden size {h}")

    def inside_attention(n):
        return any(n.startswith(a + ".") for a in attention)

    norms = {}
    proj_like = set(readers) | set(writers) | {embed} | ({lm_head} if lm_head else set())
    for name, mod in b.modules.items():
        if name in proj_like or inside_attention(name) or isinstance(mod, nn.Embedding) or _is_proj(mod):
            continue
        own = dict(mod.named_parameters(recurse=False))
        w = own.get("weight")
        if w is None or w.dim() != 1 or w.numel() != h:
            continue
        if any(k not in ("weight", "bias") or p.shape != (h,) for k, p in own.items()):
            problems.append(f"{name}: {type(mod).__name__} has parameters other than a weight and "
                            "bias of the hidden size")
            continue
        kind = _norm_kind(mod, h)
        if kind is None:
            problems.append(f"{name}: {type(mod).__name__} over the hidden size is neither a "
                            "layer norm nor an RMS norm (probed)")
            continue
        norms[name] = kind
    final = [n for n in norms if not n.startswith(layers_name + ".")]

    # every parameter of a mapped module is explained (a reader's bias has its output width)
    mapped = set(readers) | set(writers) | set(norms) | {embed} | ({lm_head} if lm_head else set())
    accounted = {id(p) for n in mapped for p in b.modules[n].parameters(recurse=False)}
    named = dict(model.named_parameters(remove_duplicate=False))
    accounted |= {id(named[key]) for key in stacked}
    # inside a recognised attention block, everything but the projections works on their
    # outputs (per-head q_norm / k_norm, OLMo2's q_norm over every head), not on the stream
    accounted |= {id(p) for a in attention for p in b.modules[a].parameters()}
    if not problems:
        for key, p in model.named_parameters():
            if id(p) not in accounted and h in p.shape:
                owner = key.rpartition(".")[0]
                problems.append(f"{key}: a parameter of shape {tuple(p.shape)} in "
                                f"{type(b.modules.get(owner)).__name__} that no recognised embedding, "
                                "norm or projection explains")
        persistent = set(model.state_dict().keys())
        for key, buf in model.named_buffers():
            if key in persistent and h in buf.shape:
                problems.append(f"{key}: a buffer of shape {tuple(buf.shape)} of the hidden size")
    if problems:
        shown = problems[:8] + ([f"... and {len(problems) - 8} more"] if len(problems) > 8 else [])
        raise ValueError(f"the hidden size of {type(model).__name__} cannot be pruned (left unpruned): "
                         + "; ".join(shown))
    return ResidualMap(model, h, embed, lm_head, tied, norms, final[0] if len(final) == 1 else None,
                       readers, writers, layers_name, head_dims.pop() if len(head_dims) == 1 else None,
                       stacked, moe, moe_writers)


def _moe_parts(model: nn.Module, b, h: int, readers: list, problems: list) -> tuple:
    """The hidden-size dimensions of the MoE blocks of the registry in
    :mod:`~gradprune.structured.experts`: ``({parameter: dim}, routers and experts modules,
    experts modules)``. Any other projection of a block that reads the stream (Qwen2-MoE's
    ``shared_expert_gate``) is added to ``readers``; a layout whose weights do not hold the
    hidden size where the spec says is added to ``problems``."""
    from .experts import find_moe_blocks

    stacked, moe, moe_writers = {}, [], []
    for blk in find_moe_blocks(model)[0]:
        router, experts = b.modules[blk.router], b.modules[blk.experts]
        gate_up = getattr(experts, blk.spec.gate_up, None)
        down = getattr(experts, blk.spec.down, None)
        if not (router.weight.shape[1] == h and isinstance(gate_up, nn.Parameter) and gate_up.dim() == 3
                and gate_up.shape[2] == h and isinstance(down, nn.Parameter) and down.dim() == 3
                and down.shape[1] == h):
            problems.append(f"{blk.name}: an MoE block whose router / {blk.spec.gate_up} / "
                            f"{blk.spec.down} do not hold the hidden size {h} where its layout says")
            continue
        stacked[f"{blk.router}.weight"] = 1
        stacked[f"{blk.experts}.{blk.spec.gate_up}"] = 2
        stacked[f"{blk.experts}.{blk.spec.down}"] = 1
        moe += [blk.router, blk.experts]
        moe_writers.append(blk.experts)
        b.claimed.update((blk.router, blk.experts))
        for name, mod in b.modules.items():
            if (name.startswith(blk.name + ".") and name not in b.claimed and name not in readers
                    and _is_proj(mod) and _dims_of(mod)[0] == h and _dims_of(mod)[1] != h):
                readers.append(name)
    return stacked, moe, moe_writers


# --------------------------------------------------------------------------------------------
# gates and scores


def _rms_pre(alpha: float):
    def hook(mod, args, kwargs):
        if args:
            return (args[0] * alpha,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] * alpha}
    return hook


def _rms_post(alpha: float):
    def hook(mod, args, output):
        return output / alpha
    return hook


def _layernorm_post(mask: torch.Tensor, kept: int):
    def hook(mod, args, kwargs, output):
        x = args[0] if args else kwargs["hidden_states"]
        return _layernorm(mod, x, mask, kept).to(output.dtype)
    return hook


class HiddenGates:
    """A context manager: ``values`` (one per residual channel; may require grad) multiply the
    embedding output and every writer's output; with ``normalise`` (the default when some value
    is 0) every norm over the hidden size averages over the channels whose value is not 0 (see the
    module docs), so a 0/1 mask gives the model the export computes.

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> m = LlamaForCausalLM(LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8,
        ...                      num_hidden_layers=1, num_attention_heads=2)).eval()
        >>> ids = torch.tensor([[1, 2, 3]])
        >>> mask = torch.tensor([1., 1., 0., 1., 1., 1., 0., 1.])
        >>> with torch.no_grad(), HiddenGates(residual_map(m), mask):
        ...     h = m(ids, output_hidden_states=True).hidden_states[-2]
        >>> float(h[..., 2].abs().max()), float(h[..., 6].abs().max())
        (0.0, 0.0)
    """

    def __init__(self, rmap: ResidualMap, values: torch.Tensor, normalise: bool | None = None):
        if values.shape != (rmap.hidden_size,):
            raise ValueError(f"values must have one entry per residual channel ({rmap.hidden_size}), "
                             f"got shape {tuple(values.shape)}")
        self.rmap, self.values, self.handles = rmap, values, []
        kept = int((values.detach() != 0).sum())
        self.kept = kept
        self.normalise = kept < rmap.hidden_size if normalise is None else bool(normalise)
        if self.normalise and kept == 0:
            raise ValueError("values keep no residual channel")

    def __enter__(self):
        modules = dict(self.rmap.model.named_modules())

        def gate(mod, args, output):
            return output * self.values.to(output.dtype)
        for n in [self.rmap.embed] + list(self.rmap.writers) + list(self.rmap.moe_writers):
            self.handles.append(modules[n].register_forward_hook(gate))
        if self.normalise:
            alpha = math.sqrt(self.rmap.hidden_size / self.kept)
            mask = (self.values.detach() != 0).float()
            for n, kind in self.rmap.norms.items():
                if kind == "rms":
                    self.handles.append(modules[n].register_forward_pre_hook(_rms_pre(alpha),
                                                                             with_kwargs=True))
                    self.handles.append(modules[n].register_forward_hook(_rms_post(alpha)))
                else:
                    self.handles.append(modules[n].register_forward_hook(_layernorm_post(mask, self.kept),
                                                                         with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for hd in self.handles:
            hd.remove()
        self.handles = []


def hidden_scores(model: nn.Module, data: Iterable, loss_fn: Callable, method: str = "gradnas",
                  max_batches: int = 128, show_progress: bool | None = None,
                  rmap: ResidualMap | None = None) -> tuple:
    """Score every residual channel (see the module docs); returns ``(scores, batches)``,
    ``scores`` float64 with one entry per channel (higher = more important). The model runs in
    eval mode, its parameters with ``requires_grad=False`` (both restored after).

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> m = LlamaForCausalLM(LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8,
        ...                      num_hidden_layers=1, num_attention_heads=2))
        >>> ids = torch.randint(0, 8, (2, 5))
        >>> s, n = hidden_scores(m, [ids], lambda m, b: m(b, labels=b).loss, "activation")
        >>> s.shape, n
        (torch.Size([8]), 1)
    """
    from .depth import _loss, check_score_args, scoring_batches

    check_score_args(method, HIDDEN_METHODS, max_batches, loss_fn)
    rmap = rmap or residual_map(model)
    h = rmap.hidden_size
    p = next(model.parameters())
    total = torch.zeros(h, dtype=torch.float64)
    batches = 0
    modules = dict(model.named_modules())
    for batch in scoring_batches(model, data, max_batches, "hidden scores", method, show_progress):
        batches += 1
        if method == "gradnas":
            g = torch.ones(h, device=p.device, dtype=torch.float32, requires_grad=True)
            with HiddenGates(rmap, g, normalise=False):
                loss = _loss(loss_fn, model, batch)
                (grad,) = torch.autograd.grad(loss, g)
            total += grad.detach().double().cpu() ** 2
        else:
            acc = torch.zeros(h, dtype=torch.float64)

            def record(mod, args, output):
                y = output.detach().abs().double().reshape(-1, h)
                acc.add_((y.sum(0) / max(y.shape[0], 1)).cpu())
            handles = [modules[n].register_forward_hook(record) for n in rmap.norms]
            try:
                with torch.no_grad():
                    _loss(loss_fn, model, batch)
            finally:
                for hd in handles:
                    hd.remove()
            total += acc
    return total / batches, batches


# --------------------------------------------------------------------------------------------
# widths, costs, export


def _default_divisor(h: int) -> int:
    d = 64
    while h % d:
        d //= 2
    return d


def _config_with(config, hidden: int, head_dim: int | None):
    """A copy of ``config`` with ``hidden_size`` (and an explicit ``head_dim``), or the
    config class's validation error."""
    data = config.to_dict()
    data["hidden_size"] = hidden
    if head_dim is not None:
        data["head_dim"] = head_dim
    data.pop("transformers_version", None)
    return type(config).from_dict(data)


def hidden_widths(rmap: ResidualMap, divisor: int) -> tuple:
    """The hidden sizes the search may pick: multiples of ``divisor`` up to ``hidden_size``
    (always included) that the model's config class accepts, ascending."""
    h = rmap.hidden_size
    config = rmap.model.config
    out = []
    for k in range(divisor, h, divisor):
        try:
            _config_with(config, k, rmap.head_dim)
        except Exception:  # noqa: BLE001 - the config class rejects it (e.g. k % heads)
            continue
        out.append(k)
    return tuple(out) + (h,)


class _HiddenCosts:
    """Exact params and FLOPs of the model with ``k`` residual channels."""

    def __init__(self, rmap: ResidualMap, example_input):
        from .flops import flop_counter
        model = rmap.model
        self.h = rmap.hidden_size
        self.dense_params = sum(p.numel() for p in model.parameters())
        self.channel_params = rmap.channel_params()
        counter = flop_counter(model, example_input)
        self.dense_flops = int(counter.get_total_flops())
        per_module = counter.get_flop_counts()
        names = list(rmap.readers) + list(rmap.writers) + list(rmap.moe) + ([rmap.lm_head] if rmap.lm_head else [])
        total = 0
        for n in names:
            keys = [k for k in per_module if k == n or k.endswith("." + n)]
            f = int(sum(per_module[keys[0]].values())) if keys else 0
            if f % self.h:
                raise ValueError(f"{n}: FLOPs {f} are not linear in the hidden size {self.h}")
            total += f
        self.channel_flops = total // self.h

    def of(self, k: int) -> dict:
        gone = self.h - k
        return {"params": self.dense_params - gone * self.channel_params,
                "flops": self.dense_flops - gone * self.channel_flops}

    def text(self, values: dict) -> str:
        dense = {"params": self.dense_params, "flops": self.dense_flops}
        return ", ".join(f"{k}={v} ({v / max(dense[k], 1):.1%})" for k, v in values.items())


class _Stop(Exception):
    pass


def _embed_factor(model: nn.Module, rmap_embed: str, layers_name: str) -> float | None:
    """The factor between the embedding row and the first decoder layer's input (Gemma:
    ``sqrt(hidden_size)``; 1 elsewhere), measured; ``None`` if they are not proportional."""
    modules = dict(model.named_modules())
    emb = modules[rmap_embed]
    first = modules[layers_name][0]
    seen = {}

    def hook(mod, args, kwargs):
        seen["x"] = args[0] if args else kwargs["hidden_states"]
        raise _Stop
    ids = torch.arange(min(emb.num_embeddings, 8), device=emb.weight.device)[None]
    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad(), preserve_modes(model):
            model.eval()
            model(ids)
    except _Stop:
        pass
    finally:
        handle.remove()
    x = seen["x"].double().reshape(-1, emb.embedding_dim)
    w = emb.weight.detach()[ids[0]].double()
    c = float((x * w).sum() / (w * w).sum().clamp_min(1e-30))
    tol = 1e-2 if emb.weight.dtype in (torch.float16, torch.bfloat16) else 1e-5
    if float((x - c * w).norm()) > tol * float(x.norm()) + 1e-12:
        return None
    return c


def _build(model: nn.Module, config) -> nn.Module:
    """A new model of ``model``'s class from ``config``, weights uninitialised, on its device
    and dtype."""
    p = next(model.parameters())
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        from contextlib import nullcontext as no_init_weights
    with no_init_weights(), torch.device(p.device):
        new = type(model)(config)
    if hasattr(new, "tie_weights"):  # no_init_weights skips the tying post_init does
        new.tie_weights()
    return new.to(dtype=p.dtype)


def _check_shapes(new: nn.Module, state: dict, k: int) -> None:
    """``ValueError`` naming the tensors whose shape the config with hidden size ``k`` builds
    differently from the sliced weights (a head size derived from ``hidden_size``...)."""
    built = new.state_dict()
    bad = [f"{key} {tuple(t.shape)} (the sliced weight is {tuple(state[key].shape)})"
           for key, t in built.items() if key in state and t.shape != state[key].shape]
    if bad:
        raise ValueError(f"{type(new).__name__}'s config cannot express hidden_size {k}: it builds "
                         + "; ".join(bad[:4]) + (" ..." if len(bad) > 4 else "")
                         + " (does its config derive a head size from hidden_size?); the hidden "
                         "size is left unpruned")


def _check_expressible(rmap: ResidualMap, k: int) -> None:
    """Build the model with hidden size ``k`` on the meta device and compare its shapes with
    the sliced weights' (before any scoring)."""
    model = rmap.model
    config = _config_with(model.config, k, rmap.head_dim)
    slices = rmap.slices()
    state = {}
    for key, t in model.state_dict().items():
        shape = list(t.shape)
        if key in slices:
            shape[slices[key]] = k
        state[key] = torch.empty(shape, device="meta")
    with torch.device("meta"):
        new = type(model)(config)
    _check_shapes(new, state, k)


def export_hidden(rmap: ResidualMap, keep: torch.Tensor) -> nn.Module:
    """A new model with only the residual channels ``keep`` (sorted indices): see the module
    docs. ``rmap.model`` is not changed.

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> m = LlamaForCausalLM(LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8,
        ...                      num_hidden_layers=1, num_attention_heads=2))
        >>> small = export_hidden(residual_map(m), torch.tensor([0, 1, 2, 3, 5, 7]))
        >>> small.config.hidden_size, small.config.head_dim, small.lm_head.weight.shape
        (6, 4, torch.Size([8, 6]))
    """
    model = rmap.model
    keep = torch.as_tensor(keep, dtype=torch.long).flatten()
    h = rmap.hidden_size
    if keep.numel() == 0 or len(set(keep.tolist())) != keep.numel() or \
            int(keep.min()) < 0 or int(keep.max()) >= h:
        raise ValueError(f"keep must be distinct channel indices in [0, {h}), at least one")
    keep = keep.sort().values
    k = keep.numel()
    config = _config_with(model.config, k, rmap.head_dim)
    slices = rmap.slices()
    source = model.state_dict()
    shapes = {}
    for key, t in source.items():
        shape = list(t.shape)
        if key in slices:
            shape[slices[key]] = k
        shapes[key] = torch.empty(shape, device="meta")
    new = _build(model, config)
    _check_shapes(new, shapes, k)
    target = new.state_dict()
    if set(target) != set(source):
        raise ValueError(f"the {type(new).__name__} built with hidden_size {k} has other tensors than "
                         f"the model: missing {sorted(set(source) - set(target))[:4]}, unexpected "
                         f"{sorted(set(target) - set(source))[:4]}")
    with torch.no_grad():  # straight into the new tensors: no sliced copy of the weights between
        for key, t in source.items():
            dim, out = slices.get(key), target[key]
            if dim is None:
                out.copy_(t)
            elif out.dtype == t.dtype and out.device == t.device and out.is_contiguous():
                torch.index_select(t, dim, keep.to(t.device), out=out)
            else:
                out.copy_(t.index_select(dim, keep.to(t.device)))
    if rmap.lm_head is not None and (new.get_output_embeddings().weight is
                                     new.get_input_embeddings().weight) != rmap.tied:
        raise ValueError(f"the exported {type(new).__name__} does not tie its embeddings as the "
                         f"model does (tied={rmap.tied})")
    if getattr(model, "generation_config", None) is not None:
        new.generation_config = copy.deepcopy(model.generation_config)
    new.train(model.training)
    before = _embed_factor(model, rmap.embed, rmap.layers_name)
    after = _embed_factor(new, rmap.embed, rmap.layers_name)
    if before is None or after is None:
        raise ValueError("the embedding is not passed to the first decoder layer as a multiple of "
                         "itself, so its scale cannot be kept; the hidden size is left unpruned")
    ratio = before / after
    if abs(ratio - 1.0) > 1e-6:
        _fold_embed_scale(new, rmap, ratio)
    return new


def _fold_embed_scale(new: nn.Module, rmap: ResidualMap, ratio: float) -> None:
    modules = dict(new.named_modules())
    emb = modules[rmap.embed]
    with torch.no_grad():
        emb.weight.mul_(ratio)
        if rmap.tied:  # the LM head's weight was scaled too: scale the final norm's output back
            norm = modules.get(rmap.final_norm) if rmap.final_norm else None
            offset = None if norm is None or rmap.norms.get(rmap.final_norm) != "rms" else _weight_offset(norm)
            if offset is None:
                raise ValueError("tied embeddings with an embedding scale that depends on "
                                 "hidden_size need a final RMS norm (weight or 1 + weight) before "
                                 "the LM head to fold the scale into; the hidden size is left unpruned")
            norm.weight.copy_((offset + norm.weight.double()) / ratio - offset)


# --------------------------------------------------------------------------------------------
# search


class HiddenReport(Report):
    """What ``search(..., axes=("hidden",))`` found: one row per tensor sliced (``module``,
    ``role``, ``width`` before and ``kept`` after), then the hidden size, params and FLOPs."""

    name_key = "module"

    def plot_title(self) -> str:
        return "hidden-size search: kept fraction of the residual stream per module"


@dataclass
class HiddenSearchResult:
    """What ``search(..., axes=("hidden",))`` found: which residual channels stay. Nothing is
    cut until :meth:`export`.

    Attributes: ``rmap`` (:class:`ResidualMap`), ``method``, ``scores`` (one per channel),
    ``keep`` (sorted channel indices), ``hidden_size`` / ``dense_hidden_size``, ``choices`` (the
    allowed hidden sizes), ``params`` / ``flops`` and ``dense_*``, ``constraints`` (absolute
    bounds), ``batches``, ``axes``.
    """

    rmap: ResidualMap
    method: str
    scores: torch.Tensor
    keep: torch.Tensor
    hidden_size: int
    dense_hidden_size: int
    choices: tuple
    params: int
    flops: int
    dense_params: int
    dense_flops: int
    constraints: dict
    batches: int = 0
    axes: tuple = ("hidden",)
    example_input: Any = None
    uniform: bool = True  # one residual stream: the export is always a plain config
    extra: dict = field(default_factory=dict)

    @property
    def model(self) -> nn.Module:
        return self.rmap.model

    def rows(self) -> list:
        k, h = self.hidden_size, self.dense_hidden_size
        roles = [(self.rmap.embed, "embedding")] + [(n, "norm") for n in self.rmap.norms]
        roles += [(n, "reads") for n in self.rmap.readers] + [(n, "writes") for n in self.rmap.writers]
        roles += [(n, "writes (MoE experts)" if n in self.rmap.moe_writers else "reads (MoE router)")
                  for n in self.rmap.moe]
        if self.rmap.lm_head:
            roles.append((self.rmap.lm_head, "lm_head (tied)" if self.rmap.tied else "lm_head"))
        return [{"module": n, "role": r, "width": h, "kept": k, "density": k / h} for n, r in roles]

    @property
    def report(self) -> HiddenReport:
        """The tensors sliced and the counts, as a :class:`~gradprune.report.Report`."""
        lines = [f"hidden_size: {self.dense_hidden_size} -> {self.hidden_size} (scored by {self.method})",
                 f"params: {self.dense_params} -> {self.params} ({self.params / max(self.dense_params, 1):.1%})",
                 f"flops:  {self.dense_flops} -> {self.flops} ({self.flops / max(self.dense_flops, 1):.1%})"]
        lines += latency_lines(self)
        return HiddenReport("hidden", self.rows(), ("module", "role", "width", "kept"), lines, {
            "method": self.method, "hidden_size": {"dense": self.dense_hidden_size, "subnet": self.hidden_size},
            "params": {"dense": self.dense_params, "subnet": self.params},
            "flops": {"dense": self.dense_flops, "subnet": self.flops}, **latency_extra(self)})

    def mask(self) -> torch.Tensor:
        """1 for the kept channels, 0 for the removed ones."""
        p = next(self.model.parameters())
        m = torch.zeros(self.dense_hidden_size, device=p.device)
        m[self.keep.to(p.device)] = 1.0
        return m

    def gates(self) -> HiddenGates:
        """The gated model: removed channels at 0, norms over the kept channels (a context manager)."""
        return HiddenGates(self.rmap, self.mask())

    def export(self, uniform: bool | None = None) -> nn.Module:
        """A new model with the kept channels (see :func:`export_hidden`); always a plain config
        that ``AutoModelForCausalLM.from_pretrained`` loads (``uniform`` is accepted for the
        same signature as the other results)."""
        if uniform is not None and not isinstance(uniform, bool):
            raise TypeError(f"uniform must be bool or None, got {type(uniform).__name__}")
        return export_hidden(self.rmap, self.keep)


def _prepare(model, constraints, data, loss_fn, method, example_input, hidden_divisor, max_batches,
             allowed=HIDDEN_CONSTRAINTS):
    """Validate the arguments of the hidden axis (before any work) and measure the costs."""
    from .depth import check_axis_inputs

    check_choice("method", method, HIDDEN_METHODS)
    if hidden_divisor is not None:
        check_int("hidden_divisor", hidden_divisor, min_value=1)
    check_axis_inputs("the 'hidden' axis", data, loss_fn, constraints, allowed, example_input, max_batches)
    rmap = residual_map(model)
    divisor = hidden_divisor or _default_divisor(rmap.hidden_size)
    if divisor > rmap.hidden_size:
        raise ValueError(f"hidden_divisor={divisor} is larger than hidden_size {rmap.hidden_size}")
    return rmap, divisor


def search_hidden(model: nn.Module, constraints: dict, data: Iterable | None, loss_fn: Callable | None,
                  method: str, example_input, *, hidden_divisor: int | None = None,
                  max_iter_data_loader: int = 128, show_progress: bool | None = None,
                  accept: Callable | None = None) -> HiddenSearchResult:
    """``search(..., axes=("hidden",))``: score the residual channels with ``method`` (one of
    :data:`HIDDEN_METHODS`) and keep the highest-scored ones, as few as the ``params`` /
    ``flops`` bounds need (the smallest allowed hidden size that meets every bound).
    ``accept(key, build)``: a further test of a candidate hidden size that meets them, from the
    widest down (the measured latency bounds of :func:`~gradprune.structured.search.search`)."""
    from .search import parse_constraints

    rmap, divisor = _prepare(model, constraints, data, loss_fn, method, example_input, hidden_divisor,
                             max_iter_data_loader)
    choices = hidden_widths(rmap, divisor)
    _check_expressible(rmap, choices[0])
    costs = _HiddenCosts(rmap, example_input)
    bounds = parse_constraints(constraints, {"params": costs.dense_params, "flops": costs.dense_flops})
    asked = ", ".join(f"{k} <= {b:g}" for k, b in bounds.items())
    fits = [k for k in choices if all(costs.of(k)[key] <= b for key, b in bounds.items())]
    if not fits:
        raise ValueError(f"no subnet meets constraints ({asked}) by pruning the hidden size: the "
                         f"smallest reachable (hidden_size {choices[0]} of {rmap.hidden_size}, "
                         f"multiples of hidden_divisor={divisor} the config accepts) are "
                         f"{costs.text(costs.of(choices[0]))}")
    scores, batches = hidden_scores(model, data, loss_fn, method, max_iter_data_loader, show_progress, rmap)
    for k in reversed(fits):  # the widest hidden size that meets every bound
        keep = _top(scores, k, model)
        if accept is None or accept(k, lambda keep=keep: export_hidden(rmap, keep)):
            break
    else:
        raise ValueError(f"no subnet meets constraints ({asked}{accept.asked()}) by pruning the hidden size: "
                         f"the smallest reachable (hidden_size {fits[0]} of {rmap.hidden_size}) are "
                         f"{costs.text(costs.of(fits[0]))}{accept.text()}")
    values = costs.of(k)
    return HiddenSearchResult(
        rmap=rmap, method=method, scores=scores, keep=keep, hidden_size=k,
        dense_hidden_size=rmap.hidden_size, choices=choices, params=values["params"],
        flops=values["flops"], dense_params=costs.dense_params, dense_flops=costs.dense_flops,
        constraints=bounds, batches=batches, example_input=example_input)


def _top(scores: torch.Tensor, k: int, model: nn.Module) -> torch.Tensor:
    """The ``k`` highest-scored channels, sorted; ties by the embedding column norm, then index."""
    norms = model.get_input_embeddings().weight.detach().double().norm(dim=0).cpu()
    order = sorted(range(scores.numel()), key=lambda c: (-float(scores[c]), -float(norms[c]), c))
    return torch.tensor(sorted(order[:k]), dtype=torch.long)
