"""Soak: sim world + mapping_node + localization_node over real DDS, 30 Hz camera and 50 Hz odometry.

Reports, per window, resident memory (VmRSS sampled every loop: the peak ``rss_mb`` and the lowest
``rss_min_mb``), the camera rate achieved, filter step latency (p50/p95), frame-to-pose latency
(p95: image stamp to the pose message's arrival), frames received / processed / dropped, and ends
with a JSON summary. Run::

    nice -n 15 .venv/bin/python bench/soak.py --duration 600 --particles 256 --contexts 32

The robot drives a stored trajectory of the sim world at ~1 m/s (odometry interpolated between
its poses; the camera shows the nearest pre-rendered pose). Contexts are re-sent every 20 s (same
stamps, so they replace their views: the map must not grow). Global localization starts on the
first map; each update is a full filter step (update_min_d = update_min_a = 0).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from typing import Any

import numpy as np


def rss_mb() -> float:
    """Resident set size of this process in MiB (Linux /proc)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _pct(v: list[float], q: float) -> float:
    return float(np.percentile(v, q)) if v else float("nan")


def run_soak(duration: float = 600.0, *, camera_hz: float = 30.0, odom_hz: float = 50.0, particles: int = 256,
             contexts: int = 32, window: float = 10.0, warmup: float = 10.0, domain_id: int | None = None,
             model_path: str | None = None, quiet: bool = False) -> dict[str, Any]:
    """Run the stack for ``duration`` s; returns ``{"rows": [...], "summary": {...}}``."""
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    import rclpy
    from geometry_msgs.msg import PoseWithCovarianceStamped
    from nav_msgs.msg import Odometry
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.parameter import Parameter
    from sensor_msgs.msg import Image

    from dmn_ros.export import default_model_path, load_model
    from dmn_ros.ros.conversions import rgb_to_image_msg, sec_to_stamp, stamp_to_sec, xyyaw_to_pose
    from dmn_ros.ros.localization_node import POSE_QOS, LocalizationNode
    from dmn_ros.ros.mapping_node import MappingNode
    from dmn_ros.ros.sim_node import SimNode
    from dmn_ros.ros.transforms import interpolate_pose

    domain = domain_id if domain_id is not None else int(os.environ.get("ROS_DOMAIN_ID", 40 + os.getpid() % 60))
    path = model_path or default_model_path()
    if model_path == "untrained" or not os.path.isfile(path):  # latency and memory do not depend on training
        import tempfile

        import torch

        from dmn_ros.export import export_model
        from dmn_ros.model import DMN

        torch.manual_seed(0)
        path = os.path.join(tempfile.mkdtemp(prefix="dmn_soak_"), "untrained.pt")
        export_model(DMN(), path, meters_per_unit=20.0)
        if not quiet:
            print(f"no model at {model_path or default_model_path()}: soaking with an untrained DMN()", flush=True)
    model = load_model(path)
    ctx = rclpy.Context()
    rclpy.init(context=ctx, domain_id=domain)
    kw: dict[str, Any] = {"context": ctx}
    sim = SimNode(parameter_overrides=[Parameter("rate", value=0.0), Parameter("num_contexts", value=contexts),
                                       Parameter("trajectory_steps", value=60),
                                       Parameter("image_size", value=model.info.image_height)], **kw)
    mapping = MappingNode(model=model, **kw)
    loc = LocalizationNode(model=model, parameter_overrides=[
        Parameter("max_particles", value=particles), Parameter("tracking_particles", value=particles),
        Parameter("update_min_d", value=0.0), Parameter("update_min_a", value=0.0),
        Parameter("global_localization_on_map", value=True), Parameter("save_pose_rate", value=0.0)], **kw)
    driver = rclpy.create_node("soak_driver", context=ctx)
    cam = driver.create_publisher(Image, "camera/image", 10)
    odom = driver.create_publisher(Odometry, "odom", 100)
    e2e: list[float] = []
    driver.create_subscription(PoseWithCovarianceStamped, "dmn_pose",
                               lambda m: e2e.append(time.time() - stamp_to_sec(m.header.stamp)), POSE_QOS)
    executor = MultiThreadedExecutor(num_threads=4, context=ctx)
    for n in (sim, mapping, loc, driver):
        executor.add_node(n)
    spin = threading.Thread(target=executor.spin, daemon=True)
    spin.start()

    traj = np.asarray(sim.trajectory, dtype=np.float64)
    frames = sim.world.render(traj)  # pre-rendered: the camera costs no rendering while soaking
    seg_s = 1.0  # one trajectory segment (0.6–1.4 m) per second

    def pose_at(t: float) -> tuple[np.ndarray, int]:
        u = (t / seg_s) % (len(traj) - 1)
        i = int(u)
        return interpolate_pose(0.0, traj[i], 1.0, traj[i + 1], u - i), round(u)

    rows: list[dict[str, Any]] = []
    steps: list[float] = []
    t0 = time.time()
    next_cam = next_odom = next_ctx = t0
    next_row = t0 + window
    last_processed = 0
    c_prev = dict(loc.counters)
    e2e_seen = 0
    rss0 = None
    published = 0
    rss_lo, rss_hi = float("inf"), 0.0
    try:
        while time.time() - t0 < duration:
            now = time.time()
            if now >= next_ctx:
                sim.publish_contexts()
                next_ctx += 20.0
            if now >= next_odom:
                p, _ = pose_at(now - t0)
                msg = Odometry()
                msg.header.stamp, msg.header.frame_id = sec_to_stamp(now), "odom"
                msg.child_frame_id = "base_link"
                msg.pose.pose = xyyaw_to_pose(p)
                odom.publish(msg)
                next_odom += 1.0 / odom_hz
            if now >= next_cam:
                _, k = pose_at(now - t0)
                cam.publish(rgb_to_image_msg(frames[k], stamp=sec_to_stamp(now), frame_id="camera"))
                published += 1
                next_cam += 1.0 / camera_hz
            r = rss_mb()
            rss_lo, rss_hi = min(rss_lo, r), max(rss_hi, r)
            est = loc.last_estimate
            if loc.counters["processed"] != last_processed and est is not None:
                last_processed = loc.counters["processed"]
                steps.append(est.latency_ms)
            if now >= next_row:
                c = dict(loc.counters)
                d = {k: c[k] - c_prev.get(k, 0) for k in c}
                lat = e2e[e2e_seen:]
                e2e_seen = len(e2e)
                row = {"t_s": round(now - t0, 1), "rss_mb": round(rss_hi, 1), "rss_min_mb": round(rss_lo, 1),
                       "camera_hz": round(published / window, 1), "frames": d["frames"],
                       "processed": d["processed"],
                       "dropped": sum(v for k, v in d.items() if k not in ("frames", "processed", "odom_jumps")),
                       "step_ms_p50": round(_pct(steps, 50), 1), "step_ms_p95": round(_pct(steps, 95), 1),
                       "pose_latency_ms_p95": round(1000 * _pct(lat, 95), 1), "map_views": len(mapping.view_map),
                       "alive": spin.is_alive()}
                rows.append(row)
                if rss0 is None and now - t0 >= warmup:
                    rss0 = row["rss_mb"]
                if not quiet:
                    print(json.dumps(row), flush=True)
                steps, c_prev, published, rss_lo, rss_hi = [], c, 0, float("inf"), 0.0
                next_row += window
            time.sleep(max(0.0, min(next_cam, next_odom, next_row) - time.time()))
    finally:
        alive = spin.is_alive()
        counters = dict(loc.counters)
        executor.shutdown()
        for n in (sim, mapping, loc, driver):
            n.destroy_node()
        rclpy.shutdown(context=ctx)
        spin.join(timeout=5)
    after = [r for r in rows if r["t_s"] >= warmup] or rows
    summary = {
        "duration_s": duration, "camera_hz": camera_hz, "odom_hz": odom_hz, "particles": particles,
        "contexts": contexts, "rss_start_mb": rows[0]["rss_mb"] if rows else None,
        "rss_after_warmup_mb": rss0, "rss_end_mb": rows[-1]["rss_mb"] if rows else None,
        "rss_growth_after_warmup_mb": round(rows[-1]["rss_mb"] - rss0, 1) if rows and rss0 is not None else None,
        "step_ms_p95_first": after[0]["step_ms_p95"] if after else None,
        "step_ms_p95_last": after[-1]["step_ms_p95"] if after else None,
        "pose_latency_ms_p95_last": after[-1]["pose_latency_ms_p95"] if after else None,
        "executor_alive": alive, "counters": counters,
        "map_views_end": rows[-1]["map_views"] if rows else None,
    }
    return {"rows": rows, "summary": summary}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=600.0, help="seconds (default 600)")
    ap.add_argument("--camera-hz", type=float, default=30.0)
    ap.add_argument("--odom-hz", type=float, default=50.0)
    ap.add_argument("--particles", type=int, default=256)
    ap.add_argument("--contexts", type=int, default=32)
    ap.add_argument("--window", type=float, default=10.0, help="seconds per report row")
    ap.add_argument("--model", default=None, help="model file or 'untrained' (default: shipped, else untrained)")
    ap.add_argument("--json", default=None, help="write rows + summary here")
    a = ap.parse_args(argv)
    res = run_soak(a.duration, camera_hz=a.camera_hz, odom_hz=a.odom_hz, particles=a.particles,
                   contexts=a.contexts, window=a.window, model_path=a.model)
    print(json.dumps(res["summary"], indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0 if res["summary"]["executor_alive"] else 1


if __name__ == "__main__":
    sys.exit(main())
