"""The particle belief as an explicit value that every filter step takes and returns.

No hidden module state: one ROS node can hold one belief per robot, training
batches beliefs over episodes, and the functions stay easy to test.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from dmn_ros.geometry import wrap_angle


class Belief(NamedTuple):
    """A weighted particle set for ``B`` independent episodes."""

    particles: torch.Tensor
    """``(B, K, 3)`` poses ``(x, y, yaw)`` in the filter's units (normalized for the model)."""
    log_weights: torch.Tensor
    """``(B, K)`` log-weights, normalized so that ``logsumexp`` over K is 0."""

    @property
    def weights(self) -> torch.Tensor:
        return self.log_weights.exp()

    @property
    def num_particles(self) -> int:
        return int(self.particles.shape[1])

    def detach(self) -> Belief:
        return Belief(self.particles.detach(), self.log_weights.detach())


def uniform_log_weights(batch: int, num_particles: int, *, like: torch.Tensor) -> torch.Tensor:
    return torch.full((batch, num_particles), -math.log(num_particles), dtype=like.dtype, device=like.device)


def init_uniform(
    *,
    batch: int,
    num_particles: int,
    bounds: tuple[float, float, float, float],
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Belief:
    """Global localization prior: uniform over ``bounds = (xmin, xmax, ymin, ymax)`` and all yaws."""
    xmin, xmax, ymin, ymax = bounds
    if not (xmax > xmin and ymax > ymin):
        raise ValueError(f"empty area bounds {bounds}")
    u = torch.rand(batch, num_particles, 3, generator=generator, device=device, dtype=dtype)
    lo = torch.tensor([xmin, ymin, -math.pi], device=device, dtype=dtype)
    hi = torch.tensor([xmax, ymax, math.pi], device=device, dtype=dtype)
    particles = lo + u * (hi - lo)
    return Belief(particles, uniform_log_weights(batch, num_particles, like=particles))


def init_gaussian(
    *,
    mean: torch.Tensor,
    std: tuple[float, float, float] | torch.Tensor,
    num_particles: int,
    generator: torch.Generator | None = None,
) -> Belief:
    """Tracking prior: ``mean (B, 3)`` plus independent Gaussian noise ``std = (σx, σy, σψ)``.

    The paper's tracking setting is σ = 6 m, 6 m, 30°; pass it in the filter's units.
    A full ``(B, 3, 3)`` covariance (e.g. from an ``initialpose`` message) is accepted too.
    """
    b = mean.shape[0]
    std_t = torch.as_tensor(std, dtype=mean.dtype, device=mean.device)
    noise = torch.randn(b, num_particles, 3, generator=generator, device=mean.device, dtype=mean.dtype)
    if std_t.dim() == 3:  # covariance matrices
        chol = torch.linalg.cholesky(std_t + 1e-12 * torch.eye(3, dtype=mean.dtype, device=mean.device))
        offset = torch.einsum("bij,bkj->bki", chol, noise)
    else:
        offset = noise * std_t
    particles = mean.unsqueeze(1) + offset
    particles = torch.cat([particles[..., :2], wrap_angle(particles[..., 2:])], dim=-1)
    return Belief(particles, uniform_log_weights(b, num_particles, like=particles))
