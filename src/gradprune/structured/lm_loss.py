"""A causal-LM loss whose logits never exist for every token at once (chunked cross-entropy).

``model(ids, labels=ids).loss`` builds the logits of every token, ``B*T*V`` values, and the
backward of the loss adds their log-softmax and two gradients of the same size: with a vocabulary
of ``V = 8192`` in fp32 that is about ``5 x 4 x V`` = 160 KiB per token, more than a decoder layer
of a small model saves. :func:`causal_lm_loss` returns a ``loss_fn(model, batch)`` that computes
the same loss (the mean cross-entropy of every position against the next token, ``-100`` labels
ignored, as Hugging Face's ``ForCausalLMLoss``) while only one chunk of tokens has logits:

1. the model runs once with ``logits_to_keep=1`` (its backbone over every token, its LM head on
   the last position only) and the backbone's output (the final hidden states, after the final
   norm) is taken from a forward hook on ``model.base_model``;
2. for each chunk of positions, the LM head (``model.get_output_embeddings()``), the registered
   logit transform of the config (:data:`LOGIT_TRANSFORMS`: Gemma's final soft-capping, Cohere's
   ``logit_scale``, Granite's ``logits_scaling``) and the summed cross-entropy run under
   :func:`torch.utils.checkpoint.checkpoint` (non-reentrant): the forward keeps only the chunk's
   hidden states, and the backward recomputes one chunk's logits at a time;
3. the sum over chunks is divided by the number of counted targets.

Gradients are exact (the same graph, evaluated piecewise): gates on heads, MLP neurons, the
hidden size or whole layers get the gradients of the unchunked loss, up to float rounding.

**Checked on every batch.** The model's own logits of the last position (step 1) must equal the
LM head and transform applied to the captured hidden state of that position; when they differ
(a head this module does not know), when the model has no separate backbone or LM head, when it
does not take ``logits_to_keep``, or when its config adds a loss term (``output_router_logits``),
the loss falls back to ``model(..., labels=...).loss`` with a warning naming the reason (once per
model): the scores stay right, only the memory is not reduced.

``chunk``: ``"auto"`` (the default) takes ``ceil(B*T*H / V)`` tokens per chunk, so one chunk's
logits hold about as many values as the batch's hidden states (``H`` the hidden size); an int is
the number of tokens per chunk (split along the sequence: every sequence of the batch together,
at least one position); ``None`` computes the plain ``model(..., labels=...).loss``.

A batch is a tensor of token ids (the labels are the ids) or a mapping with ``input_ids`` and
optional ``attention_mask`` and ``labels``.

Example:
    >>> import torch, gradprune as gp
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> _ = torch.manual_seed(0)
    >>> m = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
    ...                      num_hidden_layers=2, num_attention_heads=2)).eval()
    >>> ids = torch.randint(0, 64, (2, 10))
    >>> loss_fn = gp.causal_lm_loss(chunk=4)
    >>> bool(torch.allclose(loss_fn(m, ids), m(ids, labels=ids).loss, atol=1e-6))
    True
"""

from __future__ import annotations

import inspect
import math
import warnings
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

__all__ = ["causal_lm_loss", "CausalLMLoss", "LogitTransform", "LOGIT_TRANSFORMS",
           "register_logit_transform", "LOSS_TERMS"]

IGNORE_INDEX = -100


@dataclass(frozen=True)
class LogitTransform:
    """What a causal-LM class does to its LM head's output when ``config.<field>`` is set (not
    ``None``): ``apply(logits, value)``."""

    field: str
    apply: Callable
    doc: str


LOGIT_TRANSFORMS: list = []


def register_logit_transform(transform: LogitTransform) -> LogitTransform:
    """Add a :class:`LogitTransform` (applied in registration order)."""
    if not isinstance(transform, LogitTransform):
        raise TypeError(f"transform must be a LogitTransform, got {type(transform).__name__}")
    LOGIT_TRANSFORMS.append(transform)
    return transform


def _softcap(x, cap):
    return torch.tanh(x / cap) * cap


register_logit_transform(LogitTransform("final_logit_softcapping", _softcap,
                                        "Gemma 2/3: cap * tanh(logits / cap)"))
register_logit_transform(LogitTransform("logit_scale", lambda x, s: x * s, "Cohere: logits * logit_scale"))
register_logit_transform(LogitTransform("logits_scaling", lambda x, s: x / s,
                                        "Granite: logits / logits_scaling"))

# config fields that add a term to the model's own loss (the chunked loss is cross-entropy only)
LOSS_TERMS = {"output_router_logits": "adds the router's auxiliary loss to the language-model loss"}


def causal_lm_loss(chunk: int | str | None = "auto") -> "CausalLMLoss":
    """A ``loss_fn(model, batch)`` computing the causal-LM loss with the logits of at most one
    chunk of tokens at a time (see the module docs); pass it wherever a ``loss_fn`` is taken
    (:func:`~gradprune.structured.search`, the scores of every axis, ``gp.distill`` evaluation).

    Example:
        >>> causal_lm_loss(256)
        CausalLMLoss(chunk=256)
        >>> causal_lm_loss(0)
        Traceback (most recent call last):
        ...
        ValueError: chunk must be a positive number of tokens, 'auto' or None; got 0
    """
    return CausalLMLoss(chunk)


class CausalLMLoss:
    """The callable :func:`causal_lm_loss` returns."""

    def __init__(self, chunk: int | str | None = "auto"):
        if isinstance(chunk, bool) or not (chunk is None or chunk == "auto" or isinstance(chunk, int)):
            raise TypeError(f"chunk must be an int, 'auto' or None, got {type(chunk).__name__} ({chunk!r})")
        if isinstance(chunk, int) and chunk < 1:
            raise ValueError(f"chunk must be a positive number of tokens, 'auto' or None; got {chunk}")
        self.chunk = chunk
        self._fallback: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __repr__(self) -> str:
        return f"CausalLMLoss(chunk={self.chunk!r})"

    # -- the batch --------------------------------------------------------------------------------
    @staticmethod
    def _batch(batch) -> tuple:
        if isinstance(batch, torch.Tensor):
            ids, mask, labels = batch, None, batch
        elif isinstance(batch, Mapping):
            if "input_ids" not in batch:
                raise ValueError(f"a batch mapping must have 'input_ids', got keys {sorted(batch)}")
            ids = batch["input_ids"]
            mask, labels = batch.get("attention_mask"), batch.get("labels")
            labels = ids if labels is None else labels
        else:
            raise TypeError(f"batch must be a tensor of token ids or a mapping with 'input_ids', "
                            f"got {type(batch).__name__}")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            raise ValueError(f"input_ids must be a [batch, tokens] tensor, got "
                             f"{tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__}")
        if not isinstance(labels, torch.Tensor) or labels.shape != ids.shape:
            raise ValueError(f"labels must be a tensor of the shape of input_ids {tuple(ids.shape)}")
        return ids, mask, labels

    # -- the model --------------------------------------------------------------------------------
    def _unsupported(self, model: nn.Module) -> str | None:
        """Why ``model`` cannot use the chunked loss (``None``: it can)."""
        cfg = getattr(model, "config", None)
        for field, why in LOSS_TERMS.items():
            if getattr(cfg, field, None):
                return f"config.{field} is set: the model {why}"
        base = getattr(model, "base_model", None)
        get_head = getattr(model, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        if not isinstance(base, nn.Module) or base is model:
            return f"{type(model).__name__} has no separate backbone (base_model)"
        if not isinstance(head, nn.Module):
            return f"{type(model).__name__} has no output embeddings (LM head) module"
        params = inspect.signature(model.forward).parameters
        if "logits_to_keep" not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return f"{type(model).__name__}.forward does not take logits_to_keep"
        return None

    def _head(self, model: nn.Module) -> Callable:
        head = model.get_output_embeddings()
        cfg = getattr(model, "config", None)
        steps = [(t.apply, getattr(cfg, t.field)) for t in LOGIT_TRANSFORMS
                 if getattr(cfg, t.field, None) is not None]

        def logits(h):
            y = head(h)
            for apply, value in steps:
                y = apply(y, value)
            return y
        return logits

    def _plain(self, model, ids, mask, labels):
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss

    def _fall_back(self, model: nn.Module, why: str) -> None:
        if model not in self._fallback:
            warnings.warn(f"causal_lm_loss(chunk={self.chunk!r}): {why}; computing "
                          "model(..., labels=...).loss with the logits of every token instead",
                          stacklevel=3)
        self._fallback[model] = why

    def __call__(self, model: nn.Module, batch) -> torch.Tensor:
        ids, mask, labels = self._batch(batch)
        if self.chunk is None:
            return self._plain(model, ids, mask, labels)
        if model in self._fallback:
            return self._plain(model, ids, mask, labels)
        why = self._unsupported(model)
        if why is not None:
            self._fall_back(model, why)
            return self._plain(model, ids, mask, labels)
        captured = []

        def grab(mod, args, output):
            h = output.get("last_hidden_state") if isinstance(output, Mapping) else None
            captured.append(output[0] if h is None else h)
        handle = model.base_model.register_forward_hook(grab)
        try:
            out = model(input_ids=ids, attention_mask=mask, logits_to_keep=1, use_cache=False)
        except TypeError as exc:  # a forward(**kwargs) that passes them on to something refusing them
            if "logits_to_keep" not in str(exc) and "use_cache" not in str(exc):
                raise
            self._fall_back(model, f"{type(model).__name__} does not take logits_to_keep ({exc})")
            return self._plain(model, ids, mask, labels)
        finally:
            handle.remove()
        logits_of = self._head(model)
        theirs = out.logits if hasattr(out, "logits") else out[0]
        if len(captured) != 1 or not isinstance(captured[0], torch.Tensor) \
                or captured[0].shape[:2] != ids.shape or theirs.shape[1] != 1:
            self._fall_back(model, f"{type(model).__name__}'s backbone output or logits_to_keep "
                                   "logits do not have the expected shapes")
            return self._plain(model, ids, mask, labels)
        h = captured[0]
        with torch.no_grad():
            ours = logits_of(h[:, -1:].detach())
        tol = 1e-5 if ours.dtype in (torch.float32, torch.float64) else 1e-2
        if ours.shape != theirs.shape or not torch.allclose(ours.float(), theirs.detach().float(),
                                                            rtol=tol, atol=tol):
            self._fall_back(model, f"{type(model).__name__}'s logits are not its LM head (with the "
                                   "registered logit transforms) applied to its backbone's output")
            return self._plain(model, ids, mask, labels)
        vocab = theirs.shape[-1]
        del out, theirs, ours
        return chunked_cross_entropy(h, labels.to(h.device), logits_of, self.chunk, vocab)


def chunked_cross_entropy(h: torch.Tensor, labels: torch.Tensor, logits_of: Callable,
                          chunk: int | str = "auto", vocab: int | None = None) -> torch.Tensor:
    """The mean cross-entropy of ``logits_of(h[:, t])`` against ``labels[:, t + 1]`` over every
    position ``t`` whose label is not ``-100``, one chunk of positions at a time (each chunk
    under non-reentrant :func:`~torch.utils.checkpoint.checkpoint` while grad is enabled).
    ``chunk="auto"`` needs the number of logits per token, ``vocab``.

    Example:
        >>> import torch
        >>> head = torch.nn.Linear(4, 10)
        >>> h, y = torch.randn(2, 6, 4), torch.randint(0, 10, (2, 6))
        >>> ref = torch.nn.functional.cross_entropy(head(h[:, :-1]).reshape(-1, 10), y[:, 1:].reshape(-1))
        >>> bool(torch.allclose(chunked_cross_entropy(h, y, head, chunk=3), ref))
        True
    """
    b, t = labels.shape
    h, target = h[:, :-1], labels[:, 1:]
    count = (target != IGNORE_INDEX).sum()
    n_pos = t - 1
    if chunk == "auto":
        if not isinstance(vocab, int) or vocab < 1:
            raise ValueError(f"chunk='auto' needs vocab, the number of logits per token; got {vocab!r}")
        per = max(1, math.ceil(h.shape[-1] * n_pos / vocab))  # B*per*V ~ B*T*H values
    else:
        per = max(1, int(chunk) // max(b, 1))

    def piece(hc, yc):  # contiguous: a strided [B, c, H] slice would make the head a slow bmm
        logits = logits_of(hc.contiguous()).float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), yc.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")

    total = None
    for start in range(0, n_pos, per):
        hc, yc = h[:, start:start + per], target[:, start:start + per]
        if torch.is_grad_enabled() and hc.requires_grad:
            part = checkpoint(piece, hc, yc, use_reentrant=False)
        else:
            part = piece(hc, yc)
        total = part if total is None else total + part
    if total is None:  # a single token: no target (as the unchunked loss, a NaN mean)
        total = h.new_zeros((), dtype=torch.float32)
    return total / count
