import pytest
import torch

from cfo.flows import FlowModel, GaussianVelocity, ResidualVelocity, VelocityMLP


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)  # small tensors: one thread is fastest and deterministic
    yield


# A 2D Gaussian pre-trained model with an exactly known velocity field.
MEAN = torch.tensor([0.5, -0.5])
COV = torch.tensor([[1.0, 0.3], [0.3, 0.5]])


def gaussian_reference() -> FlowModel:
    return FlowModel(GaussianVelocity(MEAN, COV), (2,))


def gaussian_finetunable(seed: int = 0) -> FlowModel:
    """The exact Gaussian velocity plus a zero-initialised trainable MLP correction."""
    torch.manual_seed(seed)
    return FlowModel(ResidualVelocity(GaussianVelocity(MEAN, COV), VelocityMLP(2, hidden=64, depth=2).zero_output_()), (2,))


class Linear:
    """The differentiable linear reward ``a.x`` (its KL tilt of a Gaussian is known in closed form)."""

    differentiable = True

    def __init__(self, a):
        self.a = torch.as_tensor(a, dtype=torch.float32)

    def __call__(self, x):
        return x @ self.a
