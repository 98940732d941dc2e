"""One-shot pruning: score once, select once, apply.

Example:
    >>> import torch, torch.nn as nn
    >>> import gradprune as gp
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    >>> data = [(torch.randn(8, 16), torch.randint(0, 4, (8,))) for _ in range(4)]
    >>> loss_fn = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])
    >>> res = gp.prune(model, sparsity=0.75, criterion="snip", pattern="4x1", scope="global",
    ...                data=data, loss_fn=loss_fn, n_batches=4)
    >>> res.masks.sparsity()
    0.75
    >>> float(model[0].weight.detach()[~res.masks["0.weight"]].abs().sum())
    0.0
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from ._checks import check_int, check_optional_bool
from ._distributed import resolve_process_group
from .config import PruneConfig
from ._modes import keeps_modes
from .masks import MaskSet, SparsityReport, build_masks, fitting_targets
from .patterns import get_pattern
from .scores import get_criterion, stream_gradients
from .targets import find_targets

__all__ = ["prune", "PruneResult", "make_config"]


@dataclass
class PruneResult:
    """What :func:`prune` did: ``masks`` (a :class:`MaskSet`), the ``scores`` it used per
    parameter, a per-layer ``report``, the ``config`` and the number of ``batches`` scored."""

    masks: MaskSet
    scores: dict
    report: SparsityReport
    config: PruneConfig
    batches: int
    #: one-shot LLM runs (see :mod:`gradprune.oneshot`): ``weights_changed`` (``sparsegpt``
    #: reconstructs kept weights), ``calibration_seconds``, ``peak_device_bytes``, OWL ratios
    details: dict = field(default_factory=dict)


def make_config(config: PruneConfig | None, fields: Mapping[str, Any]) -> PruneConfig:
    """A validated config from an optional base config and keyword fields.

    ``sparsity`` is accepted as a short name for ``target_sparsity``; unknown names raise
    ``ValueError`` listing the valid ones.
    """
    fields = dict(fields)
    if "sparsity" in fields:
        if "target_sparsity" in fields:
            raise ValueError("give sparsity or target_sparsity, not both")
        fields["target_sparsity"] = fields.pop("sparsity")
    if config is None:
        return PruneConfig.from_dict(fields)
    if not isinstance(config, PruneConfig):
        raise TypeError(f"config must be a PruneConfig, got {type(config).__name__}")
    if fields:
        base = config.to_dict()
        unknown = sorted(set(fields) - set(base))
        if unknown:
            PruneConfig.from_dict(fields)  # raises with the list of valid keys
        base.update(fields)
        return PruneConfig.from_dict(base)
    return config


@keeps_modes
def prune(
    model: nn.Module,
    config: PruneConfig | None = None,
    *,
    data: Iterable | None = None,
    loss_fn: Callable | None = None,
    n_batches: int | None = None,
    mask: Mapping[str, torch.Tensor] | None = None,
    show_progress: bool | None = None,
    process_group=None,
    sequential: bool = False,
    blocks: Iterable[str] | None = None,
    device=None,
    offload=None,
    owl_m: float = 5.0,
    owl_lambda: float = 0.08,
    **fields,
) -> PruneResult:
    """Prune ``model`` in place, one-shot, and return the masks, scores and a per-layer report.

    Args:
        model: the model; its prunable weights are zeroed in place.
        config: a :class:`PruneConfig`; keyword ``fields`` override it (or build one), e.g.
            ``sparsity=0.9, criterion="snip", pattern="4x1", scope="global"``.
        data, loss_fn: batches and ``loss_fn(model, batch) -> scalar`` for criteria that read
            gradients (every built-in except ``magnitude`` and ``random``). ``criterion="movement"``
            is refused here (``ValueError``): movement needs fine-tuning, use :class:`Pruner`.
        n_batches: score on at most this many batches (default: all of ``data``).
        mask: an existing mask (a :class:`MaskSet` or ``{name: bool tensor}``): its pruned entries
            stay pruned and count toward the target (mask -> threshold -> topk chaining).
        show_progress: progress bar over batches (default: when stderr is a terminal).
        process_group: score across ranks (``torch.distributed``): each rank passes its own shard
            of every batch and the gradients are averaged over the ranks after each backward, so
            every rank gets the masks of a single-process run on the global batches. Implied by a
            ``DistributedDataParallel`` model (its group); see ``docs/distributed.md``.
        sequential, blocks, device, offload, owl_m, owl_lambda: one-shot LLM sparsity, used with
            the criteria that read layer inputs (``wanda``, ``sparsegpt``, ``gblm``, ``ria``) and
            ``allocation="owl"``: calibrate block by block on the pruned model's inputs, in
            bounded memory. See :mod:`gradprune.oneshot`; ``res.details`` says what was done
            (``weights_changed=True`` for ``sparsegpt``).

    Scores are computed in eval mode; the model's mode, ``requires_grad`` flags and gradients are
    restored afterwards.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    cfg = make_config(config, fields)
    if cfg.criterion == "movement":
        raise ValueError(
            "criterion 'movement' needs fine-tuning: its score -W*G says which weights training moves "
            "toward zero, and scored once without training it prunes no better than chance. Use "
            "gp.Pruner(model, optimizer, criterion='movement', ...) and prune while you fine-tune, "
            "or a one-shot criterion such as 'snip' or 'magnitude'")
    check_int("n_batches", n_batches, min_value=1, allow_none=True)
    check_optional_bool("show_progress", show_progress)
    if process_group is not None:
        resolve_process_group(model, process_group)  # a TypeError for what is not a group
    target = cfg.effective_target()
    if target is None and cfg.topk is None and cfg.threshold is None:
        raise ValueError("prune needs one of sparsity (target_sparsity), topk or threshold")
    targets = find_targets(model, cfg.include, cfg.exclude, cfg.module_types, cfg.include_classifier,
                               cfg.strict_filters)
    pattern = get_pattern(cfg.pattern)
    transposed = [n for n, t in targets.items() if t.transposed]
    fit, skipped = fitting_targets({n: t.shape for n, t in targets.items()}, pattern, transposed)
    params = {n: targets[n].param for n in fit}
    criterion = get_criterion(cfg, params)
    if criterion.needs_grad and (data is None or loss_fn is None):
        raise ValueError(
            f"criterion {cfg.criterion!r} reads gradients: pass data= and loss_fn= "
            "(loss_fn(model, batch) -> scalar loss)"
        )
    layerwise = getattr(criterion, "reads_inputs", False) or sequential or cfg.allocation == "owl"
    if layerwise:
        from .oneshot import check_options, prune_with_inputs

        check_options(sequential=sequential, blocks=blocks, offload=offload, owl_m=owl_m,
                      owl_lambda=owl_lambda, allocation=cfg.allocation, pattern=pattern,
                      criterion_cls=type(criterion), sparsity=target)
        if data is None or loss_fn is None:
            raise ValueError(f"criterion {cfg.criterion!r} with sequential={sequential}, allocation="
                             f"{cfg.allocation!r} reads layer inputs: pass data= and loss_fn=")
        if mask is not None or target is None:
            raise ValueError("one-shot LLM pruning (input criteria, sequential, owl) takes a sparsity "
                             "and no mask=")
        new, details = prune_with_inputs(
            model, cfg, params, transposed, pattern, criterion, data=data, loss_fn=loss_fn,
            n_batches=n_batches, sequential=sequential, blocks=blocks, device=device, offload=offload,
            owl_m=owl_m, owl_lambda=owl_lambda, show_progress=show_progress, process_group=process_group)
        masks = MaskSet(model, names=fit, masks=new)
        del new  # the MaskSet holds its own copies
        with torch.no_grad():  # bool masks multiply in place: no float copy of the masks is cached
            for n, p in masks.params().items():
                p.mul_(masks[n])
        report = SparsityReport(masks, skipped, {n: targets[n].shape for n in skipped})
        return PruneResult(masks, {}, report, cfg, details.get("batches", 0), details)
    if sequential or blocks is not None or offload is not None:
        raise ValueError("sequential=, blocks= and offload= apply to one-shot LLM pruning only")
    previous = None
    if mask is not None:
        if not isinstance(mask, Mapping):
            raise TypeError(f"mask must be a MaskSet or a mapping name -> bool tensor, got {type(mask).__name__}")
        unknown = sorted(set(mask) - set(params))
        if unknown:
            raise ValueError(f"mask names parameters this prune does not prune: {unknown} "
                             f"(pruned: {list(params)})")
        previous = dict(mask.items())
        for n, m in previous.items():
            if not isinstance(m, torch.Tensor) or m.dtype != torch.bool or m.shape != params[n].shape:
                raise ValueError(f"mask for {n!r} must be a bool tensor of shape {tuple(params[n].shape)}")

    batches = 0
    if criterion.needs_grad:
        def on_batch():
            criterion.on_step_begin()
            criterion.on_before_optimizer_step()

        batches = stream_gradients(model, data, loss_fn, params, n_batches=n_batches,
                                   on_batch=on_batch, show_progress=show_progress,
                                   desc=f"scoring ({cfg.criterion})", process_group=process_group)
    scores = criterion.scores
    new = build_masks(params, scores, pattern, previous=previous, signed=criterion.signed,
                      reduce=cfg.reduce, allocation=cfg.allocation, transposed=transposed, sparsity=target,
                      topk=cfg.topk, threshold=cfg.threshold, scope=cfg.scope,
                      min_sparsity=cfg.min_sparsity, max_sparsity=cfg.max_sparsity,
                      count_rounding=cfg.count_rounding)
    masks = MaskSet(model, names=fit, masks=new)
    masks.apply()
    report = SparsityReport(masks, skipped, {n: targets[n].shape for n in skipped})
    return PruneResult(masks, scores, report, cfg, batches)
