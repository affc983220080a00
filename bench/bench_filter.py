"""Latency of one particle-filter step (observation model + filter math) vs particles and contexts.

Not a test: prints a markdown table and writes JSON. Reproduce with
``.venv/bin/python bench/bench_filter.py --out docs/perf.json`` (add ``--device cuda`` on a GPU).
Each cell times ``filter_step`` with a prepared map, the same call the localization node makes.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from dmn_ros.filter import FilterConfig, encode_map, filter_step, init_uniform
from dmn_ros.model import DMN


class ReferenceModel:
    """The literal SPEC model behind the filter's ObservationModel interface.

    ``per_particle=False`` batches all (particle, context) pairs of the literal reading;
    ``per_particle=True`` is the straightforward implementation issue 8 measures against:
    one particle at a time, each against all contexts, nothing cached between calls.
    """

    def __init__(self, model: DMN, *, per_particle: bool = False) -> None:
        self.m = model
        self.per_particle = per_particle
        self._emb: torch.Tensor | None = None

    def embed_views(self, images: torch.Tensor) -> torch.Tensor:
        return self.m.embed_views(images)

    def prepare_map(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._emb = embeddings  # the reference recomputes everything per step
        return embeddings, embeddings

    def prepare_query(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return query, query

    def log_likelihood_prepared(self, map_a, map_g, context_poses, q, hq, particles, nearest=0):
        assert self._emb is not None
        if not self.per_particle:
            return self.m.reference_log_likelihood(q, self._emb, context_poses, particles)
        return torch.cat([self.m.reference_log_likelihood(q, self._emb, context_poses, particles[:, i : i + 1])
                          for i in range(particles.shape[1])], dim=1)


def peak_gflops(device: torch.device) -> float:
    """Measured fp32 matmul throughput: the denominator for 'fraction of peak'."""
    n = 2048
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    for _ in range(2):
        a @ b
    _sync(device)
    t = time.perf_counter()
    reps = 5
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(
    model: Any, *, k: int, nc: int, device: torch.device, reps: int, warmup: int, nearest: int = 0
) -> dict[str, float]:
    g = torch.Generator(device=device).manual_seed(0)
    ctx = torch.rand(1, nc, 3, 32, 32, device=device, generator=g)
    poses = (torch.rand(1, nc, 3, device=device, generator=g) * 2 - 1) * torch.tensor([1.0, 1.0, 3.14], device=device)
    query = torch.rand(1, 3, 32, 32, device=device, generator=g)
    cfg = FilterConfig(transition_noise=(0.01, 0.01, 0.05), resampling="systematic", nearest_contexts=nearest)
    ego = torch.zeros(1, 3, device=device)
    with torch.inference_mode():
        pm = encode_map(model, images=ctx, poses=poses)
        belief = init_uniform(batch=1, num_particles=k, bounds=(-1, 1, -1, 1), generator=g, device=device)
        with FlopCounterMode(display=False) as fc:
            filter_step(model, belief=belief, prepared_map=pm, query=query, egomotion=ego, config=cfg, generator=g)
        flops = fc.get_total_flops()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for i in range(warmup + reps):
            _sync(device)
            t = time.perf_counter()
            res = filter_step(model, belief=belief, prepared_map=pm, query=query, egomotion=ego, config=cfg,
                              generator=g)
            _sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - t)
            belief = res.belief
    med = statistics.median(times)
    p95 = sorted(times)[min(len(times) - 1, round(0.95 * (len(times) - 1)))]
    mem = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"median_ms": 1e3 * med, "p95_ms": 1e3 * p95, "gflop": flops / 1e9, "gflops": flops / 1e9 / med,
            "peak_mem_mib": mem}


def train_throughput(device: torch.device, steps: int = 5) -> float:
    """Episodes per second of the paper's recipe (B = 16, K = 32, Nc = 4, 32x32, one step), forward + backward."""
    from dmn_ros.filter import init_gaussian, run_episode
    from dmn_ros.training.loss import pose_mse

    model = DMN().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    b = 16
    ctx = torch.rand(b, 4, 3, 32, 32, device=device)
    poses = torch.rand(b, 4, 3, device=device)
    q = torch.rand(b, 1, 3, 32, 32, device=device)
    truth = torch.rand(b, 3, device=device)
    cfg = FilterConfig(resampling="soft")
    times = []
    for i in range(steps + 1):
        _sync(device)
        t = time.perf_counter()
        belief = init_gaussian(mean=truth, std=(0.3, 0.3, 0.5), num_particles=32)
        res, _ = run_episode(model, belief=belief, prepared_map=encode_map(model, images=ctx, poses=poses),
                             queries=q, egomotion=torch.zeros(b, 1, 3, device=device), config=cfg)
        loss = pose_mse(res[0].mean, truth)
        opt.zero_grad()
        loss.backward()
        opt.step()
        _sync(device)
        if i:
            times.append(time.perf_counter() - t)
    return b / statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cpu")
    p.add_argument("--k", default="64,256,1024,2048,8192")
    p.add_argument("--nc", default="4,16,64,256")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--max-reference-rows", type=int, default=2048 * 16,
                   help="skip the reference where K*Nc exceeds this (it is slow and memory hungry)")
    p.add_argument("--max-loop-reference-k", type=int, default=256,
                   help="time the one-particle-at-a-time reference only up to this K (it is linear in K)")
    p.add_argument("--max-seconds-per-cell", type=float, default=20.0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--nearest", type=int, default=8, help="also time nearest-M attention where Nc > M (0: off)")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = DMN().to(device).eval()
    ref = ReferenceModel(model)
    ref_loop = ReferenceModel(model, per_particle=True)
    peak = peak_gflops(device)
    rows = []
    skip_k: dict[str, int] = {}
    for nc in [int(v) for v in args.nc.split(",")]:
        for k in [int(v) for v in args.k.split(",")]:
            paths: list[tuple[str, Any, int]] = [
                ("fast", model, 0), ("reference, batched", ref, 0), ("reference, per particle", ref_loop, 0)]
            if 0 < args.nearest < nc:
                paths.append((f"fast, nearest {args.nearest}", model, args.nearest))
            for name, m, nearest in paths:
                if name.startswith("reference") and k * nc > args.max_reference_rows:
                    continue
                if name == "reference, per particle" and k > args.max_loop_reference_k:
                    continue
                if skip_k.get(name, 10**9) <= k * nc:
                    continue
                r = time_step(m, k=k, nc=nc, device=device, reps=args.reps, warmup=args.warmup, nearest=nearest)
                r.update({"path": name, "K": k, "Nc": nc, "frac_peak": r["gflops"] / peak})
                rows.append(r)
                print(f"{name:24s} K={k:5d} Nc={nc:4d} median {r['median_ms']:9.1f} ms  p95 {r['p95_ms']:9.1f} ms "
                      f"{r['gflops']:7.1f} GFLOP/s", flush=True)
                if r["median_ms"] / 1e3 > args.max_seconds_per_cell:
                    skip_k[name] = k * nc  # larger cells would only take longer
    tput = train_throughput(device)
    machine = {"device": str(device), "cpu": platform.processor() or platform.machine(),
               "threads": torch.get_num_threads(), "torch": torch.__version__, "peak_gflops_fp32_matmul": peak}
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(device)
    print(f"\nmachine: {machine}\ntraining throughput: {tput:.1f} episodes/s (B=16, K=32, Nc=4, 32x32)\n")
    fast = {(r["K"], r["Nc"]): r["median_ms"] for r in rows if r["path"] == "fast"}
    for r in rows:  # how many times slower than the fast path in the same run
        r["x_fast"] = r["median_ms"] / fast[(r["K"], r["Nc"])]
    print("| path | K | Nc | median ms | p95 ms | Hz | × fast | GFLOP/step | GFLOP/s | % of peak | peak mem MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['path']} | {r['K']} | {r['Nc']} | {r['median_ms']:.1f} | {r['p95_ms']:.1f} | "
              f"{1e3 / r['median_ms']:.1f} | {r['x_fast']:.2f} | {r['gflop']:.2f} | {r['gflops']:.1f} | "
              f"{100 * r['frac_peak']:.0f} | {r['peak_mem_mib']:.0f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": machine, "train_episodes_per_s": tput, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
