"""``dmn-export``: turn a training checkpoint into the TorchScript model the nodes and tools load."""

from __future__ import annotations

import argparse

import torch

from dmn_ros.export import export_model
from dmn_ros.training.trainer import load_checkpoint, model_from_checkpoint


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("checkpoint", help="checkpoint_best.pt or checkpoint_last.pt from dmn-train")
    p.add_argument("out", help="output model file, e.g. models/my_site.pt")
    p.add_argument("--description", default="", help="free text stored in the model's metadata")
    p.add_argument("--calibrate", metavar="DATA_DIR", default="",
                   help="fit the covariance inflation on this dataset's val split and store it in the model")
    p.add_argument("--calibrate-episodes", type=int, default=48)
    args = p.parse_args(argv)
    state = load_checkpoint(args.checkpoint)
    model = model_from_checkpoint(state).eval()
    desc = args.description or f"exported from {args.checkpoint} (step {state['step']})"
    calibration = None
    if args.calibrate:
        calibration = {"covariance_inflation": fit_covariance_inflation(model, args.calibrate,
                                                                        episodes=args.calibrate_episodes)}
        print(f"covariance inflation fitted on {args.calibrate} (val): {calibration['covariance_inflation']:.3f}")
    info = export_model(model, args.out, meters_per_unit=float(state["meters_per_unit"]),
                        area_size_m=float(state["area_size_m"]), description=desc, calibration=calibration)
    print(f"wrote {args.out}: {info.image_height}x{info.image_width}, {info.meters_per_unit} m/unit, "
          f"fingerprint {info.fingerprint}")
    return 0


def fit_covariance_inflation(model: torch.nn.Module, data_dir: str, *, episodes: int = 48, seed: int = 0) -> float:
    """Variance inflation that makes 95 % of validation estimates fall inside the published 95 % ellipse.

    Fitted on tracking and global runs together (docs/health.md), from t = 2 on so the
    uniform prior's first step does not dominate.
    """
    import numpy as np

    from dmn_ros.evaluation import EvalSettings, make_episode_set
    from dmn_ros.evaluation.health_metrics import collect_runs, fit_inflation

    eps = make_episode_set(data_dir, split="val", num_episodes=episodes, num_contexts=16, T=5, seed=seed)
    errs, covs = [], []
    with torch.inference_mode():
        for mode, k in (("tracking", 256), ("global", 1024)):
            runs = collect_runs(model, eps, EvalSettings(mode=mode, num_particles=k, T=5, num_contexts=16, seed=seed))
            errs.append(runs.errors_xy[:, 1:].reshape(-1, 2))
            covs.append(runs.covariance[:, 1:, :2, :2].reshape(-1, 2, 2))
    return fit_inflation(np.concatenate(errs), np.concatenate(covs))


if __name__ == "__main__":
    raise SystemExit(main())
