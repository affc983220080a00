"""Worlds: seeded determinism, free space, trajectories and the camera model."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from dmn_ros.worlds import (
    MazeWorld,
    RoomsWorld,
    kidnapped_trajectory,
    make_world,
    random_order_poses,
    smooth_trajectory,
)
from dmn_ros.worlds.renderer import CAMERA_NAME, FirstPersonRenderer


@pytest.fixture(scope="module")
def maze() -> MazeWorld:
    with make_world("maze", seed=3, image_size=(32, 32)) as w:
        yield w


@pytest.fixture(scope="module")
def rooms() -> RoomsWorld:
    with make_world("rooms", seed=3, image_size=(32, 32)) as w:
        yield w


def test_area_conventions(maze: MazeWorld, rooms: RoomsWorld) -> None:
    for w in (maze, rooms):
        assert w.bounds == (-20.0, 20.0, -20.0, 20.0)
        assert w.area_size_m == 40.0


def test_same_seed_same_images_and_different_seed_differs(maze: MazeWorld) -> None:
    poses = maze.sample_free_poses(4, np.random.default_rng(0))
    a = maze.render(poses)
    with make_world("maze", seed=3) as again, make_world("maze", seed=4) as other:
        np.testing.assert_array_equal(a, again.render(poses))
        assert not np.array_equal(a, other.render(poses))
    assert a.shape == (4, 32, 32, 3) and a.dtype == np.uint8


def test_same_pose_renders_identically(maze: MazeWorld) -> None:
    p = maze.sample_free_poses(1, np.random.default_rng(1))
    np.testing.assert_array_equal(maze.render(np.repeat(p, 3, axis=0))[0], maze.render(p)[0])
    np.testing.assert_array_equal(maze.render(p)[0], maze.render(np.repeat(p, 3, axis=0))[2])


@pytest.mark.parametrize("domain", ["maze", "rooms"])
def test_sampled_poses_and_trajectories_stay_free(domain: str, maze: MazeWorld, rooms: RoomsWorld) -> None:
    w = maze if domain == "maze" else rooms
    rng = np.random.default_rng(2)
    poses = w.sample_free_poses(300, rng)
    assert poses.shape == (300, 3)
    assert w.is_free(poses[:, :2]).all()
    assert (w.footprints.distance(poses[:, :2]) > w.clearance_m).all()
    assert (np.abs(poses[:, :2]) < 20.0 - w.clearance_m).all()
    for _ in range(5):
        traj = smooth_trajectory(w, rng, steps=30)
        assert traj.shape == (30, 3)
        for a, b in itertools.pairwise(traj):
            assert w.segment_is_free(a[:2], b[:2], step_m=0.02)
        assert np.abs(np.diff(traj[:, :2], axis=0)).sum() > 5.0  # it actually moves
    assert w.is_free(random_order_poses(w, rng, 10)[:, :2]).all()


def test_walls_are_not_free(maze: MazeWorld) -> None:
    rows, cols = np.nonzero(maze.grid)
    xy = np.stack([-20.0 + (cols + 0.5) * maze.cell_m, 20.0 - (rows + 0.5) * maze.cell_m], axis=1)
    assert not maze.is_free(xy).any()
    # Within the clearance of a wall face is not free either.
    r, c = next((r, c) for r, c in zip(rows, cols, strict=True) if 0 < c < maze.grid.shape[1] - 1
                and not maze.grid[r, c + 1])
    face_x = -20.0 + (c + 1) * maze.cell_m
    y = 20.0 - (r + 0.5) * maze.cell_m
    assert not maze.is_free(np.array([[face_x + 0.5 * maze.clearance_m, y]]))[0]


def test_nearby_views_look_more_alike_than_random_views(maze: MazeWorld) -> None:
    rng = np.random.default_rng(5)
    poses = maze.sample_free_poses(24, rng)
    jitter = poses + np.c_[rng.normal(0, 0.1, (24, 2)), rng.normal(0, 0.05, 24)]
    ok = maze.is_free(jitter[:, :2])
    base = maze.render(poses[ok]).astype(np.float32)
    jitter = jitter[ok]
    near = np.abs(base - maze.render(jitter).astype(np.float32)).mean()
    far = np.abs(base - base[rng.permutation(len(base))]).mean()
    assert near < 0.6 * far


def test_image_size_fov_and_close() -> None:
    with make_world("rooms", seed=1, image_size=(64, 64), fov_deg=60.0) as w:
        img = w.render(np.array([[0.0, 0.0, 0.0]]))
        assert img.shape == (1, 64, 64, 3)
    with pytest.raises(RuntimeError):
        w.render(np.zeros((1, 3)))
    assert w.is_free(np.zeros((1, 2))).shape == (1,)  # free-space queries survive close()


def test_camera_follows_rep103_yaw() -> None:
    """Yaw 0 looks along +x, yaw +90° along +y, and +y appears on the left (counter-clockwise yaw)."""
    xml = f"""<mujoco><visual><headlight ambient="1 1 1" diffuse="0 0 0"/></visual><worldbody>
      <geom type="box" pos="6 0 1" size="0.5 2 2" rgba="0 1 0 1"/>
      <geom type="box" pos="0 6 1" size="2 0.5 2" rgba="1 0 0 1"/>
      <camera name="{CAMERA_NAME}" pos="0 0 1"/></worldbody></mujoco>"""
    r = FirstPersonRenderer(xml=xml, assets={}, image_size=(33, 33), fov_deg=100.0, eye_height_m=1.0)
    try:
        img = r.render(np.array([[0.0, 0.0, 0.0], [0.0, 0.0, np.pi / 2], [0.0, 0.0, np.pi / 4]])).astype(int)
    finally:
        r.close()
    assert img[0, 16, 16, 1] > 200 and img[0, 16, 16, 0] < 100  # green box ahead at +x
    assert img[1, 16, 16, 0] > 200 and img[1, 16, 16, 1] < 100  # red box ahead at +y
    left, right = img[2, 16, :8], img[2, 16, -8:]
    assert left[:, 0].max() > 200 and right[:, 1].max() > 200  # +y (red) left, +x (green) right


def test_unknown_domain() -> None:
    with pytest.raises(ValueError, match="unknown domain"):
        make_world("street", seed=0)


def test_kidnapped_trajectory_starts_far_away_in_free_space():
    """The teleport rule sim_node and dmn-bag-record share: a free start > 15 m from the robot, then a free drive."""
    with make_world("maze", seed=5, image_size=(16, 16)) as w:
        rng = np.random.default_rng(0)
        for _ in range(5):
            here = w.sample_free_poses(1, rng)[0]
            traj = kidnapped_trajectory(w, rng, here, steps=4)
            assert traj.shape == (4, 3) and float(np.hypot(*(traj[0, :2] - here[:2]))) > 15.0
            assert w.is_free(traj[:, :2]).all()
        assert kidnapped_trajectory(w, rng, None, steps=2).shape == (2, 3)  # no current pose: any free pose


def test_box_footprints_turn_as_the_rendered_boxes() -> None:
    """Free-space queries see each box at the orientation MuJoCo compiled (once radians vs degrees)."""
    import mujoco

    checked = 0
    for seed in range(20_000_000, 20_000_008):
        with make_world("rooms", seed=seed, image_size=(8, 8)) as w:
            m = w._renderer.model
            boxes = [g for g in range(m.ngeom) if m.geom_type[g] == mujoco.mjtGeom.mjGEOM_BOX]
            for x, y, hx, hy, yaw in w.footprints.rects:
                (g,) = [g for g in boxes if np.allclose(m.geom_pos[g][:2], (x, y), atol=1e-3)]
                qw, _, _, qz = m.geom_quat[g]
                rendered = 2.0 * math.atan2(qz, qw)
                assert math.remainder(rendered - yaw, 2 * math.pi) == pytest.approx(0.0, abs=1e-4)
                assert np.allclose(m.geom_size[g][:2], (hx, hy), atol=1e-4)
                checked += 1
    assert checked >= 3  # some seeds draw boxes
