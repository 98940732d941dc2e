"""Hugging Face models: a model-family analyser, width records in the config, and loading.

Hugging Face models cannot be traced by plain :mod:`torch.fx`, so :func:`analyse_hf` recognises
their structure by module classes instead. Supported family: BERT (``BertModel``, ``BertFor*``):

- per ``BertLayer``, one **head group**: ``attention.self.query``/``key``/``value`` output rows and
  ``attention.output.dense`` input columns, ``attention_head_size`` rows/columns per head; gated on
  the value projection's output (a head's output is linear in its values, so this is a multiplier
  on the head's output before the output dense; transformers 5 has no ``head_mask``);
- per ``BertLayer``, one **FFN group**: ``intermediate.dense`` output rows and ``output.dense``
  input columns, gated on the output of ``intermediate`` (after the activation).

The hidden size (the residual stream, embeddings, LayerNorms) is never pruned; cross-attention
layers are left unpruned. Both are listed in ``analysis.skipped``.

Export (:func:`~gradprune.structured.export_model`) updates ``num_attention_heads`` and
``all_head_size`` per layer and records every pruned layer's widths in
``model.config.gradprune_widths``, so ``model.save_pretrained(path)`` keeps them and
:func:`load_pruned_pretrained` ``(cls, path)`` rebuilds the narrower model and loads its weights
(plain ``from_pretrained`` builds the dense widths of the config and cannot load them).
"""

from __future__ import annotations

import json
import os
import sys

import torch
from torch import nn

from .attention import HeadHandler
from .groups import Analysis, Group, Layout, Slice

__all__ = ["analyse_hf", "BertHeads", "record_widths", "load_pruned_pretrained", "WIDTHS_KEY"]

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

    def recorder(self, modules, calls) -> list:
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            b, t = (x.shape[0], x.shape[1]) if x.dim() == 3 else (1, x.shape[0])
            calls.append((b, t, t))
        return [modules[self.module].register_forward_hook(hook, with_kwargs=True)]

    def extra_cost(self, h, calls) -> tuple:
        return 0, sum(2 * b * t * s * h * self.head_dim for b, t, s in calls)

    def export(self, root, modules, keep) -> None:
        mod = modules[self.module]
        mod.num_attention_heads = len(keep)
        mod.all_head_size = len(keep) * self.head_dim


def _bert(model: nn.Module) -> Analysis:
    space_size: list = []
    roles: dict = {}
    mask_points: dict = {}
    groups: list = []
    space_group: dict = {}
    skipped = [{"module": "<hidden size>", "reason": "the hidden size (residual stream) of a "
                "Hugging Face model is not pruned"}]

    def new_group(name, size, producers, slices, owners, handler=None):
        space_size.append(size)
        space_group[len(space_size) - 1] = len(groups)
        groups.append(Group(name=name, size=size, producers=producers, slices=slices,
                            owners=owners, handler=handler))
        return len(space_size) - 1

    for name, layer in model.named_modules():
        if type(layer).__name__ != "BertLayer":
            continue
        if getattr(layer, "crossattention", None) is not None:
            skipped.append({"module": f"{name}.crossattention",
                            "reason": "cross-attention heads are not pruned"})
        sa = layer.attention.self
        sa_name = f"{name}.attention.self"
        if type(sa).__name__ == "BertSelfAttention" and sa.num_attention_heads > 1:
            h, d = sa.num_attention_heads, sa.attention_head_size
            q, k, v = (f"{sa_name}.{p}" for p in ("query", "key", "value"))
            o = f"{name}.attention.output.dense"
            slices = [Slice(p, "out", 0, 0, d, h) for p in (q, k, v)] + [Slice(o, "in", 1, 0, d, h)]
            space = new_group(sa_name, h, [q, k, v], slices, [(sa_name, type(sa))],
                              BertHeads(sa_name, h, d))
            lay = Layout(2, 3, ((space, d),))
            for p in (q, k, v):
                roles[p] = {"out": lay}
            roles[o] = {"in": lay}
            mask_points[v] = (lay, "mul")
        else:
            skipped.append({"module": sa_name, "reason": f"{type(sa).__name__}: heads not pruned"})
        fc1, fc2 = f"{name}.intermediate.dense", f"{name}.output.dense"
        dense1 = layer.intermediate.dense
        space = new_group(fc1, dense1.out_features, [fc1],
                          [Slice(fc1, "out", 0, 0, 1, dense1.out_features),
                           Slice(fc2, "in", 1, 0, 1, dense1.out_features)], [(fc1, type(dense1))])
        lay = Layout(2, 3, ((space, 1),))
        roles[fc1] = {"out": lay}
        roles[fc2] = {"in": lay}
        mask_points[f"{name}.intermediate"] = (lay, "mul")
    return Analysis(model=model, groups=groups, skipped=skipped, roles=roles,
                    mask_points=mask_points, space_group=space_group, space_size=space_size)


FAMILIES = {"bert": _bert}


def analyse_hf(model: nn.Module, example_input=None) -> Analysis | None:
    """The analysis of a Hugging Face model by its module classes, or ``None`` when ``model`` is
    not a Hugging Face ``PreTrainedModel`` (then torch.fx is used)."""
    if not _is_hf(model):
        return None
    kinds = {type(m).__name__ for m in model.modules()}
    if "BertLayer" in kinds:
        return _bert(model)
    return Analysis(model=model, groups=[], skipped=[{
        "module": "", "reason": f"Hugging Face model {type(model).__name__} is not a supported "
        f"family (supported: {', '.join(FAMILIES)})"}], roles={}, mask_points={}, space_group={},
        space_size=[])


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
    for g in analysis.groups:
        if isinstance(g.handler, BertHeads):
            mod = modules[g.handler.module]
            widths[g.handler.module] = {"num_attention_heads": mod.num_attention_heads,
                                        "all_head_size": mod.all_head_size}
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
