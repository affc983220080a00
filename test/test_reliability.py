"""Bad-input matrix and faults over real DDS on loopback, plus the public API (docs/RELIABILITY.md).

Every case checks the outcome: a counted drop (``node.counters``) or a clear error, the node
still up, and later good input still processed. One module-scoped stack (sim, mapping,
localization, probe) carries the input cases; faults use their own nodes or contexts.
"""

from __future__ import annotations

import threading
import time

import cv2
import numpy as np
import pytest
import torch

rclpy = pytest.importorskip("rclpy")

from geometry_msgs.msg import PoseStamped, PoseWithCovarianceStamped  # noqa: E402
from nav_msgs.msg import Odometry  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from ros_helpers import domain_id, params  # noqa: E402
from sensor_msgs.msg import CompressedImage, Image, PointCloud2  # noqa: E402
from std_srvs.srv import Empty, Trigger  # noqa: E402
from test_multirobot import Robot, assert_identical  # noqa: E402
from test_ros_nodes import Stack  # noqa: E402

import dmn_ros.export as export_mod  # noqa: E402
from dmn_ros.errors import DmnError, FingerprintMismatchError, MapError, ModelLoadError  # noqa: E402
from dmn_ros.export import META_FILE, load_model  # noqa: E402
from dmn_ros.localizer import embed_images  # noqa: E402
from dmn_ros.maps import ViewMap  # noqa: E402
from dmn_ros.ros.conversions import (  # noqa: E402
    cov3_to_cov6,
    pose_to_xyyaw,
    sec_to_stamp,
    shared_batch_to_pointcloud,
    view_map_to_pointcloud,
    xyyaw_to_pose,
)
from dmn_ros.ros.localization_node import LocalizationNode, read_pose_file, resolve_pose_file  # noqa: E402
from dmn_ros.ros.mapping_node import CONTEXT_QOS, MAP_QOS, MappingNode, shared_qos  # noqa: E402
from dmn_ros.sharing import ContextBatch  # noqa: E402

pytestmark = pytest.mark.ros
RNG = np.random.default_rng(7)


def raw_image(encoding: str, h: int = 40, w: int = 48) -> Image:
    """A random frame in ``encoding`` (48×40: not the model's 32×32, so it is resized)."""
    rgb = RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)
    arr = {"rgb8": rgb, "bgr8": rgb[..., ::-1], "rgba8": np.dstack([rgb, np.full((h, w), 255, np.uint8)]),
           "bgra8": np.dstack([rgb[..., ::-1], np.full((h, w), 255, np.uint8)]), "mono8": rgb[..., 0]}[encoding]
    arr = np.ascontiguousarray(arr)
    ch = 1 if arr.ndim == 2 else arr.shape[2]
    return Image(encoding=encoding, height=h, width=w, step=w * ch, data=arr.tobytes())


class Rig:
    """The stack plus probe publishers and a virtual clock (never behind wall time, may run ahead)."""

    def __init__(self, s: Stack) -> None:
        self.s = s
        self.t = time.time()
        self.pose = np.zeros(3)
        self.odom_pub = s.probe.create_publisher(Odometry, "odom", 100)
        self.map_pub = s.probe.create_publisher(PointCloud2, "dmn_map", MAP_QOS)

    def next_t(self, dt: float = 0.05) -> float:
        self.t = max(self.t + dt, time.time())
        return self.t

    def odom(self, stamp: float, pose=None, *, raw=None) -> None:
        msg = Odometry()
        msg.header.stamp, msg.header.frame_id = sec_to_stamp(stamp), "odom"
        msg.pose.pose = raw if raw is not None else xyyaw_to_pose(self.pose if pose is None else pose)
        self.odom_pub.publish(msg)

    def frame(self, msg: Image, stamp: float) -> None:
        msg.header.stamp, msg.header.frame_id = sec_to_stamp(stamp), "camera"
        self.s.cam.publish(msg)

    def good_step(self, encoding: str = "rgb8", timeout: float = 20.0) -> None:
        """Odometry + a frame at a new stamp; waits until the localizer processed it."""
        n = self.s.loc.counters["processed"]
        t = self.next_t()
        self.pose = self.pose + np.array([0.1, 0.0, 0.02])
        self.odom(t)
        self.frame(raw_image(encoding), t)
        self.s.wait(lambda: self.s.loc.counters["processed"] > n, timeout, f"processing a {encoding} frame")

    def expect(self, counter: str, send, node=None, what: str = "") -> None:
        node = node or self.s.loc
        n = node.counters[counter]
        send()
        self.s.wait(lambda: node.counters[counter] > n, 10.0, what or counter)


@pytest.fixture(scope="module")
def rig(untrained, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rel")
    s = Stack(untrained, tmp, loc_overrides=[Parameter("odom_buffer_s", value=3.0),
                                             Parameter("pose_file", value=str(tmp / "pose.yaml"))])
    s.map_ready(8)
    s.call(Empty, "reinitialize_global_localization")
    r = Rig(s)
    r.good_step()
    yield r
    s.close()


# ---- images ---------------------------------------------------------------------------------
def test_encodings_converted_or_rejected_and_sizes(rig):
    s = rig.s
    for enc in ("rgb8", "bgr8", "rgba8", "bgra8", "mono8"):  # converted (and resized from 48×40)
        rig.good_step(enc)
    bad = [Image(encoding="16UC1", height=4, width=4, step=8, data=bytes(32)),
           Image(encoding="32FC1", height=4, width=4, step=16, data=bytes(64)),
           Image(encoding="yuv422_weird", height=4, width=4, step=8, data=bytes(32)),
           Image(encoding="rgb8", height=0, width=0, step=0, data=b""),  # zero size
           Image(encoding="rgb8", height=4, width=4, step=12, data=bytes(47)),  # data ≠ height·step
           Image(encoding="rgb8", height=4, width=4, step=10, data=bytes(40))]  # step < width·3
    for msg in bad:
        rig.expect("bad_images", lambda m=msg: (rig.odom(rig.next_t()), rig.frame(m, rig.t)), what=msg.encoding)
    assert s.loc.counters["step_errors"] == 0
    rig.good_step()


def test_corrupt_compressed_image_then_good(rig, untrained):
    s = rig.s
    loc = LocalizationNode(model=untrained, namespace="cmp", context=s.ctx, parameter_overrides=params({
        "use_compressed": True, "map_topic": "/dmn_map", "map_info_topic": "/dmn_map_info", "odom_topic": "/odom",
        "max_particles": 64, "tracking_particles": 32, "set_initial_pose": True, "update_min_d": 0.0,
        "update_min_a": 0.0, "save_pose_rate": 0.0}))
    s.executor.add_node(loc)
    try:
        pub = s.probe.create_publisher(CompressedImage, "/cmp/camera/image/compressed", 10)
        s.wait(lambda: loc.localizer.ready and pub.get_subscription_count() > 0, what="compressed localizer ready")
        _, png = cv2.imencode(".png", RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8))
        bomb = bytearray(png.tobytes())
        bomb[16:24] = (60000).to_bytes(4, "big") * 2  # declares 60000×60000 pixels: refused undecoded

        def send(data: bytes) -> None:
            t = rig.next_t()
            rig.odom(t)
            msg = CompressedImage(format="png", data=data)
            msg.header.stamp = sec_to_stamp(t)
            pub.publish(msg)

        for data in (b"\x89PNG\r\n\x1a\n garbage", png.tobytes()[:40], b"\xff\xd8\xff\xe0 not a jpeg", b"GIF89a",
                     b"", bytes(bomb)):
            rig.expect("bad_images", lambda d=data: send(d), node=loc, what=f"corrupt compressed {data[:8]!r}")
        n = loc.counters["processed"]
        send(png.tobytes())
        s.wait(lambda: loc.counters["processed"] > n, what="good png after corrupt ones")
    finally:
        s.executor.remove_node(loc)
        loc.destroy_node()


def test_camera_at_10x_rate_keeps_newest_only(rig):
    """100 frames in ~0.5 s (200 Hz, 10× process_rate): newest-only, nothing queues, all accounted for."""
    s = rig.s
    c0 = dict(s.loc.counters)
    for _ in range(100):
        t = rig.next_t(0.005)
        rig.odom(t)
        rig.frame(raw_image("rgb8"), t)
        time.sleep(0.005)
    c = s.loc.counters

    def handled() -> int:
        return sum(c[k] - c0[k] for k in ("processed", "dropped_newer_frame", "no_odom", "out_of_order",
                                          "skipped_small_motion"))

    # Every received frame is used or dropped and counted; none is queued.
    s.wait(lambda: s.loc._pending is None and handled() == c["frames"] - c0["frames"], what="all frames handled")
    got, used = c["frames"] - c0["frames"], c["processed"] - c0["processed"]
    assert 0 < used < got, (got, used)  # frames were superseded before a step could take them
    assert c["dropped_newer_frame"] > c0["dropped_newer_frame"]
    rig.good_step()


# ---- poses, odometry, stamps ----------------------------------------------------------------
def test_nan_inf_and_quaternions(rig):
    s = rig.s

    def pose(x=1.0, y=2.0, q=(0.0, 0.0, 0.0, 1.0)):
        p = xyyaw_to_pose(np.array([x, y, 0.0]))
        p.orientation.x, p.orientation.y, p.orientation.z, p.orientation.w = q
        return p

    for raw in (pose(x=float("nan")), pose(y=float("inf")), pose(q=(0.0, 0.0, 0.0, 0.0)),
                pose(q=(0.0, 0.0, float("nan"), 1.0))):
        rig.expect("bad_odom", lambda r=raw: rig.odom(rig.next_t(), raw=r), what="bad odometry")
    init = s.probe.create_publisher(PoseWithCovarianceStamped, "initialpose", 10)

    def initialpose(p, cov=None, frame="map"):
        msg = PoseWithCovarianceStamped()
        msg.header.frame_id = frame
        msg.pose.pose, msg.pose.covariance = p, cov3_to_cov6(np.diag([0.25, 0.25, 0.05]) if cov is None else cov)
        init.publish(msg)

    for args in ((pose(x=float("nan")),), (pose(q=(0.0, 0.0, 0.0, 0.0)),), (pose(), np.full((3, 3), np.nan)),
                 (pose(), np.diag([-1.0, 1.0, 1.0])), (pose(), np.eye(3), "odom"), (pose(x=500.0),)):
        rig.expect("bad_initialpose", lambda a=args: initialpose(*a), what=f"bad initialpose {args[1:]}")
    # A non-unit quaternion (yaw 0.6 rad, scaled by 7) is normalized, not rejected.
    q = 7.0 * np.array([0.0, 0.0, np.sin(0.3), np.cos(0.3)])
    n_bad = s.loc.counters["bad_initialpose"]
    initialpose(pose(q=tuple(q)), np.diag([0.01, 0.01, 0.001]))
    s.wait(lambda: abs(np.angle(np.exp(1j * s.loc.localizer.current_estimate()[0][2])) - 0.6) < 0.05,
           what="tracking from the normalized quaternion")
    assert s.loc.counters["bad_initialpose"] == n_bad
    # A context pose with NaN or a zero quaternion at the mapping node is dropped and counted.
    ctx = s.probe.create_publisher(PoseStamped, "context/pose", CONTEXT_QOS)
    for raw in (pose(x=float("nan")), pose(q=(0.0, 0.0, 0.0, 0.0))):
        msg = PoseStamped(pose=raw)
        msg.header.frame_id = "map"
        rig.expect("bad_poses", lambda m=msg: ctx.publish(m), node=s.mapping, what="bad context pose")
    rig.good_step()


def test_stamps_out_of_order_duplicate_future(rig):
    s = rig.s
    rig.good_step()
    last = s.loc.last_stamp
    rig.expect("out_of_order", lambda: rig.frame(raw_image("rgb8"), last), what="duplicate stamp")
    rig.expect("out_of_order", lambda: rig.frame(raw_image("rgb8"), last - 0.5), what="older stamp")
    far = time.time() + 1e6
    rig.expect("future_stamp", lambda: rig.frame(raw_image("rgb8"), far), what="future frame")
    rig.expect("future_stamp", lambda: rig.odom(far), what="future odometry")
    assert s.loc.odom.latest_stamp < far and s.loc.last_stamp < far
    rig.good_step()  # neither poisoned the stamps: later good input still flows


def test_odometry_reset_jump_and_standing_still_past_the_buffer(rig):
    s = rig.s
    rig.good_step()
    rig.pose = rig.pose + np.array([40.0, 0.0, 0.0])  # odometry driver restarted elsewhere
    rig.expect("odom_jumps", lambda: rig.odom(rig.next_t()), what="odometry jump")
    before = s.loc.localizer.current_estimate()[0]
    rig.good_step()  # runs without motion: the belief does not fly 40 m with the odometry
    assert np.hypot(*(s.loc.localizer.current_estimate()[0][:2] - before[:2])) < 5.0
    # Standing still for longer than odom_buffer_s (3 s here): updates are skipped as small motion, the
    # buffer forgets the last update's stamp, and the next real motion must still be processed.
    s.loc.p["update_min_d"] = s.loc.p["update_min_a"] = 0.5
    try:
        t0 = rig.t
        for k in range(1, 13):
            rig.odom(t0 + 0.5 * k)
        rig.t = t0 + 6.0
        rig.expect("skipped_small_motion", lambda: rig.frame(raw_image("rgb8"), rig.t), what="standing still")
        s.wait(lambda: s.loc.odom.pose_at(s.loc.last_stamp) is None, what="last stamp out of the odom buffer")
        rig.pose = rig.pose + np.array([1.0, 0.0, 0.0])
        n = s.loc.counters["processed"]
        rig.odom(rig.next_t())
        rig.frame(raw_image("rgb8"), rig.t)
        s.wait(lambda: s.loc.counters["processed"] > n, what="update after standing still")
    finally:
        s.loc.p["update_min_d"] = s.loc.p["update_min_a"] = 0.0


def test_nomotion_update_right_after_reinitialization(rig):
    """request_nomotion_update before any frame of a new belief must not stall later frames.

    As nav2_amcl, the request forces the next new frame (it once re-filtered the last frame,
    stamped 0.0, and every later frame was dropped as no_odom)."""
    s = rig.s
    rig.good_step()
    s.call(Empty, "reinitialize_global_localization")
    n = s.loc.counters["processed"]
    s.call(Empty, "request_nomotion_update")
    time.sleep(0.3)  # several work ticks: no update without a new frame
    assert s.loc.counters["processed"] == n and s.loc.last_stamp is None
    rig.good_step()
    rig.good_step()


# ---- maps -----------------------------------------------------------------------------------
def test_empty_foreign_and_malformed_maps(rig, untrained):
    s = rig.s
    good = view_map_to_pointcloud(s.mapping.view_map.copy(), stamp=sec_to_stamp(time.time()))
    foreign = ViewMap(fingerprint="0123456789abcdef", meters_per_unit=20.0, embed_shape=untrained.info.embed_shape)
    foreign.add(embeddings=np.zeros((2, *untrained.info.embed_shape)), poses=np.zeros((2, 3)), ids=["a", "b"])
    truncated = view_map_to_pointcloud(s.mapping.view_map.copy(), stamp=sec_to_stamp(time.time()))
    truncated.data = bytes(truncated.data)[:-10]
    wrong_frame = view_map_to_pointcloud(s.mapping.view_map.copy(), stamp=sec_to_stamp(time.time()))
    wrong_frame.header.frame_id = "odom"
    for msg in (view_map_to_pointcloud(foreign, stamp=sec_to_stamp(1.0)), truncated, wrong_frame):
        rig.expect("bad_maps", lambda m=msg: rig.map_pub.publish(m), what="bad map")
        assert len(s.loc.localizer.view_map) == 8  # the previous map stays
    empty = view_map_to_pointcloud(ViewMap.for_model(untrained.info), stamp=sec_to_stamp(2.0))
    rig.map_pub.publish(empty)
    s.wait(lambda: not s.loc.localizer.has_map, what="empty map clears")
    rig.expect("dropped_not_ready", lambda: (rig.odom(rig.next_t()), rig.frame(raw_image("rgb8"), rig.t)),
               what="frame without a map")
    rig.map_pub.publish(good)
    s.wait(lambda: s.loc.localizer.has_map, what="map back")
    rig.good_step()


def test_corrupt_truncated_foreign_map_file_at_mapping_start(rig, untrained, tmp_path):
    s = rig.s
    vm = s.mapping.view_map.copy()
    data = vm.to_bytes()
    foreign = ViewMap(fingerprint="feedfeedfeedfeed", meters_per_unit=20.0, embed_shape=vm.embed_shape)
    for name, blob in (("truncated", data[: len(data) // 2]), ("corrupt", bytes(RNG.integers(0, 256, 999, np.uint8))),
                       ("foreign", foreign.to_bytes()), ("empty", b"")):
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(blob)
        node = MappingNode(model=untrained, namespace=f"mf_{name}", context=s.ctx,
                           parameter_overrides=[Parameter("map_file", value=str(path))])
        try:
            assert len(node.view_map) == 0 and node._autosave is False, name  # refused, file kept as it is
            node.add_contexts([RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)], np.zeros((1, 3)))
            node._flush()
            assert path.read_bytes() == blob and len(node.view_map) == 1
        finally:
            node.destroy_node()


def test_context_flood_bounded(rig, untrained):
    """60 context pairs + 50 unpaired images into a node with max_contexts 10 and max_unpaired 20."""
    s = rig.s
    node = MappingNode(model=untrained, namespace="flood", context=s.ctx, parameter_overrides=[
        Parameter("max_contexts", value=10), Parameter("max_unpaired", value=20)])
    s.executor.add_node(node)
    try:
        img_pub = s.probe.create_publisher(Image, "/flood/context/image", CONTEXT_QOS)
        pose_pub = s.probe.create_publisher(PoseStamped, "/flood/context/pose", CONTEXT_QOS)
        s.wait(lambda: img_pub.get_subscription_count() and pose_pub.get_subscription_count(), what="flood subs")
        for k in range(60):
            stamp = sec_to_stamp(1000.0 + k)
            im = raw_image("rgb8", 48, 48)  # larger than the model: stored at model size
            im.header.stamp = stamp
            ps = PoseStamped(pose=xyyaw_to_pose(RNG.uniform(-15, 15, 3)))
            ps.header.stamp, ps.header.frame_id = stamp, "map"
            img_pub.publish(im)
            pose_pub.publish(ps)
            time.sleep(0.01)  # ~100 pairs/s; an unpaced 700 KB burst overruns Fast DDS's loopback buffers
        s.wait(lambda: node.counters["paired"] >= 60, 30.0, what="flood paired")
        for k in range(50):
            im = raw_image("rgb8", 48, 48)
            im.header.stamp = sec_to_stamp(5000.0 + k)
            img_pub.publish(im)
            time.sleep(0.005)
        s.wait(lambda: node.counters["unpaired_images"] >= 30, what="unpaired images dropped")
        assert len(node.view_map) == 10 and len(node._images) <= 20
        assert all(im.shape == (32, 32, 3) for _, _, im in node._images)
        assert len(node._id_of_stamp) <= 20 and node.ledger.counters["thinned"] == 50
    finally:
        s.executor.remove_node(node)
        node.destroy_node()


# ---- model files ----------------------------------------------------------------------------
def test_model_file_faults(untrained, tmp_path):
    good = open(untrained.path, "rb").read()
    cases = {"missing": None, "corrupt": bytes(RNG.integers(0, 256, 4096, np.uint8)),
             "truncated": good[: len(good) // 2], "empty": b"", "zip_no_meta": None, "other_arch": None,
             "bad_meta": None}
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("x/data.pkl", b"not torchscript")
    cases["zip_no_meta"] = buf.getvalue()
    other = torch.jit.script(torch.nn.Linear(2, 2))
    buf = io.BytesIO()
    torch.jit.save(other, buf, _extra_files={META_FILE: open_meta(untrained)})
    cases["other_arch"] = buf.getvalue()
    buf = io.BytesIO()
    torch.jit.save(other, buf, _extra_files={META_FILE: "[1, 2"})
    cases["bad_meta"] = buf.getvalue()
    for name, blob in cases.items():
        path = tmp_path / f"{name}.pt"
        if blob is not None:
            path.write_bytes(blob)
        with pytest.raises(ModelLoadError, match=str(path.name)):
            load_model(path)


def open_meta(model) -> str:
    import json
    from dataclasses import asdict

    return json.dumps(asdict(model.info))


def test_node_with_bad_model_path_fails_clearly(rig, tmp_path):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"PK\x03\x04 truncated")
    for cls in (LocalizationNode, MappingNode):
        with pytest.raises(ModelLoadError, match=r"broken\.pt"):
            cls(namespace="badmodel", context=rig.s.ctx, parameter_overrides=[Parameter("model_path", value=str(bad))])
    rig.good_step()  # the rest of the process is unaffected


# ---- faults ---------------------------------------------------------------------------------
def test_mapping_restart_restores_identical_map_and_interrupted_saves(rig, untrained, tmp_path, monkeypatch):
    s = rig.s
    path = tmp_path / "site.safetensors"
    over = [Parameter("map_file", value=str(path))]
    node = MappingNode(model=untrained, namespace="restart", context=s.ctx, parameter_overrides=over)
    imgs = [RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(6)]
    node.add_contexts(imgs, RNG.uniform(-10, 10, (6, 3)), stamps_ns=list(range(6)))
    node._flush()  # the autosave a timer does every 0.2 s
    before = node.view_map.copy()
    node.destroy_node()  # "killed": nothing runs at shutdown, the autosaved file is all there is
    node = MappingNode(model=untrained, namespace="restart", context=s.ctx, parameter_overrides=over)
    try:
        assert_identical(node.view_map, before)
        assert node.view_map.ids == before.ids
        saved = path.read_bytes()

        def fail(_fd):
            raise OSError(28, "No space left on device (simulated, mid-write)")

        monkeypatch.setattr(export_mod.os, "fsync", fail)
        node.add_contexts(imgs[:1], np.zeros((1, 3)))
        node._flush()  # autosave fails: counted and logged, the node keeps mapping
        assert node.counters["save_errors"] == 1 and path.read_bytes() == saved
        resp = node._on_save(None, Trigger.Response())
        assert not resp.success and "No space" in resp.message and path.read_bytes() == saved
        assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temp file left behind
        monkeypatch.undo()
        node._save_retry_at = 0.0
        node._flush()  # the retry succeeds once the disk is back
        assert len(ViewMap.load(path, expected_fingerprint=untrained.info.fingerprint)) == 7
        # A process killed between write and rename leaves only a stray temp file: the map still loads.
        (tmp_path / ".site.safetensors.crash.tmp").write_bytes(b"half a file")
        assert len(ViewMap.load(path)) == 7
    finally:
        node.destroy_node()


def test_localization_restart_resumes_from_saved_pose(rig, untrained, tmp_path):
    s = rig.s
    for _ in range(2):
        rig.good_step()
    assert s.loc.save_pose() or s.loc.pose_saves > 0
    mean, cov = read_pose_file(s.loc.pose_file, frame_id="map")
    np.testing.assert_allclose(mean, s.loc.last_estimate.mean, atol=1e-9)
    over = params({"pose_file": str(s.loc.pose_file), "initialize_at_saved_pose": True, "tracking_particles": 64,
                   "save_pose_rate": 0.0})
    node = LocalizationNode(model=untrained, namespace="restarted", context=s.ctx, parameter_overrides=over)
    try:
        assert node.localizer.mode == "tracking"
        start = node.localizer.current_estimate()[0]
        np.testing.assert_allclose(start[:2], mean[:2], atol=3 * np.sqrt(cov[0, 0]) + 0.5)
    finally:
        node.destroy_node()
    # Invalid saved poses: the node starts uninitialized and says why.
    bad = tmp_path / "bad.yaml"
    head = "format: dmn_ros.pose/1\nframe_id: map\n"
    for text in ("!!python/object/apply:os.system ['echo pwned']", "format: dmn_ros.pose/1\nframe_id: odom\n",
                 head + "x: .nan\ny: 0\nyaw: 0\ncovariance: [[1,0,0],[0,1,0],[0,0,1]]\n",
                 head + "x: 0\ny: 0\nyaw: 0\ncovariance: [[1,2],[3]]\n",
                 "\x00\xff garbage", "[1, 2"):
        bad.write_text(text, encoding="utf-8", errors="surrogateescape")
        with pytest.raises(ValueError):
            read_pose_file(bad, frame_id="map")
        over = [Parameter("pose_file", value=str(bad)), Parameter("initialize_at_saved_pose", value=True),
                Parameter("save_pose_rate", value=0.0)]
        node = LocalizationNode(model=untrained, namespace="badpose", context=s.ctx, parameter_overrides=over)
        assert not node.localizer.initialized
        node.destroy_node()
    assert resolve_pose_file("", "/robot2", "localization_node").name == "dmn_ros_robot2_localization_node_pose.yaml"


def test_a_save_that_finds_nothing_new_waits_for_the_save_in_flight(rig, monkeypatch):
    """The save timer and a shutdown save can overlap: the second must not return before the file is written."""
    import dmn_ros.ros.localization_node as node_mod

    s = rig.s
    rig.good_step()
    s.loc.pose_file.unlink(missing_ok=True)
    real_write = node_mod.atomic_write_bytes

    def slow_write(path, data):  # a slow disk
        time.sleep(0.5)
        real_write(path, data)

    monkeypatch.setattr(node_mod, "atomic_write_bytes", slow_write)
    first = threading.Thread(target=s.loc.save_pose)
    first.start()
    time.sleep(0.1)  # the first save has claimed this estimate and is writing
    assert s.loc.save_pose() is False  # nothing new to save ...
    mean, _ = read_pose_file(s.loc.pose_file, frame_id="map")  # ... but the file is there and current
    np.testing.assert_allclose(mean, s.loc.last_estimate.mean, atol=1e-9)
    first.join()


def test_peer_disappears_mid_share(untrained, tmp_path):
    r1, r2 = Robot(untrained, tmp_path, "peer1"), Robot(untrained, tmp_path, "peer2")
    stop = threading.Event()
    errors: list[BaseException] = []
    try:
        m1 = r1.mapping(robot_id="peer1")
        pub = r2.probe.create_publisher(PointCloud2, "/dmn_shared_contexts", shared_qos(20))
        emb = embed_images(untrained, [RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(5)])

        def stream():  # peer2 shares batches of 5 until its process "dies" under it
            k = 0
            while not stop.is_set():
                b = ContextBatch(frame_id="map", ids=[f"peer2/{k + i:06d}" for i in range(5)], embeddings=emb,
                                 poses=RNG.uniform(-10, 10, (5, 3)), fingerprint=untrained.info.fingerprint)
                try:
                    pub.publish(shared_batch_to_pointcloud(b, stamp=sec_to_stamp(time.time())))
                except BaseException as exc:  # publishing on a dead context may raise
                    errors.append(exc)
                    return
                k += 5
                time.sleep(0.02)

        th = threading.Thread(target=stream, daemon=True)
        th.start()
        r1.wait(lambda: len(m1.view_map) >= 10, 30.0, "peer2's views merged")
        r2.close()  # peer2 vanishes mid-stream (its participant is gone without a goodbye)
        stop.set()
        th.join(timeout=5)
        # Batches peer2 sent before it vanished may still arrive: count robot1's own views, not all of them.
        def own() -> int:
            return sum(not i.startswith("peer2/") for i in list(m1.view_map.ids))

        n = own()
        r1.wait(lambda: r1.thread.is_alive(), what="robot1 executor alive")
        m1.add_contexts([RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)], np.zeros((1, 3)))
        r1.wait(lambda: own() == n + 1, what="robot1 still maps")
        assert m1.counters["shared_malformed"] == 0
        assert r1.call(Trigger, "/peer1/mapping_node/save_map").success
    finally:
        stop.set()
        r1.close()
        if r2.ctx.ok():
            r2.close()


# ---- public API -----------------------------------------------------------------------------
def test_public_api_bad_inputs_raise_documented_errors(untrained, tmp_path):
    from dmn_ros.images import ImageDecodeError, decode_compressed, decode_raw
    from dmn_ros.localizer import Localizer

    with pytest.raises(ImageDecodeError):
        decode_raw(encoding="16UC1", height=2, width=2, step=4, data=bytes(8))
    with pytest.raises(ImageDecodeError):
        decode_compressed(b"\xff\xd8\xff\xdb\x00\x04ab")
    loc = Localizer(untrained, config=None)
    with pytest.raises(DmnError):
        loc.step(np.zeros((32, 32, 3), np.uint8))  # no map, no belief
    with pytest.raises(FingerprintMismatchError):
        loc.set_map(ViewMap(fingerprint="other", meters_per_unit=20.0))
    with pytest.raises(ValueError):
        loc.init_pose([0.0, float("nan"), 0.0], np.eye(3))
    with pytest.raises(MapError):
        ViewMap.load(tmp_path / "nope.safetensors")
    with pytest.raises(ValueError):
        sec_to_stamp(float("inf"))
    p = xyyaw_to_pose(np.array([1.0, 2.0, 0.5]))
    p.orientation.z, p.orientation.w = p.orientation.z * 1e300, p.orientation.w * 1e300  # huge but finite
    assert abs(pose_to_xyyaw(p)[2] - 0.5) < 1e-9


# ---- load -----------------------------------------------------------------------------------
SOAK_RSS_GROWTH_MB = 60.0
"""Bound on resident-memory growth from the end of the 20 s warm-up to the end of the 60 s soak.

One run grew by 65 MB between 10 and 20 s and then by 8.5 MB over the last 30 s: a one-off step
while buffers fill, not a leak; a 10 s warm-up counted that step as growth."""


@pytest.mark.slow
def test_soak_60s_no_crash_no_rss_growth(untrained):
    """bench/soak.py for 60 s (30 Hz camera, 50 Hz odometry, K = 64, 8 contexts): alive, bounded memory."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("soak", Path(__file__).resolve().parent.parent / "bench" / "soak.py")
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    res = soak.run_soak(60.0, particles=64, contexts=8, window=10.0, warmup=20.0, model_path=untrained.path,
                        domain_id=domain_id() + 1, quiet=True)
    s = res["summary"]
    rows = "\n".join(str(r) for r in res["rows"])
    print(rows)
    assert s["executor_alive"], rows
    c = s["counters"]
    # Liveness, not speed (bench/ measures speed). All nodes and the 30/50 Hz publisher share one Python process
    # (one GIL) here, so odometry callbacks fall behind the camera; since a frame now waits for the odometry
    # stamped with it (test_bags live replay), this harness processes 0.5-0.7 Hz (29-39 of ~850 frames in 60 s,
    # docs/RELIABILITY.md). The bound asserts the worker keeps running: >= 0.25 Hz.
    assert c["processed"] >= 15 and c["step_errors"] == 0 and c["bad_images"] == 0, c
    assert c["dropped_newer_frame"] > 0  # 30 Hz into a 20 Hz worker: newest-only, not a queue
    handled = sum(c[k] for k in ("processed", "dropped_newer_frame", "dropped_not_ready", "no_odom", "out_of_order",
                                 "skipped_small_motion"))
    from dmn_ros.ros.localization_node import MAX_WAITING_FRAMES

    # All accounted for; at the end up to MAX_WAITING_FRAMES may still wait for their odometry.
    assert c["frames"] - MAX_WAITING_FRAMES <= handled <= c["frames"], c
    assert s["map_views_end"] == 8  # re-sent contexts replace their views
    assert s["rss_growth_after_warmup_mb"] < SOAK_RSS_GROWTH_MB, res["rows"]
