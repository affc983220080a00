"""``dmn-export``: turn a training checkpoint into the TorchScript model the nodes and tools load."""

from __future__ import annotations

import argparse
import json

import torch

from dmn_ros.data.episodes import QueryMode
from dmn_ros.errors import console_main
from dmn_ros.export import export_model, load_model, results_from_eval, training_data_summary, weights_fingerprint
from dmn_ros.localizer import INDEPENDENT_FRAMES_SUFFIX
from dmn_ros.training.trainer import load_checkpoint, model_from_checkpoint


@console_main("dmn-export")
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("checkpoint", help="checkpoint_best.pt or checkpoint_last.pt from dmn-train")
    p.add_argument("out", help="output model file, e.g. models/my_site.pt")
    p.add_argument("--description", default="", help="free text stored in the model's metadata")
    p.add_argument("--calibrate", metavar="DATA_DIR", default="",
                   help="fit the likelihood temperature and covariance inflation on this dataset's val split")
    p.add_argument("--calibrate-episodes", type=int, default=24)
    p.add_argument("--calibrate-queries", choices=["both", *(m.value for m in QueryMode)], default="both",
                   help="frame streams to fit: segment (consecutive frames of smooth trajectories, what a robot "
                        "feeds the node) writes likelihood_scale and covariance_inflation; random_order "
                        "(independent views, the paper's protocol) writes the same keys suffixed _independent")
    p.add_argument("--calibrate-nc", type=int, default=16, help="contexts per map during calibration")
    p.add_argument("--calibration-from", metavar="MODEL", action="append", default=[],
                   help="copy the calibration of an exported model with the same weights (re-export; with "
                        "--calibrate, what is not re-fitted is kept); repeat it to combine streams fitted in "
                        "separate runs, later files winning on shared keys")
    p.add_argument("--results", metavar="RESULTS_JSON", default="",
                   help="a dmn-eval results.json of these weights alone (not averaged over seeds): its headline "
                        "figures go into the metadata")
    args = p.parse_args(argv)
    state = load_checkpoint(args.checkpoint)
    model = model_from_checkpoint(state).eval()
    desc = args.description or f"exported from {args.checkpoint} (step {state['step']})"
    calibration = None
    if args.calibrate and state["model_config"].get("kind", "dmn") == "regression":
        p.error("--calibrate fits particle-filter temperatures; the regression baseline has no particles")
    results = None  # read before the minutes of --calibrate, so a wrong file fails at once
    if args.results:
        with open(args.results) as f:
            ev = json.load(f)
        if not isinstance(ev, dict):
            raise ValueError(f"--results {args.results}: not a dmn-eval results.json (a JSON object)")
        fingerprints = ev.get("fingerprints", [])
        if not isinstance(fingerprints, list):
            raise ValueError(f"--results {args.results}: not a dmn-eval results.json ('fingerprints' is not a list)")
        if weights_fingerprint(model) not in fingerprints:
            p.error(f"{args.results} was measured on models {ev.get('fingerprints')}, not on these weights "
                    f"({weights_fingerprint(model)})")
        distinct = list(dict.fromkeys(str(f) for f in fingerprints))
        if len(distinct) > 1:  # dmn-eval averages its figures over all its --model files (seeds)
            raise ValueError(f"--results {args.results}: its figures are averaged over {len(distinct)} models "
                             f"(fingerprints {', '.join(distinct)}), not these weights' own; evaluate this model "
                             "alone (dmn-eval with it as the only --model) and pass that results.json")
        try:
            results = results_from_eval(ev)
        except (KeyError, TypeError, IndexError, ValueError) as exc:
            raise ValueError(f"--results {args.results}: not a dmn-eval results.json ({exc!r})") from exc
    for source in args.calibration_from:
        calibration = {**(calibration or {}), **_calibration_of(source, weights_fingerprint(model))}
    if args.calibrate:  # on top of a copied calibration: re-fit one frame stream, keep the other
        from dmn_ros.data import DatasetDir
        from dmn_ros.data.dataset_format import check_image_size

        check_image_size((int(model.image_height), int(model.image_width)),
                         tuple(DatasetDir(args.calibrate).meta.image_size), f"checkpoint {args.checkpoint}")
        calibration = dict(calibration or {})
        modes = [m.value for m in QueryMode] if args.calibrate_queries == "both" else [args.calibrate_queries]
        for mode in modes:
            fitted = calibrate(model, args.calibrate, episodes=args.calibrate_episodes, query_mode=mode,
                               num_contexts=args.calibrate_nc)
            suffix = INDEPENDENT_FRAMES_SUFFIX if mode == QueryMode.RANDOM_ORDER.value else ""
            calibration.update({k + suffix: v for k, v in fitted.items()})
            print(f"calibration fitted on {args.calibrate} (val, {mode} queries, Nc {args.calibrate_nc}): "
                  + ", ".join(f"{k}{suffix} {v:.4g}" for k, v in fitted.items()))
    info = export_model(model, args.out, meters_per_unit=float(state["meters_per_unit"]),
                        area_size_m=float(state["area_size_m"]), description=desc, calibration=calibration,
                        results=results, training=_training_data(state))
    print(f"wrote {args.out}: {info.image_height}x{info.image_width}, {info.meters_per_unit} m/unit, "
          f"fingerprint {info.fingerprint}")
    return 0


def _training_data(state: dict) -> dict | None:
    """The checkpoint's record of its training data; older checkpoints only name the dataset directory."""
    if isinstance(state.get("training_data"), dict):
        return state["training_data"]
    data = str((state.get("config") or {}).get("data", ""))
    if not data:
        return None
    import yaml

    from dmn_ros.data import DatasetDir
    from dmn_ros.data.dataset_format import DatasetFormatError

    try:
        return training_data_summary(DatasetDir(data).meta, data)
    except (OSError, DatasetFormatError, yaml.YAMLError) as exc:
        print(f"dmn-export: training data {data} unreadable ({exc}); the model records only its path")
        return {"dataset": data}


def _calibration_of(model_path: str, fingerprint: str) -> dict[str, float]:
    """A stored calibration is only valid for the weights it was fitted on."""
    info = load_model(model_path).info
    if info.fingerprint != fingerprint:
        raise SystemExit(f"dmn-export: {model_path} has weights {info.fingerprint}, the checkpoint {fingerprint}: "
                         "its calibration does not apply")
    cal = info.config.get("calibration")
    if not isinstance(cal, dict) or not cal:
        raise SystemExit(f"dmn-export: {model_path} carries no calibration")
    return {k: float(v) for k, v in cal.items()}


SCALE_GRID = (2.0, 1.0, 0.5, 0.25, 0.125, 0.0625)
"""Log-likelihood temperatures tried; above 1 sharpens a model whose contrasts are small (rank-trained)."""


def calibrate(model: torch.nn.Module, data_dir: str, *, episodes: int = 24, seed: int = 0,
              query_mode: str = QueryMode.SEGMENT.value, num_contexts: int = 16) -> dict[str, float]:
    """Fit the two calibration values on the val split, as the evaluation protocol runs the filter.

    1. ``likelihood_scale``, a temperature on the log-likelihoods, from ``SCALE_GRID``: the one
       with the lowest sum of tracking RMSE and mean clipped global error at t = 5. An
       overconfident model otherwise collapses its belief onto the first look-alike place.
    2. ``covariance_inflation``: 95 % of estimates inside the published 95 % ellipse
       (t >= 2, tracking and global runs together; docs/health.md).

    ``query_mode`` matters: consecutive frames of a smooth trajectory are nearly the same view, so
    multiplying their likelihoods counts one piece of evidence several times and favours a colder
    temperature than independent frames (``random_order``) do.
    """
    import numpy as np

    from dmn_ros.evaluation import EvalSettings, make_episode_set, run_filter
    from dmn_ros.evaluation.health_metrics import collect_runs, fit_inflation

    nc = num_contexts
    eps = make_episode_set(data_dir, split="val", num_episodes=episodes, num_contexts=nc, T=5, seed=seed,
                           query_mode=query_mode)
    best: tuple[float, float] | None = None
    with torch.inference_mode():
        for scale in SCALE_GRID:
            trk = run_filter(model, eps, EvalSettings(mode="tracking", num_particles=256, num_contexts=nc, T=5,
                                                      seed=seed, likelihood_scale=scale))
            glo = run_filter(model, eps, EvalSettings(mode="global", num_particles=512, num_contexts=nc, T=5,
                                                      seed=seed, likelihood_scale=scale))
            score = float(np.sqrt((trk[:, -1] ** 2).mean()) + np.minimum(glo[:, -1], 20.0).mean())
            print(f"  likelihood_scale {scale:g}: tracking RMSE t=5 {np.sqrt((trk[:, -1] ** 2).mean()):.2f} m, "
                  f"global mean error t=5 {glo[:, -1].mean():.2f} m -> score {score:.2f}")
            if best is None or score < best[1]:
                best = (scale, score)
        assert best is not None
        errs, covs = [], []
        for mode, k in (("tracking", 256), ("global", 512)):
            runs = collect_runs(model, eps, EvalSettings(mode=mode, num_particles=k, T=5, num_contexts=nc, seed=seed,
                                                         likelihood_scale=best[0]))
            errs.append(runs.errors_xy[:, 1:].reshape(-1, 2))
            covs.append(runs.covariance[:, 1:, :2, :2].reshape(-1, 2, 2))
    return {"likelihood_scale": best[0], "covariance_inflation": fit_inflation(np.concatenate(errs),
                                                                               np.concatenate(covs))}
