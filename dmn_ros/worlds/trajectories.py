"""Robot-like pose sequences: smooth drive-and-turn trajectories and the paper's random-order queries."""

from __future__ import annotations

import numpy as np

from dmn_ros.geometry import wrap_angle
from dmn_ros.worlds.base import World

__all__ = ["KIDNAP_MIN_DISTANCE_M", "kidnap_pose", "kidnapped_trajectory", "random_order_poses", "smooth_trajectory"]

KIDNAP_MIN_DISTANCE_M = 15.0
"""Least x-y distance of a kidnapping: well beyond the 8.94 m success threshold, so a filter that keeps
tracking the old pose is clearly wrong (the recovery test of docs/health.md uses the same)."""


def smooth_trajectory(
    world: World,
    rng: np.random.Generator,
    *,
    steps: int,
    start: np.ndarray | None = None,
    step_m: tuple[float, float] = (0.6, 1.4),
    turn_std_rad: float = 0.25,
    turn_smoothing: float = 0.5,
) -> np.ndarray:
    """(steps, 3) poses of a robot that drives forward with smoothly varying turn rate.

    Every segment between consecutive poses is checked against the obstacles, so the
    path never crosses or grazes a wall; when blocked, the robot turns towards the
    smallest free heading change, or turns in place if no heading is free.
    """
    pose = world.sample_free_poses(1, rng)[0] if start is None else np.asarray(start, dtype=np.float64).copy()
    out = np.empty((steps, 3))
    out[0] = pose
    turn_rate = 0.0
    # Heading changes tried when the straight continuation is blocked, smallest first.
    offsets = np.array([d * s for d in np.deg2rad([20, 40, 60, 90, 120, 150, 180]) for s in (1, -1)])
    for t in range(1, steps):
        turn_rate = turn_smoothing * turn_rate + rng.normal(0.0, turn_std_rad)
        dist = rng.uniform(*step_m)
        moved = False
        for extra in np.concatenate([[0.0], offsets * (1 if rng.random() < 0.5 else -1)]):
            yaw = wrap_angle(pose[2] + turn_rate + extra)
            nxt = np.array([pose[0] + dist * np.cos(yaw), pose[1] + dist * np.sin(yaw), yaw])
            if world.segment_is_free(pose[:2], nxt[:2]):
                if extra != 0.0:
                    turn_rate = 0.0  # a forced turn resets the steering, like a bump-and-turn robot
                pose, moved = nxt, True
                break
        if not moved:  # boxed in: rotate on the spot
            pose = np.array([pose[0], pose[1], wrap_angle(pose[2] + rng.choice([-1.0, 1.0]) * np.pi / 2)])
            turn_rate = 0.0
        out[t] = pose
    return out


def random_order_poses(world: World, rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 3) independent free poses in random order: the paper's query 'trajectories' (Sec. V-A)."""
    return world.sample_free_poses(n, rng)


def kidnap_pose(
    world: World,
    rng: np.random.Generator,
    current: np.ndarray | None,
    *,
    min_distance_m: float = KIDNAP_MIN_DISTANCE_M,
) -> np.ndarray:
    """A random free pose more than ``min_distance_m`` from ``current`` (any free pose if ``current`` is None).

    The kidnapped-robot test's teleport: far enough that the old belief cannot explain the new views.
    If no free pose that far exists (a tiny world), the farthest of the candidates drawn is used.
    """
    cand = world.sample_free_poses(64, rng)
    if current is None:
        return cand[0]
    d = np.hypot(cand[:, 0] - current[0], cand[:, 1] - current[1])
    far = np.flatnonzero(d > min_distance_m)
    return cand[far[0]] if far.size else cand[int(np.argmax(d))]


def kidnapped_trajectory(
    world: World,
    rng: np.random.Generator,
    current: np.ndarray | None,
    *,
    steps: int,
    min_distance_m: float = KIDNAP_MIN_DISTANCE_M,
) -> np.ndarray:
    """(steps, 3) smooth drive that starts at a :func:`kidnap_pose` away from ``current``.

    Shared by ``sim_node`` (``kidnap_at_step``) and ``dmn-bag-record --kidnap-at-step``, so both
    teleport by the same rule.
    """
    start = kidnap_pose(world, rng, current, min_distance_m=min_distance_m)
    return smooth_trajectory(world, rng, steps=steps, start=start)
