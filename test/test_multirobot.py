"""Multi-robot map sharing over real DDS on loopback: namespaced robots, one shared topic.

robot1's sim publishes contexts to robot1's mapping node, which shares them; robot2's
mapping node merges them and robot2's localizer, which never saw a context of its own,
localizes robot2's camera stream on the merged map as it grows; a late third mapping
node ends up with the identical map; bad and repeated contexts are rejected and counted.
Also measures bytes per shared context and the late-join time for a 100-context map.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")

from geometry_msgs.msg import PoseWithCovarianceStamped  # noqa: E402
from rclpy.serialization import serialize_message  # noqa: E402
from ros_helpers import LOC_PARAMS, SIM_PARAMS, Spinning, initialpose_msg, params  # noqa: E402
from sensor_msgs.msg import PointCloud2  # noqa: E402
from std_srvs.srv import Empty, Trigger  # noqa: E402

from dmn_ros.export import default_model_path, load_model  # noqa: E402
from dmn_ros.localizer import embed_images  # noqa: E402
from dmn_ros.maps import ViewMap  # noqa: E402
from dmn_ros.ros.conversions import (  # noqa: E402
    pose_to_xyyaw,
    sec_to_stamp,
    shared_batch_to_pointcloud,
    stamp_to_sec,
)
from dmn_ros.ros.localization_node import POSE_QOS, LocalizationNode  # noqa: E402
from dmn_ros.ros.mapping_node import MappingNode, shared_qos  # noqa: E402
from dmn_ros.ros.sim_node import SimNode  # noqa: E402
from dmn_ros.sharing import ContextBatch  # noqa: E402

pytestmark = pytest.mark.ros

SEED = 20_000_003
TOPIC = "/dmn_shared_contexts"


class Robot(Spinning):
    """One robot's namespaced nodes in their own rclpy context (own DDS participant, so peers discover
    each other over loopback as separate robots would), spun by a background executor."""

    poll = 0.01

    def __init__(self, model, tmp_path, ns):
        super().__init__(num_threads=3)
        self.model = model
        self.tmp = tmp_path
        self.ns = ns
        self.probe = self.add(rclpy.create_node("probe", namespace=ns, context=self.ctx))
        self.start()

    def mapping(self, **over):
        ns = self.ns
        ps = {"share_contexts": True, "map_file": str(self.tmp / f"{ns}.safetensors"), **over}
        return self.add(MappingNode(model=self.model, namespace=ns, context=self.ctx, parameter_overrides=params(ps)))

    def sim(self, *, num_contexts=8, seed=SEED, **over):
        ps = {"world_seed": seed, **SIM_PARAMS, "num_contexts": num_contexts, **over}
        return self.add(SimNode(namespace=self.ns, context=self.ctx, parameter_overrides=params(ps)))

    def localization(self, **over):
        return self.add(LocalizationNode(model=self.model, namespace=self.ns, context=self.ctx,
                                         parameter_overrides=params({**LOC_PARAMS, **over})))


def _by_id(vm: ViewMap) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {v: (vm.poses[i], vm.embeddings[i]) for i, v in enumerate(vm.ids)}


def assert_identical(a: ViewMap, b: ViewMap) -> None:
    ma, mb = _by_id(a), _by_id(b)
    assert sorted(ma) == sorted(mb)
    for v in ma:  # bit-identical: float64 poses and float32 embeddings travel unchanged
        np.testing.assert_array_equal(ma[v][0], mb[v][0])
        np.testing.assert_array_equal(ma[v][1], mb[v][1])


def _step(f: Robot, sim: SimNode, loc: LocalizationNode, poses: list, timeout: float = 30.0) -> float:
    n = loc.counters["processed"]
    stamp = sim.step_once()
    f.wait(lambda: loc.counters["processed"] > n, timeout, "filter step")
    f.wait(lambda: poses and abs(stamp_to_sec(poses[-1].header.stamp) - stamp) < 1e-6, timeout, "pose")
    return stamp


def _robot2(r2: Robot, **loc_over):
    """robot2: a simulated robot (camera, odometry; its context topics lead nowhere), mapping, localizer."""
    sim2 = r2.sim(num_contexts=1, context_image_topic="unused/image", context_pose_topic="unused/pose")
    map2 = r2.mapping()
    loc2 = r2.localization(**loc_over)
    poses: list[PoseWithCovarianceStamped] = []
    r2.probe.create_subscription(PoseWithCovarianceStamped, "/robot2/dmn_pose", poses.append, POSE_QOS)
    return sim2, map2, loc2, poses


def test_robot2_localizes_on_robot1s_contexts_late_joiner_and_rejections(untrained, tmp_path):
    r1, r2 = Robot(untrained, tmp_path, "robot1"), Robot(untrained, tmp_path, "robot2")
    robots = [r1, r2]
    f = r2
    try:
        sim1, map1 = r1.sim(), r1.mapping()
        sim2, map2, loc2, poses = _robot2(r2)
        assert map1.robot_id == "robot1" and map2.robot_id == "robot2"  # from the namespaces
        sim1.publish_contexts()
        f.wait(lambda: len(map1.view_map) == 8, what="robot1 maps its contexts")
        f.wait(lambda: len(map2.view_map) == 8, what="robot2 merges robot1's contexts")
        assert all(v.startswith("robot1/") for v in map2.view_map.ids)
        assert map2.counters["paired"] == 0  # robot2 never saw a context of its own
        f.wait(lambda: loc2.localizer.has_map and len(loc2.localizer.view_map) == 8, what="merged map at loc2")

        # robot2 localizes its own camera stream on the merged map.
        f.call(Empty, "/robot2/reinitialize_global_localization")
        for _ in range(2):
            _step(f, sim2, loc2, poses)
        assert poses[-1].header.frame_id == "map"
        assert np.isfinite(pose_to_xyyaw(poses[-1].pose.pose)).all()

        # The map grows on robot1 (4 more views); robot2's localizer uses it without a restart.
        extra = sim1.world.sample_free_poses(4, np.random.default_rng(7))
        map1.add_contexts(list(sim1.world.render(extra)), extra)
        f.wait(lambda: len(loc2.localizer.view_map) == 12, what="grown map at loc2")
        _step(f, sim2, loc2, poses)
        assert loc2.counters["processed"] >= 3 and loc2.localizer.mode == "global"

        # A late joiner (robot3) ends up with the identical map.
        t0 = time.monotonic()
        robots.append(Robot(untrained, tmp_path, "robot3"))
        map3 = robots[-1].mapping()
        f.wait(lambda: len(map3.view_map) == 12, what="late joiner's map")
        late_join_s = time.monotonic() - t0
        time.sleep(0.5)  # any further (duplicate) deliveries settle
        assert_identical(map3.view_map, map1.view_map)
        assert_identical(map3.view_map, map2.view_map)
        assert map3.counters["shared_fingerprint"] == 0 and len(map3.view_map) == 12

        # Duplicates, a foreign model, a foreign frame and NaN poses are rejected and counted.
        bad = f.probe.create_publisher(PointCloud2, TOPIC, shared_qos(10))
        f.wait(lambda: bad.get_subscription_count() >= 3, what="probe matched")
        base = dict(map2.counters)
        dup = ContextBatch(frame_id="map", ids=map2.view_map.ids[:3], poses=map2.view_map.poses[:3],
                           embeddings=map2.view_map.embeddings[:3], fingerprint=untrained.info.fingerprint)
        foreign = ContextBatch(frame_id="map", ids=["robot9/000000", "robot9/000001"], poses=np.zeros((2, 3)),
                               embeddings=np.zeros((2, *untrained.info.embed_shape), np.float32),
                               fingerprint="0123456789abcdef")
        wrong_frame = ContextBatch(frame_id="odom", ids=["robot9/000002"], poses=np.zeros((1, 3)),
                                   embeddings=np.zeros((1, *untrained.info.embed_shape), np.float32),
                                   fingerprint=untrained.info.fingerprint)
        nan_pose = ContextBatch(frame_id="map", ids=["robot9/000003"], poses=np.array([[np.nan, 0.0, 0.0]]),
                                embeddings=np.zeros((1, *untrained.info.embed_shape), np.float32),
                                fingerprint=untrained.info.fingerprint)
        for b in (dup, foreign, wrong_frame, nan_pose):
            bad.publish(shared_batch_to_pointcloud(b, stamp=sec_to_stamp(1.0)))

        def grew(key, n):
            return lambda: map2.counters.get(key, 0) - base.get(key, 0) >= n

        f.wait(grew("shared_duplicate", 3), what="duplicates counted")
        f.wait(grew("shared_fingerprint", 2), what="foreign fingerprint counted")
        f.wait(grew("shared_frame", 1), what="foreign frame counted")
        f.wait(grew("shared_non_finite", 1), what="NaN pose counted")
        assert len(map2.view_map) == 12 and not any(v.startswith("robot9/") for v in map2.view_map.ids)

        # ~/save_map on robot2 saves the merged map.
        assert f.call(Trigger, "/robot2/mapping_node/save_map").success
        saved = ViewMap.load(map2.map_file, expected_fingerprint=untrained.info.fingerprint)
        assert_identical(saved, map2.view_map)
        print(f"\nlate joiner received the 12-view map in {late_join_s:.2f} s; robot2 counters: "
              f"{ {k: v for k, v in map2.counters.items() if k.startswith(('shared', 'sync'))} }")
    finally:
        for r in robots:
            r.close()


@pytest.mark.parametrize("fmt", ["embeddings", "images"])
def test_late_joiner_receives_100_contexts_and_bytes_per_context(untrained, tmp_path, fmt):
    """Figures for docs/multirobot.md: wire bytes per context, encode time, 100-context late-join time."""
    r1, r2 = Robot(untrained, tmp_path, "robot1"), None
    f = r1
    try:
        sim = f.sim(num_contexts=100, seed=SEED + 1)
        images, poses = list(sim.context_images), sim.context_poses
        for _ in range(2):  # warm-up: TorchScript's profiling executor optimizes on the first two calls
            embed_images(untrained, images)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            embed_images(untrained, images)
            times.append((time.perf_counter() - t0) * 1000.0 / len(images))
        encode_ms = float(np.median(times))
        map1 = f.mapping(share_format=fmt)
        map1.add_contexts(images, poses)
        assert len(map1.view_map) == 100
        f.wait(lambda: map1.counters["shared_sent"] >= 100, what="robot1 shares")
        batch = map1.ledger.outgoing(map1.view_map, fmt=map1.share_format, batch_size=50)[0]
        msg = shared_batch_to_pointcloud(batch, stamp=sec_to_stamp(1.0))
        bytes_per_context = len(serialize_message(msg)) / len(batch)
        t0 = time.monotonic()  # a new robot: its own DDS participant, discovery included
        r2 = Robot(untrained, tmp_path, "robot2")
        map2 = r2.mapping()
        f.wait(lambda: len(map2.view_map) > 0, timeout=40.0, what="first view")
        first_s = time.monotonic() - t0
        f.wait(lambda: len(map2.view_map) == 100, timeout=40.0, what="late joiner's 100 views")
        late_s = time.monotonic() - t0
        assert sorted(map2.view_map.ids) == sorted(map1.view_map.ids)
        if fmt == "embeddings":
            assert_identical(map2.view_map, map1.view_map)
            assert bytes_per_context > 4 * int(np.prod(untrained.info.embed_shape))
        else:  # re-encoded here: same model and images, so the same embeddings up to float rounding
            a, b = _by_id(map1.view_map), _by_id(map2.view_map)
            for v in a:
                np.testing.assert_array_equal(a[v][0], b[v][0])
                np.testing.assert_allclose(a[v][1], b[v][1], rtol=1e-4, atol=1e-5)
            assert bytes_per_context < 3 * 32 * 32 + 200
        print(f"\n[{fmt}] bytes per shared context (serialized CDR, batches of 50): {bytes_per_context:.0f}; "
              f"encode {encode_ms:.2f} ms/context (CPU, batch of 100); late joiner got its first view after "
              f"{first_s:.2f} s and all 100 after {late_s:.2f} s (participant + node start + discovery + "
              f"transfer{' + re-encoding' if fmt == 'images' else ''})")
    finally:
        if r2 is not None:
            r2.close()
        r1.close()


def test_trained_robot2_tracks_on_the_merged_map(tmp_path):
    """Accuracy with the shipped model; skipped only if ``models/dmn_maze32.pt`` is absent."""
    path = default_model_path()
    if not path.is_file():
        pytest.skip(f"trained model {path} not present")
    model = load_model(path)
    r1, r2 = Robot(model, tmp_path, "robot1"), Robot(model, tmp_path, "robot2")
    f = r2
    try:
        sim1 = r1.sim(num_contexts=32)
        r1.mapping()
        sim2, map2, loc2, poses = _robot2(r2, tracking_particles=256)
        init = f.probe.create_publisher(PoseWithCovarianceStamped, "/robot2/initialpose", 10)
        sim1.publish_contexts()
        f.wait(lambda: len(map2.view_map) == 32 and loc2.localizer.has_map
               and len(loc2.localizer.view_map) == 32, what="merged map at robot2")
        sim2.step_once()
        msg = initialpose_msg(sim2.truth + np.array([3.0, 0.0, 0.2]), np.diag([36.0, 36.0, math.radians(30) ** 2]))
        f.wait(lambda: init.get_subscription_count() > 0, what="initialpose matched")
        init.publish(msg)
        f.wait(lambda: loc2.localizer.mode == "tracking", what="tracking")
        errs = []
        for _ in range(5):
            _step(f, sim2, loc2, poses, timeout=60.0)
            est = pose_to_xyyaw(poses[-1].pose.pose)
            errs.append(float(np.hypot(*(est[:2] - sim2.truth[:2]))))
        print(f"\nrobot2 tracking errors on robot1's map (m): {[round(e, 2) for e in errs]}")
        assert errs[-1] < 6.0, f"tracking errors {errs}"
    finally:
        r2.close()
        r1.close()


def _launch_helpers():
    """``_params_for`` from the launch file (``launch`` itself is not importable here)."""
    import ast
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "launch" / "dmn_localize.launch.py"
    tree = ast.parse(path.read_text())
    keep = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in ("_flatten", "_params_for")]
    ns: dict = {"yaml": __import__("yaml")}
    exec(compile(ast.Module(body=keep, type_ignores=[]), str(path), "exec"), ns)
    return ns["_params_for"]


def test_namespaced_launch_gets_node_sections(untrained, tmp_path):
    """``namespace:=robot2`` must not lose the YAML's node sections (rcl matches ``mapping_node:`` only at /)."""
    import yaml

    params_for = _launch_helpers()
    root = __import__("pathlib").Path(__file__).resolve().parent.parent
    doc = yaml.safe_load((root / "config" / "dmn_localize.yaml").read_text())
    doc["mapping_node"]["ros__parameters"]["share_contexts"] = True  # what a fleet's params file sets
    doc["/robot2/mapping_node"] = {"ros__parameters": {"max_contexts": 500}}  # a per-robot section
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(yaml.safe_dump(doc))
    mp = params_for(str(fleet), "mapping_node", "robot2")
    assert mp["share_contexts"] is True and mp["max_contexts"] == 500 and mp["global_frame_id"] == "map"
    assert params_for(str(fleet), "mapping_node", "robot1")["max_contexts"] == 1000
    lp = params_for(str(fleet), "localization_node", "/robot2")
    assert lp["initial_pose.std_xy"] == 6.0 and "share_contexts" not in lp
    r = Robot(untrained, tmp_path, "robot2")
    try:
        node = r.add(MappingNode(model=untrained, namespace="robot2", context=r.ctx, parameter_overrides=params(mp)))
        assert node.sharing and node.robot_id == "robot2" and node.ledger.max_contexts == 500
        assert node.get_fully_qualified_name() == "/robot2/mapping_node"
    finally:
        r.close()
