"""KLD-adaptive particle count (Fox 2003), as nav2_amcl's ``pf_update_resample`` / ``pf_resample_limit``.

Why: a fixed K must be sized for the hardest moment (global localization, a spread tracking
prior). KLD sampling instead draws particles until there are enough that, with a confidence set
by ``z``, the K-L divergence between the sampled histogram and the belief stays below ``ε``;
how many that is depends only on ``k``, the number of histogram bins the samples occupy. A spread
belief keeps many particles, a concentrated one few.

Conventions, checked against nav2_amcl (``pf.c``, ``pf_kdtree.c``) and where they differ:

* Bound: ``n(k) = ceil((k − 1)/(2ε) · (1 − 2/(9(k − 1)) + sqrt(2/(9(k − 1))) · z)³)``, clamped to
  ``[min_particles, max_particles]``, exactly ``pf_resample_limit``.
* ``z`` is ``pf_z`` plugged into the formula as it is. nav2 documents ``pf_z`` as "the upper standard
  normal quantile for (1 − p), where p is the probability that the error on the estimated distribution
  will be less than pf_err"; its default 0.99 is therefore the *quantile value* z = 0.99
  (P(Z > 0.99) ≈ 0.16, about 84 % confidence), not a probability: Fox's 99 % would be z = 2.326.
  We keep nav2's meaning so that the same parameter values give the same particle counts.
* ``k ≤ 1``: nav2 returns ``max_samples`` there (it only guards the formula's division by zero), so
  a belief whose samples all fall in one bin is resampled at the maximum. Here one bin returns
  ``min_particles``: one occupied bin is a point mass at this resolution, any count represents it.
* Bins: ``0.5 m × 0.5 m × 10°`` (hard-coded in ``pf_kdtree_alloc``), key ``floor(v / size)`` per
  coordinate, yaw in [−π, π). This core works in normalized units; pass sizes divided by the metric
  scale (:meth:`KldConfig.from_metric`).
* Stop rule: nav2 adds samples one at a time and stops after the first ``n`` with ``n > bound(k_n)``
  (``k_n``: bins occupied by the first ``n`` samples). Here the first ``n`` with ``n ≥ bound(k_n)``:
  one particle fewer, and a concentrated belief gets exactly ``min_particles``.
* Draw: nav2 draws i.i.d. (multinomial), because the prefix of a low-variance sample is not
  representative (it is ordered by particle index). Here one systematic draw of ``max_particles``
  candidates is randomly permuted: every prefix is a uniformly random subset of a low-variance
  sample, i.e. representative, and the cut is vectorized instead of a loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dmn_ros.filter.belief import Belief, uniform_log_weights
from dmn_ros.filter.resampling import systematic_indices
from dmn_ros.filter.steps import effective_sample_size

__all__ = [
    "AMCL_BIN_XY_M",
    "AMCL_BIN_YAW_RAD",
    "KldConfig",
    "bin_keys",
    "cumulative_bins",
    "kld_bound",
    "kld_bounds",
    "kld_resample",
    "kld_resample_if_degenerate",
    "kld_sample_count",
    "occupied_bins",
]

AMCL_BIN_XY_M = 0.5
"""nav2_amcl's histogram bin size in x and y (``pf_kdtree_alloc``), meters."""
AMCL_BIN_YAW_RAD = math.radians(10.0)
"""nav2_amcl's histogram bin size in yaw, radians."""


@dataclass(frozen=True)
class KldConfig:
    """KLD sampling settings in the filter's units (bin sizes normalized like the particles)."""

    min_particles: int = 500
    """Lower clamp of the count (nav2_amcl ``min_particles``). It is also the least a prefix whose
    candidates share one bin must reach, so keep it in the tens or more: with 1, the first candidate
    (always alone in its bin) already satisfies the bound."""
    max_particles: int = 2048
    """Upper clamp, and the number of candidates drawn (nav2_amcl ``max_particles``)."""
    pf_err: float = 0.05
    """ε: bound on the K-L divergence between sampled and true belief (nav2_amcl ``pf_err``)."""
    pf_z: float = 0.99
    """z: the standard-normal quantile value used in the bound, as nav2_amcl uses ``pf_z`` (module doc)."""
    bin_size: tuple[float, float, float] = (AMCL_BIN_XY_M / 20.0, AMCL_BIN_XY_M / 20.0, AMCL_BIN_YAW_RAD)
    """Histogram bin ``(x, y, yaw)`` in filter units; the default is AMCL's at 20 m per unit."""

    def __post_init__(self) -> None:
        if not 1 <= self.min_particles <= self.max_particles:
            raise ValueError(f"need 1 <= min_particles <= max_particles, got {self.min_particles}, "
                             f"{self.max_particles}")
        if not (math.isfinite(self.pf_err) and self.pf_err > 0.0):
            raise ValueError(f"pf_err must be > 0, got {self.pf_err}")
        if not math.isfinite(self.pf_z):
            raise ValueError(f"pf_z must be finite, got {self.pf_z}")
        if len(self.bin_size) != 3 or not all(math.isfinite(s) and s > 0.0 for s in self.bin_size):
            raise ValueError(f"bin_size must be three sizes > 0, got {self.bin_size}")

    @classmethod
    def from_metric(
        cls,
        *,
        meters_per_unit: float,
        min_particles: int = 500,
        max_particles: int = 2048,
        pf_err: float = 0.05,
        pf_z: float = 0.99,
        bin_xy_m: float = AMCL_BIN_XY_M,
        bin_yaw_rad: float = AMCL_BIN_YAW_RAD,
    ) -> KldConfig:
        """Metric bin sizes → normalized: x-y bins scale with ``meters_per_unit``, yaw is unscaled."""
        xy = bin_xy_m / meters_per_unit
        return cls(min_particles, max_particles, pf_err, pf_z, (xy, xy, bin_yaw_rad))


def kld_bound(k: int, config: KldConfig) -> int:
    """Particles needed for ``k`` occupied bins: Fox's bound clamped to ``[min, max]``; ``k ≤ 1`` → min."""
    if k <= 1:
        return config.min_particles
    b = 2.0 / (9.0 * (k - 1))
    x = 1.0 - b + math.sqrt(b) * config.pf_z
    n = math.ceil((k - 1) / (2.0 * config.pf_err) * x * x * x)
    return min(max(n, config.min_particles), config.max_particles)


def kld_bounds(k: torch.Tensor, config: KldConfig) -> torch.Tensor:
    """:func:`kld_bound` for an integer tensor of bin counts (float64 inside), same shape, int64."""
    km1 = (k.to(torch.float64) - 1.0).clamp(min=1.0)  # k ≤ 1 is overwritten below; avoids 0-division
    b = 2.0 / (9.0 * km1)
    x = 1.0 - b + torch.sqrt(b) * config.pf_z
    n = torch.ceil(km1 / (2.0 * config.pf_err) * x * x * x)
    n = torch.where(k <= 1, torch.full_like(n, config.min_particles), n)
    return n.clamp(config.min_particles, config.max_particles).to(torch.int64)


def bin_keys(particles: torch.Tensor, bin_size: tuple[float, float, float]) -> torch.Tensor:
    """``(..., 3)`` poses → integer histogram keys ``floor(v / size)`` ``(..., 3)`` int64, as pf_kdtree."""
    size = torch.tensor(bin_size, dtype=particles.dtype, device=particles.device)
    return torch.floor(particles / size).to(torch.int64)


def cumulative_bins(particles: torch.Tensor, bin_size: tuple[float, float, float]) -> torch.Tensor:
    """``(N, 3)`` ordered samples → ``(N,)`` number of distinct bins among the first ``n = 1..N``."""
    n = particles.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=particles.device)
    _, inverse = torch.unique(bin_keys(particles, bin_size), dim=0, return_inverse=True)
    order = torch.arange(n, device=particles.device)
    first = torch.full((int(inverse.max()) + 1,), n, dtype=torch.int64, device=particles.device)
    first = first.scatter_reduce(0, inverse, order, reduce="amin")
    return torch.cumsum((first[inverse] == order).to(torch.int64), dim=0)


def occupied_bins(particles: torch.Tensor, bin_size: tuple[float, float, float]) -> int:
    """Number of distinct bins ``(N, 3)`` poses occupy (nav2's ``kdtree->leaf_count``)."""
    if particles.shape[0] == 0:
        return 0
    return int(torch.unique(bin_keys(particles, bin_size), dim=0).shape[0])


def kld_sample_count(candidates: torch.Tensor, config: KldConfig) -> int:
    """How many of the ordered ``(N, 3)`` candidates KLD sampling keeps: the first ``n`` with ``n ≥ bound(k_n)``.

    The vectorized form of nav2's add-one-sample-and-check loop; ``N`` (normally ``max_particles``)
    when no shorter prefix suffices.
    """
    n_all = candidates.shape[0]
    if n_all == 0:
        return 0
    bounds = kld_bounds(cumulative_bins(candidates, config.bin_size), config)
    n = torch.arange(1, n_all + 1, device=candidates.device)
    enough = torch.nonzero(n >= bounds.to(candidates.device))
    return int(enough[0, 0]) + 1 if enough.shape[0] else n_all


def kld_resample(belief: Belief, config: KldConfig, *, generator: torch.Generator | None = None) -> Belief:
    """Resample one episode (``B = 1``) to a KLD-adaptive count in ``[min_particles, max_particles]``.

    Draws ``max_particles`` systematic candidates from the weights, shuffles them, and keeps the
    shortest prefix of length ``n`` with ``n ≥ kld_bound(k_n)``; weights become uniform. Batched
    beliefs cannot hold different counts per episode, so ``B > 1`` is an error.
    """
    b = belief.particles.shape[0]
    if b != 1:
        raise ValueError(f"KLD resampling changes K per episode and needs batch size 1, got {b}")
    dev = belief.particles.device
    n_max = config.max_particles
    idx = systematic_indices(belief.weights.detach(), generator=generator, num_samples=n_max)[0]
    perm = torch.randperm(n_max, generator=generator, device=dev)
    candidates = belief.particles[0, idx[perm]]
    keep = kld_sample_count(candidates, config)
    particles = candidates[:keep].unsqueeze(0)
    return Belief(particles, uniform_log_weights(1, keep, like=particles))


def kld_resample_if_degenerate(
    belief: Belief, config: KldConfig, *, threshold: float = 0.5, generator: torch.Generator | None = None
) -> tuple[Belief, bool]:
    """:func:`kld_resample` when ESS < ``threshold · K`` (the same trigger as fixed-K inference); ``B = 1``.

    Returns the belief and whether it was resampled. ``threshold ≥ 1`` resamples every update, as
    nav2_amcl does with ``resample_interval: 1``.
    """
    if belief.particles.shape[0] != 1:
        raise ValueError(f"KLD resampling needs batch size 1, got {belief.particles.shape[0]}")
    if threshold < 1.0 and float(effective_sample_size(belief)[0]) >= threshold * belief.num_particles:
        return belief, False
    return kld_resample(belief, config, generator=generator), True
