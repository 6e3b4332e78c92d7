"""Inner solvers: KL-regularised fine-tuners behind one protocol (:class:`InnerSolver`)."""

from cfo.solvers.adjoint_matching import AdjointMatching, AdjointMatchingConfig
from cfo.solvers.base import FinetuneStats, InnerSolver, SolverCheckpoint, TerminalReward
from cfo.solvers.diffusion_nft import DiffusionNFT, DiffusionNFTConfig

__all__ = ["AdjointMatching", "AdjointMatchingConfig", "DiffusionNFT", "DiffusionNFTConfig", "FinetuneStats", "InnerSolver", "SolverCheckpoint", "TerminalReward"]
