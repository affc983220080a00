"""``make demo``: global localization in unseen mazes (or rooms), sim → mapping → localization over real DDS.

``ros2 launch`` is not installable here, so this composes the launch file's three
nodes in one process (a MultiThreadedExecutor) with the same YAML, drives the
simulated robot in lock-step, and prints one row per filter step. Success is the
paper's: x-y error under 8.94 m scaled by area/40 m.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from dmn_ros.data.dataset_format import SPLIT_SEED_OFFSETS
from dmn_ros.errors import console_main

TEST_SEED_OFFSET = SPLIT_SEED_OFFSETS["test"]
"""Worlds of the test split (never trained on)."""


def _yaml_overrides(path: Path, node: str) -> dict[str, Any]:
    import yaml

    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"params file {path}: not valid YAML ({exc})") from exc
    if not isinstance(doc, dict):
        raise ValueError(f"params file {path}: expected ROS 2 parameters (node: ros__parameters: ...)")

    def flat(d: dict, prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    merged = flat(doc.get("/**", {}).get("ros__parameters", {}))
    merged.update(flat(doc.get(node, {}).get("ros__parameters", {})))
    return merged


def default_params_file() -> Path:
    """config/dmn_localize.yaml where the package installed it (:func:`dmn_ros.export.package_share_file`)."""
    from dmn_ros.export import package_share_file

    return package_share_file("config", "dmn_localize.yaml")


def _plot(path: Path, world: Any, frames: list[Any], contexts: np.ndarray, title: str) -> None:
    """The episode's belief row over the world's occupancy grid (``evaluation.belief_plot.plot_belief_row``)."""
    from dmn_ros.evaluation.belief_plot import plot_belief_row

    plot_belief_row(path, frames, bounds=tuple(world.bounds), contexts=contexts, title=title,
                    occupancy=world.occupancy(0.25))


@console_main("dmn-demo")
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--episodes", type=int, default=4, help="global-localization episodes (unseen worlds)")
    ap.add_argument("--steps", type=int, default=5, help="filter steps per episode (paper: t = 1 and t = 5)")
    ap.add_argument("--first-seed", type=int, default=TEST_SEED_OFFSET, help="world seed of episode 0")
    ap.add_argument("--model", default="", help="exported model (default: the shipped models/dmn_maze32.pt)")
    ap.add_argument("--params-file", default="", help="ROS parameters YAML (default: config/dmn_localize.yaml)")
    ap.add_argument("--particles", type=int, default=0, help="override max_particles (YAML: 2048)")
    ap.add_argument("--out", default="out/demo", help="directory for the belief PNGs")
    from dmn_ros.worlds import DOMAINS

    ap.add_argument("--domain", default="", choices=["", *sorted(DOMAINS)],
                    help="world family of the sim (default: the model's training domain when the sim has "
                         "it, else the params file's sim_node domain)")
    args = ap.parse_args(argv)

    from dmn_ros.errors import ModelLoadError
    from dmn_ros.evaluation.belief_plot import BeliefFrame
    from dmn_ros.export import default_model_path, load_model, training_domain
    from dmn_ros.localizer import resolve_device

    model_path = Path(args.model) if args.model else default_model_path()
    if not model_path.is_file():
        print(f"dmn-demo: no trained model at {model_path}. Train and export one (dmn-train, dmn-export) "
              "or pass --model PATH / set DMN_ROS_MODEL.", file=sys.stderr)
        return 2
    params_file = Path(args.params_file) if args.params_file else default_params_file()
    loc_yaml = _yaml_overrides(params_file, "localization_node")  # a missing or broken file fails before any node
    if "ROS_DOMAIN_ID" not in os.environ:
        os.environ["ROS_DOMAIN_ID"] = str(150 + os.getpid() % 80)
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    import rclpy
    from geometry_msgs.msg import PoseWithCovarianceStamped
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.parameter import Parameter
    from std_srvs.srv import Empty, Trigger

    from dmn_ros.ros.conversions import pose_to_xyyaw, stamp_to_sec
    from dmn_ros.ros.localization_node import POSE_QOS, LocalizationNode
    from dmn_ros.ros.mapping_node import MappingNode
    from dmn_ros.ros.sim_node import SimNode

    def overrides(node: str, **extra: Any) -> list[Parameter]:
        values = _yaml_overrides(params_file, node)
        values.update(extra)
        return [Parameter(k, value=v) for k, v in values.items()]

    try:
        model = load_model(model_path, device=resolve_device(str(loc_yaml.get("device", "auto"))))
    except ModelLoadError as exc:
        print(f"dmn-demo: {exc}", file=sys.stderr)
        return 2
    rclpy.init()
    loc_extra: dict[str, Any] = {"update_min_d": 0.0, "update_min_a": 0.0}
    if args.particles:
        loc_extra["max_particles"] = args.particles
    sim_extra: dict[str, Any] = {"rate": 0.0, "world_seed": args.first_seed}
    trained_in = training_domain(model.info)
    domain = args.domain or (trained_in if trained_in in DOMAINS else "")
    if domain:  # a rooms model is shown in rooms, not in the mazes it never saw
        sim_extra["domain"] = domain
    sim = SimNode(parameter_overrides=overrides("sim_node", **sim_extra))
    mapping = MappingNode(model=model, parameter_overrides=overrides("mapping_node", map_file=""))
    loc = LocalizationNode(model=model, parameter_overrides=overrides("localization_node", **loc_extra))
    probe = rclpy.create_node("dmn_demo")
    poses: list[PoseWithCovarianceStamped] = []
    probe.create_subscription(PoseWithCovarianceStamped, "dmn_pose", poses.append, POSE_QOS)
    executor = MultiThreadedExecutor(num_threads=4)
    for n in (sim, mapping, loc, probe):
        executor.add_node(n)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()

    def wait(cond: Any, what: str, timeout: float = 60.0) -> None:
        t0 = time.monotonic()
        while not cond():
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"timed out waiting for {what}")
            time.sleep(0.01)

    def call(srv: Any, name: str) -> Any:
        cli = probe.create_client(srv, name)
        if not cli.wait_for_service(timeout_sec=10.0):
            raise TimeoutError(f"service {name} not available")
        fut = cli.call_async(srv.Request())
        wait(fut.done, name)
        return fut.result()

    threshold = 8.94 * model.info.area_size_m / 40.0
    print(f"dmn-demo: model {model_path} ({model.info.fingerprint}), {model.info.image_height}x"
          f"{model.info.image_width} images, device {loc.localizer.device}, ROS_DOMAIN_ID "
          f"{os.environ['ROS_DOMAIN_ID']}, params {params_file}")
    print(f"global localization in {sim.p['domain']} worlds, K = {loc.localizer.config.max_particles}, "
          f"{sim.p['num_contexts']} contexts, "
          f"systematic resampling at ESS < {loc.localizer.config.resample_threshold}·K; "
          f"success: x-y error < {threshold:.2f} m")
    print(f"{'episode':>7} {'world':>9} {'step':>4} {'err_xy_m':>9} {'success':>7} {'spread_m':>8} "
          f"{'converged':>9} {'ESS':>6} {'latency_ms':>10}")
    results: list[list[bool]] = []
    converged_last: list[bool] = []
    t_start = time.monotonic()
    try:
        for ep in range(args.episodes):
            seed = args.first_seed + ep
            call(Trigger, "mapping_node/clear_map")
            wait(lambda: len(mapping.view_map) == 0, "map cleared")
            sim.reset(seed)
            n_ctx = len(sim.context_poses)
            sim.publish_contexts()
            wait(lambda n=n_ctx: loc.localizer.has_map and len(loc.localizer.view_map) == n, "map at localizer")
            call(Empty, "reinitialize_global_localization")
            frames: list[BeliefFrame] = []
            ok: list[bool] = []
            for t in range(1, args.steps + 1):
                done = loc.counters["processed"]
                stamp = sim.step_once()
                wait(lambda d=done: loc.counters["processed"] > d, "filter step")
                wait(lambda s=stamp: poses and abs(stamp_to_sec(poses[-1].header.stamp) - s) < 1e-6, "pose")
                est = pose_to_xyyaw(poses[-1].pose.pose)
                truth = sim.truth.copy()
                err = float(np.hypot(*(est[:2] - truth[:2])))
                e = loc.last_estimate
                ok.append(err < threshold)
                frames.append(BeliefFrame(t=t, particles=loc.localizer.particles_metric(),
                                          weights=loc.localizer.weights(), truth=truth, estimate=est, error=err))
                conv = "yes" if e.health is not None and e.health.converged else "no"
                print(f"{ep:>7} {seed:>9} {t:>4} {err:>9.2f} {('yes' if ok[-1] else 'no'):>7} "
                      f"{e.spread:>8.2f} {conv:>9} {e.ess:>6.0f} {e.latency_ms:>10.0f}", flush=True)
            results.append(ok)
            converged_last.append(conv == "yes")
            png = out_dir / f"episode_{ep:02d}_world_{seed}.png"
            _plot(png, sim.world, frames, sim.context_poses,
                  f"{sim.p['domain']} world {seed}: global localization, K={loc.localizer.config.max_particles}")
    except TimeoutError as exc:
        print(f"dmn-demo: {exc}", file=sys.stderr)
        return 1
    finally:
        executor.shutdown()
        for n in (sim, mapping, loc, probe):
            n.destroy_node()
        rclpy.try_shutdown()
    r = np.array(results, dtype=float)
    print(f"success rate = #episodes with err_xy < {threshold:.2f} m / #episodes: "
          f"t=1 {r[:, 0].mean():.0%}, t={args.steps} {r[:, -1].mean():.0%} "
          f"({len(results)} episodes, worlds {args.first_seed}..{args.first_seed + len(results) - 1}, one seed)")
    print(f"converged at t={args.steps}: {sum(converged_last)} of {len(results)} episodes (docs/health.md); a "
          "success without convergence is a spread belief whose mean happens to lie near the robot")
    print(f"belief plots: {out_dir.resolve()}  ({time.monotonic() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
