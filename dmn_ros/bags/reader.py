"""Load the streams an evaluation needs from a rosbag2 bag (mcap or sqlite3) into numpy.

Messages are read with rosbags (no ROS installation). A bag whose mcap file was cut
short (a recorder killed mid-write) has no summary section, so rosbags refuses it; the
records before the cut are then recovered by a forward scan and the data is marked
``truncated``. Everything is keyed by header stamps (what the nodes use), in seconds.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from dmn_ros.bags.errors import (
    BagReadError,
    MissingTopicError,
    TruncatedBagError,
    UnknownMessageTypeError,
)
from dmn_ros.bags.record import typestore
from dmn_ros.bags.topics import IMAGE_TYPES, ODOM_TYPES, POSE_TYPES, TopicNames, absolute
from dmn_ros.geometry import quaternion_to_yaw
from dmn_ros.images import ImageDecodeError, decode_compressed, decode_raw

__all__ = ["BagData", "RawMessage", "find_bags", "iter_raw_messages", "load_bag", "storage_files"]

_MCAP_MAGIC = b"\x89MCAP0\r\n"


@dataclass(frozen=True)
class RawMessage:
    topic: str
    msgtype: str
    log_time_ns: int
    """Bag (receive) time; header stamps are read from the decoded message."""
    data: bytes


def find_bags(path: str | Path) -> list[Path]:
    """``path`` itself if it is a bag (has ``metadata.yaml`` or is a ``.mcap``/``.db3``), else the bags below it."""
    p = Path(path)
    if not p.exists():
        raise BagReadError(f"{p}: no such bag or directory", path=p)
    if p.is_file() or (p / "metadata.yaml").is_file():
        return [p]
    bags = sorted({m.parent for m in p.rglob("metadata.yaml")})
    loose = sorted(f for f in p.rglob("*") if f.suffix in (".mcap", ".db3") and f.parent not in bags)
    return bags + loose


def storage_files(bag: Path) -> list[Path]:
    """The storage files of a bag directory (from metadata.yaml when readable, else by extension)."""
    if bag.is_file():
        return [bag]
    meta = bag / "metadata.yaml"
    try:
        info = yaml.safe_load(meta.read_text())["rosbag2_bagfile_information"]
        return [bag / f for f in info["relative_file_paths"]]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return sorted(f for f in bag.iterdir() if f.suffix in (".mcap", ".db3"))


def read_custom_data(bag: Path) -> dict[str, str]:
    try:
        info = yaml.safe_load((bag / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
        return {str(k): str(v) for k, v in (info.get("custom_data") or {}).items()}
    except (OSError, KeyError, TypeError, AttributeError, yaml.YAMLError):
        return {}


# ---- raw access ----------------------------------------------------------------------------
def _rosbags_messages(bag: Path) -> Iterator[RawMessage]:
    from rosbags.rosbag2 import Reader, ReaderError

    try:
        reader = Reader(bag)
        reader.open()
    except (ReaderError, FileNotFoundError, OSError, ValueError, KeyError) as exc:
        raise BagReadError(f"{bag}: cannot open bag: {exc}", path=bag) from exc
    try:
        for conn, t, raw in reader.messages():
            yield RawMessage(conn.topic, conn.msgtype, int(t), bytes(raw))
    finally:
        reader.close()


def _mcap_str(b: io.BytesIO) -> str:
    (n,) = struct.unpack("<I", b.read(4))
    return b.read(n).decode()


class _NoDecompressor(Exception):
    """A chunk uses a compression that no installed module can decompress (not damage)."""


def _zstd_decompressor() -> Callable[[bytes, int], bytes]:
    """zstd as rosbags itself gets it: the stdlib ``compression.zstd`` (Python >= 3.14), else
    ``backports.zstd`` (what recent rosbags, e.g. 0.11.9, require below 3.14), else ``zstandard``
    (what rosbags 0.10.0-0.11.0 require)."""
    try:
        from compression import zstd  # type: ignore[import-not-found]
    except ImportError:
        try:
            from backports import zstd  # type: ignore[no-redef]
        except ImportError:
            zstd = None
    if zstd is not None:
        return lambda data, _size: zstd.decompress(data)
    try:
        import zstandard
    except ImportError:
        raise _NoDecompressor("its chunks are zstd-compressed and no zstd module is installed "
                              "(compression.zstd, backports.zstd or zstandard)") from None
    return lambda data, size: zstandard.ZstdDecompressor().decompress(data, max_output_size=size)


def _lz4_decompressor() -> Callable[[bytes, int], bytes]:
    try:
        import lz4.frame
    except ImportError:
        raise _NoDecompressor("its chunks are lz4-compressed and the lz4 module is not installed") from None
    return lambda data, _size: lz4.frame.decompress(data)


_DECOMPRESSORS = {"zstd": _zstd_decompressor, "lz4": _lz4_decompressor}


def _decompress_chunk(compression: str, payload: bytes, size: int) -> bytes:
    """The records of a complete compressed chunk; EOFError when its data does not decompress."""
    if compression not in _DECOMPRESSORS:
        raise _NoDecompressor(f"unsupported chunk compression {compression!r} (readable: zstd, lz4)")
    decompress = _DECOMPRESSORS[compression]()
    try:
        out = decompress(payload, size)
    except Exception as exc:  # each module has its own error type (ZstdError, RuntimeError, ...)
        raise EOFError(f"{compression} chunk does not decompress: {exc}") from exc
    if len(out) != size:
        raise EOFError(f"{compression} chunk decompressed to {len(out)} bytes, expected {size}")
    return out


def _scan_mcap(file: Path) -> tuple[list[RawMessage], str | None]:
    """Forward scan of an mcap file's records; returns the messages before the first damage and why it stopped."""
    data = file.read_bytes()
    if not data.startswith(_MCAP_MAGIC):
        return [], f"{file}: not an mcap file (bad magic)"
    schemas: dict[int, str] = {}
    channels: dict[int, tuple[str, str]] = {}
    out: list[RawMessage] = []

    def records(buf: bytes, start: int, partial_chunks: bool = False) -> Iterator[tuple[int, bytes]]:
        pos = start
        while pos + 9 <= len(buf):
            op, length = struct.unpack_from("<BQ", buf, pos)
            if pos + 9 + length > len(buf):
                if op == 0x06 and partial_chunks:  # an uncompressed chunk cut short: use its complete records
                    yield op, buf[pos + 9:]
                raise EOFError(f"record 0x{op:02x} at byte {pos} runs past the end of the file ({len(buf)} bytes)")
            yield op, buf[pos + 9: pos + 9 + length]
            pos += 9 + length
        if pos != len(buf):
            raise EOFError(f"file ends inside a record header at byte {pos}")

    def handle(op: int, body: bytes) -> None:
        b = io.BytesIO(body)
        if op == 0x03:  # Schema
            (sid,) = struct.unpack("<H", b.read(2))
            schemas[sid] = _mcap_str(b)
        elif op == 0x04:  # Channel
            cid, sid = struct.unpack("<HH", b.read(4))
            channels[cid] = (_mcap_str(b), schemas.get(sid, ""))
        elif op == 0x05:  # Message
            cid, _seq, log_time, _pub = struct.unpack("<HIQQ", body[:22])
            if cid in channels:
                topic, msgtype = channels[cid]
                out.append(RawMessage(topic, msgtype, log_time, body[22:]))
        elif op == 0x06:  # Chunk
            _start, _end, uncompressed_size = struct.unpack("<QQQ", b.read(24))
            (_crc,) = struct.unpack("<I", b.read(4))
            compression = _mcap_str(b)
            (n,) = struct.unpack("<Q", b.read(8))
            payload = b.read(n)
            if len(payload) < n and compression:
                raise EOFError(f"compressed chunk cut after {len(payload)} of {n} bytes")
            if compression:
                payload = _decompress_chunk(compression, payload, uncompressed_size)
            for op2, body2 in records(payload, 0):
                handle(op2, body2)
            if len(payload) < n:
                raise EOFError(f"chunk cut after {len(payload)} of {n} bytes")

    try:
        for op, body in records(data, len(_MCAP_MAGIC), partial_chunks=True):
            if op == 0x02:  # Footer: the file is complete
                return out, None
            handle(op, body)
    except _NoDecompressor as exc:
        return out, f"{file}: read stopped after {len(out)} messages: {exc}"
    except (EOFError, struct.error, UnicodeDecodeError) as exc:
        return out, f"{file}: truncated or damaged after {len(out)} messages ({exc})"
    return out, f"{file}: ends without an mcap footer after {len(out)} messages (truncated)"


def iter_raw_messages(bag: Path) -> tuple[list[RawMessage], str | None]:
    """All messages of ``bag`` in file order, plus a note when the bag was truncated (partial read)."""
    bag = Path(bag)
    msgs: list[RawMessage] = []
    try:
        for m in _rosbags_messages(bag):
            msgs.append(m)
        return msgs, None
    except BagReadError as exc:
        files = storage_files(bag) if bag.exists() else []
        if not files or not all(f.is_file() for f in files):
            raise
        if all(f.suffix == ".mcap" for f in files):
            recovered: list[RawMessage] = []
            notes: list[str] = []
            for f in files:
                got, note = _scan_mcap(f)
                recovered += got
                if note:
                    notes.append(note)
            if not notes:  # complete files that rosbags could not open: a different problem
                raise
            if not recovered:
                raise TruncatedBagError(f"{bag}: no readable messages ({'; '.join(notes)})", path=bag) from exc
            return recovered, "; ".join(notes)
        if "malformed" in str(exc) or "truncat" in str(exc).lower():
            raise TruncatedBagError(f"{bag}: storage file is truncated or corrupt, nothing recoverable: {exc}",
                                    path=bag) from exc
        raise
    except Exception as exc:  # damage found mid-read: keep what was read
        if not msgs:
            raise BagReadError(f"{bag}: unreadable: {exc}", path=bag) from exc
        return msgs, f"{bag}: read stopped after {len(msgs)} messages: {exc}"


# ---- decoded streams -----------------------------------------------------------------------
def _stamp(msg: Any) -> float:
    return float(msg.header.stamp.sec) + 1e-9 * float(msg.header.stamp.nanosec)


def _pose_of(msg: Any, msgtype: str) -> np.ndarray:
    pose = msg.pose if msgtype == "geometry_msgs/msg/PoseStamped" else msg.pose.pose
    o = pose.orientation
    q = np.array([o.x, o.y, o.z, o.w], dtype=np.float64)
    n = float(np.linalg.norm(q))
    if not np.isfinite(q).all() or n < 1e-9:
        return np.full(3, np.nan)
    return np.array([pose.position.x, pose.position.y, float(quaternion_to_yaw(q / n))])


@dataclass
class PoseStream:
    stamps: np.ndarray
    """``(N,)`` seconds, increasing."""
    poses: np.ndarray
    """``(N, 3)`` metric ``(x, y, yaw)``."""
    frame_id: str = ""

    def __len__(self) -> int:
        return len(self.stamps)


@dataclass
class BagData:
    """What one bag holds for evaluation."""

    path: Path
    frame_stamps: np.ndarray
    """``(T,)`` camera header stamps, seconds, increasing."""
    frames: list[tuple[str, Any]]
    """Per camera frame: (msgtype, decoded message); :meth:`image` gives RGB."""
    odom: PoseStream | None
    ground_truth: PoseStream | None
    contexts: list[tuple[float, np.ndarray, np.ndarray]] = field(default_factory=list)
    """Context pairs (stamp, RGB, metric pose) from the bag's context topics."""
    estimate: PoseStream | None = None
    custom_data: dict[str, str] = field(default_factory=dict)
    truncated: str | None = None
    """Why the read stopped early (None: the whole bag was read)."""
    topics: dict[str, tuple[str, int]] = field(default_factory=dict)
    """Every topic in the bag: (type, messages read)."""

    def image(self, i: int) -> np.ndarray:
        msgtype, msg = self.frames[i]
        return np.array(_decode_image(msg, msgtype))  # writable copy (torch warns on read-only buffers)

    @property
    def area_size_m(self) -> float | None:
        v = self.custom_data.get("dmn_ros.area_size_m")
        return float(v) if v else None


def _decode_image(msg: Any, msgtype: str) -> np.ndarray:
    if msgtype == "sensor_msgs/msg/CompressedImage":
        return decode_compressed(np.asarray(msg.data, dtype=np.uint8), msg.format)
    return decode_raw(encoding=msg.encoding, height=msg.height, width=msg.width, step=msg.step,
                      data=np.asarray(msg.data, dtype=np.uint8).tobytes())


def _pair_contexts(images: list[tuple[float, Any, str]], poses: PoseStream, tol: float,
                   bag: Path) -> list[tuple[float, np.ndarray, np.ndarray]]:
    out = []
    used: set[int] = set()
    for stamp, msg, msgtype in images:
        if not len(poses):
            break
        j = int(np.argmin(np.abs(poses.stamps - stamp)))
        if abs(poses.stamps[j] - stamp) <= tol and j not in used and np.isfinite(poses.poses[j]).all():
            used.add(j)
            try:
                out.append((stamp, np.array(_decode_image(msg, msgtype)), poses.poses[j].copy()))
            except ImageDecodeError as exc:
                raise BagReadError(f"{bag}: context image at {stamp:.3f} s: {exc}", path=bag) from exc
    return out


def load_bag(
    path: str | Path,
    *,
    topics: TopicNames | None = None,
    need_contexts: bool = False,
    need_ground_truth: bool = True,
    need_odom: bool = True,
    need_camera: bool = True,
    estimate_topic: str | None = None,
    pair_tolerance_s: float = 0.05,
) -> BagData:
    """Read ``path`` and decode the topics in ``topics``.

    Raises :class:`MissingTopicError` if a needed topic is absent or empty,
    :class:`UnknownMessageTypeError` if it has a type the tools cannot decode,
    :class:`TruncatedBagError`/:class:`BagReadError` if nothing can be read. A bag cut
    short is loaded up to the damage, with ``truncated`` set.
    """
    bag = Path(path)
    t = (topics or TopicNames()).normalized()
    msgs, truncated = iter_raw_messages(bag)
    by_topic: dict[str, list[RawMessage]] = {}
    types: dict[str, str] = {}
    for m in msgs:
        by_topic.setdefault(m.topic, []).append(m)
        types[m.topic] = m.msgtype
    listed = _listed_topics(bag)
    ts = typestore()
    where = f"{bag}" + (f" (truncated: read {len(msgs)} messages)" if truncated else "")

    def pick(name: str, accepted: tuple[str, ...], *, required: bool, alt: str | None = None) -> str | None:
        for cand in [absolute(name)] + ([absolute(alt)] if alt else []):
            if cand in types or cand in listed:
                msgtype = types.get(cand) or listed[cand]
                if msgtype not in accepted:
                    raise UnknownMessageTypeError(
                        f"{bag}: topic {cand} has message type {msgtype}, which the bag tools cannot read "
                        f"(expected {' or '.join(accepted)})", path=bag)
                if cand not in by_topic:
                    if required:
                        raise MissingTopicError(f"{where}: topic {cand} has no messages", path=bag)
                    return None
                return cand
        if required:
            have = ", ".join(f"{k} [{v}]" for k, v in sorted({**listed, **types}.items())) or "none"
            raise MissingTopicError(f"{where}: topic {absolute(name)} is missing (topics: {have})", path=bag)
        return None

    def decode(topic: str) -> list[tuple[Any, str]]:
        out = []
        for m in by_topic[topic]:
            try:
                out.append((ts.deserialize_cdr(m.data, m.msgtype), m.msgtype))
            except Exception as exc:  # rosbags raises several types for bad CDR
                raise BagReadError(f"{bag}: cannot decode a {m.msgtype} on {topic}: {exc}", path=bag) from exc
        return out

    def poses(topic: str | None) -> PoseStream | None:
        if topic is None:
            return None
        items = decode(topic)
        stamps = np.array([_stamp(mm) for mm, _ in items], dtype=np.float64)
        p = np.stack([_pose_of(mm, ty) for mm, ty in items]) if items else np.zeros((0, 3))
        keep = np.isfinite(p).all(axis=1)
        order = np.argsort(stamps[keep], kind="stable")
        s, p = stamps[keep][order], p[keep][order]
        if len(s) > 1:  # drop repeated stamps
            uniq = np.concatenate([[True], np.diff(s) > 0])
            s, p = s[uniq], p[uniq]
        frame = items[0][0].header.frame_id if items else ""
        return PoseStream(s, p, frame)

    cam = pick(t.camera, IMAGE_TYPES, required=need_camera, alt=t.camera + "/compressed")
    odom_t = pick(t.odom, ODOM_TYPES, required=need_odom)
    gt_t = pick(t.ground_truth, POSE_TYPES, required=need_ground_truth)
    est_t = pick(estimate_topic, POSE_TYPES, required=True) if estimate_topic else None
    frames: list[tuple[str, Any]] = []
    stamps = np.zeros(0)
    if cam is not None:
        items = decode(cam)
        st = np.array([_stamp(mm) for mm, _ in items])
        order = np.argsort(st, kind="stable")
        frames = [(items[i][1], items[i][0]) for i in order]
        stamps = st[order]
    contexts: list[tuple[float, np.ndarray, np.ndarray]] = []
    if need_contexts:
        ci = pick(t.context_image, IMAGE_TYPES, required=True, alt=t.context_image + "/compressed")
        cp = pick(t.context_pose, POSE_TYPES, required=True)
        imgs = [(_stamp(mm), mm, ty) for mm, ty in decode(ci)]  # type: ignore[arg-type]
        contexts = _pair_contexts(imgs, poses(cp), pair_tolerance_s, bag)  # type: ignore[arg-type]
        if not contexts:
            raise MissingTopicError(f"{where}: no context image on {ci} has a pose on {cp} within "
                                    f"{pair_tolerance_s} s", path=bag)
    return BagData(
        path=bag, frame_stamps=stamps, frames=frames, odom=poses(odom_t), ground_truth=poses(gt_t),
        contexts=contexts, estimate=poses(est_t), custom_data=read_custom_data(bag) if bag.is_dir() else {},
        truncated=truncated, topics={k: (types[k], len(v)) for k, v in by_topic.items()},
    )


def _listed_topics(bag: Path) -> dict[str, str]:
    """Topics named in metadata.yaml (present even when a truncated file lost their messages)."""
    if not bag.is_dir():
        return {}
    try:
        info = yaml.safe_load((bag / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
        return {e["topic_metadata"]["name"]: e["topic_metadata"]["type"] for e in info["topics_with_message_count"]}
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return {}
