"""The one on-disk dataset format, shared by synthetic worlds and users' own robot logs.

Layout (no pickle anywhere, so a dataset from an untrusted source cannot run code)::

    DIR/dataset.yaml          metadata + split lists (see DatasetMeta)
    DIR/envs/<env_name>.npz   one environment: images (N,H,W,3) uint8, poses (N,3) float64 metric,
                              stamps (N,) float64 seconds, trajectory_ids (N,) int32

Views of one environment are stored as several smooth trajectories (consecutive rows
with the same trajectory id, in time order), so that both smooth query segments and
the paper's random-order queries can be drawn from the same cache. Every file is
written to a temporary name in the same directory and then ``os.replace``-d, so an
interrupted writer never leaves a half-written file under the final name.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from dmn_ros.files import atomic_open
from dmn_ros.geometry import MetricScale

__all__ = [
    "FORMAT_VERSION",
    "SPLITS",
    "SPLIT_SEED_OFFSETS",
    "DatasetDir",
    "DatasetFormatError",
    "DatasetMeta",
    "EnvViews",
    "check_disjoint",
    "check_image_size",
    "env_name",
    "env_seed",
]

FORMAT_VERSION = 1
"""Bumped on any incompatible change to the layout below."""

SPLITS = ("train", "val", "test")

SPLIT_SEED_OFFSETS = {"train": 0, "val": 10_000_000, "test": 20_000_000}
"""Environment seeds of split s are ``SPLIT_SEED_OFFSETS[s] + index``: disjoint by construction."""

_SPLIT_SPAN = 10_000_000


class DatasetFormatError(ValueError):
    """A dataset directory or file does not follow the format; the message names the file."""


def env_seed(split: str, index: int) -> int:
    """Seed of the ``index``-th environment of ``split``; ranges of different splits never overlap."""
    if split not in SPLIT_SEED_OFFSETS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    if not 0 <= index < _SPLIT_SPAN:
        raise ValueError(f"environment index {index} outside [0, {_SPLIT_SPAN})")
    return SPLIT_SEED_OFFSETS[split] + int(index)


def env_name(domain: str, seed: int) -> str:
    """File stem for an environment, e.g. ``maze_00000012``; the seed is recoverable from it."""
    return f"{domain}_{int(seed):08d}"


def check_disjoint(splits: dict[str, list[str]], *, where: str = "dataset.yaml") -> None:
    """Raise :class:`DatasetFormatError` naming an environment listed in two splits (a train/test leak)."""
    seen: dict[str, str] = {}
    for split in SPLITS:
        for name in splits.get(split, []):
            if name in seen and seen[name] != split:
                raise DatasetFormatError(f"{where}: environment {name!r} is in split {seen[name]!r} and in split "
                                         f"{split!r}; splits must be disjoint")
            seen[name] = split


def check_image_size(model_size: tuple[int, int], data_size: tuple[int, int], source: str) -> None:
    """Raise ``ValueError`` when a model's input size differs from a dataset's (the trainer's message)."""
    m, d = (int(model_size[0]), int(model_size[1])), (int(data_size[0]), int(data_size[1]))
    if m != d:
        raise ValueError(f"{source}: model images are {m[0]}x{m[1]} but the dataset's are {d[0]}x{d[1]}; "
                         f"convert with --image-size {m[0]}x{m[1]}")


@dataclass
class DatasetMeta:
    """Contents of ``dataset.yaml``."""

    image_size: tuple[int, int]
    """(H, W) of every stored image."""
    meters_per_unit: float = 20.0
    """Metric scale of the model's normalized coordinates (20 m for the 40 m worlds: [-1, 1])."""
    bounds: tuple[float, float, float, float] = (-20.0, 20.0, -20.0, 20.0)
    """(xmin, xmax, ymin, ymax) of the area in meters; the normalization origin is its center."""
    camera: str = "eye"
    """Name of the camera (a sim camera, or the robot's image topic/frame for real data)."""
    source: str = "dmn_ros.worlds"
    """What produced the data (generator, or robot/bag name)."""
    domain: str = "maze"
    """Environment family, e.g. maze, rooms, or a user label."""
    fov_deg: float | None = 90.0
    """Horizontal field of view if known."""
    splits: dict[str, list[str]] = field(default_factory=lambda: {s: [] for s in SPLITS})
    """Split name -> environment names (files ``envs/<name>.npz``)."""
    format_version: int = FORMAT_VERSION
    """Layout version; readers refuse newer versions."""

    def metric_scale(self) -> MetricScale:
        """The normalization shared with the model: origin at the bounds' center."""
        xmin, xmax, ymin, ymax = self.bounds
        return MetricScale(self.meters_per_unit, (xmin + xmax) / 2.0, (ymin + ymax) / 2.0)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["image_size"] = [int(v) for v in self.image_size]
        d["bounds"] = [float(v) for v in self.bounds]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, where: str = "dataset.yaml") -> DatasetMeta:
        try:
            version = int(d.get("format_version", -1))
            if version != FORMAT_VERSION:
                raise DatasetFormatError(
                    f"{where}: format_version {version}, this code reads {FORMAT_VERSION}"
                )
            splits = {str(k): [str(n) for n in (v or [])] for k, v in (d.get("splits") or {}).items()}
            unknown = sorted(set(splits) - set(SPLITS))
            if unknown:
                raise DatasetFormatError(f"{where}: unknown split {unknown[0]!r} under 'splits' (the splits are "
                                         f"{', '.join(SPLITS)})")
            for s in SPLITS:
                splits.setdefault(s, [])
            check_disjoint(splits, where=where)
            fov = d.get("fov_deg")
            return cls(
                image_size=(int(d["image_size"][0]), int(d["image_size"][1])),
                meters_per_unit=float(d["meters_per_unit"]),
                bounds=tuple(float(v) for v in d["bounds"]),  # type: ignore[arg-type]
                camera=str(d.get("camera", "")),
                source=str(d.get("source", "")),
                domain=str(d.get("domain", "")),
                fov_deg=None if fov is None else float(fov),
                splits=splits,
                format_version=version,
            )
        except DatasetFormatError:
            raise
        except (KeyError, TypeError, IndexError, ValueError, AttributeError) as e:
            raise DatasetFormatError(f"{where}: missing or malformed field ({e!r})") from e


@dataclass
class EnvViews:
    """All stored views of one environment."""

    images: np.ndarray
    """(N, H, W, 3) uint8 RGB."""
    poses: np.ndarray
    """(N, 3) float64 metric (x, y, yaw)."""
    stamps: np.ndarray
    """(N,) float64 seconds; increasing within a trajectory."""
    trajectory_ids: np.ndarray
    """(N,) int32; rows of one trajectory are contiguous and in time order."""
    name: str = ""
    """Environment name (file stem)."""

    def validate(self) -> None:
        """Raise DatasetFormatError if shapes or dtypes are off."""
        n = len(self.images)
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise DatasetFormatError(f"{self.name}: images must be (N,H,W,3) uint8, got "
                                     f"{self.images.shape} {self.images.dtype}")
        if self.poses.shape != (n, 3) or self.stamps.shape != (n,) or self.trajectory_ids.shape != (n,):
            raise DatasetFormatError(f"{self.name}: poses/stamps/trajectory_ids do not match {n} images")
        if n == 0:
            raise DatasetFormatError(f"{self.name}: empty environment (no views)")
        bad = np.flatnonzero(~np.isfinite(self.poses).all(axis=1))
        if len(bad):
            raise DatasetFormatError(f"{self.name}: {len(bad)} of {n} poses are NaN or infinite "
                                     f"(first at row {int(bad[0])})")
        if not np.isfinite(self.stamps).all():
            raise DatasetFormatError(f"{self.name}: non-finite stamps")
        same = self.trajectory_ids[1:] == self.trajectory_ids[:-1]
        back = np.flatnonzero(same & (np.diff(self.stamps) < 0))
        if len(back):
            raise DatasetFormatError(f"{self.name}: stamps go backwards within a trajectory at row {int(back[0]) + 1}")

    def trajectories(self) -> list[np.ndarray]:
        """Row indices of each trajectory, in time order."""
        ids = self.trajectory_ids
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
        ends = np.r_[starts[1:], len(ids)]
        return [np.arange(s, e) for s, e in zip(starts, ends, strict=True)]


class DatasetDir:
    """Reader/writer for one dataset directory."""

    META = "dataset.yaml"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        """Dataset root."""
        meta_path = self.path / self.META
        if not meta_path.is_file():
            raise DatasetFormatError(f"{meta_path}: not found (not a dataset directory)")
        try:
            with open(meta_path) as f:
                raw = yaml.safe_load(f) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise DatasetFormatError(f"{meta_path}: not valid YAML ({exc})") from exc
        if not isinstance(raw, dict):
            raise DatasetFormatError(f"{meta_path}: expected a mapping of fields, got a {type(raw).__name__}")
        self.meta = DatasetMeta.from_dict(raw, where=str(meta_path))
        """Parsed dataset.yaml."""

    @classmethod
    def create(cls, path: str | os.PathLike[str], meta: DatasetMeta) -> DatasetDir:
        """Open ``path``, creating it with ``meta`` if new; an existing one must agree on format fields."""
        root = Path(path)
        if (root / cls.META).is_file():
            ds = cls(root)
            old, new = ds.meta, meta
            for key in ("image_size", "meters_per_unit", "bounds", "domain"):
                if tuple(np.atleast_1d(getattr(old, key))) != tuple(np.atleast_1d(getattr(new, key))):
                    raise DatasetFormatError(f"{root / cls.META}: existing {key}={getattr(old, key)!r} "
                                             f"differs from requested {getattr(new, key)!r}")
            return ds
        (root / "envs").mkdir(parents=True, exist_ok=True)
        cls._write_meta(root, meta)
        return cls(root)

    @classmethod
    def _write_meta(cls, root: Path, meta: DatasetMeta) -> None:
        with atomic_open(root / cls.META, "w") as f:
            yaml.safe_dump(meta.to_dict(), f, sort_keys=False)

    def env_path(self, name: str) -> Path:
        return self.path / "envs" / f"{name}.npz"

    def env_names(self, split: str) -> list[str]:
        """Environment names listed for ``split`` in dataset.yaml."""
        if split not in self.meta.splits:
            raise DatasetFormatError(f"{self.path / self.META}: no split {split!r} (has {sorted(self.meta.splits)})")
        return list(self.meta.splits[split])

    def has_env(self, name: str) -> bool:
        return self.env_path(name).is_file()

    def load_env(self, name: str) -> EnvViews:
        """Read one environment's views (never unpickles)."""
        p = self.env_path(name)
        if not p.is_file():
            listed = [s for s, names in self.meta.splits.items() if name in names]
            raise DatasetFormatError(f"{p}: missing shard (environment {name!r}"
                                     + (f", listed in split {listed[0]!r})" if listed else ")"))
        try:
            with np.load(p, allow_pickle=False) as z:
                views = EnvViews(
                    images=np.asarray(z["images"]),
                    poses=np.asarray(z["poses"], dtype=np.float64),
                    stamps=np.asarray(z["stamps"], dtype=np.float64),
                    trajectory_ids=np.asarray(z["trajectory_ids"], dtype=np.int32),
                    name=name,
                )
        except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise DatasetFormatError(f"{p}: corrupt or unreadable shard ({type(e).__name__}: {e})") from e
        views.validate()
        if tuple(views.images.shape[1:3]) != tuple(self.meta.image_size):
            raise DatasetFormatError(f"{p}: image size {tuple(views.images.shape[1:3])} != dataset "
                                     f"image_size {tuple(self.meta.image_size)} (mixed image sizes)")
        return views

    def check(self) -> dict[str, int]:
        """Load and validate every environment listed in any split; returns views per environment.

        Raises :class:`DatasetFormatError` at the first missing, corrupt, empty, NaN or
        wrongly sized shard, so a bad dataset fails before training starts, not hours in.
        """
        counts: dict[str, int] = {}
        for split in SPLITS:
            for name in self.meta.splits.get(split, []):
                counts[name] = len(self.load_env(name).poses)
        return counts

    def write_env_file(self, views: EnvViews) -> Path:
        """Atomically write ``envs/<name>.npz`` without touching dataset.yaml (safe from worker processes)."""
        views.validate()
        if tuple(views.images.shape[1:3]) != tuple(self.meta.image_size):
            raise DatasetFormatError(f"{views.name}: image size {views.images.shape[1:3]} != dataset "
                                     f"{self.meta.image_size}")
        p = self.env_path(views.name)
        with atomic_open(p) as f:
            np.savez(
                f,
                images=views.images,  # (N, H, W, 3) uint8
                poses=views.poses.astype(np.float64),  # (N, 3) metric
                stamps=views.stamps.astype(np.float64),  # (N,)
                trajectory_ids=views.trajectory_ids.astype(np.int32),  # (N,)
            )
        return p

    def check_assignment(self, assignment: dict[str, str]) -> None:
        """Raise :class:`DatasetFormatError` if listing environments (name -> split) would break the splits.

        Call it before writing any shard, so a refused conversion changes nothing: an unknown
        split, or an environment already listed under another split.
        """
        for n, split in assignment.items():
            if split not in SPLITS:
                raise DatasetFormatError(f"split {split!r} for {n}: choose one of {', '.join(SPLITS)}")
            for other, listed in self.meta.splits.items():
                if other != split and n in listed:
                    raise DatasetFormatError(f"{n} is already in split {other!r}; splits must be disjoint")

    def add_to_split(self, split: str, names: list[str]) -> None:
        """List already-written environments under ``split`` in dataset.yaml (idempotent, atomic)."""
        self.check_assignment({n: split for n in names})
        for n in names:
            if not self.has_env(n):
                raise DatasetFormatError(f"{self.env_path(n)}: cannot list an environment not yet written")
        listed = self.meta.splits.setdefault(split, [])
        listed.extend(n for n in names if n not in listed)
        listed.sort()
        self._write_meta(self.path, self.meta)

    def write_env(self, views: EnvViews, *, split: str) -> Path:
        """Write one environment and list it under ``split``; a refused split writes nothing."""
        self.check_assignment({views.name: split})
        p = self.write_env_file(views)
        self.add_to_split(split, [views.name])
        return p
