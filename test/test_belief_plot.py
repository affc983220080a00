"""Belief pictures (paper Fig. 5) and the tracking prior means that the filter and every baseline share.

The new API is imported inside each test, so that each test fails on its own without the change.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from model_wrappers import DelegatingModel

from dmn_ros.evaluation import EvalSettings, make_episode_set, run_filter, run_regression, uninformed_errors
from dmn_ros.evaluation.cli import main as eval_main
from dmn_ros.export import export_model
from dmn_ros.geometry import compose
from dmn_ros.model import DMN


def test_yaw_marginal_hand_computed() -> None:
    """Weights are summed into x-y cells whatever the yaw; rows are y, columns x; outside the bounds is left out."""
    from dmn_ros.evaluation.belief_plot import yaw_marginal

    particles = np.array([
        [0.5, 0.5, 0.0],    # cell (x 0, y 0)
        [0.6, 0.4, 3.0],    # same cell, another yaw
        [2.5, 3.5, -1.0],   # cell (x 2, y 3)
        [3.9, 1.2, 1.0],    # cell (x 3, y 1)
        [4.5, 1.0, 0.0],    # outside x in [0, 4]
    ])
    weights = np.array([0.1, 0.2, 0.3, 0.3, 0.1])
    heat = yaw_marginal(particles, weights, (0.0, 4.0, 0.0, 4.0), cells=4)
    expect = np.zeros((4, 4))
    expect[0, 0] = 0.1 + 0.2
    expect[3, 2] = 0.3
    expect[1, 3] = 0.3
    np.testing.assert_allclose(heat, expect, atol=1e-12)
    assert heat.sum() == pytest.approx(0.9)


def test_steps_to_draw() -> None:
    from dmn_ros.evaluation.belief_plot import steps_to_draw

    assert steps_to_draw(8) == [1, 2, 5, 8]
    assert steps_to_draw(5) == [1, 2, 5]
    assert steps_to_draw(3) == [1, 2, 3]
    assert steps_to_draw(1) == [1]


def test_plot_belief_row_writes_a_readable_png(tmp_path: Path) -> None:
    import matplotlib.image

    from dmn_ros.evaluation.belief_plot import BeliefFrame, plot_belief_row

    rng = np.random.default_rng(0)
    frames = []
    for t in (1, 2, 5):
        p = np.column_stack([rng.uniform(-20, 20, (256, 2)), rng.uniform(-math.pi, math.pi, 256)])
        w = rng.random(256)
        frames.append(BeliefFrame(t=t, particles=p, weights=w / w.sum(), truth=np.array([1.0, 2.0, 0.3]),
                                  estimate=np.array([3.0, -1.0, 1.0]), error=math.hypot(2.0, 3.0)))
    occ = np.zeros((80, 80), dtype=bool)
    occ[:, 40] = True
    path = plot_belief_row(tmp_path / "sub" / "row.png", frames, bounds=(-20.0, 20.0, -20.0, 20.0),
                           contexts=rng.uniform(-20, 20, (4, 3)), title="test", occupancy=occ,
                           view_positions=rng.uniform(-20, 20, (50, 3)))
    assert path == tmp_path / "sub" / "row.png" and path.stat().st_size > 5000
    img = matplotlib.image.imread(path)
    assert img.shape[0] > 200 and img.shape[1] > 3 * img.shape[0] // 2 and float(img[..., :3].std()) > 0.05
    assert not list((tmp_path / "sub").glob("*.tmp"))  # written atomically
    with pytest.raises(ValueError, match="no frames"):
        plot_belief_row(tmp_path / "none.png", [], bounds=(0, 1, 0, 1), contexts=np.zeros((1, 3)), title="")


def test_belief_frames_are_the_scored_run(tiny_dataset: Path) -> None:
    """The pictures show the very run run_filter scores: same errors at the drawn steps, weights summing to 1."""
    from dmn_ros.evaluation.protocol import belief_frames

    eps = make_episode_set(str(tiny_dataset), num_episodes=3, num_contexts=4, T=5, seed=0)
    torch.manual_seed(0)
    model = DMN().eval()
    s = EvalSettings(mode="global", num_particles=32, T=5, num_contexts=4, batch_episodes=2, seed=1)
    errors = run_filter(model, eps, s)
    frames = belief_frames(model, eps, s, num_episodes=3, steps=[1, 2, 5])
    assert [[f.t for f in row] for row in frames] == [[1, 2, 5]] * 3
    for i, row in enumerate(frames):
        for f in row:
            assert f.error == errors[i, f.t - 1]
            assert f.particles.shape == (32, 3) and f.weights.sum() == pytest.approx(1.0)
            np.testing.assert_array_equal(f.truth, eps.episodes[i].query_poses[f.t - 1])
    assert len(belief_frames(model, eps, s, num_episodes=1, steps=[1])) == 1


class _FlatModel(DelegatingModel):
    """A constant log-likelihood: the weights stay uniform, so the filter never resamples."""

    def __init__(self) -> None:
        super().__init__(DMN().eval())

    def log_likelihood_prepared(self, map_a, map_g, context_poses, q, hq, particles, nearest=0):
        return torch.zeros(particles.shape[:2])

    def regress_prepared(self, map_v, map_u, context_poses, q, f, prev):
        return prev  # a "regression" that keeps its start: its first estimate is its prior mean


def test_baselines_start_from_the_filters_tracking_prior_means(tiny_dataset: Path) -> None:
    """Two batches: the second batch's prior means follow the first batch's particle draws; the baselines reuse them."""
    from dmn_ros.evaluation.protocol import tracking_prior_means

    eps = make_episode_set(str(tiny_dataset), num_episodes=4, num_contexts=4, T=3, seed=0, odom_noise=(0.0, 0.0))
    s = EvalSettings(mode="tracking", num_particles=16, T=3, num_contexts=4, batch_episodes=2, seed=5)
    model = _FlatModel()
    means = tracking_prior_means(model, eps, s)
    # The filter's own stream, by hand: per batch an offset, the prior particles, one noise draw per later step.
    scale, mpu = eps.scale, eps.scale.meters_per_unit
    std = torch.tensor((6.0 / mpu, 6.0 / mpu, math.radians(30.0)))
    g = torch.Generator().manual_seed(5)
    expect = []
    for start in (0, 2):
        t0 = torch.from_numpy(scale.to_normalized(np.stack([e.query_poses[0] for e in eps.episodes[start:start + 2]])))
        t0 = t0.float()
        mean = compose(t0, torch.zeros_like(t0)) + torch.randn(2, 3, generator=g) * std
        expect.append(scale.to_metric(mean.double().numpy()))
        torch.randn(2, 16, 3, generator=g)  # prior particles
        for _ in range(1, 3):
            torch.randn(2, 16, 3, generator=g)  # motion noise
    np.testing.assert_array_equal(means, np.concatenate(expect))
    truth0 = np.stack([e.query_poses[0] for e in eps.episodes])
    start_err = np.hypot(means[:, 0] - truth0[:, 0], means[:, 1] - truth0[:, 1])
    # The uninformed baseline's estimate at t = 1 is the filter's prior mean, episode by episode.
    np.testing.assert_allclose(uninformed_errors(eps, s, prior_means_m=means)[:, 0], start_err, atol=1e-9)
    # So is the regression's start (this one keeps it).
    np.testing.assert_allclose(run_regression(model, eps, s, prior_means_m=means)[:, 0], start_err, atol=1e-4)
    # The filter handed its own means runs bit for bit as it does alone.
    torch.manual_seed(0)
    dmn = DMN().eval()
    own = tracking_prior_means(dmn, eps, s)
    np.testing.assert_array_equal(run_filter(dmn, eps, s, prior_means_m=own), run_filter(dmn, eps, s))
    with pytest.raises(ValueError, match="expected shape"):
        uninformed_errors(eps, s, prior_means_m=means[:2])


def test_dmn_eval_uninformed_tracking_starts_at_the_filters_prior(tiny_dataset: Path, tmp_path: Path) -> None:
    """dmn-eval's uninformed tracking row starts from the DMN filter's prior means (its first torch draws)."""
    m = tmp_path / "m.pt"
    export_model(DMN(), m, meters_per_unit=20.0)
    out = tmp_path / "eval"
    assert eval_main(["--model", str(m), "--data", str(tiny_dataset), "--out", str(out), "--episodes", "2",
                      "--T", "5", "--k-global", "16", "--k-tracking", "16", "--no-health", "--seed", "3"]) == 0
    summary = json.loads((out / "results.json").read_text())
    eps = make_episode_set(str(tiny_dataset), num_episodes=2, num_contexts=4, T=5, seed=3, query_mode="random_order")
    t0 = torch.from_numpy(eps.scale.to_normalized(np.stack([e.query_poses[0] for e in eps.episodes]))).float()
    g = torch.Generator().manual_seed(3)  # one batch: the prior means are the filter's first draws
    std = torch.tensor((6.0 / 20.0, 6.0 / 20.0, math.radians(30.0)))
    prior = eps.scale.to_metric((compose(t0, torch.zeros_like(t0)) + torch.randn(2, 3, generator=g) * std).double()
                                .numpy())
    truth0 = np.stack([e.query_poses[0] for e in eps.episodes])
    start_err = np.hypot(prior[:, 0] - truth0[:, 0], prior[:, 1] - truth0[:, 1])
    assert summary["uninformed_tracking_rmse_m"][0] == pytest.approx(math.sqrt(np.mean(start_err**2)), abs=1e-4)


def test_dmn_eval_writes_and_lists_belief_pictures(tiny_dataset: Path, tmp_path: Path) -> None:
    import matplotlib.image

    m = tmp_path / "m.pt"
    export_model(DMN(), m, meters_per_unit=20.0)
    common = ["--model", str(m), "--data", str(tiny_dataset), "--episodes", "2", "--T", "5", "--k-global", "32",
              "--k-tracking", "16", "--no-health"]
    out = tmp_path / "eval"
    assert eval_main([*common, "--out", str(out), "--belief-pictures", "1"]) == 0
    assert sorted(p.name for p in out.glob("belief_*.png")) == ["belief_episode_00.png"]
    assert matplotlib.image.imread(out / "belief_episode_00.png").shape[0] > 200
    md = (out / "results.md").read_text()
    assert "[belief_episode_00.png](belief_episode_00.png)" in md and "t = 1, 2, 5" in md
    assert json.loads((out / "results.json").read_text())["belief_pictures"] == ["belief_episode_00.png"]
    none = tmp_path / "none"
    assert eval_main([*common, "--out", str(none), "--belief-pictures", "0"]) == 0
    assert not list(none.glob("belief_*.png")) and "belief_pictures" not in json.loads(
        (none / "results.json").read_text())


def test_dmn_eval_baseline_model_tracks_from_the_first_models_prior_means(tiny_dataset: Path, tmp_path: Path) -> None:
    """Two batches (8 episodes): the --baseline-model's tracking starts from the --model's prior means, which the
    health run hands over (no second run); the later batch's means depend on the model's own resampling draws."""
    import dataclasses

    from dmn_ros.evaluation.protocol import rmse, tracking_prior_means
    from dmn_ros.export import load_model

    paths = [tmp_path / "m0.pt", tmp_path / "m1.pt"]
    torch.manual_seed(0)
    export_model(DMN(), paths[0], meters_per_unit=20.0)
    torch.manual_seed(1)  # a sharp likelihood: this one resamples where the first does not
    export_model(DMN(), paths[1], meters_per_unit=20.0, calibration={"likelihood_scale_independent": 100.0})
    out = tmp_path / "eval"
    assert eval_main(["--model", str(paths[0]), "--baseline-model", str(paths[1]), "--data", str(tiny_dataset),
                      "--out", str(out), "--episodes", "8", "--T", "5", "--k-global", "16", "--k-tracking", "16",
                      "--seed", "3", "--belief-pictures", "0"]) == 0
    summary = json.loads((out / "results.json").read_text())
    eps = make_episode_set(str(tiny_dataset), num_episodes=8, num_contexts=4, T=5, seed=3, query_mode="random_order")
    s = EvalSettings(mode="tracking", num_particles=16, T=5, num_contexts=4, seed=3)
    a, b = (load_model(p).module for p in paths)
    means = tracking_prior_means(a, eps, s)
    np.testing.assert_allclose(summary["tracking_prior_means_m"], means, atol=1e-5)  # the health run's (rounded)
    s_b = dataclasses.replace(s, likelihood_scale=100.0)  # the temperature the baseline model carries
    own = tracking_prior_means(b, eps, s_b)
    np.testing.assert_array_equal(own[:4], means[:4])  # the first batch's come from the seed alone ...
    assert np.abs(own[4:] - means[4:]).max() > 0.1  # ... the second's from each model's own resampling draws
    shared = rmse(run_filter(b, eps, s_b, prior_means_m=means))[4]
    assert summary["baseline"]["tracking_rmse_m"][4] == pytest.approx(shared, abs=1e-4)
    assert rmse(run_filter(b, eps, s_b))[4] != pytest.approx(shared, abs=1e-4)
