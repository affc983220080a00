"""Simulated environments for training and testing DMN: seeded mazes and rooms rendered with MuJoCo.

Every world is a 40 m × 40 m area centered on the origin, with REP-103 poses
``(x, y, yaw)`` in meters/radians, free-space queries with a clearance margin,
and a first-person camera. The same seed always gives bit-identical images.
"""

from __future__ import annotations

from typing import Any

from dmn_ros.worlds.base import AREA_SIZE_M, Footprints, World
from dmn_ros.worlds.maze import MazeWorld
from dmn_ros.worlds.rooms import RoomsWorld
from dmn_ros.worlds.trajectories import (
    KIDNAP_MIN_DISTANCE_M,
    kidnap_pose,
    kidnapped_trajectory,
    random_order_poses,
    smooth_trajectory,
)

__all__ = [
    "AREA_SIZE_M",
    "DOMAINS",
    "KIDNAP_MIN_DISTANCE_M",
    "Footprints",
    "MazeWorld",
    "RoomsWorld",
    "World",
    "kidnap_pose",
    "kidnapped_trajectory",
    "make_world",
    "random_order_poses",
    "smooth_trajectory",
]

DOMAINS: dict[str, type[World]] = {"maze": MazeWorld, "rooms": RoomsWorld}
"""Domain name -> world class."""


def make_world(
    domain: str,
    *,
    seed: int,
    image_size: tuple[int, int] = (32, 32),
    fov_deg: float = 90.0,
    **kwargs: Any,
) -> World:
    """Build the ``domain`` ("maze" or "rooms") world of ``seed``; close it (or use ``with``) after use."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; choose one of {sorted(DOMAINS)}")
    return DOMAINS[domain](seed=seed, image_size=tuple(image_size), fov_deg=fov_deg, **kwargs)
