"""Batched, differentiable particle filter over planar poses (SPEC "Particle filter")."""

from dmn_ros.filter.belief import Belief, init_gaussian, init_uniform
from dmn_ros.filter.health import (
    Health,
    HealthConfig,
    HealthLevel,
    HealthState,
    assess,
    inject_random_particles,
    marginal_log_likelihood,
    particle_spread,
)
from dmn_ros.filter.kld import KldConfig, kld_bound, kld_resample, kld_resample_if_degenerate
from dmn_ros.filter.resampling import (
    resample_if_degenerate,
    soft_resample,
    systematic_indices,
    systematic_resample,
)
from dmn_ros.filter.runner import (
    FilterConfig,
    PreparedMap,
    StepResult,
    encode_map,
    filter_step,
    prepare_map,
    run_episode,
)
from dmn_ros.filter.steps import (
    effective_sample_size,
    estimate,
    normalize_log_weights,
    pose_error,
    transition,
    update,
)

__all__ = [
    "Belief",
    "FilterConfig",
    "Health",
    "HealthConfig",
    "HealthLevel",
    "HealthState",
    "KldConfig",
    "PreparedMap",
    "StepResult",
    "assess",
    "effective_sample_size",
    "encode_map",
    "estimate",
    "filter_step",
    "init_gaussian",
    "init_uniform",
    "inject_random_particles",
    "kld_bound",
    "kld_resample",
    "kld_resample_if_degenerate",
    "marginal_log_likelihood",
    "normalize_log_weights",
    "particle_spread",
    "pose_error",
    "prepare_map",
    "resample_if_degenerate",
    "run_episode",
    "soft_resample",
    "systematic_indices",
    "systematic_resample",
    "transition",
    "update",
]
