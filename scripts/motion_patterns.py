"""Global localization from the robot's own motion: drive, turn in place, turn then drive, or independent views.

The question behind it: a robot's consecutive frames localize far worse than the paper's independent
views (docs/RESULTS.md). Would turning on the spot first, as robots do for AMCL, give the filter the
independent evidence it lacks? Sim-like episodes (one maze of ``--split`` per episode, free-space
contexts, the uniform prior over the map, K = 2048) through the public API, so the figures are what
the node gets.

    .venv/bin/python scripts/motion_patterns.py models/dmn_maze32_global.pt --worlds 24 --out out/motion.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from dmn_ros.data.dataset_format import SPLIT_SEED_OFFSETS
from dmn_ros.export import load_model
from dmn_ros.localizer import Localizer, LocalizerConfig, build_map, model_likelihood_scale
from dmn_ros.worlds import make_world, smooth_trajectory

PATTERNS = ("drive", "spin", "spin_drive", "independent")


def poses_for(pattern: str, drive: np.ndarray, world, rng: np.random.Generator, spin: int) -> np.ndarray:
    """``(steps, 3)`` true poses from ``drive``'s start; consecutive differences are the odometry."""
    steps = len(drive)
    if pattern == "drive":
        return drive
    turn = np.array([[*drive[0, :2], drive[0, 2] + k * 2.0 * math.pi / spin] for k in range(steps)])
    if pattern == "spin":
        return turn
    if pattern == "spin_drive":
        rest = smooth_trajectory(world, rng, steps=steps - spin + 1, start=turn[spin - 1])
        return np.concatenate([turn[:spin], rest[1:]])
    return world.sample_free_poses(steps, rng)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--worlds", type=int, default=24)
    ap.add_argument("--contexts", type=int, default=32, help="as sim_node publishes")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--spin", type=int, default=8, help="frames per full turn (45° each at 8)")
    ap.add_argument("--threshold-m", type=float, default=8.94)
    ap.add_argument("--patterns", default=",".join(PATTERNS), help="comma-separated subset of " + ", ".join(PATTERNS))
    ap.add_argument("--temperatures", default="",
                    help="comma-separated log-likelihood temperatures (default: the two the model carries)")
    ap.add_argument("--split", default="test", choices=sorted(SPLIT_SEED_OFFSETS), help="world seeds of this split")
    ap.add_argument("--out", default="out/motion_patterns.json")
    args = ap.parse_args()
    patterns = [p for p in args.patterns.split(",") if p]
    if unknown := set(patterns) - set(PATTERNS):
        ap.error(f"unknown patterns {sorted(unknown)}")
    if "spin_drive" in patterns and args.steps < args.spin:
        ap.error(f"spin_drive needs --steps >= --spin ({args.spin})")
    torch.set_num_threads(1)
    model = load_model(args.model, device=torch.device("cpu"))
    report: dict[str, dict] = {}
    if args.temperatures:
        streams = [(f"T={t}", float(t)) for t in args.temperatures.split(",")]
    else:  # the two temperatures the model file carries
        streams = [(s, model_likelihood_scale(model.info.config, independent_frames=s == "independent"))
                   for s in ("robot", "independent")]
    for stream, scale in streams:
        for pattern in patterns:
            errors = []
            for i in range(args.worlds):
                seed = SPLIT_SEED_OFFSETS[args.split] + i
                world = make_world("maze", seed=seed, image_size=(model.info.image_height, model.info.image_width))
                rng = np.random.default_rng(seed)
                drive = smooth_trajectory(world, rng, steps=args.steps)
                ctx = world.sample_free_poses(args.contexts, rng)  # the same map for every pattern
                truth = poses_for(pattern, drive, world, rng, args.spin)
                loc = Localizer(model, config=LocalizerConfig(device="cpu", likelihood_scale=scale), seed=seed)
                loc.set_map(build_map(model, world.render(ctx), ctx))
                loc.init_global()
                est = loc.localize(world.render(truth), odometry=truth)
                world.close()
                errors.append([float(np.hypot(*(e.mean[:2] - p[:2]))) for e, p in zip(est, truth, strict=True)])
            err = np.asarray(errors)
            success = (err < args.threshold_m).mean(axis=0)
            report[f"{stream}/{pattern}"] = {"likelihood_scale": scale, "success": success.tolist(),
                                             "errors": err.tolist()}
            shown = [t for t in (0, 3, 4, 7, 11) if t < args.steps]
            print(f"temperature {scale:<6} ({stream:11s}) {pattern:11s} success at t = "
                  + ", ".join(str(t + 1) for t in shown) + ": "
                  + ", ".join(f"{100 * success[t]:.0f} %" for t in shown), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report))


if __name__ == "__main__":
    main()
