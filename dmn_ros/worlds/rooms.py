"""Procedural square rooms with random objects (the paper's Rooms domain, in the spirit of GQN rooms)."""

from __future__ import annotations

import math

import numpy as np

from dmn_ros.worlds.base import World, cube_material

__all__ = ["RoomsWorld"]

_SHAPES = ("box", "sphere", "cylinder", "capsule")


def _rgb(rng: np.random.Generator, lo: float = 0.1, hi: float = 0.95) -> str:
    return " ".join(f"{v:.4f}" for v in rng.uniform(lo, hi, size=3))


class RoomsWorld(World):
    """One 40 m square room, random wall/floor textures and 3–7 random objects of random colours."""

    domain = "rooms"

    def __init__(
        self,
        *,
        seed: int,
        image_size: tuple[int, int] = (32, 32),
        fov_deg: float = 90.0,
        clearance_m: float = 0.8,
        min_objects: int = 3,
        max_objects: int = 7,
    ) -> None:
        super().__init__(
            seed=seed, image_size=image_size, fov_deg=fov_deg, clearance_m=clearance_m, eye_height_m=1.6
        )
        rng = np.random.default_rng([int(seed), 0x2005])
        half = self.area_size_m / 2.0
        wall_h = 8.0
        geoms = []
        # Four walls just outside the area, so the area itself stays the room's floor.
        for i, (cx, cy, hx, hy) in enumerate(
            [(0, half + 0.5, half + 1, 0.5), (0, -half - 0.5, half + 1, 0.5),
             (half + 0.5, 0, 0.5, half + 1), (-half - 0.5, 0, 0.5, half + 1)]
        ):
            geoms.append(f'<geom type="box" pos="{cx} {cy} {wall_h / 2}" size="{hx} {hy} {wall_h / 2}" '
                         f'material="wall{i % 2}"/>')

        rects, circles, placed = [], [], []  # placed: (x, y, radius) bounding circles
        n_obj = int(rng.integers(min_objects, max_objects + 1))
        self.objects: list[dict] = []
        """Objects as dicts (shape, x, y, size, rgba), for docs and debugging."""
        for _ in range(200):
            if len(placed) >= n_obj:
                break
            shape = _SHAPES[int(rng.integers(len(_SHAPES)))]
            r = float(rng.uniform(1.5, 4.0))  # footprint radius / half-extent in meters
            x, y = rng.uniform(-half + r + 3.0, half - r - 3.0, size=2)
            # Keep a passage of several clearances between objects so free space stays connected.
            if any(np.hypot(x - px, y - py) < r + pr + 4 * self.clearance_m for px, py, pr in placed):
                continue
            placed.append((x, y, r))
            rgba = _rgb(rng) + " 1"
            xy = f"{x:.4f} {y:.4f}"
            if shape == "box":
                hx, hy, hz = r, float(rng.uniform(0.5, 1.0)) * r, float(rng.uniform(1.0, 3.0))
                # A small turn, in degrees: MuJoCo reads euler in degrees (the scene sets no angle unit), and
                # every rooms dataset and the rooms model were rendered with this draw read that way. The
                # footprint once took the same number as radians, so free-space queries saw a box turned by up
                # to 180° where the camera saw it nearly square, and poses could land inside boxes.
                turn_deg = float(rng.uniform(-np.pi, np.pi))
                geoms.append(f'<geom type="box" pos="{xy} {hz:.5f}" size="{hx:.5f} {hy:.5f} {hz:.5f}" '
                             f'euler="0 0 {turn_deg:.6f}" rgba="{rgba}"/>')
                rects.append((x, y, hx, hy, math.radians(turn_deg)))
            elif shape == "sphere":
                geoms.append(f'<geom type="sphere" pos="{xy} {r:.5f}" size="{r:.5f}" rgba="{rgba}"/>')
                circles.append((x, y, r))
            elif shape == "cylinder":
                hz = float(rng.uniform(1.0, 3.5))
                geoms.append(f'<geom type="cylinder" pos="{xy} {hz:.5f}" size="{r:.5f} {hz:.5f}" '
                             f'rgba="{rgba}"/>')
                circles.append((x, y, r))
            else:  # upright capsule
                hz = float(rng.uniform(0.3, 1.5))
                geoms.append(f'<geom type="capsule" pos="{xy} {hz + r:.5f}" size="{r:.5f} {hz:.5f}" '
                             f'rgba="{rgba}"/>')
                circles.append((x, y, r))
            self.objects.append({"shape": shape, "x": float(x), "y": float(y), "size": r, "rgba": rgba})
        self.footprints.rects = np.array(rects, dtype=np.float64).reshape(-1, 5)
        self.footprints.circles = np.array(circles, dtype=np.float64).reshape(-1, 3)

        builtin = ("checker", "gradient", "flat")
        materials = [cube_material(f"wall{i}", f'builtin="{builtin[int(rng.integers(3))]}" rgb1="{_rgb(rng)}" '
                                   f'rgb2="{_rgb(rng)}" width="64" height="64"', "0.25 0.25") for i in range(2)]
        sky = f'builtin="gradient" rgb1="{_rgb(rng, 0.6, 1.0)}" rgb2="0.2 0.2 0.3" width="64" height="64"'
        floor = f'builtin="checker" rgb1="{_rgb(rng)}" rgb2="{_rgb(rng)}" width="64" height="64"'
        self._start_scene(ambient=0.4, diffuse=0.4, light=0.5, sky=sky, floor=floor, texrepeat="0.25 0.25",
                          materials=materials, floor_half=half + 1, geoms=geoms, assets={})
