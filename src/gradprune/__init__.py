"""gradprune: gradient-informed pruning for PyTorch.

Score the weights of a network (magnitude, gradient, SNIP, Taylor, Fisher, movement…), remove the
least important ones in a chosen unit (entries, blocks, N:M groups, channels, kernels) to an exact
target, one-shot or gradually inside your training loop, and keep them at zero.

    >>> import gradprune as gp
    >>> gp.list_criteria()[:4]
    ['magnitude', 'gradient', 'snip', 'taylor']
"""

import logging as _logging

from .config import PruneConfig
from .masks import MaskSet, SparsityReport
from .patterns import get_pattern
from .preprune import PrePruneConfig, PrePruneSelection, pre_prune
from .prune import PruneResult, prune
from .pruner import Pruner
from .schedules import SparsitySchedule, sparsity_at
from .sparse_training import LayerContext, SparseConfig, SparseTrainer
from .scores import (
    Criterion,
    GradientStatistics,
    get_criterion,
    list_criteria,
    register_criterion,
    stream_gradients,
)
from .targets import find_targets
from .structured import SearchResult, causal_lm_loss, find_groups, load_pruned, save_pruned, search
from .distill import DistillConfig, Distiller, distill

__version__ = "0.1.0"

__all__ = [
    "PruneConfig", "PrePruneConfig", "PrePruneSelection", "pre_prune", "MaskSet", "SparsityReport", "get_pattern", "prune", "PruneResult", "Pruner",
    "SparsitySchedule", "sparsity_at", "SparseConfig", "SparseTrainer", "LayerContext", "Criterion", "GradientStatistics", "get_criterion",
    "list_criteria", "register_criterion", "stream_gradients", "find_targets", "__version__",
]
__all__ += ["search", "SearchResult", "find_groups", "save_pruned", "load_pruned", "causal_lm_loss"]
__all__ += ["distill", "Distiller", "DistillConfig"]

# a library logs and lets the application decide where records go (the `gradprune` command does)
_logging.getLogger(__name__).addHandler(_logging.NullHandler())
