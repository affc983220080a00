"""``dmn-bag-eval --live``: score a running localization_node against ground truth, like the offline evaluation.

Listens to the node's output (``dmn_pose``, PoseWithCovarianceStamped stamped with the
image stamp) and to the ground-truth topic. When a bag is given, its recorded ground truth
is used (complete even if live messages were lost); otherwise the live one. Scoring,
files and summary are those of :func:`dmn_ros.bags.evaluate.score`.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from dmn_ros.bags.evaluate import EvalOptions, _area, aggregate, options_json, score, write_outputs
from dmn_ros.bags.reader import PoseStream, load_bag

__all__ = ["LiveScorer", "run_live"]


class LiveScorer:
    """Collects estimates and ground truth from a live graph on its own node and executor thread."""

    def __init__(self, opts: EvalOptions, *, context: Any = None) -> None:
        from geometry_msgs.msg import PoseStamped, PoseWithCovarianceStamped
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.node import Node
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

        from dmn_ros.ros.conversions import pose_to_xyyaw, stamp_to_sec

        self._pose, self._stamp = pose_to_xyyaw, stamp_to_sec
        t = opts.topics.normalized()
        self.node = Node("dmn_bag_eval_live", context=context)
        self.estimates: dict[float, np.ndarray] = {}
        self.truth: dict[float, np.ndarray] = {}
        self.last_arrival: float | None = None
        self._lock = threading.Lock()
        qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE)
        self.node.create_subscription(PoseWithCovarianceStamped, t.estimate, self._on_est, qos)
        self.node.create_subscription(PoseStamped, t.ground_truth, self._on_gt, 100)
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(self.node)
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        try:
            self.executor.spin()
        except Exception:  # shutdown races end the spin thread quietly
            pass

    def _on_est(self, msg: Any) -> None:
        with self._lock:
            self.estimates[self._stamp(msg.header.stamp)] = self._pose(msg.pose.pose)
            self.last_arrival = time.monotonic()

    def _on_gt(self, msg: Any) -> None:
        with self._lock:
            self.truth[self._stamp(msg.header.stamp)] = self._pose(msg.pose)

    def wait(self, *, idle_timeout_s: float, duration_s: float | None = None,
             stop: threading.Event | None = None) -> None:
        """Return ``idle_timeout_s`` after the last estimate (once one came), at ``duration_s``, or on ``stop``."""
        t0 = time.monotonic()
        while True:
            now = time.monotonic()
            if stop is not None and stop.is_set():
                return
            if duration_s is not None and now - t0 >= duration_s:
                return
            if self.last_arrival is not None and now - self.last_arrival >= idle_timeout_s:
                return
            time.sleep(0.05)

    def streams(self) -> tuple[PoseStream, PoseStream]:
        def stream(d: dict[float, np.ndarray]) -> PoseStream:
            keys = sorted(d)
            return PoseStream(np.array(keys, dtype=np.float64),
                              np.array([d[k] for k in keys], dtype=np.float64).reshape(-1, 3))

        with self._lock:
            return stream(self.estimates), stream(self.truth)

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=1.0)
        self.node.destroy_node()


def run_live(*, bag: str | Path | None, opts: EvalOptions, out_dir: str | Path, idle_timeout_s: float = 10.0,
             duration_s: float | None = None, context: Any = None, stop: threading.Event | None = None,
             ready: threading.Event | None = None) -> dict[str, Any]:
    """Listen until idle, then score and write the same files as the offline evaluation."""
    import rclpy

    own = context is None and not rclpy.ok()
    if own:
        rclpy.init()
    scorer = LiveScorer(opts, context=context)
    try:
        if ready is not None:
            ready.set()
        scorer.wait(idle_timeout_s=idle_timeout_s, duration_s=duration_s, stop=stop)
        est, gt_live = scorer.streams()
    finally:
        scorer.close()
        if own:
            rclpy.try_shutdown()
    data = None
    gt = gt_live
    if bag is not None:
        data = load_bag(bag, topics=opts.topics, need_odom=False, need_camera=False)
        assert data.ground_truth is not None
        gt = data.ground_truth
    metrics = score(est.stamps, est.poses, gt, area_size_m=_area(data, opts), success_steps=opts.success_steps)
    result: dict[str, Any] = {
        "bag": str(bag) if bag is not None else "live", "live": True, "frames_processed": len(est),
        "ground_truth_source": "bag file" if bag is not None else "live topic",
        "estimate_stamps": [float(s) for s in est.stamps], "metrics": metrics,
    }
    if len(est):
        write_outputs(Path(out_dir), stamps=est.stamps, poses=est.poses, gt=gt, contexts=np.zeros((0, 3)),
                      result=result, opts=opts)
    return {"options": options_json(opts), "aggregate": aggregate([result], opts.success_steps), "bags": [result]}
