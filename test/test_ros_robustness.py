"""localization_node, mapping_node and sim_node against late odometry, time resets and bad input (real nodes).

Each test builds a real LocalizationNode (``node_feed.py``: untrained model, a small map through its
``dmn_map`` callback) and calls its callbacks and work tick directly, so the message order is exactly the
one under test; nothing is mocked.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")

from model_wrappers import DelegatingModel  # noqa: E402
from node_feed import Feed, make_node  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402

from dmn_ros.ros.localization_node import LocalizationNode  # noqa: E402

pytestmark = pytest.mark.ros
RNG = np.random.default_rng(11)


# ---- late odometry ----------------------------------------------------------------------------
def test_odometry_that_starts_late_does_not_stop_the_filter(node: LocalizationNode) -> None:
    """Frames filtered without motion before any odometry; odometry then starts > transform_tolerance later."""
    f = Feed(node)
    assert f.step(0.0) and f.step(1.0)  # no odometry yet: updates without motion
    f.odom(5.0, 0.0)
    f.odom(5.5, 0.5)
    assert f.step(5.5), node.counters  # was dropped as no_odom, and so was every later frame
    assert node.counters["no_odom"] == 0
    f.odom(6.0, 1.5)
    assert f.step(6.0)  # odometry from here on: egomotion from the anchor the previous update set
    np.testing.assert_allclose(node._last_odom, [1.5, 0.0, 0.0])


# ---- time going backwards ---------------------------------------------------------------------
def test_time_jumping_back_resets_buffers_and_keeps_the_belief(node: LocalizationNode) -> None:
    """A bag replayed with --loop: stamps start over 50 s earlier. Jitter below time_reset_s stays a drop."""
    f = Feed(node)
    for k in range(3):
        f.odom(50.0 + k, 0.5 * k)
        assert f.step(50.0 + k)
    odom_drops, late = node.counters["bad_odom"], node.counters["out_of_order"]
    f.odom(51.5, 0.7)  # 0.5 s back: jitter, dropped
    assert node.counters["bad_odom"] == odom_drops + 1
    f.odom(52.5, 1.2)
    f.frame(51.9)
    node._work()  # 0.1 s before the last update: out of order
    assert node.counters["out_of_order"] == late + 1 and node.counters["time_resets"] == 0
    particles = node.localizer.particles_metric().copy()
    f.odom(0.0, 0.0)  # the loop starts over
    assert len(node.odom) == 1 and node.counters.get("time_resets") == 1
    np.testing.assert_array_equal(node.localizer.particles_metric(), particles)  # belief kept
    assert node.localizer.mode == "global" and node.last_stamp is None
    f.odom(0.5, 0.5)
    assert f.step(0.5)  # updates again, without motion
    f.odom(1.0, 1.0)
    assert f.step(1.0) and node.counters["time_resets"] == 1
    np.testing.assert_allclose(node._last_odom, [1.0, 0.0, 0.0])


def test_frames_jumping_back_without_odometry_reset_time(node: LocalizationNode) -> None:
    """No odometry at all (a camera-only replay looping): the frames' own stamps detect the jump."""
    f = Feed(node)
    assert f.step(30.0) and f.step(31.0)
    assert f.step(2.0) and node.counters["time_resets"] == 1
    assert f.step(3.0)


# ---- bad input --------------------------------------------------------------------------------
SINGULAR = np.array([[100.0, 100.0, 0.0], [100.0, 100.0, 0.0], [0.0, 0.0, 0.1]])
"""Positive definite in float64 after the filter's 1e-9 regularization, singular in its float32."""


def test_initialpose_singular_in_float32_is_a_counted_drop(node: LocalizationNode) -> None:
    from ros_helpers import initialpose_msg

    before = node.localizer.particles_metric().copy()
    node._on_initialpose(initialpose_msg([0.0, 0.0, 0.0], SINGULAR))  # raised torch.linalg.LinAlgError
    assert node.counters["bad_initialpose"] == 1
    assert node.localizer.mode == "global"
    np.testing.assert_array_equal(node.localizer.particles_metric(), before)
    node._on_initialpose(initialpose_msg([1.0, 0.0, 0.0], np.diag([0.1, 0.1, 0.01])))
    assert node.localizer.mode == "tracking" and node.counters["bad_initialpose"] == 1


def test_saved_pose_singular_in_float32_starts_uninitialized(untrained, ctx, tmp_path) -> None:
    import yaml

    path = tmp_path / "pose.yaml"
    path.write_text(yaml.safe_dump({"format": "dmn_ros.pose/1", "frame_id": "map", "stamp": 0.0, "x": 0.0, "y": 0.0,
                                    "yaw": 0.0, "covariance": SINGULAR.tolist()}))
    node = LocalizationNode(model=untrained, namespace="saved_singular", context=ctx, parameter_overrides=[
        Parameter("pose_file", value=str(path)), Parameter("initialize_at_saved_pose", value=True),
        Parameter("save_pose_rate", value=0.0)])  # raised LinAlgError from the constructor
    try:
        assert not node.localizer.initialized
    finally:
        node.destroy_node()


def test_map_info_overflow_and_deep_nesting_are_counted_drops(node: LocalizationNode) -> None:
    from std_msgs.msg import String

    for data in ('{"num_views": 1e999, "ids": []}', "[" * 100_000 + "]" * 100_000, '{"num_views": 1, "ids": "a"}',
                 "not json"):
        node._on_map_info(String(data=data))  # OverflowError, RecursionError escaped and killed the executor
    assert node.counters["bad_map_info"] == 4 and node._map_ids == {}
    node._on_map_info(String(data='{"num_views": 2, "ids": ["r/1", "r/2"]}'))
    assert node._map_ids == {2: ["r/1", "r/2"]}


def test_mapping_sync_request_deep_nesting_is_a_counted_drop(untrained, ctx) -> None:
    from std_msgs.msg import String

    from dmn_ros.ros.mapping_node import MappingNode

    node = MappingNode(model=untrained, namespace="deep_sync", context=ctx,
                       parameter_overrides=[Parameter("share_contexts", value=True)])
    try:
        n = node.counters["shared_malformed"]
        node._on_sync_request(String(data='{"robot_id": ' + "[" * 100_000 + "]" * 100_000 + "}"))
        assert node.counters["shared_malformed"] == n + 1 and not node._sync_reply_due
        node._on_sync_request(String(data='{"robot_id": "peer9"}'))
        assert node._sync_reply_due
    finally:
        node.destroy_node()


# ---- request_nomotion_update ------------------------------------------------------------------
def test_nomotion_request_forces_the_next_new_frame_only(node: LocalizationNode) -> None:
    """nav2_amcl: the request forces an update on the next sensor message, once; the last frame is not reused."""
    from std_srvs.srv import Empty

    f = Feed(node)
    f.odom(0.0, 0.0)
    assert f.step(0.0)
    node.p["update_min_d"] = node.p["update_min_a"] = 1.0
    f.odom(0.5, 0.1)
    assert not f.step(0.5) and node.counters["skipped_small_motion"] == 1  # small motion: skipped
    n = node.counters["processed"]
    node._on_nomotion(Empty.Request(), Empty.Response())
    for _ in range(3):
        node._work()  # no new frame: nothing to filter (re-applied the last frame, counting it twice)
    assert node.counters["processed"] == n
    f.odom(1.0, 0.2)
    assert f.step(1.0)  # the next new frame, below update_min_d: filtered
    assert not node._force_update
    f.odom(1.5, 0.3)
    assert not f.step(1.5) and node.counters["skipped_small_motion"] == 2  # once only


# ---- runtime parameters -----------------------------------------------------------------------
def test_runtime_parameter_changes_apply_or_are_refused_over_dds(untrained, map_msg) -> None:
    """`ros2 param set` over DDS: runtime values are validated and applied; start-only ones refused with a reason."""
    from rclpy.parameter_client import AsyncParameterClient
    from ros_helpers import Spinning

    from dmn_ros.ros.mapping_node import MappingNode

    sp = Spinning(num_threads=2)
    try:
        loc = sp.add(make_node(untrained, sp.ctx, map_msg, "dyn"))
        mapping = sp.add(MappingNode(model=untrained, namespace="dyn", context=sp.ctx))
        sp.probe = sp.add(rclpy.create_node("dyn_probe", context=sp.ctx))
        sp.start()

        def set_on(node_name: str, **values: Any) -> list[Any]:
            client = AsyncParameterClient(sp.probe, node_name)
            assert client.wait_for_services(timeout_sec=10.0)
            fut = client.set_parameters([Parameter(k, value=v) for k, v in values.items()])
            sp.wait(fut.done, what=f"set_parameters on {node_name}")
            return fut.result().results

        ok = set_on("/dyn/localization_node", update_min_d=0.5, motion_noise_xy=0.4, transform_tolerance=0.7,
                    process_rate=5.0, **{"health.alpha_slow": 0.1})
        assert all(r.successful for r in ok), ok
        assert loc.p["update_min_d"] == 0.5 and loc.localizer.config.motion_noise_xy_m == 0.4
        assert loc.localizer.config.health.alpha_slow == 0.1 and loc.odom.tolerance_s == 0.7
        assert loc._work_timer.timer_period_ns == 200_000_000
        for name, value, says in (("motion_noise_xy", -0.1, ">= 0"), ("odom_buffer_s", -1.0, "> 0"),
                                  ("resample_threshold", 1.5, "[0.0, 1.0]"), ("health.alpha_fast", 0.0, "(0.0"),
                                  ("update_min_a", float("nan"), "finite"), ("model_path", "/x.pt", "start only"),
                                  ("image_topic", "cam2", "start only"), ("odom_frame_id", "odom2", "start only")):
            (r,) = set_on("/dyn/localization_node", **{name: value})
            assert not r.successful and name in r.reason and says in r.reason, (name, r.reason)
        assert loc.p["motion_noise_xy"] == 0.4 and loc.get_parameter("model_path").value == ""
        (r,) = set_on("/dyn/localization_node", image_topic="camera/image")  # the same value: re-loading a YAML
        assert r.successful
        (r,) = set_on("/dyn/mapping_node", pair_tolerance=0.2)
        assert r.successful and mapping.p["pair_tolerance"] == 0.2
        for name, value in (("map_topic", "other_map"), ("max_unpaired", 0), ("robot_id", "r9")):
            (r,) = set_on("/dyn/mapping_node", **{name: value})
            assert not r.successful and name in r.reason, r.reason
    finally:
        sp.close()


def test_runtime_update_min_d_takes_effect(node: LocalizationNode) -> None:
    f = Feed(node)
    f.odom(0.0, 0.0)
    assert f.step(0.0)
    res = node.set_parameters([Parameter("update_min_d", value=1.0), Parameter("update_min_a", value=1.0)])
    assert all(r.successful for r in res)
    f.odom(0.5, 0.3)
    assert not f.step(0.5) and node.counters["skipped_small_motion"] == 1  # was ignored: the node kept 0.0


def test_invalid_parameters_at_start_fail_clearly(untrained, ctx) -> None:
    from dmn_ros.errors import DmnError
    from dmn_ros.ros.mapping_node import MappingNode

    with pytest.raises(DmnError, match=r"update_min_d = -1.0: must be >= 0.*odom_buffer_s = 0.0: must be > 0"):
        LocalizationNode(model=untrained, namespace="bad_start", context=ctx, parameter_overrides=[
            Parameter("update_min_d", value=-1.0), Parameter("odom_buffer_s", value=0.0)])
    with pytest.raises(DmnError, match="shared_batch = 0"):
        MappingNode(model=untrained, namespace="bad_start", context=ctx,
                    parameter_overrides=[Parameter("shared_batch", value=0)])


def test_autosave_stays_off_for_a_refused_map_file(untrained, ctx, tmp_path) -> None:
    from dmn_ros.ros.mapping_node import MappingNode

    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(b"not a map")
    node = MappingNode(model=untrained, namespace="refused", context=ctx,
                       parameter_overrides=[Parameter("map_file", value=str(path))])
    try:
        assert node.get_parameter("autosave").value is False and not node._autosave
        (r,) = node.set_parameters([Parameter("autosave", value=True)])
        assert not r.successful and "refused at start" in r.reason and not node._autosave
    finally:
        node.destroy_node()


# ---- threads and locks ------------------------------------------------------------------------
class GatedModel(DelegatingModel):
    """The untrained model whose likelihood waits for ``gate``: holds a filter step in progress."""

    def __init__(self, inner) -> None:
        import threading

        super().__init__(inner)
        self.entered, self.gate = threading.Event(), threading.Event()

    def log_likelihood_prepared(self, *args, **kwargs):
        self.entered.set()
        assert self.gate.wait(60.0)
        return self.inner.log_likelihood_prepared(*args, **kwargs)


def test_odometry_and_frames_are_taken_while_a_step_runs(untrained, ctx, map_msg) -> None:
    """The executor's second thread serves odometry and images during a filter step (spin.run_node)."""
    import threading

    from dmn_ros.export import LoadedModel

    gated = GatedModel(untrained.module)
    node = make_node(LoadedModel(gated, untrained.info, untrained.device, untrained.path), ctx, map_msg, "gated")
    f = Feed(node)
    worker = threading.Thread(target=node._work, daemon=True)
    try:
        f.odom(0.0, 0.0)
        f.frame(0.0)
        worker.start()
        assert gated.entered.wait(30.0)  # the step is running
        cb = threading.Thread(target=lambda: (f.odom(0.5, 0.1), f.frame(0.5)), daemon=True)
        cb.start()
        cb.join(5.0)
        assert not cb.is_alive(), "odometry/image callbacks waited for the filter step"
        assert node.odom.latest_stamp == pytest.approx(f.t0 + 0.5) and node._pending is not None
        reset = threading.Thread(target=f.odom, args=(-30.0, 0.0), daemon=True)  # time goes back mid-step
        reset.start()
        reset.join(5.0)
        assert not reset.is_alive() and node.counters["time_resets"] == 1
    finally:
        gated.gate.set()
        worker.join(30.0)
        node.destroy_node()
    assert node.counters["processed"] == 1
    assert node.last_stamp is None and node._odom_reset  # the reset during the step is not undone by it


class Broadcaster:
    """Stands in for tf2_ros.TransformBroadcaster (not installable here); records what is sent."""

    def __init__(self) -> None:
        self.sent: list[Any] = []

    def sendTransform(self, t) -> None:  # tf2_ros's name
        self.sent.append(t)


def test_odometry_buffer_is_read_under_the_lock_for_map_to_odom(node: LocalizationNode) -> None:
    """_on_odom trims the buffer in two steps on another thread: every read must hold the node's lock."""
    from dmn_ros.geometry import yaw_to_quaternion
    from dmn_ros.ros.transforms import OdometryBuffer

    unlocked: list[str] = []

    class Checked(OdometryBuffer):  # the real buffer, recording reads made without the node's lock
        def pose_at(self, stamp):
            if not node._lock._is_owned():
                unlocked.append("pose_at")
            return super().pose_at(stamp)

    node.odom = Checked(max_age_s=node.odom.max_age_s, tolerance_s=node.odom.tolerance_s)
    node.tf = Broadcaster()
    f = Feed(node)
    f.odom(0.0, 1.0)
    assert f.step(0.0)
    assert unlocked == []  # _broadcast_tf read the buffer without the lock
    (t,) = node.tf.sent
    mean = node.last_estimate.mean
    expected = mean[0] - 1.0 * np.cos(mean[2]), mean[1] - 1.0 * np.sin(mean[2])  # map->base ∘ (odom->base)⁻¹
    assert (t.transform.translation.x, t.transform.translation.y) == pytest.approx(expected, abs=1e-5)
    assert t.transform.rotation.w == pytest.approx(float(yaw_to_quaternion(np.float64(mean[2]))[3]), abs=1e-6)


def test_odometry_in_another_frame_is_a_counted_drop(node: LocalizationNode) -> None:
    """Another odom frame is dropped (map->odom would be wrong); another child frame is counted but used."""
    f = Feed(node)
    f.odom(0.0, 0.0, frame="odom", child="base_link")
    f.odom(0.1, 0.0, frame="/odom", child="")  # a leading slash and an empty child id pass
    f.odom(0.2, 0.0, frame="map", child="base_link")
    f.odom(0.3, 0.0, frame="odom", child="base_footprint")
    assert node.counters["bad_odom_frame"] == 1 and len(node.odom) == 3
    assert node.counters["odom_child_frame_mismatch"] == 1
    assert node.set_parameters([Parameter("base_frame_id", value="camera")])[0].successful is False


# ---- sim_node --------------------------------------------------------------------------------------------------
def test_sim_node_steps_and_publishes_clock_under_use_sim_time(ctx) -> None:
    """With use_sim_time the node's ROS clock moves only when /clock arrives, and with publish_clock the sim is
    the /clock source: its timers must run on wall time (they used to wait for the sim's own /clock forever)."""
    from rclpy.executors import SingleThreadedExecutor
    from rosgraph_msgs.msg import Clock

    from dmn_ros.ros.sim_node import SENSOR_QOS, SimNode

    sim = SimNode(namespace="sim_clock", context=ctx, parameter_overrides=[
        Parameter("use_sim_time", value=True), Parameter("publish_clock", value=True), Parameter("rate", value=10.0),
        Parameter("trajectory_steps", value=20), Parameter("num_contexts", value=2)])
    probe = rclpy.create_node("sim_clock_probe", context=ctx)
    clocks: list[Clock] = []
    images: list[Image] = []
    probe.create_subscription(Clock, "/clock", clocks.append, 10)
    probe.create_subscription(Image, "/sim_clock/camera/image", images.append, SENSOR_QOS)
    ex = SingleThreadedExecutor(context=ctx)
    ex.add_node(sim)
    ex.add_node(probe)
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 2.0:
            ex.spin_once(timeout_sec=0.05)
    finally:
        ex.shutdown()
        sim.destroy_node()
        probe.destroy_node()
    assert sim.index + 1 >= 5, "sim_node did not step"
    assert len(clocks) >= 3 and len(images) >= 3, (len(clocks), len(images))
    secs = [c.clock.sec + c.clock.nanosec * 1e-9 for c in clocks]
    assert all(b > a for a, b in itertools.pairwise(secs))  # simulated time moves forward
    assert sim.get_clock().now().nanoseconds > 0  # and the node's own ROS clock follows it


@pytest.mark.parametrize(("name", "value", "reason"), [
    ("trajectory_steps", 1, "must be >= 2"), ("trajectory_steps", 0, "must be >= 2"),
    ("odom_noise_xy", -0.1, "must be >= 0"), ("odom_noise_yaw", -0.01, "must be >= 0"),
    ("rate", -1.0, "must be >= 0"), ("rate", float("nan"), "must be finite"), ("num_contexts", -1, "must be >= 0"),
    ("image_size", 0, "must be >= 1"), ("world_seed", -5, "must be >= 0"), ("kidnap_at_step", -1, "must be >= 0"),
    ("image_encoding", "mono8", "must be one of rgb8, bgr8"),
    ("contexts_from", "path", "must be one of free_space, trajectory"),
])
def test_sim_node_invalid_parameters_at_start_fail_clearly(ctx, name, value, reason) -> None:
    """Each used to crash later: ZeroDivisionError / IndexError on trajectory_steps 1 / 0, ValueError from the
    noise draw in a timer, an encoding error in a timer; now the constructor names the parameter."""
    from dmn_ros.errors import DmnError
    from dmn_ros.ros.sim_node import SimNode

    with pytest.raises(DmnError, match=rf"sim_node: invalid parameters: {name} = .*: {reason}"):
        SimNode(namespace="bad_sim", context=ctx, parameter_overrides=[Parameter(name, value=value)])
