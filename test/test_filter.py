"""The particle filter's math against hand-computed cases and statistical checks."""

import math

import pytest
import torch

from dmn_ros.filter import (
    Belief,
    effective_sample_size,
    estimate,
    init_gaussian,
    init_uniform,
    soft_resample,
    systematic_indices,
    systematic_resample,
    transition,
    update,
)
from dmn_ros.filter.belief import uniform_log_weights
from dmn_ros.training.loss import mixture_nll, pose_mse


def _belief(particles, weights):
    p = torch.tensor(particles, dtype=torch.float64).unsqueeze(0)
    w = torch.tensor(weights, dtype=torch.float64).unsqueeze(0)
    return Belief(p, w.log())


def test_estimate_hand_case():
    b = _belief([[0.0, 0.0, 0.0], [2.0, 4.0, 0.0]], [0.25, 0.75])
    mean, cov = estimate(b)
    torch.testing.assert_close(mean[0], torch.tensor([1.5, 3.0, 0.0], dtype=torch.float64))
    # var x = .25*1.5² + .75*.5² = .75; var y = 4*.75 = 3; cov xy = 2*.75 = 1.5
    torch.testing.assert_close(cov[0, :2, :2], torch.tensor([[0.75, 1.5], [1.5, 3.0]], dtype=torch.float64))
    assert float(cov[0, 2, 2]) == pytest.approx(0.0, abs=1e-12)


def test_cluster_estimate_takes_the_heaviest_mode_not_the_heaviest_particle():
    """nav2_amcl's estimate: mode B (0.6 in two particles) beats mode A (one 0.4 particle, the single heaviest)."""
    b = _belief([[0.0, 0.0, 1.0], [10.0, 0.0, 0.0], [11.0, 0.0, 0.2]], [0.4, 0.3, 0.3])
    mean, cov = estimate(b)
    torch.testing.assert_close(mean[0, :2], torch.tensor([6.3, 0.0], dtype=torch.float64))  # between the modes
    est, cov_c = estimate(b, cluster_radius=2.0)
    torch.testing.assert_close(est[0], torch.tensor([10.5, 0.0, 0.1], dtype=torch.float64))
    # x variance about the published estimate: .4 * 10.5² + .3 * .5² + .3 * .5² = 44.25
    assert float(cov_c[0, 0, 0]) == pytest.approx(44.25, rel=1e-9)
    assert float(cov_c[0, 0, 0]) == pytest.approx(float(cov[0, 0, 0]) + (6.3 - 10.5) ** 2, rel=1e-9)
    torch.testing.assert_close(cov_c[0, 2, 2], cov[0, 2, 2])  # yaw spread: the whole belief's
    # A radius that holds every particle gives the weighted mean back.
    torch.testing.assert_close(estimate(b, cluster_radius=50.0)[0], mean)


def test_circular_mean_across_seam():
    b = _belief([[0, 0, math.pi - 0.1], [0, 0, -math.pi + 0.1]], [0.5, 0.5])
    mean, cov = estimate(b)
    assert abs(abs(float(mean[0, 2])) - math.pi) < 1e-9  # a raw average would give 0
    assert float(cov[0, 2, 2]) == pytest.approx(-2.0 * math.log(math.cos(0.1)), rel=1e-9)


def test_weighted_circular_mean():
    b = _belief([[0, 0, 0.0], [0, 0, math.pi / 2]], [0.75, 0.25])
    mean, _ = estimate(b)
    assert float(mean[0, 2]) == pytest.approx(math.atan2(0.25, 0.75), abs=1e-12)


def test_update_normalizes_huge_range():
    b = Belief(torch.zeros(1, 3, 3), uniform_log_weights(1, 3, like=torch.zeros(1)))
    out = update(b, torch.tensor([[1e4, 0.0, -1e4]]))
    assert torch.isfinite(out.log_weights[:, :2]).all()
    torch.testing.assert_close(out.weights, torch.tensor([[1.0, 0.0, 0.0]]))
    assert float(torch.logsumexp(out.log_weights, -1)) == pytest.approx(0.0, abs=1e-6)
    mean, cov = estimate(out)
    assert torch.isfinite(mean).all() and torch.isfinite(cov).all()


def test_update_adds_log_likelihood():
    b = _belief([[0, 0, 0], [1, 0, 0]], [0.5, 0.5])
    out = update(b, torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64))
    torch.testing.assert_close(out.weights, torch.tensor([[0.25, 0.75]], dtype=torch.float64))


def test_transition_composes_in_robot_frame():
    b = _belief([[1.0, 1.0, math.pi / 2], [0.0, 0.0, 0.0]], [0.5, 0.5])
    out = transition(b, egomotion=torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(out.particles[0, 0], torch.tensor([1.0, 2.0, math.pi / 2], dtype=torch.float64))
    torch.testing.assert_close(out.particles[0, 1], torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))


def test_transition_noise_is_seeded():
    b = _belief([[0.0, 0.0, 0.0]] * 64, [1 / 64] * 64)
    ego = torch.zeros(1, 3, dtype=torch.float64)
    a1 = transition(b, egomotion=ego, noise_std=(0.1, 0.1, 0.1), generator=torch.Generator().manual_seed(3))
    a2 = transition(b, egomotion=ego, noise_std=(0.1, 0.1, 0.1), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a1.particles, a2.particles)
    assert float(a1.particles[..., 0].std()) == pytest.approx(0.1, rel=0.35)


def test_effective_sample_size():
    k = 10
    uni = Belief(torch.zeros(1, k, 3), uniform_log_weights(1, k, like=torch.zeros(1)))
    assert float(effective_sample_size(uni)) == pytest.approx(k)
    one = update(uni, torch.tensor([[100.0] + [0.0] * (k - 1)]) * 10)
    assert float(effective_sample_size(one)) == pytest.approx(1.0, abs=1e-6)


def test_init_uniform_and_gaussian():
    g = torch.Generator().manual_seed(0)
    b = init_uniform(batch=2, num_particles=5000, bounds=(-1.0, 1.0, -2.0, 2.0), generator=g)
    assert b.particles.shape == (2, 5000, 3)
    assert float(b.particles[..., 0].min()) >= -1 and float(b.particles[..., 1].max()) <= 2
    assert float(b.particles[..., 2].abs().max()) <= math.pi
    mean = torch.tensor([[0.5, -0.5, 3.1]])
    gb = init_gaussian(mean=mean, std=(0.3, 0.3, math.radians(30)), num_particles=20000, generator=g)
    m, cov = estimate(gb)
    torch.testing.assert_close(m[0, :2], mean[0, :2], atol=0.01, rtol=0)
    assert abs(math.remainder(float(m[0, 2]) - 3.1, 2 * math.pi)) < 0.02
    assert float(cov[0, 0, 0]) == pytest.approx(0.09, rel=0.05)
    assert float(gb.particles[..., 2].abs().max()) <= math.pi


def test_systematic_indices_counts():
    w = torch.tensor([[0.5, 0.25, 0.125, 0.125, 0.0]], dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        idx = systematic_indices(w, generator=g)[0]
        counts = torch.bincount(idx, minlength=5)
        # Low variance: each count is floor or ceil of K·w.
        expected = 5 * w[0]
        assert torch.all(counts >= torch.floor(expected)) and torch.all(counts <= torch.ceil(expected))
        assert int(counts[4]) == 0


def test_systematic_resample_keeps_distribution():
    b = _belief([[0, 0, 0], [1, 0, 0]], [0.0 + 1e-300, 1.0])
    out = systematic_resample(b, generator=torch.Generator().manual_seed(0))
    assert torch.all(out.particles[0, :, 0] == 1.0)
    torch.testing.assert_close(out.weights, torch.full((1, 2), 0.5, dtype=torch.float64))


def test_soft_resample_unbiased_and_indices_aligned():
    """SPEC pitfall: weights must be gathered with the particles' indices."""
    torch.manual_seed(0)
    k = 64  # self-normalization has O(1/K) bias; at K = 64 it is far below the tolerance
    x = torch.linspace(-1, 1, k, dtype=torch.float64)
    particles = torch.stack([x, x**2, torch.zeros(k, dtype=torch.float64)], -1).unsqueeze(0)
    log_w = torch.log_softmax(torch.randn(1, k, dtype=torch.float64) * 2, -1)
    before = float((log_w.exp() * particles[..., 0] ** 3).sum())
    g = torch.Generator().manual_seed(5)
    reps = 2000
    big = Belief(particles.expand(reps, k, 3).contiguous(), log_w.expand(reps, k).contiguous())
    out = soft_resample(big, alpha=0.5, generator=g)
    after = (out.weights * out.particles[..., 0] ** 3).sum(-1)
    assert float(after.mean()) == pytest.approx(before, abs=4 * float(after.std()) / math.sqrt(reps) + 1e-9)
    # Each new weight must be w[idx]/q[idx] of the particle it travels with.
    q = 0.5 * log_w.exp()[0] + 0.5 / k
    ratio = (log_w.exp()[0] / q)
    idx = ((out.particles[0, :, 0] - x[0]) / (x[1] - x[0])).round().long()
    expect = ratio[idx] / ratio[idx].sum()
    torch.testing.assert_close(out.weights[0], expect)


@pytest.mark.parametrize("alpha,expect_grad", [(0.5, True), (0.0, True), (1.0, False)])
def test_soft_resample_gradient(alpha, expect_grad):
    k = 6
    particles = torch.randn(1, k, 3, dtype=torch.float64)
    log_w = torch.log_softmax(torch.randn(1, k, dtype=torch.float64), -1).requires_grad_(True)
    out = soft_resample(Belief(particles, log_w), alpha=alpha, generator=torch.Generator().manual_seed(0))
    (out.weights * out.particles[..., 0]).sum().backward()
    nonzero = float(log_w.grad.abs().sum()) > 1e-9
    assert nonzero == expect_grad


def test_pose_mse_wraps_yaw():
    est = torch.tensor([[0.0, 0.0, math.pi - 0.1]])
    truth = torch.tensor([[0.3, 0.4, -math.pi + 0.1]])
    assert float(pose_mse(est, truth)) == pytest.approx(0.25 + 0.5 * 0.04, rel=1e-5)


def test_mixture_nll_prefers_weight_on_truth():
    particles = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]])
    truth = torch.tensor([[0.0, 0.0, 0.0]])
    good = Belief(particles, torch.log(torch.tensor([[0.9, 0.1]])))
    bad = Belief(particles, torch.log(torch.tensor([[0.1, 0.9]])))
    assert float(mixture_nll(good, truth, std_xy=0.1, std_yaw=0.2)) < float(
        mixture_nll(bad, truth, std_xy=0.1, std_yaw=0.2)
    )


def test_filter_step_keeps_fp32_under_bf16_autocast():
    """Training autocasts the networks to bf16 on CUDA (CPU autocast has the same casting rules);
    the filter's weights, estimate and covariance must still come out in fp32 and equal the fp32
    arithmetic on the same likelihoods."""
    from dmn_ros.filter import FilterConfig, encode_map, filter_step
    from dmn_ros.model import DMN

    torch.manual_seed(0)
    model = DMN().eval()
    images = torch.rand(2, 4, 3, 32, 32)
    poses = torch.rand(2, 4, 3) * 2 - 1
    query = torch.rand(2, 3, 32, 32)
    belief = init_gaussian(mean=torch.tensor([[0.7, 0.1, 3.1], [-0.2, 0.4, -3.1]]),
                           std=torch.tensor([0.05, 0.05, 0.05]), num_particles=64)
    cfg = FilterConfig(transition_noise=(0.01, 0.01, 0.02), resampling="soft")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        pm = encode_map(model, images=images, poses=poses)
        res = filter_step(model, belief=belief, prepared_map=pm, query=query,
                          egomotion=torch.tensor([[0.02, 0.0, 0.1]] * 2), config=cfg,
                          generator=torch.Generator().manual_seed(1))
    for name in ("mean", "covariance", "log_likelihood"):
        assert getattr(res, name).dtype == torch.float32, name
    assert res.updated.log_weights.dtype == torch.float32 and res.belief.particles.dtype == torch.float32
    mean, cov = estimate(res.updated)
    torch.testing.assert_close(res.mean, mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(res.covariance, cov, rtol=0, atol=1e-6)
