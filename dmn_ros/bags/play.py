"""dmn-bag-play: publish a bag into a live ROS 2 graph (rclpy), at real time or ``--rate``, with ``/clock``.

Messages are published as the serialized CDR stored in the bag (no re-encoding), on
publishers whose QoS is the one the bag's metadata recorded (``offered_qos_profiles``;
reliable/volatile/depth 10 when absent). ``/clock`` carries bag time for nodes with
``use_sim_time``. With ``--init global|tracking`` the player waits, before the first
camera frame, until the mapping node's map holds the bag's contexts, then starts the
localizer (``reinitialize_global_localization`` or ``initialpose`` at the first ground-truth
pose), so a live run starts from the same state as ``dmn-bag-eval`` offline. The bag's
topic names are given as to ``dmn-bag-eval`` (``--camera-topic`` …); ``--init`` on a bag
without that camera topic (or, for ``tracking``, ground-truth topic) is an error naming the
bag's topics.
"""

from __future__ import annotations

import argparse
import importlib
import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from dmn_ros.bags.errors import BagError, MissingTopicError
from dmn_ros.bags.reader import RawMessage, iter_raw_messages
from dmn_ros.bags.topics import TopicNames, add_topic_options, topics_from_args
from dmn_ros.errors import console_main

__all__ = ["BagPlayer", "main", "qos_from_metadata"]


def qos_from_metadata(bag: Path) -> dict[str, dict[str, Any]]:
    """Topic → first offered QoS profile as a dict (rosbag2 metadata v4+: list or YAML string)."""
    out: dict[str, dict[str, Any]] = {}
    try:
        info = yaml.safe_load((Path(bag) / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return out
    for entry in info.get("topics_with_message_count") or []:
        tm = entry.get("topic_metadata", {})
        prof = tm.get("offered_qos_profiles")
        if isinstance(prof, str):
            prof = yaml.safe_load(prof) if prof.strip() else []
        if prof:
            out[tm["name"]] = prof[0]
    return out


def _to_rclpy_qos(p: dict[str, Any] | None) -> Any:
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

    if not p:
        return QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE)

    def val(key: str) -> str:
        v = p.get(key, "")
        return str(v).lower() if not isinstance(v, int) else str(v)

    rel = ReliabilityPolicy.BEST_EFFORT if val("reliability") in ("best_effort", "2") else ReliabilityPolicy.RELIABLE
    dur = (DurabilityPolicy.TRANSIENT_LOCAL if val("durability") in ("transient_local", "1")
           else DurabilityPolicy.VOLATILE)
    hist = HistoryPolicy.KEEP_ALL if val("history") in ("keep_all", "2") else HistoryPolicy.KEEP_LAST
    depth = int(p.get("depth") or 10)
    return QoSProfile(history=hist, depth=max(depth, 1), reliability=rel, durability=dur)


def _msg_class(msgtype: str) -> Any:
    pkg, _, name = msgtype.split("/")
    return getattr(importlib.import_module(f"{pkg}.msg"), name)


class BagPlayer:
    """Publishes one bag's messages in time order from its own node and executor thread."""

    def __init__(self, bag: str | Path, *, rate: float = 1.0, clock: bool = True, init: str = "none",
                 topics: TopicNames | None = None, init_timeout_s: float = 30.0, wait_subscribers_s: float = 5.0,
                 only_topics: list[str] | None = None, context: Any = None, node_name: str = "dmn_bag_play",
                 tracking_std_xy: float = 6.0, tracking_std_yaw: float = float(np.radians(30.0))) -> None:
        import rclpy
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.node import Node

        if rate <= 0:
            raise BagError(f"rate must be > 0, got {rate}")
        if init not in ("none", "global", "tracking"):
            raise BagError(f"init must be none, global or tracking, got {init!r}")
        self.bag = Path(bag)
        self.rate = float(rate)
        self.init = init
        self.topics = (topics or TopicNames()).normalized()
        self.init_timeout_s = init_timeout_s
        self.wait_subscribers_s = wait_subscribers_s
        self.tracking_std = (tracking_std_xy, tracking_std_yaw)
        msgs, self.truncated = iter_raw_messages(self.bag)
        in_bag = {m.topic for m in msgs}
        if only_topics:
            keep = {t if t.startswith("/") else "/" + t for t in only_topics}
            msgs = [m for m in msgs if m.topic in keep]
        self.messages: list[RawMessage] = sorted(msgs, key=lambda m: m.log_time_ns)
        if init != "none":
            self._check_init_topics(in_bag, {m.topic for m in self.messages})
        self.node = Node(node_name, context=context)
        self.log = self.node.get_logger()
        if self.truncated:
            self.log.warning(f"{self.truncated}: playing the {len(msgs)} messages recovered")
        qos = qos_from_metadata(self.bag)
        self.pubs: dict[str, Any] = {}
        for topic, msgtype in sorted({(m.topic, m.msgtype) for m in self.messages}):
            try:
                cls = _msg_class(msgtype)
            except (ImportError, AttributeError, ValueError):
                self.log.warning(f"{topic}: message type {msgtype} is not importable here; not played")
                continue
            self.pubs[topic] = self.node.create_publisher(cls, topic, _to_rclpy_qos(qos.get(topic)))
        self.clock_pub = None
        if clock:
            from rosgraph_msgs.msg import Clock

            self.clock_pub = self.node.create_publisher(Clock, "/clock", 10)
        self.published = 0
        """Messages published so far."""
        self._map_views = -1
        if init != "none":
            from std_msgs.msg import String

            from dmn_ros.ros.mapping_node import MAP_QOS

            self.node.create_subscription(String, "dmn_map_info", self._on_map_info, MAP_QOS)
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(self.node)
        self._spin = threading.Thread(target=self._spin_loop, daemon=True)
        self._rclpy = rclpy
        self._spin.start()

    def _check_init_topics(self, in_bag: set[str], played: set[str]) -> None:
        """``--init`` starts at the first camera frame (and ``tracking`` reads the ground truth): without them in
        what is played it would never start, so refuse at once, naming the bag's topics."""
        cam = self.topics.camera
        needs = {"camera": ({cam, cam + "/compressed"}, f"{cam} (or {cam}/compressed)", "--camera-topic")}
        if self.init == "tracking":
            gt = self.topics.ground_truth
            needs["ground-truth"] = ({gt}, gt, "--ground-truth-topic")
        for what, (names, shown, option) in needs.items():
            if names & played:
                continue
            where = "is left out by --topics" if names & in_bag else "is not in the bag"
            raise MissingTopicError(f"{self.bag}: --init {self.init} needs the {what} topic {shown}, which {where} "
                                    f"(bag topics: {', '.join(sorted(in_bag)) or 'none'}); give {option}",
                                    path=self.bag)

    def _spin_loop(self) -> None:
        try:
            self.executor.spin()
        except Exception:  # shutdown races end the spin thread quietly
            pass

    def _on_map_info(self, msg: Any) -> None:
        try:
            self._map_views = int(json.loads(msg.data)["num_views"])
        except (ValueError, KeyError, TypeError):
            pass

    def _publish_clock(self, t_ns: int) -> None:
        if self.clock_pub is not None:
            from rosgraph_msgs.msg import Clock

            from dmn_ros.ros.conversions import sec_to_stamp

            self.clock_pub.publish(Clock(clock=sec_to_stamp(t_ns * 1e-9)))

    def _wait_subscribers(self) -> None:
        wanted = [t for t in (self.topics.camera, self.topics.camera + "/compressed", self.topics.context_image,
                              self.topics.context_image + "/compressed") if t in self.pubs]
        end = time.monotonic() + self.wait_subscribers_s
        while time.monotonic() < end and not all(self.pubs[t].get_subscription_count() > 0 for t in wanted):
            time.sleep(0.05)

    def _do_init(self) -> None:
        """Wait for the map to hold the bag's contexts, then start the localizer (global or tracking)."""
        n_ctx = sum(1 for m in self.messages if m.topic == self.topics.context_pose)
        end = time.monotonic() + self.init_timeout_s
        while time.monotonic() < end and self._map_views < max(n_ctx, 1):
            time.sleep(0.05)
        if self._map_views < max(n_ctx, 1):
            self.log.warning(f"map has {self._map_views} views after {self.init_timeout_s} s "
                             f"(bag has {n_ctx} contexts); initializing anyway")
        if self.init == "global":
            from std_srvs.srv import Empty

            cli = self.node.create_client(Empty, "reinitialize_global_localization")
            if not cli.wait_for_service(timeout_sec=self.init_timeout_s):
                raise BagError("reinitialize_global_localization service not available")
            fut = cli.call_async(Empty.Request())
            while not fut.done() and time.monotonic() < end + 10.0:
                time.sleep(0.02)
            if not fut.done():
                raise BagError("reinitialize_global_localization did not answer")
        elif self.init == "tracking":
            from geometry_msgs.msg import PoseWithCovarianceStamped

            from dmn_ros.bags.evaluate import initial_pose
            from dmn_ros.bags.reader import load_bag
            from dmn_ros.ros.conversions import pose_with_cov_msg, sec_to_stamp

            data = load_bag(self.bag, topics=self.topics, need_odom=False)
            mean = initial_pose(data.ground_truth, float(data.frame_stamps[0]))  # type: ignore[arg-type]
            sxy, syaw = self.tracking_std
            pub = self.node.create_publisher(PoseWithCovarianceStamped, "initialpose", 10)
            t0 = time.monotonic()
            while pub.get_subscription_count() == 0 and time.monotonic() - t0 < 5.0:
                time.sleep(0.05)
            pub.publish(pose_with_cov_msg(mean, np.diag([sxy**2, sxy**2, syaw**2]),
                                          stamp=sec_to_stamp(float(data.frame_stamps[0])), frame_id="map"))
        else:
            raise BagError(f"init must be none, global or tracking, got {self.init!r}")
        time.sleep(0.3)  # let the node apply it before frames arrive

    def play(self, *, loop: bool = False, stop: threading.Event | None = None) -> int:
        """Publish every message at its bag time / rate; returns messages published."""
        if not self.messages:
            return 0
        self._wait_subscribers()
        cams = {self.topics.camera, self.topics.camera + "/compressed"}
        while True:
            t_bag0 = self.messages[0].log_time_ns
            t_wall0 = time.monotonic()
            initialized = self.init == "none"
            for m in self.messages:
                if stop is not None and stop.is_set():
                    return self.published
                if not initialized and m.topic in cams:
                    paused = time.monotonic()
                    self._do_init()
                    t_wall0 += time.monotonic() - paused
                    initialized = True
                target = t_wall0 + (m.log_time_ns - t_bag0) * 1e-9 / self.rate
                while (dt := target - time.monotonic()) > 0:
                    time.sleep(min(dt, 0.02))
                self._publish_clock(m.log_time_ns)
                pub = self.pubs.get(m.topic)
                if pub is not None:
                    pub.publish(m.data)
                    self.published += 1
            if not loop:
                return self.published
            self.init = "none"  # re-initializing once is enough; the node keeps tracking on the next loop

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=1.0)
        self.node.destroy_node()


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dmn-bag-play", description=__doc__.splitlines()[0])
    ap.add_argument("bag", help="bag directory or .mcap/.db3 file")
    ap.add_argument("--rate", type=float, default=1.0, help="playback speed factor (1 = real time)")
    ap.add_argument("--loop", action="store_true", help="play again from the start when done")
    ap.add_argument("--no-clock", action="store_true", help="do not publish /clock")
    ap.add_argument("--topics", nargs="*", default=None, help="only these topics")
    ap.add_argument("--init", choices=["none", "global", "tracking"], default="none",
                    help="start the localizer once the map holds the bag's contexts")
    ap.add_argument("--init-timeout", type=float, default=30.0)
    ap.add_argument("--wait-subscribers", type=float, default=5.0,
                    help="seconds to wait for subscribers to the camera/context topics before playing")
    add_topic_options(ap)  # the bag's topic names, as dmn-bag-eval takes them
    return ap


@console_main("dmn-bag-play")
def main(argv: list[str] | None = None) -> int:
    import rclpy

    args = build_parser().parse_args(argv)
    rclpy.init()
    player = None
    try:
        player = BagPlayer(args.bag, rate=args.rate, clock=not args.no_clock, init=args.init,
                           init_timeout_s=args.init_timeout, wait_subscribers_s=args.wait_subscribers,
                           only_topics=args.topics, topics=topics_from_args(args))
        n = player.play(loop=args.loop)
        print(f"published {n} messages from {args.bag}")
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        if player is not None:
            player.close()
        rclpy.try_shutdown()


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
