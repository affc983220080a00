"""``dmn-eval``: the paper's protocol on a fixed test set; writes a markdown table, JSON and PNG curves."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np

from dmn_ros.evaluation.protocol import (
    EpisodeSet,
    EvalSettings,
    closest_context_errors,
    make_episode_set,
    rmse,
    run_filter,
    run_regression,
    success_rate,
    success_threshold_m,
    uninformed_errors,
)
from dmn_ros.export import LoadedModel, atomic_write_bytes, default_model_path, load_model
from dmn_ros.geometry import MetricScale
from dmn_ros.localizer import model_likelihood_scale
from dmn_ros.model import model_kind

METHOD_LABELS = {"dmn": "DMN", "latent_image": "PF + latent image map", "latent_vector": "PF + latent vector map",
                 "regression": "regression"}


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v]


def _in_model_scale(eps: EpisodeSet, model: LoadedModel) -> EpisodeSet:
    """The model sees coordinates normalized with *its* meters_per_unit (SPEC "one metric scale")."""
    s = eps.scale
    return dataclasses.replace(eps, scale=MetricScale(model.info.meters_per_unit, s.origin_x, s.origin_y))


def _run(model: LoadedModel, eps: EpisodeSet, settings: EvalSettings, device: str) -> np.ndarray:
    """The filter as the node runs this model: its metric scale and its stored calibration.

    The regression baseline has no filter: it runs :func:`run_regression` on the same episodes.
    """
    if model_kind(model.info.config) == "regression":
        return run_regression(model.module, _in_model_scale(eps, model), settings, device=device)
    settings = dataclasses.replace(settings, likelihood_scale=model_likelihood_scale(model.info.config))
    return run_filter(model.module, _in_model_scale(eps, model), settings, device=device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", action="append", help="exported model(s); several = seeds, averaged")
    p.add_argument("--baseline-model", help="also evaluate this model on the same episodes: a before/after table")
    p.add_argument("--data", default="/work/cache/maze32")
    p.add_argument("--split", default="test")
    p.add_argument("--out", default="out/eval")
    p.add_argument("--episodes", type=int, default=100)
    p.add_argument("--T", type=int, default=20, help="longest horizon for the success-vs-time curve")
    p.add_argument("--nc", type=int, default=4)
    p.add_argument("--k-global", type=int, default=2048)
    p.add_argument("--k-tracking", type=int, default=256)
    p.add_argument("--k-sweep", type=_ints, default=[])
    p.add_argument("--nc-sweep", type=_ints, default=[])
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [load_model(m, device=args.device) for m in (args.model or [str(default_model_path())])]
    kinds = {model_kind(m.info.config) for m in models}
    if len(kinds) > 1:
        raise SystemExit(f"--model files are seeds of one method; got kinds {sorted(kinds)}")
    label = METHOD_LABELS[kinds.pop()]
    max_nc = max([args.nc, *args.nc_sweep])
    eps = make_episode_set(args.data, split=args.split, num_episodes=args.episodes, num_contexts=max_nc,
                           T=max(args.T, 5), seed=args.seed)
    thr = success_threshold_m(eps.area_size_m)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    T = max(args.T, 5)

    def per_model(settings: EvalSettings) -> np.ndarray:
        """(seeds, E, T) errors."""
        return np.stack([_run(m, eps, settings, args.device) for m in models])

    t0 = time.monotonic()
    glob = per_model(EvalSettings(mode="global", num_particles=args.k_global, T=T, num_contexts=args.nc,
                                  seed=args.seed))
    trk = per_model(EvalSettings(mode="tracking", num_particles=args.k_tracking, T=5, num_contexts=args.nc,
                                 seed=args.seed))
    succ = np.stack([success_rate(e, thr) for e in glob])  # (S, T)
    trk_rmse = np.stack([rmse(e) for e in trk])  # (S, 5)
    cc = closest_context_errors(eps, num_contexts=args.nc, T=T)
    un_g = uninformed_errors(eps, EvalSettings(mode="global", T=T, seed=args.seed))
    un_t = uninformed_errors(eps, EvalSettings(mode="tracking", T=5, seed=args.seed))

    rows = [
        (label, f"{100 * succ[:, 0].mean():.1f}", f"{100 * succ[:, 4].mean():.1f}", f"{trk_rmse[:, 4].mean():.2f}"),
        ("closest context", f"{100 * success_rate(cc, thr)[0]:.1f}", f"{100 * success_rate(cc, thr)[4]:.1f}",
         f"{rmse(cc)[4]:.2f}"),
        ("uninformed", f"{100 * success_rate(un_g, thr)[0]:.1f}", f"{100 * success_rate(un_g, thr)[4]:.1f}",
         f"{rmse(un_t)[4]:.2f}"),
    ]
    md = [
        f"# dmn-eval: {eps.description['data']} ({args.split}), Nc = {args.nc}",
        "",
        f"{len(eps.episodes)} episodes x {len(models)} model seed(s); area {eps.area_size_m:.0f} m; "
        f"success = x-y error < {thr:.2f} m; global K = {args.k_global}, tracking K = {args.k_tracking} "
        f"(σ 6 m / 30°, prior mean drawn around the truth); systematic resampling at ESS < K/2; "
        f"odometry noise {eps.description['odom_noise']} (m, rad per step).",
        "",
        "| method | global success t=1 (%) | global success t=5 (%) | tracking RMSE t=5 (m) |",
        "|---|---|---|---|",
        *[f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} |" for r in rows],
        "",
        "success(t) = #{episodes: ||xy_est(t) - xy_true(t)|| < threshold} / #episodes;  "
        "RMSE(t) = sqrt(mean over episodes of ||xy_est(t) - xy_true(t)||²).",
        "",
        f"Success vs time step (global, {label}): "
        + ", ".join(f"t={t + 1}: {100 * succ[:, t].mean():.1f}%" for t in range(T)),
    ]
    summary: dict[str, object] = {
        "models": [m.path for m in models],
        "method": label,
        "fingerprints": [m.info.fingerprint for m in models],
        "episodes": len(eps.episodes),
        "threshold_m": thr,
        "global_success": succ.mean(0).tolist(),
        "tracking_rmse_m": trk_rmse.mean(0).tolist(),
        "closest_context_success": success_rate(cc, thr).tolist(),
        "uninformed_global_success": success_rate(un_g, thr).tolist(),
        "uninformed_tracking_rmse_m": rmse(un_t).tolist(),
        "episode_set": eps.description,
    }

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(range(1, T + 1), 100 * succ.mean(0), "o-", label=label)
    ax.plot(range(1, T + 1), 100 * success_rate(cc, thr), "--", label="closest context")
    ax.plot(range(1, T + 1), 100 * success_rate(un_g, thr), ":", label="uninformed")
    ax.set_xlabel("time step t")
    ax.set_ylabel("global success (%)")
    ax.set_ylim(0, 100)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "success_vs_t.png", dpi=120)
    plt.close(fig)

    for name, values, key in (("K", args.k_sweep, "num_particles"), ("Nc", args.nc_sweep, "num_contexts")):
        if not values:
            continue
        res = []
        for v in values:
            kw = {"mode": "global", "num_particles": args.k_global, "T": 5, "num_contexts": args.nc,
                  "seed": args.seed, key: v}
            res.append(100 * np.mean([success_rate(e, thr)[4] for e in per_model(EvalSettings(**kw))]))
        summary[f"success_t5_vs_{name}"] = dict(zip(values, res, strict=True))
        md.append(f"\nGlobal success at t=5 vs {name}: " + ", ".join(f"{v}: {r:.1f}%" for v, r in zip(values, res,
                                                                                                     strict=True)))
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(values, res, "o-")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"{name} at test time")
        ax.set_ylabel("global success t=5 (%)")
        ax.set_ylim(0, 100)
        fig.tight_layout()
        fig.savefig(out / f"success_vs_{name}.png", dpi=120)
        plt.close(fig)

    if args.baseline_model:  # before (e.g. the shipped zero-shot model) / after (e.g. fine-tuned), same episodes
        base = load_model(args.baseline_model, device=args.device)
        g_set = EvalSettings(mode="global", num_particles=args.k_global, T=T, num_contexts=args.nc, seed=args.seed)
        t_set = EvalSettings(mode="tracking", num_particles=args.k_tracking, T=5, num_contexts=args.nc,
                             seed=args.seed)
        b_glob = _run(base, eps, g_set, args.device)
        b_trk = _run(base, eps, t_set, args.device)
        b_succ, b_rmse = success_rate(b_glob, thr), rmse(b_trk)
        a_succ, a_rmse = succ.mean(0), trk_rmse.mean(0)
        md += [
            "",
            f"Before/after on the same {len(eps.episodes)} episodes: before = {args.baseline_model}, "
            f"after = {', '.join(m.path for m in models)}",
            "",
            "| metric | before | after | change |",
            "|---|---|---|---|",
            *[f"| global success t={t + 1} (%) | {100 * b_succ[t]:.1f} | {100 * a_succ[t]:.1f} | "
              f"{100 * (a_succ[t] - b_succ[t]):+.1f} |" for t in (0, 4)],
            f"| tracking RMSE t=5 (m) | {b_rmse[4]:.2f} | {a_rmse[4]:.2f} | {a_rmse[4] - b_rmse[4]:+.2f} |",
        ]
        summary["baseline"] = {"model": base.path, "fingerprint": base.info.fingerprint,
                               "global_success": b_succ.tolist(), "tracking_rmse_m": b_rmse.tolist()}

    md.append(f"\nwall time {time.monotonic() - t0:.0f} s on {args.device}")
    atomic_write_bytes(out / "results.md", ("\n".join(md) + "\n").encode())
    atomic_write_bytes(out / "results.json", json.dumps(summary, indent=2).encode())
    print("\n".join(md))
    print(f"wrote {out / 'results.md'}, {out / 'results.json'} and PNG curves in {out}")
    return 0 if all(math.isfinite(v) for v in summary["global_success"]) else 1  # type: ignore[union-attr]


if __name__ == "__main__":
    raise SystemExit(main())
