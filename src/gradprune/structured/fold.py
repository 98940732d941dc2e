"""Fold inference-mode BatchNorm layers into the convolutions that feed them.

After :meth:`~gradprune.structured.SearchResult.export` a model still runs every BatchNorm as a
separate operation; for inference, ``y = BN(conv(x))`` equals one convolution with scaled weights
and a bias. Folding removes that pass over the activations (FLOPs counts leave BatchNorm out, so
it is part of why a narrowed model's latency falls less than its FLOPs).
"""

from __future__ import annotations

import torch
from torch import fx, nn

__all__ = ["fold_batchnorm"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def fold_batchnorm(model: nn.Module) -> list:
    """Fold every eval-mode BatchNorm that directly follows a ``Conv1d/2d/3d`` into it, in place.

    A pair is folded when the convolution's output feeds only the BatchNorm, each module is
    called once in the forward, and the BatchNorm uses running statistics (``eval()`` mode,
    ``track_running_stats=True``). The convolution gets ``weight * s`` and a bias
    ``(bias - mean) * s + beta`` with ``s = gamma / sqrt(var + eps)`` per output channel, and the
    BatchNorm is replaced by ``nn.Identity`` (the model stays an ordinary module; its outputs are
    unchanged up to float rounding). Anything else is left as it is. The result is for inference:
    training it afterwards trains without BatchNorm.

    The model is traced with :func:`torch.fx.symbolic_trace` to see which module feeds which;
    ``ValueError`` if it cannot be traced. Returns the folded ``(conv name, batchnorm name)`` pairs.

    Example:
        >>> import torch, torch.nn as nn
        >>> from gradprune.structured import fold_batchnorm
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
        >>> x = torch.randn(2, 3, 8, 8)
        >>> before = net(x)
        >>> fold_batchnorm(net)
        [('0', '1')]
        >>> isinstance(net[1], nn.Identity), torch.allclose(net(x), before, atol=1e-6)
        (True, True)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as exc:  # fx raises many kinds of errors on untraceable code
        raise ValueError(f"fold_batchnorm needs a model that torch.fx can trace: {type(exc).__name__}: {exc}") from exc
    modules = dict(model.named_modules())
    calls: dict = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.modules.batchnorm._BatchNorm):
            continue
        bn = modules[node.target]
        src = node.args[0] if node.args else None
        if not (isinstance(src, fx.Node) and src.op == "call_module" and isinstance(modules.get(src.target), _CONVS)):
            continue
        conv = modules[src.target]
        if (len(src.users) != 1 or calls[src.target] != 1 or calls[node.target] != 1 or len(node.args) != 1
                or node.kwargs or bn.training or not bn.track_running_stats or bn.running_mean is None
                or bn.num_features != conv.out_channels):
            continue
        pairs.append((src.target, node.target))
    for conv_name, bn_name in pairs:
        _fold(modules[conv_name], modules[bn_name])
        parent_name, _, attr = bn_name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, attr, nn.Identity())
    return pairs


@torch.no_grad()
def _fold(conv: nn.Module, bn: nn.Module) -> None:
    var = bn.running_var.to(torch.float64)
    scale = (bn.weight.to(torch.float64) if bn.weight is not None else torch.ones_like(var)) / torch.sqrt(var + bn.eps)
    shift = bn.bias.to(torch.float64) if bn.bias is not None else torch.zeros_like(var)
    bias = conv.bias.to(torch.float64) if conv.bias is not None else torch.zeros_like(var)
    w = conv.weight
    conv.weight.copy_((w.to(torch.float64) * scale.reshape(-1, *([1] * (w.dim() - 1)))).to(w.dtype))
    new_bias = ((bias - bn.running_mean.to(torch.float64)) * scale + shift).to(w.dtype)
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias, requires_grad=w.requires_grad)
    else:
        conv.bias.copy_(new_bias)
