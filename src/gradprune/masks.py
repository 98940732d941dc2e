"""``MaskSet``: bool masks over a model's prunable parameters, and keeping pruned weights at zero.

A ``MaskSet`` maps a parameter's qualified name to a ``torch.bool`` mask of its shape (``True`` =
kept). ``apply()`` zeroes pruned weights in place (and, given an optimizer, its per-parameter state:
SGD ``momentum_buffer``, Adam/AdamW ``exp_avg``/``exp_avg_sq``/``max_exp_avg_sq``, any state tensor
shaped like the parameter). ``attach(optimizer)`` registers a removable post-step hook that does it
after every ``optimizer.step()``, so pruned weights stay exactly ``0.0`` through momentum and weight
decay.

Example:
    >>> import torch, torch.nn as nn
    >>> import gradprune as gp
    >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> masks = gp.MaskSet(model)                      # all-True masks on the default targets
    >>> masks["0.weight"][0] = False                   # prune the first output row
    >>> masks.apply()
    >>> float(model[0].weight.detach()[0].abs().sum())
    0.0
    >>> round(masks.sparsity(), 2)
    0.25
    >>> fresh = gp.MaskSet(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)))
    >>> fresh.load_state_dict(masks.state_dict())
    >>> bool((fresh["0.weight"] == masks["0.weight"]).all())
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Iterable, Iterator

import math

import torch
from torch import nn

from ._checks import check_bool, check_names
from ._distributed import RowShard, all_reduce_ints, is_dtensor, local
from ._report import SparsityReport  # noqa: F401  (re-exported: gradprune.masks.SparsityReport)
from .patterns import NMPattern
from .targets import find_targets

__all__ = ["MaskSet"]


def _ptr(t: torch.Tensor) -> int:
    return local(t).data_ptr()


class MaskSet(Mapping):
    """Bool masks keyed by qualified parameter name, bound to a model.

    Args:
        model: the model whose parameters the masks cover.
        names: which parameters; default: :func:`gradprune.targets.find_targets` defaults.
        masks: optional initial ``{name: bool tensor}``; missing names start all-True.
    """

    def __init__(self, model: nn.Module, names: Iterable[str] | None = None,
                 masks: Mapping[str, torch.Tensor] | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        params = dict(model.named_parameters(remove_duplicate=False))
        if names is None:
            names = list(find_targets(model))
        else:
            names = check_names("names", names)
            if not names:
                raise ValueError("names must list at least one parameter, got []")
        for n in names:  # a weight reparametrized by torch.nn.utils.prune lives in <name>_orig
            if n not in params and n + "_orig" in params:
                params[n] = params[n + "_orig"]
        missing = [n for n in names if n not in params]
        if missing:
            raise ValueError(f"names not in the model's parameters: {missing}")
        on_meta = [n for n in names if params[n].is_meta]
        if on_meta:
            raise ValueError(f"parameters on the meta device have no values to mask: {on_meta}")
        # a tensor shared by several names (tied weights) is one unit under its first name
        self.aliases: dict[str, str] = {}
        first: dict[int, str] = {}
        for n in names:
            kept = first.setdefault(id(params[n]), n)
            if kept != n:
                self.aliases[n] = kept
        self._params = {n: params[n] for n in names if n not in self.aliases}
        self._masks: dict[str, torch.Tensor] = {}
        self._pruned: dict[tuple, tuple] = {}  # (name, dtype, device, shape) -> (mask version, float mask)
        self._plan_cache = None
        # {name: (start, stop)}: a parameter stored as a flat shard (FSDP use_orig_params=True) holds
        # entries start:stop of its flattened mask; set by gradprune.integrations.distributed
        self.shard_spans: dict[str, tuple[int, int]] = {}
        # {name: RowShard}: a DTensor parameter (FSDP2 fully_shard) whose mask holds only this
        # rank's rows (``self[name]`` is that local shard; ``state_dict()`` gives DTensors)
        self.row_shards: dict[str, RowShard] = {}
        for n, p in self._params.items():
            if is_dtensor(p):
                self.row_shards[n] = RowShard(n, p)
            self._masks[n] = torch.ones(local(p).shape, dtype=torch.bool, device=p.device)
        self._where: dict[str, tuple] = {}  # name -> (its module's _parameters, attr, attr_orig)
        self._bound = {n: (p, _ptr(p), p.shape) for n, p in self._params.items()}
        for n, m in (masks or {}).items():
            self[n] = m

    # -- mapping ------------------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        name = self.aliases.get(name, name)
        if name in self.row_shards:  # a sharded parameter re-placed since: re-derive its shard now
            bound, ptr, shape = self._bound[name]
            live = self._live(name)
            if not (live is bound and _ptr(live) == ptr and live.shape == shape):
                self._resync_shard(name, live)
        return self._masks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def __setitem__(self, name: str, mask: torch.Tensor) -> None:
        name = self.aliases.get(name, name)
        self._sync()
        if name not in self._params:
            raise KeyError(f"{name!r} is not one of this MaskSet's parameters: {list(self._params)}")
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask for {name!r} must be a torch.Tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask for {name!r} must have dtype torch.bool, got {mask.dtype}")
        p = self._params[name]
        spec = self.row_shards.get(name)
        if spec is not None:
            mask = self._local_rows(name, spec, mask)
        elif mask.shape != p.shape:
            raise ValueError(f"mask for {name!r} must have shape {tuple(p.shape)}, got {tuple(mask.shape)}")
        self._masks[name] = mask.to(p.device).clone()
        for key in [k for k in self._pruned if k[0] == name]:
            del self._pruned[key]
        self._plan_cache = None

    def __repr__(self) -> str:
        return f"MaskSet({len(self)} parameters, sparsity={self.sparsity():.4f})"

    @staticmethod
    def _local_rows(name: str, spec: RowShard, mask: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a mask for a sharded parameter: from a DTensor mask (redistributed
        to the parameter's placements first if they differ), a mask of the local shard's shape, or
        a whole mask (its rows are sliced; nothing is gathered)."""
        if is_dtensor(mask):
            if tuple(mask.placements) != spec.placements or mask.device_mesh != spec.mesh:
                mask = mask.redistribute(spec.mesh, spec.placements)
            if tuple(mask.shape) != spec.shape:
                raise ValueError(f"mask for {name!r} must have shape {spec.shape}, got {tuple(mask.shape)}")
            return mask.to_local()
        rows = (spec.stop - spec.start, *spec.shape[1:])
        if tuple(mask.shape) == rows:
            return mask
        if tuple(mask.shape) == spec.shape:
            return mask[spec.start:spec.stop]
        raise ValueError(f"mask for sharded parameter {name!r} must have its shape {spec.shape} or "
                         f"this rank's shard's {rows}, got {tuple(mask.shape)}")

    def _local_param(self, name: str) -> torch.Tensor:
        return local(self._params[name].detach())

    def params(self) -> dict[str, nn.Parameter]:
        self._sync()
        return dict(self._params)

    def _live(self, name: str) -> torch.Tensor:
        """The parameter the model holds under ``name`` now (``<name>_orig`` under
        ``torch.nn.utils.prune``). The module is looked up once per name (a module replaced in
        the model is not followed; a parameter replaced in its module is)."""
        where = self._where.get(name)
        if where is None:
            mod_name, _, attr = name.rpartition(".")
            try:
                module = self.model.get_submodule(mod_name) if mod_name else self.model
            except AttributeError:
                raise ValueError(f"the model no longer has a parameter {name!r}: rebuild the MaskSet") from None
            where = self._where[name] = (module._parameters, attr, attr + "_orig")
        params, attr, orig = where
        found = params.get(attr)
        if found is None:
            found = params.get(orig)
        if found is None:
            raise ValueError(f"the model no longer has a parameter {name!r}: rebuild the MaskSet")
        return found

    @torch.no_grad()
    def _sync(self) -> None:
        """Re-bind masks to parameters replaced after the masks were built.

        ``model.load_state_dict(state, assign=True)``, ``module.weight = nn.Parameter(...)`` or a
        conversion that replaces parameters (``torch.__future__.set_overwrite_module_params_on_conversion``)
        leave the masks pointing at tensors the model no longer uses; so does ``param.data = t``
        for the storage. Each such parameter is re-bound by name, its mask moved to its device and
        applied to it at once, so the reported sparsity is the live weights'. A replacement whose
        shape no longer fits the mask raises ``ValueError``.
        """
        for n, (bound, ptr, shape) in self._bound.items():
            live = self._live(n)
            if live is bound and _ptr(live) == ptr and live.shape == shape:
                continue
            if n in self.row_shards or is_dtensor(live):
                self._resync_shard(n, live)
                continue
            mask = self._masks[n]
            flat = live.dim() == 1 and live.shape != mask.shape  # a flat (FSDP) shard
            if live.shape != mask.shape and not flat:
                raise ValueError(f"parameter {n!r} was replaced by one of shape {tuple(live.shape)}; "
                                 f"its mask has shape {tuple(mask.shape)}: rebuild the MaskSet")
            if live.is_meta:
                raise ValueError(f"parameter {n!r} was moved to the meta device: it has no values to mask")
            self._params[n] = live
            if mask.device != live.device and live.shape == mask.shape:
                self._masks[n] = mask.to(live.device)
            self._plan_cache = None
            self._bound[n] = (live, live.data_ptr(), live.shape)
            if not bool(self._masks[n].all()) and (not flat or self._is_shard(n, live)):
                live.detach().mul_(self._factor(n, live))

    def _resync_shard(self, n: str, live: torch.Tensor) -> None:
        """Re-derive the local mask of a DTensor parameter that was replaced or re-placed: the old
        shard is redistributed to the new placements (a collective; never a stale shard)."""
        old = self.row_shards.get(n)
        if not is_dtensor(live):
            raise ValueError(f"parameter {n!r} is no longer a DTensor: rebuild the MaskSet")
        new = RowShard(n, live)
        if new.shape != (old.shape if old is not None else tuple(self._masks[n].shape)):
            raise ValueError(f"parameter {n!r} was replaced by one of shape {new.shape}: rebuild the MaskSet")
        if old is None:
            self._masks[n] = self._local_rows(n, new, self._masks[n])
        elif old.key != new.key:
            self._masks[n] = self._local_rows(n, new, old.to_dtensor(self._masks[n]))
        self.row_shards[n] = new
        self._params[n] = live
        self._plan_cache = None
        self._bound[n] = (live, _ptr(live), live.shape)
        with torch.no_grad():
            if not bool(self._masks[n].all()):
                lp = local(live.detach())
                lp.mul_(self._factor(n, lp))

    def _factor(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The mask as 1.0/0.0 in ``like``'s dtype and device, cached (masks may be edited in
        place: the cache follows the mask's version counter). Multiplying by it is an order of
        magnitude faster on CPU than ``masked_fill_`` with a bool mask."""
        mask = self._masks[name]
        key = (name, like.dtype, like.device, like.shape)
        cached = self._pruned.get(key)
        if cached is None or cached[0] != mask._version:
            local = mask if like.shape == mask.shape else self._shard_of(name, like)
            cached = (mask._version, local.to(device=like.device, dtype=like.dtype))
            self._pruned[key] = cached
        return cached[1]

    def _shard_of(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The entries of the flattened mask that a flat shard ``like`` holds (FSDP)."""
        span = self.shard_spans.get(name)
        if span is None or like.dim() != 1 or like.numel() != span[1] - span[0]:
            raise ValueError(
                f"mask for {name!r} has shape {tuple(self._masks[name].shape)} but the tensor to mask "
                f"has shape {tuple(like.shape)}; a sharded (FSDP) model needs "
                "gradprune.integrations.distributed.FSDPPruner/FSDPSparseTrainer")
        return self._masks[name].reshape(-1)[span[0]:span[1]]

    def _is_shard(self, name: str, t: torch.Tensor) -> bool:
        span = self.shard_spans.get(name)
        return span is not None and t.dim() == 1 and t.numel() == span[1] - span[0]

    @staticmethod
    def _multiply(tensors: list, factors: list) -> None:
        if tensors:
            torch._foreach_mul_(tensors, factors)

    def _plan(self):
        """``(params, factors, detached params)`` for the hot path, rebuilt only when a mask (or a
        parameter's storage) changed; parameters whose mask keeps everything are left out.
        Multiplying the detached views needs no autograd context.

        The check runs every step, so it is kept small: :meth:`_sync` (a parameter replaced, or
        its storage or shape changed, resets the cache) and the masks' version counters (they only
        grow, so their sum changes whenever any mask was edited in place; replacing a mask resets
        the cache)."""
        self._sync()
        plan = self._plan_cache
        if plan is not None and sum([m._version for m in plan[4]]) == plan[0]:
            return plan[1], plan[2], plan[3]
        masks = list(self._masks.values())
        key = sum([m._version for m in masks])
        # a fully dense mask (a dense first layer, an ERK layer capped at 1) would multiply by ones
        sparse = [n for n, m in self._masks.items() if not bool(m.all())]
        plan = (key, [self._params[n] for n in sparse],
                [self._factor(n, self._local_param(n)) for n in sparse],
                [self._local_param(n) for n in sparse], masks)
        self._plan_cache = plan
        return plan[1], plan[2], plan[3]

    # -- enforcement --------------------------------------------------------------------
    def apply(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Zero pruned weights (and ``optimizer``'s state for them) in place.

        Pruned entries become exactly 0 (as long as they were finite).
        """
        _, factors, detached = self._plan()
        self._multiply(detached, factors)
        if optimizer is not None:
            self.apply_to_optimizer(optimizer)

    def apply_to_grads(self) -> None:
        """Zero the gradients of pruned weights in place."""
        params, factors, _ = self._plan()
        grads = [local(p.grad) for p in params]
        if all([g is not None and g.dtype == p.dtype and not g.requires_grad
                for g, p in zip(grads, params)]):
            self._multiply(grads, factors)  # plain gradients: no autograd context needed
            return
        with torch.no_grad():
            ps = [(n, local(p.grad)) for n, p in self._params.items() if p.grad is not None]
            self._multiply([g for _, g in ps], [self._factor(n, g) for n, g in ps])

    @torch.no_grad()
    def apply_to_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Zero every per-parameter state tensor shaped like a masked parameter."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self._sync()
        tensors, factors = [], []
        for n, p in self._params.items():
            state = optimizer.state.get(p)
            if not state:
                continue
            for v in state.values():
                v = local(v)
                if isinstance(v, torch.Tensor) and (v.shape == self._masks[n].shape or self._is_shard(n, v)):
                    tensors.append(v)
                    factors.append(self._factor(n, v))
        self._multiply(tensors, factors)

    def attach(self, optimizer: torch.optim.Optimizer):
        """Apply the masks (weights and state) after every ``optimizer.step()``.

        Returns the hook handle; ``handle.remove()`` detaches it.
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.apply(optimizer)
        return optimizer.register_step_post_hook(lambda opt, args, kwargs: self.apply(opt))

    # -- reporting ----------------------------------------------------------------------
    def sparsity(self, per_layer: bool = False):
        """Fraction of masked-out entries: overall (float), or ``{name: fraction}`` per layer.

        Parameters replaced since the masks were built are re-bound first (see :meth:`_sync`), so
        this is the sparsity of the weights the model holds now."""
        counts = self.layer_counts()
        if per_layer:
            return {n: 1.0 - k / t for n, (k, t) in counts.items()}
        kept, total = self._totals(counts)
        return 1.0 - kept / total

    def count(self) -> tuple[int, int]:
        """``(kept, total)`` entries over all masks (a shared tensor counts once)."""
        return self._totals(self.layer_counts())

    @staticmethod
    def _totals(counts: dict) -> tuple[int, int]:
        return sum(k for k, _ in counts.values()), sum(t for _, t in counts.values())

    def layer_counts(self) -> dict[str, tuple[int, int]]:
        """``{name: (kept, total)}`` per mask, over every rank for a sharded (FSDP2) parameter
        (one small all-reduce of the per-rank counts; a collective then: call it on every rank)."""
        self._sync()
        out = {n: (int(m.sum()), m.numel()) for n, m in self._masks.items()}
        by_group: dict[int, tuple] = {}
        for n, spec in self.row_shards.items():
            if spec.sharded:
                by_group.setdefault(id(spec.group), (spec.group, []))[1].append(n)
        for group, names in by_group.values():
            kept = all_reduce_ints([out[n][0] for n in names], group, self._masks[names[0]].device)
            for n, k in zip(names, kept):
                out[n] = (k, math.prod(self.row_shards[n].shape))
        return out

    # -- state --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{name: bool mask}`` (CPU copies): save with ``torch.save`` or safetensors.

        A sharded (FSDP2) parameter's mask is a bool ``DTensor`` placed like the parameter (each
        rank holds its rows): save it with ``torch.distributed.checkpoint``, which can reshard it."""
        return {n: self.row_shards[n].to_dtensor(m.detach().clone()) if n in self.row_shards
                else m.detach().cpu().clone() for n, m in self._masks.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor], strict: bool = True) -> None:
        """Load masks saved by :meth:`state_dict`, validating names, shapes and dtype first."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping of name -> bool tensor, got {type(state).__name__}")
        check_bool("strict", strict)
        if strict:
            missing = sorted(set(self._masks) - set(state))
            unexpected = sorted(set(state) - set(self._masks))
            if missing or unexpected:
                raise ValueError(f"mask state does not match: missing {missing}, unexpected {unexpected}")
        staged = {}
        for n, m in state.items():
            if n not in self._params:
                continue
            if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
                raise TypeError(f"mask for {n!r} must be a bool tensor, got "
                                f"{m.dtype if isinstance(m, torch.Tensor) else type(m).__name__}")
            if n in self.row_shards:
                m = self._local_rows(n, self.row_shards[n], m)
            elif m.shape != self._params[n].shape:
                raise ValueError(f"mask for {n!r} must have shape {tuple(self._params[n].shape)}, "
                                 f"got {tuple(m.shape)}")
            staged[n] = m
        for n, m in staged.items():  # nothing changes unless everything validated
            self[n] = m

    # -- torch.nn.utils.prune interop ---------------------------------------------------
    def _module_and_attr(self, name: str):
        mod_name, _, attr = name.rpartition(".")
        return (self.model.get_submodule(mod_name) if mod_name else self.model), attr

    def to_torch_prune(self) -> None:
        """Reparametrize the model with ``torch.nn.utils.prune`` (``weight_orig``/``weight_mask``)."""
        from torch.nn.utils import prune as tprune

        for n, m in self._masks.items():
            module, attr = self._module_and_attr(n)
            if tprune.is_pruned(module) and hasattr(module, f"{attr}_mask"):
                tprune.remove(module, attr)
            tprune.custom_from_mask(module, attr, m)

    @classmethod
    def from_torch_prune(cls, model: nn.Module, remove: bool = True) -> "MaskSet":
        """Read the masks of a model pruned with ``torch.nn.utils.prune``.

        With ``remove=True`` the reparametrization is folded back into a plain parameter, so the
        returned ``MaskSet`` can keep enforcing the masks on the ordinary ``weight``.
        """
        from torch.nn.utils import prune as tprune

        found = {}
        for mod_name, module in model.named_modules():
            for buf_name, buf in list(module.named_buffers(recurse=False)):
                if buf_name.endswith("_mask") and hasattr(module, buf_name[:-5] + "_orig"):
                    attr = buf_name[:-5]
                    qual = f"{mod_name}.{attr}" if mod_name else attr
                    found[qual] = buf.detach().to(torch.bool).clone()
                    if remove:
                        tprune.remove(module, attr)
        if not found:
            raise ValueError("model has no torch.nn.utils.prune masks (no *_orig/*_mask pairs)")
        return cls(model, names=list(found), masks=found)

    @staticmethod
    def state_dict_from_torch_prune(state: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
        """Split a ``torch.nn.utils.prune`` state dict into ``(plain model state, mask state)``.

        ``x.weight_orig`` and ``x.weight_mask`` become ``x.weight`` (masked) and a bool mask.
        """
        plain, masks = {}, {}
        for k, v in state.items():
            if k.endswith("_orig") and k[:-5] + "_mask" in state:
                base = k[:-5]
                mask = state[base + "_mask"].to(torch.bool)
                plain[base] = v * mask
                masks[base] = mask
            elif k.endswith("_mask") and k[:-5] + "_orig" in state:
                continue
            else:
                plain[k] = v
        return plain, masks


# ---------------------------------------------------------------------------------------------
# scores -> masks (shared by one-shot and gradual pruning)

def _oriented(shape: torch.Size, transposed: bool) -> torch.Size:
    """The ``[out, in]`` shape patterns see: a ``[in, out]`` (Conv1D) weight's transpose."""
    return torch.Size((shape[1], shape[0], *shape[2:])) if transposed else shape


def fitting_targets(names_shapes: Mapping[str, torch.Size], pattern,
                    transposed: Iterable[str] = ()) -> tuple[list[str], dict[str, str]]:
    """Split parameter names into those that fit ``pattern`` and ``{skipped name: reason}``.

    ``transposed`` names weights stored ``[in, out]`` (see :attr:`gradprune.targets.Target.transposed`):
    the pattern is checked against their transpose. Warns once per skipped layer, naming it.
    An empty weight (a dimension of size 0, e.g. ``nn.Linear(4, 0)``) has nothing to prune: it is
    skipped like a misfit, with that reason, whatever the pattern; when nothing else is left the
    ``ValueError`` names it.

        >>> from gradprune.patterns import get_pattern
        >>> fitting_targets({"a": torch.Size([8, 4]), "b": torch.Size([0, 4])}, get_pattern("1x1"))
        (['a'], {'b': 'has no weights (shape (0, 4)): nothing to prune'})
    """
    import warnings

    transposed = set(transposed)
    fit, skipped = [], {}
    for n, shape in names_shapes.items():
        why = (f"has no weights (shape {tuple(shape)}): nothing to prune" if math.prod(shape) == 0
               else pattern.misfit(_oriented(shape, n in transposed)))
        if why is None:
            fit.append(n)
        else:
            skipped[n] = why
            warnings.warn(f"gradprune: skipping {n}: {why}", UserWarning, stacklevel=3)
    if not fit:
        raise ValueError(f"no prunable layer fits pattern {pattern.spec!r} (every target was skipped, "
                         f"each with its reason): {skipped}")
    return fit, skipped


@torch.no_grad()
def build_masks(
    params: Mapping[str, torch.Tensor],
    scores: Mapping[str, torch.Tensor],
    pattern,
    *,
    previous: Mapping[str, torch.Tensor] | None = None,
    signed: bool = False,
    reduce: str = "mean",
    allocation: str = "uniform",
    transposed: Iterable[str] = (),
    **selection,
) -> dict[str, torch.Tensor]:
    """Bool masks (shaped like each parameter) from entry scores, a pattern and a selection.

    ``selection`` holds :func:`gradprune.select.select`'s keywords (``sparsity``/``topk``/
    ``threshold``, ``scope``, ``min_sparsity``, ``max_sparsity``). Entries pruned in ``previous``
    stay pruned and count toward the target. Weights named in ``transposed`` are stored
    ``[in, out]`` (GPT-2's ``Conv1D``): the pattern works on their transpose (N:M groups and blocks
    run along the input dimension, channels are output neurons), and the mask comes back in the
    parameter's own layout.
    """
    from .select import Units, raw_density, select

    transposed = set(transposed)
    flip = lambda n, t: t.transpose(0, 1) if n in transposed else t  # noqa: E731
    layers, eff_scores = [], {}
    shards = {n: RowShard(n, p) for n, p in params.items() if is_dtensor(p)}
    for n, p in params.items():
        s = scores[n]
        if s.shape != p.shape:
            raise ValueError(f"scores for {n!r} must have shape {tuple(p.shape)}, got {tuple(s.shape)}")
        prev = None if previous is None else previous.get(n)
        if n in shards:  # FSDP2: this rank's rows only, selected together with the other ranks
            _check_row_local(n, shards[n], pattern, n in transposed)
            s = MaskSet._local_rows(n, shards[n], s) if not is_dtensor(s) else local(s)
            prev = None if prev is None else MaskSet._local_rows(n, shards[n], prev)
        s = flip(n, s)
        prev = None if prev is None else flip(n, prev)
        layer_signed = signed
        if prev is not None and not bool(prev.all()):
            s = (s if signed else s.abs()).float().masked_fill(~prev, float("-inf"))
            layer_signed = True
        eff_scores[n] = (s, layer_signed)
        unit_scores = pattern.unit_scores(s, reduce, layer_signed)
        unit_pruned = None
        if prev is not None and not bool(prev.all()):
            unit_pruned = _units_pruned(pattern, prev)
        spec = shards.get(n)
        layers.append(Units(n, unit_scores, pattern.unit_weight(_oriented(p.shape, n in transposed)),
                            p.numel(), unit_pruned, raw_density(p.shape, allocation),
                            group=spec.group if spec is not None else None))
    by_group: dict[int, tuple] = {}  # sharded layers: their number of units over every rank
    for u in layers:
        if u.group is not None:
            by_group.setdefault(id(u.group), (u.group, []))[1].append(u)
    for group, us in by_group.values():
        for u, total in zip(us, all_reduce_ints([u.scores.numel() for u in us], group, us[0].scores.device)):
            u.total = total
    keep = select(layers, allocation=allocation, **selection)
    out = {}
    for n, p in params.items():
        s, layer_signed = eff_scores[n]
        m = flip(n, pattern.expand(keep[n], s, layer_signed)).contiguous()
        if previous is not None and n in previous:
            prev = previous[n]
            m = m & (MaskSet._local_rows(n, shards[n], prev) if n in shards else prev)
        out[n] = m
    return out


def _check_row_local(name: str, spec: RowShard, pattern, transposed: bool) -> None:
    """A pattern's units must lie within one rank's rows of a dim-0-sharded weight."""
    if not spec.sharded:
        return
    if transposed:
        raise ValueError(f"layer {name!r} is stored [in, out] (Conv1D) and sharded on dim 0 (its "
                         "input dimension): its units straddle the ranks' shards; exclude it or "
                         "use nn.Linear")
    rows = getattr(pattern, "rows", 1)
    if rows > 1 and spec.chunk % rows:  # the same answer on every rank: all raise, none waits
        raise ValueError(f"layer {name!r}: pattern {pattern.spec!r} needs blocks of {rows} rows, but "
                         f"its {spec.shape[0]} rows are sharded {spec.chunk} per rank: "
                         "blocks would straddle the shards; choose a world size (or "
                         "fully_shard's shard_placement_fn) that splits the rows into multiples of "
                         f"{rows}, or a row-local pattern (unstructured, N:M, 1xM, channels)")


def _units_pruned(pattern, prev: torch.Tensor) -> torch.Tensor:
    """Units that an earlier weight mask removed entirely (N:M: groups with >= M-N pruned)."""
    pruned = (~prev).float()
    if isinstance(pattern, NMPattern):  # count pruned entries per group
        per_group = pattern.groups(pruned).sum(-1).reshape(-1)
        return per_group >= (pattern.m - pattern.n)
    per_unit = pattern.unit_scores(pruned, "mean", True)
    return per_unit >= 1.0
