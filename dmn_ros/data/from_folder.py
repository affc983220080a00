"""``dmn-dataset from-folder``: folders of images with poses → the one dataset format.

Two layouts, each folder one environment:

* **TUM RGB-D** (``rgb.txt`` + ``groundtruth.txt``): ``rgb.txt`` lists ``stamp path``,
  ``groundtruth.txt`` lists ``stamp tx ty tz qx qy qz qw`` at the motion-capture rate.
  Images are associated with the ground truth by stamp (interpolated within the
  tolerance, as for bags). TUM's ground truth is the pose of the camera's *optical*
  frame (z forward, x right, y down); ``optical=True`` (the default) turns it into
  REP-103 body axes (x forward, z up) before the planar projection.
* **Plain folder + CSV** with columns ``stamp,x,y,yaw`` (meters, radians, REP-103): with
  an ``image`` column each row names its image; otherwise image file names are stamps
  (``1305031102.175304.png``) and the CSV is a pose log interpolated at them.

Pairing, thinning and the report are :func:`dmn_ros.data.from_bag.frames_to_views`.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from dmn_ros.data.dataset_format import DatasetFormatError, EnvViews
from dmn_ros.data.from_bag import (
    ConversionReport,
    ConvertOptions,
    PoseSamples,
    frames_to_views,
    planar_from_rotation,
    sanitize_env_name,
)
from dmn_ros.geometry import yaw_to_quaternion
from dmn_ros.images import ImageDecodeError

__all__ = ["OPTICAL_TO_BODY", "csv_is_inside", "detect_layout", "folder_to_views", "read_image", "resolve_csv"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm")

OPTICAL_TO_BODY = np.array([[0.0, -1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])
"""Columns: the body's x (forward), y (left), z (up) axes in optical coordinates (z fwd, x right, y down)."""


def read_image(path: Path) -> np.ndarray:
    """An image file → RGB uint8 ``(H, W, 3)``; :class:`ImageDecodeError` if unreadable."""
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None or img.size == 0:
        raise ImageDecodeError(f"{path}: missing or not a readable image")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _rows(path: Path, ncols: int) -> list[list[str]]:
    """Whitespace-separated rows of a TUM text file, skipping ``#`` comments and blank lines."""
    out = []
    for k, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.replace(",", " ").split()
        if len(parts) < ncols:
            raise DatasetFormatError(f"{path}:{k}: expected {ncols} fields, got {len(parts)}")
        out.append(parts)
    return out


def detect_layout(folder: Path) -> str:
    """``tum`` or ``csv`` from the files present."""
    if (folder / "rgb.txt").is_file() and (folder / "groundtruth.txt").is_file():
        return "tum"
    if list(folder.glob("*.csv")):
        return "csv"
    raise DatasetFormatError(f"{folder}: neither a TUM RGB-D folder (rgb.txt + groundtruth.txt) nor a folder "
                             f"with a poses CSV (stamp,x,y,yaw)")


def _tum(folder: Path, opts: ConvertOptions, optical: bool, name: str) -> tuple[EnvViews, ConversionReport]:
    rgb = _rows(folder / "rgb.txt", 2)
    gt = _rows(folder / "groundtruth.txt", 8)
    try:
        stamps = np.array([float(r[0]) for r in rgb])
        g = np.array([[float(v) for v in r[:8]] for r in gt])
    except ValueError as exc:
        raise DatasetFormatError(f"{folder}: non-numeric stamp or pose ({exc})") from exc
    files = [folder / r[1] for r in rgb]
    samples = PoseSamples.build(g[:, 0], g[:, 1:4], g[:, 4:8])
    xyz, rot, ok = samples.at(stamps, opts.pose_tolerance_s)
    if optical:
        rot = rot @ OPTICAL_TO_BODY  # R_world_body = R_world_optical · R_optical_body
    planar, tilt = planar_from_rotation(xyz, rot)
    planar[~ok] = np.nan
    return frames_to_views(name=name, stamps=stamps, poses=planar, tilt_deg=tilt,
                           load_image=lambda i: read_image(files[i]), opts=opts,
                           source=f"{folder} (TUM RGB-D{', optical frame' if optical else ''})")


def _csv(folder: Path, csv_path: Path | None, opts: ConvertOptions, name: str) -> tuple[EnvViews, ConversionReport]:
    if csv_path is None:
        found = sorted(folder.glob("*.csv"))
        if len(found) != 1:
            raise DatasetFormatError(f"{folder}: {len(found)} CSV files; name the poses file with --csv")
        csv_path = found[0]
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        cols = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in ("stamp", "x", "y", "yaw") if c not in cols]
        if missing:
            raise DatasetFormatError(f"{csv_path}: header {cols} lacks {missing} (need stamp,x,y,yaw[,image])")
        rows = [{k.strip(): (v or "").strip() for k, v in r.items() if k} for r in reader]
    try:
        s = np.array([float(r["stamp"]) for r in rows])
        p = np.array([[float(r["x"]), float(r["y"]), float(r["yaw"])] for r in rows]).reshape(-1, 3)
    except ValueError as exc:
        raise DatasetFormatError(f"{csv_path}: non-numeric value ({exc})") from exc
    if "image" in cols:  # one row per image: the pose is exact
        files = [folder / r["image"] for r in rows]
        stamps, planar = s, p.copy()
    else:  # images named by stamp; the CSV is a pose log
        files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        try:
            stamps = np.array([float(f.stem) for f in files])
        except ValueError as exc:
            raise DatasetFormatError(f"{folder}: without an 'image' column in {csv_path.name}, image names must be "
                                     f"stamps like 1305031102.175304.png ({exc})") from exc
        samples = PoseSamples.build(s, np.c_[p[:, :2], np.zeros(len(p))], yaw_to_quaternion(p[:, 2]))
        xyz, rot, ok = samples.at(stamps, opts.pose_tolerance_s)
        planar, _ = planar_from_rotation(xyz, rot)
        planar[~ok] = np.nan
    return frames_to_views(name=name, stamps=stamps, poses=planar, tilt_deg=np.zeros(len(stamps)),
                           load_image=lambda i: read_image(files[i]), opts=opts, source=f"{folder} ({csv_path.name})")


def resolve_csv(folder: str | Path, csv_path: str | Path) -> Path:
    """Where ``--csv`` points for ``folder``: a relative path is looked up inside the folder first.

    A relative path that is not in the folder but exists from the current directory (``--csv
    hall/poses.csv``) is taken as given; an absolute path too. Raises ``FileNotFoundError``
    naming the folder's path when neither exists.
    """
    folder, given = Path(folder), Path(csv_path)
    if given.is_absolute():
        if not given.is_file():
            raise FileNotFoundError(f"{given}: no such poses CSV (--csv)")
        return given
    inside = folder / given
    if inside.is_file():
        return inside
    if given.is_file():
        return given
    raise FileNotFoundError(f"{inside}: no such poses CSV (a relative --csv names a file inside each folder)")


def csv_is_inside(folder: str | Path, csv_path: Path) -> bool:
    """Whether ``csv_path`` lies inside ``folder`` (symlinks resolved)."""
    return Path(csv_path).resolve().is_relative_to(Path(folder).resolve())


def folder_to_views(
    folder: str | Path,
    *,
    layout: str = "auto",
    csv_path: str | Path | None = None,
    optical: bool = True,
    env_name: str | None = None,
    opts: ConvertOptions | None = None,
) -> tuple[EnvViews, ConversionReport]:
    """One folder → one environment (see the module docstring for the layouts).

    ``csv_path`` names the poses CSV; a relative one is looked up inside ``folder`` (:func:`resolve_csv`).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetFormatError(f"{folder}: not a directory")
    opts = opts or ConvertOptions()
    if layout == "auto":
        tum = (folder / "rgb.txt").is_file() and (folder / "groundtruth.txt").is_file()
        layout = "csv" if csv_path is not None and not tum else detect_layout(folder)
    name = sanitize_env_name(env_name or folder.name)
    if layout == "tum":
        return _tum(folder, opts, optical, name)
    if layout == "csv":
        return _csv(folder, None if csv_path is None else resolve_csv(folder, csv_path), opts, name)
    raise ValueError(f"layout must be auto, tum or csv, got {layout!r}")

