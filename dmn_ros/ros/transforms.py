"""Pure frame math for the nodes (REP-105), tested without ROS.

Poses are planar ``(x, y, yaw)``; stamps are float seconds.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

import numpy as np

from dmn_ros.geometry import compose, inverse, relative, wrap_angle

__all__ = ["OdometryBuffer", "interpolate_pose", "map_to_odom"]


def map_to_odom(
    map_to_base: Sequence[float] | np.ndarray, odom_to_base: Sequence[float] | np.ndarray
) -> np.ndarray:
    """``T_map_odom = T_map_base ⊕ (T_odom_base)⁻¹``: the transform a localizer broadcasts (REP-105)."""
    mb = np.asarray(map_to_base, dtype=np.float64)
    return compose(mb, inverse(np.asarray(odom_to_base, dtype=np.float64)))


def interpolate_pose(
    t0: float, p0: Sequence[float] | np.ndarray, t1: float, p1: Sequence[float] | np.ndarray, t: float
) -> np.ndarray:
    """Linear in x, y; yaw along the shorter arc, so interpolation across ±π never spins the long way."""
    p0 = np.asarray(p0, dtype=np.float64)
    p1 = np.asarray(p1, dtype=np.float64)
    a = 0.0 if t1 == t0 else (t - t0) / (t1 - t0)
    xy = p0[:2] + a * (p1[:2] - p0[:2])
    yaw = wrap_angle(p0[2] + a * wrap_angle(p1[2] - p0[2]))
    return np.array([xy[0], xy[1], yaw])


class OdometryBuffer:
    """Time-ordered odometry poses (``odom → base``) with interpolation and egomotion between stamps."""

    def __init__(self, *, max_age_s: float = 30.0, tolerance_s: float = 0.0) -> None:
        self.max_age_s = float(max_age_s)
        """Samples older than the newest minus this are dropped."""
        self.tolerance_s = float(tolerance_s)
        """Queries up to this far outside the buffered span are answered by the nearest end sample."""
        self._t: list[float] = []
        self._p: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self._t)

    @property
    def latest_stamp(self) -> float | None:
        return self._t[-1] if self._t else None

    def add(self, stamp: float, pose: Sequence[float] | np.ndarray) -> bool:
        """Append a sample; returns False (ignoring it) for non-finite or out-of-order stamps/poses."""
        p = np.asarray(pose, dtype=np.float64).reshape(3)
        if not (math.isfinite(stamp) and np.isfinite(p).all()):
            return False
        if self._t and stamp <= self._t[-1]:
            return False
        self._t.append(float(stamp))
        self._p.append(p)
        cut = bisect.bisect_left(self._t, stamp - self.max_age_s)
        if cut > 0:
            del self._t[:cut], self._p[:cut]
        return True

    def pose_at(self, stamp: float) -> np.ndarray | None:
        """Interpolated pose at ``stamp``, or None when it is outside the buffer (beyond the tolerance)."""
        if not self._t:
            return None
        if stamp <= self._t[0]:
            return self._p[0].copy() if self._t[0] - stamp <= self.tolerance_s else None
        if stamp >= self._t[-1]:
            return self._p[-1].copy() if stamp - self._t[-1] <= self.tolerance_s else None
        i = bisect.bisect_right(self._t, stamp)
        return interpolate_pose(self._t[i - 1], self._p[i - 1], self._t[i], self._p[i], stamp)

    def egomotion(self, t_prev: float, t: float) -> np.ndarray | None:
        """``Δ = relative(odom(t_prev), odom(t))``, in the robot frame at ``t_prev`` (SPEC convention)."""
        a, b = self.pose_at(t_prev), self.pose_at(t)
        if a is None or b is None:
            return None
        return relative(a, b)
