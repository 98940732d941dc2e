"""Recovery after pruning: knowledge distillation from the original model (the teacher).

A pruned model (the *student*, e.g. ``found.export()``) is trained to match the outputs of the
model it was cut from (the *teacher*). The loss is a weighted sum of three terms:

- **logit KL** (``kl_weight``, default 1): ``T² · mean_positions KL(softmax(z_t/T) ‖ softmax(z_s/T))``
  with ``T = temperature``, as in Hinton et al. (2015): the ``T²`` keeps the gradient's size
  independent of ``T``. Positions are the rows of the logits (a sequence model's tokens); where the
  batch has an ``attention_mask``, padded tokens do not count. See :func:`kl_loss`.
- **hidden-state loss** (``hidden_weight``, default 0): MSE (mean over channels) or ``1 − cos``
  between chosen hidden states, averaged over positions and pairs. ``hidden_states`` lists
  ``(student, teacher)`` pairs: two ints index a Hugging Face model's ``outputs.hidden_states``
  (0 is the embedding output, ``i`` the output of decoder layer ``i``, ``-1`` the last entry, which is
  after the final norm in LLaMA-family models); two strings name modules whose outputs are taken
  (the first element when a module returns a tuple). Where the widths differ (after pruning the
  hidden size), the student's state goes through a trainable bias-free ``Linear(student width,
  teacher width)`` first (one per pair, seeded, trained with the student and saved in the state);
  equal widths are compared as they are.
- **hard-label cross-entropy** (``ce_weight``, default 0): on a batch's ``labels`` (a dict batch's
  ``"labels"``, the second item of an ``(inputs, labels)`` pair, or the input ids themselves). For
  sequence logits ``(batch, tokens, vocab)`` the label of position ``t`` is the token at ``t + 1``
  (Hugging Face's causal-LM convention); ``-100`` is ignored.

The teacher runs in eval mode under ``torch.no_grad()`` and is never updated; it runs on the device
its parameters are on (so it can be offloaded to another GPU or to the CPU) and its outputs are
moved to the student's device. A batch is a dict of tensors (``model(**batch)``, ``labels`` removed),
an ``(inputs, labels)`` pair (``model(inputs)``) or one tensor (``model(tensor)``). Models may return
logits or an output with ``.logits`` (and ``.hidden_states``).

:class:`Distiller` runs the loop (AdamW by default, optional gradient clipping, a progress bar,
logging) and its :meth:`~Distiller.state_dict` resumes bit for bit; :func:`distill` builds one and
runs it. Inside a Hugging Face ``Trainer`` use :class:`gradprune.integrations.hf.DistillTrainer`.

Example:
    >>> import torch, torch.nn as nn
    >>> import gradprune as gp
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> teacher = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 5))
    >>> student = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 5))
    >>> data = [torch.randn(16, 8) for _ in range(4)]
    >>> run = gp.distill(student, teacher=teacher, data=data, steps=40, lr=1e-2, temperature=2.0)
    >>> run.step, run.history[-1]["kl"] < run.history[0]["kl"]
    (40, True)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_choice, check_float, check_int, check_optional_bool
from ._modes import preserve_modes
from ._progress import progress
from .config import Config
from .masks import MaskSet

__all__ = ["DistillConfig", "Distiller", "distill", "kl_loss", "HIDDEN_LOSSES"]

logger = logging.getLogger(__name__)

HIDDEN_LOSSES = ("mse", "cosine")
IGNORE_INDEX = -100


def _check_pairs(v):
    if not isinstance(v, (list, tuple)) or not v:
        raise TypeError(f"hidden_states must be a non-empty list of (student, teacher) pairs, got {v!r}")
    out = []
    for pair in v:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise TypeError(f"hidden_states items must be (student, teacher) pairs, got {pair!r}")
        a, b = pair
        ints = all(isinstance(x, int) and not isinstance(x, bool) for x in pair)
        strs = all(isinstance(x, str) and x for x in pair)
        if not (ints or strs):
            raise TypeError(f"hidden_states pair {pair!r} must be two ints (indices into outputs.hidden_states) "
                            "or two module names (str)")
        out.append((a, b))
    return tuple(out)


@dataclass(eq=False)
class DistillConfig(Config):
    """What :class:`Distiller` optimises (see the module docs for the loss).

    Fields: ``temperature`` (> 0), ``kl_weight``, ``ce_weight``, ``hidden_weight`` (>= 0, not all
    0), ``hidden_loss`` (``mse`` | ``cosine``), ``hidden_states`` (``(student, teacher)`` pairs: ints
    index ``outputs.hidden_states``, strings name modules; used when ``hidden_weight > 0``), ``lr``
    and ``weight_decay`` (of the default AdamW), ``max_grad_norm`` (clip the gradients' total norm;
    ``None``: no clipping), ``seed`` (the projections' initialisation and the student's dropout).

    Example:
        >>> import gradprune as gp
        >>> gp.DistillConfig(temperature=2.0, hidden_weight=0.5).hidden_states
        ((-1, -1),)
        >>> gp.DistillConfig(temperature=0)
        Traceback (most recent call last):
        ...
        ValueError: temperature must be in (0.0, inf], got 0.0
    """

    temperature: float = 1.0
    kl_weight: float = 1.0
    ce_weight: float = 0.0
    hidden_weight: float = 0.0
    hidden_loss: str = "mse"
    hidden_states: tuple = ((-1, -1),)
    lr: float = 1e-4
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    seed: int = 0

    _validate_temperature = staticmethod(lambda v: check_float("temperature", v, low=0.0, low_open=True))
    _validate_kl_weight = staticmethod(lambda v: check_float("kl_weight", v, low=0.0))
    _validate_ce_weight = staticmethod(lambda v: check_float("ce_weight", v, low=0.0))
    _validate_hidden_weight = staticmethod(lambda v: check_float("hidden_weight", v, low=0.0))
    _validate_hidden_loss = staticmethod(lambda v: check_choice("hidden_loss", v, HIDDEN_LOSSES))
    _validate_hidden_states = staticmethod(_check_pairs)
    _validate_lr = staticmethod(lambda v: check_float("lr", v, low=0.0, low_open=True))
    _validate_weight_decay = staticmethod(lambda v: check_float("weight_decay", v, low=0.0))
    _validate_max_grad_norm = staticmethod(
        lambda v: check_float("max_grad_norm", v, low=0.0, low_open=True, allow_none=True))
    _validate_seed = staticmethod(lambda v: check_int("seed", v, min_value=0))

    def _check(self) -> None:
        if self.kl_weight == 0 and self.ce_weight == 0 and self.hidden_weight == 0:
            raise ValueError("DistillConfig: kl_weight, ce_weight and hidden_weight are all 0; "
                             "at least one loss term must have a positive weight")


# -- loss terms -------------------------------------------------------------------------------------
def _masked_mean(per_position: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None or mask.shape != per_position.shape:
        return per_position.mean()
    m = mask.to(per_position.device, per_position.dtype)
    return (per_position * m).sum() / m.sum().clamp_min(1.0)


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """``T² · mean KL(softmax(teacher/T) ‖ softmax(student/T))`` over positions (all dimensions but
    the last), counting only positions where ``mask`` (shaped like the positions) is true; in float32.

    Example:
        >>> import math, torch
        >>> s, t = torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]])
        >>> p = [math.exp(0.5) / (1 + math.exp(0.5)), 1 / (1 + math.exp(0.5))]   # teacher at T=2
        >>> q = p[::-1]                                                          # student at T=2
        >>> hand = 4 * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
        >>> abs(float(kl_loss(s, t, temperature=2.0)) - hand) < 1e-6
        True
    """
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(f"student and teacher logits must have the same vocabulary size, got "
                         f"{student_logits.shape[-1]} and {teacher_logits.shape[-1]}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape")
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float().to(s.device) / temperature, dim=-1)
    per_position = (t.exp() * (t - s)).sum(-1)
    return temperature ** 2 * _masked_mean(per_position, mask)


def _hidden_term(hs: torch.Tensor, ht: torch.Tensor, proj: nn.Module | None, kind: str,
                 mask: torch.Tensor | None) -> torch.Tensor:
    hs = hs.float()
    if proj is not None:
        hs = proj(hs)
    ht = ht.float().to(hs.device)
    if hs.shape != ht.shape:
        raise ValueError(f"student hidden state {tuple(hs.shape)} and teacher hidden state {tuple(ht.shape)} "
                         "must have the same shape (after the projection)")
    per = ((hs - ht) ** 2).mean(-1) if kind == "mse" else 1.0 - F.cosine_similarity(hs, ht, dim=-1)
    return _masked_mean(per, mask)


def _ce_term(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    labels = labels.to(logits.device)
    if logits.dim() == 3:  # causal LM: position t predicts token t + 1
        logits, labels = logits[:, :-1], labels[:, 1:]
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels of shape {tuple(labels.shape)} do not fit logits of shape {tuple(logits.shape)}")
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1).long(),
                           ignore_index=IGNORE_INDEX)


# -- batches and outputs ----------------------------------------------------------------------------
def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(v, device) for v in obj)
    return obj


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _split_batch(batch) -> tuple[tuple, dict, Any, Any]:
    """``(args, kwargs, labels, token_mask)`` of a batch."""
    if isinstance(batch, Mapping):
        kwargs = {k: v for k, v in batch.items() if k != "labels"}
        mask = batch.get("attention_mask")
        labels = batch.get("labels")
        ids = batch.get("input_ids")
        if labels is None and isinstance(ids, torch.Tensor):
            labels = ids if mask is None else ids.masked_fill(mask == 0, IGNORE_INDEX)
        return (), kwargs, labels, mask
    if isinstance(batch, torch.Tensor):
        return (batch,), {}, (None if batch.is_floating_point() else batch), None
    if isinstance(batch, (tuple, list)) and batch:
        x = batch[0]
        labels = batch[1] if len(batch) > 1 else (x if isinstance(x, torch.Tensor) and not x.is_floating_point()
                                                  else None)
        return (x,), {}, labels, None
    raise TypeError(f"a batch must be a tensor, an (inputs, labels) pair or a dict of tensors, "
                    f"got {type(batch).__name__}")


def _logits(out, who: str) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, Mapping):
        logits = out.get("logits")
    if logits is None and isinstance(out, (tuple, list)) and out:
        logits = out[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"the {who}'s output must be logits or have .logits, got {type(out).__name__}")
    return logits


def _first_tensor(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@contextmanager
def _capture(model: nn.Module, names: list[str]):
    """Record the outputs of the named modules during the forward passes inside the block."""
    got: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    hooks = [modules[n].register_forward_hook(lambda m, i, o, n=n: got.__setitem__(n, _first_tensor(o)))
             for n in names]
    try:
        yield got
    finally:
        for h in hooks:
            h.remove()


def _module_width(model: nn.Module, name: str, who: str) -> int:
    modules = dict(model.named_modules())
    if name not in modules:
        raise ValueError(f"hidden_states names module {name!r}, which the {who} does not have")
    m = modules[name]
    for attr in ("out_features", "embedding_dim", "hidden_size", "num_features"):
        v = getattr(m, attr, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    shape = getattr(m, "normalized_shape", None)
    if shape:
        return int(shape[-1])
    w = getattr(m, "weight", None)
    if isinstance(w, torch.Tensor) and w.dim() == 1:
        return int(w.shape[0])
    raise ValueError(f"cannot tell the output width of the {who}'s module {name!r} ({type(m).__name__}); "
                     "name a Linear, Embedding or norm module in hidden_states")


def _hf_width(model: nn.Module, index: int, who: str) -> int:
    cfg = getattr(model, "config", None)
    width = getattr(cfg, "hidden_size", None)
    if not isinstance(width, int):
        raise ValueError(f"hidden_states index pairs need Hugging Face models (config.hidden_size); the {who} "
                         f"({type(model).__name__}) has none: name modules instead, e.g. [('norm', 'norm')]")
    layers = getattr(cfg, "num_hidden_layers", None)
    if isinstance(layers, int) and not -(layers + 1) <= index <= layers:
        raise ValueError(f"hidden_states index {index} is out of range for the {who}, whose outputs.hidden_states "
                         f"has {layers + 1} entries")
    return width


def _vocab(model: nn.Module) -> int | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    w = getattr(head, "weight", None)
    if isinstance(w, torch.Tensor) and w.dim() == 2:
        return int(w.shape[0])
    v = getattr(getattr(model, "config", None), "vocab_size", None)
    return v if isinstance(v, int) else None


def check_teacher(student: Any, teacher: Any) -> None:
    """Refuse a teacher that is not a module, is the student, or shares a parameter with it, and
    models whose vocabularies (output sizes, where known) differ."""
    if not isinstance(student, nn.Module):
        raise TypeError(f"student must be a torch.nn.Module, got {type(student).__name__}")
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be a torch.nn.Module, got {type(teacher).__name__}")
    if teacher is student:
        raise ValueError("teacher must not be the student itself: distil into a pruned copy "
                         "(e.g. small = found.export()) and pass the original model as teacher")
    mine = {id(p): n for n, p in student.named_parameters()}
    shared = [n for n, p in teacher.named_parameters() if id(p) in mine]
    if shared:
        raise ValueError(f"teacher shares parameters with the student ({shared[:3]}); training the student "
                         "would change the teacher: distil into a copy")
    vs, vt = _vocab(student), _vocab(teacher)
    if vs is not None and vt is not None and vs != vt:
        raise ValueError(f"student and teacher vocabulary sizes differ: student vocab_size={vs}, "
                         f"teacher vocab_size={vt}; the logit KL needs the same vocabulary")


class DistillLoss(nn.Module):
    """The loss of :class:`DistillConfig` for one batch, and the projections it trains (shared by
    :class:`Distiller` and the Hugging Face ``DistillTrainer``)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, config: DistillConfig):
        super().__init__()
        self.config = config
        pairs = config.hidden_states if config.hidden_weight > 0 else ()
        self.pairs = pairs
        self.by_name = bool(pairs) and isinstance(pairs[0][0], str)
        widths = []
        for s, t in pairs:
            width = _module_width if isinstance(s, str) else _hf_width
            widths.append((width(student, s, "student"), width(teacher, t, "teacher")))
        if any(isinstance(p[0], str) != self.by_name for p in pairs):
            raise ValueError("hidden_states pairs must all be ints or all be module names, got "
                             f"{list(pairs)!r}")
        self.widths = widths
        with torch.random.fork_rng(devices=[]):  # seeded, and the caller's random state is left alone
            torch.random.default_generator.manual_seed(config.seed)
            self.projections = nn.ModuleDict({
                str(i): nn.Linear(ws, wt, bias=False) for i, (ws, wt) in enumerate(widths) if ws != wt})

    def _run(self, model, args, kwargs, names):
        if self.pairs and not self.by_name:
            kwargs = {**kwargs, "output_hidden_states": True}
        with _capture(model, names if self.by_name else []) as got:
            out = model(*args, **kwargs)
        if not self.pairs:
            return out, []
        if self.by_name:
            return out, [got[n] for n in names]
        hidden = getattr(out, "hidden_states", None)
        if hidden is None:
            raise ValueError(f"{type(model).__name__} returned no hidden_states; name modules in hidden_states")
        return out, [hidden[i] for i in names]

    def forward(self, student: nn.Module, teacher: nn.Module, batch) -> tuple[torch.Tensor, dict, Any]:
        """``(loss, {"loss", "kl", "hidden", "ce": float}, student output)``."""
        cfg = self.config
        args, kwargs, labels, mask = _split_batch(batch)
        t_dev, s_dev = _device(teacher), _device(student)
        s_names = [p[0] for p in self.pairs]
        t_names = [p[1] for p in self.pairs]
        with torch.no_grad():
            t_out, t_hidden = self._run(teacher, _to(args, t_dev), _to(kwargs, t_dev), t_names)
            t_logits = _logits(t_out, "teacher").to(s_dev)
            t_hidden = [h.to(s_dev) for h in t_hidden]
        s_out, s_hidden = self._run(student, _to(args, s_dev), _to(kwargs, s_dev), s_names)
        s_logits = _logits(s_out, "student")
        if s_logits.shape[-1] != t_logits.shape[-1]:
            raise ValueError(f"student and teacher logits must have the same vocabulary size, got "
                             f"{s_logits.shape[-1]} (student) and {t_logits.shape[-1]} (teacher)")
        mask = mask.to(s_dev) if isinstance(mask, torch.Tensor) else None
        loss = s_logits.new_zeros((), dtype=torch.float32)
        parts = {}
        if cfg.kl_weight > 0:
            kl = kl_loss(s_logits, t_logits, cfg.temperature, mask)
            loss = loss + cfg.kl_weight * kl
            parts["kl"] = kl
        if self.pairs:
            terms = [_hidden_term(hs, ht, self.projections[str(i)] if str(i) in self.projections else None,
                                  cfg.hidden_loss, mask)
                     for i, (hs, ht) in enumerate(zip(s_hidden, t_hidden))]
            hidden = torch.stack(terms).mean()
            loss = loss + cfg.hidden_weight * hidden
            parts["hidden"] = hidden
        if cfg.ce_weight > 0:
            if not isinstance(labels, torch.Tensor):
                raise ValueError("ce_weight > 0 needs labels: a dict batch with 'labels' or 'input_ids', "
                                 "an (inputs, labels) pair, or a tensor of token ids")
            ce = _ce_term(s_logits, labels)
            loss = loss + cfg.ce_weight * ce
            parts["ce"] = ce
        parts = {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in parts.items()}}
        return loss, parts, s_out


# -- the loop -------------------------------------------------------------------------------------
class Distiller:
    """Distil ``teacher`` into ``student`` (trained in place), step by step, resumably.

    Args:
        student: the model to train (e.g. a pruned export).
        teacher: the reference model; eval mode, no grad, never updated; it runs on its own device.
        config: a :class:`DistillConfig` (keyword ``fields`` override or build it).
        masks: a :class:`~gradprune.MaskSet` of the student: its pruned weights stay exactly 0 after
            every step (gradients and optimizer state are masked too).
        optimizer: an optimizer over the student's parameters (default: AdamW with ``config.lr`` and
            ``config.weight_decay`` over every parameter that requires grad); the hidden-state
            projections, if any, are added to it as one more parameter group.

    ``step`` counts optimizer steps, ``batches`` the batches used, ``history`` holds each step's
    losses. :meth:`state_dict` holds the config, the counters, the optimizer's state, the random
    state, the projections and the history; the student's weights are saved by the caller
    (``student.state_dict()``), as with :class:`~gradprune.Pruner`.

    Example:
        >>> import copy, torch, torch.nn as nn
        >>> import gradprune as gp
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> teacher = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> student = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> data = [torch.randn(8, 4) for _ in range(3)]
        >>> d = gp.Distiller(student, teacher, lr=1e-2).run(data, steps=2)
        >>> ckpt = copy.deepcopy({"student": student.state_dict(), "distill": d.state_dict()})
        >>> _ = d.run(data, steps=5)                                  # the uninterrupted run
        >>> again = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> _ = again.load_state_dict(ckpt["student"])
        >>> resumed = gp.Distiller(again, teacher, lr=1e-2)
        >>> resumed.load_state_dict(ckpt["distill"])
        >>> _ = resumed.run(data, steps=5)                            # skips the 2 batches it used
        >>> all(torch.equal(a, b) for a, b in zip(again.parameters(), student.parameters()))
        True
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, config: DistillConfig | None = None, *,
                 masks: MaskSet | None = None, optimizer: torch.optim.Optimizer | None = None, **fields):
        check_teacher(student, teacher)
        config = make_distill_config(config, fields)
        if masks is not None:
            if not isinstance(masks, MaskSet):
                raise TypeError(f"masks must be a gradprune.MaskSet, got {type(masks).__name__}")
            if masks.model is not student:
                raise ValueError("masks must be a MaskSet of the student (MaskSet(student, ...)), "
                                 f"got one of a {type(masks.model).__name__}")
        if optimizer is not None:
            if not isinstance(optimizer, torch.optim.Optimizer):
                raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
            teacher_ids = {id(p) for p in teacher.parameters()}
            if any(id(p) in teacher_ids for g in optimizer.param_groups for p in g["params"]):
                raise ValueError("optimizer holds teacher parameters; the teacher is never updated: "
                                 "give an optimizer over the student's parameters")
        loss = DistillLoss(student, teacher, config)  # validates hidden_states against both models
        # everything is validated: build the state
        self.student, self.teacher, self.config, self.masks = student, teacher, config, masks
        self.loss = loss
        self._rng_devices = [d.index if d.index is not None else torch.cuda.current_device()
                             for d in {_device(student)} if d.type == "cuda"]
        with self._fork_rng():
            torch.random.default_generator.manual_seed(config.seed)
            for d in self._rng_devices:
                with torch.cuda.device(d):
                    torch.cuda.manual_seed(config.seed)
            self._rng = self._get_rng()
        loss.to(_device(student))
        proj_params = list(loss.projections.parameters())
        if optimizer is None:
            params = [p for p in student.parameters() if p.requires_grad] + proj_params
            optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        elif proj_params:
            optimizer.add_param_group({"params": proj_params})
        self.optimizer = optimizer
        self.step = 0
        self.batches = 0
        self.history: list[dict] = []
        if masks is not None:
            masks.apply(optimizer)

    # -- random state ------------------------------------------------------------------------------
    @contextmanager
    def _fork_rng(self):
        with torch.random.fork_rng(devices=self._rng_devices):
            yield

    def _get_rng(self) -> dict:
        return {"cpu": torch.get_rng_state(),
                "cuda": [torch.cuda.get_rng_state(d) for d in self._rng_devices]}

    def _set_rng(self, state: dict) -> None:
        torch.set_rng_state(state["cpu"])
        for d, s in zip(self._rng_devices, state["cuda"]):
            torch.cuda.set_rng_state(s, d)

    # -- training ----------------------------------------------------------------------------------
    def _params(self) -> list:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def train_step(self, batch) -> dict:
        """One optimizer step on ``batch``; returns its losses (``loss``, ``kl``, ``hidden``, ``ce``).

        A batch that cannot be used (wrong vocabulary, no labels for ``ce_weight``) raises before
        anything changes."""
        with self._fork_rng(), preserve_modes(self.student), preserve_modes(self.teacher):
            self._set_rng(self._rng)
            self.student.train()
            self.teacher.eval()
            loss, parts, _ = self.loss(self.student, self.teacher, batch)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.masks is not None:
                self.masks.apply_to_grads()
            if self.config.max_grad_norm is not None:
                parts["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self._params(), self.config.max_grad_norm))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.masks is not None:
                self.masks.apply(self.optimizer)
            self._rng = self._get_rng()
        self.step += 1
        self.batches += 1
        parts["step"] = self.step
        self.history.append(parts)
        return parts

    def _batches(self, data):
        if isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
            if len(data) == 0:
                raise ValueError("data is empty")
            while True:
                yield data[self.batches % len(data)]
        if iter(data) is data:  # a one-shot iterator: it is the continuation, nothing is skipped
            for batch in data:
                yield batch
            raise ValueError(f"data ran out at step {self.step}; pass a re-iterable (a list, a DataLoader) "
                             "or enough batches")
        skip = self.batches
        while True:
            seen = 0
            for batch in data:
                seen += 1
                if skip > 0:
                    skip -= 1
                    continue
                yield batch
            if seen == 0:
                raise ValueError("data is empty")

    def run(self, data: Iterable, steps: int, *, show_progress: bool | None = None, log_every: int = 10):
        """Train until ``self.step == steps`` and return ``self``.

        ``data`` is cycled when it ends. A re-iterable ``data`` (a list, a ``DataLoader``) starts
        after the ``batches`` already used, so a resumed run sees the batches an uninterrupted run
        would; a one-shot iterator is taken as the continuation. ``show_progress``: a progress bar
        (default: when standard error is a terminal); ``log_every``: log the losses every that many
        steps (``logging`` at INFO, logger ``gradprune.distill``).
        """
        steps = _check_run(data, steps, show_progress, log_every)
        if steps <= self.step:
            return self
        batches = self._batches(data)
        with progress(total=steps, desc="distill", enable=show_progress) as bar:
            bar.update(self.step)
            while self.step < steps:
                parts = self.train_step(next(batches))
                bar.update(1)
                bar.set_postfix(loss=f"{parts['loss']:.4g}", refresh=False)
                if self.step % log_every == 0 or self.step == steps:
                    logger.info("distill step %d/%d: %s", self.step, steps,
                                ", ".join(f"{k} {v:.4g}" for k, v in parts.items() if k != "step"))
        return self

    # -- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Config, counters, optimizer state, random state, projections and history (tensors and
        plain values only: ``torch.save`` it and load it with ``torch.load(..., weights_only=True)``)."""
        return {"config": self.config.to_dict(), "step": self.step, "batches": self.batches,
                "optimizer": self.optimizer.state_dict(),
                "rng": {"cpu": self._rng["cpu"].clone(), "cuda": [s.clone() for s in self._rng["cuda"]]},
                "projections": {k: v.detach().clone() for k, v in self.loss.projections.state_dict().items()},
                "history": [dict(h) for h in self.history]}

    def load_state_dict(self, state: Mapping) -> None:
        """Resume from :meth:`state_dict` (into a new Distiller of the same config, whose student
        holds the saved student's weights). Everything is checked before anything changes: a config
        that differs (every field), counters, the random state, the projections' shapes and the
        optimizer state's layout and shapes; on failure the Distiller is left as it was."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a dict from Distiller.state_dict(), got {type(state).__name__}")
        missing = sorted({"config", "step", "batches", "optimizer", "rng", "projections"} - set(state))
        if missing:
            raise ValueError(f"distiller state is missing {missing}")
        saved = state["config"]
        if not isinstance(saved, Mapping):
            raise TypeError(f"distiller state 'config' must be a dict, got {type(saved).__name__}")
        try:
            saved_cfg = DistillConfig.from_dict(dict(saved)).to_dict()
        except (TypeError, ValueError) as e:
            raise ValueError(f"distiller state 'config' is not a valid DistillConfig: {e}") from e
        mine = self.config.to_dict()
        diff = [k for k in mine if saved_cfg[k] != mine[k]]
        if set(saved) != set(mine):
            diff += sorted(set(mine) - set(saved))
        if diff:
            raise ValueError("distiller state was saved with a different config: "
                             + ", ".join(f"{k}={saved_cfg[k]!r} (saved) vs {mine[k]!r} (now)" for k in diff))
        step = check_int("step", state["step"], min_value=0)
        batches = check_int("batches", state["batches"], min_value=0)
        rng = self._check_rng(state["rng"])
        projections = self._check_projections(state["projections"])
        self._check_optimizer(state["optimizer"])
        history = state.get("history", [])
        if not isinstance(history, list) or not all(isinstance(h, Mapping) for h in history):
            raise TypeError("distiller state 'history' must be a list of dicts")
        # everything validated: nothing below can fail
        self.optimizer.load_state_dict(state["optimizer"])
        with torch.no_grad():
            for k, v in self.loss.projections.state_dict().items():
                v.copy_(projections[k])
        self.step, self.batches, self._rng = step, batches, rng
        self.history = [dict(h) for h in history]
        if self.masks is not None:
            self.masks.apply(self.optimizer)

    def _check_rng(self, rng) -> dict:
        want = self._get_rng()
        if not isinstance(rng, Mapping) or set(rng) != {"cpu", "cuda"} or not isinstance(rng["cuda"], (list, tuple)) \
                or len(rng["cuda"]) != len(want["cuda"]):
            raise ValueError("distiller state 'rng' must be {'cpu': tensor, 'cuda': [one tensor per CUDA device "
                             f"of the student ({len(want['cuda'])})]}}")
        for got, ref in zip([rng["cpu"], *rng["cuda"]], [want["cpu"], *want["cuda"]]):
            if not isinstance(got, torch.Tensor) or got.dtype != torch.uint8 or got.shape != ref.shape:
                raise ValueError(f"distiller state 'rng' must hold torch.uint8 tensors of shape {tuple(ref.shape)}, "
                                 f"got {got.dtype if isinstance(got, torch.Tensor) else type(got).__name__}")
        return {"cpu": rng["cpu"].clone(), "cuda": [s.clone() for s in rng["cuda"]]}

    def _check_projections(self, saved) -> dict:
        mine = self.loss.projections.state_dict()
        if not isinstance(saved, Mapping) or set(saved) != set(mine):
            raise ValueError(f"distiller state 'projections' must have the entries {sorted(mine)}, got "
                             f"{sorted(saved) if isinstance(saved, Mapping) else type(saved).__name__}")
        for k, v in mine.items():
            if not isinstance(saved[k], torch.Tensor) or saved[k].shape != v.shape:
                raise ValueError(f"distiller state projection {k!r} must have shape {tuple(v.shape)}")
        return saved

    def _check_optimizer(self, saved) -> None:
        if not isinstance(saved, Mapping) or not isinstance(saved.get("param_groups"), list) \
                or not isinstance(saved.get("state"), Mapping):
            raise ValueError("distiller state 'optimizer' must be an optimizer state_dict()")
        groups = self.optimizer.param_groups
        if [len(g.get("params", ())) for g in saved["param_groups"]] != [len(g["params"]) for g in groups]:
            raise ValueError("distiller state 'optimizer' has parameter groups of sizes "
                             f"{[len(g.get('params', ())) for g in saved['param_groups']]}, this optimizer "
                             f"{[len(g['params']) for g in groups]}")
        for sg, g in zip(saved["param_groups"], groups):
            if set(sg) != set(g):
                raise ValueError(f"distiller state 'optimizer' is another optimizer's (group keys {sorted(sg)}, "
                                 f"this one has {sorted(g)})")
        params = {pid: p for sg, g in zip(saved["param_groups"], groups) for pid, p in zip(sg["params"], g["params"])}
        for pid, entry in saved["state"].items():
            if pid not in params or not isinstance(entry, Mapping):
                raise ValueError(f"distiller state 'optimizer' has state for an unknown parameter {pid!r}")
            p = params[pid]
            for k, v in entry.items():
                if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape != p.shape:
                    raise ValueError(f"distiller state 'optimizer' entry {k!r} of parameter {pid} has shape "
                                     f"{tuple(v.shape)}, the parameter {tuple(p.shape)}")


def _check_run(data, steps, show_progress, log_every) -> int:
    """Check the arguments of a run; returns ``steps``."""
    steps = check_int("steps", steps, min_value=1)
    check_optional_bool("show_progress", show_progress)
    check_int("log_every", log_every, min_value=1)
    try:
        iter(data)
    except TypeError:
        raise TypeError(f"data must be an iterable of batches, got {type(data).__name__}") from None
    return steps


def make_distill_config(config: DistillConfig | None, fields: Mapping[str, Any]) -> DistillConfig:
    """A validated :class:`DistillConfig` from an optional base config and keyword fields."""
    if config is not None and not isinstance(config, DistillConfig):
        raise TypeError(f"config must be a DistillConfig, got {type(config).__name__}")
    valid = DistillConfig.field_names()
    unknown = sorted(k for k in fields if k not in valid)
    if unknown:
        raise ValueError(f"unknown distill option(s) {', '.join(map(repr, unknown))}; valid: {', '.join(valid)}")
    if config is None:
        return DistillConfig(**fields)
    return config.replace(**fields) if fields else config


def distill(student: nn.Module, teacher: nn.Module, data: Iterable, steps: int,
            config: DistillConfig | None = None, *, masks: MaskSet | None = None,
            optimizer: torch.optim.Optimizer | None = None, state: Mapping | None = None,
            show_progress: bool | None = None, log_every: int = 10, **fields) -> Distiller:
    """Distil ``teacher`` into ``student`` for ``steps`` optimizer steps; returns the
    :class:`Distiller` (``.history``, ``.state_dict()``). The student is trained in place.

    ``fields`` are :class:`DistillConfig` fields (``temperature``, ``kl_weight``, ``hidden_weight``,
    ``hidden_loss``, ``hidden_states``, ``ce_weight``, ``lr``, ``weight_decay``, ``max_grad_norm``,
    ``seed``); ``masks`` keeps the student's pruned weights at zero; ``state`` (a
    :meth:`Distiller.state_dict`) resumes a stopped run, ``steps`` then being the total. Every
    argument is checked before any work.

    Example:
        >>> import torch, torch.nn as nn
        >>> import gradprune as gp
        >>> teacher, student = nn.Linear(6, 4), nn.Linear(6, 4)
        >>> masks = gp.MaskSet(student, names=["weight"])
        >>> masks["weight"] = torch.rand(4, 6) > 0.5
        >>> data = [torch.randn(8, 6) for _ in range(2)]
        >>> run = gp.distill(student, teacher=teacher, data=data, steps=3, masks=masks, lr=1e-2)
        >>> bool((student.weight[~masks["weight"]] == 0).all())
        True
        >>> gp.distill(student, teacher=student, data=data, steps=3)
        Traceback (most recent call last):
        ...
        ValueError: teacher must not be the student itself: distil into a pruned copy (e.g. small = found.export()) and pass the original model as teacher
    """
    steps = _check_run(data, steps, show_progress, log_every)
    if state is not None and not isinstance(state, Mapping):
        raise TypeError(f"state must be a dict from Distiller.state_dict(), got {type(state).__name__}")
    d = Distiller(student, teacher, config, masks=masks, optimizer=optimizer, **fields)
    if state is not None:
        d.load_state_dict(state)
    return d.run(data, steps, show_progress=show_progress, log_every=log_every)
