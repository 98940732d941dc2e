"""One-shot LLM criteria that read layer inputs: ``wanda``, ``sparsegpt``, ``gblm``, ``ria``.

They score a ``Linear`` (or GPT-2 ``Conv1D``) weight ``W`` (read as ``[out, in]``) from the
inputs ``X`` (``[tokens, in]``: every calibration token that reaches the layer) that
:func:`gradprune.prune` feeds them through forward hooks on the layer (``add_inputs``).
``Conv1d`` / ``Conv2d`` weights ``[out, in, *kernel]`` are read as the ``[out, in * prod(kernel)]``
matrix of the convolution-as-matmul: ``X`` is the unfolded input (:func:`input_matrix`, one row
per output position, padding included), so ``||X_j||`` is per input channel *and* kernel position
and ``sparsegpt``'s Hessian is that of the unfolded inputs. Grouped, 3-D and transposed
convolutions are refused (:func:`input_layer_problem`).

========= ============================================================ ===== ==========
name      score                                                        grad  comparison
========= ============================================================ ===== ==========
wanda     ``|W_ij| * ||X_j||_2``                                       no    row
ria       ``(|W_ij|/sum_row|W_i.| + |W_ij|/sum_col|W_.j|) * ||X_j||_2^a``  no    layer
gblm      ``|W_ij| * (||X_j||_2 + alpha * ||G_ij||_2)``                yes   row
sparsegpt OBS saliency ``W_ij^2 / [H^-1]_jj^2``, ``H = X^T X + damp I``  no    block
========= ============================================================ ===== ==========

* ``||X_j||_2`` is the L2 norm over all calibration tokens of input feature ``j`` (not squared).
* ``gblm``: ``||G_ij||_2`` is the L2 norm over calibration batches of the language-modelling loss
  gradient (batch size 1 gives the paper's per-sample norm); ``alpha`` (default 100, the
  reference implementation's gradient scale) weighs it against the activation term.
* ``ria``: ``a`` (default 0.5) is the activation exponent of the RIA paper.
* *comparison*: which entries compete. ``"row"`` (Wanda's default): every output row of the
  unit grid prunes the same share (exactly, see :func:`gradprune.prune`); ``"layer"``: the whole
  layer competes (RIA's default). Choose with ``criterion_options={"comparison": ...}``.
* ``sparsegpt`` (Frantar & Alistarh 2023) does not only select: it reconstructs the kept weights
  (the OBS update), column block by column block (``blocksize`` 128, lazy batched updates), with
  ``percdamp`` (default 0.01) of the mean Hessian diagonal added as damping. The result says
  ``weights_changed=True``. Its mask is chosen per column block (adaptive mask selection), or per
  group of ``M`` columns for ``N:M``.

Example:
    >>> import torch, gradprune as gp
    >>> w = torch.nn.Parameter(torch.tensor([[1.0, -2.0], [3.0, 0.5]]))
    >>> crit = gp.get_criterion("wanda", {"lin.weight": w})
    >>> crit.add_inputs("lin.weight", torch.tensor([[3.0, 0.0], [4.0, 1.0]]))   # ||X_0|| = 5, ||X_1|| = 1
    >>> crit.scores["lin.weight"]
    tensor([[ 5.0000,  2.0000],
            [15.0000,  0.5000]])
"""
from __future__ import annotations

from abc import abstractmethod

import torch

import torch.nn.functional as F
from torch import nn

from .._checks import check_choice, check_float, check_int
from .criteria import Criterion, _acc_like, register_criterion

__all__ = ["InputCriterion", "WandaCriterion", "RiaCriterion", "GblmCriterion", "SparseGPTCriterion",
           "COMPARISONS", "input_matrix", "input_layer_problem"]

COMPARISONS = ("row", "layer")


def input_layer_problem(module: nn.Module, attr: str) -> str | None:
    """Why the criteria that read inputs cannot score ``module.<attr>``, or ``None`` when they can.

    Supported: the ``weight`` of ``Linear``, GPT-2 ``Conv1D`` (stored ``[in, out]``), and
    ``Conv1d`` / ``Conv2d`` with ``groups=1`` (inputs unfolded, :func:`input_matrix`).

    Example:
        >>> import torch.nn as nn
        >>> input_layer_problem(nn.Conv2d(4, 8, 3), "weight") is None
        True
        >>> input_layer_problem(nn.Conv2d(4, 8, 3, groups=2), "weight")
        'grouped convolution (groups=2): each output row reads other inputs; not supported'
    """
    kind = type(module).__name__
    if attr != "weight":
        return (f"{kind}.{attr} is not the weight of a Linear/Conv layer: its inputs are not the "
                "module's first argument")
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return f"transposed convolution ({kind}): its weight is not an [out, in] map of unfolded inputs"
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        if module.groups != 1:
            return (f"grouped convolution (groups={module.groups}): each output row reads other inputs; "
                    "not supported")
        return None
    if isinstance(module, nn.Conv3d):
        return "Conv3d: unfolding 3-D inputs is not supported (Conv1d/Conv2d are)"
    if isinstance(module, nn.Linear) or kind == "Conv1D":
        return None
    return f"{kind} is not a Linear, Conv1D, Conv1d or Conv2d layer"


def input_matrix(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` (the first input of ``module``) as the ``[tokens, in]`` matrix the layer's
    ``[out, in]`` weight view multiplies: Linear / Conv1D inputs flattened over leading dims;
    Conv1d / Conv2d inputs padded as the layer pads them and unfolded (``F.unfold``), one row
    per output position, columns ordered like ``weight.reshape(out, -1)`` (channel, then kernel).

    Example:
        >>> import torch, torch.nn as nn
        >>> conv = nn.Conv2d(2, 3, 3, padding=1, bias=False)
        >>> x = torch.randn(1, 2, 5, 5)
        >>> X = input_matrix(conv, x)                      # [1 * 5 * 5, 2 * 3 * 3]
        >>> X.shape
        torch.Size([25, 18])
        >>> torch.allclose(X @ conv.weight.reshape(3, -1).t(), conv(x).flatten(2).transpose(1, 2).reshape(-1, 3),
        ...                atol=1e-5)
        True
    """
    if not isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return x.reshape(-1, x.shape[-1])
    one_d = isinstance(module, nn.Conv1d)
    if x.dim() == module.weight.dim() - 1:  # unbatched input
        x = x.unsqueeze(0)
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    x = F.pad(x, list(module._reversed_padding_repeated_twice), mode=mode)
    as2 = (lambda t: (1, t[0])) if one_d else tuple  # noqa: E731
    if one_d:
        x = x.unsqueeze(-2)
    cols = F.unfold(x, as2(module.kernel_size), dilation=as2(module.dilation), padding=0,
                    stride=as2(module.stride))
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


class InputCriterion(Criterion):
    """Base of the criteria that read each layer's inputs (``reads_inputs = True``).

    ``add_inputs(name, x)`` accumulates ``x`` (``[tokens, in]``) for parameter ``name``;
    ``transposed`` names weights stored ``[in, out]``. Scores are shaped like the parameter.
    """

    needs_grad = False
    reads_inputs = True
    updates_weights = False
    default_comparison = "row"
    option_names = ("comparison",)

    def __init__(self, params, comparison: str | None = None):
        super().__init__(params)
        self.comparison = check_choice("comparison", comparison or self.default_comparison, COMPARISONS)
        self.transposed: set = set()
        self.sq: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}

    def add_inputs(self, name: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if name not in self.sq:
            self.sq[name] = torch.zeros(x.shape[-1], dtype=torch.float32, device=x.device)
            self.tokens[name] = 0
        self.sq[name] += (x * x).sum(0)
        self.tokens[name] += x.shape[0]

    def forget(self, name: str) -> None:
        """Drop the statistics of ``name`` (after it is pruned; bounds memory)."""
        self.sq.pop(name, None)
        self.tokens.pop(name, None)

    def reset(self) -> None:
        self.sq.clear()
        self.tokens.clear()

    def ready(self) -> bool:
        return set(self.sq) >= set(self.params)

    def weight(self, name: str) -> torch.Tensor:
        """The parameter as a float ``[out, in]`` matrix."""
        w = self.params[name].detach().float()
        return w.t() if name in self.transposed else w.reshape(w.shape[0], -1)

    def input_norm(self, name: str) -> torch.Tensor:
        if name not in self.sq:
            raise ValueError(f"criterion {self.name!r} reads layer inputs and has none for {name!r}: "
                             "use gp.prune(model, criterion=..., data=..., loss_fn=...) so the "
                             "calibration batches run through the model")
        return self.sq[name].sqrt()

    @abstractmethod
    def score_one(self, name: str) -> torch.Tensor:
        """The ``[out, in]`` score matrix of parameter ``name``; each registered subclass (wanda,
        ria, gblm, sparsegpt) defines it (a subclass without it cannot be instantiated)."""

    def score(self, name: str) -> torch.Tensor:
        s = self.score_one(name)
        p = self.params[name]
        return (s.t() if name in self.transposed else s.reshape(p.shape)).contiguous()

    @property
    def scores(self):
        return {n: self.score(n) for n in self.params}


@register_criterion("wanda")
class WandaCriterion(InputCriterion):
    """Wanda (Sun et al. 2024): ``|W_ij| * ||X_j||_2``, compared within each output row."""

    def score_one(self, name):
        return self.weight(name).abs() * self.input_norm(name).to(self.weight(name).device)


@register_criterion("ria")
class RiaCriterion(InputCriterion):
    """RIA (Zhang et al. 2024): relative importance ``|W|/row sum + |W|/column sum`` times
    ``||X_j||_2 ** a`` (``a=0.5``); compared over the whole layer by default, as in the paper."""

    default_comparison = "layer"
    option_names = ("comparison", "a")

    def __init__(self, params, comparison: str | None = None, a: float = 0.5):
        super().__init__(params, comparison)
        self.a = check_float("a", a, low=0.0)

    def score_one(self, name):
        w = self.weight(name).abs()
        tiny = torch.finfo(w.dtype).tiny
        ri = w / w.sum(1, keepdim=True).clamp_min(tiny) + w / w.sum(0, keepdim=True).clamp_min(tiny)
        return ri * self.input_norm(name).to(w.device).pow(self.a)


@register_criterion("gblm")
class GblmCriterion(InputCriterion):
    """GBLM-Pruner (Das et al. 2023): ``|W_ij| * (||X_j||_2 + alpha * ||G_ij||_2)`` with the
    gradient's L2 norm taken over the calibration batches (``alpha=100``)."""

    needs_grad = True
    option_names = ("comparison", "alpha")

    def __init__(self, params, comparison: str | None = None, alpha: float = 100.0):
        super().__init__(params, comparison)
        self.alpha = check_float("alpha", alpha, low=0.0)
        self.grad_sq = {n: _acc_like(p) for n, p in self.params.items()}
        self.batches = 0

    def on_before_optimizer_step(self) -> None:
        for n, p in self.params.items():
            if p.grad is not None:
                g = p.grad.detach().to(self.grad_sq[n].dtype)
                self.grad_sq[n].addcmul_(g, g)
        self.batches += 1

    def reset(self) -> None:
        super().reset()
        for acc in self.grad_sq.values():
            acc.zero_()
        self.batches = 0

    def score_one(self, name):
        g = self.grad_sq[name].sqrt()
        g = g.t() if name in self.transposed else g.reshape(g.shape[0], -1)
        w = self.weight(name)
        return w.abs() * (self.input_norm(name).to(w.device) + self.alpha * g.to(w.device))


@register_criterion("sparsegpt")
class SparseGPTCriterion(InputCriterion):
    """SparseGPT (Frantar & Alistarh 2023): OBS pruning with weight reconstruction.

    Accumulates ``H = X^T X`` per layer; :meth:`prune_layer` chooses the mask and updates the kept
    weights. ``scores`` gives the (static) OBS saliency ``W^2 / [H^-1]_jj^2`` for inspection.
    """

    updates_weights = True
    default_comparison = "layer"
    option_names = ("percdamp", "blocksize")

    def __init__(self, params, percdamp: float = 0.01, blocksize: int = 128):
        super().__init__(params, "layer")
        self.percdamp = check_float("percdamp", percdamp, low=0.0)
        self.blocksize = check_int("blocksize", blocksize, min_value=1)
        self.hessian: dict[str, torch.Tensor] = {}

    def add_inputs(self, name, x):
        super().add_inputs(name, x)
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if name not in self.hessian:
            self.hessian[name] = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float32, device=x.device)
        self.hessian[name].addmm_(x.t(), x)

    def forget(self, name):
        super().forget(name)
        self.hessian.pop(name, None)

    def reset(self):
        super().reset()
        self.hessian.clear()

    def _hinv(self, name: str, device, dtype=torch.float64, release: bool = False):
        """Upper Cholesky factor of the damped inverse Hessian (factorised in float64, returned as
        ``dtype``), and the dead inputs. At most two float64 ``[in, in]`` matrices live at once;
        ``release=True`` drops the accumulated float32 Hessian as soon as its float64 copy exists."""
        if name not in self.hessian:
            self.input_norm(name)  # raises the "no inputs" error
        h = self.hessian[name].to(device, torch.float64, copy=True)
        if release:
            del self.hessian[name]
        dead = torch.diag(h) == 0
        h[dead, dead] = 1.0
        h.diagonal().add_(self.percdamp * torch.diag(h).mean())
        try:
            factor = torch.linalg.cholesky(h)
            del h
            hinv = torch.cholesky_inverse(factor)
            del factor
            factor = torch.linalg.cholesky(hinv, upper=True)
            del hinv
            return factor.to(dtype), dead
        except RuntimeError as e:  # not positive definite even after damping
            raise ValueError(f"sparsegpt: the Hessian of {name!r} is not positive definite with "
                             f"percdamp={self.percdamp}; raise percdamp") from e

    def score_one(self, name):
        w = self.weight(name).double()
        hinv, _ = self._hinv(name, w.device)
        return (w.pow(2) / torch.diag(hinv).pow(2)).float()

    def prune_layer(self, name: str, choose, order: torch.Tensor | None = None) -> torch.Tensor:
        """Prune and reconstruct ``name`` in place; returns its keep mask (parameter layout).

        ``choose(block_saliency [out, width], start) -> bool prune mask [out, width]`` picks the
        entries to prune in each column block (the caller keeps counts exact); N:M patterns choose
        within groups as they are reached, so blocks are multiples of ``M``. ``order`` (a
        permutation of the ``[out, in]`` view's columns) sets the order the columns are visited in,
        e.g. channels-last for a conv's N:M groups; the Hessian is permuted with them.
        """
        p = self.params[name]
        w = self.weight(name).float().clone()
        if order is not None and name in self.hessian:
            w = w[:, order]
            self.hessian[name] = self.hessian[name][order][:, order]
        # float64 factorisation, float32 updates (as the paper); the Hessian is not needed after
        hinv, dead = self._hinv(name, w.device, torch.float32, release=True)
        w[:, dead] = 0.0
        cols = w.shape[1]
        bs = getattr(choose, "block_multiple", 1)
        bs = max(bs, (self.blocksize // bs) * bs)
        prune_mask = torch.zeros_like(w, dtype=torch.bool)
        group = getattr(choose, "group", 0)
        per_group = getattr(choose, "per_group", False)
        for i1 in range(0, cols, bs):
            i2 = min(i1 + bs, cols)
            width = i2 - i1
            w1, h1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
            d = torch.diag(h1)
            d2 = d.pow(2)
            err = torch.empty_like(w1)
            pm = prune_mask[:, i1:i2]
            if not per_group:
                pm.copy_(choose(w1.pow(2) / d2, i1))
            # column views made once per block (one C call each instead of Python indexing per column)
            w_col, pm_col, err_col = w1.unbind(1), pm.unbind(1), err.unbind(1)
            tails = [w1[:, i:] for i in range(width)]
            h_rows = [h1[i, i:] for i in range(width)]
            d_list = d.tolist()
            for i in range(width):
                if per_group and i % group == 0:
                    # the paper's mask selection every M columns, on the weights as updated so far
                    pm[:, i:i + group] = choose(w1[:, i:i + group].pow(2) / d2[i:i + group], i1 + i)
                # OBS step: the error of zeroing the pruned entries of column i, spread over the
                # columns after it (the kept entries of column i are unchanged: e is 0 there)
                e = torch.mul(w_col[i], pm_col[i], out=err_col[i]).div_(d_list[i])
                tails[i].addr_(e, h_rows[i], alpha=-1.0)
            w[:, i1:i2] = w1
            w[:, i2:].addmm_(err, hinv[i1:i2, i2:], alpha=-1.0)
        keep = prune_mask.logical_not_()
        w.mul_(keep)
        if order is not None:  # back to the parameter's column order
            inverse = torch.argsort(order)
            w, keep = w[:, inverse], keep[:, inverse]
        with torch.no_grad():
            new = (w.t() if name in self.transposed else w.reshape(p.shape)).to(p.dtype)
            p.copy_(new)
        return (keep.t() if name in self.transposed else keep.reshape(p.shape)).contiguous()


def layer_inputs_error(weight_before: torch.Tensor, weight_after: torch.Tensor, x: torch.Tensor) -> float:
    """``||X W_before^T - X W_after^T||_F^2 / ||X W_before^T||_F^2``: a layer's relative
    reconstruction error on inputs ``x`` (``[tokens, in]``; weights ``[out, in]``)."""
    x, before, after = x.detach().float(), weight_before.detach().float(), weight_after.detach().float()
    ref = x @ before.t()
    return float((ref - x @ after.t()).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-30))
