"""Hugging Face models: blocks recognised by structure, width records in the config, and loading.

Hugging Face models cannot be traced by plain :mod:`torch.fx`, so :func:`analyse_hf` recognises
their transformer blocks by **structure**, not by class name (so the eager, sdpa and flash
attention classes of any transformers version, and new models that reuse a known layout, are
found alike). Every module of the model is matched against one registry of building blocks
(:data:`ATTENTION_SPECS`, :data:`MLP_SPECS`): small tables of attribute names, one per layout,
registered in one place (:func:`register_attention`, :func:`register_mlp`).

- **Attention**: a module with query/key/value projections, separate (``query``/``key``/``value``,
  ``q_proj``/``k_proj``/``v_proj``, ``q_lin``…, ``query_proj``…, T5's ``q``/``k``/``v``) or fused
  (``c_attn``, ``qkv_proj``, ``query_key_value``, ``Wqkv``; laid out as ``[Q | K | V]`` blocks, per
  head or per key/value group, as Falcon's layouts),
  and an output projection (its own ``o_proj``/``out_proj``/``dense``/``c_proj``…, or BERT's
  sibling ``output.dense``). The head size is read from the module (``head_dim``,
  ``attention_head_size``, ``head_size``…); the query and key/value head counts follow from the
  projection widths (grouped-query and multi-query attention included) and are checked against
  the module's own head-count attributes. Unit ``g`` is key/value head ``g`` with the query heads
  that share it (plain multi-head attention: one head; a single key/value head, multi-query
  attention: one query head, the K/V head kept). The gate is a forward pre-hook on the output
  projection that multiplies each unit's columns: a multiplier on the head's output, which is
  what ``head_mask`` did (transformers 5 has none). Export slices the projections and sets the
  module's head-count attributes that exist (``num_heads``, ``num_attention_heads``,
  ``all_head_size``…), recorded in ``config.gradprune_widths``.
- **MLP**: an up projection (and an optional gate projection, separate or fused as Phi-3's
  ``gate_up_proj``), an activation, then a down projection (``intermediate.dense`` /
  ``output.dense``, ``fc1``/``fc2``, ``lin1``/``lin2``, ``c_fc``/``c_proj``,
  ``dense_h_to_4h``/``dense_4h_to_h``, ``wi``/``wo``, ``gate_proj``/``up_proj``/``down_proj``…).
  Its neurons are gated after the activation (``mlp_gate="post_activation"``, on the activation
  module's output) or before it (``"pre_activation"``, on the up projection's output, where
  ModelOpt's gradnas gates BERT); with a gate projection both are the up projection's output.

Tensors with one column per head (T5's ``relative_attention_bias``, Swin's
``relative_position_bias_table``) are sliced with the heads; T5 layers that reuse the position
bias of their stack's first layer keep the same heads (one group per stack). Units of a block
that cannot be pruned (a single head; Falcon with ALiBi; an unregistered per-head parameter) and
every other ``Linear``/``Conv1D`` (poolers, classifiers, embeddings projections) are listed in
``analysis.skipped`` with the reason. The hidden size (the residual stream, embeddings, norms) is
never pruned.

Export (:func:`~gradprune.structured.export_model`) records every pruned layer's widths in
``model.config.gradprune_widths``, so ``model.save_pretrained(path)`` keeps them and
:func:`load_pruned_pretrained` ``(cls, path)`` rebuilds the narrower model and loads its weights
(plain ``from_pretrained`` builds the dense widths of the config and cannot load them). With
uniform widths (``search(..., uniform=True)`` or ``export(uniform=True)``),
:func:`apply_uniform_config` also writes them to the config (the FFN width fields of the family,
e.g. ``intermediate_size``, ``n_inner``, ``ffn_dim``, ``d_ff``; the head fields of the layout) so
plain ``from_pretrained`` loads the model. Whether the config class honours a width is probed by
building the model on the meta device from the updated config: configs that derive the head size
from ``hidden_size / num_attention_heads`` (BERT, GPT-2, OPT…) cannot express fewer heads, which
are then kept; an ``EncoderDecoderModel``'s widths cannot be uniform (its config holds none).
"""

from __future__ import annotations

import copy
import inspect
import os
import re
import sys
from dataclasses import dataclass, field

import torch
from torch import nn

from .attention import HeadHandler
from .groups import Analysis, Group, Layout, Slice, is_conv1d, register_analyser

__all__ = ["ATTENTION_SPECS", "MLP_GATES", "MLP_SPECS", "WIDTHS_KEY", "AttentionSpec", "HFHeads",
           "HeadMember", "MLPSpec", "analyse_hf", "apply_uniform_config", "families",
           "head_attrs", "head_rule_types", "load_pruned_pretrained", "record_widths",
           "register_attention", "register_mlp", "reload_hint", "register_block_builder", "set_recorded"]

WIDTHS_KEY = "gradprune_widths"
SHAPES_KEY = "parameter_shapes"  # in a width record: {parameter name: shape} to rebuild
MLP_GATES = ("post_activation", "pre_activation")


def _is_hf(model: nn.Module) -> bool:
    # a Hugging Face model exists only once transformers is imported: never import it here (slow)
    if "transformers" not in sys.modules:
        return False
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is optional
        return False
    return isinstance(model, PreTrainedModel)


# --------------------------------------------------------------------------------------------
# the registry: one small table per layout


@dataclass(frozen=True)
class AttentionSpec:
    """How to read one attention layout (data only; see the module docstring).

    ``q``/``k``/``v``: child names of separate projections; or ``fused``: one projection holding
    them, ``layout`` ``"blocks"`` (``[Q | K | V]``) or ``"heads"`` (per key/value head:
    its query heads, then K, then V); ``cross_q``: a separate query projection used with a fused
    ``[K | V]`` when the module is a cross-attention (GPT-2's ``q_attn``). ``o``: candidate output
    projections (``"^output.dense"``: a child of the parent module). ``attrs``: module attributes
    export sets (``"heads"``: query heads, ``"kv_heads"``, ``"width"``: query heads × head size).
    Generic head-count attributes (``num_heads``, ``num_attention_heads``, ``n_heads``,
    ``num_key_value_heads``, ``all_head_size``…) are set where the module has them; ``attrs`` are
    always set (``"groups"``: query heads per key/value head).
    ``head_fields``: the config fields of the head count and size (``{field: kind}``, kinds as
    ``attrs`` plus ``"head_dim"``), written for uniform widths. Whether the config class honours
    them (LLaMA's ``head_dim`` does; BERT derives the head size from ``hidden_size /
    num_attention_heads``) is found by building the model from the updated config on the meta
    device and comparing its layer shapes, so one table serves every transformers version.
    ``classes``: known attention class names (their normalised names are rule keys
    ``"hf.<class>"``). ``unsupported``: why the heads of this layout are never pruned;
    ``unsupported_config``: ``((config field, why), ...)``: the heads are not pruned where the
    model's config sets that field (Falcon's ``alibi``: slopes built per head for all layers; a
    dotted path reaches a sub-config: MPT's ``attn_config.alibi``).
    ``config_attrs``: fields of the module's own ``config`` that its forward reads
    (``{"num_attention_heads": "heads"}`` for Phi-3, which splits ``qkv_proj`` at
    ``config.num_attention_heads * head_dim``): export gives the module a copy of the config
    with them set, recorded as ``"config.<field>"`` in the width record.
    ``bias_tables``: candidate paths of a tensor whose last dim holds one column per query head,
    sliced with the heads where present: a child ``Embedding`` (T5's ``relative_attention_bias``,
    ``[buckets, heads]``) or a parameter (Swin's
    ``relative_position_bias.relative_position_bias_table``). Any other parameter of the module
    with one column per head stops its heads from being pruned (listed in ``skipped``).
    ``bias_arg``: the forward argument through which a layer receives the position bias computed
    by the first layer of its stack (T5's ``position_bias``): modules whose forward takes it and
    whose names differ only in layer indices form one group (the same heads kept in every layer
    of the stack); modules that compute their own bias (UMT5) stay one group per layer."""

    name: str
    q: str | None = None
    k: str | None = None
    v: str | None = None
    fused: str | None = None
    layout: str = "blocks"
    cross_q: str | None = None
    o: tuple = ("o_proj",)
    attrs: dict = field(default_factory=dict)
    head_fields: dict = field(default_factory=dict)
    classes: tuple = ()
    unsupported: str | None = None
    unsupported_config: tuple = ()
    config_attrs: dict = field(default_factory=dict)
    bias_tables: tuple = ()
    bias_arg: str | None = None


@dataclass(frozen=True)
class MLPSpec:
    """How to read one MLP layout: child paths of the ``up`` projection, the optional ``gate``
    projection (``fused_gate``: ``up`` holds ``[gate | up]``), the candidate names of the
    activation module ``act`` (its output is the post-activation point) and the ``down`` projection; ``config``: the config
    fields of the width (for uniform widths), tried in order."""

    name: str
    up: str
    down: str
    act: tuple = ()
    gate: str | None = None
    fused_gate: bool = False
    config: tuple = ("intermediate_size",)


_HEADS = {"num_heads": "heads", "num_attention_heads": "heads", "n_heads": "heads",
          "num_key_value_heads": "kv_heads", "num_kv_heads": "kv_heads",
          "num_key_value_groups": "groups", "all_head_size": "width", "inner_dim": "width"}
ATTENTION_SPECS: list = []
MLP_SPECS: list = []


def register_attention(spec: AttentionSpec) -> AttentionSpec:
    """Add an attention layout to the registry (tried in registration order).

    Example: a model whose attention has ``wq``/``wk``/``wv``/``wo`` children and a ``n_heads``
    attribute::

        register_attention(AttentionSpec("mine", q="wq", k="wk", v="wv", o=("wo",),
                                         attrs={"n_heads": "heads"}))
    """
    if not isinstance(spec, AttentionSpec):
        raise TypeError(f"spec must be an AttentionSpec, got {type(spec).__name__}")
    if spec.layout not in ("blocks", "heads"):
        raise ValueError(f"spec.layout must be 'blocks' or 'heads', got {spec.layout!r}")
    if (spec.fused is None) == (spec.q is None):
        raise ValueError(f"spec {spec.name!r}: give either q/k/v or fused")
    ATTENTION_SPECS.append(spec)
    return spec


def register_mlp(spec: MLPSpec) -> MLPSpec:
    """Add an MLP layout to the registry (tried in registration order).

    Example: ``register_mlp(MLPSpec("mine", up="w1", act=("act",), down="w2"))``."""
    if not isinstance(spec, MLPSpec):
        raise TypeError(f"spec must be an MLPSpec, got {type(spec).__name__}")
    MLP_SPECS.append(spec)
    return spec


_LLAMA = ("LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention",
          "GemmaAttention", "Gemma2Attention", "PhiAttention", "Phi3Attention")
# BERT family (BERT, RoBERTa, ELECTRA, CamemBERT…; ALBERT keeps its output dense inside)
_HEAD_DIM = {"num_attention_heads": "heads", "head_dim": "head_dim"}
_GQA = {"num_attention_heads": "heads", "num_key_value_heads": "kv_heads", "head_dim": "head_dim"}
register_attention(AttentionSpec("bert", q="query", k="key", v="value", o=("^output.dense", "dense"),
                                 head_fields=_HEAD_DIM,
                                 bias_tables=("relative_position_bias_table",),  # Swin (4.x)
                                 classes=("BertSelfAttention", "BertCrossAttention",
                                          "RobertaSelfAttention", "ElectraSelfAttention",
                                          "AlbertAttention", "ViTSelfAttention")))
register_attention(AttentionSpec("deberta", q="query_proj", k="key_proj", v="value_proj",
                                 o=("^output.dense",), classes=("DisentangledSelfAttention",),
                                 head_fields={"num_attention_heads": "heads",
                                              "attention_head_size": "head_dim"}))
register_attention(AttentionSpec("distilbert", q="q_lin", k="k_lin", v="v_lin", o=("out_lin",),
                                 attrs={"dim": "width"},  # transformers 4.x: dim // n_heads
                                 head_fields={"n_heads": "heads"},
                                 classes=("DistilBertSelfAttention", "MultiHeadSelfAttention")))
# LLaMA, Mistral, Qwen, Gemma, Phi, OPT, BART, Whisper, CLIP, ViT, Dinov2…
register_attention(AttentionSpec("qkv_proj", q="q_proj", k="k_proj", v="v_proj",
                                 o=("o_proj", "out_proj", "dense"),
                                 head_fields=_GQA,
                                 bias_tables=("relative_position_bias.relative_position_bias_table",),  # Swin
                                 attrs={"num_heads": "heads", "num_key_value_heads": "kv_heads",
                                        "num_key_value_groups": "groups"},
                                 classes=_LLAMA + ("OPTAttention", "BartAttention",
                                                   "WhisperAttention", "CLIPAttention",
                                                   "ViTAttention", "Dinov2Attention")))
# T5, MT5 (relative bias in the first layer, passed down the stack: tied), UMT5 (a bias per layer)
register_attention(AttentionSpec("t5", q="q", k="k", v="v", o=("o",), bias_tables=("relative_attention_bias",),
                                 bias_arg="position_bias", attrs={"n_heads": "heads", "inner_dim": "width"},
                                 head_fields={"num_heads": "heads"},
                                 classes=("T5Attention", "MT5Attention", "UMT5Attention")))
register_attention(AttentionSpec("gpt2", fused="c_attn", cross_q="q_attn", o=("c_proj",),
                                 attrs={"split_size": "width"}, classes=("GPT2Attention",),
                                 head_fields={"n_head": "heads"}))
register_attention(AttentionSpec("phi3", fused="qkv_proj", o=("o_proj",), head_fields=_GQA,
                                 config_attrs={"num_attention_heads": "heads"},
                                 classes=("Phi3Attention",)))
# GPT-NeoX (per head [q k v]); Falcon: per head [q k v], per KV group [its q heads, k, v]
# (new_decoder_architecture) or [Q heads | k | v] (multi_query), told apart by the head counts
register_attention(AttentionSpec("query_key_value", fused="query_key_value", layout="heads", o=("dense",),
                                 head_fields={**_GQA, "num_kv_heads": "kv_heads"},
                                 unsupported_config=(("alibi", "the model adds one ALiBi bias of "
                                                      "config.num_attention_heads heads to every layer's "
                                                      "attention mask, with slopes (and a scale) that "
                                                      "depend on that count, so no layer can drop heads"),),
                                 classes=("GPTNeoXAttention", "FalconAttention")))
register_attention(AttentionSpec("wqkv", fused="Wqkv", o=("Wo", "out_proj"),
                                 unsupported_config=(("attn_config.alibi", "the model adds one ALiBi "
                                                      "bias of n_heads heads to every layer's attention "
                                                      "scores, with slopes that depend on that count, so "
                                                      "no layer can drop heads"),),
                                 classes=("ModernBertAttention", "MptAttention")))

register_mlp(MLPSpec("bert", up="intermediate.dense", act=("intermediate",), down="output.dense"))
register_mlp(MLPSpec("albert", up="ffn", act=("activation",), down="ffn_output"))
register_mlp(MLPSpec("distilbert", up="lin1", act=("activation",), down="lin2", config=("hidden_dim",)))
register_mlp(MLPSpec("fc", up="fc1", act=("activation_fn", "activation"), down="fc2",
                     config=("intermediate_size", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim")))
register_mlp(MLPSpec("gpt2", up="c_fc", act=("act",), down="c_proj", config=("n_inner",)))
register_mlp(MLPSpec("h_to_4h", up="dense_h_to_4h", act=("act",), down="dense_4h_to_h",
                     config=("intermediate_size", "ffn_hidden_size")))
register_mlp(MLPSpec("t5", up="wi", act=("act",), down="wo", config=("d_ff",)))
register_mlp(MLPSpec("t5_gated", gate="wi_0", up="wi_1", act=("act",), down="wo", config=("d_ff",)))
# an MoE block's shared expert (Qwen2-MoE): matched at the block, so its own width field is used
register_mlp(MLPSpec("shared_expert", gate="shared_expert.gate_proj", up="shared_expert.up_proj",
                     act=("shared_expert.act_fn",), down="shared_expert.down_proj",
                     config=("shared_expert_intermediate_size",)))
register_mlp(MLPSpec("gated", gate="gate_proj", up="up_proj", act=("act_fn",), down="down_proj"))
register_mlp(MLPSpec("gate_up", up="gate_up_proj", fused_gate=True, act=("activation_fn",),
                     down="down_proj"))
register_mlp(MLPSpec("wi_wo", up="Wi", fused_gate=True, act=("act",), down="Wo"))  # ModernBERT: [act in | gate]

_IMPL_MARKS = ("Sdpa", "FlashAttention2", "FlashAttention3", "Flash", "Eager", "Flex")


def _normal_class(mod: nn.Module) -> str:
    """The attention class name without its implementation marker (``BertSdpaSelfAttention`` ->
    ``BertSelfAttention``)."""
    name = type(mod).__name__
    for mark in _IMPL_MARKS:
        name = name.replace(mark, "")
    return name


def head_rule_types() -> tuple:
    """The rule keys (without ``"hf."``) of Hugging Face head groups: every registered attention
    class, and ``"Attention"`` for any other recognised attention."""
    out = ["Attention"]
    for spec in ATTENTION_SPECS:
        out += [c for c in spec.classes if c not in out]
    return tuple(out)


# --------------------------------------------------------------------------------------------
# the head handler


@dataclass(frozen=True)
class HeadMember:
    """One attention module of a head group (several where the layers of a stack share the
    position bias of the first, as T5's): its ``module`` and projection names (``k``: a separate
    key projection, ``None`` when fused), the module attributes ``attrs`` and the fields of its own
    config ``config_attrs`` that export sets, and ``table``: ``(module, parameter)`` of a tensor
    of ``table_rows`` rows whose columns are the query heads (T5's ``relative_attention_bias``
    weight, Swin's ``relative_position_bias_table``)."""

    module: str
    o: str
    q: str
    k: str | None = None
    attrs: dict = field(default_factory=dict)
    config_attrs: dict = field(default_factory=dict)
    table: tuple | None = None
    table_rows: int = 0


class HFHeads(HeadHandler):
    """Head units of one or more recognised Hugging Face attention modules (``members``, the
    same heads kept in each): ``n_units`` units of ``q_per_unit`` query heads of ``head_dim``
    each, gated by a pre-hook on each output projection; export sets the modules' head-count
    ``attrs`` (and ``config_attrs`` on a copy of their config) and slices their bias tables."""

    def __init__(self, members, n_units: int, head_dim: int, q_per_unit: int = 1,
                 multi_query: bool = False, rule_type: str = "Attention", head_fields: dict | None = None):
        members = tuple(members)
        super().__init__(members[0].module, n_units, head_dim)
        self.members = members
        self.q_per_unit, self.multi_query = q_per_unit, multi_query
        first = members[0]
        self.o, self.q, self.k, self.attrs = first.o, first.q, first.k, dict(first.attrs)
        self.rule_type = rule_type
        self.head_fields = dict(head_fields or {})  # config fields of the head count and size

    @property
    def copies(self) -> int:
        """Attention modules that keep these heads (layers tied by a shared position bias)."""
        return len(self.members)

    def owners(self, modules: dict) -> list:
        return [(m.module, type(modules[m.module])) for m in self.members]

    def hooks(self, modules, gates, gi) -> list:
        d = self.q_per_unit * self.head_dim

        def hook(module, args):
            x = args[0]
            g = gates.head_gate(gi, x.shape[0] if x.dim() > 2 else None, x)
            g = g.repeat_interleave(d, dim=-1)
            if g.dim() == 2:  # [batch, units * d] over [batch, ..., units * d]
                g = g.view(g.shape[0], *([1] * (x.dim() - 2)), g.shape[1])
            return (x * g,) + tuple(args[1:])
        return [modules[m.o].register_forward_pre_hook(hook) for m in self.members]

    def recorder(self, modules, calls) -> list:
        # (batch, target length, source length) of every call: the query projection's input
        # gives batch and target, the key projection's the source (fused: the same)
        def shape(x):
            return (int(torch.tensor(x.shape[:-2]).prod()) if x.dim() > 2 else 1, x.shape[-2])

        handles = []
        for m in self.members:
            queries, keys, done = [], [], [0]

            def pair(queries=queries, keys=keys, done=done):  # either order (ViT 4.x: key first)
                while done[0] < min(len(queries), len(keys)):
                    calls.append((*queries[done[0]], keys[done[0]]))
                    done[0] += 1

            def q_hook(module, args, output, queries=queries, keys=keys, pair=pair, fused=m.k is None):
                queries.append(shape(args[0]))
                if fused:
                    keys.append(queries[-1][1])
                pair()

            def k_hook(module, args, output, keys=keys, pair=pair):
                keys.append(shape(args[0])[1])
                pair()
            handles.append(modules[m.q].register_forward_hook(q_hook))
            if m.k is not None:
                handles.append(modules[m.k].register_forward_hook(k_hook))
        return handles

    def extra_cost(self, h, calls) -> tuple:
        heads = h * self.q_per_unit
        params = sum(m.table_rows for m in self.members) * heads  # bias tables: a column per head
        return params, sum(2 * b * t * s * heads * self.head_dim for b, t, s in calls)

    def widths(self, n: int) -> dict:
        """The values of :attr:`attrs` with ``n`` units kept."""
        return self._values(n, self.attrs)

    def _values(self, n: int, kinds: dict) -> dict:
        heads, kv = n * self.q_per_unit, 1 if self.multi_query else n
        value = {"heads": heads, "kv_heads": kv, "groups": heads // kv,
                 "width": heads * self.head_dim, "head_dim": self.head_dim}
        return {a: value[kind] for a, kind in kinds.items()}

    def export(self, root, modules, keep) -> None:
        n = len(keep)
        heads = (keep[:, None] * self.q_per_unit + torch.arange(self.q_per_unit)).reshape(-1)
        for m in self.members:
            mod = modules[m.module]
            for key, value in self._values(n, m.attrs).items():
                setattr(mod, key, value)
            if m.config_attrs:  # its own copy: the other layers keep their counts
                mod.config = copy.copy(mod.config)
                for key, value in self._values(n, m.config_attrs).items():
                    setattr(mod.config, key, value)
            if m.table is not None:
                owner, pname = modules[m.table[0]], m.table[1]
                old = getattr(owner, pname)
                w = old.index_select(-1, heads.to(old.device)).detach().clone()
                setattr(owner, pname, nn.Parameter(w, requires_grad=old.requires_grad))
                if isinstance(owner, nn.Embedding):
                    owner.embedding_dim = len(heads)

    def record(self, modules: dict) -> dict:
        """``{module: {attribute: value}}`` of the exported attention modules kept in
        ``config.gradprune_widths`` (``"config.<field>"``: a field of the module's own config;
        bias tables: ``"shape:<parameter>"``, and an ``Embedding``'s ``embedding_dim``)."""
        out = {}
        for m in self.members:
            mod = modules[m.module]
            out[m.module] = {a: getattr(mod, a) for a in m.attrs}
            out[m.module].update({f"config.{a}": getattr(mod.config, a) for a in m.config_attrs})
            if m.table is not None:
                owner, pname = modules[m.table[0]], m.table[1]
                rec = out.setdefault(m.table[0], {})  # (Swin 4.x: the attention module itself)
                rec[f"shape:{pname}"] = list(getattr(owner, pname).shape)
                if isinstance(owner, nn.Embedding):
                    rec["embedding_dim"] = owner.embedding_dim
        return out

    def config_fields(self, n: int) -> dict:
        """The config fields (:attr:`head_fields`) for ``n`` units in every layer (whether the
        config class honours them is checked by :func:`uniform_width_ok`)."""
        return {} if n == self.n_heads else self._values(n, self.head_fields)


# --------------------------------------------------------------------------------------------
# recognition


class _Builder:
    """Collects groups, roles and mask points of a Hugging Face model."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.modules = dict(model.named_modules())
        self.space_size: list = []
        self.roles: dict = {}
        self.mask_points: dict = {}
        self.groups: list = []
        self.space_group: dict = {}
        self.claimed: set = set()
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


def _is_proj(mod) -> bool:
    return isinstance(mod, nn.Linear) or is_conv1d(mod)


def _out_features(mod) -> int:
    return mod.nf if is_conv1d(mod) else mod.out_features


def _dims(mod) -> tuple:
    """(output dim, input dim) of a projection's weight (``Conv1D`` stores ``[in, out]``)."""
    return (1, 0) if is_conv1d(mod) else (0, 1)


def _join(*parts) -> str:
    return ".".join(p for p in parts if p)


def _child(b: _Builder, name: str, path: str | None):
    """``(qualified name, module)`` of ``path`` under module ``name`` (``^``: under its parent)."""
    if path is None:
        return None, None
    base = name
    while path.startswith("^"):
        base, path = base.rpartition(".")[0], path[1:]
    full = _join(base, path)
    return full, b.modules.get(full)


def _family(b: _Builder, name: str) -> str:
    """The ``model_type`` of the innermost pretrained model holding module ``name``."""
    parts = name.split(".")
    for i in range(len(parts), -1, -1):
        cfg = getattr(b.modules.get(".".join(parts[:i])), "config", None)
        kind = getattr(cfg, "model_type", None)
        if isinstance(kind, str) and kind and kind != "encoder-decoder":
            return kind.replace("-", "_")
    return "hf"


def _int_attr(mod, names) -> int | None:
    for a in names:
        v = getattr(mod, a, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


# attribute names under which the families put their cross-attention (lower case)
_CROSS_NAMES = ("crossattention", "encoder_attn", "encdecattention", "cross_attn")


def _is_cross(name: str, mod) -> bool:
    """Whether the attention module ``name`` attends to another sequence: its own
    ``is_cross_attention`` flag, or a name in ``_CROSS_NAMES`` among the last two parts of its
    path (``decoder.layers.0.encoder_attn``, ``encoder.layer.0.crossattention.self``)."""
    if getattr(mod, "is_cross_attention", False) is True:
        return True
    return any(p.lower() in _CROSS_NAMES for p in name.split(".")[-2:])


def _match_attention(b: _Builder, name: str, mod: nn.Module):
    """``(spec, projections, output)`` if ``mod`` has the projections of a registered layout."""
    for spec in ATTENTION_SPECS:
        if spec.fused is not None:
            f = getattr(mod, spec.fused, None)
            if not _is_proj(f):
                continue
            cq = getattr(mod, spec.cross_q, None) if spec.cross_q else None
            projs = {"fused": f"{name}.{spec.fused}"}
            if _is_proj(cq) and getattr(mod, "is_cross_attention", False):
                projs["q"] = f"{name}.{spec.cross_q}"
        else:
            if not all(_is_proj(getattr(mod, p, None)) for p in (spec.q, spec.k, spec.v)):
                continue
            projs = {r: f"{name}.{getattr(spec, r)}" for r in "qkv"}
        for o in spec.o:
            full, om = _child(b, name, o)
            if _is_proj(om):
                return spec, projs, full
    return None


def _head_layout(b: _Builder, name: str, mod: nn.Module, spec: AttentionSpec, projs: dict):
    """``(q heads, kv heads, head_dim)`` or the reason why they cannot be read."""
    d = _int_attr(mod, ("head_dim", "attention_head_size", "head_size", "key_value_proj_dim"))
    n_attr = _int_attr(mod, ("num_heads", "num_attention_heads", "n_heads"))
    if d is None:
        w = _out_features(b.modules[projs.get("q") or projs["fused"]])
        if n_attr is None or (w if "q" in projs else w // 3) % n_attr:
            return "no head size (head_dim / attention_head_size attribute)"
        d = (w if "q" in projs else w // 3) // n_attr
    if "fused" in projs and "q" not in projs:
        total = _out_features(b.modules[projs["fused"]])
        kv = _int_attr(mod, ("num_key_value_heads", "num_kv_heads"))
        if total % d:
            return f"the fused projection's {total} outputs are not a multiple of head_dim {d}"
        n_q = total // d - 2 * kv if kv else total // (3 * d)
        n_kv = kv or n_q
        if n_q <= 0 or (n_q + 2 * n_kv) * d != total:
            return f"the fused projection's {total} outputs are not Q, K and V heads of {d}"
    elif "fused" in projs:  # cross-attention: q separate, fused [K | V]
        n_q = _out_features(b.modules[projs["q"]]) // d
        n_kv = _out_features(b.modules[projs["fused"]]) // (2 * d)
    else:
        widths = [_out_features(b.modules[projs[r]]) for r in "qkv"]
        if any(w % d for w in widths) or widths[1] != widths[2]:
            return f"projection widths {widths} are not heads of {d}"
        n_q, n_kv = widths[0] // d, widths[1] // d
    if n_attr is not None and n_attr != n_q:
        return f"num_heads {n_attr} disagrees with {n_q} query heads of {d} in the projections"
    if n_kv < 1 or n_q % n_kv:
        return f"{n_q} query heads in {n_kv} key/value heads"
    if n_q < 2:
        return "a single query head"
    return n_q, n_kv, d


# attention classes whose transformers 4.x forward cannot run with fewer heads -> why
_OLD_TRANSFORMERS = {"CLIPAttention": "its forward reshapes the heads' output to the input's "
                     "hidden size"}


def _transformers_major() -> int:
    version = getattr(sys.modules.get("transformers"), "__version__", "5")
    return int(version.split(".")[0]) if version.split(".")[0].isdigit() else 5


# query/key norms of attention modules: per head (weight of head_dim: Qwen3, Gemma3) or over
# every head at once (OLMoE: weight of heads * head_dim), which makes heads unprunable
_QK_NORMS = ("q_norm", "k_norm", "q_layernorm", "k_layernorm")


def _cross_head_norm(mod: nn.Module, n_q: int, n_kv: int, d: int) -> str | None:
    """The query/key norm of attention ``mod`` that normalises several heads together (OLMoE's
    ``q_norm`` over every query head: a 1-D weight of ``heads * head_dim``), if any."""
    for child_name in _QK_NORMS:
        w = getattr(getattr(mod, child_name, None), "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() == 1 and w.numel() > d:
            return child_name
    return None


def _config_blocks(b: _Builder, name: str, mod: nn.Module, spec: AttentionSpec) -> str | None:
    """Why the config rules out this layout's heads (``spec.unsupported_config``), or ``None``."""
    config = getattr(mod, "config", None)
    if config is None:
        parts = name.split(".")
        for i in range(len(parts), -1, -1):
            config = getattr(b.modules.get(".".join(parts[:i])), "config", None)
            if config is not None:
                break
    for key, why in spec.unsupported_config:
        value = config
        for part in key.split("."):  # a dotted path reaches a sub-config (MPT's attn_config.alibi)
            value = value.get(part) if isinstance(value, dict) else getattr(value, part, None)
        if value:
            return f"config.{key} is set: {why}"
    return None


def _tie_key(name: str, mod: nn.Module, spec: AttentionSpec) -> str:
    """Modules with the same key form one head group: the module's own name, or, where its
    forward takes the stack's shared position bias (``spec.bias_arg``), its name with the layer
    indices replaced (every layer of the stack)."""
    if spec.bias_arg is None:
        return name
    try:
        takes = spec.bias_arg in inspect.signature(mod.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtin forward
        takes = False
    return re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", name) if takes else name


def _bias_table(b: _Builder, name: str, spec: AttentionSpec, n_q: int):
    """``((module, parameter), rows)`` of the first of ``spec.bias_tables`` present under
    attention ``name`` with one column per query head, or ``(None, 0)``."""
    for path in spec.bias_tables:
        full, child = _child(b, name, path)
        owner, pname = (full, "weight") if isinstance(child, nn.Embedding) else full.rpartition(".")[::2]
        p = getattr(b.modules.get(owner), pname, None)
        if isinstance(p, nn.Parameter) and p.dim() >= 2 and p.shape[-1] == n_q:
            return (owner, pname), p.numel() // n_q
    return None, 0


def _per_head_params(b: _Builder, name: str, mod: nn.Module, projs: dict, o: str, table, n_q: int):
    """The first parameter of attention ``name`` outside its projections and bias table whose
    last dim has one entry per query head (a tensor export would not slice), or ``None``."""
    known = set(projs.values()) | {o}
    for pname, p in mod.named_parameters():
        full = _join(name, pname)
        owner = full.rpartition(".")[0]
        if owner in known or (table is not None and (owner, full.rpartition(".")[2]) == table):
            continue
        if p.dim() >= 2 and p.shape[-1] == n_q:
            return full
    return None


def _heads_of(b: _Builder, name: str, mod: nn.Module, match):
    """The head layout and slices of recognised attention ``name`` (a dict), or ``None`` when
    its heads are not pruned (the reason is then in ``skipped``)."""
    spec, projs, o = match
    cls = type(mod).__name__
    if spec.unsupported:
        b.skip(name, f"{cls}: {spec.unsupported}")
        return None
    read = _head_layout(b, name, mod, spec, projs)
    if isinstance(read, str):
        b.skip(name, f"{cls}: heads not pruned ({read})")
        return None
    blocked = _config_blocks(b, name, mod, spec)
    if blocked:
        b.skip(name, f"{cls}: heads not pruned ({blocked})")
        return None
    norm = _normal_class(mod)
    why = _OLD_TRANSFORMERS.get(norm) if _transformers_major() < 5 else None
    if why:
        b.skip(name, f"{cls}: heads not pruned under transformers {_transformers_major()}.x ({why})")
        return None
    n_q, n_kv, d = read
    across = _cross_head_norm(mod, n_q, n_kv, d)
    if across:
        b.skip(name, f"{cls}: heads not pruned ({across} normalises across all heads at once, "
               "so removing a head would change the others)")
        return
    mq = n_kv == 1  # multi-query: unit = one query head, the K/V head kept
    n, per = (n_q, 1) if mq else (n_kv, n_q // n_kv)
    slices, roles, producers = [], {}, []

    def sl(m, offset, inner):
        slices.append(Slice(m, "out", _dims(b.modules[m])[0], offset, inner, n))

    if "fused" in projs and "q" not in projs:
        f = projs["fused"]
        producers.append(f)
        if mq:  # [Q heads | K | V] (per-group layout with one group: the same)
            sl(f, 0, d)
            segs = (("g", d), (("free", 2 * d), 1))
        elif spec.layout == "heads":  # per unit: its query heads, K, V
            sl(f, 0, (per + 2) * d)
            segs = (("g", (per + 2) * d),)
        else:
            sl(f, 0, per * d), sl(f, n_q * d, d), sl(f, (n_q + n_kv) * d, d)
            segs = (("g", per * d), ("g", d), ("g", d))
        roles[f] = segs
    else:
        q = projs["q"]
        producers.append(q)
        sl(q, 0, per * d)
        roles[q] = (("g", per * d),)
        if "fused" in projs:  # GPT-2 cross-attention: fused [K | V]
            f = projs["fused"]
            if not mq:
                producers.append(f)
                sl(f, 0, d), sl(f, n_kv * d, d)
                roles[f] = (("g", d), ("g", d))
        elif not mq:
            for r in "kv":
                producers.append(projs[r])
                sl(projs[r], 0, d)
                roles[projs[r]] = (("g", d),)
    slices.append(Slice(o, "in", _dims(b.modules[o])[1], 0, per * d, n))
    attrs = {a: kind for a, kind in _HEADS.items()
             if isinstance(getattr(mod, a, None), int) and not isinstance(getattr(mod, a), bool)}
    attrs.update(spec.attrs)
    table, rows = _bias_table(b, name, spec, n_q)
    if table is not None:
        slices.append(Slice(table[0], "table", b.modules[table[0]].get_parameter(table[1]).dim() - 1,
                            0, per, n, param=table[1]))
    stray = _per_head_params(b, name, mod, projs, o, table, n_q)
    if stray:
        b.skip(name, f"{cls}: heads not pruned (parameter {stray} has one column per head and is "
               "not a registered bias table)")
        return None
    member = HeadMember(name, o, projs.get("q") or projs["fused"],
                        projs.get("k") or (projs["fused"] if "q" in projs else None), attrs,
                        dict(spec.config_attrs), table, rows)
    cross = _is_cross(name, mod)
    if cross and norm.replace("Self", "Cross") in head_rule_types():  # 4.x: one class for both
        norm = norm.replace("Self", "Cross")
    return {"n": n, "per": per, "d": d, "mq": mq, "slices": slices, "roles": roles,
            "producers": producers, "o": o, "member": member, "spec": spec, "cross": cross,
            "rule": norm if norm in head_rule_types() else "Attention", "cls": type(mod)}


def _head_group(b: _Builder, pieces: list) -> None:
    """One head group over the attention modules ``pieces`` (of :func:`_heads_of`), which keep
    the same heads (one module; or the layers of a stack sharing a position bias)."""
    first = pieces[0]
    name = first["member"].module
    shape = {(p["n"], p["per"], p["d"], p["mq"]) for p in pieces}
    if len(shape) > 1:
        for p in pieces:
            b.skip(p["member"].module, "heads not pruned: the layers sharing the first layer's "
                   f"position bias have different head layouts {sorted(shape)}")
        return
    n, per, d, mq = shape.pop()
    family = _family(b, name)
    handler = HFHeads([p["member"] for p in pieces], n, d, per, mq, first["rule"],
                      first["spec"].head_fields)
    kind = "cross_heads" if first["cross"] else "heads"
    space = b.group(name, n, [m for p in pieces for m in p["producers"]],
                    [s for p in pieces for s in p["slices"]],
                    [(p["member"].module, p["cls"]) for p in pieces], handler,
                    rule_type=first["rule"], kind=f"{family}.{kind}")
    for p in pieces:
        for m, segs in p["roles"].items():
            b.roles[m] = {"out": Layout(2, 3, tuple(
                (space, inner) if s == "g" else (b.space(s[1]), inner) for s, inner in segs))}
        b.roles[p["o"]] = {"in": Layout(2, 3, ((space, per * d),))}


def _match_mlp(b: _Builder, name: str):
    for spec in MLP_SPECS:
        up, upm = _child(b, name, spec.up)
        down, downm = _child(b, name, spec.down)
        if not (_is_proj(upm) and _is_proj(downm)) or up in b.claimed or down in b.claimed:
            continue
        gate, gatem = _child(b, name, spec.gate)
        if spec.gate is not None and not _is_proj(gatem):
            continue
        acts = [a for a in (_child(b, name, c) for c in spec.act) if isinstance(a[1], nn.Module)]
        return spec, up, gate, acts[0][0] if acts else None, down
    return None


def _mlp(b: _Builder, name: str, match, mlp_gate: str) -> None:
    """The neuron group of recognised MLP ``name``."""
    spec, up, gate, act, down = match
    upm, downm = b.modules[up], b.modules[down]
    n = _out_features(upm) // (2 if spec.fused_gate else 1)
    down_in = downm.nx if is_conv1d(downm) else downm.in_features
    if down_in != n or (gate and _out_features(b.modules[gate]) != n):
        b.skip(name, f"MLP {spec.name}: widths do not match (up {n}, down input {down_in})")
        return
    if gate or spec.fused_gate or mlp_gate == "pre_activation":
        point = up  # act(gate) * up: up's output is a multiplier either way
    elif act is not None:
        point = act
    else:
        b.skip(name, f"MLP {spec.name}: no activation module to gate after (use "
               "mlp_gate='pre_activation')")
        return
    producers = [gate, up] if gate else [up]
    off = n if spec.fused_gate else 0  # gate_up_proj: [gate | up], the up half gated
    slices = [Slice(gate, "out", _dims(b.modules[gate])[0], 0, 1, n)] if gate else []
    if spec.fused_gate:
        slices.append(Slice(up, "out", _dims(upm)[0], 0, 1, n))
    slices += [Slice(up, "out", _dims(upm)[0], off, 1, n), Slice(down, "in", _dims(downm)[1], 0, 1, n)]
    owners = [(p, type(b.modules[p])) for p in producers]
    space = b.group(up, n, producers, slices, owners, rule_type="Linear",
                    kind=f"{_family(b, name)}.ffn")
    lay = Layout(2, 3, ((space, 1),))
    b.roles[up] = {"out": Layout(2, 3, ((space, 1),) * 2) if spec.fused_gate else lay}
    if gate:
        b.roles[gate] = {"out": lay}
    b.roles[down] = {"in": lay}
    b.mask_points[point] = (Layout(2, 3, ((b.space(n), 1), (space, 1))) if spec.fused_gate
                            else lay, "mul")


_BLOCK_BUILDERS: list = []


def register_block_builder(build) -> None:
    """Register ``build(builder)``, run by :func:`analyse_hf` after the attention and MLP tables:
    it adds the groups of blocks those tables cannot describe (``builder.group``; e.g. the
    neurons of stacked MoE experts, see :mod:`~gradprune.structured.experts`) or lists them in
    ``analysis.skipped`` with the reason (``builder.skip``).

    Example: ``register_block_builder(lambda builder: None)``."""
    if not callable(build):
        raise TypeError(f"build must be callable as build(builder), got {type(build).__name__}")
    if build not in _BLOCK_BUILDERS:
        _BLOCK_BUILDERS.append(build)


def analyse_hf(model: nn.Module, example_input=None, mlp_gate: str = "post_activation") -> Analysis | None:
    """The analysis of a Hugging Face model by the structure of its blocks, or ``None`` when
    ``model`` is not a Hugging Face ``PreTrainedModel`` (then torch.fx is used).

    Example: ``analyse_hf(BertModel(config)).groups`` -> a head group and an FFN group per layer.
    """
    if not _is_hf(model):
        return None
    if mlp_gate not in MLP_GATES:
        raise ValueError(f"mlp_gate must be one of {', '.join(MLP_GATES)}, got {mlp_gate!r}")
    b = _Builder(model)
    order = {name: i for i, name in enumerate(b.modules)}
    found = []  # (position, kind, name, match), built in the model's module order
    for name, mod in b.modules.items():
        match = _match_attention(b, name, mod)
        if match is not None:
            found.append((order[name], "attention", name, match))
            b.claimed.update(match[1].values())
            b.claimed.add(match[2])
    for name in b.modules:
        match = _match_mlp(b, name)
        if match is not None:
            found.append((order[match[1]], "mlp", name, match))
            b.claimed.update(p for p in (match[1], match[2], match[4]) if p)
    tied: dict = {}  # tie key -> head pieces of the modules that keep the same heads
    for _, kind, name, match in sorted(found, key=lambda f: f[0]):
        if kind == "attention":
            piece = _heads_of(b, name, b.modules[name], match)
            if piece is not None:
                tied.setdefault(_tie_key(name, b.modules[name], match[0]), []).append(piece)
    placed: set = set()
    for _, kind, name, match in sorted(found, key=lambda f: f[0]):
        if kind == "mlp":
            _mlp(b, name, match, mlp_gate)
            continue
        key = _tie_key(name, b.modules[name], match[0])
        if key in tied and key not in placed:  # the group sits at its first module
            placed.add(key)
            _head_group(b, tied[key])
    for build in _BLOCK_BUILDERS:
        build(b)
    widths = {name for g in b.groups for name in g.modules()}
    for name, mod in b.modules.items():
        if _is_proj(mod) and name not in widths and name not in b.claimed:
            b.skip(name, f"{type(mod).__name__} outside any recognised attention or MLP block "
                   "(its output feeds the hidden size or the model's head)")
    if not b.groups:
        b.skip("", f"Hugging Face model {type(model).__name__}: no attention or MLP block of a "
               f"registered layout (attention: {', '.join(s.name for s in ATTENTION_SPECS)}; "
               f"MLP: {', '.join(s.name for s in MLP_SPECS)})")
    return b.analysis()


register_analyser(analyse_hf)


def head_attrs(mod: nn.Module) -> tuple | None:
    """The head-count attributes of an attention module of a registered layout (``None``: not
    one), for :func:`~gradprune.structured.save_pruned`'s width record."""
    for spec in ATTENTION_SPECS:
        present = spec.fused if spec.fused else spec.q
        if spec.unsupported or not _is_proj(getattr(mod, present, None)):
            continue
        attrs = list({**_HEADS, **spec.attrs})
        return tuple(attrs) or None
    return None


def families(analysis: Analysis) -> dict:
    """``{(kind, size): [group indices]}``: the groups that play the same role in every layer
    (heads, FFN neurons) of a Hugging Face model, for uniform widths (``ValueError`` for an
    ``EncoderDecoderModel``, whose config holds no widths of its own; T5, BART and Whisper have
    one config, whose fields are probed like any other)."""
    config = getattr(analysis.model, "config", None)
    if getattr(config, "is_encoder_decoder", False) and hasattr(config, "encoder") \
            and hasattr(config, "decoder"):
        raise ValueError(f"uniform widths need one config for every layer; {type(analysis.model).__name__} "
                         "is an encoder-decoder (its layers are configured by config.encoder and "
                         "config.decoder): export per-layer widths and load them with "
                         "load_pruned_pretrained")
    out: dict = {}
    for gi, g in enumerate(analysis.groups):
        if g.kind is not None:
            out.setdefault((g.kind, g.size), []).append(gi)
    return out


def _uniform_fields(analysis: Analysis, g: Group, w: int) -> dict:
    """The config fields that give ``g``'s family ``w`` units in every layer: the heads' fields
    (:attr:`HFHeads.head_fields`), or every FFN width field of the registered MLP layouts that
    holds the family's width (BART: ``encoder_ffn_dim`` and ``decoder_ffn_dim``)."""
    if g.handler is not None:
        return g.handler.config_fields(w)
    config = analysis.model.config
    own = [spec for spec in MLP_SPECS if g.name.endswith("." + spec.up)]  # the group's layout first
    for specs in (own, MLP_SPECS):  # (Qwen2-MoE: the shared expert's field, not intermediate_size)
        fields = [f for spec in specs for f in spec.config if getattr(config, f, None) == g.size]
        if fields:
            return {f: w for f in dict.fromkeys(fields)}
    return {}


def _uniform_problem(analysis: Analysis, gi: int, w: int, hint: bool = True) -> str | None:
    """Why a plain config cannot express group ``gi`` (and its family) at width ``w`` (``None``:
    it can), with what to do instead unless ``hint`` is false."""
    g = analysis.groups[gi]
    if w == g.size:
        return None
    h = g.handler
    if callable(getattr(h, "uniform_problem", None)):  # a handler that knows its config field
        return h.uniform_problem(getattr(analysis.model, "config", None), w)
    cache = analysis.__dict__.setdefault("_uniform_probes", {})
    if (g.kind, g.size, w) not in cache:
        cache[(g.kind, g.size, w)] = _probe(analysis, g, w)
    why = cache[(g.kind, g.size, w)]
    if why is None or not hint:
        return why
    unit = "heads" if g.handler is not None else "neurons"
    return (f"{why}: a config cannot express {w} of {g.size} {unit} ({g.kind}); search with "
            "uniform=True (they are then kept) or save per-layer widths and load with "
            "load_pruned_pretrained")


def uniform_kept_reason(analysis: Analysis, gis: list, widths) -> str:
    """Why no width in ``widths`` of the family ``gis`` is expressible by a plain config (the
    search report's line for a family ``uniform=True`` keeps whole): the reason of the widest
    that builds other shapes (a head size derived from the hidden size), else of the widest."""
    reasons = [_uniform_problem(analysis, gis[0], w, hint=False) for w in sorted(widths, reverse=True)]
    reasons = [r for r in reasons if r]
    shaped = [r for r in reasons if " builds " in r]
    return (shaped or reasons or ["no config field"])[0]


def _build(model: nn.Module, fields: dict):
    """``model``'s class built on the meta device from its config with ``fields`` set (through
    ``from_dict``, which validates the config as ``from_pretrained`` does), or the reason why
    the config class rejects them (a str)."""
    try:
        config = type(model.config).from_dict({**model.config.to_dict(), **fields})
        with torch.device("meta"):
            return type(model)(config)
    except Exception as exc:  # the config class rejects the widths (e.g. heads not dividing hidden)
        text = str(exc).strip().splitlines()
        return f"{type(model.config).__name__} with {fields} is rejected ({text[-1] if text else type(exc).__name__})"


def _probe(analysis: Analysis, g: Group, w: int) -> str | None:
    """Why a config with the width fields of ``g``'s family set for ``w`` units does not build
    the model that uniform widths export (``None``: it does). The model is built on the meta
    device from the updated config and every pruned layer is compared with the export's shapes
    (the family at ``w``, the other groups dense)."""
    from .flops import _dense_dims, _dims
    fields = _uniform_fields(analysis, g, w)
    if not fields:
        return f"{type(analysis.model.config).__name__} has no width field for {g.kind}"
    built = _build(analysis.model, fields)
    if isinstance(built, str):
        return built
    widths = {i: w for i, x in enumerate(analysis.groups) if x.kind == g.kind and x.size == g.size}
    old, new = dict(analysis.model.named_modules()), dict(built.named_modules())
    for m in analysis.roles:
        if m not in new:
            continue
        want, got = _dims(analysis, m, old[m], widths), _dense_dims(new[m])
        if want != got:
            why = " (it derives the head size from the hidden size)" if g.handler is not None else ""
            return (f"{type(analysis.model.config).__name__} with {fields} builds {m} with (out, in) "
                    f"{got}, not {want}{why}")
    return None


def uniform_width_ok(analysis: Analysis, gi: int, w: int) -> bool:
    """Can a plain config express group ``gi`` (and its family) at width ``w``?"""
    return _uniform_problem(analysis, gi, w) is None


def apply_uniform_config(model: nn.Module, analysis: Analysis, keep: dict) -> None:
    """Check that every layer of exported ``model`` kept the same widths and write them to its
    config (the family's width fields, see :func:`uniform_width_ok`) so plain
    ``from_pretrained`` rebuilds it: the class built on the meta device from the new config must
    have every parameter shape of ``model`` (``ValueError`` otherwise)."""
    fams = families(analysis)
    if not fams:
        raise ValueError("uniform=True needs a Hugging Face model with recognised attention or MLP "
                         "blocks; this model has no per-layer families of groups")
    updates = {}
    for (kind, size), gis in fams.items():
        kept = {len(keep[gi]) if gi in keep else size for gi in gis}
        if len(kept) != 1:
            raise ValueError(f"uniform=True: the {kind} groups keep different widths {sorted(kept)}")
        w = kept.pop()
        problem = _uniform_problem(analysis, gis[0], w)
        if problem is not None:
            raise ValueError(f"uniform=True: {problem}")
        if w != size:
            updates.update(_uniform_fields(analysis, analysis.groups[gis[0]], w))
    if not updates:
        return
    built = _build(model, updates)
    if isinstance(built, str):
        raise ValueError(f"uniform=True: {built}")
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wrong = [k for k, v in built.state_dict().items() if k in have and tuple(v.shape) != have[k]]
    if wrong:  # two families write one field (T5's num_heads: self- and cross-attention)
        raise ValueError(f"uniform=True: a {type(model.config).__name__} with {updates} builds "
                         f"{wrong[0]} with shape {tuple(built.state_dict()[wrong[0]].shape)}, the "
                         f"export has {have[wrong[0]]}; save per-layer widths and load with "
                         "load_pruned_pretrained")
    for key, value in updates.items():
        setattr(model.config, key, value)


def reload_hint(analysis: Analysis, uniform: bool) -> str | None:
    """How the export of a search on a Hugging Face model reloads after ``save_pretrained`` (one
    report line; ``None`` for other models)."""
    if not _is_hf(analysis.model):
        return None
    cls = type(analysis.model).__name__
    if uniform:
        return (f"reload: uniform widths, written to the config: plain {cls}.from_pretrained(path) "
                "loads the export")
    return (f"reload: per-layer widths, recorded in config.{WIDTHS_KEY}: "
            f"gradprune.structured.load_pruned_pretrained({cls}, path) loads the export (plain "
            "from_pretrained builds the dense widths; export(uniform=True) writes one width per "
            "family to the config)")


def record_widths(model: nn.Module, analysis: Analysis) -> None:
    """Record the widths of every pruned layer of an exported Hugging Face ``model`` in
    ``model.config.gradprune_widths`` (``{module name: {attribute: value}}``), next to the
    entries already there (e.g. the expert counts of an expert-pruned model)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return
    modules = dict(model.named_modules())
    widths = dict(getattr(config, WIDTHS_KEY, None) or {})
    for name in analysis.roles:
        mod = modules[name]
        if isinstance(mod, nn.Linear):
            widths[name] = {"in_features": mod.in_features, "out_features": mod.out_features}
        elif is_conv1d(mod):
            widths[name] = {"nx": mod.nx, "nf": mod.nf}
    for g in analysis.groups:
        if isinstance(g.handler, HFHeads):
            widths.update({k: v for k, v in g.handler.record(modules).items() if v})
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


def set_recorded(mod: nn.Module, key: str, value) -> bool:
    """Apply one entry of a width record that is not a plain module attribute: ``"config.<field>"``
    (a field of the module's own config, which gets its own copy) or ``"shape:<parameter>"`` (an
    empty parameter of that shape, e.g. a sliced bias table). ``False`` for any other key."""
    if key.startswith("config."):  # a copy: the other layers share the model's config
        mod.config = copy.copy(mod.config)
        setattr(mod.config, key[7:], value)
        return True
    if key.startswith("shape:"):
        old = getattr(mod, key[6:])
        setattr(mod, key[6:], nn.Parameter(torch.empty(tuple(value), dtype=old.dtype, device=old.device),
                                           requires_grad=old.requires_grad))
        return True
    return False


def _narrow(model: nn.Module, widths: dict, cls_name: str) -> None:
    """Set the recorded widths on ``model``'s modules (new, empty parameters of those widths)."""
    modules = dict(model.named_modules())
    for name, attrs in widths.items():
        mod = modules.get(name)
        if mod is None:
            raise ValueError(f"config.{WIDTHS_KEY} names a module {name!r} that {cls_name} "
                             "does not have")
        for key, value in attrs.items():
            if key == SHAPES_KEY:
                continue
            if not set_recorded(mod, key, value):
                setattr(mod, key, value)
        for key, shape in attrs.get(SHAPES_KEY, {}).items():  # e.g. stacked MoE expert weights
            old = getattr(mod, key)
            setattr(mod, key, nn.Parameter(torch.empty(tuple(shape), dtype=old.dtype, device=old.device)))
        if isinstance(mod, nn.Linear):
            shape = (mod.out_features, mod.in_features)
        elif is_conv1d(mod):
            shape = (mod.nx, mod.nf)
        else:
            continue
        w = mod.weight
        mod.weight = nn.Parameter(torch.empty(shape, dtype=w.dtype, device=w.device))
        if mod.bias is not None:
            mod.bias = nn.Parameter(torch.empty(shape[0] if isinstance(mod, nn.Linear) else shape[1],
                                                dtype=w.dtype, device=w.device))


def load_pruned_pretrained(cls, path: str | os.PathLike, config=None, **kwargs):
    """Load a pruned Hugging Face model saved with ``save_pretrained``: build ``cls(config)``
    (``config`` read from ``path`` by default), narrow the layers recorded in
    ``config.gradprune_widths`` and load the saved weights (strictly, up to tied weights).
    Other keyword arguments go to ``from_pretrained`` (``attn_implementation="eager"``,
    ``dtype``…).

    Example: ``small = gp.structured.load_pruned_pretrained(BertModel, "pruned-bert")``.
    """
    for key in ("output_loading_info", "pretrained_model_name_or_path"):
        if key in kwargs:
            raise TypeError(f"load_pruned_pretrained() sets {key} itself; do not pass it")
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
    for name, attrs in widths.items():
        if not isinstance(attrs, dict):
            raise ValueError(f"config.{WIDTHS_KEY}[{name!r}] must be a dict of attributes, got "
                             f"{type(attrs).__name__}")

    def narrowed_init(self, *args, **kwargs):
        cls.__init__(self, *args, **kwargs)
        _narrow(self, widths, cls.__name__)

    # transformers' own loader (its checkpoint key conversions, tied weights, sharded files)
    # builds the narrowed model through this subclass; the result is a plain ``cls`` again
    narrowed = type(cls.__name__, (cls,), {"__init__": narrowed_init, "__module__": cls.__module__})
    try:
        model, info = narrowed.from_pretrained(path, config=config, output_loading_info=True, **kwargs)
    except Exception as exc:  # a damaged or foreign file: name the weight files
        files = [os.path.join(path, f) for f in sorted(os.listdir(path))
                 if f.endswith((".safetensors", ".bin", ".json")) and f != "config.json"]
        raise ValueError(f"cannot load the pruned weights in {', '.join(files) or path}: "
                         f"{type(exc).__name__}: {exc}") from exc
    model.__class__ = cls
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise ValueError(f"weights in {path} do not fit {cls.__name__}: "
                         + "; ".join(f"{k} {sorted(v)[:5]}" for k, v in bad.items()))
    model.eval()
    return model
