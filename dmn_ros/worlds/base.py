"""The world interface shared by all domains: free space, bounds and first-person rendering.

Obstacles are kept as exact 2-D footprints (rotated rectangles and circles) so that
``is_free`` and segment checks are analytic and independent of any raster
resolution; a raster is derived from them only for pictures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import TracebackType

import numpy as np

from dmn_ros.worlds.renderer import CAMERA_NAME, FirstPersonRenderer

__all__ = ["AREA_SIZE_M", "Footprints", "World", "cube_material"]

AREA_SIZE_M = 40.0
"""Side of the square environment in meters (the paper's 40 m × 40 m), centered on the origin."""


@dataclass
class Footprints:
    """Obstacle footprints on the ground plane, in meters."""

    rects: np.ndarray = field(default_factory=lambda: np.zeros((0, 5)))
    """(M, 5) rotated rectangles (cx, cy, half_x, half_y, yaw)."""
    circles: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    """(K, 3) circles (cx, cy, radius)."""

    def distance(self, xy: np.ndarray) -> np.ndarray:
        """Distance (N,) from each point (N, 2) to the nearest obstacle (0 inside one, inf if none)."""
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        d = np.full(len(xy), np.inf)
        if len(self.rects):
            r = self.rects
            dx = xy[:, None, 0] - r[None, :, 0]  # (N, M)
            dy = xy[:, None, 1] - r[None, :, 1]
            c, s = np.cos(r[:, 4]), np.sin(r[:, 4])
            lx = np.abs(c * dx + s * dy) - r[:, 2]  # point in the rectangle's frame, minus half size
            ly = np.abs(-s * dx + c * dy) - r[:, 3]
            out = np.hypot(np.maximum(lx, 0.0), np.maximum(ly, 0.0))
            d = np.minimum(d, out.min(axis=1))
        if len(self.circles):
            c = self.circles
            dist = np.hypot(xy[:, None, 0] - c[None, :, 0], xy[:, None, 1] - c[None, :, 1]) - c[None, :, 2]
            d = np.minimum(d, np.maximum(dist, 0.0).min(axis=1))
        return d


def cube_material(name: str, texture: str, texrepeat: str) -> str:
    """MJCF for a cube texture ``name`` with the given source attributes, and the material ``name`` tiling it."""
    return (f'<texture name="{name}" type="cube" {texture}/>'
            f'<material name="{name}" texture="{name}" texrepeat="{texrepeat}" texuniform="true" specular="0"/>')


class World:
    """A seeded environment: obstacle footprints plus a MuJoCo scene seen from a planar pose.

    Subclasses build ``self.footprints`` and call :meth:`_start_renderer` with their MJCF.
    Use as a context manager or call :meth:`close` so the GL context is freed promptly.
    """

    domain: str = "base"

    def __init__(
        self,
        *,
        seed: int,
        image_size: tuple[int, int],
        fov_deg: float,
        clearance_m: float,
        eye_height_m: float,
    ) -> None:
        self.seed = int(seed)
        """Seed that fully determines the layout, textures and therefore every image."""
        self.image_size = (int(image_size[0]), int(image_size[1]))
        """(H, W) of rendered images."""
        self.fov_deg = float(fov_deg)
        """Horizontal field of view of the camera."""
        self.clearance_m = float(clearance_m)
        """Minimum distance between a free pose and any obstacle, so the camera never clips a wall."""
        self.eye_height_m = float(eye_height_m)
        """Camera height above the floor."""
        self.area_size_m = AREA_SIZE_M
        """Side length of the square area in meters."""
        half = self.area_size_m / 2.0
        self.bounds = (-half, half, -half, half)
        """(xmin, xmax, ymin, ymax) of the area in meters."""
        self.footprints = Footprints()
        """Obstacle footprints used for free-space queries."""
        self._renderer: FirstPersonRenderer | None = None

    # --- scene -----------------------------------------------------------------------------------
    def _start_renderer(self, xml: str, assets: dict[str, bytes]) -> None:
        self._renderer = FirstPersonRenderer(
            xml=xml,
            assets=assets,
            image_size=self.image_size,
            fov_deg=self.fov_deg,
            eye_height_m=self.eye_height_m,
        )

    def _start_scene(self, *, ambient: float, diffuse: float, light: float, sky: str, floor: str, texrepeat: str,
                     materials: list[str], floor_half: float, geoms: list[str], assets: dict[str, bytes]) -> None:
        """Starts the renderer on the MJCF scene all domains share: a skybox, a textured floor plane of half side
        ``floor_half``, the ``geoms`` on it, one directional light and the first-person camera.

        ``ambient``, ``diffuse``: the headlight's grey levels; ``light``: the directional light's; ``sky``,
        ``floor``: the source attributes of their ``<texture>``; ``texrepeat``: the floor material's;
        ``materials``: the walls' textures and materials (:func:`cube_material`).
        """
        materials_xml = "\n".join(materials)
        xml = f"""
<mujoco model="{self.domain}_{self.seed}">
  <statistic extent="40" center="0 0 1"/>
  <visual>
    <quality shadowsize="0" offsamples="0"/>
    <map znear="0.004" zfar="3"/>
    <headlight ambient="{ambient} {ambient} {ambient}" diffuse="{diffuse} {diffuse} {diffuse}" specular="0 0 0"/>
  </visual>
  <asset>
    <texture name="sky" type="skybox" {sky}/>
    <texture name="floor" type="2d" {floor}/>
    <material name="floor" texture="floor" texrepeat="{texrepeat}" texuniform="true" specular="0"/>
    {materials_xml}
  </asset>
  <worldbody>
    <light directional="true" pos="0 0 30" dir="0.3 0.2 -1" diffuse="{light} {light} {light}" castshadow="false"/>
    <geom type="plane" size="{floor_half} {floor_half} 0.1" material="floor"/>
    {"".join(geoms)}
    <camera name="{CAMERA_NAME}" pos="0 0 {self.eye_height_m:.6f}"/>
  </worldbody>
</mujoco>
"""
        self._start_renderer(xml, assets)

    def render(self, poses: np.ndarray) -> np.ndarray:
        """First-person RGB images (N, H, W, 3) uint8 at metric poses (N, 3) = (x, y, yaw)."""
        if self._renderer is None:
            raise RuntimeError(f"{type(self).__name__} is closed")
        return self._renderer.render(poses)

    def close(self) -> None:
        """Release the GL context; the free-space queries keep working."""
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None

    def __enter__(self) -> World:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- free space ------------------------------------------------------------------------------
    def is_free(self, xy: np.ndarray) -> np.ndarray:
        """Bool (N,): point (N, 2) is inside the area and at least ``clearance_m`` from every obstacle."""
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        xmin, xmax, ymin, ymax = self.bounds
        m = self.clearance_m
        inside = (xy[:, 0] > xmin + m) & (xy[:, 0] < xmax - m) & (xy[:, 1] > ymin + m) & (xy[:, 1] < ymax - m)
        return inside & (self.footprints.distance(xy) > m)

    def segment_is_free(self, a: np.ndarray, b: np.ndarray, *, step_m: float = 0.1) -> bool:
        """Whether the straight segment between points a (2,) and b (2,) stays in free space."""
        a, b = np.asarray(a, dtype=np.float64)[:2], np.asarray(b, dtype=np.float64)[:2]
        n = max(2, int(np.ceil(np.linalg.norm(b - a) / step_m)) + 1)
        t = np.linspace(0.0, 1.0, n)[:, None]
        return bool(self.is_free(a + t * (b - a)).all())

    def sample_free_poses(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """(n, 3) poses uniform over free space and uniform in yaw, by rejection sampling."""
        xmin, xmax, ymin, ymax = self.bounds
        out = np.zeros((0, 2))
        for _ in range(1000):
            cand = rng.uniform((xmin, ymin), (xmax, ymax), size=(max(2 * n, 16), 2))
            out = np.concatenate([out, cand[self.is_free(cand)]])
            if len(out) >= n:
                break
        else:
            raise RuntimeError(f"{self.domain} world {self.seed}: too little free space to sample")
        yaw = rng.uniform(-np.pi, np.pi, size=n)
        return np.concatenate([out[:n], yaw[:, None]], axis=1)

    def occupancy(self, resolution_m: float = 0.1) -> np.ndarray:
        """Bool raster (rows=y ascending, cols=x ascending) of non-free cells, for plots."""
        xmin, xmax, ymin, ymax = self.bounds
        xs = np.arange(xmin + resolution_m / 2, xmax, resolution_m)
        ys = np.arange(ymin + resolution_m / 2, ymax, resolution_m)
        gx, gy = np.meshgrid(xs, ys)
        pts = np.stack([gx.ravel(), gy.ravel()], axis=1)
        return (self.footprints.distance(pts) <= 0.0).reshape(gy.shape)
