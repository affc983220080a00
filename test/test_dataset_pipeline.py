"""``dmn-dataset`` / ``dmn-eval`` / ``dmn-export`` on your own data: refusals change nothing, split lists are
checked on load, ``--csv`` stays inside each folder, image sizes are checked up front, the camera topic that
was read is recorded, and ``conversion.json`` keeps one entry per environment."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dmn_ros.data import DatasetDir, DatasetFormatError, DatasetMeta, EnvViews
from dmn_ros.data.cli import main as dataset_cli

torch.set_num_threads(1)  # a training run may share this CPU

QUIET = ["--min-distance", "0", "--min-angle", "0", "--image-size", "16"]


def _img(seed: int, size: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _bag(path: Path, *, seed: int = 0, n: int = 5, compressed: bool = False) -> Path:
    """``n`` frames on ``/cam`` (``/cam/compressed`` PNG with ``compressed``) and PoseStamped ``/gt`` at each stamp."""
    from rosbags.rosbag2 import StoragePlugin, Writer

    from dmn_ros.bags.record import _Msgs, typestore

    ts = typestore()
    m = _Msgs(ts)
    img_t = "sensor_msgs/msg/CompressedImage" if compressed else "sensor_msgs/msg/Image"
    pose_t = "geometry_msgs/msg/PoseStamped"
    path.parent.mkdir(parents=True, exist_ok=True)
    with Writer(path, version=9, storage_plugin=StoragePlugin.MCAP) as w:
        cam = w.add_connection("/cam/compressed" if compressed else "/cam", img_t, typestore=ts)
        gt = w.add_connection("/gt", pose_t, typestore=ts)
        for i in range(n):
            s = 1.0 + 0.5 * i
            rgb = _img(100 * seed + i)
            msg = m.compressed(rgb, s, "camera") if compressed else m.image(rgb, s, "camera", "rgb8")
            w.write(cam, round(s * 1e9), ts.serialize_cdr(msg, img_t))
            pose = np.array([seed + 0.5 * i, 0.1 * seed, 0.0])
            w.write(gt, round(s * 1e9) + 1, ts.serialize_cdr(m.pose_stamped(pose, s, "map"), pose_t))
    return path


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _views(name: str, n: int = 6, size: int = 8) -> EnvViews:
    return EnvViews(images=np.zeros((n, size, size, 3), np.uint8), poses=np.c_[np.arange(n), np.zeros((n, 2))],
                    stamps=np.arange(n, dtype=np.float64), trajectory_ids=np.zeros(n, np.int32), name=name)


def _dataset(root: Path, splits: dict[str, list[str]], size: int = 8) -> DatasetDir:
    ds = DatasetDir.create(root, DatasetMeta(image_size=(size, size)))
    for split, names in splits.items():
        for name in names:
            ds.write_env(_views(name, size=size), split=split)
    return ds


# ---- 1. a refused conversion changes nothing -------------------------------------------------------
def test_refused_conversion_leaves_the_dataset_untouched(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ds"
    assert dataset_cli(["from-bag", str(_bag(tmp_path / "a" / "lab", seed=0)), "--out", str(out),
                        "--pose-topic", "/gt", *QUIET]) == 0
    before = _snapshot(out)
    # Another recording of "lab" (other poses and images) for test, plus a new environment: refused as a whole.
    bags = tmp_path / "b"
    _bag(bags / "lab", seed=3)
    _bag(bags / "hall", seed=4)
    capsys.readouterr()
    rc = dataset_cli(["from-bag", str(bags), "--out", str(out), "--pose-topic", "/gt", "--split", "test", *QUIET])
    assert rc == 2
    assert "lab is already in split 'train'; splits must be disjoint" in capsys.readouterr().err
    assert _snapshot(out) == before  # neither lab's shard nor dataset.yaml nor conversion.json changed
    assert not (out / "envs" / "hall.npz").exists()


# ---- 2. --csv names a file inside each folder --------------------------------------------------------
def _csv_folder(root: Path, name: str, x0: float) -> Path:
    import cv2

    d = root / name
    d.mkdir(parents=True)
    rows = ["stamp,x,y,yaw,image"]
    for i in range(4):
        cv2.imwrite(str(d / f"f{i}.png"), _img(i))
        rows.append(f"{i * 0.5},{x0 + i},0.0,0.0,f{i}.png")
    (d / "poses.csv").write_text("\n".join(rows) + "\n")
    (d / "other.csv").write_text("not,the,poses\n")  # two CSVs: --csv must pick
    return d


def test_csv_is_resolved_inside_each_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    a, b = _csv_folder(tmp_path, "hall", 0.0), _csv_folder(tmp_path, "lab", 10.0)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # no poses.csv here
    out = tmp_path / "ds"
    assert dataset_cli(["from-folder", str(a), str(b), "--csv", "poses.csv", "--out", str(out), *QUIET]) == 0
    ds = DatasetDir(out)
    np.testing.assert_allclose(ds.load_env("hall").poses[:, 0], [0, 1, 2, 3])
    np.testing.assert_allclose(ds.load_env("lab").poses[:, 0], [10, 11, 12, 13])
    # One folder's CSV for several folders: refused, nothing converted (lab never gets hall's poses).
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    out2 = tmp_path / "ds2"
    assert dataset_cli(["from-folder", "hall", "lab", "--csv", "hall/poses.csv", "--out", str(out2), *QUIET]) == 2
    assert "is not inside lab" in capsys.readouterr().err
    assert not out2.exists()
    # With one folder, a path from the current directory still works.
    assert dataset_cli(["from-folder", "lab", "--csv", "lab/poses.csv", "--out", str(out2), *QUIET]) == 0


# ---- 3. split leaks and unknown split names are refused on load ---------------------------------------
@pytest.mark.parametrize(("edit", "message"), [
    (lambda s: s["test"].append("a"), r"environment 'a' is in split 'train' and in split 'test'"),
    (lambda s: s.update(valid=s.pop("val")), r"unknown split 'valid'"),
])
def test_split_leaks_and_unknown_split_names_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         edit, message: str) -> None:
    root = tmp_path / "ds"
    _dataset(root, {"train": ["a"], "val": ["b"], "test": ["c"]})
    meta = yaml.safe_load((root / "dataset.yaml").read_text())
    edit(meta["splits"])
    (root / "dataset.yaml").write_text(yaml.safe_dump(meta))
    with pytest.raises(DatasetFormatError, match=message):
        DatasetDir(root)
    assert dataset_cli(["check", str(root)]) == 2
    err = capsys.readouterr().err
    assert "dataset.yaml" in err and ("'a'" in err or "'valid'" in err)


# ---- 4. an unknown --split is a one-line error ---------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Untrained DMNs exported at 32x32 and 16x16, and a 32x32 dmn-train checkpoint."""
    from dmn_ros.export import export_model
    from dmn_ros.model import DMN, model_config
    from dmn_ros.training.trainer import save_checkpoint

    out = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    m32 = DMN()
    export_model(m32, out / "m32.pt", meters_per_unit=20.0)
    export_model(DMN(image_height=16, image_width=16), out / "m16.pt", meters_per_unit=20.0)
    save_checkpoint(out / "checkpoint_best.pt", {"model": m32.state_dict(), "model_config": model_config(m32),
                                                 "step": 0, "meters_per_unit": 20.0, "area_size_m": 40.0})
    return {"m32": out / "m32.pt", "m16": out / "m16.pt", "ckpt": out / "checkpoint_best.pt"}


def test_eval_unknown_split_is_a_user_error(tmp_path: Path, models: dict[str, Path],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from dmn_ros.evaluation.cli import main as eval_cli

    root = tmp_path / "ds"
    _dataset(root, {"train": ["a"], "val": ["b"], "test": ["c"]}, size=32)
    with pytest.raises(DatasetFormatError, match="no split 'foo'"):
        DatasetDir(root).env_names("foo")
    rc = eval_cli(["--model", str(models["m32"]), "--data", str(root), "--split", "foo", "--episodes", "1",
                   "--out", str(tmp_path / "ev")])
    err = capsys.readouterr().err
    assert rc == 2 and "dmn-eval: error:" in err and "no split 'foo' (has ['test', 'train', 'val'])" in err


# ---- 5. a dataset of another image size is refused before any episode is built --------------------------
def test_image_size_mismatch_in_eval_and_export(tmp_path: Path, models: dict[str, Path],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from dmn_ros.evaluation.cli import main as eval_cli
    from dmn_ros.training.export_cli import main as export_cli

    d32, d16 = tmp_path / "d32", tmp_path / "d16"
    _dataset(d32, {"train": ["a"], "val": ["b"], "test": ["c"]}, size=32)
    _dataset(d16, {"train": ["a"], "val": ["b"], "test": ["c"]}, size=16)
    ev = ["--episodes", "1", "--out", str(tmp_path / "ev"), "--belief-pictures", "0", "--no-health"]
    assert eval_cli(["--model", str(models["m32"]), "--data", str(d16), *ev]) == 2
    err = capsys.readouterr().err
    assert f"--model {models['m32']}: model images are 32x32 but the dataset's are 16x16; " \
           "convert with --image-size 32x32" in err
    assert eval_cli(["--model", str(models["m32"]), "--baseline-model", str(models["m16"]), "--data", str(d32),
                     *ev]) == 2
    assert f"--baseline-model {models['m16']}: model images are 16x16" in capsys.readouterr().err
    assert export_cli([str(models["ckpt"]), str(tmp_path / "x.pt"), "--calibrate", str(d16)]) == 2
    err = capsys.readouterr().err
    assert "model images are 32x32 but the dataset's are 16x16; convert with --image-size 32x32" in err
    assert not (tmp_path / "x.pt").exists()


# ---- 6. dataset.yaml records the camera topic that was read ---------------------------------------------
def test_camera_is_the_topic_that_was_read(tmp_path: Path) -> None:
    bag = _bag(tmp_path / "run", compressed=True)
    for extra, out in (([], tmp_path / "auto"), (["--camera-topic", "/cam"], tmp_path / "named")):
        assert dataset_cli(["from-bag", str(bag), "--out", str(out), "--pose-topic", "/gt", *extra, *QUIET]) == 0
        assert DatasetDir(out).meta.camera == "/cam/compressed"
        assert json.loads((out / "conversion.json").read_text())[0]["camera"] == "/cam/compressed"


# ---- 7. conversion.json: one entry per environment -----------------------------------------------------
def test_conversion_report_replaces_a_rewritten_environment(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    lab, hall = _bag(tmp_path / "a" / "lab", seed=0, n=5), _bag(tmp_path / "a" / "hall", seed=1, n=4)
    for bag in (lab, hall):
        assert dataset_cli(["from-bag", str(bag), "--out", str(out), "--pose-topic", "/gt", *QUIET]) == 0
    assert dataset_cli(["from-bag", str(_bag(tmp_path / "b" / "lab", seed=2, n=3)), "--out", str(out),
                        "--pose-topic", "/gt", *QUIET]) == 0  # lab recorded again: replaces its shard and entry
    report = json.loads((out / "conversion.json").read_text())
    assert sorted((r["env"], r["kept"]) for r in report) == [("hall", 4), ("lab", 3)]
    assert len(DatasetDir(out).load_env("lab").poses) == 3
