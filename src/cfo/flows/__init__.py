"""Flows: paths and schedulers, velocity models, samplers and flow-matching pre-training."""

from cfo.flows.likelihood import divergence, kl_divergence, log_prob
from cfo.flows.model import FlowModel, GaussianVelocity, ResidualVelocity, VelocityMLP, frozen_copy, trainable_copy
from cfo.flows.pretrain import PretrainConfig, flow_matching_loss, pretrain_flow
from cfo.flows.sampling import Trajectory, sample_memoryless_sde, sample_noisy_sde, sample_ode, score_from_velocity, time_grid
from cfo.flows.schedulers import LinearScheduler, MemorylessTransition, Scheduler
from cfo.flows.training import gradient_step

__all__ = [
    "divergence", "kl_divergence", "log_prob",
    "FlowModel", "GaussianVelocity", "ResidualVelocity", "VelocityMLP", "frozen_copy", "trainable_copy",
    "PretrainConfig", "flow_matching_loss", "pretrain_flow",
    "Trajectory", "sample_memoryless_sde", "sample_noisy_sde", "sample_ode", "score_from_velocity", "time_grid",
    "LinearScheduler", "MemorylessTransition", "Scheduler",
    "gradient_step",
]
