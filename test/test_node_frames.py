"""localization_node's frame selection: a frame waits for the odometry that covers its stamp.

Callbacks are called directly (nothing spins), so the message order is the one a loaded machine
can produce: the frame is handled before the odometry sample stamped with it. The node used to take
such a frame at once and hold the previous odometry sample (a wrong egomotion); live bag replays then
drifted from the offline evaluation (test_bags::test_live_replay_matches_offline).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

rclpy = pytest.importorskip("rclpy")

from nav_msgs.msg import Odometry  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402

from dmn_ros.export import export_model, load_model  # noqa: E402
from dmn_ros.model import DMN  # noqa: E402
from dmn_ros.ros.conversions import sec_to_stamp, xyyaw_to_pose  # noqa: E402
from dmn_ros.ros.localization_node import MAX_WAITING_FRAMES, LocalizationNode  # noqa: E402

pytestmark = pytest.mark.ros
TOLERANCE_S = 0.3


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalizationNode]:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "m.pt"
    export_model(DMN(), path, meters_per_unit=20.0)
    ctx = rclpy.Context()
    rclpy.init(context=ctx, domain_id=int(os.environ.get("ROS_DOMAIN_ID", "0")))
    loc = LocalizationNode(model=load_model(path), context=ctx, parameter_overrides=[
        Parameter("transform_tolerance", value=TOLERANCE_S), Parameter("tf_broadcast", value=False)])
    yield loc
    loc.destroy_node()
    rclpy.try_shutdown(context=ctx)


class Feed:
    """Odometry and frames stamped from a minute ago (the node drops stamps far ahead of its clock)."""

    def __init__(self, loc: LocalizationNode) -> None:
        self.loc = loc
        self.t0 = time.time() - 60.0

    def odom(self, dt: float, x: float) -> None:
        msg = Odometry()
        msg.header.stamp, msg.header.frame_id = sec_to_stamp(self.t0 + dt), "odom"
        msg.pose.pose = xyyaw_to_pose(np.array([x, 0.0, 0.0]))
        self.loc._on_odom(msg)

    def frame(self, dt: float) -> None:
        msg = Image(encoding="rgb8", height=2, width=2, step=6, data=bytes(12))
        msg.header.stamp, msg.header.frame_id = sec_to_stamp(self.t0 + dt), "camera"
        self.loc._on_image(msg)

    def take(self) -> float | None:
        got: Any = self.loc._take_frame()
        return None if got is None else round(got[0] - self.t0, 6)


def test_frame_waits_for_its_odometry_then_interpolates(node: LocalizationNode) -> None:
    f = Feed(node)
    f.odom(0.0, 0.0)
    f.odom(0.25, 0.1)
    f.frame(0.5)  # its odometry sample (stamped 0.5) is still on its way
    assert f.take() is None
    assert node._pending is not None  # waiting, not dropped
    f.odom(0.5, 0.3)
    assert f.take() == 0.5
    assert node.odom.pose_at(f.t0 + 0.5)[0] == 0.3  # the sample at the stamp, not the 0.1 held from 0.25
    assert node._pending is None


def test_newer_frame_waiting_does_not_starve_the_usable_one(node: LocalizationNode) -> None:
    f = Feed(node)
    f.odom(10.0, 0.0)
    dropped = node.counters["dropped_newer_frame"]
    f.frame(10.5)
    f.frame(10.6)  # odometry lags more than a camera period
    f.odom(10.55, 0.1)  # covers 10.5 only
    assert f.take() == 10.5
    assert f.take() is None  # 10.6 still waits
    f.odom(10.7, 0.2)
    assert f.take() == 10.6
    assert node.counters["dropped_newer_frame"] == dropped
    # Newest frame only once a newer one is usable: the older ones are dropped and counted.
    for k in range(3):
        f.frame(11.0 + 0.1 * k)
    f.odom(11.5, 0.3)
    assert f.take() == 11.2 and node.counters["dropped_newer_frame"] == dropped + 2
    # At most MAX_WAITING_FRAMES are held while odometry is late.
    for k in range(MAX_WAITING_FRAMES + 3):
        f.frame(12.0 + 0.01 * k)
    assert len(node._frames) == MAX_WAITING_FRAMES
    assert node.counters["dropped_newer_frame"] == dropped + 5
    node._frames.clear()


def test_late_odometry_falls_back_to_the_newest_sample_after_the_tolerance(node: LocalizationNode) -> None:
    f = Feed(node)
    f.odom(20.0, 0.0)
    f.frame(20.1)
    assert f.take() is None
    time.sleep(TOLERANCE_S + 0.05)
    assert f.take() == 20.1  # waited transform_tolerance: the held sample is within it
    no_odom = node.counters["no_odom"]
    f.frame(21.0)  # 1 s past the newest sample: beyond the tolerance, dropped once it waited
    time.sleep(TOLERANCE_S + 0.05)
    assert f.take() is None and node.counters["no_odom"] == no_odom + 1
