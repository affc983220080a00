"""Transition, observation update and estimate: the particle filter's math (SPEC "Particle filter")."""

from __future__ import annotations

import torch

from dmn_ros.filter.belief import Belief
from dmn_ros.geometry import compose, wrap_angle


def transition(
    belief: Belief,
    *,
    egomotion: torch.Tensor,
    noise_std: tuple[float, float, float] | torch.Tensor = (0.0, 0.0, 0.0),
    generator: torch.Generator | None = None,
) -> Belief:
    """``s_t^k = s_{t-1}^k ⊕ (Δ_t + ε)``: egomotion ``(B, 3)`` is composed in each particle's frame.

    ``Δ_t`` is the motion from t-1 to t in the robot frame at t-1 (SPEC odometry
    convention). The noise ``ε`` is drawn per particle in the robot frame.
    """
    p = belief.particles
    delta = egomotion.to(p).unsqueeze(1).expand_as(p)
    std = torch.as_tensor(noise_std, dtype=p.dtype, device=p.device)
    if bool((std > 0).any()):
        delta = delta + torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype) * std
    return Belief(compose(p, delta), belief.log_weights)


def normalize_log_weights(log_weights: torch.Tensor) -> torch.Tensor:
    """Log-sum-exp normalization: exact for any spread of log-likelihoods, no overflow."""
    return log_weights - torch.logsumexp(log_weights, dim=-1, keepdim=True)


def update(belief: Belief, log_likelihood: torch.Tensor) -> Belief:
    """``log w_t^k = l_t^k + log w_{t-1}^k``, then normalized. Non-finite likelihoods are an error."""
    return Belief(belief.particles, normalize_log_weights(belief.log_weights + log_likelihood))


def effective_sample_size(belief: Belief) -> torch.Tensor:
    """``1 / Σ w_k²`` per episode, ``(B,)``; K for uniform weights, 1 for a single survivor."""
    return torch.exp(-torch.logsumexp(2.0 * belief.log_weights, dim=-1))


def estimate(belief: Belief) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean pose ``(B, 3)`` and covariance ``(B, 3, 3)``.

    x, y: weighted mean and weighted covariance. Yaw: ``atan2(Σ w sin ψ, Σ w cos ψ)``;
    its variance is the circular ``-2 ln R`` with ``R`` the mean resultant length,
    as nav2_amcl does. The x/y–yaw cross terms are zero, as in nav2_amcl.
    """
    w = belief.weights  # (B, K)
    p = belief.particles
    mean_xy = torch.einsum("bk,bkc->bc", w, p[..., :2])
    s = torch.einsum("bk,bk->b", w, torch.sin(p[..., 2]))
    c = torch.einsum("bk,bk->b", w, torch.cos(p[..., 2]))
    yaw = torch.atan2(s, c)
    d = p[..., :2] - mean_xy.unsqueeze(1)
    cov_xy = torch.einsum("bk,bki,bkj->bij", w, d, d)
    r = torch.sqrt(s * s + c * c).clamp(min=1e-12, max=1.0)
    var_yaw = -2.0 * torch.log(r)
    cov = torch.zeros(p.shape[0], 3, 3, dtype=p.dtype, device=p.device)
    cov = cov.clone()
    cov[:, :2, :2] = cov_xy
    cov[:, 2, 2] = var_yaw
    return torch.cat([mean_xy, yaw.unsqueeze(-1)], dim=-1), cov


def pose_error(estimate_pose: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """``(..., 3)`` error with the yaw difference wrapped to [-π, π)."""
    d = estimate_pose - truth
    return torch.cat([d[..., :2], wrap_angle(d[..., 2:])], dim=-1)
