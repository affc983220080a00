"""``dmn-dataset``: turn your own robot's recordings into the dataset format (``docs/own_data.md``).

    dmn-dataset from-bag BAG [BAG ...] --out DIR --camera-topic T (--pose-topic T | --tf-frames PARENT CHILD)
    dmn-dataset from-folder DIR [DIR ...] --out DIR [--layout auto|tum|csv]
    dmn-dataset check DIR

Each bag, time range or folder becomes one environment; ``--split`` puts environments in
train / val / test (``--split val`` for all, ``--split NAME=test`` for one). Also
``python -m dmn_ros.data.cli``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dmn_ros.data.dataset_format import SPLITS, DatasetDir, EnvViews
from dmn_ros.data.from_bag import (
    ConversionReport,
    ConvertOptions,
    TimeRange,
    bag_to_views,
    check_bag_path,
    write_dataset,
)
from dmn_ros.errors import console_main
from dmn_ros.files import atomic_open


def _size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) == 1:
        return int(parts[0]), int(parts[0])
    if len(parts) == 2:
        return int(parts[0]), int(parts[1])
    raise argparse.ArgumentTypeError(f"image size {text!r} is not N or HxW")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="dataset directory (created, or appended to)")
    p.add_argument("--split", action="append", default=[],
                   help="split for every environment (train|val|test), or NAME=SPLIT for one; repeatable")
    p.add_argument("--env", help="environment name (one source only; default: the bag's or folder's name)")
    p.add_argument("--image-size", type=_size, default=(32, 32), help="stored image size, N or HxW (default 32)")
    p.add_argument("--tolerance", type=float, default=0.1, help="max seconds between a frame and its pose samples")
    p.add_argument("--min-distance", type=float, default=0.5, help="keep a frame after moving this far (m)")
    p.add_argument("--min-angle", type=float, default=15.0, help="... or turning this much (deg); 0 0 keeps all")
    p.add_argument("--max-gap", type=float, default=2.0, help="a longer gap (s) starts a new trajectory")
    p.add_argument("--max-tilt", type=float, default=10.0, help="report frames tilted more than this (deg)")
    p.add_argument("--meters-per-unit", type=float, default=20.0,
                   help="normalization scale of a new dataset (20 = the shipped models'; fine-tuning uses the model's)")
    p.add_argument("--margin", type=float, default=2.0, help="bounds margin around the poses of a new dataset (m)")
    p.add_argument("--domain", default="own", help="environment family label")
    p.add_argument("--source", default="own_robot", help="robot / recording label")
    p.add_argument("--fov-deg", type=float, default=None, help="camera horizontal field of view, if known")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dmn-dataset", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("from-bag", help="rosbag2 (mcap or sqlite3) recordings")
    b.add_argument("bags", nargs="+", help="bag directories or files, or directories of bags")
    b.add_argument("--camera-topic", help="Image or CompressedImage topic (default: the bag's only image topic)")
    b.add_argument("--pose-topic", help="PoseStamped, PoseWithCovarianceStamped or Odometry in the map frame")
    b.add_argument("--tf-frames", nargs=2, metavar=("PARENT", "CHILD"), help="pose from /tf, e.g. map base_link")
    b.add_argument("--range", action="append", default=[], dest="ranges",
                   help="NAME=START:END seconds from the first frame: that stretch becomes environment NAME")
    _common(b)
    f = sub.add_parser("from-folder", help="TUM RGB-D folders, or images + a stamp,x,y,yaw CSV")
    f.add_argument("folders", nargs="+")
    f.add_argument("--layout", choices=["auto", "tum", "csv"], default="auto")
    f.add_argument("--csv", help="poses CSV: a name inside each folder, e.g. poses.csv (default: the folder's only "
                                 "*.csv); a path outside the folder only with one folder")
    f.add_argument("--no-optical", action="store_true",
                   help="TUM poses are already body poses (x forward, z up), not the camera's optical frame")
    _common(f)
    c = sub.add_parser("check", help="load and validate every environment of a dataset")
    c.add_argument("dir")
    return ap


def _splits(items: list[str]) -> tuple[str, dict[str, str]]:
    default, per_env = "train", {}
    for it in items:
        name, _, split = it.rpartition("=")
        if split not in SPLITS:
            raise ValueError(f"--split {it!r}: split must be one of {SPLITS}")
        if name:
            per_env[name] = split
        else:
            default = split
    return default, per_env


def _write(args: argparse.Namespace, envs: list[tuple[EnvViews, ConversionReport]], camera: str) -> int:
    default, per_env = _splits(args.split)
    unknown = sorted(set(per_env) - {v.name for v, _ in envs})
    if unknown:
        raise ValueError(f"--split names unknown environments {unknown} (have {[v.name for v, _ in envs]})")
    ds, warnings = write_dataset(args.out, envs, splits=per_env, default_split=default,
                                 meters_per_unit=args.meters_per_unit, margin_m=args.margin, camera=camera,
                                 source=args.source, domain=args.domain, fov_deg=args.fov_deg,
                                 image_size=args.image_size)
    for _, rep in envs:
        print(rep.line())
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    report_path = Path(args.out) / "conversion.json"
    new = [r.to_dict() for _, r in envs]
    written = {r["env"] for r in new}
    old = json.loads(report_path.read_text()) if report_path.is_file() else []
    # An environment written again replaces its entry, as it replaced its shard.
    kept = [r for r in old if not (isinstance(r, dict) and r.get("env") in written)]
    with atomic_open(report_path, "w") as f:  # same temp-file-then-rename rule as every dataset file
        json.dump(kept + new, f, indent=2)
    m = ds.meta
    side = m.bounds[1] - m.bounds[0]
    print(f"wrote {len(envs)} environment(s) to {ds.path}: splits "
          + ", ".join(f"{s} {len(m.splits.get(s, []))}" for s in SPLITS)
          + f"; area {side:.1f} m, meters_per_unit {m.meters_per_unit}")
    if not m.splits.get("val"):
        print("note: dmn-train needs a 'val' environment too (--split NAME=val)", file=sys.stderr)
    return 0


@console_main("dmn-dataset")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "check":
        ds = DatasetDir(args.dir)
        counts = ds.check()
        for s in SPLITS:
            for n in ds.meta.splits.get(s, []):
                print(f"{s:5s} {n}: {counts[n]} views")
        print(f"{args.dir}: OK ({len(counts)} environments, image size {tuple(ds.meta.image_size)})")
        return 0
    opts = ConvertOptions(image_size=args.image_size, pose_tolerance_s=args.tolerance,
                          min_distance_m=args.min_distance, min_angle_deg=args.min_angle,
                          max_gap_s=args.max_gap, max_tilt_deg=args.max_tilt)
    envs: list[tuple[EnvViews, ConversionReport]] = []
    if args.cmd == "from-bag":
        ranges = [TimeRange.parse(r) for r in args.ranges]
        bags = [b for path in args.bags for b in check_bag_path(path)]
        if args.env and len(bags) > 1:
            raise ValueError("--env names one environment; it needs exactly one bag")
        for bag in bags:
            envs += bag_to_views(bag, camera_topic=args.camera_topic, pose_topic=args.pose_topic,
                                 tf_frames=tuple(args.tf_frames) if args.tf_frames else None, ranges=ranges,
                                 env_name=args.env, prefix_ranges=len(bags) > 1, opts=opts)
        # The topic each bag was read from (e.g. /camera/image/compressed for --camera-topic /camera/image).
        return _write(args, envs, camera=",".join(dict.fromkeys(rep.camera for _, rep in envs)))
    from dmn_ros.data.from_folder import csv_is_inside, folder_to_views, resolve_csv

    if args.env and len(args.folders) > 1:
        raise ValueError("--env names one environment; it needs exactly one folder")
    if args.csv and len(args.folders) > 1:  # one --csv for several folders: each folder's own file, never another's
        for folder in args.folders:
            tum = (Path(folder) / "rgb.txt").is_file() and (Path(folder) / "groundtruth.txt").is_file()
            if args.layout == "tum" or (args.layout == "auto" and tum):
                continue  # --csv does not apply to a TUM folder
            found = resolve_csv(folder, args.csv)
            if not csv_is_inside(folder, found):
                raise ValueError(f"--csv {args.csv}: {found} is not inside {folder}; with several folders --csv names "
                                 f"a file inside each folder (e.g. --csv {Path(args.csv).name})")
    for folder in args.folders:
        envs.append(folder_to_views(folder, layout=args.layout, csv_path=args.csv, optical=not args.no_optical,
                                    env_name=args.env, opts=opts))
    return _write(args, envs, camera="camera")


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
