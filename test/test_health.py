"""Health signals, recovery and calibration metrics: hand-checked particle sets, forced likelihood drops.

The ROS-free part of docs/health.md. Accuracy / calibration claims use the shipped model and
are skipped only when ``models/dmn_maze32.pt`` is absent.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from model_wrappers import DelegatingModel

from dmn_ros.evaluation.health_metrics import (
    CHI2_2DOF_95,
    ellipse_coverage,
    fit_inflation,
    nees,
    time_to_converge,
    time_to_recover,
)
from dmn_ros.export import LoadedModel, default_model_path, export_model, load_model
from dmn_ros.filter import (
    Belief,
    HealthConfig,
    HealthLevel,
    HealthState,
    assess,
    effective_sample_size,
    init_uniform,
    inject_random_particles,
    marginal_log_likelihood,
    particle_spread,
)
from dmn_ros.filter.health import injection_probability, log_running_average
from dmn_ros.localizer import (
    Localizer,
    LocalizerConfig,
    embed_images,
    model_covariance_inflation,
    model_likelihood_scale,
)
from dmn_ros.maps import ViewMap
from dmn_ros.model import DMN


def _belief(particles, weights=None) -> Belief:
    p = torch.tensor(particles, dtype=torch.float64)[None]
    k = p.shape[1]
    w = torch.full((k,), 1.0 / k) if weights is None else torch.tensor(weights)
    w = w.to(torch.float64)
    return Belief(p, torch.log(w)[None])


# ---- hand-checked signals ----------------------------------------------------------------------
def test_ess_spread_and_circular_yaw_by_hand():
    # Four particles on a unit cross, equal weights: var_x = var_y = 0.5 -> spread sqrt(1) = 1.
    # Yaws ±3.0 rad straddle ±π: the circular mean is π and R = |cos 3|; a linear std would be ~3 rad.
    b = _belief([[1, 0, 3.0], [-1, 0, -3.0], [0, 1, 3.0], [0, -1, -3.0]])
    sxy, syaw = particle_spread(b)
    assert float(sxy[0]) == pytest.approx(1.0)
    assert float(syaw[0]) == pytest.approx(math.sqrt(-2.0 * math.log(abs(math.cos(3.0)))), rel=1e-9)
    assert float(syaw[0]) < 0.15
    assert float(effective_sample_size(b)[0]) == pytest.approx(4.0)
    # ESS of weights (0.5, 0.25, 0.25, ~0) = 1 / (0.25 + 0.0625 + 0.0625) = 8/3.
    b2 = _belief([[0, 0, 0]] * 4, [0.5, 0.25, 0.25, 1e-300])
    assert float(effective_sample_size(b2)[0]) == pytest.approx(8.0 / 3.0)
    # Weighted spread: all weight on two particles 2 m apart -> var = 1, yaw identical -> 0.
    b3 = _belief([[0, 0, 0.5], [2, 0, 0.5], [50, 50, -2.0]], [0.5, 0.5, 1e-300])
    sxy, syaw = particle_spread(b3)
    assert float(sxy[0]) == pytest.approx(1.0) and float(syaw[0]) == pytest.approx(0.0, abs=1e-6)


def test_marginal_and_running_averages_by_hand():
    prev = torch.log(torch.tensor([[0.5, 0.5]], dtype=torch.float64))
    ll = torch.log(torch.tensor([[2.0, 4.0]], dtype=torch.float64))
    assert float(marginal_log_likelihood(prev, ll)[0]) == pytest.approx(math.log(3.0))
    # w = 1 + 0.5 (3 - 1) = 2 in the linear domain.
    assert log_running_average(0.0, math.log(3.0), 0.5) == pytest.approx(math.log(2.0))
    assert log_running_average(None, -7.0, 0.1) == -7.0
    # Huge log-likelihoods (the DMN's are unbounded) do not overflow.
    assert log_running_average(1000.0, 1000.0 + math.log(3.0), 0.5) == pytest.approx(1000.0 + math.log(2.0))
    assert injection_probability(math.log(0.5), 0.0) == pytest.approx(0.5)
    assert injection_probability(1.0, 0.0) == 0.0 and injection_probability(None, 0.0) == 0.0


def test_uniform_set_not_converged_tight_set_converged():
    cfg = HealthConfig(converged_xy_m=1.0, converged_yaw_rad=0.2, converged_updates=3)
    g = torch.Generator().manual_seed(0)
    uniform = init_uniform(batch=1, num_particles=500, bounds=(-1.0, 1.0, -1.0, 1.0), generator=g)
    st = HealthState()
    for _ in range(5):
        st, h = assess(st, updated=uniform, log_marginal=0.0, meters_per_unit=20.0, config=cfg)
    # Uniform over 40 m x 40 m: spread sqrt(2 * 40²/12) ≈ 16.3 m, yaw spread large.
    assert not h.converged and h.level == HealthLevel.WARN
    assert h.spread_xy_m == pytest.approx(math.sqrt(2 * 40.0**2 / 12), rel=0.08)
    assert h.spread_yaw_rad > 1.5
    rng = np.random.default_rng(0)
    tight = _belief(np.c_[rng.normal(0, 0.01, (200, 2)), rng.normal(0.3, 0.05, 200)])  # 0.2 m, 0.05 rad
    st = HealthState()
    flags = []
    for _ in range(4):
        st, h = assess(st, updated=tight, log_marginal=0.0, meters_per_unit=20.0, config=cfg)
        flags.append(h.converged)
    assert flags == [False, False, True, True]  # N = 3 consecutive concentrated updates
    assert h.level == HealthLevel.OK and h.ess == pytest.approx(200.0) and h.ess_fraction == pytest.approx(1.0)
    assert h.spread_xy_m == pytest.approx(0.2 * math.sqrt(2), rel=0.15)
    # One spread-out update resets the streak.
    st, h = assess(st, updated=uniform, log_marginal=0.0, meters_per_unit=20.0, config=cfg)
    assert not h.converged and st.concentrated_streak == 0


def test_lost_rule_on_likelihood_ratio():
    cfg = HealthConfig(alpha_slow=0.05, alpha_fast=0.5, lost_ratio=0.05, warmup_updates=5, converged_updates=1)
    tight = _belief([[0, 0, 0], [0.001, 0, 0]])
    st = HealthState()
    levels = []
    for t in range(20):
        ll = 0.0 if t < 10 else -10.0  # frames suddenly fit e^10 times worse (kidnapped)
        st, h = assess(st, updated=tight, log_marginal=ll, meters_per_unit=1.0, config=cfg)
        levels.append(h.level)
    assert levels[:10] == [HealthLevel.OK] * 10
    # fast ≈ log(0.5) after one bad frame (ratio 0.5), then ≈ log(0.25), ... slow stays ≈ 0: lost from t = 14.
    first_lost = levels.index(HealthLevel.ERROR)
    assert 11 <= first_lost <= 15 and all(lv == HealthLevel.ERROR for lv in levels[first_lost:])
    assert h.lost and h.lost_streak == 20 - first_lost and "lost" in h.message
    # Not before warm-up, even with a collapse at the second update.
    st, _ = assess(HealthState(), updated=tight, log_marginal=0.0, meters_per_unit=1.0, config=cfg)
    st, h = assess(st, updated=tight, log_marginal=-100.0, meters_per_unit=1.0, config=cfg)
    assert not h.lost


def test_injection_replaces_with_uniform_draws():
    g = torch.Generator().manual_seed(1)
    b = _belief([[5.0, 5.0, 0.0]] * 1000)
    same, n = inject_random_particles(b, probability=0.0, bounds=(-1, 1, -1, 1), generator=g)
    assert n == 0 and same is b
    out, n = inject_random_particles(b, probability=0.3, bounds=(-1, 1, -1, 1), generator=g)
    moved = (out.particles[0, :, 0] != 5.0).numpy()
    assert n == int(moved.sum()) and 240 < n < 360
    assert np.all(np.abs(out.particles[0, moved, :2].numpy()) <= 1.0)
    assert torch.allclose(out.log_weights.exp().sum(-1), torch.ones(1, dtype=torch.float64))


# ---- metrics ----------------------------------------------------------------------------------
def test_nees_coverage_inflation_by_hand():
    cov = np.array([[[1.0, 0.0], [0.0, 4.0]]] * 3)
    e = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    np.testing.assert_allclose(nees(e, cov), [1.0, 1.0, 9.0], rtol=1e-9)
    cover, mean_nees = ellipse_coverage(e, cov)
    assert cover == pytest.approx(2 / 3) and mean_nees == pytest.approx(11 / 3)
    assert ellipse_coverage(e, cov, inflation=2.0)[1] == pytest.approx(11 / 6)
    # An over-confident Gaussian filter (true errors 3x the claimed std) is repaired by s ≈ 9.
    rng = np.random.default_rng(0)
    claimed = np.tile(np.diag([0.5, 2.0])[None], (20000, 1, 1))
    err = rng.multivariate_normal([0, 0], 9 * np.diag([0.5, 2.0]), size=20000)
    cover, m = ellipse_coverage(err, claimed)
    assert cover < 0.5 and m == pytest.approx(18.0, rel=0.05)
    s = fit_inflation(err, claimed)
    assert s == pytest.approx(9.0, rel=0.05)
    cover, m = ellipse_coverage(err, claimed, inflation=s)
    assert cover == pytest.approx(0.95, abs=0.005) and m == pytest.approx(2.0, rel=0.06)
    assert CHI2_2DOF_95 == pytest.approx(-2 * math.log(0.05), abs=1e-3)


def test_time_to_converge_and_recover_by_hand():
    assert time_to_converge(np.array([0, 0, 1, 1], bool)) == 2
    assert time_to_converge(np.array([0, 1, 1, 1], bool), np.array([9.0, 9.0, 1.0, 1.0]), threshold_m=2.0) == 2
    assert time_to_converge(np.zeros(5, bool)) is None
    errs = np.array([0.5, 0.5, 12.0, 11.0, 1.0, 9.0, 1.0, 1.0])
    assert time_to_recover(errs, kidnap_step=2, threshold_m=2.0) == 2
    assert time_to_recover(errs, kidnap_step=2, threshold_m=2.0, hold=2) == 4
    assert time_to_recover(errs, kidnap_step=2, threshold_m=0.1) is None


# ---- Localizer: health in Estimate, recovery, inflation ------------------------------------------
class OffsetModel(DelegatingModel):
    """Delegates to a DMN; the log-likelihood is ``scale · DMN + offset``.

    An offset leaves the posterior unchanged (it cancels in the normalization) and moves only the
    marginal likelihood: what a kidnapping does to a trained model's scores, forced here
    deterministically on an untrained one.
    """

    def __init__(self, inner):
        super().__init__(inner)
        self.offset = 0.0
        self.scale = 0.0
        """0: the likelihood is the constant ``offset`` (marginal exactly known); 1: the DMN's plus offset."""

    def log_likelihood_prepared(self, a, g, poses, q, hq, particles, nearest=0):
        return self.inner.log_likelihood_prepared(a, g, poses, q, hq, particles, nearest) * self.scale + self.offset


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("m") / "m.pt"
    export_model(DMN(), path, meters_per_unit=20.0)
    return load_model(path)


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8) for _ in range(n)]


def _offset_localizer(untrained, **cfg_kw):
    wrapped = OffsetModel(untrained.module)
    model = LoadedModel(wrapped, untrained.info, untrained.device, untrained.path)
    cfg = LocalizerConfig(max_particles=96, tracking_particles=48, device="cpu",
                          health=HealthConfig(warmup_updates=3, converged_xy_m=50.0, converged_yaw_rad=3.0,
                                              converged_updates=1), **cfg_kw)
    loc = Localizer(model, config=cfg, seed=3)
    vm = ViewMap.for_model(untrained.info)
    poses = np.array([[0.0, 0.0, 0.0], [8.0, 0.0, 1.0], [0.0, 8.0, 2.0], [8.0, 8.0, 3.0]])
    vm.add(embeddings=embed_images(untrained, _images(4)), poses=poses, ids=[f"r/{i}" for i in range(4)])
    loc.set_map(vm)
    loc.init_pose([4.0, 4.0, 0.0], np.diag([0.04, 0.04, 0.01]))
    return loc, wrapped


def _run(loc, wrapped, *, bad_from, steps, frames):
    out = []
    for t in range(steps):
        wrapped.offset = -30.0 if t >= bad_from else 0.0
        out.append(loc.step(frames[t % len(frames)], [0.3, 0.0, 0.02]))
    return out


def test_estimate_carries_health_and_forced_loss_triggers_global(untrained):
    frames = _images(3, seed=5)
    loc, wrapped = _offset_localizer(untrained, lost_updates_before_global=2)
    ests = _run(loc, wrapped, bad_from=6, steps=12, frames=frames)
    h0 = ests[0].health
    assert h0 is not None and h0.ess == ests[0].ess and h0.updates == 1 and h0.level == HealthLevel.OK
    assert all(e.health.level == HealthLevel.OK for e in ests[:6])
    # Linear-domain averages after the drop: fast 0.5, 0.25, …; slow 0.95, 0.9025, …; ratio < 0.05 at t = 10.
    lost = [e.health.lost for e in ests]
    assert lost.index(True) == 10
    i = 10
    assert ests[9].health.likelihood_ratio == pytest.approx(0.5**4 / 0.95**4, rel=1e-6)
    assert ests[i].health.level == HealthLevel.ERROR
    # Global relocalization after 2 consecutive lost updates: uniform prior with max_particles, health reset.
    assert ests[i + 1].recovery == "global" and loc.mode == "global" and loc.belief.num_particles == 96
    assert loc.recoveries["global"] == 1 and loc.health_state.updates == 0


def test_forced_loss_injection_on_vs_off(untrained):
    frames = _images(3, seed=5)
    off, w_off = _offset_localizer(untrained)
    on, w_on = _offset_localizer(untrained, recovery_alpha_slow=0.05, recovery_alpha_fast=0.5)
    e_off = _run(off, w_off, bad_from=6, steps=9, frames=frames)
    e_on = _run(on, w_on, bad_from=6, steps=9, frames=frames)
    assert off.recoveries["injected_particles"] == 0 and all(e.recovery == "" for e in e_off)
    assert all(e.health.injection_probability == 0.0 for e in e_off)
    assert all(e.recovery == "" for e in e_on[:6])  # constant likelihood: w_fast == w_slow, nothing injected
    assert e_on[6].health.injection_probability == pytest.approx(1 - 0.5 / 0.95, rel=1e-6)
    assert e_on[6].recovery.startswith("injected") and on.recoveries["injected_particles"] > 10
    # Injected particles spread the belief over the map's extent.
    assert on.particles_metric()[:, :2].std(0).max() > off.particles_metric()[:, :2].std(0).max()


def test_covariance_inflation_from_config_or_model_metadata(untrained):
    loc, _ = _offset_localizer(untrained, covariance_inflation=4.0)
    base, _ = _offset_localizer(untrained)
    frame = _images(1)[0]
    a, b = loc.step(frame), base.step(frame)
    assert base.covariance_inflation == 1.0
    np.testing.assert_allclose(a.covariance[:2, :2], 4.0 * b.covariance[:2, :2], rtol=1e-6)
    assert a.covariance[2, 2] == pytest.approx(b.covariance[2, 2]) and a.spread == pytest.approx(b.spread)
    cal = {"calibration": {"covariance_inflation": 2.5, "fitted_on": "val"}}
    info = dataclasses.replace(untrained.info, config={**untrained.info.config, **cal})
    meta = Localizer(LoadedModel(untrained.module, info, untrained.device, untrained.path),
                     config=LocalizerConfig(device="cpu"))
    assert meta.covariance_inflation == 2.5
    with pytest.raises(ValueError):
        Localizer(untrained, config=LocalizerConfig(device="cpu", covariance_inflation=0.0))


def test_independent_frame_calibration_is_read_only_when_asked():
    """The node (robot frames) reads the plain keys; independent views read the suffixed ones, else fall back."""
    both = {"calibration": {"likelihood_scale": 0.25, "covariance_inflation": 0.8,
                            "likelihood_scale_independent": 2.0, "covariance_inflation_independent": 1.6}}
    assert model_likelihood_scale(both) == 0.25 and model_covariance_inflation(both) == 0.8
    assert model_likelihood_scale(both, independent_frames=True) == 2.0
    assert model_covariance_inflation(both, independent_frames=True) == 1.6
    plain = {"calibration": {"likelihood_scale": 0.5}}
    assert model_likelihood_scale(plain, independent_frames=True) == 0.5
    assert model_covariance_inflation(plain, independent_frames=True) == 1.0
    assert model_likelihood_scale({}, independent_frames=True) == 1.0
    assert model_covariance_inflation({"covariance_inflation": 3.0}, independent_frames=True) == 3.0


# ---- shipped model --------------------------------------------------------------------------------
DATA = Path("/work/cache/maze32")
COVERAGE_BAND = (0.75, 1.0)
"""x-y 95 % ellipse coverage on held-out (test split) runs with the model's stored calibration (fitted on val)."""


def _shipped():
    path = default_model_path()
    if not path.is_file():
        pytest.skip(f"trained model {path} not present")
    if not (DATA / "dataset.yaml").is_file():
        pytest.skip(f"data {DATA} not present")
    return load_model(path)


def test_shipped_model_ellipse_coverage_on_held_out_runs():
    """As the node runs it (the model's stored temperature and inflation, fitted on val), coverage on test runs.

    Also prints the raw coverage and the inflation these val runs alone would fit.
    """
    from dmn_ros.evaluation.health_metrics import collect_runs
    from dmn_ros.evaluation.protocol import EvalSettings, make_episode_set

    model = _shipped()
    temp = model_likelihood_scale(model.info.config)
    settings = {"tracking": EvalSettings(mode="tracking", num_particles=128, T=7, num_contexts=16,
                                         likelihood_scale=temp),
                "global": EvalSettings(mode="global", num_particles=256, T=7, num_contexts=16, likelihood_scale=temp)}
    runs = {}
    for split in ("val", "test"):
        eps = make_episode_set(str(DATA), split=split, num_episodes=6, num_contexts=16, T=7, seed=1)
        for mode, st in settings.items():
            runs[split, mode] = collect_runs(model.module, eps, st)
    steps = slice(2, None)  # after the first updates, as a navigation stack would use it
    val = [runs["val", m] for m in settings]
    s = fit_inflation(np.concatenate([r.errors_xy[:, steps].reshape(-1, 2) for r in val]),
                      np.concatenate([r.covariance[:, steps, :2, :2].reshape(-1, 2, 2) for r in val]))
    shipped = model_covariance_inflation(model.info.config)
    report = []
    for mode in settings:
        r = runs["test", mode]
        raw, published = r.coverage(steps=steps), r.coverage(inflation=shipped, steps=steps)
        report.append((mode, raw, published))
        print(f"test {mode}: raw coverage {raw[0]:.3f} NEES {raw[1]:.1f}; with the model's inflation {shipped:.2f}: "
              f"coverage {published[0]:.3f} NEES {published[1]:.2f}; these val runs alone would fit {s:.2f}")
    cover = np.mean([published[0] for _, _, published in report])
    assert COVERAGE_BAND[0] <= cover <= COVERAGE_BAND[1], report
