"""TUM trajectory files: one pose per line, ``timestamp tx ty tz qx qy qz qw`` (evo, rpg tools read them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dmn_ros.files import atomic_write_text
from dmn_ros.geometry import quaternion_to_yaw, yaw_to_quaternion

__all__ = ["read_tum", "write_tum"]


def write_tum(path: str | Path, stamps: np.ndarray, poses: np.ndarray) -> None:
    """Write ``(N,)`` stamps (s) and ``(N, 3)`` planar poses; z = 0, rotation about z only. Atomic."""
    path = Path(path)
    stamps = np.asarray(stamps, dtype=np.float64).reshape(-1)
    poses = np.asarray(poses, dtype=np.float64).reshape(-1, 3)
    if len(stamps) != len(poses):
        raise ValueError(f"{path}: {len(stamps)} stamps for {len(poses)} poses")
    lines = ["# timestamp tx ty tz qx qy qz qw"]
    for t, p in zip(stamps, poses, strict=True):
        q = yaw_to_quaternion(np.float64(p[2]))
        lines.append(f"{t:.9f} {p[0]:.9f} {p[1]:.9f} 0.0 {q[0]:.12f} {q[1]:.12f} {q[2]:.12f} {q[3]:.12f}")
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_tum(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(N,)`` stamps and ``(N, 3)`` planar ``(x, y, yaw)`` (yaw from the quaternion); ``#`` lines skipped."""
    stamps, poses = [], []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        v = line.split()
        if len(v) != 8:
            raise ValueError(f"{path}:{i}: expected 8 numbers (timestamp tx ty tz qx qy qz qw), got {len(v)}")
        f = [float(x) for x in v]
        q = np.array(f[4:8])
        stamps.append(f[0])
        poses.append([f[1], f[2], float(quaternion_to_yaw(q / np.linalg.norm(q)))])
    return np.array(stamps, dtype=np.float64), np.array(poses, dtype=np.float64).reshape(-1, 3)
