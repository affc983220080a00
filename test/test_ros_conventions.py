"""localization_node against ROS conventions: late odometry held for a frame, initialpose stamps and frames,
latched context markers, map→odom stamps (real nodes).

As test_ros_robustness.py, most tests build a real LocalizationNode (untrained model, a small map through its
``dmn_map`` callback) and call its callbacks and work tick directly, so the message order is exactly the one
under test; the ones about topics, QoS and the ROS clock spin the node over DDS.
"""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")

import node_feed  # noqa: E402
import yaml  # noqa: E402
from nav_msgs.msg import Odometry  # noqa: E402
from node_feed import TOLERANCE_S, make_node  # noqa: E402
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402
from ros_helpers import Spinning, initialpose_msg  # noqa: E402
from rosgraph_msgs.msg import Clock  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402
from visualization_msgs.msg import Marker, MarkerArray  # noqa: E402

from dmn_ros.ros.conversions import sec_to_stamp, xyyaw_to_pose  # noqa: E402
from dmn_ros.ros.localization_node import LocalizationNode  # noqa: E402

pytestmark = pytest.mark.ros
RNG = np.random.default_rng(23)
ROOT = Path(__file__).resolve().parents[1]


class Feed(node_feed.Feed):
    """node_feed's Feed, plus initial poses, recording the motion each filter step was given."""

    def __init__(self, loc: LocalizationNode) -> None:
        super().__init__(loc)
        self.deltas: list[np.ndarray | None] = []
        step = loc.localizer.step

        def recording(image, egomotion=None):
            self.deltas.append(None if egomotion is None else np.array(egomotion, dtype=np.float64))
            return step(image, egomotion)

        loc.localizer.step = recording

    def initialpose(self, dt: float | None, pose=(1.0, 1.0, 0.0), frame: str = "map") -> None:
        msg = initialpose_msg(pose, np.diag([0.01, 0.01, 0.001]))
        msg.header.frame_id = frame
        if dt is not None:
            msg.header.stamp = sec_to_stamp(self.t0 + dt)
        self.loc._on_initialpose(msg)

    def dx(self) -> list[float | None]:
        return [None if d is None else round(float(d[0]), 6) for d in self.deltas]


class HeldLock:
    """Stands in for the node's ``_filter_lock``: the test holds it, so a worker's filter step waits at its start
    (after the frame was taken and its motion computed); ``waiting`` is set once the worker gets there."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.owner = threading.current_thread()
        self.waiting = threading.Event()

    def __enter__(self) -> HeldLock:
        if threading.current_thread() is not self.owner:
            self.waiting.set()
        self.lock.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.lock.release()


def _work_while_held(node: LocalizationNode, during) -> None:
    """``node._work()`` in a worker thread whose filter step starts only after ``during()`` ran in this one."""
    held = HeldLock()
    node._filter_lock = held
    worker = threading.Thread(target=node._work, daemon=True)
    with held:
        worker.start()
        assert held.waiting.wait(30.0), "the worker did not reach its filter step"
        during()
    worker.join(60.0)
    assert not worker.is_alive()


# ---- 1: odometry held for a frame whose odometry was late --------------------------------------
def test_motion_after_a_frame_filtered_with_held_odometry_is_not_lost(node: LocalizationNode) -> None:
    """1 m/s. The frame at 5.2 waits transform_tolerance for odometry (newest 5.0) and is filtered with odom(5.0)
    held; the late odometry then arrives. The next update's motion starts from the held pose, not from odometry
    interpolated at 5.2 afterwards: 1.0 + 2.0 m, the true 3.0 m (was 1.0 + 1.8)."""
    f = Feed(node)
    for k in range(51):
        f.odom(0.1 * k, 0.1 * k)
    f.frame(4.0)
    node._work()  # anchor
    f.frame(5.2)
    node._work()
    assert node.counters["processed"] == 1  # waits for its odometry
    time.sleep(TOLERANCE_S + 0.05)
    node._work()  # odometry later than transform_tolerance: odom(5.0) held
    for k in range(51, 71):
        f.odom(0.1 * k, 0.1 * k)
    f.frame(7.0)
    node._work()
    assert f.dx() == [None, pytest.approx(1.0), pytest.approx(2.0)]
    np.testing.assert_allclose(node._last_odom, [7.0, 0.0, 0.0], atol=1e-9)


def test_held_odometry_is_the_anchor_even_if_the_late_odometry_arrives_during_the_step(node) -> None:
    """The late odometry arrives while the held frame is being filtered: the anchor is still what that step used."""
    f = Feed(node)
    for k in range(51):
        f.odom(0.1 * k, 0.1 * k)
    f.frame(4.0)
    node._work()
    f.frame(5.2)
    time.sleep(TOLERANCE_S + 0.05)
    _work_while_held(node, lambda: [f.odom(0.1 * k, 0.1 * k) for k in range(51, 71)])
    np.testing.assert_allclose(node._last_odom, [5.0, 0.0, 0.0], atol=1e-9)  # was odom(5.2), read after the step
    f.frame(7.0)
    node._work()
    assert f.dx() == [None, pytest.approx(1.0), pytest.approx(2.0)]


# ---- 2: initialpose stamp ------------------------------------------------------------------------
def test_initialpose_stamp_anchors_the_motion_and_drops_older_frames(node: LocalizationNode) -> None:
    """As nav2_amcl applies the odometry change since the initialpose stamp: the robot was at the pose at 1.0 and
    drove 1 m by the frame at 2.0; a frame taken at 0.5, still pending, is not filtered as if taken there."""
    f = Feed(node)
    for k in range(31):
        f.odom(0.1 * k, 0.1 * k)
    f.frame(0.5)
    f.initialpose(1.0)
    assert node.localizer.mode == "tracking"
    late = node.counters["out_of_order"]
    node._work()
    assert node.counters["out_of_order"] == late + 1 and node.counters["processed"] == 0
    f.frame(2.0)
    node._work()
    assert f.dx() == [pytest.approx(1.0)]  # was None: the metre since the initial pose was dropped
    # A zero stamp (no time: tf2's "latest"), or one the odometry does not reach: the next frame runs without
    # motion, as before.
    for k, dt in enumerate((None, 100.0)):
        f.initialpose(dt)
        assert node.last_stamp is None
        f.frame(3.5 + k)
        f.odom(3.6 + k, 3.6 + k)
        node._work()
        assert f.dx()[-1] is None and node.counters["processed"] == 2 + k


@pytest.mark.parametrize(("pose_dt", "expected"), [(1.0, [None, 1.0]), (2.5, [None])], ids=["before", "after"])
def test_frame_taken_before_an_initialpose_is_rebased_or_dropped(node, pose_dt, expected) -> None:
    """The frame at 2.0 was taken (its motion since 0.0 computed) when an initialpose arrives: its motion starts
    at the initialpose stamp instead (1.0), or it is dropped if stamped before it (2.5)."""
    f = Feed(node)
    for k in range(31):
        f.odom(0.1 * k, 0.1 * k)
    f.frame(0.0)
    node._work()
    f.frame(2.0)
    late = node.counters["out_of_order"]
    _work_while_held(node, lambda: f.initialpose(pose_dt))
    assert f.dx() == expected  # was [None, 2.0]: the motion since 0.0 applied to the new pose
    assert node.counters["out_of_order"] == late + (len(expected) == 1)


# ---- 4: initialpose frame with a leading slash ---------------------------------------------------
def test_initialpose_in_slash_map_is_accepted(node: LocalizationNode) -> None:
    """nav2_amcl strips a leading slash before comparing frames (as _on_odom does)."""
    f = Feed(node)
    f.initialpose(None, frame="/map")
    assert node.counters["bad_initialpose"] == 0 and node.localizer.mode == "tracking"
    f.initialpose(None, frame="/odom")
    assert node.counters["bad_initialpose"] == 1


# ---- 3: context markers latched ------------------------------------------------------------------
def test_context_markers_reach_an_rviz_started_later(untrained, map_msg) -> None:
    """The contexts go out once per map; a subscriber that joins afterwards (RViz with map_file) still gets them
    on dmn_context_markers, reliable + transient_local, depth 1. Particles stay on dmn_markers."""
    sp = Spinning(num_threads=2)
    try:
        loc = sp.add(make_node(untrained, sp.ctx, map_msg, "latched"))  # the map: contexts published
        probe = sp.add(rclpy.create_node("latched_probe", context=sp.ctx))
        sp.start()
        got: list[MarkerArray] = []
        probe.create_subscription(MarkerArray, "/latched/dmn_context_markers", got.append, QoSProfile(
            depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL))
        sp.wait(lambda: got, timeout=15.0, what="context markers for a late subscriber")
        markers = got[0].markers
        assert markers[0].action == Marker.DELETEALL and len(markers) == 5
        assert {m.ns for m in markers} == {"contexts"} and all(m.type == Marker.ARROW for m in markers[1:])
        sp.wait(lambda: loc.get_publishers_info_by_topic("/latched/dmn_context_markers"), what="publisher info")
        (info,) = loc.get_publishers_info_by_topic("/latched/dmn_context_markers")
        assert info.qos_profile.durability == DurabilityPolicy.TRANSIENT_LOCAL
        assert info.qos_profile.reliability == ReliabilityPolicy.RELIABLE
        assert loc.context_marker_pub.qos_profile.depth == 1  # the graph does not report depths
        particles: list[MarkerArray] = []
        loc.marker_pub.publish = particles.append
        f = Feed(loc)
        f.frame(0.0)
        sp.wait(lambda: particles, what="particle markers")
        assert [m.ns for m in particles[0].markers] == ["particles"]
    finally:
        sp.close()


def test_rviz_config_shows_the_context_markers_latched() -> None:
    rviz = yaml.safe_load((ROOT / "config" / "dmn_localize.rviz").read_text())
    (d,) = [d for d in rviz["Visualization Manager"]["Displays"] if d.get("Topic", {}).get("Value") ==
            "/dmn_context_markers"]
    assert d["Class"] == "rviz_default_plugins/MarkerArray" and d["Topic"]["Durability Policy"] == "Transient Local"


# ---- 5: map->odom stamps -------------------------------------------------------------------------
class Broadcaster:
    """Stands in for tf2_ros.TransformBroadcaster (not installable here); records what is sent."""

    def __init__(self) -> None:
        self.sent: list[int] = []

    def sendTransform(self, t) -> None:  # tf2_ros's name; it serializes the message at once
        self.sent.append(t.header.stamp.sec * 1_000_000_000 + t.header.stamp.nanosec)

    def stamps(self) -> list[int]:
        return list(self.sent)


def _increasing(stamps: list[int]) -> bool:
    return all(b > a for a, b in itertools.pairwise(stamps))


def test_map_to_odom_stamps_never_go_back_with_camera_latency(node: LocalizationNode) -> None:
    """Frames 0.1 s old when they arrive, idle work ticks between: re-sends were stamped node clock + tolerance,
    updates image stamp + tolerance, so each new transform went out stamped before the last re-send. tf2 then
    interpolates between the new value and the old one stamped later (and drops repeated stamps)."""
    node.tf = Broadcaster()
    f = Feed(node)
    f.t0 = time.time()  # the node clock's time base
    for i in range(12):
        now = time.time() - f.t0
        f.odom(now, now)
        if i % 4 == 0:
            f.frame(now - 0.1)
        node._work()
        time.sleep(0.05)
    n = node.counters["processed"]
    stamps = node.tf.stamps()
    assert n == 3 and len(stamps) > n
    assert _increasing(stamps), [round((s - stamps[0]) * 1e-9, 3) for s in stamps]
    # After a time reset (bag loop) the stamps start over with the new time, not pinned to the old one.
    f.t0 -= 100.0
    f.odom(0.0, 0.0)
    assert node.counters["time_resets"] == 1
    node._work()  # an idle tick (process_rate timer) before the next frame: a node-clock re-send
    assert node.tf.stamps()[-1] == pytest.approx((time.time() + TOLERANCE_S) * 1e9, abs=0.5e9)
    for k in range(4):  # ... which holds none of the updates after it behind it
        f.odom(0.2 + k, 0.2 + k)
        f.frame(0.2 + k)
        node._work()
        assert node.tf.stamps()[-1] == pytest.approx((f.t0 + 0.2 + k + TOLERANCE_S) * 1e9, abs=1e3), k


def test_map_to_odom_stamps_never_go_back_under_use_sim_time(untrained, map_msg) -> None:
    """With use_sim_time (the node clock from /clock over DDS, frames 0.1 s old): stamps increase and are in
    simulated time."""
    sp = Spinning(num_threads=2)
    try:
        loc = sp.add(make_node(untrained, sp.ctx, map_msg, "simtf", use_sim_time=True))
        loc.tf = Broadcaster()
        probe = sp.add(rclpy.create_node("simtf_probe", context=sp.ctx))
        clock = probe.create_publisher(Clock, "/clock", 10)
        odom = probe.create_publisher(Odometry, "/simtf/odom", 100)
        cam = probe.create_publisher(Image, "/simtf/camera/image", 10)
        sp.start()
        sp.wait(lambda: min(p.get_subscription_count() for p in (clock, odom, cam)) > 0, what="discovery")
        t0 = 1000.0
        for k in range(60):
            t = t0 + 0.05 * k
            clock.publish(Clock(clock=sec_to_stamp(t)))
            o = Odometry()
            o.header.stamp, o.header.frame_id = sec_to_stamp(t), "odom"
            o.pose.pose = xyyaw_to_pose(np.array([0.5 * (t - t0), 0.0, 0.0]))
            odom.publish(o)
            if k % 5 == 2:
                img = Image(encoding="rgb8", height=32, width=32, step=96,
                            data=RNG.integers(0, 256, 3072, np.uint8).tobytes())
                img.header.stamp, img.header.frame_id = sec_to_stamp(t - 0.1), "camera"
                cam.publish(img)
            time.sleep(0.05)
        sp.wait(lambda: loc.counters["processed"] >= 3, what="updates")
        time.sleep(0.2)
    finally:
        sp.close()
    stamps = loc.tf.stamps()
    assert len(stamps) > loc.counters["processed"]  # re-sends between the updates
    assert _increasing(stamps), [round(s * 1e-9 - t0, 3) for s in stamps]
    assert t0 * 1e9 < stamps[0] and stamps[-1] < (t0 + 3.0 + TOLERANCE_S) * 1e9  # simulated time
