"""Hand-computed SE(2) cases; every function is checked on numpy and torch."""

import math

import numpy as np
import pytest
import torch

from dmn_ros.geometry import (
    MetricScale,
    compose,
    egocentric_viewpoints,
    inverse,
    quaternion_to_yaw,
    relative,
    wrap_angle,
    yaw_to_quaternion,
)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_egocentric_hand_case(kind):
    ctx = np.array([[1.0, 0.0, 0.0]])
    par = np.array([[0.0, 0.0, math.pi / 2]])
    if kind == "torch":
        ctx, par = torch.from_numpy(ctx), torch.from_numpy(par)
    out = np.asarray(egocentric_viewpoints(ctx, par))
    # Context straight ahead on +x is on the right (−y) of a robot facing +y; dψ = −π/2.
    np.testing.assert_allclose(out[0, 0], [0.0, -1.0, -1.0, 0.0], atol=1e-12)


def test_egocentric_near_the_seam():
    par = np.array([[0.0, 0.0, math.pi - 0.01]])
    ctx = np.array([[-1.0, 0.0, -math.pi + 0.01]])
    out = egocentric_viewpoints(ctx, par)[0, 0]
    # Robot faces ~−x; a context at x=−1 is ~1 m ahead, slightly left; dψ = 0.02 after wrapping.
    np.testing.assert_allclose(out, [math.cos(0.01), math.sin(0.01), math.sin(0.02), math.cos(0.02)], atol=1e-12)


def test_egocentric_shapes_batch():
    ctx = torch.randn(2, 5, 3)
    par = torch.randn(2, 7, 3)
    assert egocentric_viewpoints(ctx, par).shape == (2, 7, 5, 4)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_compose_inverse_identity(kind):
    rng = np.random.default_rng(0)
    a = rng.uniform(-5, 5, size=(50, 3))
    b = rng.uniform(-5, 5, size=(50, 3))
    if kind == "torch":
        a, b = torch.from_numpy(a), torch.from_numpy(b)
    ident = np.asarray(compose(a, inverse(a)))
    np.testing.assert_allclose(ident, np.zeros((50, 3)), atol=1e-12)
    np.testing.assert_allclose(np.asarray(compose(inverse(a), a)), np.zeros((50, 3)), atol=1e-12)
    back = np.asarray(compose(a, relative(a, b)))
    np.testing.assert_allclose(back[:, :2], np.asarray(b)[:, :2], atol=1e-12)
    np.testing.assert_allclose(np.asarray(wrap_angle(back[:, 2] - np.asarray(b)[:, 2])), 0.0, atol=1e-12)


def test_compose_hand_case():
    # Robot at (1, 1) facing +y moves 1 m forward and turns left 90°: ends at (1, 2) facing −x.
    out = compose(np.array([1.0, 1.0, math.pi / 2]), np.array([1.0, 0.0, math.pi / 2]))
    np.testing.assert_allclose(out[:2], [1.0, 2.0], atol=1e-12)
    assert abs(abs(out[2]) - math.pi) < 1e-12


def test_wrap_angle():
    a = np.array([0.0, math.pi / 2, 3 * math.pi, -3 * math.pi / 2, 7.0, -7.0])
    w = wrap_angle(a)
    assert np.all(w >= -math.pi) and np.all(w < math.pi)
    np.testing.assert_allclose(np.sin(w), np.sin(a), atol=1e-12)
    np.testing.assert_allclose(np.cos(w), np.cos(a), atol=1e-12)
    np.testing.assert_allclose(w[3], math.pi / 2, atol=1e-12)
    t = wrap_angle(torch.tensor([-7.0]))
    assert -math.pi <= float(t) < math.pi  # fmod would give -0.717 here too, but 7.0 → 0.717


def test_quaternion_roundtrip_and_scale_free():
    yaws = np.linspace(-math.pi + 1e-6, math.pi - 1e-6, 17)
    q = yaw_to_quaternion(yaws)
    np.testing.assert_allclose(np.linalg.norm(q, axis=-1), 1.0)
    np.testing.assert_allclose(quaternion_to_yaw(q), yaws, atol=1e-12)
    np.testing.assert_allclose(quaternion_to_yaw(3.0 * q), yaws, atol=1e-12)
    np.testing.assert_allclose(yaw_to_quaternion(np.array(math.pi / 2)), [0, 0, math.sqrt(0.5), math.sqrt(0.5)])


def test_metric_scale_roundtrip():
    s = MetricScale(meters_per_unit=20.0, origin_x=5.0, origin_y=-3.0)
    pose = np.array([[25.0, -3.0, 1.0]])
    n = s.to_normalized(pose)
    np.testing.assert_allclose(n, [[1.0, 0.0, 1.0]])
    np.testing.assert_allclose(s.to_metric(n), pose)
    np.testing.assert_allclose(s.delta_to_normalized(np.array([2.0, 4.0, 0.5])), [0.1, 0.2, 0.5])
    # (xmin, xmax, ymin, ymax) = (-15, 25, -23, 17) m around origin (5, -3) at 20 m/unit
    assert s.bounds_to_normalized((-15.0, 25.0, -23.0, 17.0)) == pytest.approx((-1.0, 1.0, -1.0, 1.0))
    with pytest.raises(ValueError):
        MetricScale(meters_per_unit=0.0)
