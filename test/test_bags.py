"""Bag tools: record (mcap/sqlite3), offline evaluation through the Localizer, TUM, errors, live replay over DDS."""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
import time

os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
os.environ.setdefault("ROS_LOCALHOST_ONLY", "1")

import numpy as np
import pytest

from dmn_ros.bags import BagError, BagReadError, MissingTopicError, TruncatedBagError, UnknownMessageTypeError
from dmn_ros.bags.evaluate import EvalOptions, Mode, evaluate_bag
from dmn_ros.bags.evaluate import main as eval_main
from dmn_ros.bags.reader import load_bag
from dmn_ros.bags.record import RecordConfig, Storage, record_bag, typestore
from dmn_ros.bags.tum import read_tum
from dmn_ros.export import default_model_path, load_model
from dmn_ros.geometry import wrap_angle

FRAMES = 12
CONTEXTS = 6
K = 64


@pytest.fixture(scope="module")
def bags(tmp_path_factory):
    root = tmp_path_factory.mktemp("bags")
    out = {}
    for storage in (Storage.MCAP, Storage.SQLITE3):
        p = root / storage.value
        record_bag(p, RecordConfig(steps=FRAMES, num_contexts=CONTEXTS, storage=storage, odom_noise_xy=0.05,
                                   odom_noise_yaw=0.01, compressed=storage == Storage.SQLITE3))
        out[storage.value] = p
    return out


@pytest.fixture(scope="module")
def model(untrained):
    """The conftest untrained model under this module's name."""
    return untrained



def _spinning(ctx, *nodes):
    """A two-thread executor spinning ``nodes`` in the background, as the nodes run on a robot."""
    from rclpy.executors import MultiThreadedExecutor

    ex = MultiThreadedExecutor(num_threads=2, context=ctx)
    for n in nodes:
        ex.add_node(n)
    threading.Thread(target=ex.spin, daemon=True).start()
    return ex

def test_record_writes_both_storages_with_metadata(bags):
    from rosbags.rosbag2 import Reader

    for storage, path in bags.items():
        with Reader(path) as r:
            topics = {c.topic: c.msgtype for c in r.connections}
            assert r.message_count > 0
        cam = "/camera/image" + ("/compressed" if storage == "sqlite3" else "")
        assert topics[cam] in ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")
        assert topics["/odom"] == "nav_msgs/msg/Odometry"
        assert topics["/ground_truth"] == "geometry_msgs/msg/PoseStamped"
        assert topics["/tf"] == "tf2_msgs/msg/TFMessage"
        assert topics["/context/pose"] == "geometry_msgs/msg/PoseStamped"
        data = load_bag(path, need_contexts=True)
        assert len(data.frames) == FRAMES and len(data.contexts) == CONTEXTS
        assert data.area_size_m == 40.0
        assert data.image(0).shape == (32, 32, 3)


def test_ground_truth_as_estimate_scores_zero(bags, tmp_path):
    for storage, path in bags.items():
        res = evaluate_bag(path, EvalOptions(estimate_topic="/ground_truth", progress=False),
                           out_dir=tmp_path / storage)
        m = res["metrics"]
        assert m["steps"] == FRAMES and m["rmse_m"] == pytest.approx(0.0, abs=1e-9)
        assert m["success_at_step"] == {"1": True, "5": True}
        assert m["first_success_step"] == 1 and m["time_to_first_success_s"] == 0.0
        summary = json.loads((tmp_path / storage / "summary.json").read_text())
        assert summary["metrics"]["rmse_m"] == pytest.approx(0.0, abs=1e-9)


def test_offline_eval_through_localizer_same_for_mcap_and_sqlite(bags, model, tmp_path):
    opts = EvalOptions(particles=K, seed=3, progress=False)
    res = {s: evaluate_bag(p, opts, out_dir=tmp_path / s, model=model) for s, p in bags.items()}
    a, b = res["mcap"], res["sqlite3"]  # raw Image vs PNG CompressedImage: lossless, so identical replays
    assert a["frames_processed"] == b["frames_processed"] > FRAMES // 2
    np.testing.assert_allclose(a["metrics"]["errors_m"], b["metrics"]["errors_m"], atol=1e-6)
    lat = a["metrics"]["latency_ms"]
    assert lat["mean"] > 0 and lat["p95"] >= lat["p50"]
    for f in ("trajectory.png", "error.png", "estimate.tum", "ground_truth.tum", "summary.json"):
        assert (tmp_path / "mcap" / f).stat().st_size > 0
    # deterministic: the same seed replays to the same numbers
    again = evaluate_bag(bags["mcap"], opts, model=model)
    assert again["metrics"]["errors_m"] == a["metrics"]["errors_m"]


def test_tum_files_parse_back_to_the_same_poses(bags, model, tmp_path):
    res = evaluate_bag(bags["mcap"], EvalOptions(particles=K, progress=False, plots=False), out_dir=tmp_path,
                       model=model)
    stamps, est = read_tum(tmp_path / "estimate.tum")
    gstamps, gt = read_tum(tmp_path / "ground_truth.tum")
    data = load_bag(bags["mcap"])
    idx = res["frame_indices"]
    np.testing.assert_allclose(stamps, data.frame_stamps[idx], atol=1e-9)
    np.testing.assert_allclose(gstamps, data.frame_stamps[idx], atol=1e-9)
    np.testing.assert_allclose(gt[:, :2], data.ground_truth.poses[idx, :2], atol=1e-8)
    assert np.abs(wrap_angle(gt[:, 2] - data.ground_truth.poses[idx, 2])).max() < 1e-8
    err = np.hypot(*(est[:, :2] - gt[:, :2]).T)
    np.testing.assert_allclose(err, res["metrics"]["errors_m"], atol=1e-7)


def test_shipped_model_within_bound(bags, tmp_path):
    path = default_model_path()
    if not path.is_file():
        pytest.skip(f"shipped model {path} not present yet")
    res = evaluate_bag(bags["mcap"], EvalOptions(mode=Mode.TRACKING, particles=256, progress=False),
                       out_dir=tmp_path, model=load_model(path))
    # Tracking from a 6 m / 30° prior around the first pose in a 40 m maze: the estimate must stay
    # far better than chance (the uniform-prior error is ~15 m); bound: RMSE over the run < 8.94 m.
    assert res["metrics"]["rmse_m"] < 8.94
    assert res["model"]["training_domain"] == "maze"  # the bags are recorded in mazes, as the model was trained


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_topic_unknown_type_and_truncated_errors(bags, tmp_path):
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import get_types_from_msg

    # a bag without ground truth (camera and odometry only)
    from dmn_ros.bags.reader import iter_raw_messages

    ts0 = typestore()
    nogt = tmp_path / "nogt"
    msgs, _ = iter_raw_messages(bags["mcap"])
    with Writer(nogt, version=9, storage_plugin=StoragePlugin.MCAP) as w:
        conns = {}
        for m in msgs:
            if m.topic in ("/camera/image", "/odom"):
                if m.topic not in conns:
                    conns[m.topic] = w.add_connection(m.topic, m.msgtype, typestore=ts0)
                w.write(conns[m.topic], m.log_time_ns, m.data)
    with pytest.raises(MissingTopicError, match=r"nogt: topic /ground_truth is missing"):
        load_bag(nogt)
    with pytest.raises(MissingTopicError, match=r"nogt: topic /context/image is missing"):
        load_bag(nogt, need_ground_truth=False, need_contexts=True)
    # unknown message type on the camera topic
    ts = typestore()
    ts.register(get_types_from_msg("int32 a", "my_msgs/msg/Blob"))
    odd = tmp_path / "odd"
    with Writer(odd, version=9, storage_plugin=StoragePlugin.MCAP) as w:
        c = w.add_connection("/camera/image", "my_msgs/msg/Blob", typestore=ts)
        w.write(c, 1, ts.serialize_cdr(ts.types["my_msgs/msg/Blob"](a=1), "my_msgs/msg/Blob"))
    with pytest.raises(UnknownMessageTypeError, match=r"odd: topic /camera/image has message type my_msgs/msg/Blob"):
        load_bag(odd)
    # truncated mcap: the frames before the cut are recovered and evaluated, marked partial
    cut = _copy(bags["mcap"], tmp_path / "cut_mcap")
    f = next(cut.glob("*.mcap"))
    f.write_bytes(f.read_bytes()[: int(f.stat().st_size * 0.6)])
    res = evaluate_bag(cut, EvalOptions(estimate_topic="/ground_truth", progress=False), out_dir=tmp_path / "o")
    assert res["partial"] and "cut_mcap" in res["truncated"]
    assert 0 < res["metrics"]["steps"] < FRAMES and res["metrics"]["rmse_m"] == pytest.approx(0.0, abs=1e-9)
    # truncated sqlite3: nothing recoverable, a clear error naming the bag
    cut2 = _copy(bags["sqlite3"], tmp_path / "cut_sqlite")
    f2 = next(cut2.glob("*.db3"))
    f2.write_bytes(f2.read_bytes()[: int(f2.stat().st_size * 0.5)])
    with pytest.raises(TruncatedBagError, match="cut_sqlite"):
        load_bag(cut2)
    with pytest.raises(BagReadError, match="absent: cannot open bag"):
        load_bag(tmp_path / "absent")


def test_directory_of_bags_keeps_results_past_a_bad_bag(bags, tmp_path, capsys):
    d = tmp_path / "many"
    d.mkdir()
    _copy(bags["mcap"], d / "a_good")
    _copy(bags["sqlite3"], d / "b_good")
    bad = _copy(bags["sqlite3"], d / "c_bad")
    f = next(bad.glob("*.db3"))
    f.write_bytes(f.read_bytes()[:5000])
    rc = eval_main([str(d), "--estimate-topic", "/ground_truth", "--out", str(tmp_path / "out"), "--no-progress"])
    assert rc == 1  # one bag failed
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    by = {os.path.basename(r["bag"]): r for r in summary["bags"]}
    assert by["c_bad"]["error"] == "TruncatedBagError" and "c_bad" in by["c_bad"]["message"]
    assert by["a_good"]["metrics"]["rmse_m"] == pytest.approx(0.0, abs=1e-9)
    assert summary["aggregate"]["bags_scored"] == 2 and summary["aggregate"]["success_rate"]["5"] == 1.0
    assert (tmp_path / "out" / "a_good" / "estimate.tum").is_file()
    out = capsys.readouterr().out
    assert "a_good" in out and "TruncatedBagError" in out


def test_eval_defaults_match_localization_node_params():
    params = pytest.importorskip("dmn_ros.ros.params")
    from dmn_ros.bags import evaluate as ev

    loc = params.LOCALIZATION
    assert loc["update_min_d"][0] == ev.NODE_UPDATE_MIN_D and loc["update_min_a"][0] == ev.NODE_UPDATE_MIN_A
    assert loc["motion_noise_xy"][0] == ev.NODE_MOTION_NOISE_XY
    assert loc["motion_noise_yaw"][0] == ev.NODE_MOTION_NOISE_YAW
    assert loc["resample_threshold"][0] == ev.NODE_RESAMPLE_THRESHOLD
    assert loc["transform_tolerance"][0] == ev.NODE_TRANSFORM_TOLERANCE


@pytest.mark.ros
def test_live_replay_matches_offline(bags, model, tmp_path):
    """Play the bag into real mapping + localization nodes over DDS and score dmn_pose live.

    Like with like: same model object, seed, K, motion noise and update thresholds; the node is
    initialized (reinitialize_global_localization) once its map holds all the bag's contexts, as the
    offline run is; the offline replay is restricted to the frames the node processed (it may drop a
    frame if a step outlasts the frame period). Then per-step estimates agree to float noise
    (map embeddings are computed per pair live and in one batch offline): tolerance 0.05 m per step.
    Under CPU load the node often gets a frame before the odometry sent with it; it must wait for
    that odometry (it used to filter with the previous sample held, and drifted up to 0.7 m).
    """
    rclpy = pytest.importorskip("rclpy")
    from rclpy.parameter import Parameter

    from dmn_ros.bags.live import run_live
    from dmn_ros.bags.play import BagPlayer
    from dmn_ros.ros.localization_node import LocalizationNode
    from dmn_ros.ros.mapping_node import MappingNode

    ctx = rclpy.Context()
    rclpy.init(context=ctx, domain_id=int(os.environ["ROS_DOMAIN_ID"]))
    seed = 5
    loc = LocalizationNode(model=model, context=ctx, parameter_overrides=[
        Parameter("random_seed", value=seed), Parameter("max_particles", value=K),
        Parameter("tracking_particles", value=K), Parameter("tf_broadcast", value=False),
        Parameter("publish_particles", value=False),
        # On a loaded machine odometry can trail the frame by seconds: the node waits up to this long for it
        # (the offline replay always has all of it).
        Parameter("transform_tolerance", value=5.0)])
    mapping = MappingNode(model=model, context=ctx)
    ex = _spinning(ctx, loc, mapping)
    opts = EvalOptions(particles=K, seed=seed, progress=False, plots=False)
    holder = {}
    ready = threading.Event()
    t = threading.Thread(target=lambda: holder.update(s=run_live(
        bag=bags["mcap"], opts=opts, out_dir=tmp_path / "live", idle_timeout_s=4.0, duration_s=120.0,
        context=ctx, ready=ready)), daemon=True)
    t.start()
    ready.wait(10)
    player = BagPlayer(bags["mcap"], rate=1.0, init="global", context=ctx, wait_subscribers_s=5.0)
    try:
        player.play()
        t.join(150)
    finally:
        player.close()
        ex.shutdown(timeout_sec=2)
        loc.destroy_node()
        mapping.destroy_node()
        rclpy.try_shutdown(context=ctx)
    live = holder["s"]["bags"][0]
    stamps = live["estimate_stamps"]
    assert len(stamps) >= FRAMES // 2, loc.counters
    # every processed frame's pose reached the scorer: the offline replay steps between exactly the same frames
    assert len(stamps) == loc.counters["processed"], loc.counters
    offline = evaluate_bag(bags["mcap"], EvalOptions(particles=K, seed=seed, progress=False, plots=False,
                                                     only_stamps=tuple(stamps)), model=model)
    assert offline["frames_processed"] == len(stamps)
    diff = np.abs(np.subtract(live["metrics"]["errors_m"], offline["metrics"]["errors_m"]))
    print(f"live: {len(stamps)}/{FRAMES} frames, RMSE {live['metrics']['rmse_m']:.4f} m; offline on the same "
          f"frames {offline['metrics']['rmse_m']:.4f} m; max per-step difference {diff.max():.2e} m")
    np.testing.assert_allclose(live["metrics"]["errors_m"], offline["metrics"]["errors_m"], atol=0.05)
    assert live["metrics"]["rmse_m"] == pytest.approx(offline["metrics"]["rmse_m"], abs=0.05)
    assert (tmp_path / "live" / "estimate.tum").is_file()



@pytest.fixture(scope="module")
def front_bag(tmp_path_factory):
    """A small bag whose camera is on /front/image_raw (a robot's name, not the node default)."""
    from dmn_ros.bags.topics import TopicNames

    p = tmp_path_factory.mktemp("front") / "run"
    record_bag(p, RecordConfig(steps=4, num_contexts=2), topics=TopicNames(camera="/front/image_raw"))
    return p


def test_play_init_on_a_bag_without_the_camera_topic_fails_naming_its_topics(front_bag, capsys):
    """--init used to wait for /camera/image on such a bag and so never initialized, silently."""
    pytest.importorskip("rclpy")
    from dmn_ros.bags.play import main as play_main

    assert play_main([str(front_bag), "--init", "global", "--wait-subscribers", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "needs the camera topic /camera/image" in err and "is not in the bag" in err
    assert "/front/image_raw" in err and "/ground_truth" in err and "--camera-topic" in err
    assert play_main([str(front_bag), "--init", "tracking", "--camera-topic", "/front/image_raw",
                      "--ground-truth-topic", "/mocap/pose", "--wait-subscribers", "0"]) == 2
    assert "needs the ground-truth topic /mocap/pose" in capsys.readouterr().err
    assert play_main([str(front_bag), "--init", "global", "--camera-topic", "/front/image_raw",
                      "--topics", "/odom", "--wait-subscribers", "0"]) == 2
    assert "is left out by --topics" in capsys.readouterr().err


@pytest.mark.ros
def test_play_init_with_camera_topic_option_initializes_the_node(front_bag, model):
    """dmn-bag-play --camera-topic /front/image_raw --init global, into real mapping + localization nodes
    (the localizer's image_topic remapped): the node is initialized before the first frame and filters them."""
    rclpy = pytest.importorskip("rclpy")
    from rclpy.parameter import Parameter

    from dmn_ros.bags.play import main as play_main
    from dmn_ros.ros.localization_node import LocalizationNode
    from dmn_ros.ros.mapping_node import MappingNode

    ctx = rclpy.Context()
    rclpy.init(context=ctx, domain_id=int(os.environ["ROS_DOMAIN_ID"]))
    loc = LocalizationNode(model=model, context=ctx, parameter_overrides=[
        Parameter("image_topic", value="/front/image_raw"), Parameter("max_particles", value=32),
        Parameter("tracking_particles", value=32), Parameter("tf_broadcast", value=False),
        Parameter("publish_particles", value=False), Parameter("update_min_d", value=0.0),
        Parameter("update_min_a", value=0.0), Parameter("transform_tolerance", value=5.0)])
    mapping = MappingNode(model=model, context=ctx)
    ex = _spinning(ctx, loc, mapping)
    try:
        assert play_main([str(front_bag), "--init", "global", "--camera-topic", "/front/image_raw",
                          "--init-timeout", "30", "--wait-subscribers", "10"]) == 0
        deadline = time.monotonic() + 30.0
        while (loc.counters["frames"] < 4 or loc.counters["processed"] == 0) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        ex.shutdown(timeout_sec=2)
        loc.destroy_node()
        mapping.destroy_node()
        rclpy.try_shutdown(context=ctx)
    assert loc.counters["frames"] == 4 and loc.counters["dropped_not_ready"] == 0, loc.counters
    assert loc.counters["processed"] >= 1, loc.counters

# ---- kidnapping (dmn-bag-record --kidnap-at-step) and health metrics (docs/health.md) ----------------------------
KIDNAP_AT = 6


@pytest.fixture(scope="module")
def kidnapped(tmp_path_factory):
    """The mcap fixture's episode, teleported at frame 6 (1-based)."""
    p = tmp_path_factory.mktemp("kidnap") / "kidnapped"
    desc = record_bag(p, RecordConfig(steps=FRAMES, num_contexts=CONTEXTS, odom_noise_xy=0.05, odom_noise_yaw=0.01,
                                      kidnap_at_step=KIDNAP_AT))
    assert desc["kidnap_at_step"] == KIDNAP_AT and desc["kidnap_distance_m"] > 15.0
    return p


def test_kidnapped_bag_truth_jumps_odometry_still_and_stamp_recorded(bags, kidnapped):
    from dmn_ros.bags.record import KIDNAP_AT_STEP_KEY, KIDNAP_STAMP_KEY

    data = load_bag(kidnapped, need_contexts=True)
    plain = load_bag(bags["mcap"], need_contexts=True)
    k = KIDNAP_AT - 1  # 0-based first frame at the new pose
    gt = data.ground_truth.poses
    steps = np.hypot(*np.diff(gt[:, :2], axis=0).T)
    assert steps[k - 1] > 15.0  # the truth jumps between frames 5 and 6...
    assert np.all(np.delete(steps, k - 1) < 2.0)  # ...and drives smoothly (< 1.4 m per frame) elsewhere
    # same world, contexts and drive as the plain bag up to the kidnapping (drawn after the contexts)
    np.testing.assert_allclose(gt[:k], plain.ground_truth.poses[:k], atol=1e-9)
    np.testing.assert_allclose([c[2] for c in data.contexts], [c[2] for c in plain.contexts], atol=1e-9)
    # odometry: no motion from frame 5 to frame 6 (every message in between), motion on every other frame
    o = data.odom
    fs = data.frame_stamps
    between = (o.stamps >= fs[k - 1]) & (o.stamps <= fs[k])
    assert between.sum() == 3  # frame 5, the interpolated one, frame 6
    np.testing.assert_array_equal(o.poses[between], np.repeat(o.poses[between][:1], 3, axis=0))
    at_frames = np.stack([o.poses[np.argmin(np.abs(o.stamps - s))] for s in fs])
    moved = np.hypot(*np.diff(at_frames[:, :2], axis=0).T)
    assert moved[k - 1] == 0.0 and np.all(np.delete(moved, k - 1) > 0.3)
    assert data.custom_data[KIDNAP_AT_STEP_KEY] == str(KIDNAP_AT)
    assert float(data.custom_data[KIDNAP_STAMP_KEY]) == pytest.approx(fs[k], abs=1e-9)
    with pytest.raises(BagError, match=r"kidnap_at_step must be in 2\.\.12"):
        record_bag(kidnapped.parent / "bad", RecordConfig(steps=FRAMES, num_contexts=2, kidnap_at_step=1))


def test_ground_truth_on_kidnapped_bag_recovers_at_once(kidnapped, tmp_path):
    res = evaluate_bag(kidnapped, EvalOptions(estimate_topic="/ground_truth", progress=False), out_dir=tmp_path)
    h = res["metrics"]["health"]
    assert h["kidnap_step"] == KIDNAP_AT and h["kidnap_stamp_s"] == pytest.approx(1002.0 + (KIDNAP_AT - 1) * 0.5)
    assert h["recovered"] is True and h["time_to_recover_steps"] == 0 and h["time_to_recover_s"] == 0.0
    # a scored topic has no filter flags or covariance: documented as None
    assert h["converged_at_step"] is None and h["coverage_95"] is None and h["lost"] is None
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["metrics"]["health"]["time_to_recover_steps"] == 0


def test_health_summary_hand_checked():
    from dmn_ros.bags.evaluate import StepTrace, health_summary
    from dmn_ros.bags.reader import PoseStream

    stamps = 10.0 + 0.5 * np.arange(9)
    gt = PoseStream(stamps.copy(), np.zeros((9, 3)))
    err = np.array([0.0, 0.0, 1.0, 20.0, 20.0, 0.5, 0.0, 0.0, 3.0])
    poses = np.stack([err, np.zeros(9), np.zeros(9)], axis=1)
    tr = StepTrace(covariances=[np.eye(3)] * 9, converged=[False, False] + [True] * 7,
                   lost=[False, False, False, True, True, False, False, False, False],
                   likelihood_ratio=[1.0] * 9, recovery=[""] * 9)
    h = health_summary(stamps, poses, gt, tr, area_size_m=40.0, kidnap_stamp=float(stamps[3]), global_start=True,
                       recover_hold=3)
    assert h["kidnap_step"] == 4 and h["time_to_recover_steps"] == 2 and h["time_to_recover_s"] == 1.0
    assert h["converged_at_step"] == 3 and h["time_to_converge_s"] == 1.0
    # NEES = e² with Σ = I; steps 0, 1 (warm-up) and 3, 4 (kidnapped) left out: [1, .25, 0, 0, 9]
    assert h["coverage_steps"] == 5 and h["coverage_95"] == pytest.approx(0.8)
    assert h["mean_nees"] == pytest.approx((1 + 0.25 + 9) / 5)
    assert h["lost_updates"] == 2 and h["lost_before_kidnap"] == 0
    never = health_summary(stamps, poses, gt, tr, area_size_m=40.0, kidnap_stamp=float(stamps[3]),
                           global_start=False, recover_hold=5)
    assert never["recovered"] is False and never["time_to_recover_steps"] is None
    assert never["converged_at_step"] is None  # tracking: no time to converge
    assert never["coverage_steps"] == 1  # only step 2 before the kidnapping; the rest never recovered


def test_filter_run_health_keys_and_recovery_options(kidnapped, model, tmp_path, capsys):
    rc = eval_main([str(kidnapped), "--model", str(model.path), "-k", str(K), "--seed", "3", "--out",
                    str(tmp_path / "on"), "--no-plots", "--no-progress", "--lost-updates-before-global", "1",
                    "--recovery-alpha-slow", "0.001", "--recovery-alpha-fast", "0.1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "recov" in out and "cov95" in out
    s = json.loads((tmp_path / "on" / "summary.json").read_text())
    assert s["options"]["lost_updates_before_global"] == 1 and s["options"]["recovery_alpha_fast"] == 0.1
    # the summary names the weights; this untrained export records no training data
    assert s["model"] == {"path": str(model.path), "fingerprint": model.info.fingerprint, "training_domain": None}
    h = s["metrics"]["health"]
    n = s["frames_processed"]
    first_after = next(i for i, f in enumerate(s["frame_indices"]) if f >= KIDNAP_AT - 1)
    assert h["kidnap_step"] == first_after + 1
    assert 0.0 <= h["coverage_95"] <= 1.0 and math.isfinite(h["mean_nees"]) and h["mean_nees"] > 0
    assert h["coverage_steps"] > 0
    assert len(h["converged"]) == len(h["lost"]) == len(h["likelihood_ratio"]) == len(h["recovery"]) == n
    assert h["converged_at_step"] is None or 1 <= h["converged_at_step"] <= n
    assert h["time_to_recover_steps"] is None or h["time_to_recover_steps"] >= 0
    assert set(h["recoveries"]) == {"injections", "injected_particles", "global"}
    assert h["lost_updates"] == sum(h["lost"])
    # recovery off (the default) never acts
    off = evaluate_bag(kidnapped, EvalOptions(particles=K, seed=3, progress=False, plots=False), model=model)
    assert off["metrics"]["health"]["recoveries"] == {"injections": 0, "injected_particles": 0, "global": 0}
    assert all(r == "" for r in off["metrics"]["health"]["recovery"])


def test_degenerate_updates_are_skipped_and_counted(bags, model, tmp_path):
    """A model that yields NaN likelihoods (NaN weights; the map was built by the sound one) is refused frame
    by frame, counted as the node counts its step errors, and the replay goes on."""
    import copy

    import torch

    from dmn_ros.bags.evaluate import MapSource
    from dmn_ros.export import LoadedModel
    from dmn_ros.localizer import build_map

    data = load_bag(bags["mcap"], need_contexts=True)
    vm = build_map(model, [c[1] for c in data.contexts], np.stack([c[2] for c in data.contexts]))
    vm.save(tmp_path / "map.dmnmap")
    broken = copy.deepcopy(model.module)
    with torch.no_grad():
        for p in broken.parameters():
            p.fill_(float("nan"))
    res = evaluate_bag(bags["mcap"], EvalOptions(particles=K, progress=False, plots=False, map_source=MapSource.FILE,
                                                 map_file=str(tmp_path / "map.dmnmap")),
                       model=LoadedModel(broken, model.info, model.device, model.path))
    assert res["frames_processed"] == 0 and res["skipped"]["degenerate_update"] > 0


def _with_corrupt_frame(src, dst, frame: int = 0):
    """A copy of the raw-Image bag ``src`` whose ``frame``-th camera message has too few bytes."""
    import dataclasses

    from rosbags.rosbag2 import StoragePlugin, Writer

    from dmn_ros.bags.reader import iter_raw_messages

    ts = typestore()
    msgs, _ = iter_raw_messages(src)
    seen = 0
    with Writer(dst, version=9, storage_plugin=StoragePlugin.MCAP) as w:
        conns = {}
        for m in msgs:
            if m.topic not in conns:
                conns[m.topic] = w.add_connection(m.topic, m.msgtype, typestore=ts)
            data = m.data
            if m.topic == "/camera/image":
                if seen == frame:
                    msg = ts.deserialize_cdr(data, m.msgtype)
                    data = ts.serialize_cdr(dataclasses.replace(msg, data=msg.data[:10]), m.msgtype)
                seen += 1
            w.write(conns[m.topic], m.log_time_ns, data)
    return dst


def test_corrupt_frame_is_neither_context_nor_step(bags, model, tmp_path):
    """--map-source path picks the first frame as a context: a corrupt one is skipped (counted) there as in
    the replay, and the next decodable frame becomes the first context."""
    from dmn_ros.bags.evaluate import MapSource

    bad = _with_corrupt_frame(bags["mcap"], tmp_path / "bad_frame")
    with pytest.raises(Exception, match="bytes"):
        load_bag(bad).image(0)
    opts = EvalOptions(particles=K, progress=False, plots=False, map_source=MapSource.PATH, context_every_m=1.0)
    res = evaluate_bag(bad, opts, model=model)
    assert res["skipped"]["bad_context_image"] == 1 and res["skipped"]["bad_image"] == 1
    assert res["contexts"] > 1 and res["frames_processed"] > 0 and 0 not in res["frame_indices"]


def test_map_and_model_errors_do_not_abort_the_run(bags, model, tmp_path, capsys):
    """A map from other weights fails each bag (recorded, rc 1); an unreadable --model is one line, rc 1."""
    import torch

    from dmn_ros.export import export_model
    from dmn_ros.model import DMN

    torch.manual_seed(1)
    export_model(DMN(), tmp_path / "other.pt", meters_per_unit=20.0)
    other = load_model(tmp_path / "other.pt")
    data = load_bag(bags["mcap"], need_contexts=True)
    from dmn_ros.localizer import build_map

    build_map(other, [c[1] for c in data.contexts], np.stack([c[2] for c in data.contexts])).save(
        tmp_path / "other.dmnmap")
    d = tmp_path / "two"
    d.mkdir()
    _copy(bags["mcap"], d / "a")
    _copy(bags["sqlite3"], d / "b")
    rc = eval_main([str(d), "--model", str(model.path), "--map-source", "file", "--map-file",
                    str(tmp_path / "other.dmnmap"), "-k", str(K), "--out", str(tmp_path / "out"), "--no-progress",
                    "--no-plots"])
    assert rc == 1
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [r["error"] for r in summary["bags"]] == ["FingerprintMismatchError"] * 2
    capsys.readouterr()
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    rc = eval_main([str(d / "a"), "--model", str(tmp_path / "junk.pt"), "--out", str(tmp_path / "o2"),
                    "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("dmn-bag-eval: error: ") and "junk.pt" in err and "Traceback" not in err


def test_outputs_are_replaced_atomically(tmp_path):
    """TUM files and PNG plots go through a unique temp file renamed into place: a user's own
    ``<name>.tmp`` is left alone (a fixed temp name used to be overwritten and renamed away), and a plot
    is a new file, not the old one rewritten in place under a reader."""
    from dmn_ros.bags.plots import plot_error
    from dmn_ros.bags.tum import write_tum

    mine = tmp_path / "estimate.tum.tmp"
    mine.write_text("the user's own file")
    write_tum(tmp_path / "estimate.tum", np.arange(3.0), np.zeros((3, 3)))
    assert mine.read_text() == "the user's own file"
    assert read_tum(tmp_path / "estimate.tum")[0].tolist() == [0.0, 1.0, 2.0]
    png = tmp_path / "error.png"
    plot_error(png, times=np.arange(3.0), errors=np.ones(3), threshold_m=1.0)
    first = png.stat().st_ino
    plot_error(png, times=np.arange(3.0), errors=np.ones(3), threshold_m=0.5)
    assert png.stat().st_ino != first and png.read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["error.png", "estimate.tum", "estimate.tum.tmp"]


def test_cut_zstd_compressed_mcap_recovers_its_complete_chunks(tmp_path, monkeypatch):
    """rosbag2 usually zstd-compresses mcap chunks. A recording cut inside its third chunk gives back the
    messages of the first two (the scan used to import ``zstandard``, which nothing installs, and recovered
    none), and a missing zstd module is reported as such, not as damage."""
    import struct
    import sys

    from rosbags.rosbag2 import CompressionFormat, CompressionMode, StoragePlugin, Writer

    from dmn_ros.bags import reader
    from dmn_ros.bags.reader import iter_raw_messages

    ts, name = typestore(), "sensor_msgs/msg/CompressedImage"
    img, header, stamp = ts.types[name], ts.types["std_msgs/msg/Header"], ts.types["builtin_interfaces/msg/Time"]
    bag = tmp_path / "zstd_cut"
    w = Writer(bag, version=9, storage_plugin=StoragePlugin.MCAP)
    w.set_compression(CompressionMode.STORAGE, CompressionFormat.ZSTD)
    with w:  # rosbags closes a chunk past 1 MiB: chunks of messages 0-2, 3-5, 6-7
        conns = [w.add_connection(t, name, typestore=ts) for t in ("/a", "/b")]
        for i in range(8):
            m = img(header=header(stamp=stamp(sec=100 + i, nanosec=i), frame_id="cam"), format="raw",
                    data=np.full(400_000, i, np.uint8))
            w.write(conns[i % 2], 10**9 * i, ts.serialize_cdr(m, name))
    f = next(bag.glob("*.mcap"))
    data = f.read_bytes()
    pos, chunks = 8, []
    while pos + 9 <= len(data):
        op, length = struct.unpack_from("<BQ", data, pos)
        if op == 0x06:
            chunks.append((pos, length, data[pos + 9 + 32: pos + 9 + 36]))
        pos += 9 + length
    assert len(chunks) == 3 and all(c[2] == b"zstd" for c in chunks)
    f.write_bytes(data[: chunks[2][0] + 9 + chunks[2][1] - 5])  # cut inside the third chunk's data
    msgs, note = iter_raw_messages(bag)
    assert [(m.topic, m.log_time_ns) for m in msgs] == [("/a" if i % 2 == 0 else "/b", 10**9 * i) for i in range(6)]
    stamps = [ts.deserialize_cdr(m.data, m.msgtype).header.stamp for m in msgs]
    assert [(s.sec, s.nanosec) for s in stamps] == [(100 + i, i) for i in range(6)]
    assert "zstd_cut" in note and "after 6 messages" in note and "compressed chunk cut" in note
    # no zstd module at all: a clear note (after the messages before the first compressed chunk), not a crash
    for mod in ("compression.zstd", "backports.zstd", "zstandard"):
        monkeypatch.setitem(sys.modules, mod, None)
        parent = sys.modules.get(mod.rpartition(".")[0])
        if parent is not None:
            monkeypatch.delattr(parent, "zstd", raising=False)
    msgs, note = reader._scan_mcap(f)
    assert msgs == [] and "no zstd module is installed" in note and "after 0 messages" in note
