"""KLD-adaptive particle count (dmn_ros.filter.kld) and its use in filter_step and Localizer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dmn_ros.filter import (
    Belief,
    FilterConfig,
    KldConfig,
    encode_map,
    filter_step,
    init_gaussian,
    init_uniform,
    kld_bound,
    kld_resample,
    kld_resample_if_degenerate,
    normalize_log_weights,
    systematic_indices,
)
from dmn_ros.filter.kld import (
    AMCL_BIN_XY_M,
    AMCL_BIN_YAW_RAD,
    bin_keys,
    cumulative_bins,
    kld_bounds,
    kld_sample_count,
    occupied_bins,
)
from dmn_ros.localizer import Localizer, LocalizerConfig, embed_images
from dmn_ros.maps import ViewMap

RAW = KldConfig(min_particles=1, max_particles=10**9)
"""Clamps out of the way: the bare formula (except k ≤ 1)."""
AMCL = KldConfig()
"""nav2_amcl defaults: min 500, max 2048 (ours), ε 0.05, z 0.99, bins 0.5 m / 0.5 m / 10° at 20 m per unit."""


# ---- the bound --------------------------------------------------------------------------------------
def test_bound_hand_computed():
    # n(k) = ceil((k-1)/(2ε) · x³), x = 1 - b + sqrt(b)·z, b = 2/(9(k-1)), ε = 0.05, z = 0.99.
    # k = 2:   b = 2/9 = 0.222222, sqrt(b) = 0.471405, x = 1 - 0.222222 + 0.466691 = 1.244469,
    #          x³ = 1.927314, (k-1)/(2ε) = 10 → 19.27 → 20
    assert kld_bound(2, RAW) == 20
    # k = 10:  b = 2/81 = 0.024691, sqrt(b)·z = 0.157135·0.99 = 0.155563, x = 1.130872,
    #          x³ = 1.446238, 9/0.1 = 90 → 130.16 → 131
    assert kld_bound(10, RAW) == 131
    # k = 100: b = 2/891 = 0.002245, sqrt(b)·z = 0.047378·0.99 = 0.046904, x = 1.044660,
    #          x³ = 1.140051, 99/0.1 = 990 → 1128.65 → 1129
    assert kld_bound(100, RAW) == 1129
    # Fox's 99 % (z = 2.326) at k = 10: x = 1 - 0.024691 + 0.365496 = 1.340805, x³ = 2.410413,
    # ε 0.05 → 90 · 2.410413 = 216.94 → 217
    assert kld_bound(10, KldConfig(min_particles=1, max_particles=10**9, pf_z=2.326)) == 217


def test_bound_clamps():
    assert kld_bound(1, AMCL) == 500  # one bin: min (nav2 returns max here, module doc)
    assert kld_bound(0, AMCL) == 500
    assert kld_bound(2, AMCL) == 500 and kld_bound(10, AMCL) == 500  # 20 and 131 are below min
    assert kld_bound(100, AMCL) == 1129
    assert kld_bound(200, AMCL) == 2048  # the formula says 2188
    assert kld_bound(200, RAW) == 2188
    assert kld_bound(10**6, AMCL) == 2048


def test_bound_tensor_matches_scalar_and_is_monotone():
    k = torch.arange(0, 3000)
    for cfg in (RAW, AMCL, KldConfig(min_particles=7, max_particles=300, pf_err=0.01, pf_z=3.0)):
        t = kld_bounds(k, cfg)
        assert t.dtype == torch.int64
        assert t.tolist() == [kld_bound(int(v), cfg) for v in k]
        assert bool((t[2:].diff() >= 0).all())  # more bins never need fewer particles


def test_config_validation_and_metric_bins():
    with pytest.raises(ValueError):
        KldConfig(min_particles=600, max_particles=500)
    with pytest.raises(ValueError):
        KldConfig(min_particles=0)
    with pytest.raises(ValueError):
        KldConfig(pf_err=0.0)
    with pytest.raises(ValueError):
        KldConfig(bin_size=(0.1, 0.0, 0.1))
    c = KldConfig.from_metric(meters_per_unit=20.0)
    assert c.bin_size == pytest.approx((0.025, 0.025, math.radians(10.0)))  # 0.5 m at 20 m per unit
    assert c == AMCL
    c = KldConfig.from_metric(meters_per_unit=4.0, bin_xy_m=1.0, bin_yaw_rad=0.5)
    assert c.bin_size == pytest.approx((0.25, 0.25, 0.5))


# ---- bins -------------------------------------------------------------------------------------------
def test_bins_on_hand_made_particles():
    size = (AMCL_BIN_XY_M, AMCL_BIN_XY_M, AMCL_BIN_YAW_RAD)  # metric particles, metric bins
    p = torch.tensor([
        [0.10, 0.10, 0.00],   # bin (0, 0, 0)
        [0.40, 0.49, 0.17],   # same bin: 0.17 rad < 10° = 0.1745 rad
        [0.60, 0.10, 0.00],   # x bin 1
        [-0.10, 0.10, 0.00],  # x bin -1 (floor, not truncation)
        [0.10, 0.10, -0.01],  # yaw bin -1
        [0.10, 0.10, 0.20],   # yaw bin 1
        [0.55, 0.05, 0.05],   # x bin 1 again
        [0.10, 0.60, 0.00],   # y bin 1
    ], dtype=torch.float64)
    keys = bin_keys(p, size)
    assert keys.tolist() == [[0, 0, 0], [0, 0, 0], [1, 0, 0], [-1, 0, 0], [0, 0, -1], [0, 0, 1], [1, 0, 0],
                             [0, 1, 0]]
    assert cumulative_bins(p, size).tolist() == [1, 1, 2, 3, 4, 5, 5, 6]
    assert occupied_bins(p, size) == 6
    assert occupied_bins(p[:0], size) == 0 and cumulative_bins(p[:0], size).shape == (0,)
    # yaw at ±π: opposite ends of the yaw range are different bins, as in pf_kdtree
    ends = torch.tensor([[0.1, 0.1, -math.pi], [0.1, 0.1, math.pi - 1e-6]], dtype=torch.float64)
    assert occupied_bins(ends, size) == 2


def test_sample_count_matches_amcl_loop():
    """The vectorized cut equals nav2's add-one-and-check loop (with the ≥ rule) on the same candidates."""
    g = torch.Generator().manual_seed(3)
    cfg = KldConfig(min_particles=20, max_particles=800)
    for spread in (0.002, 0.02, 0.1, 1.0):
        cand = torch.randn(800, 3, generator=g) * torch.tensor([spread, spread, 10 * spread])
        seen: set[tuple[int, ...]] = set()
        expected = 800
        for i, key in enumerate(bin_keys(cand, cfg.bin_size).tolist()):
            seen.add(tuple(key))
            if i + 1 >= kld_bound(len(seen), cfg):
                expected = i + 1
                break
        assert kld_sample_count(cand, cfg) == expected


# ---- resampling ------------------------------------------------------------------------------------
def test_systematic_indices_any_count():
    w = torch.tensor([[0.5, 0.25, 0.25]])
    idx = systematic_indices(w, generator=torch.Generator().manual_seed(0), num_samples=8)
    assert idx.shape == (1, 8)
    assert torch.bincount(idx[0], minlength=3).tolist() == [4, 2, 2]  # low variance: exact shares
    assert systematic_indices(w).shape == (1, 3)  # default: K


def test_concentrated_belief_shrinks_to_min_and_uniform_stays_at_max():
    g = torch.Generator().manual_seed(0)
    conc = init_gaussian(mean=torch.zeros(1, 3), std=(0.002, 0.002, 0.02), num_particles=2048, generator=g)
    assert kld_resample(conc, AMCL, generator=g).num_particles == 500  # 4 cm, 1°: a handful of bins
    # 40 m × 40 m at 20 m per unit, all yaws: every candidate lands in a new bin
    unif = init_uniform(batch=1, num_particles=2048, bounds=(-1.0, 1.0, -1.0, 1.0), generator=g)
    assert kld_resample(unif, AMCL, generator=g).num_particles == 2048
    # in between: a 1 m Gaussian needs more than min, and more spread needs more particles
    counts = []
    for std_m in (0.02, 0.5, 1.5):
        b = init_gaussian(mean=torch.zeros(1, 3), std=(std_m / 20, std_m / 20, 0.1), num_particles=2048, generator=g)
        counts.append(kld_resample(b, AMCL, generator=g).num_particles)
    assert counts[0] == 500 and counts[0] < counts[1] < counts[2] <= 2048, counts


def test_resampled_belief_is_drawn_from_the_weights():
    g = torch.Generator().manual_seed(1)
    b = init_uniform(batch=1, num_particles=300, bounds=(-1.0, 1.0, -1.0, 1.0), generator=g)
    lw = torch.full((1, 300), -1e9)
    lw[0, 17], lw[0, 42] = 0.0, math.log(3.0)  # two survivors, 1:3
    b = Belief(b.particles, normalize_log_weights(lw))
    out = kld_resample(b, KldConfig(min_particles=100, max_particles=1000), generator=g)
    assert out.num_particles == 100  # two bins → bound far below min
    assert torch.allclose(out.log_weights.exp().sum(), torch.tensor(1.0))
    assert torch.allclose(out.log_weights, torch.full_like(out.log_weights, -math.log(100)))
    is_17 = (out.particles[0] == b.particles[0, 17]).all(-1)
    is_42 = (out.particles[0] == b.particles[0, 42]).all(-1)
    assert bool((is_17 | is_42).all())
    assert 15 <= int(is_17.sum()) <= 35  # ~25 % of a shuffled low-variance draw


def test_count_never_leaves_min_max():
    g = torch.Generator().manual_seed(2)
    for trial in range(40):
        k_old = int(torch.randint(1, 600, (1,), generator=g))
        lo = int(torch.randint(1, 300, (1,), generator=g))
        hi = lo + int(torch.randint(0, 700, (1,), generator=g))
        cfg = KldConfig(min_particles=lo, max_particles=hi, bin_size=(0.01, 0.01, 0.1))
        spread = 10.0 ** float(torch.empty(1).uniform_(-4, 0, generator=g))
        p = torch.randn(1, k_old, 3, generator=g) * spread
        lw = normalize_log_weights(torch.randn(1, k_old, generator=g) * float(trial % 5) * 3)
        n = kld_resample(Belief(p, lw), cfg, generator=g).num_particles
        assert lo <= n <= hi, (trial, k_old, lo, hi, n)


def test_batch_size_one_only():
    b = init_uniform(batch=2, num_particles=10, bounds=(-1.0, 1.0, -1.0, 1.0))
    with pytest.raises(ValueError, match="batch size 1"):
        kld_resample(b, AMCL)
    with pytest.raises(ValueError, match="batch size 1"):
        kld_resample_if_degenerate(b, AMCL)


def test_ess_trigger():
    g = torch.Generator().manual_seed(0)
    b = init_gaussian(mean=torch.zeros(1, 3), std=(0.002, 0.002, 0.02), num_particles=1000, generator=g)
    cfg = KldConfig(min_particles=200, max_particles=2000)  # ≤ 8 bins (the mean sits on a bin corner): bound ≤ 105
    same, done = kld_resample_if_degenerate(b, cfg, threshold=0.5, generator=g)  # uniform weights: ESS = K
    assert not done and same is b
    out, done = kld_resample_if_degenerate(b, cfg, threshold=1.0, generator=g)  # ≥ 1: every update (nav2)
    assert done and out.num_particles == 200


# ---- filter_step and Localizer ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def model(untrained):
    """The conftest untrained model under this module's name."""
    return untrained


def test_filter_step_kld_mode(model):
    g = torch.Generator().manual_seed(0)
    ctx = torch.rand(1, 4, 3, 32, 32, generator=g)
    poses = torch.rand(1, 4, 3, generator=g) - 0.5
    with torch.inference_mode():
        pm = encode_map(model.module, images=ctx, poses=poses)
        b = init_uniform(batch=1, num_particles=64, bounds=(-1.0, 1.0, -1.0, 1.0), generator=g)
        cfg = FilterConfig(resampling="kld", ess_threshold=1.0, kld=KldConfig(min_particles=8, max_particles=512))
        res = filter_step(model.module, belief=b, prepared_map=pm, query=ctx[:, 0], egomotion=None, config=cfg,
                          generator=g)
    assert res.updated.num_particles == 64 and res.log_likelihood.shape == (1, 64)
    assert res.belief.num_particles == 512  # a uniform belief over the area needs the maximum


def _map(model, n: int = 6) -> ViewMap:
    rng = np.random.default_rng(0)
    poses = np.column_stack([rng.uniform(-8, 8, n), rng.uniform(-8, 8, n), rng.uniform(-math.pi, math.pi, n)])
    images = [rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8) for _ in range(n)]
    m = ViewMap.for_model(model.info)
    m.add(embeddings=embed_images(model, images), poses=poses, ids=[f"r/{i}" for i in range(n)])
    return m


def test_localizer_count_drops_after_convergence(model):
    """Global start at max; a sharp likelihood concentrates the belief and the count drops to min.

    The untrained model's log-likelihoods differ between particles; a large temperature makes one
    dominate (what a converged, informative update does), and with motion noise kept small the
    resampled belief occupies a few bins, so KLD keeps ``min_particles``.
    """
    cfg = LocalizerConfig(max_particles=400, tracking_particles=64, min_particles=40, adaptive_particles=True,
                          resample_threshold=1.0, motion_noise_xy_m=0.01, motion_noise_yaw_rad=0.005,
                          likelihood_scale=1e4, device="cpu")
    loc = Localizer(model, config=cfg, seed=0)
    loc.set_map(_map(model))
    loc.init_global()
    image = np.random.default_rng(1).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    assert loc.particles_metric()[:, :2].std(axis=0).min() > 3.0  # the global prior covers the map
    est = loc.step(image)
    assert est.num_particles == 400  # weighed the global prior
    assert est.spread < 1.0  # the update concentrated the belief
    assert est.next_particles == loc.num_particles == 40  # concentrated after resampling
    ests = [loc.step(image, (0.1, 0.0, 0.02)) for _ in range(3)]
    assert [e.num_particles for e in ests] == [40, 40, 40]
    assert all(e.spread < 0.5 for e in ests)
    assert loc.particles_metric().shape == (40, 3) and loc.weights().shape == (40,)
    assert loc.weights().sum() == pytest.approx(1.0)


def test_localizer_spread_belief_keeps_max_and_tracking_starts_at_tracking_particles(model):
    """A flat likelihood leaves a wide tracking prior wide: resampling grows it from 64 to max."""
    cfg = LocalizerConfig(max_particles=300, tracking_particles=64, min_particles=40, adaptive_particles=True,
                          resample_threshold=1.0, likelihood_scale=1e-6, device="cpu")
    loc = Localizer(model, config=cfg, seed=0)
    loc.set_map(_map(model))
    loc.init_pose([0.0, 0.0, 0.0], np.diag([36.0, 36.0, 0.27]))
    assert loc.num_particles == 64
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    est = loc.step(image)
    assert est.num_particles == 64 and est.next_particles == 300
    assert loc.step(image, (0.2, 0.0, 0.0)).next_particles == 300
    loc.init_global()
    assert loc.num_particles == 300


def test_localizer_fixed_count_by_default(model):
    assert LocalizerConfig().adaptive_particles is False
    cfg = LocalizerConfig(max_particles=128, tracking_particles=32, resample_threshold=1.0, likelihood_scale=1e4,
                          device="cpu")
    loc = Localizer(model, config=cfg, seed=0)
    loc.set_map(_map(model))
    loc.init_pose([0.0, 0.0, 0.0], np.diag([4.0, 4.0, 0.1]))
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    for _ in range(2):
        est = loc.step(image, (0.1, 0.0, 0.0))
        assert est.num_particles == est.next_particles == 32


def test_localizer_min_above_max_is_clamped(model):
    cfg = LocalizerConfig(max_particles=50, tracking_particles=20, min_particles=500, adaptive_particles=True,
                          resample_threshold=1.0, likelihood_scale=1e4, device="cpu")
    loc = Localizer(model, config=cfg, seed=0)
    loc.set_map(_map(model))
    loc.init_global()
    est = loc.step(np.zeros((32, 32, 3), dtype=np.uint8))
    assert est.next_particles == 50
    with pytest.raises(ValueError):
        Localizer(model, config=LocalizerConfig(pf_err=-1.0, device="cpu"))


@pytest.mark.ros
def test_node_passes_kld_parameters_and_reports_the_count(model):
    """The nav2_amcl-named parameters reach the Localizer; /diagnostics' num_particles follows the count."""
    pytest.importorskip("rclpy")
    import rclpy
    from rclpy.parameter import Parameter

    from dmn_ros.ros.localization_node import LocalizationNode

    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    try:
        overrides = {"adaptive_particles": True, "min_particles": 40, "max_particles": 400, "pf_err": 0.02,
                     "pf_z": 2.326, "kld_bin_xy": 1.0, "kld_bin_yaw": 0.3, "resample_threshold": 1.0,
                     "tf_broadcast": False, "device": "cpu", "diagnostics_period": 0.0}
        node = LocalizationNode(model=model, context=ctx,
                                parameter_overrides=[Parameter(k, value=v) for k, v in overrides.items()])
        try:
            c = node.localizer.config
            assert (c.adaptive_particles, c.min_particles, c.max_particles) == (True, 40, 400)
            assert (c.pf_err, c.pf_z, c.kld_bin_xy_m, c.kld_bin_yaw_rad) == (0.02, 2.326, 1.0, 0.3)
            loc = node.localizer
            loc.set_map(_map(model))
            loc.init_global()
            # a concentrating update through the node's own step path
            loc.likelihood_scale = 1e4
            node._run(1.0, np.random.default_rng(1).integers(0, 256, size=(32, 32, 3), dtype=np.uint8), None,
                  node._odom_epoch)
            assert node.last_estimate is not None and node.last_estimate.num_particles == 400
            kv = {v.key: v.value for v in node.health_status().values}
            assert kv["num_particles"] == str(loc.num_particles) == "40"
        finally:
            node.destroy_node()
    finally:
        rclpy.shutdown(context=ctx)
