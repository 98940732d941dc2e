"""Hugging Face models: model-family analysers, width records in the config, and loading.

Hugging Face models cannot be traced by plain :mod:`torch.fx`, so :func:`analyse_hf` recognises
their structure by module classes instead: every layer of a known class is analysed (so an
``EncoderDecoderModel`` may mix families, e.g. a BERT encoder and a GPT-2 decoder). Head groups
are gated on the value projection's output (a head's output is linear in its values, so this is a
multiplier on the head's output before the output projection; transformers 5 has no
``head_mask``), except with a single key/value head (see below); every FFN group is gated where
its neurons enter the down projection.

- **BERT** (``BertModel``, ``BertFor*``, ``BertLMHeadModel``), per ``BertLayer``: a head group
  (``attention.self.query``/``key``/``value`` rows, ``attention.output.dense`` columns), the same
  for a decoder's cross-attention (``crossattention.self``, a ``BertCrossAttention``: queries from
  the decoder, keys and values from ``encoder_hidden_states``), and an FFN group
  (``intermediate.dense`` rows, ``output.dense`` columns, gated after the activation). Export sets
  ``num_attention_heads`` and ``all_head_size``.
- **GPT-2** (``GPT2Model``, ``GPT2LMHeadModel``…), per ``GPT2Block``: a head group on
  ``attn.c_attn``, a ``Conv1D`` whose ``[in, 3 * hidden]`` weight holds the Q, K and V thirds as
  columns (``head_dim`` columns per head in each third; only the V third is gated), and
  ``attn.c_proj`` input rows; with ``add_cross_attention``, a head group on ``crossattention``
  (``q_attn`` columns, the K and V halves of ``c_attn``, ``c_proj`` rows); an MLP group
  (``mlp.c_fc`` output columns, ``mlp.c_proj`` input rows, gated on ``mlp.act``'s output; ruled
  by ``nn.Linear``). Export sets ``num_heads`` and ``split_size``.
- **LLaMA-style decoders** (:data:`LLAMA_STYLE`: LLaMA, Mistral, Qwen2, Qwen3 — ``*Model``,
  ``*ForCausalLM``…), per decoder layer: a **KV-group** group — unit ``g`` is key/value head
  ``g`` with the ``num_key_value_groups`` query heads that share it (``q_proj`` rows
  ``g * G * head_dim`` …, ``k_proj``/``v_proj`` rows ``g * head_dim``…, ``o_proj`` columns like
  ``q_proj``; biases, as Qwen2's, sliced with their rows), gated on ``v_proj``'s output. With a
  single key/value head (multi-query attention) the unit is one query head instead (``q_proj``
  rows, ``o_proj`` columns; the K/V head is kept), gated by a pre-hook on ``o_proj``'s input.
  Qwen3's ``q_norm``/``k_norm`` normalise each head over ``head_dim`` with weights shared by all
  heads, so they are not sliced. An MLP group (``gate_proj`` and ``up_proj`` rows, ``down_proj``
  columns, gated on ``up_proj``'s output, a multiplier on ``act(gate) * up``). Export sets
  ``num_heads``, ``num_key_value_heads`` and ``num_key_value_groups`` (``head_dim`` unchanged).

The hidden size (the residual stream, embeddings, norms) is never pruned, nor are attention or MLP
modules of an unexpected class or with a single (query) head; all are listed in
``analysis.skipped``. Other families are not analysed (the whole model is listed as unsupported).

Export (:func:`~gradprune.structured.export_model`) records every pruned layer's widths in
``model.config.gradprune_widths``, so ``model.save_pretrained(path)`` keeps them and
:func:`load_pruned_pretrained` ``(cls, path)`` rebuilds the narrower model and loads its weights
(plain ``from_pretrained`` builds the dense widths of the config and cannot load them). With
uniform widths (``search(..., uniform=True)`` or ``export(uniform=True)``),
:func:`apply_uniform_config` also writes them to the config (``intermediate_size``, ``n_inner``,
LLaMA-style ``num_attention_heads``/``num_key_value_heads``/``head_dim``) so plain
``from_pretrained`` loads the model; BERT and GPT-2 heads cannot be uniform (their configs derive
the head size from ``hidden_size / num_attention_heads``) and are then kept; an encoder-decoder's
widths cannot be uniform (its config holds none).
"""

from __future__ import annotations

import os
import sys
from typing import NamedTuple

import torch
from torch import nn

from .attention import HeadHandler
from .groups import Analysis, Group, Layout, Slice, is_conv1d

__all__ = ["ATTENTION_ATTRS", "FAMILIES", "LLAMA_STYLE", "WIDTHS_KEY", "BertCrossHeads", "BertHeads",
           "GPT2Heads", "LlamaHeads", "LlamaStyle", "QueryHeads", "analyse_hf",
           "apply_uniform_config", "families", "load_pruned_pretrained", "record_widths"]

WIDTHS_KEY = "gradprune_widths"


def _is_hf(model: nn.Module) -> bool:
    # a Hugging Face model exists only once transformers is imported: never import it here (slow)
    if "transformers" not in sys.modules:
        return False
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is optional
        return False
    return isinstance(model, PreTrainedModel)


class BertHeads(HeadHandler):
    """Heads of a ``BertSelfAttention``: projections are ``Linear`` roles; this adds the score and
    attention-times-value MACs and updates the head count on export."""

    rule_type = "BertSelfAttention"
    # can a config with fewer heads express the pruned layer? (BERT and GPT-2 derive the head size
    # from hidden_size / num_attention_heads, so no)
    uniform_heads = False
    q_per_unit = 1  # query heads per unit (LLaMA: the query heads of one KV group)
    # the attributes of the attention module that export changes (kept in config.gradprune_widths)
    attrs = ("num_attention_heads", "all_head_size")

    def recorder(self, modules, calls) -> list:
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            b, t = (x.shape[0], x.shape[1]) if x.dim() == 3 else (1, x.shape[0])
            # cross-attention: the keys and values come from the encoder's sequence
            src = kwargs.get("encoder_hidden_states")
            s = t if not isinstance(src, torch.Tensor) else src.shape[-2]
            calls.append((b, t, s))
        return [modules[self.module].register_forward_hook(hook, with_kwargs=True)]

    def extra_cost(self, h, calls) -> tuple:
        return 0, sum(2 * b * t * s * h * self.q_per_unit * self.head_dim for b, t, s in calls)

    def widths(self, n: int) -> dict:
        """The values of :attr:`attrs` with ``n`` units kept."""
        return {"num_attention_heads": n, "all_head_size": n * self.head_dim}

    def export(self, root, modules, keep) -> None:
        mod = modules[self.module]
        for key, value in self.widths(len(keep)).items():
            setattr(mod, key, value)

    def record(self, mod: nn.Module) -> dict:
        """The attributes of the exported attention module kept in ``config.gradprune_widths``."""
        return {a: getattr(mod, a) for a in self.attrs}

    def config_fields(self, n: int) -> dict:
        """The config fields that make ``from_pretrained`` build ``n`` units in every layer.

        BERT and GPT-2 configs derive the head size from ``hidden_size / num_attention_heads``,
        so only the unpruned head count can be expressed (:attr:`uniform_heads` is False)."""
        if n == self.n_heads:
            return {}
        raise ValueError(f"{type(self).__name__}: a config derives the head size from hidden_size / "
                         f"num_attention_heads, so it cannot express {n} of {self.n_heads} heads")


class BertCrossHeads(BertHeads):
    """Heads of a ``BertCrossAttention`` (a decoder's cross-attention: queries from the decoder,
    keys and values from ``encoder_hidden_states``); same projections and attributes."""

    rule_type = "BertCrossAttention"


class GPT2Heads(BertHeads):
    """Heads of a ``GPT2Attention``: ``c_attn`` (a ``Conv1D``, weight ``[in, 3 * hidden]``) output
    columns of the head in its Q, K and V thirds and ``c_proj`` input rows (cross-attention:
    ``q_attn`` columns and the K and V halves of ``c_attn``); export sets ``num_heads`` and
    ``split_size`` (``head_dim`` and the scaling are unchanged)."""

    rule_type = "GPT2Attention"
    attrs = ("num_heads", "split_size")

    def widths(self, n: int) -> dict:
        return {"num_heads": n, "split_size": n * self.head_dim}


class LlamaHeads(BertHeads):
    """KV groups of a LLaMA-style attention (``LlamaAttention``, ``MistralAttention``,
    ``Qwen2Attention``, ``Qwen3Attention``; grouped-query attention): unit ``g`` is key/value head
    ``g`` and the ``num_key_value_groups`` query heads that share it. Export sets
    ``num_key_value_heads`` and ``num_heads`` (``num_key_value_groups`` and ``head_dim`` are
    unchanged; the stock forward infers the head counts from the projections)."""

    rule_type = "LlamaAttention"
    uniform_heads = True  # the config takes head_dim (Qwen2Config as an extra attribute)
    attrs = ("num_heads", "num_key_value_heads", "num_key_value_groups")

    def __init__(self, module: str, n_units: int, head_dim: int, q_per_kv: int,
                 heads_divide_hidden: bool = True):
        super().__init__(module, n_units, head_dim)
        self.q_per_unit = q_per_kv
        # does the config require hidden_size % num_attention_heads == 0 (LlamaConfig does)?
        self.heads_divide_hidden = heads_divide_hidden

    def widths(self, n: int) -> dict:
        return {"num_heads": n * self.q_per_unit, "num_key_value_heads": n,
                "num_key_value_groups": self.q_per_unit}

    def config_fields(self, n: int) -> dict:
        w = self.widths(n)
        return {"num_attention_heads": w["num_heads"],
                "num_key_value_heads": w["num_key_value_heads"], "head_dim": self.head_dim}


class QueryHeads(LlamaHeads):
    """Query heads of a LLaMA-style attention with a single key/value head (multi-query
    attention): unit ``h`` is query head ``h`` (``q_proj`` rows, ``o_proj`` columns); the one K/V
    head is kept. The values are shared by every head, so the gate is a forward pre-hook on
    ``o_proj`` that multiplies each head's output columns. Export sets ``num_heads`` and
    ``num_key_value_groups`` (``num_key_value_heads`` stays 1)."""

    def __init__(self, module: str, n_heads: int, head_dim: int, o_proj: str,
                 heads_divide_hidden: bool = True):
        super().__init__(module, n_heads, head_dim, 1, heads_divide_hidden)
        self.o_proj = o_proj

    def widths(self, n: int) -> dict:
        return {"num_heads": n, "num_key_value_heads": 1, "num_key_value_groups": n}

    def hooks(self, modules, gates, gi) -> list:
        d = self.head_dim

        def hook(module, args):
            x = args[0]
            g = gates.head_gate(gi, x.shape[0] if x.dim() > 2 else None, x)
            g = g.repeat_interleave(d, dim=-1)
            if g.dim() == 2:  # [batch, heads * d] over [batch, ..., heads * d]
                g = g.view(g.shape[0], *([1] * (x.dim() - 2)), g.shape[1])
            return (x * g,) + tuple(args[1:])
        return [modules[self.o_proj].register_forward_pre_hook(hook)]


class _Builder:
    """Collects groups, roles and mask points of a Hugging Face model."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.space_size: list = []
        self.roles: dict = {}
        self.mask_points: dict = {}
        self.groups: list = []
        self.space_group: dict = {}
        self.skipped = [{"module": "<hidden size>", "reason": "the hidden size (residual stream) "
                         "of a Hugging Face model is not pruned"}]

    def space(self, size: int) -> int:
        """A space that belongs to no group (never gated, never sliced)."""
        self.space_size.append(size)
        return len(self.space_size) - 1

    def group(self, name, size, producers, slices, owners, handler=None, rule_type=None,
              kind=None) -> int:
        space = self.space(size)
        self.space_group[space] = len(self.groups)
        self.groups.append(Group(name=name, size=size, producers=producers, slices=slices,
                                 owners=owners, handler=handler, rule_type=rule_type, kind=kind))
        return space

    def skip(self, module: str, reason: str) -> None:
        self.skipped.append({"module": module, "reason": reason})

    def analysis(self) -> Analysis:
        return Analysis(model=self.model, groups=self.groups, skipped=self.skipped,
                        roles=self.roles, mask_points=self.mask_points,
                        space_group=self.space_group, space_size=self.space_size)


def _bert_heads(b: _Builder, an: str, attn: nn.Module, out_dense: str, handler_cls, kind: str) -> None:
    """The head group of a BERT self- or cross-attention ``an`` (``out_dense``: its output
    projection)."""
    h, d = attn.num_attention_heads, attn.attention_head_size
    q, k, v = (f"{an}.{p}" for p in ("query", "key", "value"))
    slices = [Slice(p, "out", 0, 0, d, h) for p in (q, k, v)] + [Slice(out_dense, "in", 1, 0, d, h)]
    space = b.group(an, h, [q, k, v], slices, [(an, type(attn))], handler_cls(an, h, d),
                    kind=kind)
    lay = Layout(2, 3, ((space, d),))
    for p in (q, k, v):
        b.roles[p] = {"out": lay}
    b.roles[out_dense] = {"in": lay}
    b.mask_points[v] = (lay, "mul")


# BERT attention classes -> (head handler, group kind)
_BERT_ATTENTION = {"BertSelfAttention": (BertHeads, "bert.heads"),
                   "BertCrossAttention": (BertCrossHeads, "bert.cross_heads")}


def _bert_layer(b: _Builder, name: str, layer: nn.Module) -> None:
    """A ``BertLayer``: self-attention heads, cross-attention heads (decoders with
    ``add_cross_attention``) and FFN neurons."""
    for part in ("attention", "crossattention"):
        block = getattr(layer, part, None)
        if block is None:
            continue
        attn, an = block.self, f"{name}.{part}.self"
        spec = _BERT_ATTENTION.get(type(attn).__name__)
        if spec is not None and attn.num_attention_heads > 1:
            _bert_heads(b, an, attn, f"{name}.{part}.output.dense", *spec)
        else:
            b.skip(an, f"{type(attn).__name__}: heads not pruned (a single head or an unknown "
                   "attention class)")
    fc1, fc2 = f"{name}.intermediate.dense", f"{name}.output.dense"
    dense1 = layer.intermediate.dense
    n = dense1.out_features
    space = b.group(fc1, n, [fc1], [Slice(fc1, "out", 0, 0, 1, n), Slice(fc2, "in", 1, 0, 1, n)],
                    [(fc1, type(dense1))], kind="bert.ffn")
    lay = Layout(2, 3, ((space, 1),))
    b.roles[fc1] = {"out": lay}
    b.roles[fc2] = {"in": lay}
    b.mask_points[f"{name}.intermediate"] = (lay, "mul")


def _gpt2_heads(b: _Builder, an: str, attn: nn.Module, kind: str) -> None:
    """The head group of a GPT-2 attention ``an``: self-attention's ``c_attn`` holds Q, K and V
    (``split_size`` columns each), cross-attention's ``q_attn`` holds Q and its ``c_attn`` K and V;
    only the V part (the last of ``c_attn``) is gated."""
    h, d, e = attn.num_heads, attn.head_dim, attn.split_size
    parts = [(f"{an}.q_attn", 1), (f"{an}.c_attn", 2)] if attn.is_cross_attention else \
        [(f"{an}.c_attn", 3)]
    cp = f"{an}.c_proj"
    slices = [Slice(m, "out", 1, k * e, d, h) for m, n in parts for k in range(n)]
    slices.append(Slice(cp, "in", 0, 0, d, h))
    space = b.group(an, h, [m for m, _ in parts], slices, [(an, type(attn))], GPT2Heads(an, h, d),
                    kind=kind)
    for m, n in parts:
        b.roles[m] = {"out": Layout(2, 3, ((space, d),) * n)}
    b.roles[cp] = {"in": Layout(2, 3, ((space, d),))}
    # the Q and K parts of c_attn's output: spaces of no group (never gated)
    ca, n = parts[-1]
    segs = tuple((b.space(e), 1) for _ in range(n - 1)) + ((space, d),)
    b.mask_points[ca] = (Layout(2, 3, segs), "mul")


def _gpt2_ok(attn: nn.Module) -> bool:
    convs = ("c_attn", "c_proj", "q_attn") if attn.is_cross_attention else ("c_attn", "c_proj")
    return attn.num_heads > 1 and all(is_conv1d(getattr(attn, c, None)) for c in convs)


def _gpt2_block(b: _Builder, name: str, block: nn.Module) -> None:
    """A ``GPT2Block``: self-attention heads, cross-attention heads (``add_cross_attention``) and
    MLP neurons."""
    for part, kind in (("attn", "gpt2.heads"), ("crossattention", "gpt2.cross_heads")):
        attn, an = getattr(block, part, None), f"{name}.{part}"
        if attn is None:
            continue
        if type(attn).__name__ == "GPT2Attention" and _gpt2_ok(attn):
            _gpt2_heads(b, an, attn, kind)
        else:
            b.skip(an, f"{type(attn).__name__}: heads not pruned (a single head or an unknown "
                   "attention class)")
    mlp = block.mlp
    fc, proj = f"{name}.mlp.c_fc", f"{name}.mlp.c_proj"
    if is_conv1d(mlp.c_fc) and is_conv1d(mlp.c_proj) and isinstance(getattr(mlp, "act", None), nn.Module):
        n = mlp.c_fc.nf
        space = b.group(fc, n, [fc], [Slice(fc, "out", 1, 0, 1, n), Slice(proj, "in", 0, 0, 1, n)],
                        [(fc, type(mlp.c_fc))], rule_type="Linear", kind="gpt2.ffn")
        lay = Layout(2, 3, ((space, 1),))
        b.roles[fc] = {"out": lay}
        b.roles[proj] = {"in": lay}
        b.mask_points[f"{name}.mlp.act"] = (lay, "mul")
    else:
        b.skip(f"{name}.mlp", f"{type(mlp).__name__}: neurons not pruned")


class LlamaStyle(NamedTuple):
    """A LLaMA-style decoder family: its attention and MLP classes, and whether its config
    requires ``hidden_size % num_attention_heads == 0``."""

    family: str
    attention: str
    mlp: str
    heads_divide_hidden: bool


# decoder-layer class -> its family (same projections: q/k/v/o_proj, gate/up/down_proj)
LLAMA_STYLE = {
    "LlamaDecoderLayer": LlamaStyle("llama", "LlamaAttention", "LlamaMLP", True),
    "MistralDecoderLayer": LlamaStyle("mistral", "MistralAttention", "MistralMLP", False),
    "Qwen2DecoderLayer": LlamaStyle("qwen2", "Qwen2Attention", "Qwen2MLP", False),
    # Qwen3's q_norm/k_norm normalise each head over head_dim with weights shared by all heads:
    # nothing to slice
    "Qwen3DecoderLayer": LlamaStyle("qwen3", "Qwen3Attention", "Qwen3MLP", False),
}


def _llama_unsupported(attn: nn.Module, spec: LlamaStyle) -> str | None:
    """Why the heads of LLaMA-style attention ``attn`` cannot be pruned (``None``: they can)."""
    name = type(attn).__name__
    if name != spec.attention:
        return f"{name}: heads not pruned (an unknown attention class, not {spec.attention})"
    d = getattr(attn, "head_dim", None)
    if not isinstance(d, int) or not all(isinstance(getattr(attn, f"{p}_proj", None), nn.Linear)
                                         for p in "qkvo"):
        return f"{name}: heads not pruned (no int head_dim or q/k/v/o_proj Linear layers)"
    n_q, n_kv = attn.q_proj.out_features // d, attn.k_proj.out_features // d
    if n_kv < 1 or n_q % n_kv:
        return f"{name}: heads not pruned ({n_q} query heads in {n_kv} key/value heads)"
    if n_q < 2:
        return f"{name}: heads not pruned (a single query head)"
    return None


def _llama_heads(b: _Builder, an: str, attn: nn.Module, spec: LlamaStyle) -> None:
    """The head group of LLaMA-style attention ``an``: KV groups, or the query heads of a single
    KV head (multi-query attention)."""
    why = _llama_unsupported(attn, spec)
    if why is not None:
        b.skip(an, why)
        return
    d = attn.head_dim
    q, k, v, o = (f"{an}.{p}_proj" for p in "qkvo")
    n_q, n_kv = attn.q_proj.out_features // d, attn.k_proj.out_features // d
    if n_kv == 1:  # unit: one query head; the K/V head is kept
        n, per, kv = n_q, 1, []
        handler = QueryHeads(an, n_q, d, o, spec.heads_divide_hidden)
    else:  # unit: one KV group
        n, per, kv = n_kv, n_q // n_kv, [k, v]
        handler = LlamaHeads(an, n_kv, d, per, spec.heads_divide_hidden)
    slices = [Slice(q, "out", 0, 0, per * d, n)] + [Slice(p, "out", 0, 0, d, n) for p in kv]
    slices.append(Slice(o, "in", 1, 0, per * d, n))
    space = b.group(an, n, [q] + kv, slices, [(an, type(attn))], handler,
                    rule_type=spec.attention, kind=f"{spec.family}.heads")
    b.roles[q] = {"out": Layout(2, 3, ((space, per * d),))}
    b.roles[o] = {"in": Layout(2, 3, ((space, per * d),))}
    for p in kv:
        b.roles[p] = {"out": Layout(2, 3, ((space, d),))}
    if kv:  # a KV group's output is linear in its values: gating v gates all its query heads
        b.mask_points[v] = (Layout(2, 3, ((space, d),)), "mul")


def _gated_mlp(b: _Builder, name: str, mlp: nn.Module, spec: LlamaStyle) -> None:
    """The neuron group of a gated MLP ``down(act(gate(x)) * up(x))``."""
    gp, up, down = (f"{name}.{p}_proj" for p in ("gate", "up", "down"))
    if type(mlp).__name__ != spec.mlp or not all(
            isinstance(getattr(mlp, f"{p}_proj", None), nn.Linear) for p in ("gate", "up", "down")):
        b.skip(name, f"{type(mlp).__name__}: neurons not pruned (not a {spec.mlp} with "
               "gate/up/down_proj Linear layers)")
        return
    n = mlp.up_proj.out_features
    space = b.group(up, n, [gp, up], [Slice(gp, "out", 0, 0, 1, n), Slice(up, "out", 0, 0, 1, n),
                                      Slice(down, "in", 1, 0, 1, n)],
                    [(gp, type(mlp.gate_proj)), (up, type(mlp.up_proj))], kind=f"{spec.family}.ffn")
    lay = Layout(2, 3, ((space, 1),))
    b.roles[gp] = {"out": lay}
    b.roles[up] = {"out": lay}
    b.roles[down] = {"in": lay}
    # act(gate) * up: gating up's output is a multiplier on the neuron before down_proj
    b.mask_points[up] = (lay, "mul")


def _llama_layer(b: _Builder, name: str, layer: nn.Module) -> None:
    """A LLaMA-style decoder layer: KV groups (or query heads) and gated-MLP neurons."""
    spec = LLAMA_STYLE[type(layer).__name__]
    _llama_heads(b, f"{name}.self_attn", layer.self_attn, spec)
    _gated_mlp(b, f"{name}.mlp", layer.mlp, spec)


# family name -> the layer class that identifies it
FAMILIES = {"bert": "BertLayer", "gpt2": "GPT2Block",
            **{spec.family: layer for layer, spec in LLAMA_STYLE.items()}}
# layer class -> its analyser, called with (builder, qualified name, layer)
_LAYERS = {"BertLayer": _bert_layer, "GPT2Block": _gpt2_block,
           **dict.fromkeys(LLAMA_STYLE, _llama_layer)}

# Hugging Face attention classes whose heads are pruned -> the attributes export changes
ATTENTION_ATTRS = {"BertSelfAttention": BertHeads.attrs, "BertCrossAttention": BertCrossHeads.attrs,
                   "GPT2Attention": GPT2Heads.attrs,
                   **{spec.attention: LlamaHeads.attrs for spec in LLAMA_STYLE.values()}}


def analyse_hf(model: nn.Module, example_input=None) -> Analysis | None:
    """The analysis of a Hugging Face model by its module classes, or ``None`` when ``model`` is
    not a Hugging Face ``PreTrainedModel`` (then torch.fx is used)."""
    if not _is_hf(model):
        return None
    b = _Builder(model)
    found = False
    for name, mod in model.named_modules():  # every family's layers (an encoder-decoder may mix)
        analyse = _LAYERS.get(type(mod).__name__)
        if analyse is not None:
            analyse(b, name, mod)
            found = True
    if found:
        return b.analysis()
    return Analysis(model=model, groups=[], skipped=[{
        "module": "", "reason": f"Hugging Face model {type(model).__name__} is not a supported "
        f"family (supported: {', '.join(FAMILIES)})"}], roles={}, mask_points={}, space_group={},
        space_size=[])


def families(analysis: Analysis) -> dict:
    """``{(kind, size): [group indices]}``: the groups that play the same role in every layer
    (heads, FFN neurons) of a Hugging Face model, for uniform widths (``ValueError`` for an
    encoder-decoder, whose config holds no widths of its own)."""
    if getattr(getattr(analysis.model, "config", None), "is_encoder_decoder", False):
        raise ValueError(f"uniform widths need one config for every layer; {type(analysis.model).__name__} "
                         "is an encoder-decoder (its layers are configured by config.encoder and "
                         "config.decoder): export per-layer widths and load them with "
                         "load_pruned_pretrained")
    out: dict = {}
    for gi, g in enumerate(analysis.groups):
        if g.kind is not None:
            out.setdefault((g.kind, g.size), []).append(gi)
    return out


def _uniform_problem(analysis: Analysis, gi: int, w: int) -> str | None:
    """Why a plain config cannot express group ``gi`` (and its family) at width ``w`` (``None``:
    it can)."""
    g = analysis.groups[gi]
    h = g.handler
    if h is None or w == g.size:
        return None
    config = getattr(analysis.model, "config", None)
    if not h.uniform_heads:
        return (f"{str(g.kind).split('.')[0].upper()} derives the head size from hidden_size / num_attention_heads, so a "
                f"config cannot express {w} of {g.size} heads; search with uniform=True (heads "
                "are then kept) or save per-layer widths and load with load_pruned_pretrained")
    hidden = getattr(config, "hidden_size", None)
    heads = w * h.q_per_unit
    if h.heads_divide_hidden and hidden is not None and hidden % heads:
        return (f"{heads} attention heads do not divide hidden_size {hidden}, which "
                f"{type(config).__name__} requires")
    return None


def uniform_width_ok(analysis: Analysis, gi: int, w: int) -> bool:
    """Can a plain config express group ``gi`` (and its family) at width ``w``?"""
    return _uniform_problem(analysis, gi, w) is None


# the config field of each family's FFN width (default: intermediate_size)
_FFN_FIELD = {"gpt2": "n_inner"}


def apply_uniform_config(model: nn.Module, analysis: Analysis, keep: dict) -> None:
    """Check that every layer of exported ``model`` kept the same widths and write them to its
    config (``intermediate_size``/``n_inner``; for LLaMA-style models ``num_attention_heads``,
    ``num_key_value_heads`` and ``head_dim``) so plain ``from_pretrained`` rebuilds it."""
    fams = families(analysis)
    if not fams:
        raise ValueError("uniform=True needs a Hugging Face model of a supported family "
                         f"({', '.join(FAMILIES)}); this model has no per-layer families of groups")
    for (kind, size), gis in fams.items():
        kept = {len(keep[gi]) if gi in keep else size for gi in gis}
        if len(kept) != 1:
            raise ValueError(f"uniform=True: the {kind} groups keep different widths {sorted(kept)}")
        w = kept.pop()
        problem = _uniform_problem(analysis, gis[0], w)
        if problem is not None:
            raise ValueError(f"uniform=True: {problem}")
        handler = analysis.groups[gis[0]].handler
        if handler is None:
            fields = {_FFN_FIELD.get(kind.split(".")[0], "intermediate_size"): w}
        else:
            fields = handler.config_fields(w) if w != size else {}
        for key, value in fields.items():
            setattr(model.config, key, value)


def record_widths(model: nn.Module, analysis: Analysis) -> None:
    """Record the widths of every pruned layer of an exported Hugging Face ``model`` in
    ``model.config.gradprune_widths`` (``{module name: {attribute: value}}``)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return
    modules = dict(model.named_modules())
    widths = {}
    for name in analysis.roles:
        mod = modules[name]
        if isinstance(mod, nn.Linear):
            widths[name] = {"in_features": mod.in_features, "out_features": mod.out_features}
        elif is_conv1d(mod):
            widths[name] = {"nx": mod.nx, "nf": mod.nf}
    for g in analysis.groups:
        if isinstance(g.handler, BertHeads):
            widths[g.handler.module] = g.handler.record(modules[g.handler.module])
    setattr(config, WIDTHS_KEY, widths)


def _read_state(path: str) -> dict:
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single) or os.path.isfile(index):
        from .._io import load_json, load_safetensors
        if os.path.isfile(single):
            return load_safetensors(single)
        weight_map = load_json(index)
        if not isinstance(weight_map, dict) or not isinstance(weight_map.get("weight_map"), dict):
            raise ValueError(f"{index} is not a safetensors index (no weight_map)")
        state = {}
        for f in sorted(set(weight_map["weight_map"].values())):
            state.update(load_safetensors(os.path.join(path, f)))
        return state
    binary = os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(binary):
        from .._io import load_torch
        return load_torch(binary)
    raise FileNotFoundError(f"path must be a directory written by save_pretrained; no weights in {path}")


def load_pruned_pretrained(cls, path: str | os.PathLike, config=None):
    """Load a pruned Hugging Face model saved with ``save_pretrained``: build ``cls(config)``
    (``config`` read from ``path`` by default), narrow the layers recorded in
    ``config.gradprune_widths`` and load the saved weights (strictly, up to tied weights).

    Example: ``small = gp.structured.load_pruned_pretrained(BertModel, "pruned-bert")``.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if not hasattr(cls, "config_class") or not hasattr(cls, "from_pretrained"):
        raise TypeError(f"cls must be a Hugging Face PreTrainedModel class, got {cls!r}")
    if config is None:
        config = cls.config_class.from_pretrained(path)
    widths = getattr(config, WIDTHS_KEY, None) or {}
    if not isinstance(widths, dict):
        raise ValueError(f"config.{WIDTHS_KEY} must be a dict of module widths, got "
                         f"{type(widths).__name__}")
    model = cls(config)
    modules = dict(model.named_modules())
    for name, attrs in widths.items():
        mod = modules.get(name)
        if mod is None:
            raise ValueError(f"config.{WIDTHS_KEY} names a module {name!r} that {cls.__name__} "
                             "does not have")
        for key, value in attrs.items():
            setattr(mod, key, value)
        if isinstance(mod, nn.Linear):
            w = mod.weight
            mod.weight = nn.Parameter(torch.empty(mod.out_features, mod.in_features, dtype=w.dtype))
            if mod.bias is not None:
                mod.bias = nn.Parameter(torch.empty(mod.out_features, dtype=w.dtype))
        elif is_conv1d(mod):
            w = mod.weight
            mod.weight = nn.Parameter(torch.empty(mod.nx, mod.nf, dtype=w.dtype))
            if mod.bias is not None:
                mod.bias = nn.Parameter(torch.empty(mod.nf, dtype=w.dtype))
    state = _read_state(path)
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"weights in {path} do not fit {cls.__name__}: unexpected "
                         f"{result.unexpected_keys[:5]}")
    if result.missing_keys:
        model.tie_weights()
        loaded = {t.data_ptr() for k, t in model.state_dict().items() if k in state}
        params = model.state_dict()
        untied = [k for k in result.missing_keys if params[k].data_ptr() not in loaded]
        if untied:
            raise ValueError(f"weights in {path} miss {untied[:5]} for {cls.__name__}")
    model.eval()
    return model
