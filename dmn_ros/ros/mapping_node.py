"""mapping_node: pairs context images with poses, embeds them, and serves the view-embedding map.

Subscribes ``image_topic`` (Image, or CompressedImage on ``<image_topic>/compressed``)
and ``pose_topic`` (PoseStamped or PoseWithCovarianceStamped), pairs them by stamp
within ``pair_tolerance``, embeds each pair with the model's CNN1 and publishes the
whole map on ``map_topic`` (PointCloud2, layout in :mod:`dmn_ros.ros.conversions`)
plus ``map_info_topic`` (JSON), both reliable + transient_local. Re-sent pairs
(same image stamp) replace their view, so a publisher may repeat its contexts.

Multi-robot (``share_contexts``, ``docs/multirobot.md``): the views this robot adds are
published on the absolute ``shared_topic`` (PointCloud2, layout in
:mod:`dmn_ros.ros.conversions`) and the peers' views are validated, deduplicated by
stable id and merged (:class:`dmn_ros.sharing.ContextLedger`), so ``map_topic`` carries
the merged map. Late joiners get the peers' transient_local history and ask for the
full map on ``<shared_topic>/sync``. ``max_contexts`` bounds the map by spatial thinning.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
from geometry_msgs.msg import PoseStamped, PoseWithCovarianceStamped
from rcl_interfaces.msg import SetParametersResult
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image, PointCloud2
from std_msgs.msg import String
from std_srvs.srv import Trigger

from dmn_ros.errors import DmnError, FingerprintMismatchError, MapError
from dmn_ros.export import LoadedModel, default_model_path, load_model
from dmn_ros.images import resize_rgb
from dmn_ros.localizer import embed_images, resolve_device
from dmn_ros.maps import ViewMap
from dmn_ros.ros import params
from dmn_ros.ros.conversions import (
    PoseInputError,
    compressed_msg_to_rgb,
    image_msg_to_rgb,
    map_info_json,
    pointcloud_to_shared_batch,
    pose_to_xyyaw,
    shared_batch_to_pointcloud,
    stamp_to_sec,
    view_map_to_pointcloud,
)
from dmn_ros.sharing import ContextLedger, SharedContextError, ShareFormat, make_id, robot_id_from_namespace

MAP_QOS = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
"""Latched map: late localizers get the current map at once."""
CONTEXT_QOS = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE)
"""Context inputs: reliable, since contexts are rare and precious; so a best-effort publisher does not match
(publish contexts reliably). Volatile, so that volatile and transient_local publishers both match."""
SYNC_QOS = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE)
"""Full-map requests of late joiners: sent whenever a new peer's request subscriber appears."""


def shared_qos(history: int) -> QoSProfile:
    """Shared contexts: reliable + transient_local, so a late joiner gets the last ``history`` messages."""
    return QoSProfile(depth=max(int(history), 1), reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.TRANSIENT_LOCAL)


class MappingNode(Node):
    """Keeps one :class:`~dmn_ros.maps.ViewMap` and publishes it whenever it changes."""

    def __init__(self, *, model: LoadedModel | None = None, **kwargs: Any) -> None:
        super().__init__("mapping_node", **kwargs)
        self.p = params.declare(self, params.MAPPING)
        log = self.get_logger()
        self.model = model or load_model(self.p["model_path"] or default_model_path(),
                                         device=resolve_device(self.p["device"]))
        info = self.model.info
        self.view_map = ViewMap.for_model(info, frame_id=self.p["global_frame_id"])
        self.counters = {"paired": 0, "unpaired_images": 0, "unpaired_poses": 0, "bad_images": 0, "bad_poses": 0,
                         "shared_malformed": 0, "shared_sent": 0, "sync_requests": 0, "sync_replies": 0,
                         "save_errors": 0}
        """How many inputs were used or dropped, by reason (``shared_*``: see :class:`ContextLedger`)."""
        self.robot_id = self.p["robot_id"] or robot_id_from_namespace(self.get_namespace())
        """Prefix of this robot's stable view ids."""
        try:
            make_id(self.robot_id, 0)
            self.share_format = ShareFormat(self.p["share_format"])
        except ValueError as exc:
            raise DmnError(f"bad sharing parameters: {exc}") from exc
        self.sharing = bool(self.p["share_contexts"])
        self.ledger = ContextLedger(
            robot_id=self.robot_id, fingerprint=info.fingerprint, frame_id=self.p["global_frame_id"],
            image_size=(info.image_height, info.image_width), embed_shape=info.embed_shape,
            max_contexts=int(self.p["max_contexts"]), heading_scale_m=float(self.p["thinning_heading_scale"]),
            keep_images=self.sharing and self.share_format is ShareFormat.IMAGES,
        )
        """Dedup memory, validation and the max_contexts policy for own and shared views."""
        self._sync_ledger_counters()
        self._to_share: list[str] = []
        self._sync_reply_due = False
        self._sync_subs_seen = 0
        self._lock = threading.Lock()
        self._images: deque[tuple[float, int, np.ndarray]] = deque()
        self._poses: deque[tuple[float, np.ndarray]] = deque()
        self._id_of_stamp: dict[int, str] = {}
        self._next_index = 0
        self._dirty = False
        self._autosave = bool(self.p["autosave"])
        self._map_file_refused = False
        self._save_due = False
        self._save_retry_at = 0.0
        self.map_file = Path(self.p["map_file"]).expanduser() if self.p["map_file"] else None
        if self.map_file is not None and self.map_file.is_file():
            try:
                loaded = ViewMap.load(self.map_file, expected_fingerprint=self.model.info.fingerprint)
                loaded.frame_id = self.p["global_frame_id"]
                self.view_map = loaded
                self._next_index = self.ledger.next_seq(loaded.ids)
                self.ledger.mark_known(loaded.ids)
                self.ledger.commit(self.view_map, ids=[], poses=np.zeros((0, 3)),
                                   embeddings=np.zeros((0, *info.embed_shape)))  # apply max_contexts
                log.info(f"loaded {len(loaded)} views from {self.map_file}")
            except (FingerprintMismatchError, MapError) as exc:
                self._autosave = False
                self._map_file_refused = True
                self.set_parameters([Parameter("autosave", value=False)])  # what `ros2 param get` shows
                self.p["autosave"] = False
                log.error(f"{exc}; starting with an empty map and autosave off to keep that file")

        self.map_pub = self.create_publisher(PointCloud2, self.p["map_topic"], MAP_QOS)
        self.info_pub = self.create_publisher(String, self.p["map_info_topic"], MAP_QOS)
        if self.p["use_compressed"]:
            self.create_subscription(CompressedImage, self.p["image_topic"] + "/compressed", self._on_image,
                                     CONTEXT_QOS)
        else:
            self.create_subscription(Image, self.p["image_topic"], self._on_image, CONTEXT_QOS)
        pose_type = {"PoseStamped": PoseStamped, "PoseWithCovarianceStamped": PoseWithCovarianceStamped}
        if self.p["pose_type"] not in pose_type:
            raise DmnError(f"pose_type must be one of {sorted(pose_type)}, got {self.p['pose_type']!r}")
        self.create_subscription(pose_type[self.p["pose_type"]], self.p["pose_topic"], self._on_pose, CONTEXT_QOS)
        self.create_service(Trigger, "~/save_map", self._on_save)
        self.create_service(Trigger, "~/clear_map", self._on_clear)
        if self.sharing:
            topic = self.p["shared_topic"]
            self.shared_pub = self.create_publisher(PointCloud2, topic, shared_qos(self.p["shared_history"]))
            # Reader depth above the writers' history: a late joiner may get several peers' histories at once.
            self.create_subscription(PointCloud2, topic, self._on_shared, shared_qos(4 * self.p["shared_history"]))
            self.sync_pub = self.create_publisher(String, topic + "/sync", SYNC_QOS)
            self.create_subscription(String, topic + "/sync", self._on_sync_request, SYNC_QOS)
            self.create_service(Trigger, "~/sync_map", self._on_sync_map)
            self._sync_until = time.monotonic() + float(self.p["sync_window"])
            self.create_timer(0.5, self._sync_tick)
            self._to_share = list(self.view_map.ids)  # a loaded map is offered to the peers once
        self.create_timer(0.2, self._flush)
        self.add_on_set_parameters_callback(self._check_parameters)
        self.add_post_set_parameters_callback(self._apply_parameters)
        self._publish()
        log.info(
            f"mapping with model {info.fingerprint} on {self.model.device} as '{self.robot_id}'; "
            f"{len(self.view_map)} views; map on '{self.p['map_topic']}'"
            + (f"; sharing {self.share_format.value} on '{self.p['shared_topic']}'" if self.sharing else "")
        )

    # ---- parameters -------------------------------------------------------------------------
    def _check_parameters(self, changes: list[Any]) -> SetParametersResult:
        """Refuse (with the reason) changes of start-only parameters and values outside their ranges."""
        new, reason = params.check_update(self.p, params.MAPPING, params.RUNTIME_MAPPING, changes)
        if reason is None and new.get("autosave") and self._map_file_refused:
            reason = f"autosave stays off: map_file {self.map_file} was refused at start and is kept as it is"
        if reason is not None:
            self.get_logger().warning(f"parameter change refused: {reason}")
        return SetParametersResult(successful=reason is None, reason=reason or "")

    def _apply_parameters(self, changes: list[Any]) -> None:
        with self._lock:
            changed = {prm.name: prm.value for prm in changes
                       if prm.name in params.MAPPING and self.p.get(prm.name) != prm.value}
            self.p.update(changed)
            self._autosave = bool(self.p["autosave"]) and not self._map_file_refused
        if changed:
            self.get_logger().info(f"parameters changed: {changed}")

    # ---- inputs -----------------------------------------------------------------------------
    def _on_image(self, msg: Image | CompressedImage) -> None:
        stamp = stamp_to_sec(msg.header.stamp)
        try:
            rgb = compressed_msg_to_rgb(msg) if isinstance(msg, CompressedImage) else image_msg_to_rgb(msg)
        except DmnError as exc:
            self.counters["bad_images"] += 1
            self.get_logger().warning(f"context image dropped: {exc}", throttle_duration_sec=5.0)
            return
        # Model size at once: an unpaired image then holds a few KB, whatever the camera's resolution.
        rgb = resize_rgb(rgb, height=self.model.info.image_height, width=self.model.info.image_width)
        ns = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        with self._lock:
            self._images.append((stamp, ns, rgb))
            self._trim(self._images, "unpaired_images")
        self._pair()

    def _on_pose(self, msg: PoseStamped | PoseWithCovarianceStamped) -> None:
        pose_msg = msg.pose.pose if isinstance(msg, PoseWithCovarianceStamped) else msg.pose
        frame = msg.header.frame_id
        if frame and frame != self.p["global_frame_id"]:
            self.counters["bad_poses"] += 1
            self.get_logger().warning(f"context pose in frame '{frame}', expected "
                                      f"'{self.p['global_frame_id']}': dropped", throttle_duration_sec=5.0)
            return
        try:
            pose = pose_to_xyyaw(pose_msg)
        except PoseInputError as exc:
            self.counters["bad_poses"] += 1
            self.get_logger().warning(f"context pose dropped: {exc}", throttle_duration_sec=5.0)
            return
        with self._lock:
            self._poses.append((stamp_to_sec(msg.header.stamp), pose))
            self._trim(self._poses, "unpaired_poses")
        self._pair()

    def _trim(self, q: deque, counter: str) -> None:
        while len(q) > int(self.p["max_unpaired"]):
            q.popleft()
            self.counters[counter] += 1
            self.get_logger().warning(
                f"{counter.replace('_', ' ')}: {self.counters[counter]} so far (no partner within "
                f"{self.p['pair_tolerance']} s)", throttle_duration_sec=5.0,
            )

    def _pair(self) -> None:
        """Match each image with the nearest pose in stamp; embed every pair found."""
        tol = float(self.p["pair_tolerance"])
        found: list[tuple[int, np.ndarray, np.ndarray]] = []
        with self._lock:
            for item in list(self._images):
                stamp, ns, rgb = item
                if not self._poses:
                    break
                j = int(np.argmin([abs(s - stamp) for s, _ in self._poses]))
                if abs(self._poses[j][0] - stamp) <= tol:
                    pose = self._poses[j][1]
                    del self._poses[j]
                    self._images.remove(item)
                    found.append((ns, rgb, pose))
        if found:
            self.add_contexts([f[1] for f in found], np.stack([f[2] for f in found]), stamps_ns=[f[0] for f in found])

    # ---- map editing ------------------------------------------------------------------------
    def add_contexts(self, images: list[np.ndarray], poses: np.ndarray, *, stamps_ns: list[int] | None = None) -> None:
        """Embed RGB ``images`` with metric ``poses (n, 3)`` and add them (re-sent stamps replace views)."""
        info = self.model.info
        # Model-size images: what is embedded here is exactly what an images-format peer embeds.
        images = [resize_rgb(np.asarray(im), height=info.image_height, width=info.image_width) for im in images]
        emb = embed_images(self.model, images)
        ids = []
        new_ids = []
        with self._lock:
            self._next_index = max(self._next_index, self.ledger.own_seq_floor)
            for k in range(len(images)):
                ns = stamps_ns[k] if stamps_ns is not None else None
                if ns is not None and ns in self._id_of_stamp:
                    ids.append(self._id_of_stamp[ns])
                    continue
                vid = make_id(self.robot_id, self._next_index)
                self._next_index += 1
                if ns is not None:
                    self._id_of_stamp[ns] = vid
                ids.append(vid)
                new_ids.append(vid)
            self.ledger.commit(self.view_map, ids=ids, poses=poses, embeddings=emb, images=images)
            self._bound_stamp_ids()
            self.counters["paired"] += len(images)
            if self.sharing:  # shared views are immutable: a re-sent (replaced) view is not shared again
                self._to_share.extend(new_ids)
            self._dirty = True

    def _bound_stamp_ids(self) -> None:
        """Forget the stamps of views thinning dropped once there are more than 2·max_contexts (bounded memory).

        A re-sent context whose view was thinned away then gets a new id (and is thinned again).
        """
        limit = 2 * int(self.p["max_contexts"])
        if limit <= 0 or len(self._id_of_stamp) <= limit:
            return
        held = set(self.view_map.ids)
        self._id_of_stamp = {ns: vid for ns, vid in self._id_of_stamp.items() if vid in held}

    # ---- sharing ----------------------------------------------------------------------------
    def _on_shared(self, msg: PointCloud2) -> None:
        """Validate, dedup and merge the contexts a peer shared (images are embedded here)."""
        info = self.model.info
        try:
            batch = pointcloud_to_shared_batch(msg, embed_shape=info.embed_shape)
        except SharedContextError as exc:
            self.counters["shared_malformed"] += 1
            self.get_logger().warning(f"shared contexts dropped: {exc}", throttle_duration_sec=5.0)
            return
        with self._lock:
            fresh, problems = self.ledger.screen(batch)
            self._sync_ledger_counters()
        if problems:
            reasons = sorted({r.value for r, _ in problems})
            self.get_logger().warning(
                f"{len(problems)} shared context(s) rejected ({', '.join(reasons)}), e.g. {problems[0][1]}; "
                f"counters {self._shared_counters()}", throttle_duration_sec=5.0)
        if len(fresh) == 0:
            return
        emb = fresh.embeddings if fresh.embeddings is not None else embed_images(self.model, list(fresh.images))
        with self._lock:
            res = self.ledger.commit(self.view_map, ids=fresh.ids, poses=fresh.poses, embeddings=emb,
                                     images=fresh.images)
            self._sync_ledger_counters()
            self._dirty = True
        self.get_logger().info(f"merged {len(res.added)} shared views ({fresh.format.value}); map has "
                               f"{len(self.view_map)}", throttle_duration_sec=2.0)

    def _on_sync_request(self, msg: String) -> None:
        try:
            peer = str(json.loads(msg.data)["robot_id"])
        except (ValueError, KeyError, TypeError, RecursionError):  # RecursionError: JSON nested thousands deep
            self.counters["shared_malformed"] += 1
            self.get_logger().warning("malformed full-map request ignored", throttle_duration_sec=5.0)
            return
        if peer != self.robot_id:
            self._sync_reply_due = True  # answered once per flush, however many peers asked

    def _sync_tick(self) -> None:
        """While joining (``sync_window`` s), ask for the full map whenever a new peer appears.

        Later arrivals need no request: they announce their own views, and ask us themselves.
        """
        n = self.sync_pub.get_subscription_count()
        if n > self._sync_subs_seen and time.monotonic() < self._sync_until:
            self._request_sync()
        self._sync_subs_seen = n

    def _request_sync(self) -> None:
        self.sync_pub.publish(String(data=json.dumps({"robot_id": self.robot_id, "num_views": len(self.view_map)})))
        self.counters["sync_requests"] += 1

    def _on_sync_map(self, _req: Trigger.Request, resp: Trigger.Response) -> Trigger.Response:
        """Ask every peer for its full map now (e.g. after a network partition longer than the history)."""
        self._request_sync()
        resp.success, resp.message = True, f"asked {max(self.sync_pub.get_subscription_count() - 1, 0)} peer(s)"
        return resp

    def _share(self) -> None:
        """Publish own new views, and the whole merged map if a peer asked for it."""
        with self._lock:
            full, self._sync_reply_due = self._sync_reply_due, False
            ids = None if full else self._to_share
            self._to_share = []
            if ids is not None and not ids:
                return
            batches = self.ledger.outgoing(self.view_map, ids, fmt=self.share_format,
                                           batch_size=int(self.p["shared_batch"]))
        stamp = self.get_clock().now().to_msg()
        for b in batches:
            self.shared_pub.publish(shared_batch_to_pointcloud(b, stamp=stamp))
            self.counters["shared_sent"] += len(b)
        if full:
            self.counters["sync_replies"] += 1

    def _shared_counters(self) -> dict[str, int]:
        return {k: v for k, v in self.counters.items() if k.startswith("shared_")}

    def _sync_ledger_counters(self) -> None:
        self.counters.update({f"shared_{k}": v for k, v in self.ledger.counters.items()})

    def _flush(self) -> None:
        if self.sharing:
            self._share()
        with self._lock:
            dirty, self._dirty = self._dirty, False
        if dirty:
            self._publish()
            self._save_due = self._save_due or (self._autosave and self.map_file is not None)
        if self._save_due and time.monotonic() >= self._save_retry_at:
            try:
                self._save()
                self._save_due = False
            except OSError as exc:  # disk full, read-only, removed directory: keep mapping, retry in 2 s
                self.counters["save_errors"] += 1
                self._save_retry_at = time.monotonic() + 2.0
                self.get_logger().error(f"autosave to {self.map_file} failed: {exc}", throttle_duration_sec=10.0)

    def _publish(self) -> None:
        with self._lock:
            snapshot = self.view_map.copy()
        self.map_pub.publish(view_map_to_pointcloud(snapshot, stamp=self.get_clock().now().to_msg()))
        self.info_pub.publish(String(data=map_info_json(snapshot)))
        self.get_logger().info(f"map: {len(snapshot)} views (unpaired images {self.counters['unpaired_images']}, "
                               f"poses {self.counters['unpaired_poses']})", throttle_duration_sec=2.0)

    def _save(self) -> str:
        assert self.map_file is not None
        with self._lock:
            snapshot = self.view_map.copy()
        snapshot.save(self.map_file)
        return f"saved {len(snapshot)} views to {self.map_file}"

    def _on_save(self, _req: Trigger.Request, resp: Trigger.Response) -> Trigger.Response:
        if self.map_file is None:
            resp.success, resp.message = False, "map_file parameter is empty"
            return resp
        try:
            resp.message = self._save()
            resp.success = True
        except OSError as exc:
            resp.success, resp.message = False, f"save failed: {exc}"
        return resp

    def _on_clear(self, _req: Trigger.Request, resp: Trigger.Response) -> Trigger.Response:
        with self._lock:
            n = len(self.view_map)
            self.view_map.clear()
            self._images.clear()
            self._poses.clear()
            self._id_of_stamp.clear()
            self.ledger.forget()  # peers' views may come back (sync); own sequence numbers are never reused
            self._to_share = []
            self._dirty = True
        self._flush()
        resp.success, resp.message = True, f"cleared {n} views"
        return resp


def main(args: list[str] | None = None) -> None:
    from dmn_ros.ros.spin import run_node

    run_node(MappingNode, args=args)
