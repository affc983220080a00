"""DeepMind-Lab-like random mazes (the paper's Mazes domain) built from labmaze layouts.

Walls reuse a handful of textures from one labmaze style, so corridors look alike
and single views are ambiguous, which is what makes the domain hard for localization.
"""

from __future__ import annotations

from pathlib import Path

import labmaze
import labmaze.assets
import numpy as np

from dmn_ros.worlds.base import World, cube_material
from dmn_ros.worlds.renderer import load_texture_png

__all__ = ["MazeWorld", "maze_textures"]

_ASSET_DIR = Path(labmaze.assets.__file__).parent


def maze_textures() -> dict[str, tuple[list[Path], list[Path]]]:
    """Per labmaze style, the (wall, floor) texture files shipped in the labmaze wheel."""
    out = {}
    for style in labmaze.assets.MAZE_STYLES:
        d = _ASSET_DIR / style
        out[style] = (sorted(d.glob("wall_*.png")), sorted(d.glob("floor_*.png")))
    return out


def _wall_runs(grid: np.ndarray) -> list[tuple[int, int, int]]:
    """Merge wall cells into horizontal runs (row, col_start, col_end_exclusive): fewer geoms, faster."""
    runs = []
    for r in range(grid.shape[0]):
        c = 0
        while c < grid.shape[1]:
            if grid[r, c]:
                start = c
                while c < grid.shape[1] and grid[r, c]:
                    c += 1
                runs.append((r, start, c))
            else:
                c += 1
    return runs


class MazeWorld(World):
    """A random labmaze layout scaled to fill the 40 m × 40 m area, walls as textured boxes.

    Grid row 0 is the top of the labmaze printout and maps to +y; column 0 maps to -x.
    """

    domain = "maze"

    def __init__(
        self,
        *,
        seed: int,
        image_size: tuple[int, int] = (32, 32),
        fov_deg: float = 90.0,
        maze_cells: int = 13,
        clearance_m: float = 0.8,
        texture_px: int = 64,
        num_wall_textures: int = 3,
    ) -> None:
        if maze_cells % 2 == 0 or maze_cells < 5:
            raise ValueError(f"maze_cells must be odd and >= 5, got {maze_cells}")
        rng = np.random.default_rng([int(seed), 0x3A2E])
        self.cell_m = 40.0 / maze_cells
        """Side of one maze cell in meters."""
        super().__init__(
            seed=seed,
            image_size=image_size,
            fov_deg=fov_deg,
            clearance_m=clearance_m,
            eye_height_m=0.4 * self.cell_m,
        )
        maze = labmaze.RandomMaze(
            height=maze_cells,
            width=maze_cells,
            max_rooms=max(1, maze_cells // 4),
            room_min_size=3,
            room_max_size=3,
            extra_connection_probability=0.05,
            simplify=False,  # keep dead ends so the maze fills the whole area
            spawns_per_room=0,
            objects_per_room=0,
            random_seed=int(rng.integers(2**31 - 1)),
        )
        self.layout = str(maze.entity_layer)
        """The labmaze text layout ('*' = wall), for debugging and docs."""
        self.grid = np.array([[ch == "*" for ch in row] for row in self.layout.strip("\n").split("\n")])
        """(rows, cols) bool, True where a wall cell is."""

        styles = maze_textures()
        style = sorted(styles)[int(rng.integers(len(styles)))]
        walls, floors = styles[style]
        wall_files = [walls[i] for i in rng.choice(len(walls), size=min(num_wall_textures, len(walls)),
                                                    replace=False)]
        floor_file = floors[int(rng.integers(len(floors)))]
        sky_style = labmaze.assets.SKY_STYLES[int(rng.integers(len(labmaze.assets.SKY_STYLES)))]
        self.textures = {"style": style, "walls": [p.name for p in wall_files], "floor": floor_file.name,
                         "sky": sky_style}
        """Names of the textures this environment uses."""

        rects, geoms = [], []
        h = self.cell_m / 2.0
        for r, c0, c1 in _wall_runs(self.grid):
            cx = -20.0 + (c0 + c1) / 2.0 * self.cell_m
            cy = 20.0 - (r + 0.5) * self.cell_m
            hx = (c1 - c0) * h
            rects.append((cx, cy, hx, h, 0.0))
            mat = f"wall{int(rng.integers(len(wall_files)))}"
            geoms.append(f'<geom type="box" pos="{cx:.6f} {cy:.6f} {h:.6f}" size="{hx:.6f} {h:.6f} {h:.6f}" '
                         f'material="{mat}"/>')
        self.footprints.rects = np.array(rects, dtype=np.float64).reshape(-1, 5)

        assets: dict[str, bytes] = {"floor.png": load_texture_png(str(floor_file), texture_px)}
        for i, p in enumerate(wall_files):
            assets[f"wall{i}.png"] = load_texture_png(str(p), texture_px)
        sky = labmaze.assets.get_sky_texture_paths(sky_style)
        for side in ("left", "right", "up", "down", "front", "back"):
            assets[f"sky_{side}.png"] = load_texture_png(getattr(sky, side), texture_px)
        rep = f"{1.0 / self.cell_m:.6f}"  # one texture tile per maze cell
        materials = [cube_material(f"wall{i}", f'file="wall{i}.png"', f"{rep} {rep}") for i in range(len(wall_files))]
        sky = " ".join(f'file{side}="sky_{side}.png"' for side in ("left", "right", "up", "down", "front", "back"))
        self._start_scene(ambient=0.45, diffuse=0.35, light=0.4, sky=sky, floor='file="floor.png"',
                          texrepeat=f"{rep} {rep}", materials=materials, floor_half=20, geoms=geoms, assets=assets)
