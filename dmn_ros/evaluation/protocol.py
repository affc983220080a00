"""The paper's evaluation protocol on fixed, seeded episodes (SPEC "Evaluation protocol").

* Global localization: uniform prior over the area and all yaws, K = 2048;
  success = x-y error < 8.94 m in a 40 m area (scaled with the area's side).
* Tracking: Gaussian prior σ 6 m / 30° whose *mean* is itself drawn around the
  true first pose, K = 256; RMSE of the x-y error at t = 5. The filter draws those means
  (:func:`tracking_prior_means` reads them back); the baselines take the same ones
  (``prior_means_m``), so every method starts tracking from the same guess.
* Inference resampling: systematic, when ESS < K/2 (every number here used it).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from dmn_ros.data import DatasetDir
from dmn_ros.data.episodes import Episode, sample_episode_from_views
from dmn_ros.filter import FilterConfig, encode_map, filter_step, init_gaussian, init_uniform
from dmn_ros.filter.runner import ObservationModel, StepResult
from dmn_ros.geometry import MetricScale, compose
from dmn_ros.images import to_tensor

if TYPE_CHECKING:
    from dmn_ros.evaluation.belief_plot import BeliefFrame

PAPER_SUCCESS_M = 8.94  # sqrt(80 m²) in the paper's 40 m × 40 m environments
PAPER_AREA_M = 40.0


def success_threshold_m(area_size_m: float) -> float:
    return PAPER_SUCCESS_M * area_size_m / PAPER_AREA_M


@dataclass(frozen=True)
class EvalSettings:
    mode: str = "global"
    """``global`` or ``tracking``."""
    num_particles: int = 2048
    T: int = 5
    num_contexts: int = 4
    tracking_std: tuple[float, float, float] = (6.0, 6.0, 30.0)
    """Meters, meters, degrees."""
    transition_noise: tuple[float, float, float] = (0.3, 0.3, 3.0)
    """Meters, meters, degrees per step."""
    batch_episodes: int = 4
    seed: int = 0
    nearest_contexts: int = 0
    """Nearest-M attention (0: all contexts)."""
    likelihood_scale: float = 1.0
    """Log-likelihood temperature (a model's calibration; see ``model_likelihood_scale``)."""
    cluster_radius_m: float = 0.0
    """0: score the weighted mean (the paper's estimate); > 0: the heaviest cluster's mean (nav2_amcl's)."""


@dataclass
class EpisodeSet:
    """Fixed evaluation episodes plus the area they live in."""

    episodes: list[Episode]
    area_size_m: float
    bounds: tuple[float, float, float, float]
    scale: MetricScale
    description: dict[str, Any] = field(default_factory=dict)


def make_episode_set(
    data_dir: str,
    *,
    split: str = "test",
    num_episodes: int = 100,
    num_contexts: int = 16,
    T: int = 20,
    seed: int = 0,
    odom_noise: tuple[float, float] = (0.1, math.radians(2.0)),
    query_mode: str = "segment",
) -> EpisodeSet:
    """Seeded episodes with the paper's random contexts; the first ``Nc`` contexts of each are used at eval.

    Drawing ``num_contexts`` up front and truncating means an Nc sweep compares
    nested context sets on identical queries.
    """
    ds = DatasetDir(data_dir)
    names = ds.env_names(split)
    if not names:
        raise ValueError(f"{data_dir}: split {split!r} is empty")
    rng = np.random.default_rng(seed)
    area = float(ds.meta.bounds[1] - ds.meta.bounds[0])
    eps: list[Episode] = []
    cache: dict[str, Any] = {}
    for i in range(num_episodes):
        name = names[i % len(names)]
        if name not in cache:
            cache = {name: ds.load_env(name)}  # keep one env in memory
        eps.append(sample_episode_from_views(cache[name], rng, num_contexts=num_contexts, T=T,
                                             query_mode=query_mode, context_mode="random",
                                             odom_noise=odom_noise, area_size_m=area))
    desc = {"data": data_dir, "split": split, "episodes": num_episodes, "seed": seed, "T": T,
            "odom_noise": list(odom_noise), "query_mode": query_mode, "domain": ds.meta.domain}
    return EpisodeSet(eps, area, tuple(ds.meta.bounds), ds.meta.metric_scale(), desc)


class EpisodeBatch(NamedTuple):
    """Up to ``settings.batch_episodes`` episodes as model inputs (normalized poses) plus the metric truth."""

    contexts: torch.Tensor
    """``(B, Nc, 3, H, W)``."""
    context_poses: torch.Tensor
    """``(B, Nc, 3)``."""
    queries: torch.Tensor
    """``(B, T, 3, H, W)``."""
    egomotion: torch.Tensor
    """``(B, T, 3)``."""
    truth: np.ndarray
    """``(B, T, 3)`` metric ground truth."""
    start: int = 0
    """Index of the batch's first episode in the episode set."""
    prior_mean: np.ndarray | None = None
    """``(B, 3)`` metric mean of the tracking prior ``b0`` (set by :func:`filter_steps`; None for global)."""


def _checked_prior_means(prior_means_m: np.ndarray | None, episodes: EpisodeSet) -> np.ndarray | None:
    if prior_means_m is None:
        return None
    pm = np.asarray(prior_means_m, dtype=np.float64)
    if pm.shape != (len(episodes.episodes), 3):
        raise ValueError(f"prior_means_m: expected shape ({len(episodes.episodes)}, 3), got {pm.shape}")
    return pm


def episode_batches(episodes: EpisodeSet, settings: EvalSettings, device: torch.device) -> Iterator[EpisodeBatch]:
    """The first ``num_contexts`` contexts and ``T`` frames of each episode, ``batch_episodes`` at a time."""
    scale, nc, big_t = episodes.scale, settings.num_contexts, settings.T
    eps = episodes.episodes
    for start in range(0, len(eps), settings.batch_episodes):
        chunk = eps[start : start + settings.batch_episodes]
        yield EpisodeBatch(
            contexts=torch.stack([to_tensor(e.context_images[:nc]) for e in chunk]).to(device),
            context_poses=torch.stack(
                [torch.from_numpy(scale.to_normalized(e.context_poses[:nc])) for e in chunk]).float().to(device),
            queries=torch.stack([to_tensor(e.query_images[:big_t]) for e in chunk]).to(device),
            egomotion=torch.stack(
                [torch.from_numpy(scale.delta_to_normalized(e.egomotion[:big_t])) for e in chunk]).float().to(device),
            truth=np.stack([e.query_poses[:big_t] for e in chunk]),
            start=start,
        )


def filter_steps(
    model: ObservationModel,
    episodes: EpisodeSet,
    settings: EvalSettings,
    *,
    device: torch.device | str = "cpu",
    prior_means_m: np.ndarray | None = None,
) -> Iterator[tuple[EpisodeBatch, int, torch.Tensor, StepResult]]:
    """The protocol's filter, one ``(batch, t, log weights before the update, step result)`` per step.

    One seeded generator for priors, motion noise and resampling; :func:`run_filter` and
    :func:`~dmn_ros.evaluation.health_metrics.collect_runs` both read this one loop.

    Tracking: each batch's prior means are drawn from that generator around the true first poses
    (``batch.prior_mean`` carries them, metric). ``prior_means_m`` ``(E, 3)``, metric, replaces them
    by given ones (another method's, :func:`tracking_prior_means`); the draw is still made and
    discarded, so every later draw is the one the run would make anyway.
    """
    prior_means_m = _checked_prior_means(prior_means_m, episodes)
    dev = torch.device(device)
    scale = episodes.scale
    mpu = scale.meters_per_unit
    g = torch.Generator(device=dev).manual_seed(settings.seed)
    n = settings.transition_noise
    cfg = FilterConfig(
        transition_noise=(n[0] / mpu, n[1] / mpu, math.radians(n[2])),
        resampling="systematic",
        nearest_contexts=settings.nearest_contexts,
        likelihood_scale=settings.likelihood_scale,
        cluster_radius=settings.cluster_radius_m / mpu,
    )
    s = settings.tracking_std
    std = (s[0] / mpu, s[1] / mpu, math.radians(s[2]))
    norm_bounds = scale.bounds_to_normalized(episodes.bounds)
    for batch in episode_batches(episodes, settings, dev):
        b = batch.truth.shape[0]
        pm = encode_map(model, images=batch.contexts, poses=batch.context_poses)
        if settings.mode == "global":
            belief = init_uniform(batch=b, num_particles=settings.num_particles, bounds=norm_bounds, generator=g,
                                  device=dev)
        elif settings.mode == "tracking":
            t0 = torch.from_numpy(scale.to_normalized(batch.truth[:, 0])).float().to(dev)
            offset = torch.randn(b, 3, generator=g, device=dev) * torch.tensor(std, device=dev)
            mean = compose(t0, torch.zeros_like(t0)) + offset
            if prior_means_m is not None:
                given = prior_means_m[batch.start : batch.start + b]
                mean = torch.from_numpy(scale.to_normalized(given)).float().to(dev)
            batch = batch._replace(prior_mean=scale.to_metric(mean.double().cpu().numpy()))
            belief = init_gaussian(mean=mean, std=std, num_particles=settings.num_particles, generator=g)
        else:
            raise ValueError(f"unknown mode {settings.mode!r}")
        for t in range(settings.T):
            prev_log_weights = belief.log_weights
            res = filter_step(model, belief=belief, prepared_map=pm, query=batch.queries[:, t],
                              egomotion=None if t == 0 else batch.egomotion[:, t], config=cfg, generator=g)
            belief = res.belief
            yield batch, t, prev_log_weights, res


@torch.inference_mode()
def run_filter(
    model: ObservationModel,
    episodes: EpisodeSet,
    settings: EvalSettings,
    *,
    device: torch.device | str = "cpu",
    prior_means_m: np.ndarray | None = None,
) -> np.ndarray:
    """x-y errors in meters, ``(E, T)``, of the filter's estimate on each episode and step.

    ``prior_means_m``: tracking starts from these metric prior means (see :func:`filter_steps`).
    """
    errors: list[np.ndarray] = []
    for batch, t, _, res in filter_steps(model, episodes, settings, device=device, prior_means_m=prior_means_m):
        if t == 0:
            errors.append(np.zeros(batch.truth.shape[:2]))
        est = episodes.scale.to_metric(res.mean.double().cpu().numpy())
        errors[-1][:, t] = np.hypot(est[:, 0] - batch.truth[:, t, 0], est[:, 1] - batch.truth[:, t, 1])
    return np.concatenate(errors, axis=0)


@torch.inference_mode()
def run_regression(
    model: torch.nn.Module,
    episodes: EpisodeSet,
    settings: EvalSettings,
    *,
    device: torch.device | str = "cpu",
    prior_means_m: np.ndarray | None = None,
) -> np.ndarray:
    """x-y errors in meters, ``(E, T)``, of the regression baseline (``kind: regression``) on the same episodes.

    Its one "particle" starts at the mean of ``b0``: the area's center for global localization
    (yaw 0: a uniform yaw has no mean); for tracking the given ``prior_means_m`` ``(E, 3)``, metric
    (dmn-eval passes the filter's, :func:`tracking_prior_means`), else its own draw made as the
    filter makes its first batch's (:func:`regression_prior_means`). ``num_particles``,
    ``transition_noise``, ``nearest_contexts`` and ``likelihood_scale`` do not apply.
    """
    from dmn_ros.model.regression import regress_sequence

    dev = torch.device(device)
    scale = episodes.scale
    prior_means_m = _checked_prior_means(prior_means_m, episodes)
    errors = []
    for batch, initial in _regression_starts(episodes, settings, dev, prior_means_m):
        b, nc = batch.contexts.shape[:2]
        truth = batch.truth
        emb = model.embed_views(batch.contexts.flatten(0, 1))
        map_v, map_u = model.prepare_map(emb.reshape(b, nc, *emb.shape[1:]))
        estimates = regress_sequence(model, map_v=map_v, map_u=map_u, context_poses=batch.context_poses,
                                     queries=batch.queries, egomotion=batch.egomotion, initial=initial)
        est = scale.to_metric(torch.stack(estimates, dim=1).double().cpu().numpy())  # (B, T, 3)
        errors.append(np.hypot(est[..., 0] - truth[..., 0], est[..., 1] - truth[..., 1]))
    return np.concatenate(errors, axis=0)


def _regression_starts(
    episodes: EpisodeSet, settings: EvalSettings, dev: torch.device, prior_means_m: np.ndarray | None
) -> Iterator[tuple[EpisodeBatch, torch.Tensor]]:
    """Each batch and the regression's initial poses ``(B, 3)`` (normalized), as :func:`run_regression` starts."""
    scale = episodes.scale
    g = torch.Generator(device=dev).manual_seed(settings.seed)
    s = settings.tracking_std
    std = torch.tensor((s[0] / scale.meters_per_unit, s[1] / scale.meters_per_unit, math.radians(s[2])), device=dev)
    cx = 0.5 * (episodes.bounds[0] + episodes.bounds[1])
    cy = 0.5 * (episodes.bounds[2] + episodes.bounds[3])
    center = torch.from_numpy(scale.to_normalized(np.array([cx, cy, 0.0]))).float().to(dev)
    for batch in episode_batches(episodes, settings, dev):
        b = batch.truth.shape[0]
        if settings.mode == "global":
            initial = center.expand(b, 3)
        elif settings.mode == "tracking" and prior_means_m is not None:
            given = prior_means_m[batch.start : batch.start + b]
            initial = torch.from_numpy(scale.to_normalized(given)).float().to(dev)
        elif settings.mode == "tracking":  # the filter's formula (filter_steps), so a first batch starts alike
            t0 = torch.from_numpy(scale.to_normalized(batch.truth[:, 0])).float().to(dev)
            initial = compose(t0, torch.zeros_like(t0)) + torch.randn(b, 3, generator=g, device=dev) * std
        else:
            raise ValueError(f"unknown mode {settings.mode!r}")
        yield batch, initial


@torch.inference_mode()
def tracking_prior_means(
    model: ObservationModel,
    episodes: EpisodeSet,
    settings: EvalSettings,
    *,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """``(E, 3)`` metric means of the tracking prior that :func:`run_filter` draws for this model and settings.

    Each batch's draw follows the previous batches' motion-noise and resampling draws of the same
    generator, so it takes the filter run itself (the same run, bit for bit, as :func:`run_filter`'s).
    dmn-eval hands these to every baseline (``prior_means_m``).
    """
    if settings.mode != "tracking":
        raise ValueError(f"tracking_prior_means: settings.mode is {settings.mode!r}, not 'tracking'")
    means = [batch.prior_mean for batch, t, _, _ in filter_steps(model, episodes, settings, device=device) if t == 0]
    return np.concatenate([m for m in means if m is not None], axis=0)


def regression_prior_means(episodes: EpisodeSet, settings: EvalSettings, *, device: torch.device | str = "cpu"
                           ) -> np.ndarray:
    """``(E, 3)`` metric tracking starts that :func:`run_regression` draws itself (no model needed)."""
    dev = torch.device(device)
    starts = [initial for _, initial in _regression_starts(episodes, settings, dev, None)]
    return episodes.scale.to_metric(torch.cat(starts).double().cpu().numpy())


@torch.inference_mode()
def belief_frames(
    model: ObservationModel,
    episodes: EpisodeSet,
    settings: EvalSettings,
    *,
    num_episodes: int,
    steps: list[int],
    device: torch.device | str = "cpu",
) -> list[list[BeliefFrame]]:
    """The filter's belief at the 1-based ``steps`` of the first ``num_episodes`` episodes, metric.

    Reads the first batches of :func:`filter_steps` with the same settings and generator, so these are
    the beliefs of the run :func:`run_filter` scores (its later batches are not run). Each frame holds
    the particles and weights after step t's update (before resampling), the estimate and the truth.
    """
    from dmn_ros.evaluation.belief_plot import BeliefFrame

    n = min(num_episodes, len(episodes.episodes))
    want = set(steps)
    out: list[list[BeliefFrame]] = [[] for _ in range(n)]
    if n == 0 or not want:
        return out
    scale = episodes.scale
    bsz = settings.batch_episodes
    first = dataclasses.replace(episodes, episodes=episodes.episodes[: -(-n // bsz) * bsz])  # whole batches
    for batch, t, _, res in filter_steps(model, first, settings, device=device):
        if t + 1 not in want:
            continue
        particles = scale.to_metric(res.updated.particles.double().cpu().numpy())
        weights = res.updated.weights.double().cpu().numpy()
        est = scale.to_metric(res.mean.double().cpu().numpy())
        for i in range(min(batch.truth.shape[0], n - batch.start)):
            truth = batch.truth[i, t]
            out[batch.start + i].append(BeliefFrame(
                t=t + 1, particles=particles[i], weights=weights[i], truth=truth, estimate=est[i],
                error=float(np.hypot(est[i, 0] - truth[0], est[i, 1] - truth[1]))))
    return out


def closest_context_errors(episodes: EpisodeSet, *, num_contexts: int, T: int) -> np.ndarray:
    """Distance from the truth to the nearest context pose: an upper bound for image-similarity methods."""
    out = []
    for e in episodes.episodes:
        c = e.context_poses[:num_contexts, :2]
        q = e.query_poses[:T, :2]
        out.append(np.min(np.linalg.norm(q[:, None, :] - c[None], axis=-1), axis=1))
    return np.stack(out)


def uninformed_errors(
    episodes: EpisodeSet, settings: EvalSettings, *, prior_means_m: np.ndarray | None = None
) -> np.ndarray:
    """The prior's mean moved by odometry only (area center for global; offset guess for tracking).

    Tracking starts from ``prior_means_m`` ``(E, 3)``, metric, when given (dmn-eval passes the
    filter's, :func:`tracking_prior_means`); without them it draws its own offsets (numpy, seeded).
    """
    prior_means_m = _checked_prior_means(prior_means_m, episodes)
    rng = np.random.default_rng(settings.seed)
    s = settings.tracking_std
    out = []
    cx = 0.5 * (episodes.bounds[0] + episodes.bounds[1])
    cy = 0.5 * (episodes.bounds[2] + episodes.bounds[3])
    for i, e in enumerate(episodes.episodes):
        if settings.mode == "global":
            pose = np.array([cx, cy, 0.0])
        elif prior_means_m is not None:
            pose = prior_means_m[i].copy()
        else:
            pose = e.query_poses[0] + rng.normal(size=3) * np.array([s[0], s[1], math.radians(s[2])])
        errs = []
        for t in range(settings.T):
            if t > 0:
                pose = compose(pose, e.egomotion[t])
            errs.append(math.hypot(pose[0] - e.query_poses[t, 0], pose[1] - e.query_poses[t, 1]))
        out.append(errs)
    return np.asarray(out)


def success_rate(errors: np.ndarray, threshold_m: float) -> np.ndarray:
    """Share of episodes whose error at each step is under the threshold, ``(T,)``."""
    return (errors < threshold_m).mean(axis=0)


def rmse(errors: np.ndarray) -> np.ndarray:
    """sqrt(mean over episodes of squared x-y error) at each step, ``(T,)``."""
    return np.sqrt((errors**2).mean(axis=0))
