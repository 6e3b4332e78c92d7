"""Inner solvers: KL-regularised fine-tuners behind one protocol (:class:`InnerSolver`)."""

from cfo.solvers.adjoint_matching import AdjointMatching, AdjointMatchingConfig
from cfo.solvers.base import FinetuneStats, InnerSolver, TerminalReward

__all__ = ["AdjointMatching", "AdjointMatchingConfig", "FinetuneStats", "InnerSolver", "TerminalReward"]
