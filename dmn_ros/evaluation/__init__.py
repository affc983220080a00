"""The paper's evaluation protocol: global localization success, tracking RMSE, baselines, curves."""

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

__all__ = [
    "EpisodeSet",
    "EvalSettings",
    "closest_context_errors",
    "make_episode_set",
    "rmse",
    "run_filter",
    "run_regression",
    "success_rate",
    "success_threshold_m",
    "uninformed_errors",
]
