"""Own robot data: bag/folder → dataset → fine-tune from a shipped-style model → node → dmn-eval, and bad inputs."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dmn_ros.data import DatasetDir, DatasetFormatError, DatasetMeta, EnvViews, sample_episode_from_views
from dmn_ros.data.cli import main as dataset_cli
from dmn_ros.data.from_bag import ConvertOptions, PoseSamples, bag_to_views, planar_from_rotation
from dmn_ros.geometry import compose, wrap_angle, yaw_to_quaternion
from dmn_ros.ros.transforms import interpolate_pose

torch.set_num_threads(1)  # a training run shares this CPU


# ---- helpers -------------------------------------------------------------------------------
def _write_bag(path: Path, *, frames: list[tuple[float, np.ndarray]], poses: list[tuple[float, np.ndarray]],
               pose_topic: str | None = "/gt", sqlite_png_odometry: bool = False) -> Path:
    """A small bag: ``/cam`` frames and (optionally) poses, both by header stamp.

    Default: mcap, raw ``Image``, ``PoseStamped``; ``sqlite_png_odometry``: sqlite3, PNG
    ``CompressedImage`` on ``/cam/compressed``, ``nav_msgs/Odometry``.
    """
    from rosbags.rosbag2 import StoragePlugin, Writer

    from dmn_ros.bags.record import _Msgs, typestore

    ts = typestore()
    m = _Msgs(ts)
    alt = sqlite_png_odometry
    img_t = "sensor_msgs/msg/CompressedImage" if alt else "sensor_msgs/msg/Image"
    pose_t = "nav_msgs/msg/Odometry" if alt else "geometry_msgs/msg/PoseStamped"
    with Writer(path, version=9, storage_plugin=StoragePlugin.SQLITE3 if alt else StoragePlugin.MCAP) as w:
        cam = w.add_connection("/cam/compressed" if alt else "/cam", img_t, typestore=ts)
        gt = w.add_connection(pose_topic, pose_t, typestore=ts) if pose_topic else None
        events = [(s, 0, rgb) for s, rgb in frames] + [(s, 1, p) for s, p in poses]
        for s, kind, x in sorted(events, key=lambda e: (e[0], e[1])):
            if kind == 0:
                msg = m.compressed(x, s, "camera") if alt else m.image(x, s, "camera", "rgb8")
                w.write(cam, round(s * 1e9), ts.serialize_cdr(msg, img_t))
            elif gt is not None:
                msg = m.odometry(x, np.zeros(3), s, 0.0, 0.0) if alt else m.pose_stamped(x, s, "map")
                w.write(gt, round(s * 1e9), ts.serialize_cdr(msg, pose_t))
    return path


def _img(seed: int, h: int = 16, w: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _views(n: int = 6, name: str = "e") -> EnvViews:
    return EnvViews(images=np.zeros((n, 8, 8, 3), np.uint8), poses=np.zeros((n, 3)),
                    stamps=np.arange(n, dtype=np.float64), trajectory_ids=np.zeros(n, np.int32), name=name)


ALL = ConvertOptions(image_size=(16, 16), min_distance_m=0.0, min_angle_deg=0.0)


# ---- end to end ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def recorded_bag(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dmn_ros.bags.record import RecordConfig, record_bag

    path = tmp_path_factory.mktemp("bags") / "run1"
    record_bag(path, RecordConfig(steps=24, num_contexts=0, rate_hz=2.0))  # 11.5 s of driving
    return path


def test_bag_to_finetune_to_node_to_eval(recorded_bag: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    from dmn_ros.evaluation.cli import main as eval_cli
    from dmn_ros.export import export_model, load_model
    from dmn_ros.localizer import Localizer, LocalizerConfig, embed_images
    from dmn_ros.maps import ViewMap
    from dmn_ros.model import DMN
    from dmn_ros.training.config import load_config
    from dmn_ros.training.trainer import train

    data = tmp_path / "own"
    # One bag, three named time ranges → three environments, one per split. meters_per_unit 10 on purpose:
    # fine-tuning must normalize with the init model's 20.
    rc = dataset_cli(["from-bag", str(recorded_bag), "--out", str(data), "--camera-topic", "/camera/image",
                      "--pose-topic", "/ground_truth", "--range", "a=:4", "--range", "b=4:8", "--range", "c=8:",
                      "--split", "b=val", "--split", "c=test", "--min-distance", "0", "--min-angle", "0",
                      "--meters-per-unit", "10"])
    assert rc == 0
    ds = DatasetDir(data)
    assert ds.meta.splits == {"train": ["a"], "val": ["b"], "test": ["c"]}
    assert ds.check() == {"a": 8, "b": 8, "c": 8}
    assert "8 kept in 1 trajectories" in capsys.readouterr().out

    # Episodes from own data: the same sampler, queries are consecutive frames, SPEC odometry convention.
    views = ds.load_env("c")
    ep = sample_episode_from_views(views, np.random.default_rng(0), num_contexts=3, T=5)
    for t in range(1, 5):
        np.testing.assert_allclose(compose(ep.query_poses[t - 1], ep.egomotion_true[t]), ep.query_poses[t],
                                   atol=1e-9)

    torch.manual_seed(0)
    init = tmp_path / "untrained.pt"
    init_info = export_model(DMN(), init, meters_per_unit=20.0)
    out = tmp_path / "run"
    cfg = load_config(None, [f"data={data}", f"out={out}", f"init={init}", "max_steps=2", "batch_size=2",
                             "num_particles=8", "val_every=1000", "val_episodes=2", "checkpoint_minutes=0"])
    with caplog.at_level(logging.WARNING, logger="dmn_ros.training.trainer"):
        exported = train(cfg, progress=False)
    assert "normalizing with the model's" in caplog.text
    tuned = load_model(exported)
    # Same architecture as the init; the file now records the bag's dataset as its training data.
    assert tuned.info.meters_per_unit == 20.0
    assert {k: v for k, v in tuned.info.config.items() if k != "training"} == init_info.config
    assert tuned.info.config["training"]["dataset"] == str(data)
    assert tuned.info.config["training"]["domain"] == ds.meta.domain
    assert tuned.info.fingerprint != init_info.fingerprint  # the steps changed the weights

    # The node's filter runs on it: map from the training environment's views, one step.
    train_views = ds.load_env("a")
    vm = ViewMap.for_model(tuned.info)
    vm.add(embeddings=embed_images(tuned, list(train_views.images)), poses=train_views.poses,
           ids=[f"a/{i}" for i in range(len(train_views.poses))])
    loc = Localizer(tuned, config=LocalizerConfig(max_particles=32, device="cpu"), seed=0)
    loc.set_map(vm)
    loc.init_global()
    est = loc.step(views.images[0])
    assert np.isfinite(est.mean).all() and est.num_particles == 32

    # dmn-eval on the held-back environment, before (init) / after (fine-tuned).
    rc = eval_cli(["--model", str(exported), "--baseline-model", str(init), "--data", str(data),
                   "--out", str(tmp_path / "eval"), "--episodes", "2", "--T", "5", "--nc", "3",
                   "--k-global", "32", "--k-tracking", "16"])
    assert rc == 0
    text = (tmp_path / "eval" / "results.md").read_text()
    assert "| metric | before | after | change |" in text and "tracking RMSE t=5" in text


def test_init_must_match_architecture_and_image_size(tmp_path: Path) -> None:
    from dmn_ros.export import export_model
    from dmn_ros.model import DMN
    from dmn_ros.training.trainer import load_init_model

    path = tmp_path / "m.pt"
    export_model(DMN(), path, meters_per_unit=20.0, area_size_m=40.0, calibration={"covariance_inflation": 2.0})
    model, mpu, area = load_init_model(path, image_size=(32, 32), overrides={})  # calibration is not carried over
    assert (mpu, area) == (20.0, 40.0) and model.config()["image_height"] == 32
    with pytest.raises(ValueError, match="--image-size 32x32"):
        load_init_model(path, image_size=(64, 64), overrides={})
    with pytest.raises(ValueError, match="architecture"):
        load_init_model(path, image_size=(32, 32), overrides={"attention": False})
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="neither an exported model"):
        load_init_model(tmp_path / "junk.pt", image_size=(32, 32), overrides={})


def test_tf_chain_gives_the_odometry_topic_poses(recorded_bag: Path) -> None:
    (tf_views, tf_rep), = bag_to_views(recorded_bag, camera_topic="/camera/image", tf_frames=("odom", "base_link"),
                                       opts=ALL)
    (od_views, _), = bag_to_views(recorded_bag, camera_topic="/camera/image", pose_topic="/odom", opts=ALL)
    assert tf_rep.kept == 24 and tf_rep.unpaired == 0
    np.testing.assert_allclose(tf_views.poses, od_views.poses, atol=1e-9)
    with pytest.raises(Exception, match="no /tf chain from 'map'"):
        bag_to_views(recorded_bag, camera_topic="/camera/image", tf_frames=("map", "base_link"), opts=ALL)


def test_thinning_by_distance_and_angle(recorded_bag: Path) -> None:
    (views, rep), = bag_to_views(recorded_bag, camera_topic="/camera/image", pose_topic="/ground_truth",
                                 opts=ConvertOptions(min_distance_m=2.5, min_angle_deg=60.0))
    assert 1 < rep.kept < 24 and rep.frames == 24
    d = np.hypot(*np.diff(views.poses[:, :2], axis=0).T)
    turn = np.abs(wrap_angle(np.diff(views.poses[:, 2])))
    assert np.all((d >= 2.5 - 1e-9) | (turn >= math.radians(60.0)))


def test_pose_interpolation_takes_yaw_on_the_circle_and_reports_tilt() -> None:
    yaw = np.array([3.0, -3.0])  # 0.28 rad apart across ±π
    s = PoseSamples.build([0.0, 0.1], [[0, 0, 0], [1, 2, 0]], yaw_to_quaternion(yaw))
    xyz, rot, ok = s.at(np.array([0.03, 0.0, 0.2, 0.16, -0.05]), tolerance_s=0.07)
    planar, _ = planar_from_rotation(xyz, rot)
    want = interpolate_pose(0.0, [0, 0, 3.0], 0.1, [1, 2, -3.0], 0.03)  # the nodes' odometry interpolation
    np.testing.assert_allclose(planar[0, :2], want[:2], atol=1e-9)
    assert abs(wrap_angle(planar[0, 2] - want[2])) < 1e-9 and abs(planar[0, 2]) > 3.0  # not through 0
    assert ok.tolist() == [True, True, False, True, True]  # 0.2 s is 0.1 s past the last sample
    # 20° of pitch is reported as tilt, and yaw is still the heading of the body's x axis.
    half = math.radians(20) / 2
    q_pitch = np.array([0.0, math.sin(half), 0.0, math.cos(half)])
    p2 = PoseSamples.build([0.0], [[0, 0, 0]], [q_pitch])
    _, r2, _ = p2.at(np.array([0.0]), 0.01)
    planar2, tilt2 = planar_from_rotation(np.zeros((1, 3)), r2)
    assert abs(tilt2[0] - 20.0) < 1e-6 and abs(planar2[0, 2]) < 1e-9


# ---- folders -------------------------------------------------------------------------------
def _quat_from_matrix(r: np.ndarray) -> np.ndarray:
    """Rotation matrix → (x, y, z, w) (test-local; robust for the rotations used here)."""
    w = math.sqrt(max(0.0, 1 + r[0, 0] + r[1, 1] + r[2, 2])) / 2
    x = math.copysign(math.sqrt(max(0.0, 1 + r[0, 0] - r[1, 1] - r[2, 2])) / 2, r[2, 1] - r[1, 2])
    y = math.copysign(math.sqrt(max(0.0, 1 - r[0, 0] + r[1, 1] - r[2, 2])) / 2, r[0, 2] - r[2, 0])
    z = math.copysign(math.sqrt(max(0.0, 1 - r[0, 0] - r[1, 1] + r[2, 2])) / 2, r[1, 0] - r[0, 1])
    return np.array([x, y, z, w])


def test_tum_rgbd_folder(tmp_path: Path) -> None:
    import cv2

    folder = tmp_path / "rgbd_dataset_freiburg_toy"
    (folder / "rgb").mkdir(parents=True)
    n = 8
    t_img = 1305031102.0 + 0.5 * np.arange(n) + 0.013  # camera stamps between ground-truth samples
    truth = np.c_[np.linspace(0, 7, n), np.linspace(1, -2, n), wrap_angle(np.linspace(2.5, 4.0, n))]
    rgb_lines = ["# color images", "# timestamp filename"]
    for i in range(n):
        name = f"rgb/{t_img[i]:.6f}.png"
        cv2.imwrite(str(folder / name), _img(i, 24, 32)[..., ::-1])
        rgb_lines.append(f"{t_img[i]:.6f} {name}")
    (folder / "rgb.txt").write_text("\n".join(rgb_lines) + "\n")
    # Ground truth at 100 Hz of the *optical* frame (z forward, x right, y down), 1.2 m above the floor.
    optical_to_body = np.array([[0.0, -1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])
    gt_lines = ["# ground truth trajectory", "# timestamp tx ty tz qx qy qz qw"]
    for t in np.arange(t_img[0] - 0.05, t_img[-1] - 0.3, 0.01):  # the last frames have no ground truth
        x = np.interp(t, t_img, truth[:, 0])
        y = np.interp(t, t_img, truth[:, 1])
        yaw = np.interp(t, t_img, np.unwrap(truth[:, 2]))
        rz = np.array([[math.cos(yaw), -math.sin(yaw), 0], [math.sin(yaw), math.cos(yaw), 0], [0, 0, 1]])
        q = _quat_from_matrix(rz @ optical_to_body.T)
        gt_lines.append(f"{t:.4f} {x:.6f} {y:.6f} 1.2 {q[0]:.9f} {q[1]:.9f} {q[2]:.9f} {q[3]:.9f}")
    (folder / "groundtruth.txt").write_text("\n".join(gt_lines) + "\n")

    out = tmp_path / "ds"
    rc = dataset_cli(["from-folder", str(folder), "--out", str(out), "--split", "test", "--min-distance", "0",
                      "--min-angle", "0", "--image-size", "16", "--tolerance", "0.02"])
    assert rc == 0
    ds = DatasetDir(out)
    v = ds.load_env("rgbd_dataset_freiburg_toy")
    assert ds.meta.splits["test"] == ["rgbd_dataset_freiburg_toy"] and v.images.shape[1:] == (16, 16, 3)
    assert len(v.poses) == n - 1  # the last frame is 0.3 s past the ground truth: dropped and counted
    np.testing.assert_allclose(v.poses[:, :2], truth[: n - 1, :2], atol=1e-4)
    np.testing.assert_allclose(wrap_angle(v.poses[:, 2] - truth[: n - 1, 2]), 0.0, atol=1e-4)
    report = (out / "conversion.json").read_text()
    assert '"unpaired": 1' in report and '"tilted": 0' in report


def test_csv_folder_with_image_column_and_stamp_names(tmp_path: Path) -> None:
    import cv2

    a = tmp_path / "hall"
    a.mkdir()
    rows = ["stamp,x,y,yaw,image"]
    for i in range(5):
        cv2.imwrite(str(a / f"f{i}.png"), _img(i))
        rows.append(f"{i * 0.5},{i * 1.0},0.0,{0.1 * i},f{i}.png")
    (a / "poses.csv").write_text("\n".join(rows) + "\n")
    b = tmp_path / "lab"
    b.mkdir()
    for i in range(4):
        cv2.imwrite(str(b / f"{100 + i * 0.5:.3f}.png"), _img(i))
    (b / "log.csv").write_text("stamp,x,y,yaw\n" + "".join(f"{100 + k * 0.1},{k * 0.1},1.0,0.0\n" for k in range(20)))
    out = tmp_path / "ds"
    assert dataset_cli(["from-folder", str(a), str(b), "--out", str(out), "--split", "lab=val", "--min-distance",
                        "0", "--min-angle", "0", "--image-size", "16"]) == 0
    ds = DatasetDir(out)
    assert ds.meta.splits["train"] == ["hall"] and ds.meta.splits["val"] == ["lab"]
    np.testing.assert_allclose(ds.load_env("hall").poses[:, 0], [0, 1, 2, 3, 4])
    np.testing.assert_allclose(ds.load_env("lab").poses[:, 0], [0.0, 0.5, 1.0, 1.5], atol=1e-9)


# ---- bad input -----------------------------------------------------------------------------
def test_bag_without_pose_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bag = _write_bag(tmp_path / "nopose", frames=[(float(i), _img(i)) for i in range(3)], poses=[], pose_topic=None)
    rc = dataset_cli(["from-bag", str(bag), "--out", str(tmp_path / "ds")])
    err = capsys.readouterr().err
    assert rc == 2 and "no pose source" in err and "no pose topic" in err and "no /tf" in err
    rc = dataset_cli(["from-bag", str(bag), "--out", str(tmp_path / "ds"), "--pose-topic", "/amcl_pose"])
    assert rc == 2 and "pose topic /amcl_pose is missing" in capsys.readouterr().err
    assert not (tmp_path / "ds").exists()


def test_frames_without_pose_within_tolerance_are_counted(tmp_path: Path) -> None:
    frames = [(10.0 + 0.5 * i, _img(i)) for i in range(10)]
    poses = [(10.0 + 0.1 * k, np.array([0.1 * k, 0.0, 0.0])) for k in range(24)]  # covers 10.0 .. 12.3 s only
    poses += [(13.5, np.array([5.0, 0.0, 0.0]))]  # one sample exactly at a frame's stamp pairs on its own
    bag = _write_bag(tmp_path / "gappy", frames=frames, poses=poses)
    opts = ConvertOptions(image_size=(16, 16), min_distance_m=0.0, min_angle_deg=0.0, max_gap_s=1.0)
    (views, rep), = bag_to_views(bag, pose_topic="/gt", opts=opts)
    assert rep.frames == 10 and rep.unpaired == 4 and rep.kept == 6  # 12.5, 13.0, 14.0, 14.5 s dropped
    assert "4 without a pose within tolerance (dropped)" in rep.line()
    np.testing.assert_allclose(views.stamps, [10.0, 10.5, 11.0, 11.5, 12.0, 13.5])
    np.testing.assert_allclose(views.poses[:, 0], [0.0, 0.5, 1.0, 1.5, 2.0, 5.0], atol=1e-9)
    assert views.trajectory_ids.tolist() == [0, 0, 0, 0, 0, 1]  # 1.5 s gap > max_gap: a new trajectory


def test_sqlite3_bag_compressed_images_odometry_poses(tmp_path: Path) -> None:
    frames = [(5.0 + 0.2 * i, _img(i)) for i in range(6)]
    poses = [(5.0 + 0.05 * k, np.array([0.05 * k, 0.0, wrap_angle(3.0 + 0.1 * k)])) for k in range(25)]
    bag = _write_bag(tmp_path / "sq", frames=frames, poses=poses, pose_topic="/odom", sqlite_png_odometry=True)
    (views, rep), = bag_to_views(bag, camera_topic="/cam", pose_topic="/odom", opts=ALL)  # finds /cam/compressed
    assert rep.kept == 6 and rep.unpaired == 0
    np.testing.assert_array_equal(views.images[2], frames[2][1])  # PNG is lossless
    np.testing.assert_allclose(views.poses[:, 0], 0.2 * np.arange(6), atol=1e-9)
    np.testing.assert_allclose(wrap_angle(views.poses[:, 2] - (3.0 + 0.4 * np.arange(6))), 0.0, atol=1e-9)


def test_all_frames_unpaired_is_an_empty_environment(tmp_path: Path) -> None:
    bag = _write_bag(tmp_path / "late", frames=[(1.0 + i, _img(i)) for i in range(3)],
                     poses=[(50.0, np.zeros(3)), (51.0, np.zeros(3))])
    with pytest.raises(DatasetFormatError, match=r"empty environment.*none of its 3 frames has a pose within 0\.1 s"):
        bag_to_views(bag, pose_topic="/gt", opts=ALL)
    with pytest.raises(DatasetFormatError, match="empty environment"):
        _views(0).validate()


def test_mixed_image_sizes(tmp_path: Path) -> None:
    frames = [(float(i), _img(i, 16, 16) if i < 3 else _img(i, 24, 32)) for i in range(5)]
    bag = _write_bag(tmp_path / "mixed", frames=frames, poses=[(float(i), np.array([i, 0.0, 0.0])) for i in range(5)])
    with pytest.raises(DatasetFormatError, match=r"mixed image sizes.*16x16 \(3 frames\), 24x32 \(2 frames\)"):
        bag_to_views(bag, pose_topic="/gt", opts=ALL)
    # A shard whose images differ from dataset.yaml's image_size is refused on load.
    ds = DatasetDir.create(tmp_path / "ds", DatasetMeta(image_size=(8, 8)))
    ds.write_env(_views(4, "ok"), split="train")
    np.savez(ds.env_path("ok"), images=np.zeros((4, 16, 16, 3), np.uint8), poses=np.zeros((4, 3)),
             stamps=np.arange(4.0), trajectory_ids=np.zeros(4, np.int32))
    with pytest.raises(DatasetFormatError, match="mixed image sizes"):
        ds.load_env("ok")


def test_nan_poses(tmp_path: Path) -> None:
    v = _views(5)
    v.poses[3, 1] = np.nan
    with pytest.raises(DatasetFormatError, match="1 of 5 poses are NaN or infinite \\(first at row 3\\)"):
        v.validate()
    ds = DatasetDir.create(tmp_path / "ds", DatasetMeta(image_size=(8, 8)))
    with pytest.raises(DatasetFormatError, match="NaN"):
        ds.write_env(v, split="train")


def test_missing_and_corrupt_shards(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ds = DatasetDir.create(tmp_path / "ds", DatasetMeta(image_size=(8, 8)))
    for name in ("a", "b"):
        ds.write_env(_views(4, name), split="train")
    assert ds.check() == {"a": 4, "b": 4}
    data = ds.env_path("b").read_bytes()
    ds.env_path("b").write_bytes(data[: len(data) // 2])  # truncated copy
    with pytest.raises(DatasetFormatError, match=r"b\.npz: corrupt or unreadable shard"):
        ds.check()
    assert dataset_cli(["check", str(tmp_path / "ds")]) == 2
    assert "corrupt or unreadable shard" in capsys.readouterr().err
    ds.env_path("b").unlink()
    with pytest.raises(DatasetFormatError, match="missing shard \\(environment 'b', listed in split 'train'\\)"):
        DatasetDir(tmp_path / "ds").check()
