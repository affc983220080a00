"""Localization episodes (contexts + query sequence + egomotion) drawn from stored or rendered views.

Odometry convention (SPEC pitfall "odometry indexing"): ``egomotion[t]`` is the motion
from step t-1 to step t in the robot frame at t-1, ``egomotion[0] = 0`` (no motion
before the first frame), so ``compose(query_poses[t-1], egomotion[t]) == query_poses[t]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np

from dmn_ros.data.dataset_format import EnvViews
from dmn_ros.geometry import relative, wrap_angle
from dmn_ros.worlds.base import World
from dmn_ros.worlds.trajectories import smooth_trajectory

__all__ = [
    "ContextMode",
    "Episode",
    "QueryMode",
    "egomotion_from_poses",
    "generate_env_views",
    "sample_episode_from_views",
]


class QueryMode(str, Enum):
    """How query poses are ordered."""

    SEGMENT = "segment"
    """Consecutive frames of one smooth stored trajectory (robot-like odometry)."""
    RANDOM_ORDER = "random_order"
    """Independent views in random order: the paper's query 'trajectories'."""


class ContextMode(str, Enum):
    """How context views are chosen."""

    RANDOM = "random"
    """Uniformly among the other views of the environment (the paper)."""
    NEAR = "near"
    """Near the first query pose, for an easy-to-hard training curriculum."""


@dataclass
class Episode:
    """One sparse-localization problem in one environment, metric units."""

    context_images: np.ndarray
    """(Nc, H, W, 3) uint8."""
    context_poses: np.ndarray
    """(Nc, 3) float64 (x, y, yaw)."""
    query_images: np.ndarray
    """(T, H, W, 3) uint8."""
    query_poses: np.ndarray
    """(T, 3) float64 ground truth."""
    egomotion: np.ndarray
    """(T, 3) odometry the filter sees (noisy if noise was requested); row 0 is zero."""
    egomotion_true: np.ndarray
    """(T, 3) exact relative motion; composing it reproduces query_poses."""
    area_size_m: float
    """Side of the square area in meters."""
    env_id: str
    """Environment name."""


def egomotion_from_poses(
    poses: np.ndarray,
    *,
    rng: np.random.Generator | None = None,
    noise_std: tuple[float, float] = (0.0, 0.0),
) -> tuple[np.ndarray, np.ndarray]:
    """(noisy, exact) egomotion (T, 3) for poses (T, 3); noise is Gaussian (σ meters, σ radians)."""
    poses = np.asarray(poses, dtype=np.float64)
    exact = np.zeros_like(poses)
    exact[1:] = relative(poses[:-1], poses[1:])
    noisy = exact.copy()
    sm, sr = noise_std
    if (sm > 0 or sr > 0) and len(poses) > 1:
        if rng is None:
            raise ValueError("odometry noise requested without an rng")
        noisy[1:, :2] += rng.normal(0.0, sm, size=(len(poses) - 1, 2))
        noisy[1:, 2] = wrap_angle(noisy[1:, 2] + rng.normal(0.0, sr, size=len(poses) - 1))
    return noisy, exact


def generate_env_views(
    world: World,
    rng: np.random.Generator,
    *,
    num_trajectories: int,
    steps: int,
    name: str = "",
    dt_s: float = 0.5,
) -> EnvViews:
    """Render ``num_trajectories`` smooth trajectories of ``steps`` poses each as one environment's views."""
    poses = np.concatenate([smooth_trajectory(world, rng, steps=steps) for _ in range(num_trajectories)])
    ids = np.repeat(np.arange(num_trajectories, dtype=np.int32), steps)
    # Trajectories are separate runs: leave a gap between them so stamps never suggest continuity.
    stamps = ids.astype(np.float64) * (steps + 10) * dt_s + np.tile(np.arange(steps), num_trajectories) * dt_s
    return EnvViews(images=world.render(poses), poses=poses, stamps=stamps, trajectory_ids=ids, name=name)


def _choose(rng: np.random.Generator, pool: np.ndarray, k: int) -> np.ndarray:
    """k distinct items of pool when possible, else with repetition (tiny environments)."""
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    return rng.choice(pool, size=k, replace=len(pool) < k)


def sample_episode_from_views(
    views: EnvViews,
    rng: np.random.Generator,
    *,
    num_contexts: int,
    T: int,
    query_mode: QueryMode | str = QueryMode.SEGMENT,
    context_mode: ContextMode | str = ContextMode.RANDOM,
    near_radius_m: float = 5.0,
    near_yaw_deg: float = 180.0,
    far_fraction: float = 0.0,
    odom_noise: tuple[float, float] = (0.0, 0.0),
    area_size_m: float = 40.0,
) -> Episode:
    """Draw one episode; contexts are other views of the same environment, never the query frames.

    ``context_mode="near"`` takes contexts within ``near_radius_m`` of the first query
    position whose heading differs by at most ``near_yaw_deg`` (so they see what the
    query sees; the nearest ones if too few qualify) and replaces a
    ``far_fraction`` of them by random views farther away, so attention learns to ignore them.
    """
    query_mode, context_mode = QueryMode(query_mode), ContextMode(context_mode)
    n = len(views.poses)
    if query_mode is QueryMode.SEGMENT:
        trajs = [t for t in views.trajectories() if len(t) >= T]
        if not trajs:
            raise ValueError(f"{views.name}: no stored trajectory has {T} steps")
        traj = trajs[int(rng.integers(len(trajs)))]
        start = int(rng.integers(len(traj) - T + 1))
        q = traj[start:start + T]
    else:
        q = rng.choice(n, size=T, replace=n < T)
    pool = np.setdiff1d(np.arange(n), q)
    if len(pool) == 0:
        raise ValueError(f"{views.name}: no views left for contexts after taking {T} queries")

    if context_mode is ContextMode.RANDOM:
        c = _choose(rng, pool, num_contexts)
    else:
        n_far = round(far_fraction * num_contexts)
        n_near = num_contexts - n_far
        dist = np.hypot(*(views.poses[pool, :2] - views.poses[q[0], :2]).T)
        dyaw = np.abs(wrap_angle(views.poses[pool, 2] - views.poses[q[0], 2]))
        ok = (dist <= near_radius_m) & (dyaw <= np.radians(near_yaw_deg))
        near_pool = pool[ok]
        if len(near_pool) >= n_near:
            near = _choose(rng, near_pool, n_near)
        else:  # closest in position, heading mismatch counted as distance (1 rad ~ the radius)
            score = dist + near_radius_m * np.maximum(dyaw - np.radians(near_yaw_deg), 0.0)
            near = pool[np.argsort(score, kind="stable")[:n_near]]
        far_pool = np.setdiff1d(pool[dist > near_radius_m], near)
        far = _choose(rng, far_pool if len(far_pool) else np.setdiff1d(pool, near), n_far)
        c = rng.permutation(np.concatenate([near, far]))
    noisy, exact = egomotion_from_poses(views.poses[q], rng=rng, noise_std=odom_noise)
    return Episode(
        context_images=views.images[c],
        context_poses=views.poses[c].copy(),
        query_images=views.images[q],
        query_poses=views.poses[q].copy(),
        egomotion=noisy,
        egomotion_true=exact,
        area_size_m=float(area_size_m),
        env_id=views.name,
    )
