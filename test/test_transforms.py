"""Pure frame math: map→odom, interpolation across ±π, egomotion from an odometry buffer."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from dmn_ros.geometry import compose
from dmn_ros.ros.transforms import OdometryBuffer, interpolate_pose, map_to_odom


def test_map_to_odom_hand_computed():
    # Robot at (1, 0) facing +y in odom; localizer says it is at (5, 5) facing -x in map.
    # So odom is rotated by +90° in map: odom origin = (5, 5) - R(90°)·(1, 0) = (5, 4).
    mo = map_to_odom([5.0, 5.0, math.pi], [1.0, 0.0, math.pi / 2])
    np.testing.assert_allclose(mo, [5.0, 4.0, math.pi / 2], atol=1e-12)
    # Identity odometry: map→odom is the pose itself.
    np.testing.assert_allclose(map_to_odom([2.0, -1.0, 0.3], [0, 0, 0]), [2.0, -1.0, 0.3], atol=1e-12)
    # Consistency: map→odom ⊕ odom→base == map→base for random poses.
    rng = np.random.default_rng(0)
    for _ in range(20):
        mb = rng.uniform([-10, -10, -math.pi], [10, 10, math.pi])
        ob = rng.uniform([-10, -10, -math.pi], [10, 10, math.pi])
        back = compose(map_to_odom(mb, ob), ob)
        np.testing.assert_allclose(back[:2], mb[:2], atol=1e-9)
        assert abs(math.remainder(back[2] - mb[2], 2 * math.pi)) < 1e-9


def test_interpolation_across_seam():
    a = [0.0, 0.0, math.radians(170)]
    b = [2.0, 4.0, math.radians(-170)]
    mid = interpolate_pose(0.0, a, 1.0, b, 0.5)
    np.testing.assert_allclose(mid[:2], [1.0, 2.0])
    assert abs(abs(mid[2]) - math.pi) < 1e-9  # through ±180°, not through 0
    q = interpolate_pose(0.0, a, 1.0, b, 0.25)
    assert q[2] == pytest.approx(math.radians(175))
    q = interpolate_pose(0.0, b, 1.0, a, 0.25)
    assert q[2] == pytest.approx(math.radians(-175))
    np.testing.assert_allclose(interpolate_pose(0.0, a, 1.0, b, 0.0), a)


def test_buffer_interpolation_and_rejection():
    buf = OdometryBuffer(max_age_s=10.0, tolerance_s=0.1)
    assert buf.pose_at(0.0) is None
    assert buf.add(1.0, [0.0, 0.0, 3.0])
    assert buf.add(2.0, [1.0, 0.0, -3.0])
    assert not buf.add(1.5, [0, 0, 0])  # out of order
    assert not buf.add(3.0, [np.nan, 0, 0])  # NaN
    assert not buf.add(float("nan"), [0, 0, 0])
    p = buf.pose_at(1.5)
    assert p[0] == pytest.approx(0.5) and abs(abs(p[2]) - math.pi) < 1e-9
    np.testing.assert_allclose(buf.pose_at(2.05), [1.0, 0.0, -3.0])  # within tolerance
    assert buf.pose_at(2.5) is None and buf.pose_at(0.5) is None
    for t in range(3, 20):
        buf.add(float(t), [t, 0, 0])
    assert len(buf) <= 11 and buf.pose_at(1.5) is None  # old samples pruned


def test_egomotion_between_stamps_reproduces_trajectory():
    rng = np.random.default_rng(3)
    poses = [np.array([0.0, 0.0, 2.9])]
    for _ in range(10):
        poses.append(compose(poses[-1], np.array([rng.uniform(0.5, 1.0), 0.0, rng.normal(0, 0.4)])))
    buf = OdometryBuffer()
    for t, p in enumerate(poses):
        buf.add(float(t), p)
    # Egomotion between image stamps at t = 0, 3, 7, 10 composes back to the odometry poses.
    stamps = [0.0, 3.0, 7.0, 10.0]
    x = buf.pose_at(0.0)
    for t0, t1 in itertools.pairwise(stamps):
        x = compose(x, buf.egomotion(t0, t1))
    np.testing.assert_allclose(x[:2], poses[10][:2], atol=1e-9)
    assert abs(math.remainder(x[2] - poses[10][2], 2 * math.pi)) < 1e-9
    assert buf.egomotion(0.0, 50.0) is None
