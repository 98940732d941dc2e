"""Hugging Face models: model-family analysers, width records in the config, and loading.

Hugging Face models cannot be traced by plain :mod:`torch.fx`, so :func:`analyse_hf` recognises
their structure by module classes instead (the family is picked by its layer class). Every head
group is gated on the value projection's output (a head's output is linear in its values, so this
is a multiplier on the head's output before the output projection; transformers 5 has no
``head_mask``); every FFN group is gated where its neurons enter the down projection.

- **BERT** (``BertModel``, ``BertFor*``), per ``BertLayer``: a head group
  (``attention.self.query``/``key``/``value`` rows, ``attention.output.dense`` columns) and an FFN
  group (``intermediate.dense`` rows, ``output.dense`` columns, gated after the activation).
- **GPT-2** (``GPT2Model``, ``GPT2LMHeadModel``…), per ``GPT2Block``: a head group on
  ``attn.c_attn``, a ``Conv1D`` whose ``[in, 3 * hidden]`` weight holds the Q, K and V thirds as
  columns (``head_dim`` columns per head in each third; only the V third is gated), and
  ``attn.c_proj`` input rows; an MLP group (``mlp.c_fc`` output columns, ``mlp.c_proj`` input
  rows, gated on ``mlp.act``'s output; ruled by ``nn.Linear``). Export sets ``num_heads`` and
  ``split_size``.
- **LLaMA** (``LlamaModel``, ``LlamaForCausalLM``…), per ``LlamaDecoderLayer``: a **KV-group**
  group — unit ``g`` is key/value head ``g`` with the ``num_key_value_groups`` query heads that
  share it (``q_proj`` rows ``g * G * head_dim`` …, ``k_proj``/``v_proj`` rows ``g * head_dim``…,
  ``o_proj`` columns like ``q_proj``), gated on ``v_proj``'s output; an MLP group (``gate_proj``
  and ``up_proj`` rows, ``down_proj`` columns, gated on ``up_proj``'s output, a multiplier on
  ``act(gate) * up``). Export sets ``num_heads`` and ``num_key_value_heads``
  (``num_key_value_groups`` and ``head_dim`` are unchanged).

The hidden size (the residual stream, embeddings, norms) is never pruned; cross-attention layers
are left unpruned. Both are listed in ``analysis.skipped``.

Export (:func:`~gradprune.structured.export_model`) records every pruned layer's widths in
``model.config.gradprune_widths``, so ``model.save_pretrained(path)`` keeps them and
:func:`load_pruned_pretrained` ``(cls, path)`` rebuilds the narrower model and loads its weights
(plain ``from_pretrained`` builds the dense widths of the config and cannot load them). With
uniform widths (``search(..., uniform=True)`` or ``export(uniform=True)``),
:func:`apply_uniform_config` also writes them to the config (``intermediate_size``, ``n_inner``,
LLaMA's ``num_attention_heads``/``num_key_value_heads``/``head_dim``) so plain
``from_pretrained`` loads the model; BERT and GPT-2 heads cannot be uniform (their configs derive
the head size from ``hidden_size / num_attention_heads``) and are then kept.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from torch import nn

from .attention import HeadHandler
from .groups import Analysis, Group, Layout, Slice, is_conv1d

__all__ = ["analyse_hf", "BertHeads", "GPT2Heads", "LlamaHeads", "record_widths",
           "load_pruned_pretrained", "apply_uniform_config", "families", "WIDTHS_KEY"]

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

    def recorder(self, modules, calls) -> list:
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            b, t = (x.shape[0], x.shape[1]) if x.dim() == 3 else (1, x.shape[0])
            calls.append((b, t, t))
        return [modules[self.module].register_forward_hook(hook, with_kwargs=True)]

    def extra_cost(self, h, calls) -> tuple:
        return 0, sum(2 * b * t * s * h * self.q_per_unit * self.head_dim for b, t, s in calls)

    def export(self, root, modules, keep) -> None:
        mod = modules[self.module]
        mod.num_attention_heads = len(keep)
        mod.all_head_size = len(keep) * self.head_dim

    def record(self, mod: nn.Module) -> dict:
        """The attributes of the exported attention module kept in ``config.gradprune_widths``."""
        return {"num_attention_heads": mod.num_attention_heads, "all_head_size": mod.all_head_size}


class GPT2Heads(BertHeads):
    """Heads of a ``GPT2Attention``: ``c_attn`` (a ``Conv1D``, weight ``[in, 3 * hidden]``) output
    columns of the head in its Q, K and V thirds and ``c_proj`` input rows; export sets
    ``num_heads`` and ``split_size`` (``head_dim`` and the scaling are unchanged)."""

    rule_type = "GPT2Attention"

    def export(self, root, modules, keep) -> None:
        mod = modules[self.module]
        mod.num_heads = len(keep)
        mod.split_size = len(keep) * self.head_dim

    def record(self, mod: nn.Module) -> dict:
        return {"num_heads": mod.num_heads, "split_size": mod.split_size}


class LlamaHeads(BertHeads):
    """KV groups of a ``LlamaAttention`` (grouped-query attention): unit ``g`` is key/value head
    ``g`` and the ``num_key_value_groups`` query heads that share it. Export sets
    ``num_key_value_heads`` and ``num_heads`` (``num_key_value_groups`` and ``head_dim`` are
    unchanged; the stock forward infers the head counts from the projections)."""

    rule_type = "LlamaAttention"
    uniform_heads = True  # LlamaConfig has head_dim

    def __init__(self, module: str, n_groups: int, head_dim: int, q_per_kv: int):
        super().__init__(module, n_groups, head_dim)
        self.q_per_unit = q_per_kv

    def export(self, root, modules, keep) -> None:
        mod = modules[self.module]
        mod.num_key_value_heads = len(keep)
        mod.num_heads = len(keep) * self.q_per_unit
        mod.num_key_value_groups = self.q_per_unit

    def record(self, mod: nn.Module) -> dict:
        return {"num_heads": mod.num_heads, "num_key_value_heads": mod.num_key_value_heads,
                "num_key_value_groups": mod.num_key_value_groups}


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


def _bert(model: nn.Module) -> Analysis:
    b = _Builder(model)
    for name, layer in model.named_modules():
        if type(layer).__name__ != "BertLayer":
            continue
        if getattr(layer, "crossattention", None) is not None:
            b.skip(f"{name}.crossattention", "cross-attention heads are not pruned")
        sa = layer.attention.self
        sa_name = f"{name}.attention.self"
        if type(sa).__name__ == "BertSelfAttention" and sa.num_attention_heads > 1:
            h, d = sa.num_attention_heads, sa.attention_head_size
            q, k, v = (f"{sa_name}.{p}" for p in ("query", "key", "value"))
            o = f"{name}.attention.output.dense"
            slices = [Slice(p, "out", 0, 0, d, h) for p in (q, k, v)] + [Slice(o, "in", 1, 0, d, h)]
            space = b.group(sa_name, h, [q, k, v], slices, [(sa_name, type(sa))],
                            BertHeads(sa_name, h, d), kind="bert.heads")
            lay = Layout(2, 3, ((space, d),))
            for p in (q, k, v):
                b.roles[p] = {"out": lay}
            b.roles[o] = {"in": lay}
            b.mask_points[v] = (lay, "mul")
        else:
            b.skip(sa_name, f"{type(sa).__name__}: heads not pruned")
        fc1, fc2 = f"{name}.intermediate.dense", f"{name}.output.dense"
        dense1 = layer.intermediate.dense
        n = dense1.out_features
        space = b.group(fc1, n, [fc1], [Slice(fc1, "out", 0, 0, 1, n), Slice(fc2, "in", 1, 0, 1, n)],
                        [(fc1, type(dense1))], kind="bert.ffn")
        lay = Layout(2, 3, ((space, 1),))
        b.roles[fc1] = {"out": lay}
        b.roles[fc2] = {"in": lay}
        b.mask_points[f"{name}.intermediate"] = (lay, "mul")
    return b.analysis()


def _gpt2(model: nn.Module) -> Analysis:
    b = _Builder(model)
    for name, block in model.named_modules():
        if type(block).__name__ != "GPT2Block":
            continue
        if getattr(block, "crossattention", None) is not None:
            b.skip(f"{name}.crossattention", "cross-attention heads are not pruned")
        attn, an = block.attn, f"{name}.attn"
        if (type(attn).__name__ == "GPT2Attention" and not attn.is_cross_attention
                and attn.num_heads > 1 and is_conv1d(attn.c_attn)):
            h, d, e = attn.num_heads, attn.head_dim, attn.split_size
            ca, cp = f"{an}.c_attn", f"{an}.c_proj"
            slices = [Slice(ca, "out", 1, k * e, d, h) for k in range(3)] + [Slice(cp, "in", 0, 0, d, h)]
            space = b.group(an, h, [ca], slices, [(an, type(attn))], GPT2Heads(an, h, d),
                            kind="gpt2.heads")
            b.roles[ca] = {"out": Layout(2, 3, ((space, d),) * 3)}
            b.roles[cp] = {"in": Layout(2, 3, ((space, d),))}
            # gate only the V third of c_attn's output (Q and K thirds: spaces of no group)
            b.mask_points[ca] = (Layout(2, 3, ((b.space(e), 1), (b.space(e), 1), (space, d))), "mul")
        else:
            b.skip(an, f"{type(attn).__name__}: heads not pruned")
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
    return b.analysis()


def _llama(model: nn.Module) -> Analysis:
    b = _Builder(model)
    for name, layer in model.named_modules():
        if type(layer).__name__ != "LlamaDecoderLayer":
            continue
        attn, an = layer.self_attn, f"{name}.self_attn"
        d = getattr(attn, "head_dim", None)
        if type(attn).__name__ == "LlamaAttention" and d and attn.k_proj.out_features // d > 1:
            n_kv = attn.k_proj.out_features // d
            per = attn.num_key_value_groups
            q, k, v, o = (f"{an}.{p}_proj" for p in "qkvo")
            slices = [Slice(q, "out", 0, 0, per * d, n_kv), Slice(k, "out", 0, 0, d, n_kv),
                      Slice(v, "out", 0, 0, d, n_kv), Slice(o, "in", 1, 0, per * d, n_kv)]
            space = b.group(an, n_kv, [q, k, v], slices, [(an, type(attn))],
                            LlamaHeads(an, n_kv, d, per), kind="llama.heads")
            b.roles[q] = {"out": Layout(2, 3, ((space, per * d),))}
            b.roles[k] = {"out": Layout(2, 3, ((space, d),))}
            b.roles[v] = {"out": Layout(2, 3, ((space, d),))}
            b.roles[o] = {"in": Layout(2, 3, ((space, per * d),))}
            # a KV group's output is linear in its values: gating v gates all its query heads
            b.mask_points[v] = (Layout(2, 3, ((space, d),)), "mul")
        else:
            b.skip(an, f"{type(attn).__name__}: heads not pruned (a single KV group or an "
                   "unknown attention class)")
        mlp = layer.mlp
        gp, up, down = (f"{name}.mlp.{p}_proj" for p in ("gate", "up", "down"))
        if all(isinstance(getattr(mlp, f"{p}_proj", None), nn.Linear) for p in ("gate", "up", "down")):
            n = mlp.up_proj.out_features
            space = b.group(up, n, [gp, up], [Slice(gp, "out", 0, 0, 1, n), Slice(up, "out", 0, 0, 1, n),
                                              Slice(down, "in", 1, 0, 1, n)],
                            [(gp, type(mlp.gate_proj)), (up, type(mlp.up_proj))], kind="llama.ffn")
            lay = Layout(2, 3, ((space, 1),))
            b.roles[gp] = {"out": lay}
            b.roles[up] = {"out": lay}
            b.roles[down] = {"in": lay}
            # act(gate) * up: gating up's output is a multiplier on the neuron before down_proj
            b.mask_points[up] = (lay, "mul")
        else:
            b.skip(f"{name}.mlp", f"{type(mlp).__name__}: neurons not pruned")
    return b.analysis()


# family name -> (the layer class that identifies it, analyser)
FAMILIES = {"bert": ("BertLayer", _bert), "gpt2": ("GPT2Block", _gpt2),
            "llama": ("LlamaDecoderLayer", _llama)}


def analyse_hf(model: nn.Module, example_input=None) -> Analysis | None:
    """The analysis of a Hugging Face model by its module classes, or ``None`` when ``model`` is
    not a Hugging Face ``PreTrainedModel`` (then torch.fx is used)."""
    if not _is_hf(model):
        return None
    kinds = {type(m).__name__ for m in model.modules()}
    for layer_class, analyser in FAMILIES.values():
        if layer_class in kinds:
            return analyser(model)
    return Analysis(model=model, groups=[], skipped=[{
        "module": "", "reason": f"Hugging Face model {type(model).__name__} is not a supported "
        f"family (supported: {', '.join(FAMILIES)})"}], roles={}, mask_points={}, space_group={},
        space_size=[])


def families(analysis: Analysis) -> dict:
    """``{(kind, size): [group indices]}``: the groups that play the same role in every layer
    (heads, FFN neurons) of a Hugging Face model, for uniform widths."""
    out: dict = {}
    for gi, g in enumerate(analysis.groups):
        if g.kind is not None:
            out.setdefault((g.kind, g.size), []).append(gi)
    return out


def uniform_width_ok(analysis: Analysis, gi: int, w: int) -> bool:
    """Can a plain config express group ``gi`` (and its family) at width ``w``?"""
    g = analysis.groups[gi]
    h = g.handler
    if h is None or w == g.size:
        return True
    if not getattr(h, "uniform_heads", False):
        return False  # the head size is hidden_size / num_attention_heads
    hidden = getattr(getattr(analysis.model, "config", None), "hidden_size", None)
    # LlamaConfig validates hidden_size % num_attention_heads == 0
    return hidden is None or hidden % (w * h.q_per_unit) == 0


def apply_uniform_config(model: nn.Module, analysis: Analysis, keep: dict) -> None:
    """Check that every layer of exported ``model`` kept the same widths and write them to its
    config (``intermediate_size``/``n_inner``, LLaMA's ``num_attention_heads``,
    ``num_key_value_heads`` and ``head_dim``) so plain ``from_pretrained`` rebuilds it."""
    fams = families(analysis)
    if not fams:
        raise ValueError("uniform=True needs a Hugging Face model of a supported family "
                         f"({', '.join(FAMILIES)}); this model has no per-layer families of groups")
    config = model.config
    for (kind, size), gis in fams.items():
        kept = {len(keep[gi]) if gi in keep else size for gi in gis}
        if len(kept) != 1:
            raise ValueError(f"uniform=True: the {kind} groups keep different widths {sorted(kept)}")
        w = kept.pop()
        g0 = analysis.groups[gis[0]]
        if kind == "llama.heads" and not uniform_width_ok(analysis, gis[0], w):
            raise ValueError(f"uniform=True: {w * g0.handler.q_per_unit} attention heads do not "
                             f"divide hidden_size {config.hidden_size}, which LlamaConfig requires")
        if kind in ("bert.heads", "gpt2.heads"):
            if w != size:
                raise ValueError(
                    f"uniform=True: {kind.split('.')[0].upper()} derives the head size from "
                    "hidden_size / num_attention_heads, so a config cannot express "
                    f"{w} of {size} heads; search with uniform=True (heads are then kept) or save "
                    "per-layer widths and load with load_pruned_pretrained")
        elif kind == "llama.heads":
            config.num_key_value_heads = w
            config.num_attention_heads = w * g0.handler.q_per_unit
            config.head_dim = g0.handler.head_dim
        elif kind in ("bert.ffn", "llama.ffn"):
            config.intermediate_size = w
        elif kind == "gpt2.ffn":
            config.n_inner = w


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
        from safetensors.torch import load_file
        if os.path.isfile(single):
            return load_file(single)
        with open(index, encoding="utf-8") as fh:
            files = sorted(set(json.load(fh)["weight_map"].values()))
        state = {}
        for f in files:
            state.update(load_file(os.path.join(path, f)))
        return state
    binary = os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(binary):
        return torch.load(binary, map_location="cpu", weights_only=True)
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
