"""Building blocks of vision models recognised by what they do, not by their class or function
name (the package never imports torchvision):

- **squeeze-and-excitation**: ``x * scale`` where ``scale`` is ``[N, C, 1, 1]`` (a pooled branch
  through a small bottleneck) and ``x`` is ``[N, C, H, W]``: a broadcast product (or sum) of two
  channel tensors whose channels line up merges their channel spaces like a same-shape product
  (:func:`broadcast_merge`);
- **identities**: a function the analysis does not know (``torchvision.ops.stochastic_depth``,
  ``drop_block2d``, …) that returns its first argument unchanged when run in eval mode is an
  identity for the channel layout (:func:`identity_probe`, :func:`is_identity`). In training mode
  these functions scale whole samples, which keeps zeroed channels zero;
- **every prunable layer is accounted for**: :func:`list_unpruned` adds a ``skipped`` entry for
  each ``Linear``/``Conv``/``MultiheadAttention`` that no group slices and not listed yet (its
  weights used outside the module, e.g. by Swin's functional ``shifted_window_attention``; never
  called on the example input; …).

Example:
    >>> import torch, torch.nn as nn
    >>> from gradprune.structured import find_groups
    >>> class SE(nn.Module):
    ...     def __init__(self, c=8):
    ...         super().__init__()
    ...         self.conv = nn.Conv2d(3, c, 3, padding=1)
    ...         self.fc1, self.fc2 = nn.Conv2d(c, 4, 1), nn.Conv2d(4, c, 1)
    ...         self.gate, self.out = nn.Sigmoid(), nn.Conv2d(c, 2, 1)
    ...     def forward(self, x):
    ...         x = self.conv(x)
    ...         s = self.gate(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
    ...         return self.out(x * s)
    >>> sorted(g.name for g in find_groups(SE(), torch.randn(2, 3, 6, 6)).groups)
    ['conv', 'fc1']
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

__all__ = ["broadcast_merge", "identity_probe", "is_identity", "list_unpruned", "PRUNABLE"]

#: layers whose output units the analysis prunes; one that ends up in no group is listed in
#: ``Analysis.skipped`` with the reason (:func:`list_unpruned`)
PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
            nn.ConvTranspose3d, nn.MultiheadAttention)


def broadcast_merge(la, lb, a: torch.Tensor, b: torch.Tensor, result):
    """The layout of ``a (op) b`` for two channel tensors of different shapes that broadcast
    (``[N, C, H, W] * [N, C, 1, 1]``), or ``None`` when their channels do not line up: the
    channel dim must be the same dim counted from the end, full (not broadcast) in both, and the
    result must have the broadcast shape."""
    if not isinstance(result, torch.Tensor) or la.rel != lb.rel:
        return None
    try:
        shape = torch.broadcast_shapes(a.shape, b.shape)
    except RuntimeError:
        return None
    if tuple(shape) != tuple(result.shape):
        return None
    cdim = result.dim() + la.rel
    if cdim < 0 or not (a.shape[la.cdim] == b.shape[lb.cdim] == result.shape[cdim]):
        return None
    return la.moved(cdim, result.dim())


def identity_probe(n: fx.Node, env: dict, layouts: dict, known) -> torch.Tensor | None:
    """A copy of the channel tensor an unknown function ``n`` receives as its first argument
    (taken before it runs), or ``None`` when ``n`` is no such call."""
    if n.op != "call_function" or not n.args or not isinstance(n.args[0], fx.Node):
        return None
    try:
        if n.target in known:
            return None
    except TypeError:  # an unhashable callable
        pass
    if layouts.get(n.args[0]) is None:
        return None
    value = env.get(n.args[0])
    return value.detach().clone() if isinstance(value, torch.Tensor) else None


def is_identity(before: torch.Tensor, args, result) -> bool:
    """Whether the call returned its first argument itself, unchanged (``before`` is its copy)."""
    return (bool(args) and isinstance(result, torch.Tensor) and result is args[0]
            and result.shape == before.shape and torch.equal(result, before))


def _covered(name: str, names: set) -> bool:
    parts = name.split(".") if name else [""]
    return any(".".join(parts[:i]) in names for i in range(len(parts) + 1))


def list_unpruned(analysis, known: dict | None = None, called: set | None = None):
    """Add a ``skipped`` entry to ``analysis`` for every prunable layer (:data:`PRUNABLE`, or a
    Hugging Face ``Conv1D``) that no group slices (neither its outputs nor its inputs) and no
    entry names yet (nor a module around it).
    ``known`` maps a module to a reason found during the analysis; ``called`` are the modules the
    traced forward calls. Returns ``analysis``."""
    from .groups import is_conv1d

    known = known or {}
    pruned: set = set()
    for g in analysis.groups:
        pruned |= {name for name, _ in g.owners} | set(g.producers)
        pruned |= {s.module for s in g.slices}  # its outputs, channels or inputs are cut
    listed = {s["module"] for s in analysis.skipped}
    for name, mod in analysis.model.named_modules():
        if not name or not (isinstance(mod, PRUNABLE) or is_conv1d(mod)):
            continue
        if _covered(name, pruned) or _covered(name, listed):
            continue
        if name in known:
            reason = known[name]
        elif called is not None and not _covered(name, called):
            reason = "not called as a module in the forward on example_input; its units stay"
        elif "out" in analysis.roles.get(name, {}):
            reason = "its output channels are in no prunable group; its units stay"
        elif analysis.roles.get(name):  # a depthwise conv or norm on channels that stay
            reason = ("its channels come from layers that are not pruned (listed with their "
                      "reason); its units stay")
        elif "<hidden size>" in listed:  # a Hugging Face model: pooler, LM head, …
            reason = ("it reads the hidden size (residual stream), which is not pruned, and no "
                      "structural rule covers its outputs; its units stay")
        else:
            reason = "no structural rule covers it; its units stay"
        analysis.skipped.append({"module": name, "reason": reason})
        listed.add(name)
    return analysis
