"""``dmn-world``: gallery pictures, dataset generation and throughput measurement for the sim worlds.

Examples::

    dmn-world gallery --out docs/gallery
    dmn-world generate --domain maze --split train --num-envs 400 --views-per-env 300 \\
        --image-size 32 --out data/maze32 --workers 2
    dmn-world throughput --domain maze --episodes 64
"""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "osmesa")
os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])

import argparse
import multiprocessing as mp
import sys
import time
from pathlib import Path

import numpy as np

from dmn_ros.data.dataset_format import SPLITS, DatasetDir, DatasetMeta, env_name, env_seed
from dmn_ros.data.episodes import generate_env_views, sample_episode_from_views
from dmn_ros.errors import console_main
from dmn_ros.files import atomic_save_figure
from dmn_ros.worlds import DOMAINS, make_world
from dmn_ros.worlds.renderer import CAMERA_NAME

__all__ = ["main"]


# --- generate ------------------------------------------------------------------------------------------
def _generate_one(job: tuple[str, str, int, int, int, tuple[int, int], float]) -> str:
    """Render one environment and write its npz (runs in a worker; the parent updates dataset.yaml)."""
    out, domain, seed, num_traj, steps, image_size, fov = job
    name = env_name(domain, seed)
    with make_world(domain, seed=seed, image_size=image_size, fov_deg=fov) as w:
        rng = np.random.default_rng([seed, 1])
        views = generate_env_views(w, rng, num_trajectories=num_traj, steps=steps, name=name)
    DatasetDir(out).write_env_file(views)
    return name


def cmd_generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    if args.views_per_env % args.steps_per_trajectory:
        raise SystemExit("--views-per-env must be a multiple of --steps-per-trajectory")
    size = (args.image_size, args.image_size)
    ds = DatasetDir.create(args.out, DatasetMeta(image_size=size, domain=args.domain, fov_deg=args.fov,
                                                 camera=CAMERA_NAME, source=f"dmn_ros.worlds.{args.domain}"))
    seeds = [env_seed(args.split, i) for i in range(args.start_index, args.start_index + args.num_envs)]
    done = [env_name(args.domain, s) for s in seeds if ds.has_env(env_name(args.domain, s))]
    if done:  # resume: files written by an interrupted run are complete (atomic writes)
        ds.add_to_split(args.split, done)
    todo = [s for s in seeds if not ds.has_env(env_name(args.domain, s))]
    jobs = [(str(ds.path), args.domain, s, args.views_per_env // args.steps_per_trajectory,
             args.steps_per_trajectory, size, args.fov) for s in todo]
    desc = f"{args.domain}/{args.split}"
    bar = tqdm(total=len(seeds), initial=len(seeds) - len(todo), unit="env", desc=desc)
    t0 = time.perf_counter()
    if args.workers <= 1:
        results = map(_generate_one, jobs)
        pool = None
    else:
        # spawn: every worker gets a clean process and its own GL context.
        pool = mp.get_context("spawn").Pool(args.workers)
        results = pool.imap_unordered(_generate_one, jobs)
    try:
        for name in results:
            ds.add_to_split(args.split, [name])
            bar.update(1)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    dt = time.perf_counter() - t0
    if todo:
        print(f"wrote {len(todo)} envs in {dt:.1f} s ({len(todo) * args.views_per_env / dt:.0f} views/s) "
              f"to {ds.path}")
    return 0


# --- gallery -------------------------------------------------------------------------------------------
def _gallery_one(domain: str, out: Path, *, seed: int, image_size: int) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    with make_world(domain, seed=seed, image_size=(image_size, image_size)) as w:
        views = generate_env_views(w, rng, num_trajectories=6, steps=20, name=env_name(domain, seed))
        ep = sample_episode_from_views(views, rng, num_contexts=4, T=5, query_mode="segment")
        occ = w.occupancy(0.1)
        xmin, xmax, ymin, ymax = w.bounds
    fig, axes = plt.subplots(2, 5, figsize=(10, 4.4))
    for i, ax in enumerate(axes[0, :4]):
        ax.imshow(ep.context_images[i])
        ax.set_title(f"context {i}", fontsize=8)
    for t, ax in enumerate(axes[1]):
        ax.imshow(ep.query_images[t])
        ax.set_title(f"query t={t + 1}", fontsize=8)
    axes[0, 4].axis("off")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{domain} seed {seed}: {image_size}x{image_size} first-person views")
    views_png = out / f"{domain}_views.png"
    atomic_save_figure(fig, views_png, dpi=110, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    ax.imshow(occ, origin="lower", extent=(xmin, xmax, ymin, ymax), cmap="Greys", vmin=0, vmax=1.3)
    for traj in views.trajectories():
        ax.plot(views.poses[traj, 0], views.poses[traj, 1], "-", color="0.75", lw=0.8)
    arrow = 1.5
    cp, qp = ep.context_poses, ep.query_poses
    ax.quiver(cp[:, 0], cp[:, 1], np.cos(cp[:, 2]) * arrow, np.sin(cp[:, 2]) * arrow, color="tab:blue",
              angles="xy", scale_units="xy", scale=1, width=0.006, label="contexts")
    ax.plot(qp[:, 0], qp[:, 1], "-", color="tab:red", lw=1.5)
    ax.quiver(qp[:, 0], qp[:, 1], np.cos(qp[:, 2]) * arrow, np.sin(qp[:, 2]) * arrow, color="tab:red",
              angles="xy", scale_units="xy", scale=1, width=0.006, label="query trajectory")
    ax.set_xlim(xmin, xmax)
    ax.set_ylim(ymin, ymax)
    ax.set_xlabel("x [m]")
    ax.set_ylabel("y [m]")
    ax.set_title(f"{domain} seed {seed}: stored trajectories (grey), episode")
    ax.legend(loc="upper right", fontsize=8)
    map_png = out / f"{domain}_map.png"
    atomic_save_figure(fig, map_png, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return [views_png, map_png]


def cmd_gallery(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for domain in args.domains:
        for p in _gallery_one(domain, out, seed=args.seed, image_size=args.image_size):
            print(p)
    return 0


# --- throughput ----------------------------------------------------------------------------------------
def _episodes_per_s(dataset: object, *, workers: int, n: int) -> float:
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=None, num_workers=workers,
                        multiprocessing_context="spawn" if workers > 0 else None)
    it = iter(loader)
    for _ in range(workers or 1):  # warm-up: process start, imports and each worker's first world
        next(it)
    t0 = time.perf_counter()
    count = sum(1 for _ in it)
    assert count == n - (workers or 1), (count, n)
    return count / (time.perf_counter() - t0)


def cmd_throughput(args: argparse.Namespace) -> int:
    from dmn_ros.data.torch_dataset import EpisodeDataset, OnTheFlyEpisodes

    size = (args.image_size, args.image_size)
    with make_world(args.domain, seed=0, image_size=size) as w:
        poses = w.sample_free_poses(300, np.random.default_rng(0))
        w.render(poses[:10])
        t0 = time.perf_counter()
        w.render(poses)
        fps = 300 / (time.perf_counter() - t0)
        print(f"render: {fps:.0f} images/s ({args.domain}, {size[0]}px, 1 process)")
    for workers in (1, 2):
        per = args.episodes // workers
        ds = OnTheFlyEpisodes(args.domain, seed=0, image_size=size, num_contexts=4, T=5, num_episodes=per,
                              num_trajectories=args.otf_trajectories, steps=args.otf_steps,
                              episodes_per_world=args.otf_episodes_per_world)
        eps = _episodes_per_s(ds, workers=workers, n=per * workers)
        print(f"on-the-fly: {eps:.1f} episodes/s with {workers} worker process(es) "
              f"(Nc=4, T=5, {args.otf_episodes_per_world} episodes per fresh world of "
              f"{args.otf_trajectories}x{args.otf_steps} views)")
    if args.data:
        for workers in (1, 2):
            per = args.episodes * 10 // workers
            ds = EpisodeDataset(args.data, args.split, num_contexts=4, T=5, num_episodes=per)
            eps = _episodes_per_s(ds, workers=workers, n=per * workers)
            print(f"cached ({args.data}, {args.split}): {eps:.0f} episodes/s with {workers} worker(s)")
    return 0


# --- entry point ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dmn-world", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="render environments into a dataset directory (resumable)")
    g.add_argument("--domain", choices=sorted(DOMAINS), default="maze")
    g.add_argument("--split", choices=SPLITS, default="train")
    g.add_argument("--num-envs", type=int, required=True)
    g.add_argument("--start-index", type=int, default=0, help="first environment index within the split")
    g.add_argument("--views-per-env", type=int, default=300)
    g.add_argument("--steps-per-trajectory", type=int, default=30)
    g.add_argument("--image-size", type=int, default=32)
    g.add_argument("--fov", type=float, default=90.0, help="horizontal field of view in degrees")
    g.add_argument("--workers", type=int, default=1, help="render processes (one GL context each)")
    g.add_argument("--out", required=True)
    g.set_defaults(func=cmd_generate)

    v = sub.add_parser("gallery", help="sample views and top-down maps as PNGs")
    v.add_argument("--out", default="docs/gallery")
    v.add_argument("--domains", nargs="+", choices=sorted(DOMAINS), default=sorted(DOMAINS))
    v.add_argument("--seed", type=int, default=env_seed("test", 0))
    v.add_argument("--image-size", type=int, default=64)
    v.set_defaults(func=cmd_gallery)

    t = sub.add_parser("throughput", help="episodes/s with 1 and 2 worker processes")
    t.add_argument("--domain", choices=sorted(DOMAINS), default="maze")
    t.add_argument("--image-size", type=int, default=32)
    t.add_argument("--episodes", type=int, default=48)
    t.add_argument("--otf-trajectories", type=int, default=4)
    t.add_argument("--otf-steps", type=int, default=20)
    t.add_argument("--otf-episodes-per-world", type=int, default=8)
    t.add_argument("--data", default=None, help="also measure a cached dataset directory")
    t.add_argument("--split", default="train")
    t.set_defaults(func=cmd_throughput)
    return p


@console_main("dmn-world")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
