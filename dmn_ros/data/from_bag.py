"""``dmn-dataset from-bag``: a robot's rosbag2 recordings → the one dataset format (``docs/own_data.md``).

A camera topic (``Image`` or ``CompressedImage``) is paired by header stamp with a pose
source: a ``PoseStamped``, ``PoseWithCovarianceStamped`` or ``Odometry`` topic, or the
``/tf`` (+ ``/tf_static``) chain between two named frames. The pose is interpolated at
the frame's stamp (position linearly, rotation by slerp, so yaw takes the shorter arc)
when pose samples lie on both sides within the tolerance; other frames are dropped and
counted. 3D poses are projected to the plane ``(x, y, yaw)``, with the yaw of the body x
axis; frames whose z axis tilts more than ``max_tilt_deg`` are reported. Frames are then
thinned by travelled distance and turned angle, and each bag (or named time range of
it) becomes one environment whose contiguous stretches are trajectories.

The pairing and thinning (:func:`frames_to_views`) are shared with ``from_folder``.
Images are decoded only for the frames that are kept.
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dmn_ros.bags.errors import BagError, BagReadError, MissingTopicError, UnknownMessageTypeError
from dmn_ros.bags.reader import _decode_image, find_bags, iter_raw_messages
from dmn_ros.bags.record import typestore
from dmn_ros.bags.topics import IMAGE_TYPES, POSE_TYPES, absolute
from dmn_ros.data.dataset_format import SPLITS, DatasetDir, DatasetFormatError, DatasetMeta, EnvViews
from dmn_ros.geometry import wrap_angle
from dmn_ros.images import ImageDecodeError, resize_rgb

__all__ = [
    "ConversionReport",
    "ConvertOptions",
    "PoseSamples",
    "TimeRange",
    "bag_to_views",
    "frames_to_views",
    "planar_from_rotation",
    "sanitize_env_name",
    "write_dataset",
]

TF_TYPE = "tf2_msgs/msg/TFMessage"


@dataclass(frozen=True)
class ConvertOptions:
    """How frames become views; every converter (bag, TUM folder, CSV folder) uses these."""

    image_size: tuple[int, int] = (32, 32)
    """(H, W) stored; frames are resized with area averaging, as the nodes resize them."""
    pose_tolerance_s: float = 0.1
    """A frame needs pose samples within this many seconds on both sides of its stamp (or one exact)."""
    min_distance_m: float = 0.5
    """Keep a frame once the robot moved this far from the last kept frame ..."""
    min_angle_deg: float = 15.0
    """... or turned this much (0 and 0 keep every paired frame)."""
    max_gap_s: float = 2.0
    """A longer gap between paired frames starts a new trajectory (queries never span it)."""
    max_tilt_deg: float = 10.0
    """Frames tilted more than this (roll/pitch) are kept but reported."""


@dataclass(frozen=True)
class TimeRange:
    """A named stretch of a recording, in seconds from its first camera frame; None = open end."""

    name: str
    start: float | None = None
    end: float | None = None

    @classmethod
    def parse(cls, text: str) -> TimeRange:
        """``NAME=START:END`` (either bound may be empty)."""
        m = re.fullmatch(r"([^=]+)=([^:]*):([^:]*)", text.strip())
        if not m:
            raise ValueError(f"time range {text!r} is not NAME=START:END (seconds from the first frame)")
        lo, hi = (float(v) if v.strip() else None for v in m.group(2, 3))
        if lo is not None and hi is not None and hi <= lo:
            raise ValueError(f"time range {text!r} ends before it starts")
        return cls(sanitize_env_name(m.group(1)), lo, hi)


@dataclass
class ConversionReport:
    """What happened to one environment's frames; printed by the CLI and saved in ``conversion.json``."""

    env: str
    source: str
    frames: int = 0
    """Camera frames in the source (or range)."""
    unpaired: int = 0
    """Frames without a pose within the tolerance: dropped."""
    undecodable: int = 0
    """Kept frames whose image could not be decoded: dropped."""
    kept: int = 0
    """Views written after thinning."""
    trajectories: int = 0
    tilted: int = 0
    """Paired frames tilted more than ``max_tilt_deg``."""
    max_tilt_deg: float = 0.0
    split: str = ""
    camera: str = ""
    """The camera topic that was read (e.g. ``/front/image_raw/compressed``); empty for folders."""
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        s = (f"{self.env} [{self.split or '-'}]: {self.frames} frames, {self.unpaired} without a pose within "
             f"tolerance (dropped), {self.kept} kept in {self.trajectories} trajectories")
        if self.undecodable:
            s += f", {self.undecodable} undecodable (dropped)"
        if self.tilted:
            s += f"; WARNING {self.tilted} frames tilted > threshold (max {self.max_tilt_deg:.1f} deg)"
        return s + "".join(f"; {n}" for n in self.notes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sanitize_env_name(name: str) -> str:
    """A safe file stem: letters, digits, ``_ . -``."""
    out = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("._")
    if not out:
        raise ValueError(f"{name!r} gives an empty environment name")
    return out


# ---- rotations (numpy, x y z w like geometry_msgs) -------------------------------------------
def _quat_to_matrix(q: np.ndarray) -> np.ndarray:
    """``(N, 4)`` → ``(N, 3, 3)``; quaternions are normalized first."""
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    x, y, z, w = q[:, 0], q[:, 1], q[:, 2], q[:, 3]
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
    ], axis=1)


def _slerp(q0: np.ndarray, q1: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Shorter-arc spherical interpolation of ``(N, 4)`` unit quaternions at fractions ``a`` ``(N,)``."""
    q0 = q0 / np.linalg.norm(q0, axis=-1, keepdims=True)
    q1 = q1 / np.linalg.norm(q1, axis=-1, keepdims=True)
    d = np.sum(q0 * q1, axis=-1)
    q1 = np.where(d[:, None] < 0, -q1, q1)
    d = np.clip(np.abs(d), 0.0, 1.0)
    theta = np.arccos(d)
    s = np.sin(theta)
    small = s < 1e-6
    w0 = np.where(small, 1.0 - a, np.sin((1.0 - a) * theta) / np.where(small, 1.0, s))
    w1 = np.where(small, a, np.sin(a * theta) / np.where(small, 1.0, s))
    q = w0[:, None] * q0 + w1[:, None] * q1
    return q / np.linalg.norm(q, axis=-1, keepdims=True)


def planar_from_rotation(xyz: np.ndarray, rot: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """3D poses → planar ``(N, 3)`` ``(x, y, yaw)`` and tilt ``(N,)`` degrees.

    Yaw is the heading of the body x axis projected on the plane; tilt is the angle
    between the body z axis and the world's (roll and pitch together).
    """
    yaw = np.arctan2(rot[:, 1, 0], rot[:, 0, 0])
    tilt = np.degrees(np.arccos(np.clip(rot[:, 2, 2], -1.0, 1.0)))
    return np.c_[xyz[:, 0], xyz[:, 1], yaw], tilt


@dataclass
class PoseSamples:
    """A time series of 3D poses (one pose topic, or one /tf edge)."""

    stamps: np.ndarray
    """``(N,)`` seconds, strictly increasing."""
    xyz: np.ndarray
    """``(N, 3)`` meters."""
    quat: np.ndarray
    """``(N, 4)`` x y z w."""
    static: bool = False
    """A /tf_static edge: valid at every stamp."""
    frame_id: str = ""

    @classmethod
    def build(cls, stamps: Sequence[float], xyz: Sequence[Any], quat: Sequence[Any], *, static: bool = False,
              frame_id: str = "") -> PoseSamples:
        """Sort by stamp, drop non-finite samples and repeated stamps (the first one wins)."""
        s = np.asarray(stamps, dtype=np.float64).reshape(-1)
        p = np.asarray(xyz, dtype=np.float64).reshape(-1, 3)
        q = np.asarray(quat, dtype=np.float64).reshape(-1, 4)
        ok = np.isfinite(s) & np.isfinite(p).all(1) & np.isfinite(q).all(1) & (np.linalg.norm(q, axis=1) > 1e-9)
        s, p, q = s[ok], p[ok], q[ok]
        order = np.argsort(s, kind="stable")
        s, p, q = s[order], p[order], q[order]
        if len(s) > 1:
            keep = np.r_[True, np.diff(s) > 0]
            s, p, q = s[keep], p[keep], q[keep]
        return cls(s, p, q, static, frame_id)

    def __len__(self) -> int:
        return len(self.stamps)

    def at(self, t: np.ndarray, tolerance_s: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Interpolated ``(xyz (M, 3), rotation (M, 3, 3), ok (M,))`` at stamps ``t``.

        ``ok`` needs a sample on each side of the stamp within ``tolerance_s`` (an exact
        sample counts for both); just outside the series' span the end sample is used
        if it is within the tolerance.
        """
        t = np.asarray(t, dtype=np.float64)
        m, n = len(t), len(self.stamps)
        if n == 0:
            return np.zeros((m, 3)), np.tile(np.eye(3), (m, 1, 1)), np.zeros(m, bool)
        if self.static:
            return (np.repeat(self.xyz[:1], m, 0), np.repeat(_quat_to_matrix(self.quat[:1]), m, 0),
                    np.ones(m, bool))
        s = self.stamps
        hi = np.clip(np.searchsorted(s, t, side="left"), 0, n - 1)  # first sample >= t (or the last)
        lo = np.clip(hi - 1, 0, n - 1)
        exact = s[hi] == t
        inside = (t > s[0]) & (t < s[-1])
        lo = np.where(exact | ~inside, hi, lo)
        span_ok = np.where(inside & ~exact, (t - s[lo] <= tolerance_s) & (s[hi] - t <= tolerance_s),
                           np.abs(s[hi] - t) <= tolerance_s)
        den = s[hi] - s[lo]
        a = np.where(den > 0, (t - s[lo]) / np.where(den > 0, den, 1.0), 0.0)
        xyz = self.xyz[lo] + a[:, None] * (self.xyz[hi] - self.xyz[lo])
        rot = _quat_to_matrix(_slerp(self.quat[lo], self.quat[hi], a))
        return xyz, rot, span_ok


# ---- frames → views (shared by every converter) --------------------------------------------
def _thin(poses: np.ndarray, stamps: np.ndarray, opts: ConvertOptions) -> tuple[np.ndarray, np.ndarray]:
    """Indices kept and their trajectory ids: a new trajectory after a gap; keep on distance or turn."""
    keep: list[int] = []
    ids: list[int] = []
    traj, last, prev_t = -1, None, None
    min_a = math.radians(opts.min_angle_deg)
    for i in range(len(stamps)):
        if prev_t is None or stamps[i] - prev_t > opts.max_gap_s:
            traj, last = traj + 1, None
        prev_t = stamps[i]
        if last is not None:
            d = math.hypot(poses[i, 0] - poses[last, 0], poses[i, 1] - poses[last, 1])
            turn = abs(float(wrap_angle(poses[i, 2] - poses[last, 2])))
            if d < opts.min_distance_m and turn < min_a:
                continue
        keep.append(i)
        ids.append(traj)
        last = i
    k = np.asarray(keep, dtype=np.int64)
    t_ids = np.asarray(ids, dtype=np.int64)
    if len(t_ids):
        t_ids = np.unique(t_ids, return_inverse=True)[1]  # renumber 0..n-1 in order
    return k, t_ids.astype(np.int32)


def frames_to_views(
    *,
    name: str,
    stamps: np.ndarray,
    poses: np.ndarray,
    tilt_deg: np.ndarray,
    load_image: Callable[[int], np.ndarray],
    opts: ConvertOptions,
    source: str = "",
) -> tuple[EnvViews, ConversionReport]:
    """Frames with (possibly NaN = unpaired) planar poses → one environment's views and a report.

    ``stamps`` ``(M,)`` and ``poses`` ``(M, 3)`` are per camera frame; ``load_image(i)``
    decodes frame ``i`` (called only for kept frames). Raises :class:`DatasetFormatError`
    for an environment left empty and for frames of different sizes.
    """
    stamps = np.asarray(stamps, dtype=np.float64)
    poses = np.asarray(poses, dtype=np.float64)
    rep = ConversionReport(env=name, source=source, frames=len(stamps))
    paired = np.isfinite(poses).all(axis=1) & np.isfinite(stamps)
    rep.unpaired = int((~paired).sum())
    tilt = np.asarray(tilt_deg, dtype=np.float64)
    if paired.any():
        rep.tilted = int((tilt[paired] > opts.max_tilt_deg).sum())
        rep.max_tilt_deg = float(np.nanmax(tilt[paired]))
    idx = np.flatnonzero(paired)
    idx = idx[np.argsort(stamps[idx], kind="stable")]
    kept, traj = _thin(poses[idx], stamps[idx], opts)
    rows, images, tids = [], [], []
    sizes: dict[tuple[int, int], int] = {}
    for k, tid in zip(idx[kept], traj, strict=True):
        try:
            rgb = np.asarray(load_image(int(k)))
        except (ImageDecodeError, OSError, ValueError) as exc:
            rep.undecodable += 1
            if rep.undecodable == 1:
                rep.notes.append(f"first undecodable frame at {stamps[k]:.3f} s: {exc}")
            continue
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise DatasetFormatError(f"{name}: frame at {stamps[k]:.3f} s is not RGB uint8 (got {rgb.shape} "
                                     f"{rgb.dtype})")
        sizes[rgb.shape[:2]] = sizes.get(rgb.shape[:2], 0) + 1  # type: ignore[index]
        images.append(resize_rgb(rgb, height=opts.image_size[0], width=opts.image_size[1]))
        rows.append(int(k))
        tids.append(int(tid))
    if len(sizes) > 1:
        listing = ", ".join(f"{h}x{w} ({c} frames)" for (h, w), c in sorted(sizes.items()))
        raise DatasetFormatError(f"{name}: mixed image sizes in one camera stream ({listing}); convert each "
                                 f"camera setting separately (e.g. with --range)")
    if not rows:
        why = (f"none of its {rep.frames} frames has a pose within {opts.pose_tolerance_s} s"
               if rep.frames and rep.unpaired == rep.frames else f"{rep.frames} frames, none usable")
        raise DatasetFormatError(f"{name}: empty environment ({why}) from {source}")
    r = np.asarray(rows)
    t_ids = np.unique(np.asarray(tids), return_inverse=True)[1].astype(np.int32)
    views = EnvViews(images=np.stack(images).astype(np.uint8), poses=poses[r].copy(), stamps=stamps[r].copy(),
                     trajectory_ids=t_ids, name=name)
    views.validate()
    rep.kept, rep.trajectories = len(r), int(t_ids.max()) + 1
    return views, rep


# ---- bags ------------------------------------------------------------------------------------
def _stamp(msg: Any) -> float:
    return float(msg.header.stamp.sec) + 1e-9 * float(msg.header.stamp.nanosec)


def _pose_parts(msg: Any, msgtype: str) -> tuple[list[float], list[float]]:
    pose = msg.pose if msgtype == "geometry_msgs/msg/PoseStamped" else msg.pose.pose
    p, o = pose.position, pose.orientation
    return [p.x, p.y, p.z], [o.x, o.y, o.z, o.w]


class _BagMessages:
    """The messages of a few topics of one bag: streamed by rosbags, or recovered from a cut mcap file."""

    def __init__(self, bag: Path) -> None:
        self.bag = bag
        self.ts = typestore()
        self.types: dict[str, str] = {}
        self.note: str | None = None
        self._raw: list[Any] | None = None
        from rosbags.rosbag2 import Reader, ReaderError

        try:
            with Reader(bag) as r:
                self.types = {c.topic: c.msgtype for c in r.connections}
        except (ReaderError, FileNotFoundError, OSError, ValueError, KeyError):
            msgs, self.note = iter_raw_messages(bag)  # cut mcap: recover what precedes the damage
            self._raw = msgs
            self.types = {m.topic: m.msgtype for m in msgs}

    def iter(self, topics: set[str]) -> Any:
        """``(topic, msgtype, log_time_ns, decoded)`` for the given topics, in file order."""
        def decode(topic: str, msgtype: str, data: bytes) -> Any:
            try:
                return self.ts.deserialize_cdr(data, msgtype)
            except Exception as exc:  # rosbags raises several types for bad CDR
                raise BagReadError(f"{self.bag}: cannot decode a {msgtype} on {topic}: {exc}",
                                   path=self.bag) from exc

        if self._raw is not None:
            for m in self._raw:
                if m.topic in topics:
                    yield m.topic, m.msgtype, m.log_time_ns, decode(m.topic, m.msgtype, m.data)
            return
        from rosbags.rosbag2 import Reader

        with Reader(self.bag) as r:
            conns = [c for c in r.connections if c.topic in topics]
            for c, t, raw in r.messages(connections=conns):
                yield c.topic, c.msgtype, int(t), decode(c.topic, c.msgtype, bytes(raw))

    def listing(self) -> str:
        return ", ".join(f"{k} [{v}]" for k, v in sorted(self.types.items())) or "none"


def _pick_camera(bm: _BagMessages, camera_topic: str | None) -> str:
    if camera_topic:
        for cand in (absolute(camera_topic), absolute(camera_topic) + "/compressed"):
            if cand in bm.types:
                if bm.types[cand] not in IMAGE_TYPES:
                    raise UnknownMessageTypeError(f"{bm.bag}: {cand} is a {bm.types[cand]}, not an image "
                                                  f"(Image or CompressedImage)", path=bm.bag)
                return cand
        raise MissingTopicError(f"{bm.bag}: camera topic {absolute(camera_topic)} is missing "
                                f"(topics: {bm.listing()})", path=bm.bag)
    cams = sorted(t for t, ty in bm.types.items() if ty in IMAGE_TYPES and not t.startswith("/context"))
    if len(cams) != 1:
        raise MissingTopicError(f"{bm.bag}: {'no' if not cams else 'several'} camera topics ({', '.join(cams)}); "
                                f"name one with --camera-topic (topics: {bm.listing()})", path=bm.bag)
    return cams[0]


def _tf_chain(bm: _BagMessages, parent: str, child: str, topics: set[str]) -> list[tuple[PoseSamples, bool]]:
    """The /tf edges from ``parent`` to ``child``: (samples of edge a→b, True if walked a→b else inverted)."""
    edges: dict[tuple[str, str], tuple[list[float], list[Any], list[Any], bool]] = {}
    for topic, _ty, _t, msg in bm.iter(topics):
        static = topic.endswith("tf_static")
        for tr in msg.transforms:
            key = (tr.header.frame_id.lstrip("/"), tr.child_frame_id.lstrip("/"))
            e = edges.setdefault(key, ([], [], [], static))
            v, r = tr.transform.translation, tr.transform.rotation
            e[0].append(_stamp(tr))
            e[1].append([v.x, v.y, v.z])
            e[2].append([r.x, r.y, r.z, r.w])
    parent, child = parent.lstrip("/"), child.lstrip("/")
    nbrs: dict[str, list[tuple[str, tuple[str, str], bool]]] = {}
    for a, b in edges:
        nbrs.setdefault(a, []).append((b, (a, b), True))
        nbrs.setdefault(b, []).append((a, (a, b), False))
    prev: dict[str, tuple[str, tuple[str, str], bool] | None] = {parent: None}
    queue = deque([parent])
    while queue:
        f = queue.popleft()
        for g, key, fwd in nbrs.get(f, []):
            if g not in prev:
                prev[g] = (f, key, fwd)
                queue.append(g)
    if child not in prev:
        frames = sorted(nbrs)
        raise MissingTopicError(f"{bm.bag}: no /tf chain from {parent!r} to {child!r} (frames: "
                                f"{', '.join(frames) or 'none'})", path=bm.bag)
    chain = []
    f = child
    while prev[f] is not None:
        g, key, fwd = prev[f]  # type: ignore[misc]
        s, p, q, static = edges[key]
        chain.append((PoseSamples.build(s, p, q, static=static, frame_id=key[0]), fwd))
        f = g
    return chain[::-1]


def _chain_at(chain: list[tuple[PoseSamples, bool]], t: np.ndarray,
              tol: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Compose the chain's edges at stamps ``t``: ``(xyz (M, 3), rotation (M, 3, 3), ok (M,))``."""
    m = len(t)
    p, rot, ok = np.zeros((m, 3)), np.tile(np.eye(3), (m, 1, 1)), np.ones(m, bool)
    for samples, fwd in chain:
        pe, re_, oke = samples.at(t, tol)
        if not fwd:  # inverse transform
            re_ = np.transpose(re_, (0, 2, 1))
            pe = -np.einsum("mij,mj->mi", re_, pe)
        p = p + np.einsum("mij,mj->mi", rot, pe)
        rot = rot @ re_
        ok &= oke
    return p, rot, ok


def bag_to_views(
    bag: str | Path,
    *,
    camera_topic: str | None = None,
    pose_topic: str | None = None,
    tf_frames: tuple[str, str] | None = None,
    ranges: Sequence[TimeRange] = (),
    env_name: str | None = None,
    prefix_ranges: bool = False,
    opts: ConvertOptions | None = None,
) -> list[tuple[EnvViews, ConversionReport]]:
    """One bag → one environment named ``env_name`` (default: the bag's name), or one per time range.

    Each report's ``camera`` is the topic actually read: ``camera_topic``, or ``camera_topic/compressed``
    when only that exists, or the bag's only image topic when ``camera_topic`` is None.

    A range's environment is named after the range, or ``<bag>_<range>`` with ``prefix_ranges``
    (the CLI sets it when several bags are converted). See the module docstring for the rules.
    """
    bag = Path(bag)
    opts = opts or ConvertOptions()
    bm = _BagMessages(bag)
    cam = _pick_camera(bm, camera_topic)
    if pose_topic and tf_frames:
        raise ValueError("give either a pose topic or /tf frames, not both")
    if not pose_topic and not tf_frames:
        cands = sorted(t for t, ty in bm.types.items() if ty in POSE_TYPES)
        has_tf = any(ty == TF_TYPE for ty in bm.types.values())
        hint = (f"pose topics here: {', '.join(cands)}" if cands else "this bag has no pose topic") + \
               ("; it has /tf" if has_tf else "; it has no /tf either")
        raise MissingTopicError(f"{bag}: no pose source given: pass --pose-topic TOPIC or --tf-frames PARENT CHILD "
                                f"({hint})", path=bag)
    stamps: list[float] = []
    log_ns: list[int] = []
    frame_msgs: list[tuple[str, Any]] = []
    for _topic, ty, t, msg in bm.iter({cam}):
        stamps.append(_stamp(msg))
        log_ns.append(t)
        frame_msgs.append((ty, msg))
    st = np.asarray(stamps)
    if len(st) and (st == 0).all():  # a driver that never stamps: fall back to bag time
        st = np.asarray(log_ns, dtype=np.float64) * 1e-9
    order = np.argsort(st, kind="stable")
    st = st[order]
    frame_msgs = [frame_msgs[i] for i in order]
    if not len(st):
        raise MissingTopicError(f"{bag}: camera topic {cam} has no messages", path=bag)

    if pose_topic:
        pt = absolute(pose_topic)
        if pt not in bm.types:
            raise MissingTopicError(f"{bag}: pose topic {pt} is missing (topics: {bm.listing()})", path=bag)
        if bm.types[pt] not in POSE_TYPES:
            raise UnknownMessageTypeError(f"{bag}: pose topic {pt} is a {bm.types[pt]}; expected "
                                          f"{' or '.join(POSE_TYPES)}", path=bag)
        s, p, q, frame = [], [], [], ""
        for _topic, ty, _t, msg in bm.iter({pt}):
            s.append(_stamp(msg))
            pp, qq = _pose_parts(msg, ty)
            p.append(pp)
            q.append(qq)
            frame = frame or msg.header.frame_id
        samples = PoseSamples.build(s, p, q, frame_id=frame)
        if not len(samples):
            raise MissingTopicError(f"{bag}: pose topic {pt} has no valid messages", path=bag)
        xyz, rot, ok = samples.at(st, opts.pose_tolerance_s)
        pose_source = f"{pt} (frame {frame or '?'})"
    else:
        tf_topics = {t for t, ty in bm.types.items() if ty == TF_TYPE}
        if not tf_topics:
            raise MissingTopicError(f"{bag}: --tf-frames given but the bag has no /tf (topics: {bm.listing()})",
                                    path=bag)
        chain = _tf_chain(bm, tf_frames[0], tf_frames[1], tf_topics)  # type: ignore[index]
        xyz, rot, ok = _chain_at(chain, st, opts.pose_tolerance_s)
        pose_source = f"/tf {tf_frames[0]} -> {tf_frames[1]}"  # type: ignore[index]
    planar, tilt = planar_from_rotation(xyz, rot)
    planar[~ok] = np.nan

    def load(i: int) -> np.ndarray:
        ty, msg = frame_msgs[i]
        return np.array(_decode_image(msg, ty))

    base = sanitize_env_name(env_name or bag.name.removesuffix(".mcap").removesuffix(".db3"))
    t_rel = st - st[0]
    pieces = [(base, np.ones(len(st), bool))] if not ranges else [
        (f"{base}_{r.name}" if prefix_ranges else r.name,
         ((r.start is None) | (t_rel >= (r.start or 0.0))) & ((r.end is None) | (t_rel < (r.end or 0.0))))
        for r in ranges
    ]
    out = []
    for name, sel in pieces:
        rows = np.flatnonzero(sel)
        sub_poses = planar[rows]
        views, rep = frames_to_views(name=name, stamps=st[rows], poses=sub_poses, tilt_deg=tilt[rows],
                                     load_image=lambda i, rows=rows: load(int(rows[i])), opts=opts,
                                     source=f"{bag}: {cam} + {pose_source}")
        rep.camera = cam
        if bm.note:
            rep.notes.append(f"partial bag: {bm.note}")
        out.append((views, rep))
    return out



# ---- writing ---------------------------------------------------------------------------------
def write_dataset(
    out: str | Path,
    envs: Sequence[tuple[EnvViews, ConversionReport]],
    *,
    splits: dict[str, str],
    default_split: str = "train",
    meters_per_unit: float = 20.0,
    margin_m: float = 2.0,
    camera: str = "",
    source: str = "own_robot",
    domain: str = "own",
    fov_deg: float | None = None,
    image_size: tuple[int, int] = (32, 32),
) -> tuple[DatasetDir, list[str]]:
    """Write converted environments to ``out`` (created, or appended to if it exists); returns warnings.

    A new dataset's bounds are the square around every pose plus ``margin_m``; an existing
    one keeps its metadata, and poses outside its bounds are warned about.
    """
    out = Path(out)
    warnings: list[str] = []
    names = [v.name for v, _ in envs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DatasetFormatError(f"environment names repeat: {dup}; use --env or distinct range names")
    assignment = {n: splits.get(n, default_split) for n in names}
    for n, split in assignment.items():
        if split not in SPLITS:
            raise ValueError(f"split {split!r} for {n}: choose train, val or test")
    for views, _ in envs:  # everything is checked before the first file is written: a refusal changes nothing
        views.validate()
        if tuple(views.images.shape[1:3]) != tuple(image_size):
            raise DatasetFormatError(f"{views.name}: image size {views.images.shape[1:3]} != {tuple(image_size)}")
    allp = np.concatenate([v.poses[:, :2] for v, _ in envs])
    if (out / DatasetDir.META).is_file():
        ds = DatasetDir(out)
        if tuple(ds.meta.image_size) != tuple(image_size):
            raise DatasetFormatError(f"{out}: existing image_size {ds.meta.image_size} != {image_size} "
                                     f"(mixed image sizes); pass --image-size {ds.meta.image_size[0]}x"
                                     f"{ds.meta.image_size[1]}")
        ds.check_assignment(assignment)
        xmin, xmax, ymin, ymax = ds.meta.bounds
        if (allp[:, 0].min() < xmin or allp[:, 0].max() > xmax or allp[:, 1].min() < ymin
                or allp[:, 1].max() > ymax):
            warnings.append(f"{out}: new poses lie outside the dataset's bounds {ds.meta.bounds}")
    else:
        lo, hi = allp.min(0), allp.max(0)
        c, half = (lo + hi) / 2.0, float(max(hi - lo)) / 2.0 + margin_m
        bounds = (float(c[0] - half), float(c[0] + half), float(c[1] - half), float(c[1] + half))
        ds = DatasetDir.create(out, DatasetMeta(image_size=tuple(image_size), meters_per_unit=meters_per_unit,  # type: ignore[arg-type]
                                                bounds=bounds, camera=camera, source=source, domain=domain,
                                                fov_deg=fov_deg))
    for views, _ in envs:
        ds.write_env_file(views)
    for split in SPLITS:
        listed = [n for n in names if assignment[n] == split]
        if listed:
            ds.add_to_split(split, listed)
    for views, rep in envs:
        rep.split = assignment[views.name]
    return ds, warnings


def check_bag_path(path: str | Path) -> list[Path]:
    """The bags at ``path`` (a bag, or a directory of bags); a clear error if there are none."""
    bags = find_bags(path)
    if not bags:
        raise BagError(f"{path}: no rosbag2 bag here (no metadata.yaml, .mcap or .db3)", path=path)
    return bags
