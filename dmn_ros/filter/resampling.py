"""Resampling: soft (differentiable, for training) and systematic (for inference).

Choice (SPEC "Resampling"): training uses PF-net's soft resampling with α = 0.5;
evaluation, the nodes and the bag tools use systematic resampling whenever the
effective sample size falls below K/2. Every reported number names which one ran.
"""

from __future__ import annotations

import math

import torch

from dmn_ros.filter.belief import Belief, uniform_log_weights
from dmn_ros.filter.steps import effective_sample_size, normalize_log_weights


def soft_resample(belief: Belief, *, alpha: float = 0.5, generator: torch.Generator | None = None) -> Belief:
    """PF-net soft resampling: draw from ``q = α w + (1 - α)/K`` and reweight by ``w/q``.

    The new weight is gathered with the *same* indices as the particles
    (``w[idx] / q[idx]``), which keeps the weighted estimate unbiased; the
    gradient reaches the old log-weights through ``w[idx]`` and ``q``. α = 1 is
    ordinary resampling (no gradient through the weights).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    k = belief.log_weights.shape[1]
    log_w = belief.log_weights
    if alpha >= 1.0:
        log_q = log_w
    elif alpha <= 0.0:
        log_q = torch.full_like(log_w, -math.log(k))
    else:
        log_q = torch.logaddexp(log_w + math.log(alpha), torch.full_like(log_w, math.log((1.0 - alpha) / k)))
    idx = torch.multinomial(log_q.detach().exp(), k, replacement=True, generator=generator)  # (B, K)
    particles = torch.gather(belief.particles, 1, idx.unsqueeze(-1).expand(-1, -1, belief.particles.shape[-1]))
    new_log_w = torch.gather(log_w, 1, idx) - torch.gather(log_q, 1, idx)
    return Belief(particles, normalize_log_weights(new_log_w))


def systematic_indices(
    weights: torch.Tensor, *, generator: torch.Generator | None = None, num_samples: int | None = None
) -> torch.Tensor:
    """Low-variance resampling indices ``(B, N)``: one uniform offset, N evenly spaced pointers.

    ``N = num_samples``, default K (the count stays); KLD resampling draws ``max_particles`` instead.
    """
    b, k = weights.shape
    n = k if num_samples is None else int(num_samples)
    u0 = torch.rand(b, 1, generator=generator, device=weights.device, dtype=weights.dtype) / n
    pointers = u0 + torch.arange(n, device=weights.device, dtype=weights.dtype).unsqueeze(0) / n
    cdf = torch.cumsum(weights, dim=-1)
    cdf = cdf / cdf[:, -1:]  # guard against round-off leaving the last entry below 1
    return torch.searchsorted(cdf, pointers, right=True).clamp(max=k - 1)


def systematic_resample(belief: Belief, *, generator: torch.Generator | None = None) -> Belief:
    """Systematic resampling; weights become uniform. Not differentiable in the weights."""
    b, k = belief.log_weights.shape
    idx = systematic_indices(belief.weights.detach(), generator=generator)
    particles = torch.gather(belief.particles, 1, idx.unsqueeze(-1).expand(-1, -1, belief.particles.shape[-1]))
    return Belief(particles, uniform_log_weights(b, k, like=particles))


def resample_if_degenerate(
    belief: Belief, *, threshold: float = 0.5, generator: torch.Generator | None = None
) -> tuple[Belief, torch.Tensor]:
    """Systematic resampling of the episodes whose ESS < ``threshold · K``; returns the mask ``(B,)``."""
    k = belief.num_particles
    mask = effective_sample_size(belief) < threshold * k
    if not bool(mask.any()):
        return belief, mask
    resampled = systematic_resample(belief, generator=generator)
    particles = torch.where(mask[:, None, None], resampled.particles, belief.particles)
    log_w = torch.where(mask[:, None], resampled.log_weights, belief.log_weights)
    return Belief(particles, log_w), mask
