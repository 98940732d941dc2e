"""Masks applied when a trainer or pruner is built, undone by its ``load_state_dict``.

Building a :class:`~gradprune.SparseTrainer` (or a :class:`~gradprune.Pruner` given ``mask=``)
applies masks at once. When the model already holds a checkpoint's weights, or the optimizer a
checkpoint's state, those masks would destroy what a later ``load_state_dict`` needs to resume
exactly. :func:`apply_keeping` applies them and keeps the nonzero entries it zeroed (positions and
values), only when the tensors may be a checkpoint's: a masked weight already holds an exact 0 (a
sparse checkpoint), or the optimizer already holds state. A fresh model and optimizer keep nothing.
:func:`restore_zeroed` puts the entries back, in every tensor nothing has written to or replaced
since.

Example:
    >>> import torch, torch.nn as nn
    >>> from gradprune.masks import MaskSet
    >>> model = nn.Linear(2, 2, bias=False)
    >>> with torch.no_grad():
    ...     _ = model.weight.copy_(torch.tensor([[0.0, 1.0], [2.0, 3.0]]))   # a sparse checkpoint
    >>> masks = MaskSet(model, names=["weight"])
    >>> masks["weight"] = torch.tensor([[True, False], [True, True]])
    >>> kept = apply_keeping(masks, None)
    >>> model.weight.tolist()
    [[0.0, 0.0], [2.0, 3.0]]
    >>> restore_zeroed(kept, masks, None)
    >>> model.weight.tolist()
    [[0.0, 1.0], [2.0, 3.0]]
"""

from __future__ import annotations

import weakref

import torch

__all__ = ["apply_keeping", "restore_zeroed"]


def _state_tensors(optimizer, p) -> list:
    state = optimizer.state.get(p, {}) if optimizer is not None else {}
    return [(k, v) for k, v in state.items() if isinstance(v, torch.Tensor) and v.shape == p.shape]


@torch.no_grad()
def apply_keeping(masks, optimizer) -> list | None:
    """``masks.apply(optimizer)``; returns what it zeroed in tensors that may be a checkpoint's
    (``None`` when nothing was kept), for :func:`restore_zeroed`."""
    params = masks.params()
    keep = any(bool(_state_tensors(optimizer, p)) for p in params.values()) or \
        any(bool((p.detach() == 0).any()) for p in params.values())
    records = []
    for n, p in (params.items() if keep else ()):
        zeroed = ~masks[n]
        if not bool(zeroed.any()):
            continue
        for key, t in [(None, p)] + _state_tensors(optimizer, p):
            lost = zeroed & (t.detach() != 0)
            if bool(lost.any()):
                records.append([n, key, weakref.ref(t), lost, t.detach()[lost].clone()])
    masks.apply(optimizer)
    for r in records:  # how the tensor looks after masking: a later write or a replacement shows
        t = r[2]()
        r.append((t._version, t.data_ptr()))
    return records or None


@torch.no_grad()
def restore_zeroed(records: list | None, masks, optimizer) -> None:
    """Put back what :func:`apply_keeping` zeroed, in every weight and optimizer state tensor that
    nothing has written to (or replaced) since: a model or optimizer state loaded afterwards is
    left as loaded."""
    params = masks.params()
    for n, key, ref, lost, values, stamp in records or ():
        t, p = ref(), params[n]
        current = p if key is None else dict(_state_tensors(optimizer, p)).get(key)
        if t is not None and current is t and (t._version, t.data_ptr()) == stamp:
            t.detach()[lost] = values
