"""Planar (SE(2)) geometry shared by the model, filter, worlds, tools and nodes.

Every function accepts numpy arrays or torch tensors and returns the same kind,
so that the worlds (numpy), the filter (torch, differentiable) and the ROS
adapters (numpy) use one implementation of each formula.

Conventions (REP-103): x forward, y left, yaw counter-clockwise from +x, in
radians. A pose is the trailing dimension ``(..., 3) = (x, y, yaw)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

Array = TypeVar("Array", np.ndarray, torch.Tensor)

__all__ = [
    "MetricScale",
    "compose",
    "egocentric_viewpoints",
    "egocentric_viewpoints_torch",
    "inverse",
    "quaternion_to_yaw",
    "relative",
    "viewpoint_encoding",
    "wrap_angle",
    "yaw_to_quaternion",
]


def _is_torch(x: Any) -> bool:
    return isinstance(x, torch.Tensor)


def _stack(parts: list, like: Any) -> Any:
    if _is_torch(like):
        return torch.stack(parts, dim=-1)
    return np.stack(parts, axis=-1)


def _sin(x: Any) -> Any:
    return torch.sin(x) if _is_torch(x) else np.sin(x)


def _cos(x: Any) -> Any:
    return torch.cos(x) if _is_torch(x) else np.cos(x)


def _atan2(y: Any, x: Any) -> Any:
    return torch.atan2(y, x) if _is_torch(y) else np.arctan2(y, x)


def wrap_angle(a: Array) -> Array:
    """Wrap to [-pi, pi). ``fmod`` would keep the sign and is not used (SPEC pitfall)."""
    if _is_torch(a):
        return torch.remainder(a + math.pi, 2.0 * math.pi) - math.pi
    return np.remainder(a + np.pi, 2.0 * np.pi) - np.pi


def compose(a: Array, b: Array) -> Array:
    """``a ⊕ b``: pose ``b`` given in the frame of ``a``, expressed in a's parent frame."""
    c, s = _cos(a[..., 2]), _sin(a[..., 2])
    x = a[..., 0] + c * b[..., 0] - s * b[..., 1]
    y = a[..., 1] + s * b[..., 0] + c * b[..., 1]
    return _stack([x, y, wrap_angle(a[..., 2] + b[..., 2])], like=a)


def inverse(a: Array) -> Array:
    """``a⁻¹`` so that ``compose(a, inverse(a))`` is the identity."""
    c, s = _cos(a[..., 2]), _sin(a[..., 2])
    x = -(c * a[..., 0] + s * a[..., 1])
    y = s * a[..., 0] - c * a[..., 1]
    return _stack([x, y, wrap_angle(-a[..., 2])], like=a)


def relative(a: Array, b: Array) -> Array:
    """``a⁻¹ ⊕ b``: pose ``b`` seen from ``a``.

    The egomotion of the SPEC's odometry convention is ``Δ_t = relative(s_{t-1}, s_t)``
    (motion from t-1 to t in the robot frame at t-1), so ``compose(s_{t-1}, Δ_t) = s_t``.
    """
    c, s = _cos(a[..., 2]), _sin(a[..., 2])
    dx = b[..., 0] - a[..., 0]
    dy = b[..., 1] - a[..., 1]
    return _stack([c * dx + s * dy, -s * dx + c * dy, wrap_angle(b[..., 2] - a[..., 2])], like=a)


def viewpoint_encoding(pose: Array) -> Array:
    """``(x, y, yaw) -> (x, y, sin yaw, cos yaw)``, the continuous form the networks see."""
    return _stack([pose[..., 0], pose[..., 1], _sin(pose[..., 2]), _cos(pose[..., 2])], like=pose)


def egocentric_viewpoints_torch(contexts: torch.Tensor, particles: torch.Tensor) -> torch.Tensor:
    """TorchScript-compatible body of :func:`egocentric_viewpoints` (the exported model calls it)."""
    c = contexts.unsqueeze(-3)  # (..., 1, Nc, 3)
    p = particles.unsqueeze(-2)  # (..., K, 1, 3)
    cos_k = torch.cos(p[..., 2])
    sin_k = torch.sin(p[..., 2])
    dx_w = c[..., 0] - p[..., 0]
    dy_w = c[..., 1] - p[..., 1]
    dpsi = c[..., 2] - p[..., 2]
    dx = cos_k * dx_w + sin_k * dy_w
    dy = -sin_k * dx_w + cos_k * dy_w
    return torch.stack([dx, dy, torch.sin(dpsi), torch.cos(dpsi)], dim=-1)


def egocentric_viewpoints(contexts: Array, particles: Array) -> Array:
    """SPEC: egocentric transform of every context viewpoint into every particle's frame.

    Args:
        contexts: ``(..., Nc, 3)`` context poses.
        particles: ``(..., K, 3)`` particle poses, same units as ``contexts``.

    Returns:
        ``(..., K, Nc, 4)`` with ``(dx, dy, sin dψ, cos dψ)`` where
        ``(dx, dy) = R(-ψ_k)(x_i - x_k, y_i - y_k)`` and ``dψ = ψ_i - ψ_k``.
    """
    if _is_torch(contexts):
        return egocentric_viewpoints_torch(contexts, particles)
    out = egocentric_viewpoints_torch(torch.from_numpy(np.asarray(contexts)), torch.from_numpy(np.asarray(particles)))
    return out.numpy()


def yaw_to_quaternion(yaw: Array) -> Array:
    """Yaw to a unit quaternion ``(..., 4)`` ordered ``(x, y, z, w)`` like geometry_msgs."""
    half = yaw * 0.5
    zero = half * 0.0
    return _stack([zero, zero, _sin(half), _cos(half)], like=yaw)


def quaternion_to_yaw(q: Array) -> Array:
    """Yaw of a quaternion ``(..., 4)`` ``(x, y, z, w)``; roll and pitch are dropped.

    The quaternion need not be unit length: the ratio inside atan2 is scale-free.
    """
    x, y, z, w = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    return _atan2(2.0 * (w * z + x * y), w * w + x * x - y * y - z * z)


@dataclass(frozen=True)
class MetricScale:
    """Maps metric poses to the normalized coordinates a model was trained in.

    ``normalized_xy = (metric_xy - origin) / meters_per_unit``; yaw is untouched.
    A model learned distances in its training data's units, so the scale travels
    with the exported model and every tool converts through it.
    """

    meters_per_unit: float = 20.0
    origin_x: float = 0.0
    origin_y: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.meters_per_unit) and self.meters_per_unit > 0):
            raise ValueError(f"meters_per_unit must be finite and > 0, got {self.meters_per_unit}")

    def to_normalized(self, pose: Array) -> Array:
        x = (pose[..., 0] - self.origin_x) / self.meters_per_unit
        y = (pose[..., 1] - self.origin_y) / self.meters_per_unit
        return _stack([x, y, pose[..., 2]], like=pose)

    def to_metric(self, pose: Array) -> Array:
        x = pose[..., 0] * self.meters_per_unit + self.origin_x
        y = pose[..., 1] * self.meters_per_unit + self.origin_y
        return _stack([x, y, pose[..., 2]], like=pose)

    def bounds_to_normalized(self, bounds: Sequence[float]) -> tuple[float, float, float, float]:
        """Metric ``(xmin, xmax, ymin, ymax)`` → the same box in normalized coordinates."""
        xmin, xmax, ymin, ymax = (float(v) for v in bounds)
        mpu = self.meters_per_unit
        return ((xmin - self.origin_x) / mpu, (xmax - self.origin_x) / mpu,
                (ymin - self.origin_y) / mpu, (ymax - self.origin_y) / mpu)

    def delta_to_normalized(self, delta: Array) -> Array:
        """Egomotion has no origin: only its translation is scaled."""
        return _stack(
            [delta[..., 0] / self.meters_per_unit, delta[..., 1] / self.meters_per_unit, delta[..., 2]],
            like=delta,
        )
