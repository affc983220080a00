"""Headless MuJoCo rendering shared by the world domains.

One :class:`FirstPersonRenderer` owns one ``mujoco.Renderer`` (one GL context)
and is reused for every image of a world, because creating GL contexts is the
slow and leaky part of offscreen rendering. The camera is posed by writing
``data.cam_xpos``/``data.cam_xmat`` directly, so no physics step runs per frame.
"""

from __future__ import annotations

import os

# Headless by default; users with a display or EGL can still override these.
os.environ.setdefault("MUJOCO_GL", "osmesa")
os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])

import math
from functools import lru_cache
from pathlib import Path

import cv2
import mujoco
import numpy as np

__all__ = ["CAMERA_NAME", "FirstPersonRenderer", "load_texture_png"]

CAMERA_NAME = "eye"
"""Name of the first-person camera in every generated MJCF scene."""


@lru_cache(maxsize=256)
def load_texture_png(path: str, size: int = 64) -> bytes:
    """Read a texture, shrink it to ``size``×``size`` and return PNG bytes for MuJoCo assets.

    Small textures keep model compilation and software rendering fast; at 32×32
    images the lost detail is invisible anyway.
    """
    img = cv2.imread(str(Path(path)), cv2.IMREAD_COLOR)
    if img is None:
        raise FileNotFoundError(f"cannot read texture {path}")
    img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise RuntimeError(f"cannot encode texture {path}")
    return buf.tobytes()


class FirstPersonRenderer:
    """Renders RGB images from a planar pose ``(x, y, yaw)`` at a fixed eye height."""

    def __init__(
        self,
        *,
        xml: str,
        assets: dict[str, bytes],
        image_size: tuple[int, int],
        fov_deg: float,
        eye_height_m: float,
    ) -> None:
        self.model = mujoco.MjModel.from_xml_string(xml, assets)
        self.data = mujoco.MjData(self.model)
        mujoco.mj_forward(self.model, self.data)
        h, w = int(image_size[0]), int(image_size[1])
        self.image_size = (h, w)
        self.eye_height_m = float(eye_height_m)
        self._cam_id = mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_CAMERA, CAMERA_NAME)
        if self._cam_id < 0:
            raise ValueError(f"scene has no camera named {CAMERA_NAME!r}")
        # fov_deg is the horizontal field of view; MuJoCo wants the vertical one.
        half_h = math.radians(fov_deg) / 2.0
        self.model.cam_fovy[self._cam_id] = math.degrees(2.0 * math.atan(math.tan(half_h) * h / w))
        self.model.vis.global_.offwidth = max(self.model.vis.global_.offwidth, w)
        self.model.vis.global_.offheight = max(self.model.vis.global_.offheight, h)
        self._renderer: mujoco.Renderer | None = mujoco.Renderer(self.model, height=h, width=w)

    def render(self, poses: np.ndarray) -> np.ndarray:
        """Images ``(N, H, W, 3)`` uint8 RGB for poses ``(N, 3)``."""
        if self._renderer is None:
            raise RuntimeError("renderer is closed")
        poses = np.asarray(poses, dtype=np.float64).reshape(-1, 3)
        h, w = self.image_size
        out = np.empty((len(poses), h, w, 3), dtype=np.uint8)
        for i, (x, y, yaw) in enumerate(poses):
            c, s = math.cos(yaw), math.sin(yaw)
            # MuJoCo cameras look along their local -z with +y up: columns are (right, up, back).
            xmat = np.array([[s, 0.0, -c], [-c, 0.0, -s], [0.0, 1.0, 0.0]])
            self.data.cam_xpos[self._cam_id] = (x, y, self.eye_height_m)
            self.data.cam_xmat[self._cam_id] = xmat.reshape(-1)
            self._renderer.update_scene(self.data, camera=self._cam_id)
            self._renderer.render(out=out[i])
        return out

    def close(self) -> None:
        """Free the GL context now rather than at garbage collection."""
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
