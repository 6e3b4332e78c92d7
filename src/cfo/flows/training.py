"""The optimiser step shared by pre-training and the inner solvers."""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["gradient_step"]


def gradient_step(opt: torch.optim.Optimizer, params: Iterable[torch.nn.Parameter], loss: torch.Tensor, grad_clip: float) -> bool:
    """Backpropagate ``loss``, clip the global gradient norm of ``params`` to ``grad_clip`` and take one step of ``opt``.

    Returns False, without stepping (parameters and optimiser state unchanged), when the gradient norm is NaN or
    infinite although the loss was finite; the caller counts and logs the skipped step."""
    params = list(params)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    if not torch.isfinite(norm):
        opt.zero_grad(set_to_none=True)
        return False
    opt.step()
    return True
