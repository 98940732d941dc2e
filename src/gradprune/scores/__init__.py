"""Layer 3: importance criteria (a registry) and the gradient-statistics engine."""

from .criteria import (
    Criterion,
    FisherCriterion,
    GradientCriterion,
    MagnitudeCriterion,
    MovementCriterion,
    RandomCriterion,
    SnipCriterion,
    SnipMomentumCriterion,
    TaylorCriterion,
    criterion_class,
    get_criterion,
    list_criteria,
    register_criterion,
)
from .llm import GblmCriterion, InputCriterion, RiaCriterion, SparseGPTCriterion, WandaCriterion
from .stats import STATISTICS, GradientStatistics, scoring_context, stream_gradients

__all__ = [
    "Criterion", "register_criterion", "get_criterion", "list_criteria", "criterion_class",
    "MagnitudeCriterion", "GradientCriterion", "SnipCriterion", "SnipMomentumCriterion",
    "TaylorCriterion", "MovementCriterion", "FisherCriterion", "RandomCriterion",
    "InputCriterion", "WandaCriterion", "RiaCriterion", "GblmCriterion", "SparseGPTCriterion",
    "GradientStatistics", "stream_gradients", "scoring_context", "STATISTICS",
]
