"""Localization health signals and AMCL-style recovery, computed from the particle belief (ROS-free).

Signals, per update (see ``docs/health.md``):

* **ESS** ``1 / Σ w²`` after the update and before resampling.
* **Observation log-likelihood** ``ℓ_t = logsumexp_k(log w_{t-1}^k + l_t^k)``: the filter's estimate of
  the log marginal likelihood of the frame. Its short- and long-term running averages
  ``ℓ_fast``/``ℓ_slow`` are AMCL's ``w_fast``/``w_slow`` kept in the log domain
  (``w ← w + α (w_avg − w)``), so the DMN's unbounded log-likelihoods never overflow.
* **Likelihood ratio** ``exp(ℓ_fast − ℓ_slow)``: ≈ 1 while frames explain the belief as well as
  they used to; ≪ 1 when recent frames fit much worse (kidnapped, wrong map, blinded camera).
* **Spread**: x-y ``sqrt(var_x + var_y)`` (weighted) and yaw ``sqrt(−2 ln R)`` (circular std).
* **Converged**: x-y spread < ``converged_xy_m`` and yaw spread < ``converged_yaw_rad`` for
  ``converged_updates`` consecutive updates.
* **Lost**: after ``warmup_updates`` updates since the last (re)initialization, the likelihood
  ratio is below ``lost_ratio``.

The tensor functions are batched over episodes ``(B, …)``; :func:`assess` folds one episode's
update into an explicit :class:`HealthState` value (no hidden state), as the filter does with beliefs.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, replace

import torch

from dmn_ros.filter.belief import Belief, uniform_log_weights
from dmn_ros.filter.resampling import systematic_resample
from dmn_ros.filter.steps import effective_sample_size

__all__ = [
    "Health",
    "HealthConfig",
    "HealthLevel",
    "HealthState",
    "after_injection",
    "assess",
    "inject_random_particles",
    "injection_probability",
    "log_running_average",
    "marginal_log_likelihood",
    "particle_spread",
]


class HealthLevel(enum.IntEnum):
    """Overall status; the values equal ``diagnostic_msgs/DiagnosticStatus`` levels."""

    OK = 0
    WARN = 1
    ERROR = 2


@dataclass(frozen=True)
class HealthConfig:
    """Thresholds of the health rules; lengths in meters, angles in radians."""

    alpha_slow: float = 0.05
    """Per-update weight of the long-term likelihood average (AMCL's ``alpha_slow`` role)."""
    alpha_fast: float = 0.5
    """Per-update weight of the short-term likelihood average (AMCL's ``alpha_fast`` role)."""
    converged_xy_m: float = 2.0
    """x-y spread ``sqrt(var_x + var_y)`` below which the belief counts as concentrated."""
    converged_yaw_rad: float = 0.35
    """Circular yaw std below which the belief counts as concentrated (20°)."""
    converged_updates: int = 3
    """Consecutive concentrated updates needed for ``converged``."""
    lost_ratio: float = 0.05
    """``lost`` when ``exp(ℓ_fast − ℓ_slow)`` is below this (recent frames fit 20× worse)."""
    warmup_updates: int = 5
    """Updates after a (re)initialization before ``lost`` can be declared (the averages need history)."""

    def __post_init__(self) -> None:
        for name in ("alpha_slow", "alpha_fast"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in (0, 1], got {getattr(self, name)}")
        if self.converged_updates < 1 or self.warmup_updates < 0:
            raise ValueError("converged_updates must be >= 1 and warmup_updates >= 0")


@dataclass(frozen=True)
class HealthState:
    """Running values carried from update to update (one robot); start from ``HealthState()``."""

    updates: int = 0
    """Filter updates since the last (re)initialization."""
    ll_slow: float | None = None
    """Long-term running average of ℓ (log domain); None before the first update."""
    ll_fast: float | None = None
    """Short-term running average of ℓ (log domain)."""
    concentrated_streak: int = 0
    """Consecutive updates with both spreads under their thresholds."""
    lost_streak: int = 0
    """Consecutive updates with ``lost``."""
    recovery_w_slow: float | None = None
    """AMCL ``w_slow`` (log domain) with ``recovery_alpha_slow``; None: reset or off."""
    recovery_w_fast: float | None = None
    """AMCL ``w_fast`` (log domain) with ``recovery_alpha_fast``."""


@dataclass(frozen=True)
class Health:
    """The health of one update, in metric units."""

    level: HealthLevel
    message: str
    """One line for operators: why the level is what it is."""
    ess: float
    """Effective sample size after the update, before resampling."""
    ess_fraction: float
    """ESS / K in (0, 1]."""
    log_likelihood: float
    """ℓ_t, log marginal likelihood of this frame under the predicted belief."""
    ll_fast: float
    ll_slow: float
    likelihood_ratio: float
    """``exp(ℓ_fast − ℓ_slow)``, clipped to [0, 1e6]."""
    spread_xy_m: float
    spread_yaw_rad: float
    converged: bool
    lost: bool
    updates: int
    """Updates since the last (re)initialization."""
    lost_streak: int
    injection_probability: float = 0.0
    """AMCL's ``max(0, 1 − w_fast / w_slow)`` this update (0 when recovery is off)."""


# ---- tensor functions ---------------------------------------------------------------------------
def marginal_log_likelihood(prev_log_weights: torch.Tensor, log_likelihood: torch.Tensor) -> torch.Tensor:
    """``logsumexp_k(log w_{t-1}^k + l_t^k)``, ``(B,)``, from normalized ``(B, K)`` weights and ``(B, K)`` l."""
    return torch.logsumexp(prev_log_weights + log_likelihood, dim=-1)


def particle_spread(belief: Belief) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted x-y spread ``sqrt(var_x + var_y)`` and circular yaw std ``sqrt(−2 ln R)``, each ``(B,)``."""
    w = belief.weights
    p = belief.particles
    mean_xy = torch.einsum("bk,bkc->bc", w, p[..., :2])
    var_xy = torch.einsum("bk,bk->b", w, ((p[..., :2] - mean_xy.unsqueeze(1)) ** 2).sum(-1))
    s = torch.einsum("bk,bk->b", w, torch.sin(p[..., 2]))
    c = torch.einsum("bk,bk->b", w, torch.cos(p[..., 2]))
    r = torch.sqrt(s * s + c * c).clamp(min=1e-12, max=1.0)
    return var_xy.clamp(min=0.0).sqrt(), (-2.0 * torch.log(r)).clamp(min=0.0).sqrt()


def log_running_average(prev: float | None, value: float, alpha: float) -> float:
    """AMCL's ``w ← w + α (value − w)`` on ``exp`` of log-domain inputs; ``prev=None`` starts at ``value``."""
    if prev is None or alpha >= 1.0:
        return float(value)
    if alpha <= 0.0:
        return float(prev)
    return float(torch.logaddexp(torch.tensor(math.log1p(-alpha) + prev, dtype=torch.float64),
                                 torch.tensor(math.log(alpha) + value, dtype=torch.float64)))


def injection_probability(log_w_fast: float | None, log_w_slow: float | None) -> float:
    """AMCL's random-particle share ``max(0, 1 − w_fast / w_slow)``; 0 until both averages exist."""
    if log_w_fast is None or log_w_slow is None:
        return 0.0
    p = 1.0 - math.exp(min(log_w_fast - log_w_slow, 0.0))
    return p if p > 1e-9 else 0.0  # round-off of equal averages is not a reason to resample


def inject_random_particles(
    belief: Belief,
    *,
    probability: float,
    bounds: tuple[float, float, float, float],
    generator: torch.Generator | None = None,
) -> tuple[Belief, int]:
    """Systematically resample, then replace each particle with probability ``probability`` by a uniform draw.

    ``bounds = (xmin, xmax, ymin, ymax)`` in the belief's units, yaw uniform on [-π, π). All weights
    become uniform, as after AMCL's resampling with random samples. Returns the belief and how many
    particles were replaced (all episodes together).
    """
    if probability <= 0.0:
        return belief, 0
    b, k = belief.log_weights.shape
    p = belief.particles
    resampled = systematic_resample(belief, generator=generator)
    u = torch.rand(b, k, generator=generator, device=p.device, dtype=p.dtype)
    mask = u < min(float(probability), 1.0)
    xmin, xmax, ymin, ymax = bounds
    lo = torch.tensor([xmin, ymin, -math.pi], device=p.device, dtype=p.dtype)
    hi = torch.tensor([xmax, ymax, math.pi], device=p.device, dtype=p.dtype)
    fresh = lo + torch.rand(b, k, 3, generator=generator, device=p.device, dtype=p.dtype) * (hi - lo)
    particles = torch.where(mask.unsqueeze(-1), fresh, resampled.particles)
    return Belief(particles, uniform_log_weights(b, k, like=particles)), int(mask.sum())


# ---- one episode's health ------------------------------------------------------------------------
def _level(*, lost: bool, converged: bool, ratio: float, ess_fraction: float, updates: int) -> tuple[HealthLevel, str]:
    if lost:
        return HealthLevel.ERROR, f"lost: likelihood ratio {ratio:.3g} (recent frames fit the belief far worse)"
    if not converged:
        return HealthLevel.WARN, f"not converged after {updates} updates (belief still spread)"
    return HealthLevel.OK, f"converged, ESS {100.0 * ess_fraction:.0f}% of particles"


def assess(
    state: HealthState,
    *,
    updated: Belief,
    log_marginal: float,
    meters_per_unit: float,
    config: HealthConfig,
    recovery_alpha_slow: float = 0.0,
    recovery_alpha_fast: float = 0.0,
) -> tuple[HealthState, Health]:
    """Fold one update of episode 0 of ``updated`` (after weighting, before resampling) into ``state``.

    ``log_marginal`` is :func:`marginal_log_likelihood` of this update; ``meters_per_unit`` converts
    the belief's x-y to meters. Recovery averages run only when both recovery alphas are > 0.
    """
    ess = float(effective_sample_size(updated)[0])
    k = updated.num_particles
    sxy_u, syaw = particle_spread(updated)
    sxy, syaw_f = float(sxy_u[0]) * meters_per_unit, float(syaw[0])
    ll = float(log_marginal)
    if not math.isfinite(ll):
        ll = -1e30 if ll < 0 else 1e30
    ll_slow = log_running_average(state.ll_slow, ll, config.alpha_slow)
    ll_fast = log_running_average(state.ll_fast, ll, config.alpha_fast)
    updates = state.updates + 1
    concentrated = sxy < config.converged_xy_m and syaw_f < config.converged_yaw_rad
    streak = state.concentrated_streak + 1 if concentrated else 0
    converged = streak >= config.converged_updates
    ratio = math.exp(max(min(ll_fast - ll_slow, math.log(1e6)), -745.0))
    lost = updates > config.warmup_updates and ratio < config.lost_ratio
    lost_streak = state.lost_streak + 1 if lost else 0
    w_slow, w_fast, p_inject = state.recovery_w_slow, state.recovery_w_fast, 0.0
    if recovery_alpha_slow > 0.0 and recovery_alpha_fast > 0.0:
        w_slow = log_running_average(w_slow, ll, recovery_alpha_slow)
        w_fast = log_running_average(w_fast, ll, recovery_alpha_fast)
        p_inject = injection_probability(w_fast, w_slow)
    level, msg = _level(lost=lost, converged=converged, ratio=ratio, ess_fraction=ess / k, updates=updates)
    new_state = HealthState(updates, ll_slow, ll_fast, streak, lost_streak, w_slow, w_fast)
    health = Health(level=level, message=msg, ess=ess, ess_fraction=ess / k, log_likelihood=ll, ll_fast=ll_fast,
                    ll_slow=ll_slow, likelihood_ratio=ratio, spread_xy_m=sxy, spread_yaw_rad=syaw_f,
                    converged=converged, lost=lost, updates=updates, lost_streak=lost_streak,
                    injection_probability=p_inject)
    return new_state, health


def after_injection(state: HealthState) -> HealthState:
    """AMCL resets ``w_slow`` and ``w_fast`` after injecting, to avoid spiralling into randomness."""
    return replace(state, recovery_w_slow=None, recovery_w_fast=None)
