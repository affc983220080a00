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
    """``log w_t^k = l_t^k + log w_{t-1}^k``, then normalized.

    Not checked here (training runs this every step, and a check would sync the GPU): a NaN or +inf
    likelihood, or -inf for every particle of an episode, makes that episode's weights NaN.
    :meth:`dmn_ros.localizer.Localizer.step` refuses such a frame (``DegenerateUpdateError``).
    """
    return Belief(belief.particles, normalize_log_weights(belief.log_weights + log_likelihood))


def effective_sample_size(belief: Belief) -> torch.Tensor:
    """``1 / Σ w_k²`` per episode, ``(B,)``; K for uniform weights, 1 for a single survivor."""
    return torch.exp(-torch.logsumexp(2.0 * belief.log_weights, dim=-1))


def estimate(belief: Belief, *, cluster_radius: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pose estimate ``(B, 3)`` and covariance ``(B, 3, 3)``; ``cluster_radius`` > 0 picks the heaviest cluster.

    Mean (``cluster_radius = 0``, the paper's estimate): x, y weighted mean and covariance; yaw
    ``atan2(Σ w sin ψ, Σ w cos ψ)`` with the circular variance ``-2 ln R`` (R: mean resultant
    length), as nav2_amcl does. The x/y–yaw cross terms are zero, as in nav2_amcl.

    Cluster: the weighted mean of a multimodal belief lies between its modes, often inside a
    wall, so nav2_amcl publishes the mean of its heaviest particle cluster instead. Here the
    cluster is the disc of ``cluster_radius`` (x-y, filter units) around whichever of the 64
    heaviest particles holds the most weight within it; x-y and circular yaw means are taken over
    that disc. The x-y covariance is then the belief's second moment about that estimate (its
    covariance plus the offset of the overall mean), so it still reports the other modes.
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
    if cluster_radius > 0:
        est_xy, yaw = _heaviest_cluster(w, p, cluster_radius)
        off = mean_xy - est_xy
        cov_xy = cov_xy + off.unsqueeze(-1) * off.unsqueeze(-2)
        mean_xy = est_xy
    cov = torch.zeros(p.shape[0], 3, 3, dtype=p.dtype, device=p.device)
    cov = cov.clone()
    cov[:, :2, :2] = cov_xy
    cov[:, 2, 2] = var_yaw
    return torch.cat([mean_xy, yaw.unsqueeze(-1)], dim=-1), cov


def _heaviest_cluster(w: torch.Tensor, p: torch.Tensor, radius: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x-y ``(B, 2)`` and yaw ``(B,)`` means of the weight in the heaviest ``radius`` disc (:func:`estimate`)."""
    seeds_idx = w.topk(min(64, w.shape[1]), dim=1).indices
    seeds = torch.gather(p[..., :2], 1, seeds_idx.unsqueeze(-1).expand(-1, -1, 2))
    inside = (torch.cdist(seeds, p[..., :2]) <= radius).to(w.dtype)  # (B, S, K)
    best = torch.einsum("bsk,bk->bs", inside, w).argmax(dim=1)
    wc = inside[torch.arange(w.shape[0], device=w.device), best] * w  # the seed itself is always inside
    wc = wc / wc.sum(dim=1, keepdim=True)
    xy = torch.einsum("bk,bkc->bc", wc, p[..., :2])
    yaw = torch.atan2(torch.einsum("bk,bk->b", wc, torch.sin(p[..., 2])),
                      torch.einsum("bk,bk->b", wc, torch.cos(p[..., 2])))
    return xy, yaw


def pose_error(estimate_pose: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """``(..., 3)`` error with the yaw difference wrapped to [-π, π)."""
    d = estimate_pose - truth
    return torch.cat([d[..., :2], wrap_angle(d[..., 2:])], dim=-1)
