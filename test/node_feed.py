"""A real LocalizationNode (untrained model, a small map through its ``dmn_map`` callback) fed messages by direct
callback calls, so the message order is exactly the one a test sets; shared by the node tests that need it.

conftest.py's ``ctx``, ``map_msg`` and ``node`` fixtures build them.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
from nav_msgs.msg import Odometry
from rclpy.parameter import Parameter
from sensor_msgs.msg import Image

from dmn_ros.localizer import embed_images
from dmn_ros.maps import ViewMap
from dmn_ros.ros.conversions import sec_to_stamp, view_map_to_pointcloud, xyyaw_to_pose
from dmn_ros.ros.localization_node import LocalizationNode

TOLERANCE_S = 0.3
"""The nodes' ``transform_tolerance``: how long a frame waits for odometry past its stamp."""
RNG = np.random.default_rng(11)


def map_message(untrained):
    """A 4-view map (random images and poses within 5 m) as the map topic carries it."""
    vm = ViewMap.for_model(untrained.info)
    images = [RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(4)]
    vm.add(embeddings=embed_images(untrained, images), poses=RNG.uniform(-5, 5, (4, 3)), ids=list("abcd"))
    return view_map_to_pointcloud(vm, stamp=sec_to_stamp(1.0))


def make_node(untrained, ctx, map_msg, name: str, **over: Any) -> LocalizationNode:
    """Every frame updates (no motion gate), no TF, no timers that write; the map is in, global localization on."""
    values = {"max_particles": 32, "tracking_particles": 32, "update_min_d": 0.0, "update_min_a": 0.0,
              "transform_tolerance": TOLERANCE_S, "tf_broadcast": False, "save_pose_rate": 0.0,
              "diagnostics_period": 0.0, **over}
    node = LocalizationNode(model=untrained, namespace=name, context=ctx,
                            parameter_overrides=[Parameter(k, value=v) for k, v in values.items()])
    node._on_map(map_msg)
    node._init_global()
    return node


def node_name(request) -> str:
    """A ROS-legal node namespace from a test's name (parametrized ones included)."""
    name = request.node.name
    for ch in "[].-":
        name = name.replace(ch, "_")
    return name


class Feed:
    """Odometry (along x) and frames stamped ``t0 + dt``, t0 a minute ago (stamps far ahead of the clock are
    dropped), handed to the node's callbacks."""

    def __init__(self, loc: LocalizationNode) -> None:
        self.loc = loc
        self.t0 = time.time() - 60.0

    def odom(self, dt: float, x: float, *, frame: str = "odom", child: str = "") -> None:
        msg = Odometry()
        msg.header.stamp, msg.header.frame_id, msg.child_frame_id = sec_to_stamp(self.t0 + dt), frame, child
        msg.pose.pose = xyyaw_to_pose(np.array([x, 0.0, 0.0]))
        self.loc._on_odom(msg)

    def frame(self, dt: float) -> None:
        msg = Image(encoding="rgb8", height=32, width=32, step=96, data=RNG.integers(0, 256, 3072, np.uint8).tobytes())
        msg.header.stamp, msg.header.frame_id = sec_to_stamp(self.t0 + dt), "camera"
        self.loc._on_image(msg)

    def step(self, dt: float) -> bool:
        """A frame at ``dt`` and one work tick; True if the filter updated on it."""
        n = self.loc.counters["processed"]
        self.frame(dt)
        self.loc._work()
        return self.loc.counters["processed"] == n + 1 and self.stamp() == pytest.approx(dt, abs=1e-6)

    def stamp(self) -> float | None:
        return None if self.loc.last_stamp is None else self.loc.last_stamp - self.t0
