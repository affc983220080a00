"""Fixed-K tracking vs KLD-adaptive particle count: accuracy, particle count and step time.

Not a test: prints a markdown table. Reproduce with ``.venv/bin/python bench/bench_kld.py``
(about 2.5 CPU-minutes; 5.5 minutes wall on a loaded 2-core machine). Every configuration runs
the public :class:`Localizer` (batch size 1; resampling when ESS < K/2 unless "every update";
adaptive: a KLD count at each resampling) on the same seeded episodes of the maze32 test split,
with the evaluation protocol's motion noise (0.3 m, 3°) and a tracking prior whose mean is drawn
around the truth with its own σ: the paper's 6 m / 30°, and a tight 0.5 m / 5° (a robot given a
good initial pose).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from dmn_ros.evaluation.protocol import make_episode_set
from dmn_ros.export import load_model
from dmn_ros.localizer import Localizer, LocalizerConfig, embed_images
from dmn_ros.maps import ViewMap


@dataclass
class Row:
    name: str
    errors: np.ndarray
    """(E, T) x-y errors, meters."""
    counts: np.ndarray
    """(E, T) particles weighed at each step."""
    times_ms: list[float]
    """Wall time of each ``Localizer.step`` (image preparation, model, filter, health)."""


def run(model, episodes, cfg: LocalizerConfig, *, name: str, prior: tuple[float, float], T: int, seed: int) -> Row:
    rng = np.random.default_rng(seed)
    std = np.array([prior[0], prior[0], math.radians(prior[1])])
    errors = np.zeros((len(episodes), T))
    counts = np.zeros((len(episodes), T), dtype=np.int64)
    times: list[float] = []
    for e, ep in enumerate(episodes):
        vm = ViewMap.for_model(model.info)
        vm.add(embeddings=embed_images(model, list(ep.context_images)), poses=ep.context_poses,
               ids=[f"c/{i}" for i in range(len(ep.context_poses))])
        loc = Localizer(model, config=cfg, seed=seed + e)
        loc.set_map(vm)
        mean0 = ep.query_poses[0] + rng.normal(size=3) * std  # same draws for every configuration
        loc.init_pose(mean0, np.diag(std**2))
        for t in range(T):
            t0 = time.perf_counter()
            est = loc.step(ep.query_images[t], None if t == 0 else ep.egomotion[t])
            times.append(1e3 * (time.perf_counter() - t0))
            errors[e, t] = math.hypot(est.mean[0] - ep.query_poses[t, 0], est.mean[1] - ep.query_poses[t, 1])
            counts[e, t] = est.num_particles
    return Row(name, errors, counts, times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="models/dmn_maze32.pt")
    p.add_argument("--data", default="/work/cache/maze32")
    p.add_argument("--episodes", type=int, default=6)
    p.add_argument("--T", type=int, default=8, help="steps per episode (RMSE is reported at t = 5 and t = T)")
    p.add_argument("--nc", type=int, default=4, help="context views per map (the protocol's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(args.model, device="cpu")
    eps = make_episode_set(args.data, split="test", num_episodes=args.episodes, num_contexts=args.nc, T=args.T,
                           seed=args.seed).episodes
    base = LocalizerConfig(max_particles=2048, tracking_particles=256, motion_noise_xy_m=0.3,
                           motion_noise_yaw_rad=math.radians(3.0), device="cpu", adaptive_particles=False)
    adaptive = replace(base, adaptive_particles=True)
    paper, tight = (6.0, 30.0), (0.5, 5.0)
    every = replace(adaptive, resample_threshold=1.0)  # resample every update, as nav2_amcl (resample_interval 1)
    configs = [
        ("prior 6 m/30°, fixed K=256", paper, base),
        ("prior 6 m/30°, adaptive 500..2048", paper, adaptive),
        ("prior 6 m/30°, fixed K=2048", paper, replace(base, tracking_particles=2048)),
        ("prior 0.5 m/5°, fixed K=256", tight, base),
        ("prior 0.5 m/5°, adaptive 500..2048", tight, adaptive),
        ("prior 0.5 m/5°, adaptive 500..2048, resample every update", tight, every),
        ("prior 0.5 m/5°, adaptive 100..2048, resample every update", tight, replace(every, min_particles=100)),
    ]
    rows = []
    for name, prior, cfg in configs:
        t0 = time.perf_counter()
        rows.append(run(model, eps, cfg, name=name, prior=prior, T=args.T, seed=args.seed))
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    t5 = min(5, args.T) - 1
    print(f"\n{args.episodes} test episodes, Nc = {args.nc}, T = {args.T}, {torch.get_num_threads()} torch thread(s)\n")
    print(f"| configuration | RMSE t=5 (m) | RMSE t={args.T} (m) | mean K | mean K at t=1 / t=5 / t={args.T} | "
          "mean step ms | median step ms |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        rm = np.sqrt((r.errors**2).mean(axis=0))
        k = r.counts.mean(axis=0)
        print(f"| {r.name} | {rm[t5]:.2f} | {rm[-1]:.2f} | {r.counts.mean():.0f} | "
              f"{k[0]:.0f} / {k[t5]:.0f} / {k[-1]:.0f} | {statistics.mean(r.times_ms):.1f} | "
              f"{statistics.median(r.times_ms):.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
