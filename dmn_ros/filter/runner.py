"""One filter step with the DMN observation model, shared by training, evaluation, bag tools and nodes.

The observation model is anything with the DMN's exported methods (the eager
:class:`~dmn_ros.model.DMN` or its TorchScript export), so the nodes run exactly
the code path that training optimized.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import torch

from dmn_ros.filter.belief import Belief
from dmn_ros.filter.kld import KldConfig, kld_resample_if_degenerate
from dmn_ros.filter.resampling import resample_if_degenerate, soft_resample
from dmn_ros.filter.steps import estimate, transition, update


class ObservationModel(Protocol):
    def embed_views(self, images: torch.Tensor) -> torch.Tensor: ...

    def prepare_map(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def prepare_query(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def log_likelihood_prepared(
        self,
        map_a: torch.Tensor,
        map_g: torch.Tensor,
        context_poses: torch.Tensor,
        q: torch.Tensor,
        hq: torch.Tensor,
        particles: torch.Tensor,
        nearest: int = 0,
    ) -> torch.Tensor: ...


class PreparedMap(NamedTuple):
    """A view-embedding map with its map-only terms precomputed (normalized poses)."""

    map_a: torch.Tensor
    """``(B, Nc, 64, h, w)`` CNN2 first-layer response to the embeddings."""
    map_g: torch.Tensor
    """``(B, Nc, 64, h, w)`` CNN6 first-layer response to the CNN4 values."""
    poses: torch.Tensor
    """``(B, Nc, 3)`` context poses in normalized coordinates."""


def prepare_map(model: ObservationModel, *, embeddings: torch.Tensor, poses: torch.Tensor) -> PreparedMap:
    """``embeddings (B, Nc, 64, h, w)``, ``poses (B, Nc, 3)`` normalized."""
    a, g = model.prepare_map(embeddings)
    return PreparedMap(a, g, poses)


def encode_map(model: ObservationModel, *, images: torch.Tensor, poses: torch.Tensor) -> PreparedMap:
    """Context images ``(B, Nc, 3, H, W)`` → prepared view-embedding map."""
    b, n = images.shape[:2]
    emb = model.embed_views(images.flatten(0, 1))
    return prepare_map(model, embeddings=emb.reshape(b, n, *emb.shape[1:]), poses=poses)


@dataclass(frozen=True)
class FilterConfig:
    """How the filter moves and resamples; units are the filter's (normalized) units."""

    transition_noise: tuple[float, float, float] = (0.0, 0.0, 0.0)
    """Std of the per-particle motion noise ``(x, y, yaw)`` in the robot frame."""
    resampling: str = "systematic"
    """``"soft"`` (differentiable, training), ``"systematic"`` (inference, ESS-triggered), ``"kld"``
    (ESS-triggered like systematic, but to a KLD-adaptive count; batch size 1) or ``"none"``."""
    soft_alpha: float = 0.5
    """Mixing α of soft resampling."""
    ess_threshold: float = 0.5
    """Systematic (and KLD) resampling runs when ESS < threshold · K."""
    kld: KldConfig = field(default_factory=KldConfig)
    """Count bounds, ε, z and bin sizes of ``"kld"`` resampling (filter units)."""
    nearest_contexts: int = 0
    """Attend only to this many contexts nearest each particle (0: all); for large shared maps."""
    likelihood_scale: float = 1.0
    """Temperature on the observation log-likelihoods (calibration; 1 = as trained)."""
    cluster_radius: float = 0.0
    """0: the estimate is the weighted mean (the paper's); > 0: the heaviest cluster's mean, as
    nav2_amcl publishes (x-y radius in filter units; see :func:`~dmn_ros.filter.steps.estimate`)."""


class StepResult(NamedTuple):
    belief: Belief
    """The belief after update and (optional) resampling, ready for the next step."""
    mean: torch.Tensor
    """``(B, 3)`` estimate taken after the update, before resampling."""
    covariance: torch.Tensor
    """``(B, 3, 3)`` particle covariance (yaw from circular statistics)."""
    log_likelihood: torch.Tensor
    """``(B, K)`` the log-likelihoods the update used (model output times ``likelihood_scale``)."""
    updated: Belief
    """The belief after the update and before resampling (for losses and health signals)."""


def filter_step(
    model: ObservationModel,
    *,
    belief: Belief,
    prepared_map: PreparedMap,
    query: torch.Tensor,
    egomotion: torch.Tensor | None,
    config: FilterConfig,
    generator: torch.Generator | None = None,
) -> StepResult:
    """Transition with ``Δ_t`` (skipped when None: no motion before the first frame), weigh, estimate, resample.

    Args:
        query: ``(B, 3, H, W)`` frame at step t.
        egomotion: ``(B, 3)`` motion from t-1 to t in the robot frame at t-1, or None at t = 0.
    """
    device_type = belief.particles.device.type
    if egomotion is not None:
        with torch.autocast(device_type, enabled=False):
            belief = transition(belief, egomotion=egomotion, noise_std=config.transition_noise, generator=generator)
    q, hq = model.prepare_query(query)  # the networks run under the caller's autocast (bf16 training on CUDA)
    ll = model.log_likelihood_prepared(
        prepared_map.map_a, prepared_map.map_g, prepared_map.poses, q, hq, belief.particles, config.nearest_contexts
    ).float()
    # The filter's arithmetic stays in fp32 under autocast: bf16 rounds a weighted mean of poses to
    # ~8 cm at 20 m per unit and degrades the weights the loss differentiates through.
    with torch.autocast(device_type, enabled=False):
        return _update_estimate_resample(belief, ll, config, generator)


def _update_estimate_resample(
    belief: Belief, ll: torch.Tensor, config: FilterConfig, generator: torch.Generator | None
) -> StepResult:
    if config.likelihood_scale != 1.0:
        ll = ll * config.likelihood_scale
    updated = update(belief, ll)
    mean, cov = estimate(updated, cluster_radius=config.cluster_radius)
    if config.resampling == "soft":
        nxt = soft_resample(updated, alpha=config.soft_alpha, generator=generator)
    elif config.resampling == "systematic":
        nxt, _ = resample_if_degenerate(updated, threshold=config.ess_threshold, generator=generator)
    elif config.resampling == "kld":
        nxt, _ = kld_resample_if_degenerate(updated, config.kld, threshold=config.ess_threshold, generator=generator)
    elif config.resampling == "none":
        nxt = updated
    else:
        raise ValueError(f"unknown resampling {config.resampling!r}")
    return StepResult(nxt, mean, cov, ll, updated)


def run_episode(
    model: ObservationModel,
    *,
    belief: Belief,
    prepared_map: PreparedMap,
    queries: torch.Tensor,
    egomotion: torch.Tensor,
    config: FilterConfig,
    generator: torch.Generator | None = None,
) -> tuple[list[StepResult], Belief]:
    """Filter ``queries (B, T, 3, H, W)`` with ``egomotion (B, T, 3)``; ``egomotion[:, 0]`` is ignored."""
    results: list[StepResult] = []
    for t in range(queries.shape[1]):
        res = filter_step(
            model,
            belief=belief,
            prepared_map=prepared_map,
            query=queries[:, t],
            egomotion=None if t == 0 else egomotion[:, t],
            config=config,
            generator=generator,
        )
        results.append(res)
        belief = res.belief
    return results, belief
