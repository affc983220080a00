"""Evaluation metrics against hand-computed cases, and the dmn-eval CLI on a tiny dataset."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dmn_ros.evaluation import (
    EvalSettings,
    closest_context_errors,
    make_episode_set,
    rmse,
    run_filter,
    success_rate,
    success_threshold_m,
    uninformed_errors,
)
from dmn_ros.evaluation.cli import health_metrics
from dmn_ros.evaluation.cli import main as eval_main
from dmn_ros.evaluation.health_metrics import Runs, collect_runs
from dmn_ros.export import export_model, load_model
from dmn_ros.model import DMN


def test_metric_formulas() -> None:
    errors = np.array([[1.0, 10.0], [3.0, 8.0], [20.0, 0.0]])
    np.testing.assert_allclose(rmse(errors), [math.sqrt((1 + 9 + 400) / 3), math.sqrt((100 + 64) / 3)])
    np.testing.assert_allclose(success_rate(errors, 8.94), [2 / 3, 2 / 3])
    assert success_threshold_m(40.0) == pytest.approx(8.94)
    assert success_threshold_m(80.0) == pytest.approx(17.88)


def test_baselines_hand_checked(tiny_dataset: Path) -> None:
    eps = make_episode_set(str(tiny_dataset), num_episodes=2, num_contexts=4, T=5, seed=0, odom_noise=(0.0, 0.0))
    cc = closest_context_errors(eps, num_contexts=4, T=5)
    e = eps.episodes[0]
    expect = min(math.hypot(*(e.query_poses[0, :2] - c[:2])) for c in e.context_poses[:4])
    assert cc[0, 0] == pytest.approx(expect)
    # Exact odometry and no yaw offset: the "uninformed" estimate keeps its initial x-y offset at every step.
    un = uninformed_errors(eps, EvalSettings(mode="tracking", T=5, seed=3, tracking_std=(6.0, 6.0, 0.0)))
    assert float(un[:, 0].min()) > 0
    np.testing.assert_allclose(un[:, 1:], un[:, :1].repeat(4, axis=1), atol=1e-9)


def test_run_filter_shapes_and_determinism(tiny_dataset: Path) -> None:
    eps = make_episode_set(str(tiny_dataset), num_episodes=3, num_contexts=4, T=3, seed=0)
    model = DMN().eval()
    for mode in ("global", "tracking"):
        s = EvalSettings(mode=mode, num_particles=64, T=3, num_contexts=4, batch_episodes=2, seed=1)
        a = run_filter(model, eps, s)
        b = run_filter(model, eps, s)
        assert a.shape == (3, 3) and np.isfinite(a).all()
        np.testing.assert_array_equal(a, b)


def test_dmn_eval_cli(tiny_dataset: Path, tmp_path: Path) -> None:
    m = tmp_path / "m.pt"
    export_model(DMN(), m, meters_per_unit=20.0)
    out = tmp_path / "eval"
    rc = eval_main(["--model", str(m), "--data", str(tiny_dataset), "--out", str(out), "--episodes", "2",
                    "--T", "5", "--k-global", "32", "--k-tracking", "16", "--nc-sweep", "1,2"])
    assert rc == 0
    summary = json.loads((out / "results.json").read_text())
    assert len(summary["global_success"]) == 5 and summary["fingerprints"] == [load_model(m).info.fingerprint]
    assert set(summary["success_t5_vs_Nc"]) == {"1", "2"}
    md = (out / "results.md").read_text()
    assert "| DMN |" in md
    assert len(summary["truth_rank"]) == 1 and 0.0 <= summary["truth_rank"][0] <= 1.0
    assert "Observation-model ranking" in md
    basin = summary["basin_rank"]
    assert basin["std_m_m_deg"] == [3.0, 3.0, 30.0] and len(basin["rank"]) == 1 and 0.0 <= basin["rank"][0] <= 1.0
    # health metrics of the same runs (docs/health.md): keys present, values finite or None as documented
    h = summary["health"]
    for mode in ("global", "tracking"):
        m = h[mode]
        assert m["coverage_95"] is None or 0.0 <= m["coverage_95"] <= 1.0
        assert m["mean_nees"] is None or (math.isfinite(m["mean_nees"]) and m["mean_nees"] >= 0)
        assert 0.0 <= m["false_lost_rate"] <= 1.0 and m["coverage_from_step"] == 3
        assert m["covariance_inflation"] == [1.0]
    assert 0.0 <= h["global"]["converged_share"] <= 1.0 and len(h["global"]["converged_at_step"]) == 2
    assert "converged_share" not in h["tracking"]
    assert "| mode | 95 % coverage | mean NEES |" in md and "| global (K = 32, T = 5) |" in md
    assert (out / "success_vs_t.png").stat().st_size > 1000 and (out / "success_vs_Nc.png").is_file()
    # The paper's protocol (independent views in random order) is the default; robot-like segments on request.
    assert summary["episode_set"]["query_mode"] == "random_order" and "queries random_order" in md
    assert summary["episode_set"]["domain"] == "maze" and "do not record their training domain" in md
    # Each stream runs with the temperature the model carries for it.
    model_path = tmp_path / "calibrated.pt"
    export_model(DMN(), model_path, meters_per_unit=20.0,
                 calibration={"likelihood_scale": 0.25, "likelihood_scale_independent": 2.0},
                 training={"domain": "rooms"})
    ind = tmp_path / "eval_ind"
    assert eval_main(["--model", str(model_path), "--data", str(tiny_dataset), "--out", str(ind), "--episodes", "2",
                      "--T", "5", "--k-global", "16", "--k-tracking", "16", "--no-health"]) == 0
    assert "temperature 2 (the model's, for independent frames)" in (ind / "results.md").read_text()
    # A rooms model on maze data is flagged: its figures are zero-shot.
    assert "Trained on the 'rooms' domain, evaluated on 'maze' (another domain: zero-shot)." in (
        ind / "results.md").read_text()
    seg = tmp_path / "eval_seg"
    assert eval_main(["--model", str(model_path), "--data", str(tiny_dataset), "--out", str(seg), "--episodes", "2",
                      "--T", "5", "--k-global", "16", "--k-tracking", "16", "--no-health", "--queries", "segment"]) == 0
    assert json.loads((seg / "results.json").read_text())["episode_set"]["query_mode"] == "segment"
    assert "temperature 0.25 (the model's, for consecutive frames)" in (seg / "results.md").read_text()
    with pytest.raises(SystemExit):
        eval_main(["--model", str(model_path), "--data", str(tiny_dataset), "--out", str(seg), "--queries", "shuffled"])


def test_eval_runs_each_query_stream_with_its_own_temperature(tiny_dataset: Path, tmp_path: Path) -> None:
    """Same weights, only the independent-views temperature differs: random-order runs differ, segment runs do not."""
    from dmn_ros.evaluation.cli import _run

    weights = DMN()
    for name, independent in (("hot.pt", 2.0), ("cold.pt", 0.0625)):
        export_model(weights, tmp_path / name, meters_per_unit=20.0,
                     calibration={"likelihood_scale": 0.5, "likelihood_scale_independent": independent})
    hot, cold = load_model(tmp_path / "hot.pt"), load_model(tmp_path / "cold.pt")
    s = EvalSettings(mode="global", num_particles=32, T=3, num_contexts=4, seed=1)
    ro = make_episode_set(str(tiny_dataset), num_episodes=2, num_contexts=4, T=3, seed=0, query_mode="random_order")
    seg = make_episode_set(str(tiny_dataset), num_episodes=2, num_contexts=4, T=3, seed=0, query_mode="segment")
    assert not np.array_equal(_run(hot, ro, s, "cpu"), _run(cold, ro, s, "cpu"))
    np.testing.assert_array_equal(_run(hot, seg, s, "cpu"), _run(cold, seg, s, "cpu"))


def test_collect_runs_reproduces_run_filter(tiny_dataset: Path) -> None:
    """dmn-eval's health metrics come from the same filter run: collect_runs' errors are run_filter's."""
    eps = make_episode_set(str(tiny_dataset), num_episodes=3, num_contexts=4, T=3, seed=0)
    model = DMN().eval()
    for mode in ("global", "tracking"):
        s = EvalSettings(mode=mode, num_particles=32, T=3, num_contexts=4, batch_episodes=2, seed=1)
        runs = collect_runs(model, eps, s)
        np.testing.assert_array_equal(runs.errors_m, run_filter(model, eps, s))
        assert runs.covariance.shape == (3, 3, 3, 3) and runs.converged.shape == (3, 3)


def test_health_metrics_hand_checked() -> None:
    """Two episodes, T = 4, Σ = I: NEES = e² from step index 2 on."""
    e = np.array([[30.0, 20.0, 1.0, 3.0], [30.0, 0.5, 0.0, 2.0]])  # x-error per step, y-error 0
    mean = np.stack([e, np.zeros_like(e), np.zeros_like(e)], axis=-1)
    runs = Runs(mean=mean, covariance=np.broadcast_to(np.eye(3), (2, 4, 3, 3)).copy(), truth=np.zeros((2, 4, 3)),
                converged=np.array([[False, False, True, True], [False, True, True, True]]),
                lost=np.array([[False, False, False, False], [False, False, True, False]]),
                log_likelihood=np.zeros((2, 4)))
    m = health_metrics([runs], threshold_m=8.94, inflations=[4.0], global_start=True)
    # NEES raw [1, 9, 0, 4] → 3 of 4 inside 5.991; with Σ×4: [.25, 2.25, 0, 1], all inside
    assert m["coverage_95_raw"] == pytest.approx(0.75) and m["mean_nees_raw"] == pytest.approx(14 / 4)
    assert m["coverage_95"] == pytest.approx(1.0) and m["mean_nees"] == pytest.approx(3.5 / 4)
    assert m["converged_at_step"] == [3, 2] and m["converged_share"] == 1.0 and m["converged_at_step_mean"] == 2.5
    assert m["false_lost_rate"] == 0.5


class _DistanceModel(torch.nn.Module):
    """Observation model whose log-likelihood is minus the distance to a fixed pose (or a constant)."""

    def __init__(self, target: torch.Tensor | None) -> None:
        super().__init__()
        self.dmn = DMN()
        self.target = target

    def embed_views(self, images: torch.Tensor) -> torch.Tensor:
        return self.dmn.embed_views(images)

    def prepare_map(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.dmn.prepare_map(embeddings)

    def prepare_query(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.dmn.prepare_query(query)

    def log_likelihood_prepared(self, map_a, map_g, context_poses, q, hq, particles, nearest=0):
        if self.target is None:
            return torch.zeros(particles.shape[:2])
        return -(particles - self.target).norm(dim=-1)


def test_truth_rank_by_construction(tiny_dataset: Path) -> None:
    import dataclasses

    from dmn_ros.evaluation.ranking import truth_rank

    eps = make_episode_set(str(tiny_dataset), num_episodes=2, num_contexts=4, T=1, seed=0)
    for e in eps.episodes:
        one = dataclasses.replace(eps, episodes=[e])
        truth = torch.from_numpy(eps.scale.to_normalized(e.query_poses[0])).float()
        # Scored by closeness to the truth: every random pose is below it.
        assert truth_rank(_DistanceModel(truth), one, num_contexts=4, num_random=63).tolist() == [1.0]
        # Scored by closeness to the same place with the opposite yaw: the truth is neither best nor worst.
        far = truth + torch.tensor([0.0, 0.0, math.pi])  # same place, opposite yaw
        r = truth_rank(_DistanceModel(far), one, num_contexts=4, num_random=255)[0]
        assert 0.0 < r < 1.0
    # A constant model ranks nothing strictly below the truth.
    assert truth_rank(_DistanceModel(None), eps, num_contexts=4, num_random=31).tolist() == [0.0, 0.0]
    # The real model: a share in [0, 1], deterministic for a seed.
    torch.manual_seed(0)
    dmn = DMN().eval()
    a = truth_rank(dmn, eps, num_contexts=4, seed=3)
    assert a.shape == (2,) and ((a >= 0) & (a <= 1)).all()
    assert (truth_rank(dmn, eps, num_contexts=4, seed=3) == a).all()


class _SpikeModel(_DistanceModel):
    """Scores 1 exactly at the target pose and 0 elsewhere: a likelihood no filter's particles can find."""

    def log_likelihood_prepared(self, map_a, map_g, context_poses, q, hq, particles, nearest=0):
        return ((particles - self.target).norm(dim=-1) < 1e-4).float()


def test_truth_rank_near_annulus_and_jittered_basin(tiny_dataset: Path) -> None:
    """The near and basin variants tell a broad peak (closeness) from a spike at the exact truth."""
    import dataclasses

    from dmn_ros.evaluation.ranking import truth_rank

    eps = make_episode_set(str(tiny_dataset), num_episodes=1, num_contexts=4, T=1, seed=0)
    e = eps.episodes[0]
    one = dataclasses.replace(eps, episodes=[e])
    truth = torch.from_numpy(eps.scale.to_normalized(e.query_poses[0])).float()
    broad, spike = _DistanceModel(truth), _SpikeModel(truth)
    # Exactly at the truth both are perfect, against uniform and against poses 1-3 m away.
    for model in (broad, spike):
        assert truth_rank(model, one, num_contexts=4, num_random=63).tolist() == [1.0]
        assert truth_rank(model, one, num_contexts=4, num_random=63, near_radius_m=(1.0, 3.0)).tolist() == [1.0]
    # Jittered by 0.5 m / 5°, the broad peak still beats nearly every uniform pose; the spike beats none.
    jitter = (0.5, 0.5, 5.0)
    assert truth_rank(broad, one, num_contexts=4, num_random=255, truth_std=jitter)[0] > 0.9
    assert truth_rank(spike, one, num_contexts=4, num_random=255, truth_std=jitter).tolist() == [0.0]
