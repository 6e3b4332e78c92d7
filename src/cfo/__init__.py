"""cfo: Constrained Flow Optimization (Gutjahr et al., ICML 2026, arXiv 2605.30610).

    max_pi E_pi[r] - alpha KL(pi || pre)   subject to   E_pi[c_i] <= B_i

solved by an augmented-Lagrangian outer loop (:class:`CFO`) around any KL-regularised inner solver
(:mod:`cfo.solvers`).
"""

from cfo.evaluation import Evaluation, evaluate_model, evaluate_samples
from cfo.loop import CFO, AugmentedReward, CFOConfig, CFOResult, CheckpointMismatchError, RoundRecord
from cfo.problem import ConstrainedProblem, Constraint, Reward
from cfo.validation import NonFiniteValueError

__version__ = "0.1.0"

__all__ = [
    "CFO", "CFOConfig", "CFOResult", "RoundRecord", "AugmentedReward", "CheckpointMismatchError",
    "ConstrainedProblem", "Constraint", "Reward",
    "Evaluation", "evaluate_model", "evaluate_samples",
    "NonFiniteValueError",
]
