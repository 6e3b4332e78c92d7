"""Checks shared by the core and the solvers: batch values must be finite and shaped ``[batch]``."""

from __future__ import annotations

import torch

__all__ = ["NonFiniteValueError", "check_batch_values", "check_finite"]


class NonFiniteValueError(FloatingPointError):
    """A reward, constraint or loss returned NaN or infinity."""


def check_batch_values(values: object, batch: int, name: str, finite: bool = True) -> torch.Tensor:
    """Return ``values`` if it is a tensor of shape ``[batch]`` (and, with ``finite``, every entry finite); raise a
    clear error otherwise."""
    if not torch.is_tensor(values):
        raise TypeError(f"{name} must return a torch.Tensor of shape [{batch}], got {type(values).__name__}")
    if values.shape != (batch,):
        raise ValueError(f"{name} must return shape [batch]=[{batch}], got {list(values.shape)}")
    if finite:
        check_finite(values, name)
    return values


def check_finite(values: torch.Tensor, name: str) -> torch.Tensor:
    """Raise :class:`NonFiniteValueError` naming how many entries of ``values`` are NaN or infinite."""
    bad = ~torch.isfinite(values)
    if bad.any():
        n_nan = int(torch.isnan(values).sum())
        n_inf = int(bad.sum()) - n_nan
        raise NonFiniteValueError(f"{name} returned {n_nan} NaN and {n_inf} infinite values out of {values.numel()}")
    return values
