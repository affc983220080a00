"""``dmn-eval``: the paper's protocol on a fixed test set; writes a markdown table, JSON and PNG curves.

With ``--health`` (the default) the same global and tracking filter runs also keep covariance and the
converged / lost flags (:func:`~dmn_ros.evaluation.health_metrics.collect_runs`, bit-identical errors to
``run_filter``), and the results add 95 % ellipse coverage, mean NEES, time to converge and the
false-``lost`` rate (docs/health.md).

Tracking: every compared method and the uninformed baseline start from the tracking prior means that
the first ``--model``'s filter draws (:func:`~dmn_ros.evaluation.protocol.tracking_prior_means`); the
``--model`` runs keep their own draws (the same ones for the first model), so their figures do not move.
``--belief-pictures N`` draws the first N global episodes' beliefs (paper Fig. 5) from that same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from dmn_ros.data import DatasetDir
from dmn_ros.data.dataset_format import check_image_size
from dmn_ros.data.episodes import QueryMode
from dmn_ros.errors import console_main
from dmn_ros.evaluation.belief_plot import plot_belief_row, steps_to_draw
from dmn_ros.evaluation.health_metrics import COVERAGE_FROM_INDEX, Runs, collect_runs, time_to_converge
from dmn_ros.evaluation.protocol import (
    EpisodeSet,
    EvalSettings,
    belief_frames,
    closest_context_errors,
    make_episode_set,
    regression_prior_means,
    rmse,
    run_filter,
    run_regression,
    success_rate,
    success_threshold_m,
    tracking_prior_means,
    uninformed_errors,
)
from dmn_ros.evaluation.ranking import truth_rank
from dmn_ros.export import LoadedModel, default_model_path, load_model, training_domain
from dmn_ros.files import atomic_save_figure, atomic_write_bytes
from dmn_ros.geometry import MetricScale
from dmn_ros.localizer import model_covariance_inflation, model_likelihood_scale
from dmn_ros.model import model_kind
from dmn_ros.model.kinds import PARTICLE_FILTER_KINDS

METHOD_LABELS = {"dmn": "DMN", "latent_image": "PF + latent image map", "latent_vector": "PF + latent vector map",
                 "regression": "regression"}


BASIN_STD = (3.0, 3.0, 30.0)
"""Jitter (m, m, degrees) of the reported basin rank: the nearest of 2048 uniform particles in a 40 m area."""


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v]


def _in_model_scale(eps: EpisodeSet, model: LoadedModel) -> EpisodeSet:
    """The model sees coordinates normalized with *its* meters_per_unit (SPEC "one metric scale")."""
    s = eps.scale
    return dataclasses.replace(eps, scale=MetricScale(model.info.meters_per_unit, s.origin_x, s.origin_y))


def _independent_frames(eps: EpisodeSet) -> bool:
    """Random-order queries are independent views; a model may carry a temperature fitted for them."""
    return eps.description.get("query_mode") == QueryMode.RANDOM_ORDER.value


def _calibrated(model: LoadedModel, eps: EpisodeSet, settings: EvalSettings) -> EvalSettings:
    """``settings`` with the log-likelihood temperature this model carries for ``eps``'s query stream."""
    return dataclasses.replace(settings, likelihood_scale=model_likelihood_scale(
        model.info.config, independent_frames=_independent_frames(eps)))


def _run(model: LoadedModel, eps: EpisodeSet, settings: EvalSettings, device: str, *,
         prior_means_m: np.ndarray | None = None) -> np.ndarray:
    """The filter as the node runs this model: its metric scale and its stored calibration.

    The regression baseline has no filter: it runs :func:`run_regression` on the same episodes.
    ``prior_means_m``: tracking starts from these metric prior means instead of the model's own draws.
    """
    if model_kind(model.info.config) == "regression":
        return run_regression(model.module, _in_model_scale(eps, model), settings, device=device,
                              prior_means_m=prior_means_m)
    return run_filter(model.module, _in_model_scale(eps, model), _calibrated(model, eps, settings), device=device,
                      prior_means_m=prior_means_m)


def _tracking_prior_means(model: LoadedModel, eps: EpisodeSet, settings: EvalSettings, device: str) -> np.ndarray:
    """``(E, 3)`` metric tracking prior means that :func:`_run` draws for this model: what the baselines start from."""
    if model_kind(model.info.config) == "regression":
        return regression_prior_means(_in_model_scale(eps, model), settings, device=device)
    return tracking_prior_means(model.module, _in_model_scale(eps, model), _calibrated(model, eps, settings),
                                device=device)


def _belief_pictures(model: LoadedModel, eps: EpisodeSet, settings: EvalSettings, *, data: str, num: int,
                     num_contexts: int, out: Path, label: str, device: str) -> list[str]:
    """PNG rows of the first ``num`` global episodes' beliefs (from the run :func:`_run` scores); their names.

    The dataset stores views, not maps, so there is no occupancy grid: the other stored views' positions
    stand in for the free space.
    """
    steps = steps_to_draw(settings.T)
    frames = belief_frames(model.module, _in_model_scale(eps, model), _calibrated(model, eps, settings),
                           num_episodes=num, steps=steps, device=device)
    ds = DatasetDir(data)
    names = []
    for i, row in enumerate(frames):
        e = eps.episodes[i]
        name = f"belief_episode_{i:02d}.png"
        plot_belief_row(out / name, row, bounds=eps.bounds, contexts=e.context_poses[:num_contexts],
                        truth_path=e.query_poses[: settings.T], view_positions=ds.load_env(e.env_id).poses,
                        title=f"{label}, episode {i} ({e.env_id}): global localization, K={settings.num_particles}")
        names.append(name)
    return names


def _run_with_health(model: LoadedModel, eps: EpisodeSet, settings: EvalSettings,
                     device: str) -> tuple[np.ndarray, Runs | None]:
    """:func:`_run`'s errors plus the health outputs of the very same filter run (None for regression)."""
    if model_kind(model.info.config) == "regression":
        return _run(model, eps, settings, device), None
    runs = collect_runs(model.module, _in_model_scale(eps, model), _calibrated(model, eps, settings), device=device)
    return runs.errors_m, runs


def _mean_or_none(values: list[float]) -> float | None:
    v = [x for x in values if x is not None and math.isfinite(x)]
    return float(np.mean(v)) if v else None


def health_metrics(runs: list[Runs], *, threshold_m: float, inflations: list[float],
                   global_start: bool) -> dict[str, object]:
    """Coverage / NEES from step index ``COVERAGE_FROM_INDEX`` on, time to converge, false-lost rate; seed means.

    Every dmn-eval episode is a normal run (no kidnapping), so any ``lost`` flag is a false alarm.
    Coverage is given with each model's stored ``covariance_inflation`` (what the node publishes) and raw.
    """
    steps = slice(COVERAGE_FROM_INDEX, None)
    cov = [r.coverage(inflation=s, steps=steps) for r, s in zip(runs, inflations, strict=True)]
    raw = [r.coverage(steps=steps) for r in runs]
    out: dict[str, object] = {
        "coverage_95": _mean_or_none([c[0] for c in cov]),
        "mean_nees": _mean_or_none([c[1] for c in cov]),
        "coverage_95_raw": _mean_or_none([c[0] for c in raw]),
        "mean_nees_raw": _mean_or_none([c[1] for c in raw]),
        "covariance_inflation": inflations,
        "coverage_from_step": COVERAGE_FROM_INDEX + 1,
        "false_lost_rate": float(np.mean([r.lost.any(axis=1).mean() for r in runs])),
    }
    if global_start:
        steps_to: list[int | None] = [time_to_converge(c, e, threshold_m=threshold_m)
                                      for r in runs for c, e in zip(r.converged, r.errors_m, strict=True)]
        hit = [t + 1 for t in steps_to if t is not None]  # 1-based step t
        out["converged_share"] = len(hit) / max(len(steps_to), 1)
        out["converged_at_step_mean"] = float(np.mean(hit)) if hit else None
        out["converged_at_step"] = [None if t is None else t + 1 for t in steps_to]
    return out


def _domain_line(models: list[LoadedModel], data_domain: str) -> tuple[str, bool]:
    """Says when a model meets a kind of world it was not trained on (its figures are then zero-shot)."""
    trained = sorted({training_domain(m.info) for m in models} - {""})
    if not trained:
        return f"Evaluated on the {data_domain!r} domain; the model files do not record their training domain.", False
    zero_shot = data_domain not in trained
    line = f"Trained on the {', '.join(repr(d) for d in trained)} domain, evaluated on {data_domain!r}"
    return line + (" (another domain: zero-shot)." if zero_shot else "."), zero_shot


def _compare_arg(text: str, device: str) -> tuple[str, list[LoadedModel]]:
    """``LABEL=MODEL[,MODEL...]`` → the label and its loaded models (seeds of one kind)."""
    label, sep, paths = text.partition("=")
    if not sep or not label.strip() or not paths.strip():
        raise SystemExit(f"--compare {text!r}: expected LABEL=MODEL[,MODEL...]")
    models = [load_model(path.strip(), device=device) for path in paths.split(",") if path.strip()]
    if len({model_kind(m.info.config) for m in models}) > 1:
        raise SystemExit(f"--compare {label}: the models are seeds of one method; got several kinds")
    return label.strip(), models


@console_main("dmn-eval")
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", action="append", help="exported model(s); several = seeds, averaged")
    p.add_argument("--baseline-model", help="also evaluate this model on the same episodes: a before/after table")
    p.add_argument("--compare", action="append", default=[], metavar="LABEL=MODEL[,MODEL...]",
                   help="another method in the same table, on the same episodes (several models = its seeds); "
                        "repeatable: the baselines and ablations against --model")
    p.add_argument("--data", required=True, help="dataset directory (dmn-world generate, dmn-dataset)")
    p.add_argument("--split", default="test")
    p.add_argument("--out", default="out/eval")
    p.add_argument("--episodes", type=int, default=100)
    p.add_argument("--T", type=int, default=20, help="longest horizon for the success-vs-time curve")
    p.add_argument("--nc", type=int, default=4)
    p.add_argument("--queries", choices=[m.value for m in QueryMode], default=QueryMode.RANDOM_ORDER.value,
                   help="query sequences: random_order = independent views in random order, the paper's protocol; "
                        "segment = consecutive frames of one smooth trajectory, as a robot sees them (harder: "
                        "successive frames are nearly the same view)")
    p.add_argument("--k-global", type=int, default=2048)
    p.add_argument("--k-tracking", type=int, default=256)
    p.add_argument("--k-sweep", type=_ints, default=[])
    p.add_argument("--nc-sweep", type=_ints, default=[])
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cluster-radius-m", type=float, default=0.0,
                   help="0: score the particles' weighted mean (the paper's estimate); > 0: the heaviest cluster of "
                        "this radius (nav2_amcl's estimate, the localization node's cluster_radius)")
    p.add_argument("--health", action=argparse.BooleanOptionalAction, default=True,
                   help="also report coverage, NEES, time to converge and false-lost rate from the same runs")
    p.add_argument("--belief-pictures", type=int, default=2, metavar="N",
                   help="draw the beliefs of the first N global-localization episodes at t = 1, 2, 5 and T "
                        "(the paper's Fig. 5: weights summed over yaw, contexts, true pose, estimate) into "
                        "belief_episode_*.png; 0: none")
    args = p.parse_args(argv)
    if args.belief_pictures < 0:
        raise SystemExit("--belief-pictures: expected N >= 0")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [load_model(m, device=args.device) for m in (args.model or [str(default_model_path())])]
    kinds = {model_kind(m.info.config) for m in models}
    if len(kinds) > 1:
        raise SystemExit(f"--model files are seeds of one method; got kinds {sorted(kinds)}")
    label = METHOD_LABELS[kinds.pop()]
    compared = [_compare_arg(c, args.device) for c in args.compare]
    base = load_model(args.baseline_model, device=args.device) if args.baseline_model else None  # before the runs
    data_size = tuple(DatasetDir(args.data).meta.image_size)
    for flag, m in [*(("--model", m) for m in models), *(("--compare", m) for _, ms in compared for m in ms),
                    *([("--baseline-model", base)] if base is not None else [])]:
        check_image_size((m.info.image_height, m.info.image_width), data_size, f"{flag} {m.path}")
    max_nc = max([args.nc, *args.nc_sweep])
    eps = make_episode_set(args.data, split=args.split, num_episodes=args.episodes, num_contexts=max_nc,
                           T=max(args.T, 5), seed=args.seed, query_mode=args.queries)
    thr = success_threshold_m(eps.area_size_m)
    domain_line, zero_shot = _domain_line(models, str(eps.description["domain"]))
    if zero_shot:
        print(f"dmn-eval: note: {domain_line}", file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    T = max(args.T, 5)

    def per_model(settings: EvalSettings) -> np.ndarray:
        """(seeds, E, T) errors."""
        return np.stack([_run(m, eps, settings, args.device) for m in models])

    def per_model_health(settings: EvalSettings) -> tuple[np.ndarray, list[Runs]]:
        """(seeds, E, T) errors and, with --health, the same runs' health outputs (particle-filter models)."""
        if not args.health:
            return per_model(settings), []
        res = [_run_with_health(m, eps, settings, args.device) for m in models]
        return np.stack([r[0] for r in res]), [r[1] for r in res if r[1] is not None]

    cr = args.cluster_radius_m
    t0 = time.monotonic()
    g_set = EvalSettings(mode="global", num_particles=args.k_global, T=T, num_contexts=args.nc, seed=args.seed,
                         cluster_radius_m=cr)
    t_set = EvalSettings(mode="tracking", num_particles=args.k_tracking, T=5, num_contexts=args.nc, seed=args.seed,
                         cluster_radius_m=cr)
    glob, glob_runs = per_model_health(g_set)
    trk, trk_runs = per_model_health(t_set)
    # The tracking prior means the first --model drew: every other method and baseline starts from them
    # (read from its run when it kept them, else drawn again the same way).
    first = trk_runs[0] if trk_runs and model_kind(models[0].info.config) in PARTICLE_FILTER_KINDS else None
    prior_means = (first.prior_mean if first is not None and first.prior_mean is not None
                   else _tracking_prior_means(models[0], eps, t_set, args.device))
    succ = np.stack([success_rate(e, thr) for e in glob])  # (S, T)
    trk_rmse = np.stack([rmse(e) for e in trk])  # (S, 5)
    cc = closest_context_errors(eps, num_contexts=args.nc, T=T)
    un_g = uninformed_errors(eps, EvalSettings(mode="global", T=T, seed=args.seed))
    un_t = uninformed_errors(eps, EvalSettings(mode="tracking", T=5, seed=args.seed), prior_means_m=prior_means)

    other: dict[str, dict[str, object]] = {}
    other_rows = []
    for name, ms in compared:  # the same episodes, settings, seed and tracking prior means as --model
        o_succ = np.stack([success_rate(_run(m, eps, g_set, args.device), thr) for m in ms])
        o_rmse = np.stack([rmse(_run(m, eps, t_set, args.device, prior_means_m=prior_means)) for m in ms])
        other[name] = {"models": [m.path for m in ms], "fingerprints": [m.info.fingerprint for m in ms],
                       "global_success": o_succ.mean(0).tolist(), "tracking_rmse_m": o_rmse.mean(0).tolist()}
        other_rows.append((name, f"{100 * o_succ[:, 0].mean():.1f}", f"{100 * o_succ[:, 4].mean():.1f}",
                           f"{o_rmse[:, 4].mean():.2f}"))
    rows = [
        (label, f"{100 * succ[:, 0].mean():.1f}", f"{100 * succ[:, 4].mean():.1f}", f"{trk_rmse[:, 4].mean():.2f}"),
        *other_rows,
        ("closest context", f"{100 * success_rate(cc, thr)[0]:.1f}", f"{100 * success_rate(cc, thr)[4]:.1f}",
         f"{rmse(cc)[4]:.2f}"),
        ("uninformed", f"{100 * success_rate(un_g, thr)[0]:.1f}", f"{100 * success_rate(un_g, thr)[4]:.1f}",
         f"{rmse(un_t)[4]:.2f}"),
    ]
    md = [
        f"# dmn-eval: {eps.description['data']} ({args.split}), Nc = {args.nc}, queries {args.queries}",
        "",
        f"{len(eps.episodes)} episodes x {len(models)} model seed(s); area {eps.area_size_m:.0f} m; "
        f"success = x-y error < {thr:.2f} m; global K = {args.k_global}, tracking K = {args.k_tracking} "
        "(σ 6 m / 30°, prior mean drawn around the truth by the first model's filter; every other method and "
        "baseline starts from the same means); systematic resampling at ESS < K/2; "
        f"odometry noise {eps.description['odom_noise']} (m, rad per step); estimate: "
        + (f"heaviest {cr:g} m cluster (nav2_amcl)." if cr > 0 else "weighted mean (the paper's).")
        + " Log-likelihood temperature "
        + ", ".join(f"{model_likelihood_scale(m.info.config, independent_frames=_independent_frames(eps)):g}"
                    for m in models)
        + (" (the model's, for independent frames)." if _independent_frames(eps) else
           " (the model's, for consecutive frames)."),
        "",
        domain_line,
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
        "cluster_radius_m": cr,
        "threshold_m": thr,
        "global_success": succ.mean(0).tolist(),
        "tracking_rmse_m": trk_rmse.mean(0).tolist(),
        "closest_context_success": success_rate(cc, thr).tolist(),
        "uninformed_global_success": success_rate(un_g, thr).tolist(),
        "uninformed_tracking_rmse_m": rmse(un_t).tolist(),
        "tracking_prior_means_m": prior_means.round(6).tolist(),
        "episode_set": eps.description,
    }
    if other:
        summary["compared"] = other

    if all(model_kind(m.info.config) in PARTICLE_FILTER_KINDS for m in models):
        ranks = [float(truth_rank(m.module, eps, num_contexts=args.nc, seed=args.seed, device=args.device).mean())
                 for m in models]
        basin = [float(truth_rank(m.module, eps, num_contexts=args.nc, seed=args.seed, device=args.device,
                                  truth_std=BASIN_STD).mean()) for m in models]
        summary["truth_rank"] = ranks
        summary["basin_rank"] = {"std_m_m_deg": list(BASIN_STD), "rank": basin}
        md += ["", f"Observation-model ranking: the true pose's log-likelihood is above {100 * np.mean(ranks):.1f} % "
               "of 255 uniform random poses on the first frame (50 % = chance); poses jittered around it by "
               f"σ {BASIN_STD[0]:g} m / {BASIN_STD[2]:g}°, about the particle spacing at K = 2048, are above "
               f"{100 * np.mean(basin):.1f} % (the basin rank that global localization needs near 100 %; "
               "docs/RESULTS.md)."]

    if glob_runs and trk_runs:
        infl = [model_covariance_inflation(m.info.config, independent_frames=_independent_frames(eps))
                for m in models]
        health = {"global": health_metrics(glob_runs, threshold_m=thr, inflations=infl, global_start=True),
                  "tracking": health_metrics(trk_runs, threshold_m=thr, inflations=infl, global_start=False)}
        summary["health"] = health

        def f(v: object, fmt: str = ".2f") -> str:
            return format(v, fmt) if isinstance(v, (int, float)) else "-"

        def pct(v: object) -> str:
            return f"{100 * v:.0f} %" if isinstance(v, (int, float)) else "-"

        hg, ht = health["global"], health["tracking"]
        md += [
            "",
            f"Health on the same runs (docs/health.md): coverage of the published 95 % ellipse and mean NEES "
            f"(calibrated: 0.95 and 2) from step t = {COVERAGE_FROM_INDEX + 1} on, covariance inflation "
            f"{', '.join(f'{v:g}' for v in infl)} (raw in brackets); converged = first step converged and "
            f"within {thr:.2f} m; false lost = share of these normal (not kidnapped) runs flagged lost at least once.",
            "",
            "| mode | 95 % coverage | mean NEES | converged within T (mean step) | false lost |",
            "|---|---|---|---|---|",
            f"| global (K = {args.k_global}, T = {T}) | {f(hg['coverage_95'])} ({f(hg['coverage_95_raw'])}) | "
            f"{f(hg['mean_nees'], '.3g')} ({f(hg['mean_nees_raw'], '.3g')}) | "
            f"{pct(hg['converged_share'])} ({f(hg['converged_at_step_mean'], '.1f')}) | "
            f"{pct(hg['false_lost_rate'])} |",
            f"| tracking (K = {args.k_tracking}, T = 5) | {f(ht['coverage_95'])} ({f(ht['coverage_95_raw'])}) | "
            f"{f(ht['mean_nees'], '.3g')} ({f(ht['mean_nees_raw'], '.3g')}) | - | {pct(ht['false_lost_rate'])} |",
        ]
    elif args.health:
        md += ["", f"Health: not available for {label} (no particle filter)."]

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(range(1, T + 1), 100 * succ.mean(0), "o-", label=label)
    ax.plot(range(1, T + 1), 100 * success_rate(cc, thr), "--", label="closest context")
    ax.plot(range(1, T + 1), 100 * success_rate(un_g, thr), ":", label="uninformed")
    ax.set_xlabel("time step t")
    ax.set_ylabel("global success (%)")
    ax.set_ylim(0, 100)
    ax.legend()
    fig.tight_layout()
    atomic_save_figure(fig, out / "success_vs_t.png", dpi=120)
    plt.close(fig)

    for name, values, key in (("K", args.k_sweep, "num_particles"), ("Nc", args.nc_sweep, "num_contexts")):
        if not values:
            continue
        res = []
        for v in values:
            kw = {"mode": "global", "num_particles": args.k_global, "T": 5, "num_contexts": args.nc,
                  "seed": args.seed, "cluster_radius_m": cr, key: v}
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
        atomic_save_figure(fig, out / f"success_vs_{name}.png", dpi=120)
        plt.close(fig)

    if base is not None:  # before (e.g. the shipped zero-shot model) / after (e.g. fine-tuned), same episodes
        b_glob = _run(base, eps, g_set, args.device)
        b_trk = _run(base, eps, t_set, args.device, prior_means_m=prior_means)
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

    if args.belief_pictures and model_kind(models[0].info.config) in PARTICLE_FILTER_KINDS:
        pics = _belief_pictures(models[0], eps, g_set, data=args.data, num=args.belief_pictures, num_contexts=args.nc,
                                out=out, label=label, device=args.device)
        summary["belief_pictures"] = pics
        cell = (eps.bounds[1] - eps.bounds[0]) / 40
        md += ["", f"Belief pictures (the paper's Fig. 5; {label}, global localization, K = {args.k_global}, the "
               f"first {len(pics)} episodes of the run above, t = {', '.join(map(str, steps_to_draw(T)))}): "
               f"particle weights after each step's update summed over yaw in {cell:g} m cells (square-root colour "
               "scale), contexts (blue triangles), true path and pose (red), estimate (orange); grey dots are the "
               "environment's other stored views (the dataset stores no map). "
               + ", ".join(f"[{n}]({n})" for n in pics)]
    elif args.belief_pictures:
        md += ["", f"Belief pictures: not available for {label} (no particles)."]

    md.append(f"\nwall time {time.monotonic() - t0:.0f} s on {args.device}")
    atomic_write_bytes(out / "results.md", ("\n".join(md) + "\n").encode())
    atomic_write_bytes(out / "results.json", json.dumps(summary, indent=2).encode())
    print("\n".join(md))
    print(f"wrote {out / 'results.md'}, {out / 'results.json'} and PNG curves in {out}")
    return 0 if all(math.isfinite(v) for v in summary["global_success"]) else 1  # type: ignore[union-attr]


if __name__ == "__main__":
    raise SystemExit(main())
