"""Nearest-M attention vs full attention on a large map: accuracy and step time on the evaluation set.

Not a test: prints a markdown table. Reproduce with
``.venv/bin/python bench/bench_nearest.py --data /work/cache/maze32`` (about 10 CPU-minutes at the
defaults). Each row runs the evaluation protocol's filter (``run_filter``, the code path of
``dmn-eval``) with the shipped model and its calibration on the same seeded test episodes, with
``--nc`` random contexts per episode: a map as large as several robots would share.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch

from dmn_ros.evaluation.protocol import (
    EvalSettings,
    make_episode_set,
    rmse,
    run_filter,
    success_rate,
    success_threshold_m,
)
from dmn_ros.export import default_model_path, load_model
from dmn_ros.localizer import model_likelihood_scale


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default="/work/cache/maze32")
    p.add_argument("--model", default=str(default_model_path()))
    p.add_argument("--episodes", type=int, default=12)
    p.add_argument("--nc", type=int, default=64)
    p.add_argument("--nearest", default="0,16,8,4", help="M values; 0 = full attention")
    p.add_argument("--k-global", type=int, default=1024)
    p.add_argument("--k-tracking", type=int, default=256)
    p.add_argument("--T", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(args.model, device=args.device)
    eps = make_episode_set(args.data, split="test", num_episodes=args.episodes, num_contexts=args.nc, T=args.T)
    thr = success_threshold_m(eps.area_size_m)
    base = EvalSettings(num_contexts=args.nc, T=args.T, likelihood_scale=model_likelihood_scale(model.info.config))
    print(f"{args.episodes} test episodes, Nc = {args.nc}, T = {args.T}, global K = {args.k_global}, "
          f"tracking K = {args.k_tracking}, {args.threads} thread(s), model {model.info.fingerprint}\n")
    print("| attention | global success t=1 (%) | global success t=T (%) | tracking RMSE t=T (m) | "
          "global s/step | tracking s/step |")
    print("|---|---|---|---|---|---|")
    for m in [int(v) for v in args.nearest.split(",")]:
        row = []
        times = []
        for mode, k in (("global", args.k_global), ("tracking", args.k_tracking)):
            s = dataclasses.replace(base, mode=mode, num_particles=k, nearest_contexts=m)
            t0 = time.perf_counter()
            err = run_filter(model.module, eps, s, device=args.device)
            times.append((time.perf_counter() - t0) / (args.episodes * args.T))
            row.append(err)
        g, tr = row
        sr = success_rate(g, thr)
        name = "full" if m == 0 else f"nearest {m}"
        print(f"| {name} | {100 * sr[0]:.1f} | {100 * sr[-1]:.1f} | {float(np.asarray(rmse(tr))[-1]):.2f} | "
              f"{times[0]:.2f} | {times[1]:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
