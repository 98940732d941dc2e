"""Export: a physically smaller copy of the model, and its save/load without pickled modules.

:func:`export_model` copies the model and slices, for every kept unit of every group, the
weights, biases, norm parameters and buffers (BatchNorm/InstanceNorm running statistics) of each
module of the group, updating ``in_features``/``out_features``, ``in_channels``/``out_channels``,
``groups`` (depthwise convs), ``num_features``, ``num_channels`` and ``normalized_shape``. The
result is an ordinary ``torch.nn`` model. The model is never changed, and its weights are not held
twice: the slicing runs on a copy of the modules that shares the model's tensors and replaces the
sliced ones with new, smaller tensors (it never writes into a tensor), then only the tensors still
shared are copied (:func:`edited_copy`): the peak is the model plus the export, not two models.

:func:`save_pruned` writes a directory with ``model.pt`` (a plain state dict) and
``architecture.json`` (the width attributes of every ``Linear``/conv/norm layer);
:func:`load_pruned` builds a fresh model from a factory, narrows the recorded layers to the saved
widths and loads the state dict with ``torch.load(weights_only=True)``.

Example:
    >>> import tempfile, torch, torch.nn as nn
    >>> from gradprune.structured import save_pruned, load_pruned
    >>> make = lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> small = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> with tempfile.TemporaryDirectory() as d:
    ...     save_pruned(small, d + "/small")
    ...     again = load_pruned(make, d + "/small")
    >>> again[0].out_features, again[2].in_features
    (3, 3)
"""

from __future__ import annotations

import copy
import itertools
import json
import os
from collections import OrderedDict
from typing import Callable

import torch
from torch import nn

from .._checks import check_bool
from .._io import load_json, load_torch, write_file_set
from .groups import _BN, _CONV, _CONVT, _IN, Analysis, is_conv1d, register_check
from .hf import WIDTHS_KEY, apply_uniform_config, head_attrs, record_widths, set_recorded

__all__ = ["export_model", "edited_copy", "save_pruned", "load_pruned", "ARCH_FILE", "WEIGHTS_FILE"]

ARCH_FILE = "architecture.json"
WEIGHTS_FILE = "model.pt"
_FORMAT = "gradprune-structured"


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _own(value: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``value`` detached, copied only when it shares ``old``'s memory (a slice is new already)."""
    value = value.detach()
    return value.clone() if _storage(value) == _storage(old) else value


def _set_param(mod: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(mod, name)
    if old is None:
        return
    setattr(mod, name, nn.Parameter(_own(value, old), requires_grad=old.requires_grad))


def _set_buffer(mod: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(mod, name, None)
    if old is not None:
        mod._buffers[name] = _own(value, old)


def edited_copy(model: nn.Module, edit: Callable) -> nn.Module:
    """A copy of ``model`` changed by ``edit(copy)`` (in place; it may return the copy), with
    ``model`` and its tensors untouched and never two copies of its weights in memory.

    ``edit`` runs on a copy of the modules that shares ``model``'s parameters and buffers; it must
    *replace* the tensors it changes (``setattr`` of a new parameter, as slicing does), never write
    into one. Then the copy is deep-copied with its new tensors kept as they are: only the tensors
    still shared with ``model`` are copied, one at a time (ties, such as tied embeddings, stay
    tied). A failure inside ``edit`` leaves ``model`` as it was. Peak memory: ``model`` plus the
    result (plus one tensor), where a plain deep copy followed by slicing holds ``model`` twice.

    Example:
        >>> import torch, torch.nn as nn
        >>> m = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2))
        >>> def narrow(c):
        ...     c[0].weight = nn.Parameter(c[0].weight.detach()[:3].clone())
        >>> small = edited_copy(m, narrow)
        >>> tuple(small[0].weight.shape), tuple(m[0].weight.shape)
        ((3, 4), (6, 4))
        >>> small[1].weight is m[1].weight, bool(torch.equal(small[1].weight, m[1].weight))
        (False, True)
    """
    originals = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    shell = copy.deepcopy(model, dict(originals))  # new modules, the model's tensors
    out = edit(shell)
    shell = shell if out is None else out
    shared = {_storage(t) for t in originals.values() if _storage(t)}
    keep = {id(t): t for t in itertools.chain(shell.parameters(), shell.buffers())
            if id(t) not in originals and _storage(t) not in shared}
    return copy.deepcopy(shell, keep)


def _slice_dense(mod: nn.Module, out_idx, in_idx, *, out_dim: int, out_attr: str, in_attr: str) -> None:
    """Slice a 2-D weight (and bias) layer: ``out_dim`` is the weight's output dimension."""
    w = mod.weight
    if out_idx is not None:
        w = w.index_select(out_dim, out_idx)
        if mod.bias is not None:
            _set_param(mod, "bias", mod.bias.index_select(0, out_idx))
        setattr(mod, out_attr, len(out_idx))
    if in_idx is not None:
        w = w.index_select(1 - out_dim, in_idx)
        setattr(mod, in_attr, len(in_idx))
    _set_param(mod, "weight", w)


def _slice_module(mod: nn.Module, out_idx, in_idx, ch_idx) -> None:
    if isinstance(mod, nn.Linear):
        _slice_dense(mod, out_idx, in_idx, out_dim=0, out_attr="out_features", in_attr="in_features")
    elif is_conv1d(mod):  # Hugging Face Conv1D: weight [in, out]
        _slice_dense(mod, out_idx, in_idx, out_dim=1, out_attr="nf", in_attr="nx")
    elif isinstance(mod, _CONV + _CONVT):
        if ch_idx is not None:  # depthwise
            _set_param(mod, "weight", mod.weight.index_select(0, ch_idx))
            if mod.bias is not None:
                _set_param(mod, "bias", mod.bias.index_select(0, ch_idx))
            mod.in_channels = mod.out_channels = mod.groups = len(ch_idx)
            return
        out_dim, in_dim = (1, 0) if isinstance(mod, _CONVT) else (0, 1)
        w = mod.weight
        if out_idx is not None:
            w = w.index_select(out_dim, out_idx)
            if mod.bias is not None:
                _set_param(mod, "bias", mod.bias.index_select(0, out_idx))
            mod.out_channels = len(out_idx)
        if in_idx is not None:
            w = w.index_select(in_dim, in_idx)
            mod.in_channels = len(in_idx)
        _set_param(mod, "weight", w)
    elif isinstance(mod, _BN + _IN + (nn.GroupNorm, nn.LayerNorm)):
        if ch_idx is None:
            return
        for pname in ("weight", "bias"):
            if getattr(mod, pname, None) is not None:
                _set_param(mod, pname, getattr(mod, pname).index_select(0, ch_idx))
        for bname in ("running_mean", "running_var"):
            if getattr(mod, bname, None) is not None:
                _set_buffer(mod, bname, getattr(mod, bname).index_select(0, ch_idx))
        if isinstance(mod, nn.GroupNorm):
            mod.num_channels = len(ch_idx)
        elif isinstance(mod, nn.LayerNorm):
            mod.normalized_shape = (len(ch_idx),)
        else:
            mod.num_features = len(ch_idx)
    else:  # pragma: no cover - the analysis only records the types above
        raise TypeError(f"cannot slice a {type(mod).__name__}")


def export_model(analysis: Analysis, keep: dict, uniform: bool = False) -> nn.Module:
    """A copy of ``analysis.model`` keeping units ``keep[group index]`` (sorted indices) of
    each group (a missing group keeps everything); ``analysis.model`` is not changed, and only
    it and the export are in memory at once (see :func:`edited_copy`).

    ``uniform=True`` (Hugging Face models): every layer must keep the same widths, which are then
    written to the config (``intermediate_size``…) so plain ``from_pretrained`` loads the result;
    ``ValueError`` otherwise (see :func:`gradprune.structured.hf.apply_uniform_config`)."""
    check_bool("uniform", uniform)
    return edited_copy(analysis.model, lambda new: _slice_all(new, analysis, keep, uniform))


def _slice_all(new: nn.Module, analysis: Analysis, keep: dict, uniform: bool) -> None:
    modules = dict(new.named_modules())
    for name, roles in analysis.roles.items():
        idx = {r: analysis.indices_of(lay, keep) for r, lay in roles.items()}
        full = {r: analysis.width_of(lay, {}) for r, lay in roles.items()}
        idx = {r: (None if len(t) == full[r] else t) for r, t in idx.items()}
        if not any(t is not None for t in idx.values()):
            continue
        _slice_module(modules[name], idx.get("out"), idx.get("in"), idx.get("through"))
    for gi, g in enumerate(analysis.groups):
        if g.handler is not None:
            units = keep.get(gi, torch.arange(g.size))
            g.handler.export(new, modules, torch.as_tensor(units, dtype=torch.long))
    if any(g.handler is not None or g.kind is not None for g in analysis.groups):
        record_widths(new, analysis)
    if uniform:
        apply_uniform_config(new, analysis, keep)


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for item in out:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def check_unnamed_heads(analysis: Analysis, example_input) -> Analysis:
    """Heads of a Hugging Face attention class that no registered layout names (recognised by
    its structure alone) are kept only where slicing one head away from every such module
    reproduces the gated output on ``example_input``; otherwise they are moved to ``skipped``
    with the reason (a model may add a per-head bias it builds for ``num_heads`` heads, as
    Bloom's ALiBi and MPNet's relative position bias do). One export per such class; the
    tested classes (``AttentionSpec.classes``) are not re-checked."""
    from .gates import Gates
    from .groups import _as_args
    from .hf import HFHeads, _normal_class, head_rule_types
    if example_input is None or not analysis.groups:
        return analysis
    known = set(head_rule_types())
    by_class: dict = {}
    for gi, g in enumerate(analysis.groups):
        if isinstance(g.handler, HFHeads) and g.size > 1:
            cls = _normal_class(analysis.model.get_submodule(g.name))
            if cls not in known:
                by_class.setdefault(cls, []).append(gi)
    if not by_class:
        return analysis
    args, model = _as_args(example_input), analysis.model
    was_training = model.training
    failed: dict = {}  # group index -> reason
    try:
        model.eval()
        for cls, gis in by_class.items():
            keep = {gi: torch.arange(1, analysis.groups[gi].size) for gi in gis}
            try:
                with torch.no_grad():
                    small = export_model(analysis, keep)
                    with Gates(analysis, keep):
                        want = _first_tensor(model(*args))
                    got = _first_tensor(small(*args))
                ok = (want is not None and got is not None and got.shape == want.shape
                      and bool(torch.allclose(got, want, rtol=1e-4, atol=1e-5 * max(1.0, float(want.abs().max())))))
                detail = "outputs differ"
            except Exception as exc:  # noqa: BLE001 - any failure keeps the heads, with the reason
                ok, detail = False, f"{type(exc).__name__}: {str(exc).strip()[:160]}"
            if not ok:
                for gi in gis:
                    failed[gi] = (f"{cls}: heads not pruned: it matches a registered attention layout "
                                  "by structure, but slicing a head away does not reproduce the gated "
                                  f"output on example_input ({detail}); the model may build a per-head "
                                  "bias for all its layers (ALiBi, a shared relative position bias)")
    finally:
        model.train(was_training)
    if not failed:
        return analysis
    new_index, groups = {}, []
    for gi, g in enumerate(analysis.groups):
        if gi not in failed:
            new_index[gi] = len(groups)
            groups.append(g)
    space_group = {s: new_index[gi] for s, gi in analysis.space_group.items() if gi in new_index}
    skipped = list(analysis.skipped) + [{"module": m, "reason": failed[gi]} for gi in sorted(failed)
                                        for m, _ in analysis.groups[gi].owners]
    mask_points = {m: v for m, v in analysis.mask_points.items()
                   if any(s in space_group for s, _ in v[0].segs)}
    return Analysis(model=model, groups=groups, skipped=skipped, roles=analysis.roles,
                    mask_points=mask_points, space_group=space_group, space_size=analysis.space_size)


register_check(check_unnamed_heads)


# --------------------------------------------------------------------------------------------
# save / load


def _arch_of(mod: nn.Module) -> dict | None:
    from .attention import PrunedMultiheadAttention, functional_attention_spec
    if isinstance(mod, PrunedMultiheadAttention):
        return {"num_heads": mod.num_heads}
    spec = functional_attention_spec(mod)  # Swin-like attention: its head count
    if spec is not None:
        return {spec.heads: getattr(mod, spec.heads)}
    if isinstance(mod, nn.TransformerEncoderLayer):
        return {"activation_relu_or_gelu": mod.activation_relu_or_gelu}
    if isinstance(mod, nn.TransformerEncoder):
        return {"use_nested_tensor": bool(mod.use_nested_tensor)}
    if isinstance(mod, nn.Linear):
        return {"in_features": mod.in_features, "out_features": mod.out_features}
    if is_conv1d(mod):
        return {"nx": mod.nx, "nf": mod.nf}
    attrs = head_attrs(mod)  # Hugging Face attention: head counts
    if attrs is not None:
        return {a: getattr(mod, a) for a in attrs if isinstance(getattr(mod, a, None), int)}
    from .experts import moe_attrs
    moe = moe_attrs(mod)  # MoE router / stacked experts: expert count, top-k
    if moe is not None:
        return moe
    if isinstance(mod, _CONV + _CONVT):
        return {"in_channels": mod.in_channels, "out_channels": mod.out_channels, "groups": mod.groups}
    if isinstance(mod, _BN + _IN):
        return {"num_features": mod.num_features}
    if isinstance(mod, nn.GroupNorm):
        return {"num_groups": mod.num_groups, "num_channels": mod.num_channels}
    if isinstance(mod, nn.LayerNorm):
        return {"normalized_shape": list(mod.normalized_shape)}
    return None


def architecture(model: nn.Module) -> dict:
    """The JSON-able width record of ``model``: ``{module name: {"type": ..., attributes}}``."""
    out = {}
    for name, mod in model.named_modules():
        arch = _arch_of(mod)
        if arch is not None:
            out[name] = {"type": type(mod).__name__, **arch}
    # Hugging Face exports: bias tables and per-module config fields (config.gradprune_widths)
    hf_widths = getattr(getattr(model, "config", None), WIDTHS_KEY, None) or {}
    modules = dict(model.named_modules())
    for name, attrs in hf_widths.items():
        if name in modules and isinstance(attrs, dict):
            out[name] = {**out.get(name, {"type": type(modules[name]).__name__}), **attrs}
    return out


def save_pruned(model: nn.Module, path: str | os.PathLike) -> None:
    """Save ``model`` (e.g. an exported, pruned one) to directory ``path``: ``model.pt`` holds its
    plain state dict, ``architecture.json`` the widths of its layers. The two are written as a set
    (see :func:`gradprune._io.write_file_set`): a failure at any point leaves the previous pair
    intact and loadable.

    Example: see the module docstring."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    record = {"format": _FORMAT, "version": 1, "modules": architecture(model)}
    full = model.state_dict()
    state = OrderedDict((k, v.detach().cpu()) for k, v in full.items())
    # module versions (``_version``): a module's _load_from_state_dict may need them (MNASNet)
    state._metadata = getattr(full, "_metadata", OrderedDict())

    def write_json(tmp):
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(record, fh, indent=1, sort_keys=True)

    write_file_set(path, {WEIGHTS_FILE: lambda tmp: torch.save(state, tmp), ARCH_FILE: write_json})


def _expected_shapes(mod: nn.Module) -> dict:
    """The parameter shapes ``mod``'s recorded width attributes imply (empty where unknown)."""
    if isinstance(mod, nn.Linear):
        return {"weight": (mod.out_features, mod.in_features), "bias": (mod.out_features,)}
    if is_conv1d(mod):
        return {"weight": (mod.nx, mod.nf), "bias": (mod.nf,)}
    if isinstance(mod, _CONV + _CONVT):
        k = tuple(mod.kernel_size)
        if isinstance(mod, _CONVT):
            w = (mod.in_channels, mod.out_channels // mod.groups) + k
        else:
            w = (mod.out_channels, mod.in_channels // mod.groups) + k
        return {"weight": w, "bias": (mod.out_channels,)}
    if isinstance(mod, _BN + _IN):
        n = (mod.num_features,)
        return {"weight": n, "bias": n, "running_mean": n, "running_var": n}
    if isinstance(mod, nn.GroupNorm):
        return {"weight": (mod.num_channels,), "bias": (mod.num_channels,)}
    if isinstance(mod, nn.LayerNorm):
        return {"weight": tuple(mod.normalized_shape), "bias": tuple(mod.normalized_shape)}
    return {}


def load_pruned(factory, path: str | os.PathLike, map_location="cpu") -> nn.Module:
    """Rebuild a model saved by :func:`save_pruned`: ``factory()`` gives a fresh (dense) model of
    the same architecture, whose recorded layers are narrowed to the saved widths before the state
    dict is loaded (strictly, with ``torch.load(weights_only=True)``).

    A record that disagrees with the weights raises ``ValueError`` naming the file and the tensor;
    a damaged file raises ``ValueError`` naming its path.

    Example: see the module docstring."""
    if isinstance(factory, nn.Module):
        raise TypeError(f"factory must be a function or class that builds the dense model, not a model "
                        f"instance ({type(factory).__name__}); pass e.g. lambda: MyModel()")
    if not callable(factory):
        raise TypeError(f"factory must be callable and return the dense model, got {type(factory).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    arch_path, weights_path = os.path.join(path, ARCH_FILE), os.path.join(path, WEIGHTS_FILE)
    for p in (arch_path, weights_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"path must be a directory written by save_pruned; missing {p}")
    record = load_json(arch_path)
    if (not isinstance(record, dict) or record.get("format") != _FORMAT
            or not isinstance(record.get("modules"), dict)):
        raise ValueError(f"{arch_path} is not a gradprune architecture record")
    state = load_torch(weights_path, map_location=map_location)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{weights_path} is not a state dict of tensors")
    model = factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"factory must return a torch.nn.Module, got {type(model).__name__}")
    from .attention import PrunedMultiheadAttention, _set_child, restore_pruned_class
    modules = dict(model.named_modules())
    for name, arch in record["modules"].items():
        mod = modules.get(name)
        if mod is None:
            raise ValueError(f"the saved model has a module {name!r} that factory() does not build")
        if arch.get("type") == "PrunedMultiheadAttention" and isinstance(mod, nn.MultiheadAttention):
            mod = PrunedMultiheadAttention.narrowed(mod, int(arch["num_heads"]))
            _set_child(model, name, mod)
            modules = dict(model.named_modules())
        restore_pruned_class(mod, arch.get("type"))  # a functional attention with fewer heads
        if type(mod).__name__ != arch.get("type"):
            raise ValueError(f"module {name!r} is a {type(mod).__name__} in factory() but was saved "
                             f"as {arch.get('type')}")
        for key, value in arch.items():
            if key == "type" or set_recorded(mod, key, value):
                continue
            setattr(mod, key, tuple(value) if key == "normalized_shape" else value)
        prefix = f"{name}." if name else ""
        expected = _expected_shapes(mod)
        for tname, shape in expected.items():
            saved = state.get(prefix + tname)
            if saved is not None and tuple(saved.shape) != tuple(shape):
                raise ValueError(f"{weights_path}: tensor {prefix + tname!r} has shape {tuple(saved.shape)} "
                                 f"but {arch_path} records module {name!r} as {arch} (shape {tuple(shape)})")
        for pname, p in list(mod.named_parameters(recurse=False)):
            saved = state.get(prefix + pname)
            if saved is not None and saved.shape != p.shape:
                setattr(mod, pname, nn.Parameter(torch.empty(saved.shape, dtype=p.dtype),
                                                 requires_grad=p.requires_grad))
        for bname, b in list(mod.named_buffers(recurse=False)):
            saved = state.get(prefix + bname)
            if b is not None and saved is not None and saved.shape != b.shape:
                mod._buffers[bname] = torch.empty(saved.shape, dtype=b.dtype)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{weights_path} does not match the model factory() builds with the widths "
                         f"of {arch_path}: {exc}") from exc
    return model
