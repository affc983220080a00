"""dmn-bag-record: synthetic-world episodes written as rosbag2 recordings (mcap by default, or sqlite3).

A bag holds what a robot would record: camera frames, (optionally noisy) odometry
``odom → base_link`` as ``nav_msgs/Odometry`` and on ``/tf``, the ground-truth pose
(``PoseStamped``, map frame) and context image-pose pairs on the mapping node's topics.
Contexts come first (stamped before the drive), so a player can build the map before
the first query frame. These bags are the bag tools' test fixtures and the quickest way
to try them.

With ``kidnap_at_step = N`` the robot is teleported at frame N to a random free pose more than
``kidnap_min_distance_m`` away (the rule of ``sim_node``'s ``kidnap_at_step``): the ground truth jumps,
the odometry reports no motion for that frame. The bag's ``metadata.yaml`` ``custom_data`` records it
(``dmn_ros.kidnap_at_step``, ``dmn_ros.kidnap_stamp``) for ``dmn-bag-eval``'s time to recover.
"""

from __future__ import annotations

import argparse
import enum
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dmn_ros.bags.errors import BagError
from dmn_ros.bags.topics import TopicNames
from dmn_ros.data.dataset_format import SPLIT_SEED_OFFSETS
from dmn_ros.errors import console_main
from dmn_ros.geometry import compose, relative, wrap_angle, yaw_to_quaternion
from dmn_ros.images import encode_raw

__all__ = ["KIDNAP_AT_STEP_KEY", "KIDNAP_STAMP_KEY", "RecordConfig", "Storage", "main", "record_bag", "typestore"]

TEST_SEED = SPLIT_SEED_OFFSETS["test"]
"""First test-split world seed (unseen in training)."""
KIDNAP_STAMP_KEY = "dmn_ros.kidnap_stamp"
"""``custom_data`` key: header stamp (s) of the first camera frame after the teleport. A stamp, not a frame
index, so it stays right when frames are skipped or a cut bag loses some."""
KIDNAP_AT_STEP_KEY = "dmn_ros.kidnap_at_step"
"""``custom_data`` key: the kidnapped frame, 1-based (informational; evaluation uses the stamp)."""


class Storage(enum.Enum):
    """rosbag2 storage plugins the recorder writes."""

    MCAP = "mcap"
    SQLITE3 = "sqlite3"


def typestore() -> Any:
    """The newest ROS 2 typestore rosbags ships (Kilted here), falling back to the latest it knows."""
    from rosbags.typesys import Stores, get_typestore

    for name in ("ROS2_KILTED", "ROS2_JAZZY", "LATEST"):
        if hasattr(Stores, name):
            return get_typestore(getattr(Stores, name))
    raise BagError("rosbags offers no ROS 2 typestore")  # pragma: no cover


@dataclass(frozen=True)
class RecordConfig:
    """One recorded episode."""

    domain: str = "maze"
    world_seed: int = TEST_SEED
    steps: int = 30
    """Camera frames along the smooth trajectory."""
    rate_hz: float = 2.0
    """Camera/odometry rate; stamps are ``start_time + k / rate_hz``."""
    num_contexts: int = 16
    contexts_from: str = "free_space"
    """``free_space`` (random free poses) or ``trajectory`` (poses along a second drive)."""
    image_size: int = 32
    compressed: bool = False
    """Write ``CompressedImage`` (PNG) on ``<topic>/compressed`` instead of raw ``Image``."""
    encoding: str = "rgb8"
    odom_noise_xy: float = 0.0
    """σ of the per-step odometry translation noise, meters (0: exact odometry)."""
    odom_noise_yaw: float = 0.0
    """σ of the per-step odometry rotation noise, radians."""
    odom_per_frame: int = 2
    """Odometry messages per camera frame (≥ 1); those between frames are interpolated along the path."""
    start_time: float = 1000.0
    """Stamp of the first context (s); the drive starts ``context_lead_s`` later."""
    context_lead_s: float = 2.0
    seed: int | None = None
    """Trajectory/noise RNG seed (default: the world seed)."""
    storage: Storage = Storage.MCAP
    kidnap_at_step: int = 0
    """Teleport the robot at this frame (1-based, ≥ 2); 0: never."""
    kidnap_min_distance_m: float = 15.0
    """Least x-y distance of the teleport (:data:`dmn_ros.worlds.KIDNAP_MIN_DISTANCE_M`)."""


def _qos(*, depth: int, reliable: bool, transient_local: bool = False) -> Any:
    from rosbags.rosbag2.metadata import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime

    zero = QosTime(sec=0, nsec=0)
    return Qos(
        history=QosHistory.KEEP_LAST,
        depth=depth,
        reliability=QosReliability.RELIABLE if reliable else QosReliability.BEST_EFFORT,
        durability=QosDurability.TRANSIENT_LOCAL if transient_local else QosDurability.VOLATILE,
        deadline=zero,
        lifespan=zero,
        liveliness=QosLiveliness.AUTOMATIC,
        liveliness_lease_duration=zero,
        avoid_ros_namespace_conventions=False,
    )


class _Msgs:
    """Builds typestore messages (rosbags dataclasses) for the recorder."""

    def __init__(self, ts: Any) -> None:
        self.ts = ts
        self.t = ts.types

    def header(self, stamp: float, frame_id: str) -> Any:
        sec = math.floor(stamp)
        nsec = min(round((stamp - sec) * 1e9), 999_999_999)
        return self.t["std_msgs/msg/Header"](
            stamp=self.t["builtin_interfaces/msg/Time"](sec=int(sec), nanosec=int(nsec)), frame_id=frame_id
        )

    def pose(self, p: np.ndarray) -> Any:
        q = yaw_to_quaternion(np.float64(p[2]))
        return self.t["geometry_msgs/msg/Pose"](
            position=self.t["geometry_msgs/msg/Point"](x=float(p[0]), y=float(p[1]), z=0.0),
            orientation=self.t["geometry_msgs/msg/Quaternion"](x=float(q[0]), y=float(q[1]), z=float(q[2]),
                                                             w=float(q[3])),
        )

    def pose_stamped(self, p: np.ndarray, stamp: float, frame: str) -> Any:
        return self.t["geometry_msgs/msg/PoseStamped"](header=self.header(stamp, frame), pose=self.pose(p))

    def image(self, rgb: np.ndarray, stamp: float, frame: str, encoding: str) -> Any:
        h, w, step, data = encode_raw(rgb, encoding)
        return self.t["sensor_msgs/msg/Image"](
            header=self.header(stamp, frame), height=h, width=w, encoding=encoding, is_bigendian=0, step=step,
            data=np.frombuffer(bytes(data), dtype=np.uint8),
        )

    def compressed(self, rgb: np.ndarray, stamp: float, frame: str) -> Any:
        import cv2

        ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))
        if not ok:  # pragma: no cover
            raise BagError("PNG encoding failed")
        return self.t["sensor_msgs/msg/CompressedImage"](
            header=self.header(stamp, frame), format="rgb8; png compressed bgr8",
            data=np.asarray(buf, dtype=np.uint8).ravel(),
        )

    def odometry(self, p: np.ndarray, twist: np.ndarray, stamp: float, cov_xy: float, cov_yaw: float) -> Any:
        cov = np.zeros(36)
        cov[0] = cov[7] = max(cov_xy, 1e-6)
        cov[35] = max(cov_yaw, 1e-6)
        pwc = self.t["geometry_msgs/msg/PoseWithCovariance"](pose=self.pose(p), covariance=cov)
        v3 = self.t["geometry_msgs/msg/Vector3"]
        tw = self.t["geometry_msgs/msg/Twist"](linear=v3(x=float(twist[0]), y=float(twist[1]), z=0.0),
                                               angular=v3(x=0.0, y=0.0, z=float(twist[2])))
        twc = self.t["geometry_msgs/msg/TwistWithCovariance"](twist=tw, covariance=np.zeros(36))
        return self.t["nav_msgs/msg/Odometry"](header=self.header(stamp, "odom"), child_frame_id="base_link",
                                               pose=pwc, twist=twc)

    def tf(self, p: np.ndarray, stamp: float) -> Any:
        q = yaw_to_quaternion(np.float64(p[2]))
        tr = self.t["geometry_msgs/msg/Transform"](
            translation=self.t["geometry_msgs/msg/Vector3"](x=float(p[0]), y=float(p[1]), z=0.0),
            rotation=self.t["geometry_msgs/msg/Quaternion"](x=float(q[0]), y=float(q[1]), z=float(q[2]),
                                                          w=float(q[3])),
        )
        ts = self.t["geometry_msgs/msg/TransformStamped"](header=self.header(stamp, "odom"),
                                                          child_frame_id="base_link", transform=tr)
        return self.t["tf2_msgs/msg/TFMessage"](transforms=[ts])


def _interp(p0: np.ndarray, p1: np.ndarray, a: float) -> np.ndarray:
    return np.array([p0[0] + a * (p1[0] - p0[0]), p0[1] + a * (p1[1] - p0[1]),
                     wrap_angle(p0[2] + a * wrap_angle(p1[2] - p0[2]))])


def record_bag(path: str | Path, config: RecordConfig | None = None, *,
               topics: TopicNames | None = None) -> dict[str, Any]:
    """Render one episode and write it as a rosbag2 directory at ``path`` (must not exist).

    Returns a description (world, counts, area). The writer is a context manager, so
    ``metadata.yaml`` is written on success; on failure the partial bag is removed.
    """
    from rosbags.rosbag2 import StoragePlugin, Writer

    from dmn_ros.worlds import kidnapped_trajectory, make_world, smooth_trajectory

    path = Path(path)
    if path.exists():
        raise BagError(f"{path}: already exists; choose a new bag directory", path=path)
    c = config or RecordConfig()
    kidnap = c.kidnap_at_step - 1 if c.kidnap_at_step else None  # 0-based index of the first frame at the new pose
    if kidnap is not None and not 1 <= kidnap < c.steps:
        raise BagError(f"kidnap_at_step must be in 2..{c.steps} (a frame after the first), got {c.kidnap_at_step}")
    topics = (topics or TopicNames()).normalized()
    rng = np.random.default_rng(c.world_seed if c.seed is None else c.seed)
    with make_world(c.domain, seed=c.world_seed, image_size=(c.image_size, c.image_size)) as world:
        truth = smooth_trajectory(world, rng, steps=c.steps)
        if c.contexts_from == "trajectory":
            drive = smooth_trajectory(world, rng, steps=max(4 * c.num_contexts, 8))
            ctx_poses = drive[np.linspace(0, len(drive) - 1, c.num_contexts).round().astype(int)]
        elif c.contexts_from == "free_space":
            ctx_poses = world.sample_free_poses(c.num_contexts, rng)
        else:
            raise BagError(f"contexts_from must be free_space or trajectory, got {c.contexts_from!r}")
        if kidnap is not None:  # drawn after the contexts: the same world and contexts as without the kidnapping
            truth[kidnap:] = kidnapped_trajectory(world, rng, truth[kidnap - 1], steps=c.steps - kidnap,
                                                  min_distance_m=c.kidnap_min_distance_m)
        ctx_images = world.render(ctx_poses) if c.num_contexts else np.zeros((0, c.image_size, c.image_size, 3))
        images = world.render(truth)
        area, bounds = float(world.area_size_m), tuple(float(b) for b in world.bounds)

    # Odometry: starts at the origin, integrates (noisy) egomotion (SPEC: Δ_t = relative(s_{t-1}, s_t)).
    odom = np.zeros((c.steps, 3))
    for k in range(1, c.steps):
        if k == kidnap:  # a kidnapped robot's odometry feels nothing
            odom[k] = odom[k - 1]
            continue
        d = relative(truth[k - 1], truth[k])
        d[:2] += rng.normal(0.0, c.odom_noise_xy, size=2) if c.odom_noise_xy > 0 else 0.0
        d[2] = wrap_angle(d[2] + (rng.normal(0.0, c.odom_noise_yaw) if c.odom_noise_yaw > 0 else 0.0))
        odom[k] = compose(odom[k - 1], d)

    ts = typestore()
    m = _Msgs(ts)
    storage = StoragePlugin.MCAP if c.storage == Storage.MCAP else StoragePlugin.SQLITE3
    sensor_qos = [_qos(depth=10, reliable=True)]
    ctx_qos = [_qos(depth=100, reliable=True)]
    img_type = "sensor_msgs/msg/CompressedImage" if c.compressed else "sensor_msgs/msg/Image"
    cam_topic = topics.camera + ("/compressed" if c.compressed else "")
    ctx_topic = topics.context_image + ("/compressed" if c.compressed else "")
    t_drive = c.start_time + c.context_lead_s
    dt = 1.0 / c.rate_hz
    n_odom = max(int(c.odom_per_frame), 1)
    try:
        with Writer(path, version=9, storage_plugin=storage) as w:
            conn = {
                "cam": w.add_connection(cam_topic, img_type, typestore=ts, offered_qos_profiles=sensor_qos),
                "odom": w.add_connection(topics.odom, "nav_msgs/msg/Odometry", typestore=ts,
                                         offered_qos_profiles=sensor_qos),
                "gt": w.add_connection(topics.ground_truth, "geometry_msgs/msg/PoseStamped", typestore=ts,
                                       offered_qos_profiles=sensor_qos),
                "tf": w.add_connection(topics.tf, "tf2_msgs/msg/TFMessage", typestore=ts,
                                       offered_qos_profiles=[_qos(depth=100, reliable=True)]),
            }
            if c.num_contexts:
                conn["ctx_img"] = w.add_connection(ctx_topic, img_type, typestore=ts, offered_qos_profiles=ctx_qos)
                conn["ctx_pose"] = w.add_connection(topics.context_pose, "geometry_msgs/msg/PoseStamped",
                                                    typestore=ts, offered_qos_profiles=ctx_qos)
            w.set_custom_data("dmn_ros.world", f"{c.domain}_{c.world_seed:08d}")
            w.set_custom_data("dmn_ros.area_size_m", repr(area))
            w.set_custom_data("dmn_ros.bounds", ",".join(repr(b) for b in bounds))
            if kidnap is not None:
                w.set_custom_data(KIDNAP_AT_STEP_KEY, str(c.kidnap_at_step))
                w.set_custom_data(KIDNAP_STAMP_KEY, repr(t_drive + kidnap * dt))

            def put(key: str, msg: Any, msgtype: str, stamp: float) -> None:
                w.write(conn[key], round(stamp * 1e9), ts.serialize_cdr(msg, msgtype))

            def img_msg(rgb: np.ndarray, stamp: float) -> Any:
                if c.compressed:
                    return m.compressed(rgb, stamp, "camera")
                return m.image(rgb, stamp, "camera", c.encoding)

            for i in range(c.num_contexts):
                s = c.start_time + 0.05 * i
                put("ctx_pose", m.pose_stamped(ctx_poses[i], s, "map"), "geometry_msgs/msg/PoseStamped", s)
                put("ctx_img", img_msg(ctx_images[i], s), img_type, s)
            for k in range(c.steps):
                s = t_drive + k * dt
                # Odometry (and /tf) at the frame stamp and n_odom-1 interpolated stamps before the next one,
                # written before the frame so a live localizer always has odometry covering the frame's stamp.
                for j in range(n_odom if k < c.steps - 1 else 1):
                    a = j / n_odom
                    p = odom[k] if j == 0 else _interp(odom[k], odom[k + 1], a)
                    so = s + a * dt
                    nxt = odom[min(k + 1, c.steps - 1)]
                    d = relative(odom[k], nxt) / dt if k < c.steps - 1 else np.zeros(3)
                    put("odom", m.odometry(p, d, so, c.odom_noise_xy**2, c.odom_noise_yaw**2),
                        "nav_msgs/msg/Odometry", so)
                    put("tf", m.tf(p, so), "tf2_msgs/msg/TFMessage", so)
                    if j == 0:
                        put("gt", m.pose_stamped(truth[k], s, "map"), "geometry_msgs/msg/PoseStamped", s)
                        put("cam", img_msg(images[k], s), img_type, s)
    except BaseException:
        import shutil

        shutil.rmtree(path, ignore_errors=True)
        raise
    return {
        "path": str(path), "world": f"{c.domain}_{c.world_seed:08d}", "frames": c.steps,
        "contexts": c.num_contexts, "area_size_m": area, "storage": c.storage.value,
        "image_type": img_type, "duration_s": (c.steps - 1) * dt,
        "kidnap_at_step": c.kidnap_at_step or None,
        "kidnap_stamp": None if kidnap is None else t_drive + kidnap * dt,
        "kidnap_distance_m": None if kidnap is None else float(np.hypot(*(truth[kidnap, :2] - truth[kidnap - 1, :2]))),
    }


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dmn-bag-record", description=__doc__.splitlines()[0])
    ap.add_argument("out", help="bag directory to create (or parent directory with --episodes > 1)")
    ap.add_argument("--episodes", type=int, default=1, help="episodes (bags) to write, worlds seed, seed+1, ...")
    ap.add_argument("--storage", choices=[s.value for s in Storage], default="mcap")
    ap.add_argument("--domain", default="maze", choices=["maze", "rooms"])
    ap.add_argument("--world-seed", type=int, default=TEST_SEED, help="first world seed (test split: 20000000+)")
    ap.add_argument("--steps", type=int, default=30, help="camera frames per episode")
    ap.add_argument("--rate", type=float, default=2.0, help="camera rate, Hz")
    ap.add_argument("--contexts", type=int, default=16, help="context image-pose pairs")
    ap.add_argument("--contexts-from", choices=["free_space", "trajectory"], default="free_space")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--compressed", action="store_true", help="CompressedImage (PNG) instead of Image")
    ap.add_argument("--odom-noise-xy", type=float, default=0.0, help="odometry noise σ per step, meters")
    ap.add_argument("--odom-noise-yaw", type=float, default=0.0, help="odometry noise σ per step, radians")
    ap.add_argument("--seed", type=int, default=None, help="trajectory/noise seed (default: world seed)")
    ap.add_argument("--kidnap-at-step", type=int, default=0,
                    help="teleport the robot at this frame (1-based, >= 2) to a random free pose, odometry unaware; "
                         "0: never")
    ap.add_argument("--kidnap-min-distance", type=float, default=15.0, help="least teleport distance, meters")
    return ap


@console_main("dmn-bag-record")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    for e in range(args.episodes):
        cfg = RecordConfig(
            domain=args.domain, world_seed=args.world_seed + e, steps=args.steps, rate_hz=args.rate,
            num_contexts=args.contexts, contexts_from=args.contexts_from, image_size=args.image_size,
            compressed=args.compressed, odom_noise_xy=args.odom_noise_xy, odom_noise_yaw=args.odom_noise_yaw,
            seed=None if args.seed is None else args.seed + e, storage=Storage(args.storage),
            kidnap_at_step=args.kidnap_at_step, kidnap_min_distance_m=args.kidnap_min_distance,
        )
        target = out if args.episodes == 1 else out / f"{args.domain}_{cfg.world_seed:08d}"
        desc = record_bag(target, cfg)
        kid = (f", kidnapped at frame {desc['kidnap_at_step']} ({desc['kidnap_distance_m']:.1f} m)"
               if desc["kidnap_at_step"] else "")
        print(f"wrote {desc['path']}: {desc['frames']} frames, {desc['contexts']} contexts, "
              f"{desc['storage']}, world {desc['world']}{kid}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
