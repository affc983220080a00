"""Messages ↔ numpy, poses and view-embedding maps, with small numpy helpers instead of cv_bridge.

Map message layout (``sensor_msgs/PointCloud2`` on ``dmn_map``), one point per view,
little-endian, dense, ``height = 1``, ``width = N``, ``header.frame_id`` = global frame:

| field | offset | datatype | count | meaning |
|---|---|---|---|---|
| ``x`` | 0 | FLOAT32 | 1 | view x (m) |
| ``y`` | 4 | FLOAT32 | 1 | view y (m) |
| ``z`` | 8 | FLOAT32 | 1 | 0 (so RViz can draw the cloud) |
| ``yaw`` | 12 | FLOAT32 | 1 | view yaw (rad, REP-103) |
| ``emb_<fingerprint>`` | 16 | FLOAT32 | D·h·w | embedding ``V_i`` flattened C-order from ``(D, h, w)`` |

``point_step = 16 + 4·D·h·w``. The embedding field's name carries the model's
weights fingerprint, so one message is self-describing and a localizer with a
different model rejects it. View ids, ``embed_shape`` and ``meters_per_unit``
travel on the companion ``std_msgs/String`` topic ``dmn_map_info`` (JSON).

Shared contexts between robots (``/dmn_shared_contexts``) use a second PointCloud2
layout, documented above :func:`shared_batch_to_pointcloud` and in ``docs/multirobot.md``.
"""

from __future__ import annotations

import json
import math

import numpy as np
from builtin_interfaces.msg import Time
from geometry_msgs.msg import Pose, PoseWithCovarianceStamped, Quaternion
from sensor_msgs.msg import CompressedImage, Image, PointCloud2, PointField

from dmn_ros.errors import FingerprintMismatchError, MapError
from dmn_ros.geometry import quaternion_to_yaw, yaw_to_quaternion
from dmn_ros.images import decode_compressed, decode_raw, encode_raw
from dmn_ros.maps import ViewMap
from dmn_ros.sharing import MAX_ID_BYTES, ContextBatch, SharedContextError

EMB_FIELD_PREFIX = "emb_"
_COV_IDX = (0, 1, 5)  # x, y, yaw (rotation about z) in the row-major 6×6 of geometry_msgs


class PoseInputError(ValueError):
    """A pose message is unusable (NaN, zero quaternion)."""


# ---- time ----------------------------------------------------------------------------------
def stamp_to_sec(stamp: Time) -> float:
    return float(stamp.sec) + 1e-9 * float(stamp.nanosec)


def sec_to_stamp(t: float) -> Time:
    """Float seconds → ``builtin_interfaces/Time``; ValueError if not finite or outside int32 seconds."""
    if not math.isfinite(t):
        raise ValueError(f"time {t} s is not representable as a ROS stamp")
    sec = math.floor(t)
    nsec = round((t - sec) * 1e9)
    if nsec >= 1_000_000_000:
        sec, nsec = sec + 1, nsec - 1_000_000_000
    if not -(2**31) <= sec < 2**31:
        raise ValueError(f"time {t} s is not representable as a ROS stamp")
    return Time(sec=int(sec), nanosec=nsec)


# ---- images --------------------------------------------------------------------------------
def image_msg_to_rgb(msg: Image) -> np.ndarray:
    """``sensor_msgs/Image`` → RGB uint8 ``(H, W, 3)``; ``ImageDecodeError`` if unusable.

    Only 8-bit encodings are accepted, so ``is_bigendian`` does not matter.
    """
    return decode_raw(encoding=msg.encoding, height=msg.height, width=msg.width, step=msg.step, data=msg.data)


def compressed_msg_to_rgb(msg: CompressedImage) -> np.ndarray:
    return decode_compressed(msg.data, msg.format)


def rgb_to_image_msg(rgb: np.ndarray, *, stamp: Time, frame_id: str, encoding: str = "rgb8") -> Image:
    h, w, step, data = encode_raw(rgb, encoding)
    msg = Image()
    msg.header.stamp = stamp
    msg.header.frame_id = frame_id
    msg.height, msg.width, msg.step, msg.encoding, msg.is_bigendian = h, w, step, encoding, 0
    msg.data = data
    return msg


# ---- poses ---------------------------------------------------------------------------------
def pose_to_xyyaw(pose: Pose) -> np.ndarray:
    """``geometry_msgs/Pose`` → ``(x, y, yaw)``; :class:`PoseInputError` on NaN or a zero quaternion."""
    q = np.array([pose.orientation.x, pose.orientation.y, pose.orientation.z, pose.orientation.w])
    xy = np.array([pose.position.x, pose.position.y])
    if not (np.isfinite(q).all() and np.isfinite(xy).all()):
        raise PoseInputError("pose contains NaN or inf")
    big = float(np.abs(q).max())
    if big < 1e-9:
        raise PoseInputError("pose has a zero quaternion")
    q = q / big  # scale first: the norm of a huge but finite quaternion would overflow
    return np.array([xy[0], xy[1], float(quaternion_to_yaw(q / np.linalg.norm(q)))])


def xyyaw_to_pose(p: np.ndarray) -> Pose:
    pose = Pose()
    pose.position.x, pose.position.y, pose.position.z = float(p[0]), float(p[1]), 0.0
    x, y, z, w = (float(v) for v in yaw_to_quaternion(np.asarray(p[2], dtype=np.float64)))
    pose.orientation = Quaternion(x=x, y=y, z=z, w=w)
    return pose


def cov3_to_cov6(cov3: np.ndarray) -> list[float]:
    """3×3 ``(x, y, yaw)`` covariance → row-major 6×6 of ``PoseWithCovariance`` (z, roll, pitch zero)."""
    cov3 = np.asarray(cov3, dtype=np.float64).reshape(3, 3)
    out = np.zeros((6, 6))
    for i, a in enumerate(_COV_IDX):
        for j, b in enumerate(_COV_IDX):
            out[a, b] = cov3[i, j]
    return [float(v) for v in out.ravel()]


def cov6_to_cov3(cov6: object) -> np.ndarray:
    c = np.asarray(cov6, dtype=np.float64).reshape(6, 6)
    return c[np.ix_(_COV_IDX, _COV_IDX)].copy()


def pose_with_cov_msg(
    mean: np.ndarray, cov3: np.ndarray, *, stamp: Time, frame_id: str
) -> PoseWithCovarianceStamped:
    msg = PoseWithCovarianceStamped()
    msg.header.stamp = stamp
    msg.header.frame_id = frame_id
    msg.pose.pose = xyyaw_to_pose(mean)
    msg.pose.covariance = cov3_to_cov6(cov3)
    return msg


# ---- maps ----------------------------------------------------------------------------------
def view_map_to_pointcloud(view_map: ViewMap, *, stamp: Time) -> PointCloud2:
    """Pack a map into the layout of the module docstring."""
    n = len(view_map)
    d = int(np.prod(view_map.embed_shape))
    dtype = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("yaw", "<f4"), ("e", "<f4", (d,))])
    rec = np.zeros(n, dtype=dtype)
    rec["x"], rec["y"], rec["yaw"] = view_map.poses[:, 0], view_map.poses[:, 1], view_map.poses[:, 2]
    rec["e"] = view_map.embeddings.reshape(n, d)
    msg = PointCloud2()
    msg.header.stamp = stamp
    msg.header.frame_id = view_map.frame_id
    msg.height, msg.width = 1, n
    msg.fields = [
        PointField(name="x", offset=0, datatype=PointField.FLOAT32, count=1),
        PointField(name="y", offset=4, datatype=PointField.FLOAT32, count=1),
        PointField(name="z", offset=8, datatype=PointField.FLOAT32, count=1),
        PointField(name="yaw", offset=12, datatype=PointField.FLOAT32, count=1),
        PointField(
            name=EMB_FIELD_PREFIX + view_map.fingerprint, offset=16, datatype=PointField.FLOAT32, count=d
        ),
    ]
    msg.is_bigendian = False
    msg.point_step = 16 + 4 * d
    msg.row_step = msg.point_step * n
    msg.is_dense = True
    msg.data = rec.tobytes()
    return msg


def map_info_json(view_map: ViewMap) -> str:
    """The companion ``dmn_map_info`` payload: fingerprint, scale, shape and the stable view ids."""
    return json.dumps(
        {
            "fingerprint": view_map.fingerprint,
            "meters_per_unit": view_map.meters_per_unit,
            "embed_shape": list(view_map.embed_shape),
            "frame_id": view_map.frame_id,
            "num_views": len(view_map),
            "ids": view_map.ids,
        }
    )


def pointcloud_to_view_map(
    msg: PointCloud2,
    *,
    fingerprint: str,
    embed_shape: tuple[int, int, int],
    meters_per_unit: float,
    ids: list[str] | None = None,
) -> ViewMap:
    """Unpack a map cloud for the model with ``fingerprint``; :class:`FingerprintMismatchError` if foreign."""
    fields = {f.name: f for f in msg.fields}
    emb_fields = [f for f in msg.fields if f.name.startswith(EMB_FIELD_PREFIX)]
    if msg.is_bigendian:
        raise MapError("big-endian map clouds are not supported")
    if len(emb_fields) != 1 or not all(k in fields for k in ("x", "y", "yaw")):
        raise MapError(f"map cloud lacks x/y/yaw/{EMB_FIELD_PREFIX}<fingerprint> fields: {sorted(fields)}")
    ef = emb_fields[0]
    their_fp = ef.name[len(EMB_FIELD_PREFIX) :]
    if their_fp != fingerprint:
        raise FingerprintMismatchError(
            f"map cloud was embedded by model {their_fp}, but the loaded model is {fingerprint}"
        )
    d = int(np.prod(embed_shape))
    if ef.count != d or ef.datatype != PointField.FLOAT32:
        raise MapError(f"embedding field has count {ef.count} (type {ef.datatype}), expected {d} float32")
    n = int(msg.width) * int(msg.height)
    step = int(msg.point_step)
    raw = np.frombuffer(bytes(msg.data), dtype=np.uint8)
    if raw.size != n * step:
        raise MapError(f"map cloud has {raw.size} bytes, expected {n} × {step}")
    for f in (fields["x"], fields["y"], fields["yaw"]):
        if f.datatype != PointField.FLOAT32 or f.offset + 4 > step:
            raise MapError(f"map cloud field {f.name} is not a float32 inside the point")
    if ef.offset + 4 * d > step:
        raise MapError("embedding field runs past point_step")
    rows = raw.reshape(n, step)

    def col(f: PointField, count: int = 1) -> np.ndarray:
        return rows[:, f.offset : f.offset + 4 * count].copy().view("<f4").reshape(n, count)

    poses = np.concatenate([col(fields["x"]), col(fields["y"]), col(fields["yaw"])], axis=1)
    poses = poses.astype(np.float64)
    emb = col(ef, d).reshape(n, *embed_shape)
    out = ViewMap(fingerprint=fingerprint, meters_per_unit=meters_per_unit, embed_shape=embed_shape,
                  frame_id=msg.header.frame_id or "map")
    if ids is None or len(ids) != n:
        ids = [f"view/{i:06d}" for i in range(n)]
    if n:
        out.add(embeddings=emb, poses=poses, ids=ids)
    return out


# ---- shared contexts (multi-robot) ---------------------------------------------------------
# ``sensor_msgs/PointCloud2`` on the shared topic, one point per context view, little-endian,
# dense, ``height = 1``, ``header.frame_id`` = the shared global frame:
#
# | field | offset | datatype | count | meaning |
# |---|---|---|---|---|
# | ``id`` | 0 | UINT8 | 32 | stable id ``<robot_id>/<seq>``, UTF-8, NUL-padded |
# | ``x``, ``y``, ``yaw`` | 32, 40, 48 | FLOAT64 | 1 | view pose (m, m, rad); float64: same bits everywhere |
# | ``emb_<fingerprint>`` | 56 | FLOAT32 | D·h·w | embedding, as on ``dmn_map`` (embeddings format) |
# | ``rgb8_<H>x<W>`` | 56 | UINT8 | H·W·3 | row-major RGB image (images format) |
#
# Exactly one payload field. ``point_step = 56 + payload bytes``.
SHARED_HEAD = 56
RGB_FIELD_PREFIX = "rgb8_"


def shared_batch_to_pointcloud(batch: ContextBatch, *, stamp: Time) -> PointCloud2:
    """Pack a :class:`~dmn_ros.sharing.ContextBatch` in the shared-context layout above."""
    n = len(batch)
    if batch.embeddings is not None:
        payload = np.ascontiguousarray(batch.embeddings, dtype="<f4").reshape(n, -1)
        name, dtype_id, item = EMB_FIELD_PREFIX + str(batch.fingerprint), PointField.FLOAT32, "<f4"
    elif batch.images is not None:
        h, w = batch.images.shape[1:3]
        payload = np.ascontiguousarray(batch.images, dtype=np.uint8).reshape(n, -1)
        name, dtype_id, item = f"{RGB_FIELD_PREFIX}{h}x{w}", PointField.UINT8, "u1"
    else:
        raise SharedContextError("a shared batch needs embeddings or images")
    count = payload.shape[1] if n else (int(np.prod(batch.embeddings.shape[1:])) if batch.embeddings is not None
                                        else int(np.prod(batch.images.shape[1:])))  # type: ignore[union-attr]
    dtype = np.dtype([("id", "u1", (MAX_ID_BYTES,)), ("x", "<f8"), ("y", "<f8"), ("yaw", "<f8"),
                      ("p", item, (count,))])
    rec = np.zeros(n, dtype=dtype)
    for i, vid in enumerate(batch.ids):
        raw = vid.encode()
        if len(raw) > MAX_ID_BYTES:
            raise SharedContextError(f"id {vid!r} is longer than {MAX_ID_BYTES} bytes")
        rec["id"][i, : len(raw)] = np.frombuffer(raw, dtype=np.uint8)
    poses = np.asarray(batch.poses, dtype=np.float64).reshape(n, 3)
    rec["x"], rec["y"], rec["yaw"] = poses[:, 0], poses[:, 1], poses[:, 2]
    if n:
        rec["p"] = payload
    msg = PointCloud2()
    msg.header.stamp = stamp
    msg.header.frame_id = batch.frame_id
    msg.height, msg.width = 1, n
    msg.fields = [
        PointField(name="id", offset=0, datatype=PointField.UINT8, count=MAX_ID_BYTES),
        PointField(name="x", offset=32, datatype=PointField.FLOAT64, count=1),
        PointField(name="y", offset=40, datatype=PointField.FLOAT64, count=1),
        PointField(name="yaw", offset=48, datatype=PointField.FLOAT64, count=1),
        PointField(name=name, offset=SHARED_HEAD, datatype=dtype_id, count=count),
    ]
    msg.is_bigendian = False
    msg.point_step = dtype.itemsize
    msg.row_step = msg.point_step * n
    msg.is_dense = True
    msg.data = rec.tobytes()
    return msg


def pointcloud_to_shared_batch(msg: PointCloud2, *, embed_shape: tuple[int, int, int]) -> ContextBatch:
    """Unpack a shared-context cloud; :class:`SharedContextError` if its layout is not the one above.

    Model checks (fingerprint, image size, finiteness, ids) are left to
    :meth:`dmn_ros.sharing.ContextLedger.screen`, which counts them. An embedding
    field whose count is not ``D·h·w`` of ``embed_shape`` is returned flat as ``(n, 1, 1, count)``
    so that the ledger rejects it as a shape mismatch.
    """
    fields = {f.name: f for f in msg.fields}
    expect = {"id": (0, PointField.UINT8, MAX_ID_BYTES), "x": (32, PointField.FLOAT64, 1),
              "y": (40, PointField.FLOAT64, 1), "yaw": (48, PointField.FLOAT64, 1)}
    for name, (off, dt, cnt) in expect.items():
        f = fields.get(name)
        if f is None or (f.offset, f.datatype, f.count) != (off, dt, cnt):
            raise SharedContextError(f"shared-context cloud lacks field {name} at offset {off}")
    payload = [f for f in msg.fields if f.name.startswith((EMB_FIELD_PREFIX, RGB_FIELD_PREFIX))]
    if msg.is_bigendian or len(payload) != 1 or payload[0].offset != SHARED_HEAD:
        raise SharedContextError("shared-context cloud needs one little-endian emb_<fp> or rgb8_<H>x<W> field at 56")
    pf = payload[0]
    n = int(msg.width) * int(msg.height)
    step = int(msg.point_step)
    item = 4 if pf.datatype == PointField.FLOAT32 else 1
    if step != SHARED_HEAD + item * int(pf.count):
        raise SharedContextError(f"point_step {step} does not match field {pf.name} × {pf.count}")
    raw = np.frombuffer(bytes(msg.data), dtype=np.uint8)
    if raw.size != n * step:
        raise SharedContextError(f"shared-context cloud has {raw.size} bytes, expected {n} × {step}")
    rows = raw.reshape(n, step)
    ids = []
    for r in rows[:, :MAX_ID_BYTES]:
        try:
            ids.append(r.tobytes().rstrip(b"\0").decode())
        except UnicodeDecodeError:
            ids.append("")  # rejected as a bad id
    poses = rows[:, 32:SHARED_HEAD].copy().view("<f8").reshape(n, 3).astype(np.float64)
    body = rows[:, SHARED_HEAD:].copy()
    batch = ContextBatch(frame_id=msg.header.frame_id, ids=ids, poses=poses)
    if pf.name.startswith(EMB_FIELD_PREFIX):
        if pf.datatype != PointField.FLOAT32:
            raise SharedContextError(f"embedding field {pf.name} is not FLOAT32")
        emb = body.view("<f4").reshape(n, int(pf.count)).astype(np.float32)
        d = int(np.prod(embed_shape))
        batch.embeddings = emb.reshape(n, *embed_shape) if pf.count == d else emb.reshape(n, 1, 1, int(pf.count))
        batch.fingerprint = pf.name[len(EMB_FIELD_PREFIX) :]
    else:
        size = pf.name[len(RGB_FIELD_PREFIX) :].split("x")
        try:
            h, w = int(size[0]), int(size[1])
        except (ValueError, IndexError) as exc:
            raise SharedContextError(f"image field {pf.name} is not rgb8_<H>x<W>") from exc
        if h <= 0 or w <= 0 or pf.datatype != PointField.UINT8 or pf.count != h * w * 3:
            raise SharedContextError(f"image field {pf.name} has count {pf.count}, expected {h * w * 3} UINT8")
        batch.images = body.reshape(n, h, w, 3)
    return batch
