"""Real rclpy nodes over DDS on loopback: sim → mapping → localization, services, inputs, outputs."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")

from geometry_msgs.msg import PoseArray, PoseWithCovarianceStamped  # noqa: E402
from ros_helpers import NodeStack, initialpose_msg  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402
from std_srvs.srv import Empty, Trigger  # noqa: E402

from dmn_ros.maps import ViewMap  # noqa: E402
from dmn_ros.ros.conversions import (  # noqa: E402
    cov3_to_cov6,
    cov6_to_cov3,
    pointcloud_to_view_map,
    pose_to_xyyaw,
    sec_to_stamp,
    stamp_to_sec,
    view_map_to_pointcloud,
    xyyaw_to_pose,
)

pytestmark = pytest.mark.ros

SEED = 20_000_001


class Stack(NodeStack):
    """Three nodes plus a probe node in one context, spun by a background executor."""

    def __init__(self, model, tmp_path, *, loc_overrides=(), num_contexts=8):
        super().__init__(model, tmp_path, seed=SEED, num_contexts=num_contexts, loc_overrides=loc_overrides)
        self.model_fp = model.info.fingerprint
        self.clouds: list[PoseArray] = []
        from dmn_ros.ros.localization_node import PARTICLE_QOS

        self.probe.create_subscription(PoseArray, "particle_cloud", self.clouds.append, PARTICLE_QOS)
        self.cam = self.probe.create_publisher(Image, "camera/image", 10)
        self.start()

    def map_ready(self, n):
        self.sim.publish_contexts()
        self.wait(lambda: len(self.mapping.view_map) == n, what="mapping contexts")
        self.wait(lambda: self.loc.localizer.has_map and len(self.loc.localizer.view_map) == n, what="map at loc")

    def step_and_wait(self, timeout=20.0):
        n = self.loc.counters["processed"]
        stamp = self.sim.step_once()
        self.wait(lambda: self.loc.counters["processed"] > n, timeout, "filter step")
        self.wait(lambda: self.poses and abs(stamp_to_sec(self.poses[-1].header.stamp) - stamp) < 1e-6,
                  timeout, "pose")
        return stamp


@pytest.fixture(scope="module")
def stack(untrained, tmp_path_factory):
    s = Stack(untrained, tmp_path_factory.mktemp("maps"))
    yield s
    s.close()


def test_end_to_end_no_pose_before_map_and_init(stack):
    s = stack
    s.sim.step_once()  # a frame before any map: dropped, no pose
    time.sleep(0.5)
    assert not s.poses
    s.map_ready(8)
    s.sim.step_once()  # map but not initialized: still no pose
    s.wait(lambda: s.loc.counters["dropped_not_ready"] >= 1, what="not-ready drop")
    assert not s.poses
    s.call(Empty, "reinitialize_global_localization")
    assert s.loc.localizer.mode == "global"
    for _ in range(3):
        s.step_and_wait()
    msg = s.poses[-1]
    assert msg.header.frame_id == "map"
    cov = np.array(msg.pose.covariance).reshape(6, 6)
    assert cov[0, 0] > 0 and cov[5, 5] > 0 and np.allclose(cov, cov.T)
    s.wait(lambda: len(s.clouds) > 0, what="particle cloud")
    assert len(s.clouds[-1].poses) == 128
    assert s.call(Trigger, "mapping_node/save_map").success
    assert len(ViewMap.load(s.mapping.map_file, expected_fingerprint=s.model_fp)) == 8


def test_initialpose_reseeds_and_global_spreads(stack):
    s = stack
    s.map_ready(8)
    bad = PoseWithCovarianceStamped()
    bad.header.frame_id = "odom"
    n_bad = s.loc.counters["bad_initialpose"]
    s.initialpose.publish(bad)
    s.wait(lambda: s.loc.counters["bad_initialpose"] > n_bad, what="wrong-frame rejection")
    s.initialpose.publish(initialpose_msg([3.0, -4.0, 1.0], np.diag([0.04, 0.04, 0.01])))
    s.wait(lambda: s.loc.localizer.mode == "tracking", what="tracking")
    p = s.loc.localizer.particles_metric()
    assert len(p) == 64
    np.testing.assert_allclose(p[:, :2].mean(0), [3.0, -4.0], atol=0.15)
    assert p[:, :2].std(0).max() < 0.4
    s.call(Empty, "reinitialize_global_localization")
    p = s.loc.localizer.particles_metric()
    assert len(p) == 128 and p[:, :2].std(0).min() > 3.0  # spread over the map's extent
    s.call(Empty, "request_nomotion_update")


def test_bad_inputs_counted_not_crashing(stack):
    s = stack
    s.map_ready(8)
    s.call(Empty, "reinitialize_global_localization")
    s.step_and_wait()
    bad = Image(encoding="32FC1", height=2, width=2, step=8, data=bytes(16))
    bad.header.stamp = sec_to_stamp(s.loc.last_stamp + 0.1)
    n = s.loc.counters["bad_images"]
    s.cam.publish(bad)
    s.wait(lambda: s.loc.counters["bad_images"] > n, what="bad image drop")
    old = Image(encoding="rgb8", height=2, width=2, step=6, data=bytes(12))
    old.header.stamp = sec_to_stamp(s.loc.last_stamp - 0.5)  # under time_reset_s: a drop, not a time reset
    n = s.loc.counters["out_of_order"] + s.loc.counters["no_odom"]
    s.cam.publish(old)
    s.wait(lambda: s.loc.counters["out_of_order"] + s.loc.counters["no_odom"] > n, what="old frame drop")
    s.step_and_wait()  # still alive


def test_map_clear_removes_map(stack):
    s = stack
    s.map_ready(8)
    assert s.call(Trigger, "mapping_node/clear_map").success
    s.wait(lambda: not s.loc.localizer.has_map, what="map cleared at localizer")
    s.map_ready(8)


def test_conversions_hand_cases(untrained):
    cov3 = np.array([[1.0, 0.5, 0.1], [0.5, 2.0, 0.2], [0.1, 0.2, 0.3]])
    c6 = np.array(cov3_to_cov6(cov3)).reshape(6, 6)
    assert c6[0, 0] == 1.0 and c6[0, 1] == 0.5 and c6[0, 5] == 0.1 and c6[5, 5] == 0.3 and c6[1, 5] == 0.2
    assert c6[2, 2] == 0 and c6[3, 3] == 0
    np.testing.assert_array_equal(cov6_to_cov3(c6.ravel()), cov3)
    pose = xyyaw_to_pose(np.array([1.0, 2.0, -3.0]))
    np.testing.assert_allclose(pose_to_xyyaw(pose), [1.0, 2.0, -3.0], atol=1e-12)
    assert abs(pose.orientation.z - math.sin(-1.5)) < 1e-12
    assert stamp_to_sec(sec_to_stamp(12.999999999999)) == pytest.approx(13.0)
    from dmn_ros.maps import ViewMap

    vm = ViewMap.for_model(untrained.info)
    rng = np.random.default_rng(0)
    vm.add(embeddings=rng.normal(size=(3, *untrained.info.embed_shape)), poses=rng.normal(size=(3, 3)),
           ids=["a", "b", "c"])
    msg = view_map_to_pointcloud(vm, stamp=sec_to_stamp(1.0))
    assert msg.point_step == 16 + 4 * int(np.prod(untrained.info.embed_shape)) and msg.width == 3
    back = pointcloud_to_view_map(msg, fingerprint=vm.fingerprint, embed_shape=vm.embed_shape,
                                  meters_per_unit=20.0, ids=vm.ids)
    np.testing.assert_array_equal(back.embeddings, vm.embeddings)
    np.testing.assert_allclose(back.poses, vm.poses, atol=1e-6)
    from dmn_ros.errors import FingerprintMismatchError

    with pytest.raises(FingerprintMismatchError):
        pointcloud_to_view_map(msg, fingerprint="ffff", embed_shape=vm.embed_shape, meters_per_unit=20.0)
