"""MoE expert pruning: whole experts per layer as units (the ``"experts"`` axis of :func:`~gradprune.structured.search`).

**Recognition.** A mixture-of-experts block is recognised by structure, through one registry of
layouts (:data:`MOE_SPECS`, :func:`register_moe`; data, not class names): a module with a
*router* child (default ``gate``) holding a 2-D ``weight`` of ``[num_experts, hidden]`` and an
integer ``top_k``, and an *experts* child (default ``experts``) whose parameters are the experts'
weights stacked on dim 0 (``gate_up_proj [E, 2 * I, H]``, ``down_proj [E, H, I]``: the
transformers 5.x layout of Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE). The router must return
``(logits, weights, indices)`` computed as softmax -> top-k (-> renormalised when the router's
``norm_topk_prob`` is true or absent, as Mixtral's); this is checked on ``example_input`` before
scoring, and a block whose router does something else (sigmoid routing, grouped top-k, a
correction bias) is left unpruned and listed in ``skipped`` with the reason. Other modules of the
block (Qwen2-MoE's ``shared_expert`` and ``shared_expert_gate``) are untouched.

**Removing experts, and the gated model.** Removing expert ``e`` of a layer deletes row ``e`` of
the router weight (and of any router parameter or buffer with one entry per expert) and slice
``e`` of every stacked expert parameter. The router then takes its softmax over the *remaining*
experts, which changes the routing weights of every token (not only of those routed to ``e``).
The **gated model** that the pruned model equals is therefore defined on the router: the removed
experts' logits are set to ``-inf`` before the softmax and the top-k (``softmax(logits masked) ==
softmax(logits of the kept experts)``), and ``top_k`` becomes ``min(top_k, experts kept)``.
:meth:`ExpertSearchResult.gates` runs the model so; the exported model's outputs equal it (up to
float rounding). Zeroing a removed expert's output instead would not be the same model: the
top-k would still pick it and the other weights would keep the old normalisation. (The router
logits the gated model returns, which only transformers' auxiliary load-balancing loss reads with
``output_router_logits=True``, are left unmasked.)

**Scores** (higher = more important; the model in eval mode, its weights with
``requires_grad=False``, both restored after):

- ``"gradnas"``: a gate ``g_e = 1`` multiplies expert ``e``'s routed output (its routing weight
  becomes ``w_te * g_e``), and the score is the mean over batches of ``(dL/dg_e)^2``, where
  ``dL/dg_e = sum_t w_te <dL/dy_t, E_e(x_t)>`` over the tokens routed to ``e`` (router-weighted
  gate gradient);
- ``"reap"``: the mean over the tokens routed to ``e`` (over all batches) of
  ``w_te * ||E_e(x_t)||_2``, the router weight times the norm of the expert's output (REAP's
  router-weighted expert activation); an expert never routed to scores 0;
- ``"frequency"``: the fraction of tokens whose top-k includes ``e``.

Every token of every batch counts (padding included), like the loss ``loss_fn`` computes on it.

**Intermediate neurons.** The ``"mlp"`` axis of the width search also prunes the experts'
intermediate neurons (:class:`ExpertNeurons`, added to the Hugging Face analysis by
:func:`~gradprune.structured.hf.register_block_builder`): every expert of a layer keeps the same
number of its own best neurons, a multiple of ``16 / element size`` (grouped-matmul strides).

**Budget and export.** ``{"params": N or "NN%", "flops": N or "NN%"}`` are met exactly:
params are the dense count minus the removed experts' slices and router rows; FLOPs are measured
once on ``example_input``, a block's router FLOPs scale with the experts kept and its experts'
FLOPs with ``min(top_k, kept) / top_k`` (every token runs exactly that many experts). ``uniform=True`` removes the same number of experts from every
MoE layer (each layer its lowest-scored ones) and writes ``num_local_experts`` / ``num_experts``
and ``num_experts_per_tok`` to the config, so plain ``from_pretrained`` reloads the export.
Otherwise the lowest-scored experts over all layers go first (at least one per layer stays),
the per-layer counts are recorded in ``config.gradprune_widths`` and the model reloads with
:func:`~gradprune.structured.load_pruned_pretrained`; the report says which of the two applies.
(Per-layer counts and ``output_router_logits=True`` do not mix: transformers' auxiliary loss
concatenates the router logits of every layer.)

Example:
    >>> import torch
    >>> import gradprune as gp
    >>> from transformers import MixtralConfig, MixtralForCausalLM
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = MixtralForCausalLM(MixtralConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
    ...     num_experts_per_tok=2))
    >>> ids = torch.randint(0, 32, (2, 8))
    >>> loss_fn = lambda m, b: m(b, labels=b).loss
    >>> found = gp.search(model, {"params": "80%"}, [ids], loss_fn, method="gradnas",
    ...                   example_input=ids, axes=("experts",), uniform=True)
    >>> small = found.export()
    >>> small.config.num_local_experts, small.config.num_experts_per_tok
    (3, 2)
    >>> sum(p.numel() for p in small.parameters()) == found.params <= 0.8 * found.dense_params
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_bool, check_choice
from .._modes import preserve_modes
from .._report import Report
from .depth import _loss, _weight_sharing_copy, check_axis_inputs, check_score_args, scoring_batches
from .groups import _as_args
from .hf import register_block_builder
from .measured import latency_extra, latency_lines

__all__ = ["EXPERT_METHODS", "MOE_SPECS", "MoESpec", "MoEBlock", "ExpertNeurons", "register_moe",
           "find_moe_blocks", "moe_attrs",
           "ExpertGates", "expert_scores", "ExpertReport", "ExpertSearchResult", "search_experts",
           "drop_experts"]

EXPERT_METHODS = ("gradnas", "reap", "frequency")
EXPERT_CONSTRAINTS = ("params", "flops")


@dataclass(frozen=True)
class MoESpec:
    """How to read one MoE block layout (data only; see the module docstring).

    ``router`` / ``experts``: child names of the router and of the stacked experts; ``counts``:
    attributes of either that hold the expert count (updated on export); ``top_k``: the router's
    top-k attribute; ``normalise``: the router's attribute saying whether the top-k weights are
    renormalised to sum to 1 (``normalise_default`` when absent: Mixtral always renormalises);
    ``config_counts``: config fields of the expert count (the one present is written);
    ``config_top_k``: the config field of top-k; ``model_attrs``: attributes of the model
    (transformers' ``*ForCausalLM`` keeps ``num_experts`` and ``num_experts_per_tok`` for its
    auxiliary loss) updated with the config. The experts' intermediate neurons (the ``"mlp"``
    axis): ``gate_up`` ``[E, 2 * I, H]`` (gate rows, then up rows), ``down`` ``[E, H, I]``,
    the experts' width attribute ``inter`` and its config fields ``config_inter`` (the first one
    equal to ``I`` is written under uniform widths)."""

    name: str
    router: str = "gate"
    experts: str = "experts"
    counts: tuple = ("num_experts",)
    top_k: str = "top_k"
    normalise: str | None = "norm_topk_prob"
    normalise_default: bool = True
    config_counts: tuple = ("num_local_experts", "num_experts")
    config_top_k: str = "num_experts_per_tok"
    model_attrs: tuple = (("num_experts", "count"), ("num_experts_per_tok", "top_k"))
    gate_up: str = "gate_up_proj"
    down: str = "down_proj"
    inter: str = "intermediate_dim"
    config_inter: tuple = ("moe_intermediate_size", "intermediate_size")


MOE_SPECS: list = []


def register_moe(spec: MoESpec) -> MoESpec:
    """Add an MoE block layout to the registry (tried in registration order).

    Example: a block whose router is ``router`` and whose experts are ``moe``::

        register_moe(MoESpec("mine", router="router", experts="moe"))
    """
    if not isinstance(spec, MoESpec):
        raise TypeError(f"spec must be a MoESpec, got {type(spec).__name__}")
    MOE_SPECS.append(spec)
    return spec


# Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE (transformers 5.x): ``gate`` router + stacked ``experts``
register_moe(MoESpec("topk_router"))


@dataclass
class MoEBlock:
    """One recognised MoE block: its module name, the router's and the experts' qualified
    names, the expert count, top-k and whether top-k weights are renormalised."""

    name: str
    spec: MoESpec
    router: str
    experts: str
    n_experts: int
    top_k: int
    normalise: bool


def _join(a: str, b: str) -> str:
    return f"{a}.{b}" if a else b


def _stacked(mod: nn.Module, n: int) -> list:
    """``(name, tensor)`` of ``mod``'s own parameters and buffers with ``n`` entries on dim 0."""
    items = list(mod.named_parameters(recurse=True)) + list(mod.named_buffers(recurse=True))
    return [(k, t) for k, t in items if t.dim() >= 1 and t.shape[0] == n]


def find_moe_blocks(model: nn.Module) -> tuple:
    """``(blocks, skipped)``: the recognised MoE blocks (:class:`MoEBlock`, in module order) and
    ``{"module", "reason"}`` for blocks that look like MoE but are not understood.

    Example:
        >>> from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
        >>> m = Qwen3MoeForCausalLM(Qwen3MoeConfig(vocab_size=8, hidden_size=8, intermediate_size=8,
        ...     moe_intermediate_size=4, num_hidden_layers=2, num_attention_heads=2,
        ...     num_key_value_heads=1, num_experts=4, num_experts_per_tok=2))
        >>> [(b.name, b.n_experts, b.top_k) for b in find_moe_blocks(m)[0]]
        [('model.layers.0.mlp', 4, 2), ('model.layers.1.mlp', 4, 2)]
    """
    blocks, skipped = [], []
    for name, mod in model.named_modules():
        for spec in MOE_SPECS:
            router, experts = getattr(mod, spec.router, None), getattr(mod, spec.experts, None)
            if not isinstance(router, nn.Module) or not isinstance(experts, nn.Module):
                continue
            w = getattr(router, "weight", None)
            if not isinstance(w, torch.Tensor) or w.dim() != 2:
                continue
            n = int(w.shape[0])
            if isinstance(experts, nn.ModuleList):
                skipped.append({"module": name, "reason": f"MoE block ({type(mod).__name__}): experts "
                                "stored as a ModuleList (the transformers 4.x layout) are not pruned"})
                break
            own = list(experts.parameters())
            stacked = all(p.dim() >= 2 and p.shape[0] == n for p in own)
            k = getattr(router, spec.top_k, None)
            if not own or not stacked or not isinstance(k, int) or isinstance(k, bool):
                skipped.append({"module": name, "reason": f"MoE block ({type(mod).__name__}): the "
                                f"experts' parameters are not stacked [{n}, ...] on dim 0 or the "
                                f"router has no integer {spec.top_k!r}; experts not pruned"})
                break
            norm = getattr(router, spec.normalise, spec.normalise_default) if spec.normalise else \
                spec.normalise_default
            blocks.append(MoEBlock(name, spec, _join(name, spec.router), _join(name, spec.experts),
                                   n, k, bool(norm)))
            break
    return blocks, skipped


def moe_attrs(mod: nn.Module) -> dict | None:
    """The expert-count and top-k attributes of a router or experts module of a registered
    layout (an integer count attribute and an own parameter with that many entries on dim 0),
    for :func:`~gradprune.structured.save_pruned`'s width record; ``None``: not one."""
    for spec in MOE_SPECS:
        n = next((getattr(mod, a) for a in spec.counts if isinstance(getattr(mod, a, None), int)), None)
        if n is None or isinstance(n, bool):
            continue
        if any(p.dim() >= 1 and p.shape[0] == n for p in mod.parameters(recurse=False)):
            return {a: getattr(mod, a) for a in spec.counts + (spec.top_k, spec.inter)
                    if isinstance(getattr(mod, a, None), int) and not isinstance(getattr(mod, a), bool)}
    return None


class _DownSwap:
    """Swaps an experts module's ``down`` parameter for a gated copy during a forward (the
    gate scales column ``i`` of expert ``e``, a multiplier on neuron ``(e, i)``'s output);
    ``remove()`` (called by :class:`~gradprune.structured.Gates` on exit) restores it."""

    def __init__(self, mod: nn.Module, name: str):
        self.mod, self.name, self.saved = mod, name, None

    def apply(self, gate: torch.Tensor) -> None:
        self.restore()
        w = self.mod._parameters[self.name]
        del self.mod._parameters[self.name]
        self.saved = w
        self.mod.__dict__[self.name] = w * gate[:, None, :].to(device=w.device, dtype=w.dtype)

    def restore(self) -> None:
        if self.saved is not None:
            self.mod.__dict__.pop(self.name, None)
            self.mod._parameters[self.name] = self.saved
            self.saved = None

    remove = restore


class ExpertNeurons:
    """The intermediate neurons of the stacked experts of one MoE block as one group of
    ``E * I`` units in ``E`` balanced chunks (every expert keeps the same number, its own best;
    unit ``e * I + i`` is neuron ``i`` of expert ``e``). A handler of the width search: gated by
    scaling the ``down`` columns during the forward (:class:`_DownSwap`), costed as ``3 * H``
    params and MACs per kept neuron and routed token, exported by slicing ``gate_up`` rows and
    ``down`` columns per expert."""

    unit = "channels"  # the "mlp" axis
    rule_type = "Linear"
    per_sample = False  # one gate for all tokens: no per-sample gradients

    def __init__(self, module: str, spec: MoESpec, n_experts: int, inter: int, hidden: int,
                 config_field: str | None):
        self.module, self.spec = module, spec
        self.n_experts, self.inter, self.hidden = n_experts, inter, hidden
        self.config_field = config_field

    def owners(self, modules: dict) -> list:
        return [(self.module, type(modules[self.module]))]

    def hooks(self, modules: dict, gates, gi: int) -> list:
        mod = modules[self.module]
        swap = _DownSwap(mod, self.spec.down)

        def pre(m, args):
            g = gates.head_gate(gi, None, args[0])  # [E * I], or a [1, E * I] gradient leaf
            swap.apply(g.reshape(self.n_experts, self.inter))

        def post(m, args, out):
            swap.restore()
        return [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post), swap]

    def recorder(self, modules: dict, calls: list) -> list:
        def hook(m, args, kwargs, out):  # the routed rows: tokens x top-k
            idx = args[1] if len(args) > 1 else kwargs.get("top_k_index")
            calls.append(int(idx.numel()) if isinstance(idx, torch.Tensor) else 0)
        return [modules[self.module].register_forward_hook(hook, with_kwargs=True)]

    def extra_cost(self, h: int, calls: list) -> tuple:
        per = h // self.n_experts
        return self.n_experts * per * 3 * self.hidden, sum(calls) * per * 3 * self.hidden

    def magnitude(self, modules: dict, norm: str) -> torch.Tensor:
        mod, n = modules[self.module], self.inter
        gu = getattr(mod, self.spec.gate_up).detach().double()
        d = getattr(mod, self.spec.down).detach().double()
        if norm == "l1":
            acc = gu[:, :n].abs().sum(-1) + gu[:, n:].abs().sum(-1) + d.abs().sum(1)
            return acc.reshape(-1)
        return (gu[:, :n].pow(2).sum(-1) + gu[:, n:].pow(2).sum(-1) + d.pow(2).sum(1)).sqrt().reshape(-1)

    def export(self, root: nn.Module, modules: dict, keep: torch.Tensor) -> None:
        from .hf import SHAPES_KEY, WIDTHS_KEY
        mod, n, e = modules[self.module], self.inter, self.n_experts
        keep = torch.as_tensor(keep, dtype=torch.long)
        per_expert = [keep[(keep // n) == i] % n for i in range(e)]
        per = len(per_expert[0])
        if any(len(k) != per for k in per_expert):
            raise ValueError(f"{self.module}: every expert must keep the same number of neurons, "
                             f"got {[len(k) for k in per_expert]}")
        gu, d = getattr(mod, self.spec.gate_up), getattr(mod, self.spec.down)
        rows = [torch.cat([k, k + n]).to(gu.device) for k in per_expert]
        new_gu = torch.stack([gu.detach()[i][rows[i]] for i in range(e)]).clone()
        new_d = torch.stack([d.detach()[i][:, per_expert[i].to(d.device)] for i in range(e)]).clone()
        setattr(mod, self.spec.gate_up, nn.Parameter(new_gu, requires_grad=gu.requires_grad))
        setattr(mod, self.spec.down, nn.Parameter(new_d, requires_grad=d.requires_grad))
        if isinstance(getattr(mod, self.spec.inter, None), int):
            setattr(mod, self.spec.inter, per)
        cfg = getattr(root, "config", None)
        if cfg is not None and hasattr(cfg, "to_dict"):
            widths = dict(getattr(cfg, WIDTHS_KEY, None) or {})
            entry = dict(widths.get(self.module, {}))
            entry[self.spec.inter] = per
            entry[SHAPES_KEY] = {**entry.get(SHAPES_KEY, {}), self.spec.gate_up: list(new_gu.shape),
                                 self.spec.down: list(new_d.shape)}
            widths[self.module] = entry
            setattr(cfg, WIDTHS_KEY, widths)

    def uniform_problem(self, config, w: int) -> str | None:
        if self.config_field is None:
            return (f"{type(config).__name__} has no field holding the experts' width "
                    f"{self.inter} (tried {', '.join(self.spec.config_inter)}); save per-layer "
                    "widths and load with load_pruned_pretrained")
        return None

    def config_fields(self, w: int) -> dict:
        return {self.config_field: w // self.n_experts}


def _expert_neurons(b) -> None:
    """Builder hook of :func:`~gradprune.structured.hf.analyse_hf`: a group of intermediate
    neurons per recognised MoE block whose experts have the registered layout; other MoE blocks
    are listed in ``skipped`` with the reason."""
    from .hf import _family
    blocks, skipped = find_moe_blocks(b.model)
    for s in skipped:
        b.skip(s["module"], s["reason"])
    config = getattr(b.model, "config", None)
    for blk in blocks:
        spec, mod = blk.spec, b.modules[blk.experts]
        gu, d = getattr(mod, spec.gate_up, None), getattr(mod, spec.down, None)
        own = dict(mod.named_parameters(recurse=False))
        ok = (isinstance(gu, torch.Tensor) and isinstance(d, torch.Tensor) and gu.dim() == 3
              and d.dim() == 3 and set(own) == {spec.gate_up, spec.down}
              and not getattr(mod, "is_transposed", False) and getattr(mod, "is_concatenated", True)
              and not getattr(mod, "has_bias", False) and getattr(mod, "has_gate", True))
        if ok:
            e, two_i, h = gu.shape
            n = two_i // 2
            ok = two_i == 2 * n and tuple(d.shape) == (e, h, n) and n > 1
        if not ok:
            b.skip(blk.experts, f"MoE experts ({type(mod).__name__}): their intermediate neurons "
                   f"are not pruned (not the [E, 2*I, H] {spec.gate_up} / [E, H, I] {spec.down} "
                   "layout); axes=('experts',) removes whole experts")
            continue
        # grouped matmuls need 16-byte strides: every expert keeps a multiple of q neurons,
        # an equal number from each of q contiguous slices of its neurons
        q = max(1, 16 // gu.element_size())
        if n % q:
            b.skip(blk.experts, f"MoE experts ({type(mod).__name__}): their {n} intermediate neurons "
                   f"are not pruned (not a multiple of {q}, which the grouped matmul's 16-byte "
                   "strides need); axes=('experts',) removes whole experts")
            continue
        field = next((f for f in spec.config_inter if getattr(config, f, None) == n), None)
        handler = ExpertNeurons(blk.experts, spec, e, n, h, field)
        b.group(blk.experts, e * n, [], [], [(blk.experts, type(mod))], handler, rule_type="Linear",
                kind=f"{_family(b, blk.name)}.experts_ffn")
        b.groups[-1].balance = e * q


register_block_builder(_expert_neurons)


def _route(logits: torch.Tensor, mask: torch.Tensor | None, top_k: int, normalise: bool,
           dtype: torch.dtype) -> tuple:
    """Softmax -> top-k (-> renormalised) routing over the experts where ``mask`` is true."""
    x = logits.float()
    if mask is not None:
        x = x.masked_fill(~mask.to(x.device), float("-inf"))
        top_k = min(top_k, int(mask.sum()))
    probs = F.softmax(x, dim=-1)
    weights, indices = torch.topk(probs, top_k, dim=-1)
    if normalise:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(dtype), indices


def _router_out(out) -> tuple | None:
    if isinstance(out, tuple) and len(out) >= 3 and all(isinstance(t, torch.Tensor) for t in out[:3]):
        return out
    return None


class ExpertGates:
    """Forward hooks on the routers of ``model``'s MoE ``blocks`` (a context manager that removes
    them on exit).

    - ``keep``: ``{block name: expert indices kept}``: the other experts' logits are ``-inf``
      before softmax and top-k, and top-k is ``min(top_k, kept)`` (the gated model the export
      equals; see the module docs);
    - ``values``: ``{block name: 1-D tensor, one gate per expert}`` (may require grad): each
      routed weight is multiplied by its expert's gate;
    - ``record(block, indices, weights)``: called with the routing the experts then get;
    - ``expert_record(block, hidden, indices, weights, experts module)``: called on the experts'
      input.

    Example:
        >>> import torch
        >>> from transformers import OlmoeConfig, OlmoeForCausalLM
        >>> m = OlmoeForCausalLM(OlmoeConfig(vocab_size=8, hidden_size=8, intermediate_size=8,
        ...     num_hidden_layers=1, num_attention_heads=2, num_experts=4, num_experts_per_tok=2,
        ...     pad_token_id=0, eos_token_id=1, bos_token_id=None)).eval()
        >>> blocks = find_moe_blocks(m)[0]
        >>> seen = []
        >>> with ExpertGates(m, blocks, keep={"model.layers.0.mlp": torch.tensor([1, 3])},
        ...                  record=lambda b, i, w: seen.append(i)), torch.no_grad():
        ...     _ = m(torch.tensor([[1, 2, 3]]))
        >>> sorted(set(seen[0].flatten().tolist())) <= [1, 3]
        True
    """

    def __init__(self, model: nn.Module, blocks: list, keep: dict | None = None,
                 values: dict | None = None, record: Callable | None = None,
                 expert_record: Callable | None = None):
        self.model, self.blocks, self.handles = model, list(blocks), []
        self.masks = {}
        for b in self.blocks:
            if keep is not None and b.name in keep and len(keep[b.name]) < b.n_experts:
                m = torch.zeros(b.n_experts, dtype=torch.bool)
                m[torch.as_tensor(keep[b.name], dtype=torch.long)] = True
                self.masks[b.name] = m
        self.values, self.record, self.expert_record = values or {}, record, expert_record

    def __enter__(self):
        modules = dict(self.model.named_modules())
        for b in self.blocks:
            self.handles.append(modules[b.router].register_forward_hook(self._router_hook(b)))
            if self.expert_record is not None:
                self.handles.append(modules[b.experts].register_forward_hook(
                    self._experts_hook(b), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []

    def _router_hook(self, b: MoEBlock):
        def hook(mod, args, output):
            out = _router_out(output)
            if out is None:
                raise ValueError(f"router {b.router!r} did not return (logits, weights, indices)")
            logits, weights, indices = out[:3]
            if b.name in self.masks:
                weights, indices = _route(logits, self.masks[b.name], b.top_k, b.normalise, weights.dtype)
            g = self.values.get(b.name)
            if g is not None:
                weights = weights * g.to(weights.device)[indices].to(weights.dtype)
            if self.record is not None:
                self.record(b.name, indices, weights)
            return (logits, weights, indices) + tuple(output[3:])
        return hook

    def _experts_hook(self, b: MoEBlock):
        def hook(mod, args, kwargs, output):
            names = ("hidden_states", "top_k_index", "top_k_weights")
            vals = list(args) + [kwargs[k] for k in names[len(args):] if k in kwargs]
            if len(vals) >= 3:
                self.expert_record(b.name, vals[0], vals[1], vals[2], mod)
        return hook


def expert_outputs(experts: nn.Module, hidden: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``[tokens, k, hidden]``: the output of expert ``indices[t, j]`` on token ``t`` (weight 1),
    computed by the experts module's own forward (any implementation), one call per slot."""
    ones = torch.ones(indices.shape[0], 1, dtype=hidden.dtype, device=hidden.device)
    return torch.stack([experts.forward(hidden, indices[:, j:j + 1], ones)
                        for j in range(indices.shape[1])], dim=1)


def _check_routing(model: nn.Module, blocks: list, example_input) -> tuple:
    """Run ``example_input`` and keep the blocks whose router output is reproduced by
    :func:`_route` (softmax -> top-k -> renormalise as the spec says); the rest are skipped."""
    bad: dict = {}
    modules = dict(model.named_modules())
    handles = []
    by_router = {b.router: b for b in blocks}

    def check(b):
        def hook(mod, args, output):
            out = _router_out(output)
            if out is None:
                bad[b.name] = "the router does not return (logits, weights, indices)"
                return
            logits, weights, indices = out[:3]
            if logits.shape[-1] != b.n_experts or indices.shape[-1] != b.top_k:
                bad[b.name] = (f"the router returns {logits.shape[-1]} logits and top-{indices.shape[-1]}, "
                               f"not {b.n_experts} and top-{b.top_k}")
                return
            w, i = _route(logits, None, b.top_k, b.normalise, weights.dtype)
            same = torch.equal(torch.sort(i, -1).values, torch.sort(indices, -1).values)
            close = same and torch.allclose(torch.sort(w.float(), -1).values,
                                            torch.sort(weights.float(), -1).values, rtol=1e-3, atol=1e-5)
            if not close:
                bad[b.name] = ("its routing is not softmax -> top-k"
                               + (" -> renormalised" if b.normalise else "")
                               + " of the router logits (e.g. sigmoid or grouped routing)")
        return hook

    for r, b in by_router.items():
        handles.append(modules[r].register_forward_hook(check(b)))
    try:
        with torch.no_grad(), preserve_modes(model):
            model.eval()
            model(*_as_args(example_input))
    finally:
        for h in handles:
            h.remove()
    keep = [b for b in blocks if b.name not in bad]
    skipped = [{"module": name, "reason": f"MoE block: experts not pruned ({why})"} for name, why in bad.items()]
    return keep, skipped


def expert_scores(model: nn.Module, blocks: list, data: Iterable, loss_fn: Callable,
                  method: str = "gradnas", max_batches: int = 128,
                  show_progress: bool | None = None) -> tuple:
    """Score every expert of every block (see the module docs); returns ``(scores, batches)``
    with ``scores = {block name: float64 tensor of one entry per expert}``, higher = more
    important. The model runs in eval mode with ``requires_grad=False`` weights (both restored).

    Example:
        >>> import torch
        >>> from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
        >>> m = Qwen3MoeForCausalLM(Qwen3MoeConfig(vocab_size=8, hidden_size=8, intermediate_size=8,
        ...     moe_intermediate_size=4, num_hidden_layers=1, num_attention_heads=2,
        ...     num_key_value_heads=1, num_experts=4, num_experts_per_tok=2))
        >>> ids = torch.randint(0, 8, (2, 5))
        >>> s, n = expert_scores(m, find_moe_blocks(m)[0], [ids], lambda m, b: m(b, labels=b).loss,
        ...                      "frequency")
        >>> float(s["model.layers.0.mlp"].sum())   # top-2 of 4: each token counts twice
        2.0
    """
    check_score_args(method, EXPERT_METHODS, max_batches, loss_fn)
    total = {b.name: torch.zeros(b.n_experts, dtype=torch.float64) for b in blocks}
    count = {b.name: torch.zeros(b.n_experts, dtype=torch.float64) for b in blocks}
    size = {b.name: b.n_experts for b in blocks}
    batches = 0
    p = next(model.parameters())

    def frequency(name, idx, w):
        total[name] += torch.bincount(idx.reshape(-1).cpu(), minlength=size[name]).double()
        count[name] += idx.shape[0]

    def reap(name, hidden, idx, w, experts):
        with torch.no_grad():
            norms = expert_outputs(experts, hidden, idx).double().norm(dim=-1)  # [tokens, k]
            contrib = (w.double() * norms).reshape(-1).cpu()
            flat = idx.reshape(-1).cpu()
            total[name].index_add_(0, flat, contrib)
            count[name].index_add_(0, flat, torch.ones_like(contrib))

    for batch in scoring_batches(model, data, max_batches, "expert scores", method, show_progress):
        batches += 1
        if method == "gradnas":
            values = {b.name: torch.ones(b.n_experts, device=p.device, requires_grad=True) for b in blocks}
            with ExpertGates(model, blocks, values=values):
                loss = _loss(loss_fn, model, batch)
                grads = torch.autograd.grad(loss, list(values.values()), allow_unused=True)
            for b, g in zip(blocks, grads):
                if g is not None:
                    total[b.name] += g.detach().double().cpu() ** 2
                count[b.name] += 1
        elif method == "frequency":
            with torch.no_grad(), ExpertGates(model, blocks, record=frequency):
                _loss(loss_fn, model, batch)
        else:
            with torch.no_grad(), ExpertGates(model, blocks, expert_record=reap):
                _loss(loss_fn, model, batch)
    return {k: total[k] / count[k].clamp_min(1) for k in total}, batches


class _ExpertCosts:
    """Exact params and FLOPs of the model with experts removed. Params: each block's expert
    costs its router row(s) plus its slice of every stacked expert parameter. FLOPs (measured
    once on ``example_input``): a block's router FLOPs scale with the experts kept, its experts'
    FLOPs with ``min(top_k, kept) / top_k`` (every token runs exactly that many experts)."""

    def __init__(self, model: nn.Module, blocks: list, example_input=None):
        modules = dict(model.named_modules())
        seen, self.dense_params = set(), 0
        for prm in model.parameters():
            if id(prm) not in seen:
                seen.add(id(prm))
                self.dense_params += prm.numel()
        self.per_expert = {}
        for b in blocks:
            n = b.n_experts
            tensors = {id(t): t for _, t in _stacked(modules[b.router], n) + _stacked(modules[b.experts], n)
                       if isinstance(t, nn.Parameter)}
            self.per_expert[b.name] = sum(t.numel() for t in tensors.values()) // n
        self.blocks = {b.name: b for b in blocks}
        self.dense_flops, self.block_flops = None, {}
        if example_input is not None:
            from .flops import flop_counter
            counter = flop_counter(model, example_input)
            self.dense_flops = int(counter.get_total_flops())
            per_module = counter.get_flop_counts()

            def flops_of(name):
                keys = [k for k in per_module if k == name or k.endswith("." + name)]
                return int(sum(per_module[keys[0]].values())) if keys else 0
            self.block_flops = {b.name: (flops_of(b.router), flops_of(b.experts)) for b in blocks}

    def params(self, removed: dict) -> int:
        return self.dense_params - sum(self.per_expert[k] * r for k, r in removed.items())

    def of(self, removed: dict) -> dict:
        """``{"params": ..., "flops": ...}`` with ``removed[block]`` experts fewer per block."""
        out = {"params": self.params(removed)}
        if self.dense_flops is not None:
            cut = 0.0
            for name, r in removed.items():
                b, (router, experts) = self.blocks[name], self.block_flops[name]
                cut += router * r / b.n_experts + experts * (b.top_k - min(b.top_k, b.n_experts - r)) / b.top_k
            out["flops"] = self.dense_flops - int(round(cut))
        return out

    def text(self, values: dict) -> str:
        dense = {"params": self.dense_params, "flops": self.dense_flops}
        return ", ".join(f"{k}={v} ({v / max(dense[k], 1):.1%})" for k, v in values.items())


class ExpertReport(Report):
    """What ``search(..., axes=("experts",))`` found: one row per MoE block (``block``,
    ``experts``, ``kept``, ``top_k``, ``dropped``), then params and how the export loads."""

    name_key = "block"

    def __init__(self, rows: list, lines, extra):
        for r in rows:
            r.setdefault("density", r["kept"] / max(r["experts"], 1))
        super().__init__("experts", rows, ("block", "experts", "kept", "top_k", "dropped"), lines, extra)

    def plot_title(self) -> str:
        return "expert search: fraction of experts kept per MoE block"


@dataclass
class ExpertSearchResult:
    """What ``search(..., axes=("experts",))`` found: which experts of which MoE block go.
    Nothing is cut until :meth:`export`.

    Attributes: ``model``, ``blocks`` (:class:`MoEBlock`), ``method``, ``scores`` and ``keep``
    (``{block name: ...}``: one score per expert; the kept expert indices), ``params`` /
    ``dense_params``, ``constraints`` (absolute bounds), ``batches``, ``uniform`` (the same
    count in every block: plain ``from_pretrained`` reloads the export), ``skipped``, ``axes``.
    """

    model: nn.Module
    blocks: list
    method: str
    scores: dict
    keep: dict
    params: int
    dense_params: int
    constraints: dict
    batches: int = 0
    uniform: bool = True
    skipped: list = field(default_factory=list)
    example_input: Any = None
    axes: tuple = ("experts",)
    flops: int | None = None  # counted when a flops bound was given
    dense_flops: int | None = None
    kv_cache: int | None = None  # experts do not change the KV cache; not counted
    dense_kv_cache: int | None = None

    @property
    def dropped(self) -> dict:
        """``{block name: removed expert indices}``."""
        return {b.name: [e for e in range(b.n_experts) if e not in set(self.keep[b.name].tolist())]
                for b in self.blocks}

    @property
    def counts_uniform(self) -> bool:
        return len({len(k) for k in self.keep.values()}) <= 1

    def rows(self) -> list:
        dropped = self.dropped
        return [{"block": b.name, "experts": b.n_experts, "kept": len(self.keep[b.name]),
                 "top_k": min(b.top_k, len(self.keep[b.name])), "dropped": dropped[b.name]}
                for b in self.blocks]

    @property
    def report(self) -> ExpertReport:
        """Per-block expert counts, params, and whether ``from_pretrained`` or
        ``load_pruned_pretrained`` reloads the export (a :class:`~gradprune.report.Report`)."""
        lines = [f"experts scored by {self.method} over {self.batches} batches",
                 f"params: {self.dense_params} -> {self.params} "
                 f"({self.params / max(self.dense_params, 1):.1%})"]
        dropped = getattr(self, "dropped_layers", None)
        if dropped is not None:  # search(..., axes=("layers", "experts")): the blocks of the shallower copy
            lines.insert(0, f"decoder layers dropped: {list(dropped)}")
        if self.flops is not None:
            lines.append(f"flops:  {self.dense_flops} -> {self.flops} "
                         f"({self.flops / max(self.dense_flops, 1):.1%})")
        if self.counts_uniform:
            lines.append("export: the same expert count in every MoE layer, written to the config: "
                         "plain from_pretrained reloads it")
        else:
            lines.append("export: per-layer expert counts (recorded in config.gradprune_widths): "
                         "reload with gp.structured.load_pruned_pretrained; export(uniform=True) "
                         "keeps the smallest count in every layer instead")
        lines += latency_lines(self)
        if self.skipped:
            lines.append("not pruned:")
            lines += [f"  {s['module'] or '<model>'}: {s['reason']}" for s in self.skipped]
        return ExpertReport(self.rows(), lines, {
            "method": self.method, "params": {"dense": self.dense_params, "subnet": self.params},
            "flops": {"dense": self.dense_flops, "subnet": self.flops}, "uniform": self.counts_uniform, "skipped": list(self.skipped),
            "loader": "from_pretrained" if self.counts_uniform else "load_pruned_pretrained",
            **latency_extra(self)})

    def gates(self) -> ExpertGates:
        """The gated model the export equals: the removed experts' router logits at ``-inf``
        (a context manager)."""
        return ExpertGates(self.model, self.blocks, keep=self.keep)

    def uniform_keep(self) -> dict:
        """``keep`` with every block cut to the smallest count over blocks, keeping each block's
        highest-scored experts."""
        n = min(len(k) for k in self.keep.values())
        return {name: _top(self.scores[name], n) for name in self.keep}

    def export(self, uniform: bool | None = None) -> nn.Module:
        """A copy of the model without the removed experts (see :func:`drop_experts`; the model
        is not changed nor held twice: :func:`~gradprune.structured.export.edited_copy`).
        ``uniform=True`` (default: as searched) gives every block the same count (the smallest)."""
        from .export import edited_copy

        if uniform is not None and not isinstance(uniform, bool):
            raise TypeError(f"uniform must be bool or None, got {type(uniform).__name__}")
        keep = self.uniform_keep() if uniform else self.keep
        return edited_copy(self.model, lambda m: drop_experts(m, keep))


def _top(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the ``n`` highest scores (ties: lower index first), sorted."""
    order = torch.sort(-scores.double(), stable=True).indices[:n]
    return torch.sort(order).values


def drop_experts(model: nn.Module, keep: dict, blocks: list | None = None) -> nn.Module:
    """Remove experts in place and return ``model``: ``keep = {block name: kept expert
    indices}``. The router's rows (and any router tensor with one entry per expert) and the
    stacked expert parameters are sliced; the blocks' expert-count and top-k attributes are set
    (top-k at most the count). When every block keeps the same count the config's expert count
    and ``num_experts_per_tok`` are updated (plain ``from_pretrained`` reloads it); otherwise the
    counts are recorded in ``config.gradprune_widths`` for
    :func:`~gradprune.structured.load_pruned_pretrained`.

    Example:
        >>> import torch
        >>> from transformers import MixtralConfig, MixtralForCausalLM
        >>> m = MixtralForCausalLM(MixtralConfig(vocab_size=8, hidden_size=8, intermediate_size=8,
        ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        ...     num_local_experts=4, num_experts_per_tok=2))
        >>> m = drop_experts(m, {"model.layers.0.mlp": torch.tensor([0, 2, 3])})
        >>> m.config.num_local_experts, tuple(m.model.layers[0].mlp.experts.down_proj.shape)
        (3, (3, 8, 8))
    """
    from .hf import SHAPES_KEY, WIDTHS_KEY

    if blocks is None:
        blocks = find_moe_blocks(model)[0]
    by_name = {b.name: b for b in blocks}
    for name in keep:
        if name not in by_name:
            raise ValueError(f"keep names {name!r}, which is not a recognised MoE block of "
                             f"{type(model).__name__} (blocks: {', '.join(by_name) or 'none'})")
    modules = dict(model.named_modules())
    record = {}
    counts = {}
    for b in blocks:
        idx = torch.as_tensor(keep.get(b.name, range(b.n_experts)), dtype=torch.long)
        idx = torch.unique(idx)
        if idx.numel() < 1 or int(idx.min()) < 0 or int(idx.max()) >= b.n_experts:
            raise ValueError(f"keep[{b.name!r}] must name between 1 and {b.n_experts} experts in "
                             f"[0, {b.n_experts}), got {idx.tolist()}")
        k = int(idx.numel())
        counts[b.name] = k
        top_k = min(b.top_k, k)
        for mod_name in (b.router, b.experts):
            mod = modules[mod_name]
            shapes = {}
            for pname, t in _stacked(mod, b.n_experts):
                owner_name, _, leaf = pname.rpartition(".")
                owner = mod.get_submodule(owner_name) if owner_name else mod
                new = t.detach()[idx.to(t.device)].clone()
                if isinstance(t, nn.Parameter):
                    setattr(owner, leaf, nn.Parameter(new, requires_grad=t.requires_grad))
                    shapes[pname] = list(new.shape)
                else:
                    owner._buffers[leaf] = new
            attrs = {a: k for a in b.spec.counts if isinstance(getattr(mod, a, None), int)}
            if mod_name == b.router:
                attrs[b.spec.top_k] = top_k
            for a, v in attrs.items():
                setattr(mod, a, v)
            record[mod_name] = {**attrs, SHAPES_KEY: shapes}
    cfg = getattr(model, "config", None)
    if cfg is None or not blocks:
        return model
    spec = blocks[0].spec
    if len(set(counts.values())) == 1:
        _uniform_config(model, cfg, spec, next(iter(counts.values())),
                        {id(modules[m]) for b in blocks for m in (b.router, b.experts)})
        widths = dict(getattr(cfg, WIDTHS_KEY, None) or {})
        for name in record:
            widths.pop(name, None)
    else:
        widths = dict(getattr(cfg, WIDTHS_KEY, None) or {})
        widths.update(record)
    if widths or hasattr(cfg, WIDTHS_KEY):
        setattr(cfg, WIDTHS_KEY, widths)
    return model


def _uniform_config(model: nn.Module, cfg, spec: MoESpec, k: int, own: set) -> None:
    """Write expert count ``k`` (and top-k at most ``k``) to the config and to the model-level
    copies of the config values (``*ForCausalLM.num_experts`` of every ``PreTrainedModel`` in it); ``own``: ids of the blocks'
    routers and experts (already set)."""
    old, new = {}, {}
    for f in spec.config_counts:
        if isinstance(getattr(cfg, f, None), int):
            old["count"], new["count"] = getattr(cfg, f), k
            setattr(cfg, f, k)
            break
    top = getattr(cfg, spec.config_top_k, None)
    if isinstance(top, int):
        old["top_k"], new["top_k"] = top, min(top, k)
        setattr(cfg, spec.config_top_k, min(top, k))
    from .hf import _is_hf
    for mod in model.modules():
        if id(mod) in own or not _is_hf(mod):
            continue
        for attr, what in spec.model_attrs:
            value = getattr(mod, attr, None)
            if what in old and isinstance(value, int) and not isinstance(value, bool) and value == old[what]:
                setattr(mod, attr, new[what])


def search_experts(model: nn.Module, constraints: dict, data: Iterable | None, loss_fn: Callable | None,
                   method: str, example_input, *, uniform: bool = False, max_iter_data_loader: int = 128,
                   show_progress: bool | None = None, accept: Callable | None = None) -> ExpertSearchResult:
    """``search(..., axes=("experts",))``: score the experts of every recognised MoE block with
    ``method`` (one of :data:`EXPERT_METHODS`) and remove the lowest-scored ones until the
    ``params`` / ``flops`` bounds hold (see the module docs). ``accept(key, build)``: a further
    test of a candidate that meets them (the measured latency bounds of
    :func:`~gradprune.structured.search.search`)."""
    from .search import parse_constraints

    check_choice("method", method, EXPERT_METHODS)
    check_bool("uniform", uniform)
    check_axis_inputs("axes=('experts',)", data, loss_fn, constraints, EXPERT_CONSTRAINTS, example_input,
                      max_iter_data_loader)
    blocks, skipped = find_moe_blocks(model)
    if blocks:
        blocks, bad = _check_routing(model, blocks, example_input)
        skipped += bad
    if not blocks:
        why = "; ".join(f"{s['module']}: {s['reason']}" for s in skipped[:4])
        raise ValueError(f"axes=('experts',) found no MoE block it can prune in {type(model).__name__} "
                         f"(layouts: {', '.join(s.name for s in MOE_SPECS)})" + (f"; {why}" if why else ""))
    if uniform and len({b.n_experts for b in blocks}) != 1:
        raise ValueError(f"uniform=True needs the same expert count in every MoE block, got "
                         f"{sorted({b.n_experts for b in blocks})}")
    costs = _ExpertCosts(model, blocks, example_input if "flops" in constraints else None)
    bounds = parse_constraints(constraints, {"params": costs.dense_params, "flops": costs.dense_flops})

    def meets(removed: dict) -> bool:
        values = costs.of(removed)
        return all(values[k] <= bound for k, bound in bounds.items())

    smallest = costs.of({b.name: b.n_experts - 1 for b in blocks})
    if not meets({b.name: b.n_experts - 1 for b in blocks}):
        asked = ", ".join(f"{k} <= {v:g}" for k, v in bounds.items())
        raise ValueError(f"no subnet meets constraints ({asked}) by removing experts: the smallest "
                         f"reachable (one expert kept in each of {len(blocks)} MoE blocks) are "
                         f"{costs.text(smallest)}")

    scores, batches = expert_scores(model, blocks, data, loss_fn, method, max_iter_data_loader, show_progress)

    def accepted(keep: dict) -> bool:  # the measured bounds, if any, on the candidate model
        key = tuple((name, tuple(k.tolist())) for name, k in keep.items())
        return accept is None or accept(key, lambda: drop_experts(_weight_sharing_copy(model), keep))

    if uniform:
        n = blocks[0].n_experts
        r = next((r for r in range(n) if meets({b.name: r for b in blocks})
                  and accepted({b.name: _top(scores[b.name], n - r) for b in blocks})), None)
        ok = r is not None
        keep = {b.name: _top(scores[b.name], n - (n - 1 if r is None else r)) for b in blocks}
    else:  # the lowest-scored experts over all blocks go first; one per block stays
        removed = {b.name: 0 for b in blocks}
        order = sorted(((float(scores[b.name][e]), i, e) for i, b in enumerate(blocks)
                        for e in range(b.n_experts)))
        ranked = {b.name: torch.sort(-scores[b.name].double(), stable=True).indices.tolist() for b in blocks}

        def kept() -> dict:
            return {b.name: torch.sort(torch.tensor(ranked[b.name][:b.n_experts - removed[b.name]])).values
                    for b in blocks}
        ok = False
        for _, i, _ in order + [(None, None, None)]:  # the last check: every removable expert gone
            if meets(removed) and accepted(kept()):
                ok = True
                break
            if i is None:
                break
            b = blocks[i]
            if removed[b.name] < b.n_experts - 1:  # the block's next lowest-scored expert
                removed[b.name] += 1
        keep = kept()
    if not ok:  # only a measured bound can be unmet here (the counted ones were checked above)
        asked = ", ".join(f"{k} <= {v:g}" for k, v in bounds.items())
        raise ValueError(f"no subnet meets constraints ({asked}{accept.asked()}) by removing experts: the "
                         f"smallest reachable (one expert kept in each of {len(blocks)} MoE blocks) are "
                         f"{costs.text(smallest)}{accept.text()}")
    values = costs.of({b.name: b.n_experts - len(keep[b.name]) for b in blocks})
    return ExpertSearchResult(model=model, blocks=blocks, method=method, scores=scores, keep=keep,
                              params=values["params"], dense_params=costs.dense_params,
                              constraints=bounds, batches=batches, uniform=uniform, skipped=skipped,
                              example_input=example_input, flops=values.get("flops"),
                              dense_flops=costs.dense_flops)


def _expert_candidates(blocks: list, scores: dict, uniform: bool) -> list:
    """The expert sets tried with width axes: ``keep`` dicts from no expert removed up to one
    expert kept per block. ``uniform``: ``r`` lowest-scored experts of every block, ``r = 0 ..
    E - 1``; otherwise prefixes of the lowest-scored experts over all blocks, ``len(blocks)`` at
    a time."""
    if uniform:
        n = blocks[0].n_experts
        return [{b.name: _top(scores[b.name], n - r) for b in blocks} for r in range(n)]
    ranked = {b.name: torch.sort(-scores[b.name].double(), stable=True).indices.tolist() for b in blocks}
    order = sorted((float(scores[b.name][e]), i, e) for i, b in enumerate(blocks) for e in range(b.n_experts))
    removed = {b.name: 0 for b in blocks}
    out, step = [], 0
    for _, i, _ in [(None, None, None)] + order:
        if i is not None:
            b = blocks[i]
            if removed[b.name] >= b.n_experts - 1:
                continue
            removed[b.name] += 1
            step += 1
            if step % len(blocks):
                continue
        out.append({b.name: torch.sort(torch.tensor(ranked[b.name][:b.n_experts - removed[b.name]])).values
                    for b in blocks})
    return out
