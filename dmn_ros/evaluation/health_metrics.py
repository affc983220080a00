"""Health and calibration metrics for dmn-eval / dmn-bag-eval (pure functions plus one episode runner).

* :func:`ellipse_coverage` / :func:`nees`: how often the truth lies inside the published 95 % x-y
  ellipse (χ² with 2 dof, 5.991) and the mean normalized estimation error squared (2 when calibrated).
* :func:`fit_inflation`: the x-y variance inflation factor that makes the coverage 95 % on a
  validation set (:attr:`dmn_ros.localizer.LocalizerConfig.covariance_inflation`).
* :func:`time_to_converge` / :func:`time_to_recover`: steps from a uniform start until the filter is
  converged (and right), and from a kidnapping until it is right again.
* :func:`collect_runs`: the evaluation protocol's filter loop that also keeps covariance and health.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dmn_ros.evaluation.protocol import EpisodeSet, EvalSettings, filter_steps
from dmn_ros.filter import (
    Belief,
    HealthConfig,
    HealthState,
    assess,
    marginal_log_likelihood,
)
from dmn_ros.filter.runner import ObservationModel

__all__ = [
    "CHI2_2DOF_95",
    "COVERAGE_FROM_INDEX",
    "Runs",
    "collect_runs",
    "ellipse_coverage",
    "fit_inflation",
    "nees",
    "time_to_converge",
    "time_to_recover",
]

CHI2_2DOF_95 = 5.991
"""95 % quantile of χ² with 2 degrees of freedom: the published ellipse's boundary."""

COVERAGE_FROM_INDEX = 2
"""Coverage and NEES leave out the first two updates (0-based steps 0 and 1, i.e. t = 1, 2): right after a
uniform or wide prior the particle cloud is not yet a belief worth calibrating. dmn-eval and dmn-bag-eval
both use it (the figures in docs/health.md too)."""


def nees(errors_xy: np.ndarray, cov_xy: np.ndarray, *, inflation: float = 1.0) -> np.ndarray:
    """``eᵀ (s Σ)⁻¹ e`` for x-y errors ``(..., 2)`` (estimate − truth) and covariances ``(..., 2, 2)``."""
    e = np.asarray(errors_xy, dtype=np.float64)
    c = np.asarray(cov_xy, dtype=np.float64) * float(inflation)
    c = c + np.eye(2) * 1e-12  # a collapsed particle set still gives a finite NEES
    sol = np.linalg.solve(c, e[..., None])[..., 0]
    return np.einsum("...i,...i->...", e, sol)


def ellipse_coverage(
    errors_xy: np.ndarray, cov_xy: np.ndarray, *, inflation: float = 1.0, chi2: float = CHI2_2DOF_95
) -> tuple[float, float]:
    """Share of estimates whose truth lies inside the ``chi2`` ellipse, and the mean NEES.

    A calibrated 2-D Gaussian gives 0.95 and 2.0. Over-confident filters give less coverage and
    a larger NEES.
    """
    n = nees(errors_xy, cov_xy, inflation=inflation).ravel()
    if n.size == 0:
        return float("nan"), float("nan")
    return float((n <= chi2).mean()), float(n.mean())


def fit_inflation(
    errors_xy: np.ndarray, cov_xy: np.ndarray, *, target: float = 0.95, chi2: float = CHI2_2DOF_95
) -> float:
    """Variance inflation ``s`` with coverage ``target`` of the ``chi2`` ellipse: ``quantile(NEES) / chi2``.

    Scaling Σ by ``s`` divides every NEES by ``s``, so the ``target`` quantile lands on the boundary.
    Never below 1e-3 (a filter is not made more confident than a thousandth of its spread).
    """
    n = nees(errors_xy, cov_xy).ravel()
    if n.size == 0:
        raise ValueError("no estimates to fit an inflation factor on")
    return max(float(np.quantile(n, target)) / chi2, 1e-3)


def time_to_converge(
    converged: np.ndarray, errors_m: np.ndarray | None = None, *, threshold_m: float | None = None
) -> int | None:
    """First step index at which ``converged`` holds (and, if given, ``errors_m < threshold_m``), else None.

    For a run from a uniform start this is the time to converge; ``errors_m`` guards against
    counting a confident convergence to the wrong place.
    """
    ok = np.asarray(converged, dtype=bool).copy()
    if errors_m is not None:
        if threshold_m is None:
            raise ValueError("threshold_m is required with errors_m")
        ok &= np.asarray(errors_m, dtype=np.float64) < threshold_m
    idx = np.flatnonzero(ok)
    return int(idx[0]) if idx.size else None


def time_to_recover(errors_m: np.ndarray, *, kidnap_step: int, threshold_m: float, hold: int = 1) -> int | None:
    """Steps after ``kidnap_step`` until the error stays below ``threshold_m`` for ``hold`` steps; None: never.

    0 means the estimate at the kidnapping step itself was already right (the filter never lost
    track, e.g. a kidnapping to a nearby pose).
    """
    e = np.asarray(errors_m, dtype=np.float64)[kidnap_step:]
    ok = e < threshold_m
    for i in range(len(ok) - hold + 1):
        if ok[i : i + hold].all():
            return i
    return None


@dataclass
class Runs:
    """Per-episode, per-step outputs of :func:`collect_runs` (metric units)."""

    mean: np.ndarray
    """``(E, T, 3)`` estimates."""
    covariance: np.ndarray
    """``(E, T, 3, 3)`` particle covariances (not inflated)."""
    truth: np.ndarray
    """``(E, T, 3)`` true poses."""
    converged: np.ndarray
    """``(E, T)`` the converged flag."""
    lost: np.ndarray
    """``(E, T)`` the lost flag."""
    log_likelihood: np.ndarray
    """``(E, T)`` ℓ_t, the log marginal likelihood."""
    prior_mean: np.ndarray | None = None
    """``(E, 3)`` the tracking prior means the run drew (None for global runs): what baselines start from."""

    @property
    def errors_xy(self) -> np.ndarray:
        return self.mean[..., :2] - self.truth[..., :2]

    @property
    def errors_m(self) -> np.ndarray:
        """``(E, T)`` x-y errors, computed as :func:`~dmn_ros.evaluation.protocol.run_filter` does (hypot)."""
        e = self.errors_xy
        return np.hypot(e[..., 0], e[..., 1])

    def coverage(self, *, inflation: float = 1.0, steps: slice = slice(None)) -> tuple[float, float]:
        return ellipse_coverage(self.errors_xy[:, steps], self.covariance[:, steps, :2, :2], inflation=inflation)


@torch.inference_mode()
def collect_runs(
    model: ObservationModel,
    episodes: EpisodeSet,
    settings: EvalSettings,
    *,
    health: HealthConfig | None = None,
    device: torch.device | str = "cpu",
) -> Runs:
    """The evaluation protocol's filter (same priors, noise, systematic resampling) keeping covariance and health.

    It reads the same loop as :func:`~dmn_ros.evaluation.protocol.run_filter`
    (:func:`~dmn_ros.evaluation.protocol.filter_steps`), so ``errors_m`` equals its errors exactly;
    ``dmn-eval`` therefore gets its headline numbers and the health metrics from one run.
    """
    health = health or HealthConfig()
    scale = episodes.scale
    mpu = scale.meters_per_unit
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("mean", "cov", "truth", "conv", "lost", "ll")}
    priors: list[np.ndarray] = []
    big_t = settings.T
    for batch, t, prev_lw, res in filter_steps(model, episodes, settings, device=device):
        b = batch.truth.shape[0]
        if t == 0:
            states = [HealthState() for _ in range(b)]
            arrays = (np.zeros((b, big_t, 3)), np.zeros((b, big_t, 3, 3)), batch.truth,
                      np.zeros((b, big_t), dtype=bool), np.zeros((b, big_t), dtype=bool), np.zeros((b, big_t)))
            for k, v in zip(("mean", "cov", "truth", "conv", "lost", "ll"), arrays, strict=True):
                out[k].append(v)
            if batch.prior_mean is not None:
                priors.append(batch.prior_mean)
        mean, cov, conv, lost, lls = out["mean"][-1], out["cov"][-1], out["conv"][-1], out["lost"][-1], out["ll"][-1]
        marg = marginal_log_likelihood(prev_lw, res.log_likelihood)
        mean[:, t] = scale.to_metric(res.mean.double().cpu().numpy())
        c = res.covariance.double().cpu().numpy()
        c[:, :2, :] *= mpu
        c[:, :, :2] *= mpu
        cov[:, t] = c
        for i in range(b):
            one = Belief(res.updated.particles[i : i + 1], res.updated.log_weights[i : i + 1])
            states[i], h = assess(states[i], updated=one, log_marginal=float(marg[i]), meters_per_unit=mpu,
                                  config=health)
            conv[i, t], lost[i, t], lls[i, t] = h.converged, h.lost, h.log_likelihood
    cat = {k: np.concatenate(v, axis=0) for k, v in out.items()}
    return Runs(cat["mean"], cat["cov"], cat["truth"], cat["conv"], cat["lost"], cat["ll"],
                np.concatenate(priors, axis=0) if priors else None)
