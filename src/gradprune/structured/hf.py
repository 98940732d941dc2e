"""Hugging Face models: blocks recognised by structure, width records in the config, and loading.

Hugging Face models cannot be traced by plain :mod:`torch.fx`, so :func:`analyse_hf` recognises
their transformer blocks by **structure**, not by class name (so the eager, sdpa and flash
attention classes of any transformers version, and new models that reuse a known layout, are
found alike). Every module of the model is matched against one registry of building blocks
(:data:`ATTENTION_SPECS`, :data:`MLP_SPECS`): small tables of attribute names, one per layout,
registered in one place (:func:`register_attention`, :func:`register_mlp`).

- **Attention**: a module with query/key/value projections, separate (``query``/``key``/``value``,
  ``q_proj``/``k_proj``/``v_proj``, ``q_lin``…, ``query_proj``…) or fused (``c_attn``,
  ``qkv_proj``, ``query_key_value``, ``Wqkv``; laid out as ``[Q | K | V]`` blocks or per head),
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

Units of a block that cannot be pruned (a single head; T5's relative position bias, which holds
every head and is shared by all layers) and every other ``Linear``/``Conv1D`` (poolers,
classifiers, embeddings projections) are listed in ``analysis.skipped`` with the reason. The
hidden size (the residual stream, embeddings, norms) is never pruned.

Export (:func:`~gradprune.structured.export_model`) records every pruned layer's widths in
``model.config.gradprune_widths``, so ``model.save_pretrained(path)`` keeps them and
:func:`load_pruned_pretrained` ``(cls, path)`` rebuilds the narrower model and loads its weights
(plain ``from_pretrained`` builds the dense widths of the config and cannot load them). With
uniform widths (``search(..., uniform=True)`` or ``export(uniform=True)``),
:func:`apply_uniform_config` also writes them to the config (the FFN width field of the family,
e.g. ``intermediate_size``, ``n_inner``, ``ffn_dim``; heads where the config takes a
``head_dim``) so plain ``from_pretrained`` loads the model; configs that derive the head size from
``hidden_size / num_attention_heads`` (BERT, GPT-2, OPT…) cannot express fewer heads, which are
then kept; an encoder-decoder's widths cannot be uniform (its config holds none).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import torch
from torch import nn

from .attention import HeadHandler
from .groups import Analysis, Group, Layout, Slice, is_conv1d, register_analyser

__all__ = ["ATTENTION_SPECS", "MLP_GATES", "MLP_SPECS", "WIDTHS_KEY", "AttentionSpec", "HFHeads",
           "MLPSpec", "analyse_hf", "apply_uniform_config", "families", "head_attrs",
           "head_rule_types", "load_pruned_pretrained", "record_widths", "register_attention",
           "register_block_builder", "register_mlp"]

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
    ``config_heads``: the ``model_type`` s whose config takes ``head_dim``, so it can express
    fewer heads (LLaMA-style configs; others derive the head size from the head count).
    ``classes``: known attention class names (their normalised names are rule keys
    ``"hf.<class>"``). ``unsupported``: why the heads of this layout are never pruned."""

    name: str
    q: str | None = None
    k: str | None = None
    v: str | None = None
    fused: str | None = None
    layout: str = "blocks"
    cross_q: str | None = None
    o: tuple = ("o_proj",)
    attrs: dict = field(default_factory=dict)
    config_heads: tuple = ()
    heads_divide_hidden: bool = False
    classes: tuple = ()
    unsupported: str | None = None


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
          "all_head_size": "width", "inner_dim": "width"}
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
register_attention(AttentionSpec("bert", q="query", k="key", v="value", o=("^output.dense", "dense"),
                                 classes=("BertSelfAttention", "BertCrossAttention",
                                          "RobertaSelfAttention", "ElectraSelfAttention",
                                          "AlbertAttention", "ViTSelfAttention")))
register_attention(AttentionSpec("deberta", q="query_proj", k="key_proj", v="value_proj",
                                 o=("^output.dense",), classes=("DisentangledSelfAttention",)))
register_attention(AttentionSpec("distilbert", q="q_lin", k="k_lin", v="v_lin", o=("out_lin",),
                                 attrs={"dim": "width"},  # transformers 4.x: dim // n_heads
                                 classes=("DistilBertSelfAttention", "MultiHeadSelfAttention")))
# LLaMA, Mistral, Qwen, Gemma, Phi, OPT, BART, Whisper, CLIP, ViT, Dinov2…
register_attention(AttentionSpec("qkv_proj", q="q_proj", k="k_proj", v="v_proj",
                                 o=("o_proj", "out_proj", "dense"),
                                 config_heads=("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2",
                                               "mixtral", "qwen2_moe", "qwen3_moe"),
                                 attrs={"num_heads": "heads", "num_key_value_heads": "kv_heads",
                                        "num_key_value_groups": "groups"},
                                 classes=_LLAMA + ("OPTAttention", "BartAttention",
                                                   "WhisperAttention", "CLIPAttention",
                                                   "ViTAttention", "Dinov2Attention")))
register_attention(AttentionSpec("t5", q="q", k="k", v="v", o=("o",), classes=("T5Attention",),
                                 unsupported="T5's relative position bias holds every head and is "
                                 "computed once for all layers, so heads are not pruned"))
register_attention(AttentionSpec("gpt2", fused="c_attn", cross_q="q_attn", o=("c_proj",),
                                 attrs={"split_size": "width"}, classes=("GPT2Attention",)))
register_attention(AttentionSpec("phi3", fused="qkv_proj", o=("o_proj",),
                                 classes=("Phi3Attention",),
                                 unsupported="the forward splits qkv_proj at "
                                 "config.num_attention_heads * head_dim, one count shared by "
                                 "every layer, so heads are not pruned"))
register_attention(AttentionSpec("gpt_neox", fused="query_key_value", layout="heads", o=("dense",),
                                 classes=("GPTNeoXAttention",)))
register_attention(AttentionSpec("wqkv", fused="Wqkv", o=("Wo", "out_proj"),
                                 classes=("ModernBertAttention", "MptAttention")))

register_mlp(MLPSpec("bert", up="intermediate.dense", act=("intermediate",), down="output.dense"))
register_mlp(MLPSpec("albert", up="ffn", act=("activation",), down="ffn_output"))
register_mlp(MLPSpec("distilbert", up="lin1", act=("activation",), down="lin2", config=("hidden_dim",)))
register_mlp(MLPSpec("fc", up="fc1", act=("activation_fn", "activation"), down="fc2",
                     config=("intermediate_size", "ffn_dim")))
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


class HFHeads(HeadHandler):
    """Head units of a recognised Hugging Face attention module ``module``: ``n_units`` units of
    ``q_per_unit`` query heads of ``head_dim`` each, gated by a pre-hook on the output projection
    ``o``; export sets the module's head-count ``attrs``."""

    def __init__(self, module: str, n_units: int, head_dim: int, q_per_unit: int = 1,
                 o: str | None = None, attrs: dict | None = None, multi_query: bool = False,
                 rule_type: str = "Attention", config_heads: bool = False,
                 heads_divide_hidden: bool = False, q: str | None = None, k: str | None = None):
        super().__init__(module, n_units, head_dim)
        self.q_per_unit, self.multi_query = q_per_unit, multi_query
        self.o, self.q, self.k = o, q, k
        self.attrs = dict(attrs or {})
        self.rule_type = rule_type
        # can a config with head_dim express fewer heads; must the heads divide hidden_size?
        self.uniform_heads, self.heads_divide_hidden = config_heads, heads_divide_hidden

    def hooks(self, modules, gates, gi) -> list:
        d = self.q_per_unit * self.head_dim

        def hook(module, args):
            x = args[0]
            g = gates.head_gate(gi, x.shape[0] if x.dim() > 2 else None, x)
            g = g.repeat_interleave(d, dim=-1)
            if g.dim() == 2:  # [batch, units * d] over [batch, ..., units * d]
                g = g.view(g.shape[0], *([1] * (x.dim() - 2)), g.shape[1])
            return (x * g,) + tuple(args[1:])
        return [modules[self.o].register_forward_pre_hook(hook)]

    def recorder(self, modules, calls) -> list:
        # (batch, target length, source length) of every call: the query projection's input
        # gives batch and target, the key projection's the source (fused: the same)
        queries, keys = [], []

        def shape(x):
            return (int(torch.tensor(x.shape[:-2]).prod()) if x.dim() > 2 else 1, x.shape[-2])

        def pair():  # the projections may run in either order (ViT 4.x: key first)
            while len(calls) < min(len(queries), len(keys)):
                calls.append((*queries[len(calls)], keys[len(calls)]))

        def q_hook(module, args, output):
            queries.append(shape(args[0]))
            if self.k is None:
                keys.append(queries[-1][1])
            pair()

        def k_hook(module, args, output):
            keys.append(shape(args[0])[1])
            pair()
        handles = [modules[self.q].register_forward_hook(q_hook)]
        if self.k is not None:
            handles.append(modules[self.k].register_forward_hook(k_hook))
        return handles

    def extra_cost(self, h, calls) -> tuple:
        return 0, sum(2 * b * t * s * h * self.q_per_unit * self.head_dim for b, t, s in calls)

    def widths(self, n: int) -> dict:
        """The values of :attr:`attrs` with ``n`` units kept."""
        heads, kv = n * self.q_per_unit, 1 if self.multi_query else n
        value = {"heads": heads, "kv_heads": kv, "groups": heads // kv,
                 "width": heads * self.head_dim}
        return {a: value[kind] for a, kind in self.attrs.items()}

    def export(self, root, modules, keep) -> None:
        mod = modules[self.module]
        for key, value in self.widths(len(keep)).items():
            setattr(mod, key, value)

    def record(self, mod: nn.Module) -> dict:
        """The attributes of the exported attention module kept in ``config.gradprune_widths``."""
        return {a: getattr(mod, a) for a in self.attrs}

    def config_fields(self, n: int) -> dict:
        """The config fields that make ``from_pretrained`` build ``n`` units in every layer
        (``ValueError`` where the config derives the head size from ``hidden_size /
        num_attention_heads`` and ``n`` is not the unpruned count)."""
        if n == self.n_heads:
            return {}
        if not self.uniform_heads:
            raise ValueError(f"{self.module}: a config derives the head size from hidden_size / "
                             f"num_attention_heads, so it cannot express {n} of {self.n_heads} heads")
        heads = n * self.q_per_unit
        return {"num_attention_heads": heads,
                "num_key_value_heads": 1 if self.multi_query else n, "head_dim": self.head_dim}


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


_CROSS_NAMES = ("crossattention", "encoder_attn", "encdecattention", "cross_attn")


def _is_cross(name: str, mod) -> bool:
    if getattr(mod, "is_cross_attention", False) is True or "Cross" in type(mod).__name__:
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


def _attention(b: _Builder, name: str, mod: nn.Module, match) -> None:
    """The head group of recognised attention ``name``."""
    spec, projs, o = match
    cls = type(mod).__name__
    if spec.unsupported:
        b.skip(name, f"{cls}: {spec.unsupported}")
        return
    read = _head_layout(b, name, mod, spec, projs)
    if isinstance(read, str):
        b.skip(name, f"{cls}: heads not pruned ({read})")
        return
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
        if spec.layout == "heads":  # per unit: its query heads, K, V
            sl(f, 0, (per + 2) * d)
            segs = (("g", (per + 2) * d),)
        elif mq:
            sl(f, 0, d)
            segs = (("g", d), (("free", 2 * d), 1))
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
    norm = _normal_class(mod)
    cross = _is_cross(name, mod)
    if cross and norm.replace("Self", "Cross") in head_rule_types():  # 4.x: one class for both
        norm = norm.replace("Self", "Cross")
    rule = norm if norm in head_rule_types() else "Attention"
    why = _OLD_TRANSFORMERS.get(norm) if _transformers_major() < 5 else None
    if why:
        b.skip(name, f"{cls}: heads not pruned under transformers {_transformers_major()}.x ({why})")
        return
    family = _family(b, name)
    handler = HFHeads(name, n, d, per, o, attrs, mq, rule, family in spec.config_heads,
                      spec.heads_divide_hidden, q=projs.get("q") or projs["fused"],
                      k=projs.get("k") or (projs["fused"] if "q" in projs else None))
    cross = "cross_heads" if cross else "heads"
    space = b.group(name, n, producers, slices, [(name, type(mod))], handler, rule_type=rule,
                    kind=f"{family}.{cross}")
    for m, segs in roles.items():
        b.roles[m] = {"out": Layout(2, 3, tuple(
            (space, inner) if s == "g" else (b.space(s[1]), inner) for s, inner in segs))}
    b.roles[o] = {"in": Layout(2, 3, ((space, per * d),))}


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
    for _, kind, name, match in sorted(found, key=lambda f: f[0]):
        if kind == "attention":
            _attention(b, name, b.modules[name], match)
        else:
            _mlp(b, name, match, mlp_gate)
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
    config = getattr(analysis.model, "config", None)
    if w == g.size:
        return None
    if callable(getattr(h, "uniform_problem", None)):  # a handler that knows its config field
        return h.uniform_problem(config, w)
    if h is None:
        if _ffn_field(config, g) is None:
            return (f"{type(config).__name__} has no FFN width field for {g.kind}; save per-layer "
                    "widths and load with load_pruned_pretrained")
        return None
    if not h.uniform_heads:
        return (f"{str(g.kind).split('.')[0].upper()} derives the head size from hidden_size / num_attention_heads, so a "
                f"config cannot express {w} of {g.size} heads; search with uniform=True (heads "
                "are then kept) or save per-layer widths and load with load_pruned_pretrained")
    hidden = getattr(config, "hidden_size", None)
    heads = w * h.q_per_unit
    if getattr(config, "model_type", None) == "llama" and hidden is not None and hidden % heads:
        return (f"{heads} attention heads do not divide hidden_size {hidden}, which "
                f"{type(config).__name__} requires")
    return None


def _ffn_field(config, g: Group) -> str | None:
    """The config field holding the width of FFN group ``g``'s family."""
    n = g.size
    own = [spec for spec in MLP_SPECS if g.name.endswith("." + spec.up)]  # the group's layout first
    for spec in own + MLP_SPECS:
        for f in spec.config:
            if getattr(config, f, None) == n:
                return f
    return None


def uniform_width_ok(analysis: Analysis, gi: int, w: int) -> bool:
    """Can a plain config express group ``gi`` (and its family) at width ``w``?"""
    return _uniform_problem(analysis, gi, w) is None


def apply_uniform_config(model: nn.Module, analysis: Analysis, keep: dict) -> None:
    """Check that every layer of exported ``model`` kept the same widths and write them to its
    config (the family's FFN width field; heads where the config takes ``head_dim``) so plain
    ``from_pretrained`` rebuilds it."""
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
        if w == size:
            continue
        handler = analysis.groups[gis[0]].handler
        if handler is None:
            updates[_ffn_field(model.config, analysis.groups[gis[0]])] = w
        else:
            updates.update(handler.config_fields(w))
    for key, value in updates.items():
        setattr(model.config, key, value)


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
        if isinstance(g.handler, HFHeads) and g.handler.attrs:
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


def _narrow(model: nn.Module, widths: dict, cls_name: str) -> None:
    """Set the recorded widths on ``model``'s modules (new, empty parameters of those widths)."""
    modules = dict(model.named_modules())
    for name, attrs in widths.items():
        mod = modules.get(name)
        if mod is None:
            raise ValueError(f"config.{WIDTHS_KEY} names a module {name!r} that {cls_name} "
                             "does not have")
        for key, value in attrs.items():
            if key != SHAPES_KEY:
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
        model, info = narrowed.from_pretrained(path, config=config, output_loading_info=True)
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
