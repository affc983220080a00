"""Training losses on the filter's output (normalized coordinates)."""

from __future__ import annotations

import math

import torch

from dmn_ros.filter.belief import Belief
from dmn_ros.filter.steps import pose_error


def pose_mse(mean: torch.Tensor, truth: torch.Tensor, *, yaw_weight: float = 0.5) -> torch.Tensor:
    """SPEC loss ``(x-x*)² + (y-y*)² + α·wrap(ψ-ψ*)²`` with α = 0.5, averaged over the batch.

    In fp32 whatever the autocast: a regressed pose can come out of a bf16 layer.
    """
    e = pose_error(mean.float(), truth.float())
    return (e[..., 0] ** 2 + e[..., 1] ** 2 + yaw_weight * e[..., 2] ** 2).mean()


def mixture_nll(belief: Belief, truth: torch.Tensor, *, std_xy: float, std_yaw: float) -> torch.Tensor:
    """Negative log-likelihood of the true pose ``(B, 3)`` under a Gaussian kernel mixture of the particles.

    Jonschkowski et al.'s differentiable-PF loss: unlike the MSE of the mean it
    rewards putting weight on the right particle even while the belief is multimodal.
    """
    e = pose_error(belief.particles, truth.unsqueeze(1))  # (B, K, 3)
    log_kernel = (
        -0.5 * ((e[..., 0] ** 2 + e[..., 1] ** 2) / std_xy**2 + (e[..., 2] / std_yaw) ** 2)
        - 2.0 * math.log(std_xy)
        - math.log(std_yaw)
        - 1.5 * math.log(2.0 * math.pi)
    )
    return -torch.logsumexp(belief.log_weights + log_kernel, dim=-1).mean()
