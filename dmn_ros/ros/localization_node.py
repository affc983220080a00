"""localization_node: DMN particle filter on camera frames, nav2_amcl-style interface.

Inputs: ``image_topic`` (newest frame whose odometry has arrived; older unprocessed frames
are dropped and counted), ``odom_topic`` (interpolated at image stamps for egomotion),
``initialpose``, the map (``map_topic`` + ``map_info_topic``). Outputs: ``dmn_pose``
(PoseWithCovarianceStamped, reliable + transient_local, depth 1, stamped with the
image stamp), ``particle_cloud`` (PoseArray, best effort), ``dmn_markers``
(MarkerArray of the particles), ``dmn_context_markers`` (MarkerArray of the map's
contexts, reliable + transient_local, depth 1, so a later RViz still gets them), map→odom
TF when tf2_ros is importable (stamps never go backwards). Nothing is published before a
map exists and the filter is initialized. Bad inputs are logged, counted and dropped.
The filter's health (ESS, likelihood averages, spreads, converged / lost) goes to
``/diagnostics`` (DiagnosticArray) after every update and every ``diagnostics_period``
seconds, ERROR while there is no map or no belief (docs/health.md).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from builtin_interfaces.msg import Time as BuiltinTime
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import Point, PoseArray, PoseWithCovarianceStamped, TransformStamped
from nav_msgs.msg import Odometry
from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image, PointCloud2
from std_msgs.msg import ColorRGBA, String
from std_srvs.srv import Empty
from visualization_msgs.msg import Marker, MarkerArray

from dmn_ros.errors import DmnError, FingerprintMismatchError, MapError
from dmn_ros.export import LoadedModel, atomic_write_bytes, default_model_path, load_model, training_domain
from dmn_ros.filter import HealthConfig, HealthLevel
from dmn_ros.geometry import relative, yaw_to_quaternion
from dmn_ros.localizer import Estimate, Localizer, LocalizerConfig, resolve_device
from dmn_ros.ros import params
from dmn_ros.ros.conversions import (
    PoseInputError,
    compressed_msg_to_rgb,
    cov6_to_cov3,
    image_msg_to_rgb,
    pointcloud_to_view_map,
    pose_to_xyyaw,
    pose_with_cov_msg,
    sec_to_stamp,
    stamp_to_sec,
    xyyaw_to_pose,
)
from dmn_ros.ros.mapping_node import MAP_QOS
from dmn_ros.ros.transforms import OdometryBuffer, map_to_odom

POSE_FORMAT = "dmn_ros.pose/1"
"""Value of the ``format`` key in a saved-pose file (``pose_file``)."""
NOT_DROPS = ("frames", "processed", "odom_jumps", "time_resets")
"""Counters that are not dropped inputs (the rest add up to ``dropped`` on /diagnostics)."""

POSE_QOS = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
PARTICLE_QOS = QoSProfile(depth=1, reliability=ReliabilityPolicy.BEST_EFFORT)
ODOM_QOS = QoSProfile(depth=100, reliability=ReliabilityPolicy.BEST_EFFORT)
CONTEXT_MARKER_QOS = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                                durability=DurabilityPolicy.TRANSIENT_LOCAL)
"""``dmn_context_markers``: latched, as the map they show (sent once per map)."""
MAX_WAITING_FRAMES = 8
"""Frames held at most while odometry for the newest ones is still on its way (the oldest beyond are dropped)."""

try:  # tf2_ros is optional: pip-installed ROS here has no tf2_ros wheel
    from tf2_ros import TransformBroadcaster  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the installation
    TransformBroadcaster = None


def weight_colors(weights: np.ndarray) -> list[ColorRGBA]:
    """Blue (low) → red (high) by weight relative to the largest."""
    w = np.asarray(weights, dtype=np.float64)
    r = w / max(float(w.max()), 1e-300) if w.size else w
    return [ColorRGBA(r=float(v), g=0.2, b=float(1.0 - v), a=0.9) for v in r]


class LocalizationNode(Node):
    """One robot's localizer; see the module docstring for its interface."""

    def __init__(self, *, model: LoadedModel | None = None, **kwargs: Any) -> None:
        super().__init__("localization_node", **kwargs)
        self.p = params.declare(self, params.LOCALIZATION)
        p = self.p
        self.model = model or load_model(p["model_path"] or default_model_path(), device=resolve_device(p["device"]))
        cfg = LocalizerConfig(
            max_particles=int(p["max_particles"]),
            tracking_particles=int(p["tracking_particles"]),
            adaptive_particles=bool(p["adaptive_particles"]),
            min_particles=int(p["min_particles"]),
            pf_err=float(p["pf_err"]),
            pf_z=float(p["pf_z"]),
            kld_bin_xy_m=float(p["kld_bin_xy"]),
            kld_bin_yaw_rad=float(p["kld_bin_yaw"]),
            nearest_contexts=int(p["nearest_contexts"]),
            device=str(p["device"]),
            covariance_inflation=float(p["covariance_inflation"]) or None,
        )
        self.localizer = Localizer(self.model, config=runtime_config(cfg, p), seed=int(p["random_seed"]))
        self.counters: dict[str, int] = {
            "frames": 0, "processed": 0, "dropped_newer_frame": 0, "dropped_not_ready": 0, "bad_images": 0,
            "out_of_order": 0, "no_odom": 0, "skipped_small_motion": 0, "bad_odom": 0, "bad_initialpose": 0,
            "bad_maps": 0, "step_errors": 0, "future_stamp": 0, "odom_jumps": 0, "time_resets": 0,
            "dropped_time_reset": 0, "bad_map_info": 0, "bad_odom_frame": 0, "odom_child_frame_mismatch": 0,
        }
        self._step_failed = False
        """Inputs used and dropped, by reason."""
        self.last_estimate: Estimate | None = None
        self.last_stamp: float | None = None
        """Image stamp of the last filter update (egomotion is measured from it)."""
        self._filter_lock = threading.RLock()
        """Held while the localizer (belief, map, filter settings) is used or changed, a whole filter step
        included. Taken before ``_lock`` when both are needed, never while holding ``_lock``."""
        self._lock = threading.RLock()
        """Inputs and bookkeeping (frames, odometry buffer, stamps, counters); held briefly, never for a step,
        so odometry and image callbacks run while the worker filters (spin.run_node's second thread)."""
        self._odom_epoch = 0
        """Bumped when the odometry buffer is replaced (odometry jump, time reset): a step that was running
        then does not re-anchor the egomotion of the next one."""
        self._frames: list[tuple[float, Any, float]] = []
        """Unprocessed frames ``(stamp, msg, arrival)``, oldest first: the newest usable one, then newer ones
        whose odometry has not arrived yet (see :meth:`_take_frame`)."""
        self._force_update = False
        """request_nomotion_update: the next new frame is filtered whatever its motion (nav2_amcl)."""
        self._pending_global = False
        self._map_ids: dict[int, list[str]] = {}
        self._last_map_to_odom: TransformStamped | None = None
        self._tf_sent: tuple[int, int] | None = None
        self._tf_clock_ns = -1
        """The last node-clock re-send after a time reset: it never anchors the updates' stamps."""
        """``(stamp, node clock)`` in ns of the last map→odom sent: later ones are stamped after it."""
        self._pose_epoch = 0
        """Bumped by every initial pose: a frame taken before it is not filtered with the motion computed then."""
        self.odom = OdometryBuffer(max_age_s=float(p["odom_buffer_s"]), tolerance_s=float(p["transform_tolerance"]))
        self._odom_seen = False
        self._last_odom: np.ndarray | None = None
        """Odometry pose the last update used (interpolated at its stamp, or the newest sample held when that
        frame was filtered before its odometry arrived): the next egomotion starts from it."""
        self._odom_reset = False
        """Odometry jumped or reset since the last update: the next update runs without motion."""
        self.pose_file = resolve_pose_file(p["pose_file"], self.get_namespace(), self.get_name())
        """Where the last estimate is saved (``save_pose_rate``) and read (``initialize_at_saved_pose``)."""
        self.pose_saves = 0
        self._saved_processed = -1
        self._save_lock = threading.Lock()
        """Serializes pose saves: a save that finds nothing new must not return while another is still writing."""

        self.pose_pub = self.create_publisher(PoseWithCovarianceStamped, "dmn_pose", POSE_QOS)
        self.cloud_pub = self.create_publisher(PoseArray, "particle_cloud", PARTICLE_QOS)
        self.marker_pub = self.create_publisher(MarkerArray, "dmn_markers", 1)
        self.context_marker_pub = self.create_publisher(MarkerArray, "dmn_context_markers", CONTEXT_MARKER_QOS)
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        sensors = MutuallyExclusiveCallbackGroup()
        if p["use_compressed"]:
            self.create_subscription(CompressedImage, p["image_topic"] + "/compressed", self._on_image,
                                     qos_profile_sensor_data, callback_group=sensors)
        else:
            self.create_subscription(Image, p["image_topic"], self._on_image, qos_profile_sensor_data,
                                     callback_group=sensors)
        self.create_subscription(Odometry, p["odom_topic"], self._on_odom, ODOM_QOS, callback_group=sensors)
        self.create_subscription(PoseWithCovarianceStamped, "initialpose", self._on_initialpose, 10,
                                 callback_group=sensors)
        self.create_subscription(PointCloud2, p["map_topic"], self._on_map, MAP_QOS, callback_group=sensors)
        self.create_subscription(String, p["map_info_topic"], self._on_map_info, MAP_QOS, callback_group=sensors)
        self.create_service(Empty, "reinitialize_global_localization", self._on_global, callback_group=sensors)
        self.create_service(Empty, "request_nomotion_update", self._on_nomotion, callback_group=sensors)
        self._work_timer = self.create_timer(1.0 / float(p["process_rate"]), self._work,
                                             callback_group=MutuallyExclusiveCallbackGroup())
        self._diag_timer = self._make_timer(float(p["diagnostics_period"]), self.publish_diagnostics)
        self._save_timer = self._make_timer(1.0 / float(p["save_pose_rate"]) if p["save_pose_rate"] > 0 else 0.0,
                                            self.save_pose)
        self.tf = None
        self._tf_broadcaster = None
        self._set_tf_broadcast(bool(p["tf_broadcast"]))
        self.add_on_set_parameters_callback(self._check_parameters)
        self.add_post_set_parameters_callback(self._apply_parameters)
        saved = self._read_saved_pose() if p["initialize_at_saved_pose"] else None
        if saved is not None:
            try:
                self._init_pose(*saved)
            except ValueError as exc:
                self.get_logger().error(f"saved pose ignored: {exc}")
        elif p["set_initial_pose"]:
            sxy, syaw = float(p["initial_pose.std_xy"]), float(p["initial_pose.std_yaw"])
            self._init_pose([p["initial_pose.x"], p["initial_pose.y"], p["initial_pose.yaw"]],
                            np.diag([sxy**2, sxy**2, syaw**2]))
        domain = training_domain(self.model.info) or "an unrecorded domain"
        self.get_logger().info(f"localizing with model {self.model.info.fingerprint} (trained on {domain}) "
                               f"on {self.localizer.device}")

    # ---- parameters -------------------------------------------------------------------------
    def _make_timer(self, period: float, callback: Any) -> Any:
        """A timer of ``period`` s in its own callback group, or None for period 0."""
        return self.create_timer(period, callback, callback_group=MutuallyExclusiveCallbackGroup()) if period else None

    def _set_tf_broadcast(self, on: bool) -> None:
        if on and self._tf_broadcaster is None and TransformBroadcaster is not None:
            self._tf_broadcaster = TransformBroadcaster(self)
        elif on and TransformBroadcaster is None:
            self.get_logger().warning("tf2_ros is not importable: map->odom is not broadcast")
        self.tf = self._tf_broadcaster if on else None

    def _check_parameters(self, changes: list[Any]) -> SetParametersResult:
        """Refuse (with the reason) changes of start-only parameters and values outside their ranges."""
        new, reason = params.check_update(self.p, params.LOCALIZATION, params.RUNTIME_LOCALIZATION, changes)
        if reason is None:
            try:
                runtime_config(self.localizer.config, {**self.p, **new})
            except ValueError as exc:
                reason = str(exc)
        if reason is not None:
            self.get_logger().warning(f"parameter change refused: {reason}")
        return SetParametersResult(successful=reason is None, reason=reason or "")

    def _apply_parameters(self, changes: list[Any]) -> None:
        """Apply accepted changes: filter settings from the next step, odometry buffer, timers, TF."""
        with self._filter_lock, self._lock:
            changed = {prm.name: prm.value for prm in changes
                       if prm.name in params.LOCALIZATION and self.p.get(prm.name) != prm.value}
            if not changed:
                return
            self.p.update(changed)
            self.localizer.config = runtime_config(self.localizer.config, self.p)
            self.odom.max_age_s = float(self.p["odom_buffer_s"])
            self.odom.tolerance_s = float(self.p["transform_tolerance"])
        if "process_rate" in changed:
            self._work_timer.timer_period_ns = int(1e9 / float(self.p["process_rate"]))
        if "diagnostics_period" in changed:
            if self._diag_timer is not None:
                self.destroy_timer(self._diag_timer)
            self._diag_timer = self._make_timer(float(self.p["diagnostics_period"]), self.publish_diagnostics)
        if "save_pose_rate" in changed:
            if self._save_timer is not None:
                self.destroy_timer(self._save_timer)
            rate = float(self.p["save_pose_rate"])
            self._save_timer = self._make_timer(1.0 / rate if rate > 0 else 0.0, self.save_pose)
        if "tf_broadcast" in changed:
            self._set_tf_broadcast(bool(self.p["tf_broadcast"]))
        self.get_logger().info(f"parameters changed: {changed}")

    # ---- inputs -----------------------------------------------------------------------------
    def _too_far_ahead(self, stamp: float) -> bool:
        """True (logged, counted) for a stamp more than ``max_stamp_ahead`` s ahead of the node clock.

        Such a stamp would otherwise become the last update or odometry stamp, and every
        later (correct) input would be dropped as out of order. Off while the clock reads 0
        (``use_sim_time`` before the first ``/clock``).
        """
        ahead = float(self.p["max_stamp_ahead"])
        now = self.get_clock().now().nanoseconds * 1e-9
        if ahead <= 0 or now <= 0 or stamp <= now + ahead:
            return False
        self.counters["future_stamp"] += 1
        self.get_logger().warning(f"input stamped {stamp - now:.1f} s ahead of the clock dropped "
                                  f"(max_stamp_ahead {ahead} s)", throttle_duration_sec=5.0)
        return True

    def _time_went_back(self, stamp: float, newest: float | None, what: str) -> bool:
        """True (after a time reset) for a stamp more than ``time_reset_s`` before ``newest`` of its stream.

        A bag replayed with ``--loop`` or a restarted simulation starts its stamps (and /clock) over:
        odometry then never entered the buffer again (out of order) and every frame was older than
        the last update, so the node stopped for good. As tf2 and nav2_amcl do on a clock jump, the
        buffers are cleared and the belief is kept; smaller steps back stay counted drops.
        """
        limit = float(self.p["time_reset_s"])
        if limit <= 0 or newest is None or not stamp < newest - limit:
            return False
        self.counters["time_resets"] += 1
        self.counters["dropped_time_reset"] += len(self._frames)
        self.get_logger().warning(
            f"{what} stamped {newest - stamp:.1f} s before the newest (> time_reset_s {limit} s): time went "
            f"back (bag loop, simulation restart); odometry and pending frames cleared, belief kept, the next "
            f"update runs without motion")
        self.odom = OdometryBuffer(max_age_s=self.odom.max_age_s, tolerance_s=self.odom.tolerance_s)
        self._odom_epoch += 1
        self._frames.clear()
        self.last_stamp = None
        self._last_odom = None
        self._odom_reset = True
        self._tf_sent, self._tf_clock_ns = None, -1  # map->odom stamps start over with the new time
        return True

    def _on_image(self, msg: Image | CompressedImage) -> None:
        stamp = stamp_to_sec(msg.header.stamp)
        with self._lock:
            self.counters["frames"] += 1
            if self._too_far_ahead(stamp):
                return
            self._time_went_back(stamp, self.last_stamp, "frame")
            now = time.monotonic()
            self._frames.append((stamp, msg, now))
            self._drop_superseded(now)

    def _on_odom(self, msg: Odometry) -> None:
        frame, child = msg.header.frame_id.lstrip("/"), msg.child_frame_id.lstrip("/")
        if frame and frame != self.p["odom_frame_id"]:  # map->odom would be published for a frame it is not in
            self.counters["bad_odom_frame"] += 1
            self.get_logger().warning(f"odometry in frame '{frame}' dropped: expected odom_frame_id "
                                      f"'{self.p['odom_frame_id']}' (an empty frame id is not checked)",
                                      throttle_duration_sec=5.0)
            return
        if child and child != self.p["base_frame_id"]:
            # Still used: the filter needs only planar motion, which base_link and base_footprint share.
            self.counters["odom_child_frame_mismatch"] += 1
            self.get_logger().warning(f"odometry child frame '{child}' is not base_frame_id "
                                      f"'{self.p['base_frame_id']}'; its motion is used as the base's",
                                      throttle_duration_sec=30.0)
        try:
            pose = pose_to_xyyaw(msg.pose.pose)
        except PoseInputError as exc:
            self.counters["bad_odom"] += 1
            self.get_logger().warning(f"odometry dropped: {exc}", throttle_duration_sec=5.0)
            return
        stamp = stamp_to_sec(msg.header.stamp)
        with self._lock:
            if self._too_far_ahead(stamp):
                return
            self._time_went_back(stamp, self.odom.latest_stamp, "odometry")
            prev = self.odom.pose_at(self.odom.latest_stamp) if self.odom.latest_stamp is not None else None
            jump = float(self.p["odom_jump_m"])
            if (prev is not None and jump > 0 and stamp > (self.odom.latest_stamp or 0.0)
                    and math.hypot(pose[0] - prev[0], pose[1] - prev[1]) > jump):
                # Reset (e.g. the odometry driver restarted) or jump: motion across it is unknown.
                self.counters["odom_jumps"] += 1
                self.get_logger().warning(
                    f"odometry jumped {math.hypot(pose[0] - prev[0], pose[1] - prev[1]):.2f} m (> odom_jump_m "
                    f"{jump} m): treated as a reset, the next update runs without motion")
                self.odom = OdometryBuffer(max_age_s=self.odom.max_age_s, tolerance_s=self.odom.tolerance_s)
                self._odom_epoch += 1
                self._odom_reset = True
            if not self.odom.add(stamp, pose):
                self.counters["bad_odom"] += 1
                self.get_logger().warning("odometry dropped: out-of-order or non-finite stamp",
                                          throttle_duration_sec=5.0)
                return
            self._odom_seen = True

    def _on_initialpose(self, msg: PoseWithCovarianceStamped) -> None:
        if msg.header.frame_id.lstrip("/") != self.p["global_frame_id"].lstrip("/"):  # "/map" is map (nav2_amcl)
            self.counters["bad_initialpose"] += 1
            self.get_logger().warning(f"initialpose in frame '{msg.header.frame_id}' rejected; expected "
                                      f"'{self.p['global_frame_id']}'")
            return
        try:
            mean = pose_to_xyyaw(msg.pose.pose)
            self._check_in_map(mean)
            self._init_pose(mean, cov6_to_cov3(msg.pose.covariance), stamp=stamp_to_sec(msg.header.stamp))
        except (PoseInputError, ValueError) as exc:
            self.counters["bad_initialpose"] += 1
            self.get_logger().error(f"initialpose rejected: {exc}")

    def _check_in_map(self, mean: np.ndarray) -> None:
        """ValueError if ``mean`` lies more than ``initialpose_margin`` m outside the map's view extent."""
        margin = float(self.p["initialpose_margin"])
        vm = self.localizer.view_map
        if margin <= 0 or vm is None or len(vm) == 0:
            return
        xmin, xmax, ymin, ymax = vm.extent()  # type: ignore[misc]
        out = max(xmin - mean[0], mean[0] - xmax, ymin - mean[1], mean[1] - ymax)
        if out > margin:
            raise ValueError(f"({mean[0]:.2f}, {mean[1]:.2f}) is {out:.1f} m outside the map's views "
                             f"(x {xmin:.1f}..{xmax:.1f}, y {ymin:.1f}..{ymax:.1f}; initialpose_margin {margin} m)")

    def _init_pose(self, mean: Any, cov: np.ndarray, stamp: float | None = None) -> None:
        """Tracking from ``mean``; ValueError (belief unchanged) for a covariance the filter cannot sample from.

        ``stamp`` (the initialpose stamp) inside the odometry buffer (``transform_tolerance`` past its newest
        sample included) anchors the egomotion there, as nav2_amcl applies the odometry change since the
        message stamp: the next frame is filtered with the motion since ``stamp``, and frames stamped at or
        before it are dropped (``out_of_order``). Otherwise (no stamp, a zero stamp, no odometry there) the
        next frame is filtered without motion.
        """
        with self._filter_lock:
            try:
                self.localizer.init_pose(np.asarray(mean, dtype=np.float64), cov)
            except torch.linalg.LinAlgError as exc:
                # Positive definite in float64 (as checked) but singular in the filter's float32, e.g.
                # [[100, 100, 0], [100, 100, 0], [0, 0, 0.1]]: the Cholesky factorization fails.
                raise ValueError(f"covariance is not positive definite at the filter's float32 precision "
                                 f"(singular or nearly so): {exc}") from exc
            with self._lock:
                self._pending_global = False
                self._pose_epoch += 1
                at = self.odom.pose_at(stamp) if stamp is not None and stamp > 0 else None
                if at is None:
                    self.last_stamp = None
                else:
                    self.last_stamp, self._last_odom, self._odom_reset = stamp, at, False
        self.get_logger().info(f"tracking from initial pose ({float(mean[0]):.2f}, {float(mean[1]):.2f}, "
                               f"{float(mean[2]):.2f}) with {self.localizer.config.tracking_particles} particles")

    def _on_map_info(self, msg: String) -> None:
        try:
            info = json.loads(msg.data)
            if not isinstance(info["ids"], list):
                raise TypeError("ids is not a list")
            ids = {int(info["num_views"]): [str(i) for i in info["ids"]]}
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as exc:
            # OverflowError: {"num_views": 1e999}; RecursionError: JSON nested thousands deep.
            self.counters["bad_map_info"] += 1
            self.get_logger().warning(f"unreadable map info ignored: {type(exc).__name__}: {str(exc)[:200]}",
                                      throttle_duration_sec=5.0)
            return
        with self._lock:
            self._map_ids = ids

    def _on_map(self, msg: PointCloud2) -> None:
        info = self.model.info
        try:
            n = int(msg.width) * int(msg.height)
            vm = pointcloud_to_view_map(msg, fingerprint=info.fingerprint, embed_shape=info.embed_shape,
                                        meters_per_unit=info.meters_per_unit, ids=self._map_ids.get(n))
            if vm.frame_id != self.p["global_frame_id"]:
                raise MapError(f"map in frame '{vm.frame_id}', expected '{self.p['global_frame_id']}'")
            with self._filter_lock:
                for w in self.localizer.set_map(vm):
                    self.get_logger().warning(w)
                if len(vm) and (self._pending_global or (self.p["global_localization_on_map"]
                                                         and not self.localizer.initialized)):
                    self._init_global()
        except (FingerprintMismatchError, MapError) as exc:
            self.counters["bad_maps"] += 1
            self.get_logger().error(f"map rejected: {exc}")
            return
        self.get_logger().info(f"map received: {len(vm)} views")
        self._publish_context_markers()

    def _init_global(self) -> None:
        with self._filter_lock:
            self.localizer.init_global()
            with self._lock:
                self.last_stamp = None
                self._pending_global = False
        self.get_logger().info(f"global localization with {self.localizer.config.max_particles} particles")

    def _on_global(self, _req: Empty.Request, resp: Empty.Response) -> Empty.Response:
        with self._filter_lock:
            if self.localizer.has_map:
                self._init_global()
            else:
                self._pending_global = True
                self.get_logger().warning("no map yet: global localization starts when one arrives")
        return resp

    def _on_nomotion(self, _req: Empty.Request, resp: Empty.Response) -> Empty.Response:
        """As nav2_amcl: the next new frame is filtered even below update_min_d / update_min_a.

        The last frame is not filtered again: that counted one observation twice.
        """
        with self._lock:
            self._force_update = True
        return resp

    # ---- filtering --------------------------------------------------------------------------
    @property
    def _pending(self) -> tuple[float, Any, float] | None:
        """The newest unprocessed frame ``(stamp, msg, arrival)``, or None when no frame waits."""
        with self._lock:
            return self._frames[-1] if self._frames else None

    def _usable(self, stamp: float, arrived: float, now: float) -> bool:
        """Whether a frame can be filtered now: odometry covers its stamp, none was ever seen, or it waited long enough.

        "Covers" means a sample stamped at or after the frame has arrived, so the pose at the
        stamp is interpolated. ``OdometryBuffer.pose_at`` also answers up to ``transform_tolerance``
        past its newest sample by holding that sample; that is only the fallback once a frame has
        waited ``transform_tolerance`` (odometry late or stopped), as tf2's message filter waits.
        """
        latest = self.odom.latest_stamp
        return (not self._odom_seen or (latest is not None and latest >= stamp)
                or now - arrived >= float(self.p["transform_tolerance"]))

    def _drop_superseded(self, now: float) -> None:
        """Drop (counted ``dropped_newer_frame``) every frame older than the newest usable one, and the oldest
        beyond :data:`MAX_WAITING_FRAMES`: newest frame only, except that a newer frame waiting for its
        odometry does not discard the usable one (a camera faster than odometry's latency would starve)."""
        keep = max(len(self._frames) - MAX_WAITING_FRAMES, 0)
        for i in range(len(self._frames) - 1, keep - 1, -1):
            stamp, _, arrived = self._frames[i]
            if self._usable(stamp, arrived, now):
                keep = i
                break
        if keep:
            self.counters["dropped_newer_frame"] += keep
            del self._frames[:keep]

    def _take_frame(self) -> tuple[float, Any] | None:
        """The newest frame that odometry covers (or that waited ``transform_tolerance``); older ones are dropped.

        A frame taken before the odometry sent with it was handled (a loaded machine, or the
        executor serving the image subscription first) was filtered with the previous odometry
        sample held, i.e. a wrong egomotion; live replays then drifted from the offline evaluation
        of the same bag by up to 0.7 m (``test_bags::test_live_replay_matches_offline``).
        """
        with self._lock:
            if not self._frames:
                return None
            now = time.monotonic()
            self._drop_superseded(now)
            stamp, msg, arrived = self._frames[0]
            if not self._usable(stamp, arrived, now):
                return None  # odometry for this stamp is probably still on its way
            del self._frames[0]
            if self._odom_seen and self.odom.pose_at(stamp) is None:
                self.counters["no_odom"] += 1
                self.get_logger().warning(f"frame at {stamp:.3f} dropped: no odometry at its stamp",
                                          throttle_duration_sec=5.0)
                return None
            return stamp, msg

    def _work(self) -> None:
        frame = self._take_frame()
        if frame is None:
            self._resend_tf()
            return
        stamp, msg = frame
        try:
            rgb = compressed_msg_to_rgb(msg) if isinstance(msg, CompressedImage) else image_msg_to_rgb(msg)
        except DmnError as exc:
            self.counters["bad_images"] += 1
            self.get_logger().warning(f"frame dropped: {exc}", throttle_duration_sec=5.0)
            return
        with self._lock:
            if not self.localizer.ready:
                self.counters["dropped_not_ready"] += 1
                return
            if self.last_stamp is not None and stamp <= self.last_stamp:
                self.counters["out_of_order"] += 1
                self.get_logger().warning(f"frame at {stamp:.3f} not after the last update or initial pose "
                                          f"({self.last_stamp:.3f}): dropped", throttle_duration_sec=5.0)
                return
            used = self.odom.pose_at(stamp)  # interpolated, or the newest sample held once the frame waited
            delta = None
            if self.last_stamp is not None and self._odom_seen and not self._odom_reset:
                delta = self._egomotion(used)
                if delta is None and self._last_odom is not None:
                    self.counters["no_odom"] += 1
                    return
                # delta None here: the last update had no odometry (it started later than transform_tolerance
                # after it), so this update runs without motion and anchors the next ones; dropping the frame
                # as no_odom stopped the filter for good, since last_stamp then never advanced.
                if delta is not None:
                    small = math.hypot(delta[0], delta[1]) < float(self.p["update_min_d"]) and abs(
                        delta[2]) < float(self.p["update_min_a"])
                    if small and not self._force_update:
                        self.counters["skipped_small_motion"] += 1
                        self._resend_tf(stamp)
                        return
            self._force_update = False
            epoch, pose_epoch = self._odom_epoch, self._pose_epoch
        self._run(stamp, rgb, delta, epoch, odom_used=used, pose_epoch=pose_epoch)

    def _egomotion(self, used: np.ndarray | None) -> np.ndarray | None:
        """Motion from the last update to the odometry pose ``used`` (None: unknown); ``_lock`` held.

        From the odometry pose the last update used (``_last_odom``), not the buffer at ``last_stamp``:
        when that frame was filtered with the newest sample held (its odometry was later than
        ``transform_tolerance``), the late samples interpolated at ``last_stamp`` differ from what the
        filter moved by, and the motion between them was lost. From the buffer only when the last
        update had no odometry (it arrived later, covering that stamp).
        """
        if used is None:
            return None
        if self._last_odom is not None:
            return relative(self._last_odom, used)
        prev = self.odom.pose_at(self.last_stamp) if self.last_stamp is not None else None
        return None if prev is None else relative(prev, used)

    def _run(self, stamp: float, rgb: np.ndarray, delta: np.ndarray | None, epoch: int, *,
             odom_used: np.ndarray | None = None, pose_epoch: int | None = None) -> None:
        """One filter step; ``_lock`` is free meanwhile, so odometry and frames keep arriving.

        ``odom_used``: the odometry pose ``delta`` was measured to (the next update's motion starts from it;
        None: read at ``stamp`` afterwards). ``pose_epoch``: ``_pose_epoch`` when the frame was taken; an
        initial pose set since then replaces ``delta`` by the motion from its anchor (the frame is dropped
        as ``out_of_order`` if stamped at or before it, filtered without motion if it has none).
        """
        with self._filter_lock:
            if pose_epoch is not None:
                with self._lock:
                    if pose_epoch != self._pose_epoch:
                        if self.last_stamp is not None and stamp <= self.last_stamp:
                            self.counters["out_of_order"] += 1
                            self.get_logger().warning(f"frame at {stamp:.3f} not after the initial pose "
                                                      f"({self.last_stamp:.3f}): dropped", throttle_duration_sec=5.0)
                            return
                        delta = (self._egomotion(odom_used) if self.last_stamp is not None and epoch == self._odom_epoch
                                 and not self._odom_reset else None)
            try:
                est = self.localizer.step(rgb, delta)
            except (DmnError, ValueError, RuntimeError) as exc:
                with self._lock:
                    self.counters["step_errors"] += 1
                    self._step_failed = True
                self.get_logger().error(f"filter step failed: {exc}")
                self.publish_diagnostics()
                return
            particles, weights = self.localizer.particles_metric(), self.localizer.weights()
            with self._lock:
                self._step_failed = False
                if epoch == self._odom_epoch:
                    self._last_odom = odom_used if odom_used is not None else self.odom.pose_at(stamp)
                    self._odom_reset = False
                    self.last_stamp = stamp
                # else odometry jumped or time went back during the step: keep what that reset set (the next
                # update runs without motion; after a time reset last_stamp stays None)
                self.last_estimate = est
                self.counters["processed"] += 1
                odom_pose = self.odom.pose_at(stamp)
        self._publish(stamp, est, particles, weights, odom_pose)
        self.publish_diagnostics(stamp)
        if est.recovery:
            self.get_logger().warning(f"recovery after step {self.counters['processed']}: {est.recovery} "
                                      f"({est.health.message if est.health else ''})")
        self.get_logger().info(
            f"step {self.counters['processed']}: ({est.mean[0]:.2f}, {est.mean[1]:.2f}, {est.mean[2]:.2f}) "
            f"spread {est.spread:.2f} m, ESS {est.ess:.0f}/{est.num_particles}"
            f"{f' -> K {est.next_particles}' if est.next_particles != est.num_particles else ''}, "
            f"{est.latency_ms:.0f} ms",
            throttle_duration_sec=2.0,
        )

    # ---- outputs ----------------------------------------------------------------------------
    def health_status(self) -> DiagnosticStatus:
        """The localizer's health as one DiagnosticStatus (levels and keys in docs/health.md)."""
        with self._lock:
            loc = self.localizer
            h = loc.last_health
            values: dict[str, str] = {"mode": loc.mode, "has_map": str(loc.has_map).lower(),
                                      "map_views": str(0 if loc.view_map is None else len(loc.view_map))}
            if not loc.has_map:
                level, msg = HealthLevel.ERROR, "no map: waiting for the view-embedding map"
            elif not loc.initialized:
                level, msg = HealthLevel.ERROR, "not initialized: send initialpose or call global localization"
            elif self._step_failed:
                level, msg = HealthLevel.ERROR, "the last filter step failed (see the log)"
            elif h is None:
                level, msg = HealthLevel.WARN, f"{loc.mode}: initialized, waiting for the first update"
            else:
                level, msg = h.level, h.message
            if h is not None:
                values.update({
                    "converged": str(h.converged).lower(), "lost": str(h.lost).lower(),
                    "ess": f"{h.ess:.1f}", "ess_fraction": f"{h.ess_fraction:.3f}",
                    "num_particles": str(loc.belief.num_particles if loc.belief is not None else 0),
                    "log_likelihood": f"{h.log_likelihood:.4g}", "log_likelihood_fast": f"{h.ll_fast:.4g}",
                    "log_likelihood_slow": f"{h.ll_slow:.4g}", "likelihood_ratio": f"{h.likelihood_ratio:.4g}",
                    "spread_xy_m": f"{h.spread_xy_m:.3f}", "spread_yaw_rad": f"{h.spread_yaw_rad:.3f}",
                    "updates": str(h.updates), "lost_streak": str(h.lost_streak),
                    "injection_probability": f"{h.injection_probability:.3f}",
                })
            values.update({
                "covariance_inflation": f"{loc.covariance_inflation:.3g}",
                "model_domain": training_domain(self.model.info) or "unrecorded",
                "global_relocalizations": str(loc.recoveries["global"]),
                "injected_particles": str(loc.recoveries["injected_particles"]),
                "processed": str(self.counters["processed"]),
                "dropped": str(sum(v for k, v in self.counters.items() if k not in NOT_DROPS)),
            })
        return DiagnosticStatus(level=bytes([int(level)]), name=f"{self.get_fully_qualified_name()}: localization",
                                message=msg, hardware_id=self.model.info.fingerprint,
                                values=[KeyValue(key=k, value=v) for k, v in values.items()])

    def publish_diagnostics(self, stamp: float | None = None) -> None:
        arr = DiagnosticArray()
        arr.header.stamp = sec_to_stamp(stamp) if stamp is not None else self.get_clock().now().to_msg()
        arr.status = [self.health_status()]
        self.diag_pub.publish(arr)

    def _publish(self, stamp: float, est: Estimate, particles: np.ndarray, weights: np.ndarray,
                 odom_pose: np.ndarray | None) -> None:
        frame = self.p["global_frame_id"]
        stamp_msg = sec_to_stamp(stamp)
        self.pose_pub.publish(pose_with_cov_msg(est.mean, est.covariance, stamp=stamp_msg, frame_id=frame))
        top = np.argsort(-weights)[: int(self.p["max_published_particles"])]
        if self.p["publish_particles"]:
            cloud = PoseArray()
            cloud.header.stamp, cloud.header.frame_id = stamp_msg, frame
            cloud.poses = [xyyaw_to_pose(particles[i]) for i in top]
            self.cloud_pub.publish(cloud)
        m = Marker()
        m.header.stamp, m.header.frame_id = stamp_msg, frame
        m.ns, m.id, m.type, m.action = "particles", 0, Marker.POINTS, Marker.ADD
        m.scale.x = m.scale.y = 0.15
        m.pose.orientation.w = 1.0
        m.points = [Point(x=float(particles[i, 0]), y=float(particles[i, 1]), z=0.05) for i in top]
        m.colors = weight_colors(weights[top])
        self.marker_pub.publish(MarkerArray(markers=[m]))
        self._broadcast_tf(stamp, est.mean, odom_pose)

    def _publish_context_markers(self) -> None:
        """The map's contexts as green arrows on ``dmn_context_markers`` (transient_local: an RViz started
        later gets them too; on the volatile ``dmn_markers`` they went out once, when the map arrived).
        Stamped zero, i.e. drawn with the newest transform whenever they are received."""
        poses = self.localizer.context_poses()
        frame = self.p["global_frame_id"]
        markers = [Marker(ns="contexts", id=0, action=Marker.DELETEALL)]
        for i, pose in enumerate(poses):
            m = Marker()
            m.header.frame_id = frame
            m.ns, m.id, m.type, m.action = "contexts", i + 1, Marker.ARROW, Marker.ADD
            m.pose = xyyaw_to_pose(pose)
            m.scale.x, m.scale.y, m.scale.z = 1.0, 0.15, 0.15
            m.color = ColorRGBA(r=0.1, g=0.8, b=0.1, a=1.0)
            markers.append(m)
        self.context_marker_pub.publish(MarkerArray(markers=markers))

    def _broadcast_tf(self, stamp: float, map_to_base: np.ndarray, odom_pose: np.ndarray | None) -> None:
        """map→odom from the estimate and ``odom_pose``, the odometry at ``stamp`` read under ``_lock``
        (``_on_odom`` trims and replaces the buffer on another thread)."""
        if self.tf is None or odom_pose is None:
            return
        mo = map_to_odom(map_to_base, odom_pose)
        t = TransformStamped()
        try:
            sec_to_stamp(stamp + float(self.p["transform_tolerance"]))  # nav2_amcl post-dates
        except ValueError as exc:  # a stamp at the end of the representable range
            self.get_logger().warning(f"map->odom not sent: {exc}", throttle_duration_sec=5.0)
            return
        t.header.frame_id, t.child_frame_id = self.p["global_frame_id"], self.p["odom_frame_id"]
        t.transform.translation.x, t.transform.translation.y = float(mo[0]), float(mo[1])
        q = yaw_to_quaternion(np.float64(mo[2]))
        t.transform.rotation.x, t.transform.rotation.y, t.transform.rotation.z, t.transform.rotation.w = (
            float(v) for v in q)
        with self._lock:
            self._last_map_to_odom = t
            self._send_tf(t, round(stamp * 1e9) + round(float(self.p["transform_tolerance"]) * 1e9))

    def _resend_tf(self, frame_stamp: float | None = None) -> None:
        """Re-send the last map→odom while no update runs (REP-105: the robot may stand still).

        Stamped as the last one sent, advanced by the node-clock time since, or ``frame_stamp`` (a frame
        skipped for small motion) + ``transform_tolerance`` when later, as nav2_amcl stamps its re-sends
        with the newest scan's. (Node clock + tolerance stamped re-sends ahead of the updates by the
        camera's latency, so the next update's transform went out stamped before them.) After a time
        reset, until the next update: node clock + tolerance.
        """
        with self._lock:
            if self.tf is None or self._last_map_to_odom is None:
                return
            now, tol_ns = self.get_clock().now().nanoseconds, round(float(self.p["transform_tolerance"]) * 1e9)
            if self._tf_sent is None and frame_stamp is None:
                # After a time reset: the node clock's time, which may be another time base than the data's
                # (a wall-clock node replaying a bag), so the first update after it is not held behind it.
                ns = now + tol_ns
                if now > 0 and ns > self._tf_clock_ns:
                    self._tf_clock_ns = ns
                    self._send_tf(self._last_map_to_odom, ns, anchor=False)
                return
            sent, ns = -1, -1
            if self._tf_sent is not None:
                sent, clock = self._tf_sent
                ns = sent + max(now - clock, 0)
            if frame_stamp is not None:
                ns = max(ns, round(frame_stamp * 1e9) + tol_ns)
            if ns > sent:  # the same stamp again is ignored by tf2 (TF_REPEATED_DATA)
                self._send_tf(self._last_map_to_odom, ns)

    def _send_tf(self, t: TransformStamped, ns: int, *, anchor: bool = True) -> None:
        """Send ``t`` stamped ``ns`` (or just after the last anchored stamp: map→odom stamps never go back, nor
        repeat, until time resets); ``anchor=False`` (a node-clock re-send) leaves that stamp alone. ``_lock`` held."""
        if self.tf is None:
            return
        if anchor:
            if self._tf_sent is not None and ns <= self._tf_sent[0]:
                ns = self._tf_sent[0] + 1  # an update: its (new) value is sent, just after the last one
            self._tf_sent = (ns, self.get_clock().now().nanoseconds)
        t.header.stamp = BuiltinTime(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)
        self.tf.sendTransform(t)

    # ---- pose persistence (AMCL's save_pose_rate) -------------------------------------------
    def save_pose(self) -> bool:
        """Write the last estimate and its covariance to ``pose_file`` atomically (if it changed).

        The timer and a shutdown or service call may save at once; whichever comes second waits
        for the first write, so the file holds the newest estimate once either returns.
        """
        with self._save_lock:
            return self._save_pose_locked()

    def _save_pose_locked(self) -> bool:
        with self._lock:
            est, stamp, n = self.last_estimate, self.last_stamp, self.counters["processed"]
            if est is None or n == self._saved_processed:
                return False
            self._saved_processed = n
        doc = {
            "format": POSE_FORMAT,
            "frame_id": self.p["global_frame_id"],
            "stamp": float(stamp or 0.0),
            "x": float(est.mean[0]), "y": float(est.mean[1]), "yaw": float(est.mean[2]),
            "covariance": [[float(v) for v in row] for row in np.asarray(est.covariance).reshape(3, 3)],
            "model_fingerprint": self.model.info.fingerprint,
        }
        try:
            atomic_write_bytes(self.pose_file, yaml.safe_dump(doc, sort_keys=False).encode())
        except OSError as exc:
            self.get_logger().error(f"cannot save the pose to {self.pose_file}: {exc}", throttle_duration_sec=30.0)
            return False
        self.pose_saves += 1
        return True

    def _read_saved_pose(self) -> tuple[np.ndarray, np.ndarray] | None:
        """``(mean, cov)`` from ``pose_file``, or None (logged) if it is absent, unreadable or invalid."""
        path = self.pose_file
        if not path.is_file():
            self.get_logger().info(f"no saved pose at {path}: waiting for initialpose or global localization")
            return None
        try:
            mean, cov = read_pose_file(path, frame_id=self.p["global_frame_id"])
        except ValueError as exc:
            self.get_logger().error(f"saved pose ignored: {exc}")
            return None
        self.get_logger().info(f"starting at the saved pose from {path}")
        return mean, cov

    def destroy_node(self) -> None:
        if float(self.p["save_pose_rate"]) > 0:
            self.save_pose()  # the newest estimate, not one up to 1/save_pose_rate s old
        super().destroy_node()


def runtime_config(cfg: LocalizerConfig, p: dict[str, Any]) -> LocalizerConfig:
    """``cfg`` with the filter settings that may change at runtime taken from the parameters ``p``.

    ValueError for values the filter refuses (e.g. a health alpha outside (0, 1]).
    """
    if float(p["cluster_radius"]) < 0:
        raise ValueError(f"cluster_radius must be >= 0, got {p['cluster_radius']}")
    return dataclasses.replace(
        cfg,
        motion_noise_xy_m=float(p["motion_noise_xy"]),
        motion_noise_yaw_rad=float(p["motion_noise_yaw"]),
        resample_threshold=float(p["resample_threshold"]),
        cluster_radius_m=float(p["cluster_radius"]),
        health=HealthConfig(
            alpha_slow=float(p["health.alpha_slow"]),
            alpha_fast=float(p["health.alpha_fast"]),
            converged_xy_m=float(p["health.converged_xy"]),
            converged_yaw_rad=float(p["health.converged_yaw"]),
            converged_updates=int(p["health.converged_updates"]),
            lost_ratio=float(p["health.lost_ratio"]),
            warmup_updates=int(p["health.warmup_updates"]),
        ),
        recovery_alpha_slow=float(p["recovery_alpha_slow"]),
        recovery_alpha_fast=float(p["recovery_alpha_fast"]),
        lost_updates_before_global=int(p["lost_updates_before_global"]),
    )


def resolve_pose_file(param: str, namespace: str, name: str) -> Path:
    """``pose_file``, or ``$ROS_HOME/dmn_ros_<namespace>_<node>_pose.yaml`` (``~/.ros`` without ROS_HOME)."""
    if param:
        return Path(param).expanduser()
    home = Path(os.environ.get("ROS_HOME") or Path.home() / ".ros")
    stem = "_".join(part for part in f"{namespace}/{name}".split("/") if part)
    return home / f"dmn_ros_{stem}_pose.yaml"


def read_pose_file(path: str | os.PathLike[str], *, frame_id: str) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(x, y, yaw)`` and 3×3 covariance from a saved-pose file; ValueError if it is not a valid one.

    YAML is read with ``yaml.safe_load`` (no Python objects); the file must be at most 64 KiB,
    in ``frame_id``, with finite numbers and a symmetric positive semi-definite covariance.
    """
    path = Path(path)
    try:
        if path.stat().st_size > 65536:
            raise ValueError(f"{path} is larger than 64 KiB: not a saved pose")
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != POSE_FORMAT:
        raise ValueError(f"{path} is not a {POSE_FORMAT} file")
    if doc.get("frame_id") != frame_id:
        raise ValueError(f"{path} is in frame {doc.get('frame_id')!r}, expected {frame_id!r}")
    try:
        mean = np.array([float(doc["x"]), float(doc["y"]), float(doc["yaw"])])
        cov = np.array(doc["covariance"], dtype=np.float64).reshape(3, 3)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path} has a malformed pose: {exc}") from exc
    if not (np.isfinite(mean).all() and np.isfinite(cov).all()):
        raise ValueError(f"{path} has a non-finite pose or covariance")
    if not np.allclose(cov, cov.T, atol=1e-9) or np.linalg.eigvalsh(cov).min() < -1e-9:
        raise ValueError(f"{path} has a covariance that is not symmetric positive semi-definite")
    return mean, cov


def main(args: list[str] | None = None) -> None:
    from dmn_ros.ros.spin import run_node

    run_node(LocalizationNode, args=args, threads=2)
