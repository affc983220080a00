"""Shared set-up for the tests that start real rclpy nodes over real DDS on loopback.

conftest.py claims this pytest run's own ``ROS_DOMAIN_ID`` before any test module is imported;
every context made here joins that domain. Import this module after ``pytest.importorskip("rclpy")``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import rclpy
from geometry_msgs.msg import PoseWithCovarianceStamped
from rclpy.executors import MultiThreadedExecutor
from rclpy.parameter import Parameter

from dmn_ros.ros.conversions import cov3_to_cov6, xyyaw_to_pose
from dmn_ros.ros.localization_node import POSE_QOS, LocalizationNode
from dmn_ros.ros.mapping_node import MappingNode
from dmn_ros.ros.sim_node import SimNode

SIM_PARAMS = {"rate": 0.0, "trajectory_steps": 40}
"""The sim steps only when a test says so."""
LOC_PARAMS = {"max_particles": 128, "tracking_particles": 64, "update_min_d": 0.0, "update_min_a": 0.0}
"""Small particle sets; every frame is an update."""


def domain_id() -> int:
    """This test run's ROS_DOMAIN_ID (set by conftest.py)."""
    return int(os.environ["ROS_DOMAIN_ID"])


def init_context() -> rclpy.Context:
    """A fresh, initialized rclpy context (its own DDS participant) on this run's domain."""
    ctx = rclpy.Context()
    rclpy.init(context=ctx, domain_id=domain_id())
    return ctx


def params(values: dict) -> list[Parameter]:
    return [Parameter(k, value=v) for k, v in values.items()]


def wait_until(cond: Callable[[], object], timeout: float = 20.0, what: str = "", poll: float = 0.02) -> float:
    """Polls ``cond`` until it is truthy; returns the seconds it took, fails the test after ``timeout``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return time.monotonic() - t0
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


def call_service(node, srv_type, name: str, timeout: float = 10.0, poll: float = 0.02):
    """Calls service ``name`` with an empty request from ``node`` (spun elsewhere); returns the response."""
    cli = node.create_client(srv_type, name)
    assert cli.wait_for_service(timeout_sec=timeout), name
    fut = cli.call_async(srv_type.Request())
    wait_until(fut.done, timeout, name, poll)
    return fut.result()


def initialpose_msg(pose, cov3) -> PoseWithCovarianceStamped:
    """An ``initialpose`` message in the map frame: ``pose`` = (x, y, yaw), ``cov3`` its 3×3 covariance."""
    msg = PoseWithCovarianceStamped()
    msg.header.frame_id = "map"
    msg.pose.pose = xyyaw_to_pose(np.asarray(pose, dtype=np.float64))
    msg.pose.covariance = cov3_to_cov6(cov3)
    return msg


class Spinning:
    """Nodes in their own rclpy context, spun by a MultiThreadedExecutor in a background thread.

    Nodes join with ``add`` (before or after ``start``); ``self.probe``, set by subclasses, makes the service calls.
    """

    poll = 0.02

    def __init__(self, num_threads: int = 4) -> None:
        self.ctx = init_context()
        self.nodes: list = []
        self.executor = MultiThreadedExecutor(num_threads=num_threads, context=self.ctx)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)

    def add(self, node):
        self.nodes.append(node)
        self.executor.add_node(node)
        return node

    def start(self) -> None:
        self.thread.start()

    def wait(self, cond, timeout=20.0, what=""):
        return wait_until(cond, timeout, what, self.poll)

    def call(self, srv_type, name, timeout=10.0):
        return call_service(self.probe, srv_type, name, timeout, self.poll)

    def close(self) -> None:
        self.executor.shutdown()
        for n in self.nodes:
            n.destroy_node()
        rclpy.shutdown(context=self.ctx)
        self.thread.join(timeout=5)


class NodeStack(Spinning):
    """sim → mapping → localization plus a probe node (``dmn_pose`` into ``self.poses``, an ``initialpose``
    publisher) in one context. Subclasses add their probes, then call ``start``."""

    def __init__(self, model, tmp_path: Path, *, seed: int, loc_model=None, num_contexts: int = 8,
                 trajectory_steps: int = 40, sim_overrides: Iterable[Parameter] = (),
                 loc_overrides: Iterable[Parameter] = ()) -> None:
        super().__init__(num_threads=4)
        kw = {"context": self.ctx}
        sim = {"world_seed": seed, **SIM_PARAMS, "num_contexts": num_contexts, "trajectory_steps": trajectory_steps}
        self.sim = self.add(SimNode(parameter_overrides=[*params(sim), *sim_overrides], **kw))
        self.mapping = self.add(MappingNode(model=model, parameter_overrides=params(
            {"map_file": str(tmp_path / "map.safetensors")}), **kw))
        self.loc = self.add(LocalizationNode(model=model if loc_model is None else loc_model,
                                             parameter_overrides=[*params(LOC_PARAMS), *loc_overrides], **kw))
        self.probe = self.add(rclpy.create_node("probe", context=self.ctx))
        self.poses: list[PoseWithCovarianceStamped] = []
        self.probe.create_subscription(PoseWithCovarianceStamped, "dmn_pose", self.poses.append, POSE_QOS)
        self.initialpose = self.probe.create_publisher(PoseWithCovarianceStamped, "initialpose", 10)
