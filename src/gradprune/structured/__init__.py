"""Structured pruning: dependency groups, gates, search to a budget, export of a smaller model.

See ``docs/structured.md``. The main entry points:

- :func:`search` — scores and a binary search on a global threshold to a params/FLOPs/latency budget;
- :meth:`SearchResult.export` — an ordinary, physically smaller ``nn.Module``;
- :func:`save_pruned` / :func:`load_pruned` — a plain state dict plus a JSON width record;
- :func:`load_pruned_pretrained` — a pruned Hugging Face model saved with ``save_pretrained``;
- :func:`recalibrate_batchnorm` — re-estimate BatchNorm statistics of an exported model;
- :func:`fold_batchnorm` — fold eval-mode BatchNorm into the convolutions before it, for inference;
- :func:`causal_lm_loss` — a causal-LM ``loss_fn`` whose logits exist one chunk of tokens at a time;
- :func:`find_groups`, :class:`Gates`, :class:`SearchRules`, :class:`CostModel` — the parts.
"""

from .attention import PrunedMultiheadAttention
from .export import export_model, load_pruned, save_pruned
from .experts import ExpertSearchResult, drop_experts, expert_scores, find_moe_blocks
from .flops import CostModel, count_flops, count_params
from .fold import fold_batchnorm
from .gates import Gates
from .groups import Analysis, Group, Layout, Slice, find_groups
from .hf import load_pruned_pretrained
from .lm_loss import CausalLMLoss, causal_lm_loss
from .rules import ChannelRule, FeatureRule, HeadRule, SearchRules, candidate_widths
from .scoring import GateStatistics, gate_statistics, magnitude_scores
from .search import METHODS, LatencyProbe, SearchResult, parse_constraints, recalibrate_batchnorm, search

__all__ = [
    "find_groups", "Analysis", "Group", "Slice", "Layout", "Gates", "SearchRules", "ChannelRule",
    "FeatureRule", "candidate_widths", "CostModel", "count_params", "count_flops",
    "GateStatistics", "gate_statistics", "magnitude_scores", "search", "SearchResult", "METHODS",
    "parse_constraints", "export_model", "save_pruned", "load_pruned", "load_pruned_pretrained",
    "HeadRule", "PrunedMultiheadAttention", "LatencyProbe", "recalibrate_batchnorm", "fold_batchnorm",
    "ExpertSearchResult", "drop_experts", "expert_scores", "find_moe_blocks",
    "causal_lm_loss", "CausalLMLoss",
]
