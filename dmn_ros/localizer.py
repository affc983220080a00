"""Localize one robot against a view-embedding map: the ROS-free API the nodes, demo and bag tools share.

A :class:`Localizer` holds one belief and one prepared map, converts between
metric poses (what users and ROS see) and the normalized units the model was
trained in (through the exported model's :class:`~dmn_ros.geometry.MetricScale`),
and runs :func:`dmn_ros.filter.filter_step`, the same filter code training
optimizes, with systematic resampling when ESS < threshold · K (SPEC
"Resampling at evaluation"), to a fixed count or, with ``adaptive_particles``, to
nav2_amcl's KLD-adaptive count (:mod:`dmn_ros.filter.kld`).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from dmn_ros.errors import DmnError, MapError
from dmn_ros.export import LoadedModel, module_device, resolve_device
from dmn_ros.filter import (
    Belief,
    FilterConfig,
    Health,
    HealthConfig,
    HealthState,
    PreparedMap,
    assess,
    estimate,
    filter_step,
    init_gaussian,
    init_uniform,
    inject_random_particles,
    marginal_log_likelihood,
    prepare_map,
)
from dmn_ros.filter.health import after_injection
from dmn_ros.filter.kld import AMCL_BIN_XY_M, AMCL_BIN_YAW_RAD, KldConfig
from dmn_ros.geometry import MetricScale, relative
from dmn_ros.images import as_model_image
from dmn_ros.maps import ViewMap
from dmn_ros.model.kinds import PARTICLE_FILTER_KINDS, model_kind

__all__ = [
    "DegenerateUpdateError",
    "Estimate",
    "Localizer",
    "LocalizerConfig",
    "NotReadyError",
    "build_map",
    "embed_images",
    "model_covariance_inflation",
    "model_likelihood_scale",
    "resolve_device",
]

_log = logging.getLogger("dmn_ros.localizer")


class NotReadyError(DmnError):
    """A step was requested before a map was set and the belief initialized."""


class DegenerateUpdateError(DmnError):
    """A frame's log-likelihoods are NaN or +inf, or -inf for every particle: the frame is refused and the
    belief is left as it was (weighing with them would make every weight NaN from then on)."""


def _same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` (the current GPU) and ``cuda:0`` are the same device when GPU 0 is the current one."""
    def index(d: torch.device) -> int | None:
        return torch.cuda.current_device() if d.type == "cuda" and d.index is None else d.index

    return a.type == b.type and index(a) == index(b)


@dataclass(frozen=True)
class LocalizerConfig:
    """Filter settings in metric units; defaults follow the paper's evaluation (K: 2048 global, 256)."""

    max_particles: int = 2048
    """Particles for global localization (uniform prior); with ``adaptive_particles`` the upper bound."""
    tracking_particles: int = 256
    """Particles for tracking from an initial pose; with ``adaptive_particles`` only the starting count."""
    adaptive_particles: bool = False
    """KLD-adaptive count (nav2_amcl, Fox 2003): every resampling draws between ``min_particles`` and
    ``max_particles``, as many as the occupied histogram bins need (``dmn_ros.filter.kld``)."""
    min_particles: int = 500
    """Lower bound of the adaptive count (nav2_amcl ``min_particles``); above ``max_particles`` it is
    clamped to it."""
    pf_err: float = 0.05
    """KLD ε: bound on the K-L divergence of the sampled belief (nav2_amcl ``pf_err``)."""
    pf_z: float = 0.99
    """KLD z, the standard-normal quantile value plugged into the bound, as nav2_amcl uses ``pf_z``."""
    kld_bin_xy_m: float = AMCL_BIN_XY_M
    """x-y histogram bin of the KLD bound, meters (nav2_amcl hard-codes 0.5 m)."""
    kld_bin_yaw_rad: float = AMCL_BIN_YAW_RAD
    """Yaw histogram bin of the KLD bound, radians (nav2_amcl hard-codes 10°)."""
    motion_noise_xy_m: float = 0.2
    """Std of the per-particle translation noise per step, meters, robot frame."""
    motion_noise_yaw_rad: float = 0.05
    """Std of the per-particle rotation noise per step, radians."""
    resample_threshold: float = 0.5
    """Systematic resampling when ESS < threshold · K."""
    global_margin_m: float = 2.0
    """Margin around the map's view positions for the default global prior."""
    device: str = "auto"
    """``auto`` (cuda if available), ``cpu`` or ``cuda``."""
    health: HealthConfig = field(default_factory=HealthConfig)
    """Thresholds of the converged / lost rules (docs/health.md)."""
    recovery_alpha_slow: float = 0.0
    """nav2_amcl's ``recovery_alpha_slow``: long-term likelihood average for random-particle injection; 0 = off."""
    recovery_alpha_fast: float = 0.0
    """nav2_amcl's ``recovery_alpha_fast``: short-term average; injection needs both > 0."""
    lost_updates_before_global: int = 0
    """Restart global localization after this many consecutive ``lost`` updates; 0 = never."""
    nearest_contexts: int = 0
    """Attend only to the M contexts nearest each particle (0: all), for large shared maps (docs/PERFORMANCE.md)."""
    likelihood_scale: float | None = None
    """Temperature on the model's log-likelihoods; None: the model's calibration, else 1."""
    cluster_radius_m: float = 0.0
    """0: the estimate is the particles' weighted mean (the paper's); > 0: the mean of the heaviest
    cluster of this x-y radius, as nav2_amcl publishes (:func:`dmn_ros.filter.steps.estimate`)."""
    covariance_inflation: float | None = None
    """x-y variance inflation applied to published covariances; None: the model's
    ``config["calibration"]["covariance_inflation"]`` if it has one, else 1.0."""


@dataclass(frozen=True)
class Estimate:
    """One filter step's output in metric units."""

    mean: np.ndarray
    """``(3,)`` metric ``(x, y, yaw)`` in the map frame."""
    covariance: np.ndarray
    """``(3, 3)`` covariance (m², rad²), yaw variance from circular statistics."""
    ess: float
    """Effective sample size after the update, before resampling."""
    spread: float
    """``sqrt(var_x + var_y)`` in meters: one number for how spread the belief is."""
    latency_ms: float
    """Wall time of the step (image preparation, model, filter)."""
    num_particles: int
    """Particles this update weighed."""
    health: Health | None = None
    """Health signals of this update (ESS, likelihood averages, spreads, converged/lost, level)."""
    recovery: str = ""
    """Recovery taken after this update: ``""``, ``"injected <n>"`` or ``"global"``."""
    next_particles: int = 0
    """Particles after resampling and recovery: what the next update weighs (changes with
    ``adaptive_particles`` or a global restart)."""


def embed_images(model: LoadedModel, images: Sequence[np.ndarray | torch.Tensor] | np.ndarray | torch.Tensor
                 ) -> np.ndarray:
    """Context images → embeddings ``(N, D, h, w)`` float32.

    Each image is anything :func:`~dmn_ros.images.as_model_image` takes (numpy or torch, ``(H, W, 3)``
    or ``(3, H, W)``, uint8 or float in [0, 1], any size); a 4-D array or tensor is a batch of them.
    The batch goes wherever ``model.module``'s weights are, whatever ``model.device`` says.
    """
    h, w = model.info.image_height, model.info.image_width
    if len(images) == 0:
        return np.zeros((0, *model.info.embed_shape), dtype=np.float32)
    batch = torch.stack([as_model_image(im, height=h, width=w) for im in images])
    with torch.inference_mode():
        emb = model.module.embed_views(batch.to(module_device(model.module, model.device)))
    return emb.float().cpu().numpy()


def build_map(
    model: LoadedModel,
    images: Sequence[np.ndarray | torch.Tensor] | np.ndarray | torch.Tensor,
    poses: np.ndarray | Sequence[Sequence[float]],
    *,
    ids: Sequence[str] | None = None,
    frame_id: str = "map",
) -> ViewMap:
    """A view-embedding map from context images and their metric ``(x, y, yaw)`` poses in ``frame_id``.

    The map carries ``model``'s fingerprint, so a Localizer with other weights refuses it. Ids
    default to ``"view/000000"``…; give your own to merge maps from several robots later.
    """
    pos = np.asarray(poses, dtype=np.float64)
    n = len(images)
    if pos.shape != (n, 3):
        raise MapError(f"{n} images need poses of shape ({n}, 3), got {pos.shape}")
    vm = ViewMap.for_model(model.info, frame_id=frame_id)
    vm.add(embeddings=embed_images(model, images), poses=pos,
           ids=list(ids) if ids is not None else [f"view/{i:06d}" for i in range(n)])
    return vm


INDEPENDENT_FRAMES_SUFFIX = "_independent"
"""Calibration keys with this suffix were fitted on independent views (the paper's random-order queries)."""


def _calibration_value(config: dict, key: str, independent_frames: bool) -> float:
    cal = config.get("calibration")
    cal = cal if isinstance(cal, dict) else {}
    value = cal.get(key + INDEPENDENT_FRAMES_SUFFIX) if independent_frames else None
    if not value:
        value = cal.get(key) if cal else config.get(key)
    return float(value) if value else 1.0


def model_likelihood_scale(config: dict, *, independent_frames: bool = False) -> float:
    """The log-likelihood temperature an exported model carries (``config["calibration"]``), else 1.0.

    The plain key is fitted on consecutive frames of smooth trajectories, what a robot (the node, bags)
    feeds the filter. Such frames repeat nearly one view, and multiplying their likelihoods counts that
    evidence again and again, so they need a colder temperature than independent views do.
    ``independent_frames`` reads ``likelihood_scale_independent`` (fitted on the paper's random-order
    queries) where the model has one.
    """
    return _calibration_value(config, "likelihood_scale", independent_frames)


def model_covariance_inflation(config: dict, *, independent_frames: bool = False) -> float:
    """The calibration an exported model carries: ``config["calibration"]["covariance_inflation"]``, else 1.0.

    (A top-level ``config["covariance_inflation"]`` is accepted too.) ``dmn_ros.export`` can write it
    from :func:`dmn_ros.evaluation.health_metrics.fit_inflation` on validation runs (docs/health.md).
    ``independent_frames`` as in :func:`model_likelihood_scale`.
    """
    return _calibration_value(config, "covariance_inflation", independent_frames)


class Localizer:
    """One robot's DMN particle filter with metric inputs and outputs."""

    def __init__(self, model: LoadedModel, *, config: LocalizerConfig | None = None, seed: int = 0) -> None:
        kind = model_kind(model.info.config)
        if kind not in PARTICLE_FILTER_KINDS:  # e.g. the regression baseline: no likelihood to weigh particles
            raise ValueError(f"{model.path}: a {kind!r} model has no observation model for the particle filter; "
                             f"the Localizer runs {', '.join(PARTICLE_FILTER_KINDS)} models")
        self.config = config or LocalizerConfig()
        self.device = resolve_device(self.config.device)
        if not _same_device(module_device(model.module, model.device), self.device):
            # The caller's module (shared with build_map, embed_images, other Localizers) stays where it is.
            try:
                module = copy.deepcopy(model.module).to(self.device)
            except Exception as exc:  # torch raises RuntimeError, NotImplementedError or AssertionError here
                raise ValueError(f"{model.path}: cannot run the model on device {self.device}: {exc}") from exc
            model = LoadedModel(module, model.info, self.device, model.path)
        self.model = model
        """The model the filter runs: the caller's, or this Localizer's own copy on :attr:`device`."""
        self.info = model.info
        self.scale: MetricScale = model.info.metric_scale()
        """Metric ↔ normalized; its origin is moved to the map's center. The egocentric DMN is invariant to
        it; the kinds that see absolute coordinates (``egocentric=False`` and the latent maps) were
        trained in worlds centred on the origin, so a map's own centre is the closest match for a map
        in arbitrary coordinates (``dmn-eval`` keeps the world's origin, near its views' centre)."""
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(int(seed))
        self.view_map: ViewMap | None = None
        self.prepared: PreparedMap | None = None
        self.belief: Belief | None = None
        self.mode: str = "uninitialized"
        """``uninitialized``, ``global`` or ``tracking``."""
        self.health_state = HealthState()
        """Running health values since the last (re)initialization."""
        self.last_health: Health | None = None
        self.recoveries: dict[str, int] = {"injections": 0, "injected_particles": 0, "global": 0}
        """Recovery actions taken since construction."""
        inflation = self.config.covariance_inflation
        if inflation is None:
            inflation = model_covariance_inflation(model.info.config)
        if not (math.isfinite(inflation) and inflation > 0.0):
            raise ValueError(f"covariance_inflation must be > 0, got {inflation}")
        if not math.isfinite(self.config.cluster_radius_m) or self.config.cluster_radius_m < 0:
            raise ValueError(f"cluster_radius_m must be >= 0, got {self.config.cluster_radius_m}")
        self.covariance_inflation: float = float(inflation)
        """x-y variance factor applied to every published covariance (calibration, docs/health.md)."""
        scale = self.config.likelihood_scale
        if scale is None:
            scale = model_likelihood_scale(model.info.config)
        if not (math.isfinite(scale) and scale > 0.0):
            raise ValueError(f"likelihood_scale must be > 0, got {scale}")
        self.likelihood_scale: float = float(scale)
        """Temperature applied to the observation log-likelihoods (calibration)."""
        if self.config.min_particles < 1 or self.config.max_particles < 1 or self.config.tracking_particles < 1:
            raise ValueError("min_particles, max_particles and tracking_particles must be >= 1")
        self._kld_config()  # validates pf_err, pf_z and the bin sizes now rather than at the first step

    # ---- state ------------------------------------------------------------------------------
    @property
    def has_map(self) -> bool:
        return self.prepared is not None

    @property
    def initialized(self) -> bool:
        return self.belief is not None

    @property
    def ready(self) -> bool:
        """True when a step can run: a non-empty map and an initialized belief."""
        return self.has_map and self.initialized

    def _filter_config(self) -> FilterConfig:
        mpu = self.scale.meters_per_unit
        c = self.config
        return FilterConfig(
            transition_noise=(c.motion_noise_xy_m / mpu, c.motion_noise_xy_m / mpu, c.motion_noise_yaw_rad),
            resampling="kld" if c.adaptive_particles else "systematic",
            ess_threshold=c.resample_threshold,
            kld=self._kld_config(),
            nearest_contexts=c.nearest_contexts,
            likelihood_scale=self.likelihood_scale,
            cluster_radius=c.cluster_radius_m / mpu,
        )

    def _kld_config(self) -> KldConfig:
        c = self.config
        return KldConfig.from_metric(
            meters_per_unit=self.scale.meters_per_unit,
            min_particles=min(c.min_particles, c.max_particles),
            max_particles=c.max_particles,
            pf_err=c.pf_err,
            pf_z=c.pf_z,
            bin_xy_m=c.kld_bin_xy_m,
            bin_yaw_rad=c.kld_bin_yaw_rad,
        )

    # ---- map --------------------------------------------------------------------------------
    @torch.inference_mode()
    def set_map(self, view_map: ViewMap) -> list[str]:
        """Prepare ``view_map`` once for every later step; returns warnings (also logged).

        Raises :class:`~dmn_ros.errors.FingerprintMismatchError` for a map from another
        model. An empty map clears the current one (no steps until a new map arrives).
        """
        view_map.check_fingerprint(self.info.fingerprint)
        warnings: list[str] = []
        if len(view_map) == 0:
            self.view_map, self.prepared = view_map, None
            return warnings
        xmin, xmax, ymin, ymax = view_map.extent()  # type: ignore[misc]
        size = max(xmax - xmin, ymax - ymin)
        if size > 2.0 * self.info.area_size_m:
            warnings.append(
                f"map extent {size:.1f} m is more than twice the model's training area "
                f"({self.info.area_size_m:.1f} m); localization may degrade"
            )
        old_scale = self.scale
        self.scale = MetricScale(self.info.meters_per_unit, (xmin + xmax) / 2.0, (ymin + ymax) / 2.0)
        if self.belief is not None and old_scale != self.scale:  # keep the belief where it is in meters
            metric = old_scale.to_metric(self.belief.particles)
            self.belief = Belief(self.scale.to_normalized(metric), self.belief.log_weights)
        emb = torch.from_numpy(np.ascontiguousarray(view_map.embeddings)).to(self.device).unsqueeze(0)
        poses = torch.from_numpy(self.scale.to_normalized(view_map.poses)).float().to(self.device)[None]
        self.prepared = prepare_map(self.model.module, embeddings=emb, poses=poses)
        self.view_map = view_map
        for w in warnings:
            _log.warning(w)
        return warnings

    # ---- initialization ---------------------------------------------------------------------
    def default_bounds(self) -> tuple[float, float, float, float]:
        """The map's view extent plus ``global_margin_m``, in meters."""
        if self.view_map is None or len(self.view_map) == 0:
            raise NotReadyError("global localization needs bounds or a non-empty map")
        xmin, xmax, ymin, ymax = self.view_map.extent()  # type: ignore[misc]
        m = self.config.global_margin_m
        return xmin - m, xmax + m, ymin - m, ymax + m

    def init_global(self, bounds: tuple[float, float, float, float] | None = None) -> None:
        """Uniform belief over metric ``bounds = (xmin, xmax, ymin, ymax)`` (default: the map's), all yaws."""
        self.belief = init_uniform(
            batch=1,
            num_particles=self.config.max_particles,
            bounds=self.scale.bounds_to_normalized(bounds if bounds is not None else self.default_bounds()),
            generator=self.generator,
            device=self.device,
        )
        self.mode = "global"
        self._reset_health()

    def init_pose(self, mean_metric: Sequence[float] | np.ndarray, cov_metric: np.ndarray) -> None:
        """Gaussian belief (tracking) around a metric pose with a metric ``(3, 3)`` covariance."""
        mean = np.asarray(mean_metric, dtype=np.float64).reshape(3)
        cov = np.asarray(cov_metric, dtype=np.float64).reshape(3, 3)
        if not (np.isfinite(mean).all() and np.isfinite(cov).all()):
            raise ValueError("initial pose or covariance is not finite")
        cov = 0.5 * (cov + cov.T)
        mpu = self.scale.meters_per_unit
        s = np.diag([1.0 / mpu, 1.0 / mpu, 1.0])
        cov_n = s @ cov @ s + np.eye(3) * 1e-9
        if np.linalg.eigvalsh(cov_n).min() <= 0:
            raise ValueError("initial covariance is not positive semi-definite")
        mean_n = torch.tensor(self.scale.to_normalized(mean), dtype=torch.float32, device=self.device)
        cov_t = torch.tensor(cov_n, dtype=torch.float32, device=self.device)
        self.belief = init_gaussian(
            mean=mean_n.unsqueeze(0),
            std=cov_t.unsqueeze(0),
            num_particles=self.config.tracking_particles,
            generator=self.generator,
        )
        self.mode = "tracking"
        self._reset_health()

    def _reset_health(self) -> None:
        self.health_state = HealthState()
        self.last_health = None

    def reset(self) -> None:
        """Forget the belief (no output until re-initialized); the map stays."""
        self.belief = None
        self.mode = "uninitialized"
        self._reset_health()

    # ---- filtering --------------------------------------------------------------------------
    def _query(self, image: np.ndarray | torch.Tensor) -> torch.Tensor:
        q = as_model_image(image, height=self.info.image_height, width=self.info.image_width)
        return q.unsqueeze(0).to(self.device)

    @torch.inference_mode()
    def step(
        self, image: np.ndarray | torch.Tensor, egomotion_metric: Sequence[float] | np.ndarray | None = None
    ) -> Estimate:
        """Move by ``Δ_t`` (metric, robot frame at t-1; None: no motion), weigh with ``image``, estimate."""
        if not self.ready:
            raise NotReadyError("Localizer.step needs a map (set_map) and a belief (init_global/init_pose)")
        t0 = time.perf_counter()
        query = self._query(image)
        delta = None
        if egomotion_metric is not None:
            d = np.asarray(egomotion_metric, dtype=np.float64).reshape(3)
            if not np.isfinite(d).all():
                raise ValueError(f"egomotion {d} is not finite")
            d_n = self.scale.delta_to_normalized(d)
            delta = torch.tensor(d_n, dtype=torch.float32, device=self.device)[None]
        prev_log_weights = self.belief.log_weights  # type: ignore[union-attr]
        res = filter_step(
            self.model.module,
            belief=self.belief,  # type: ignore[arg-type]
            prepared_map=self.prepared,  # type: ignore[arg-type]
            query=query,
            egomotion=delta,
            config=self._filter_config(),
            generator=self.generator,
        )
        marginal = float(marginal_log_likelihood(prev_log_weights, res.log_likelihood)[0])
        if not math.isfinite(marginal):  # NaN/+inf anywhere, or -inf everywhere: the normalizer is undefined
            bad = int((~torch.isfinite(res.log_likelihood[0])).sum())
            raise DegenerateUpdateError(
                f"observation log-likelihoods are not usable ({bad} of {res.log_likelihood.shape[1]} non-finite, "
                f"marginal {marginal}): frame refused, belief unchanged")
        self.belief = res.belief
        c = self.config
        self.health_state, health = assess(
            self.health_state,
            updated=res.updated,
            log_marginal=marginal,
            meters_per_unit=self.scale.meters_per_unit,
            config=c.health,
            recovery_alpha_slow=c.recovery_alpha_slow,
            recovery_alpha_fast=c.recovery_alpha_fast,
        )
        self.last_health = health
        mean = self.scale.to_metric(res.mean[0].double().cpu().numpy())
        raw_cov = self._cov_to_metric(res.covariance[0].double().cpu().numpy())
        cov = raw_cov.copy()
        cov[:2, :2] *= self.covariance_inflation
        recovery = self._recover(health)
        latency = (time.perf_counter() - t0) * 1000.0
        return Estimate(
            mean=mean,
            covariance=cov,
            ess=health.ess,
            spread=float(math.sqrt(max(raw_cov[0, 0] + raw_cov[1, 1], 0.0))),
            latency_ms=latency,
            num_particles=int(res.updated.num_particles),
            health=health,
            recovery=recovery,
            next_particles=self.num_particles,
        )

    def _recover(self, health: Health) -> str:
        """Global relocalization after ``lost_updates_before_global`` lost updates, else AMCL injection."""
        n = self.config.lost_updates_before_global
        if n > 0 and health.lost_streak >= n:
            _log.warning("lost for %d updates: restarting global localization", health.lost_streak)
            self.init_global()
            self.recoveries["global"] += 1
            return "global"
        if health.injection_probability > 0.0 and self.belief is not None:
            self.belief, count = inject_random_particles(
                self.belief,
                probability=health.injection_probability,
                bounds=self.scale.bounds_to_normalized(self.default_bounds()),
                generator=self.generator,
            )
            self.health_state = after_injection(self.health_state)
            if count:
                self.recoveries["injections"] += 1
                self.recoveries["injected_particles"] += count
                return f"injected {count}"
        return ""

    def localize(
        self,
        images: Sequence[np.ndarray | torch.Tensor] | np.ndarray | torch.Tensor,
        odometry: np.ndarray | Sequence[Sequence[float]] | None = None,
    ) -> list[Estimate]:
        """Run the filter over a sequence of frames; one :class:`Estimate` per frame.

        ``odometry`` is the robot's ``(T, 3)`` metric odometry pose at each frame, in any fixed frame
        (only the change between consecutive frames is used, as the node uses its odom buffer);
        None means the robot stands still. The first frame is weighed where the belief already is,
        so call :meth:`init_global` or :meth:`init_pose` first, and again for an unrelated sequence.
        """
        n = len(images)
        odo = None if odometry is None else np.asarray(odometry, dtype=np.float64)
        if odo is not None and odo.shape != (n, 3):
            raise ValueError(f"{n} frames need odometry of shape ({n}, 3), got {odo.shape}")
        out: list[Estimate] = []
        for t in range(n):
            delta = None if odo is None or t == 0 else relative(odo[t - 1], odo[t])
            out.append(self.step(images[t], delta))
        return out

    def nomotion_update(self, image: np.ndarray | torch.Tensor) -> Estimate:
        """Weigh with ``image`` without moving the particles (nav2_amcl's ``request_nomotion_update``)."""
        return self.step(image, None)

    def _cov_to_metric(self, cov: np.ndarray) -> np.ndarray:
        mpu = self.scale.meters_per_unit
        s = np.diag([mpu, mpu, 1.0])
        out = s @ cov @ s
        return 0.5 * (out + out.T)  # exactly symmetric for ROS consumers

    # ---- inspection -------------------------------------------------------------------------
    @property
    def num_particles(self) -> int:
        """Particles in the current belief (0 without one); varies with ``adaptive_particles``."""
        return 0 if self.belief is None else self.belief.num_particles

    def current_estimate(self) -> tuple[np.ndarray, np.ndarray]:
        """Metric mean ``(3,)`` and covariance ``(3, 3)`` of the current belief (no new frame)."""
        if self.belief is None:
            raise NotReadyError("no belief")
        with torch.inference_mode():
            mean, cov = estimate(self.belief, cluster_radius=self.config.cluster_radius_m / self.scale.meters_per_unit)
        out = self._cov_to_metric(cov[0].double().cpu().numpy())
        out[:2, :2] *= self.covariance_inflation
        return self.scale.to_metric(mean[0].double().cpu().numpy()), out

    def particles_metric(self) -> np.ndarray:
        """``(K, 3)`` particle poses in meters/radians, map frame."""
        if self.belief is None:
            return np.zeros((0, 3))
        return self.scale.to_metric(self.belief.particles[0].double().cpu().numpy())

    def weights(self) -> np.ndarray:
        """``(K,)`` normalized particle weights."""
        if self.belief is None:
            return np.zeros((0,))
        return self.belief.log_weights[0].exp().double().cpu().numpy()

    def context_poses(self) -> np.ndarray:
        """``(N, 3)`` metric poses of the map's views (for visualization)."""
        return np.zeros((0, 3)) if self.view_map is None else self.view_map.poses.copy()
