"""Health on /diagnostics over real DDS, the sim's kidnapping, and recovery on vs off.

With the untrained test model the likelihood carries no information, so the kidnapping's effect
on the likelihood is *forced*: the observation model is wrapped so that its log-likelihood is a
constant that drops by 30 nats from the kidnapped frame on (a trained model's marginal
likelihood drops the same way when frames stop matching the belief). Everything downstream is
real: filter, health rules, node, DiagnosticArray over DDS, automatic global relocalization.
Tests with the shipped model are skipped only when ``models/dmn_maze32.pt`` is absent.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

rclpy = pytest.importorskip("rclpy")

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus  # noqa: E402
from model_wrappers import DelegatingModel  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from ros_helpers import NodeStack, init_context, initialpose_msg  # noqa: E402

from dmn_ros.evaluation.health_metrics import time_to_recover  # noqa: E402
from dmn_ros.export import LoadedModel, default_model_path, load_model  # noqa: E402
from dmn_ros.filter import HealthConfig  # noqa: E402
from dmn_ros.localizer import Localizer, LocalizerConfig, embed_images  # noqa: E402
from dmn_ros.maps import ViewMap  # noqa: E402
from dmn_ros.ros.conversions import stamp_to_sec  # noqa: E402

pytestmark = pytest.mark.ros

SEED = 20_000_003
KIDNAP_AT = 8
"""The sim teleports the robot at its 8th frame."""


class KidnapForcedModel(DelegatingModel):
    """Log-likelihood = constant, 30 nats lower once the sim has kidnapped the robot (see module doc)."""

    def __init__(self, inner, sim_ref):
        super().__init__(inner)
        self.sim_ref = sim_ref

    def log_likelihood_prepared(self, a, g, poses, q, hq, particles, nearest=0):
        sim = self.sim_ref[0]
        drop = -30.0 if sim is not None and sim.kidnapped_at is not None else 0.0
        return torch.zeros(particles.shape[:2], dtype=particles.dtype, device=particles.device) + drop


class Stack(NodeStack):
    def __init__(self, model, loc_model, tmp_path, *, loc_overrides=(), sim_overrides=(), num_contexts=8):
        super().__init__(model, tmp_path, seed=SEED, loc_model=loc_model, num_contexts=num_contexts,
                         trajectory_steps=60, sim_overrides=sim_overrides,
                         loc_overrides=[Parameter("diagnostics_period", value=0.2), *loc_overrides])
        self.diags: list[DiagnosticStatus] = []
        self.probe.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, 50)
        self.start()

    def _on_diag(self, msg: DiagnosticArray) -> None:
        self.diags.extend(s for s in msg.status if s.name.endswith("localization_node: localization"))

    def latest_diag(self, after: int = 0, timeout=10.0) -> DiagnosticStatus:
        self.wait(lambda: len(self.diags) > after, timeout, "diagnostics")
        return self.diags[-1]

    def map_ready(self, n):
        self.sim.publish_contexts()
        self.wait(lambda: self.loc.localizer.has_map and len(self.loc.localizer.view_map) == n, what="map at loc")

    def step_and_wait(self, timeout=20.0) -> DiagnosticStatus:
        """One sim frame; returns the DiagnosticStatus published for that filter update (stamp-matched)."""
        n = self.loc.counters["processed"]
        stamp = self.sim.step_once()
        self.wait(lambda: self.loc.counters["processed"] > n, timeout, "filter step")
        self.wait(lambda: any(abs(stamp_to_sec(p.header.stamp) - stamp) < 1e-6 for p in self.poses[-3:]),
                  timeout, "pose")
        self.wait(lambda: any(d.values and _kv(d).get("processed") == str(n + 1) for d in self.diags[-5:]),
                  timeout, "diagnostics of the update")
        return next(d for d in reversed(self.diags) if _kv(d).get("processed") == str(n + 1))

    def init_pose(self, pose, cov):
        self.initialpose.publish(initialpose_msg(pose, cov))
        self.wait(lambda: self.loc.localizer.mode == "tracking", what="tracking")


def _kv(status: DiagnosticStatus) -> dict[str, str]:
    return {kv.key: kv.value for kv in status.values}


def _level(status: DiagnosticStatus) -> int:
    return status.level[0] if isinstance(status.level, bytes) else int(status.level)


def test_sim_kidnap_teleports_without_odometry(untrained, tmp_path):
    from dmn_ros.ros.sim_node import SimNode as _Sim

    ctx = init_context()
    try:
        sim = _Sim(context=ctx, parameter_overrides=[
            Parameter("world_seed", value=SEED), Parameter("rate", value=0.0), Parameter("num_contexts", value=2),
            Parameter("trajectory_steps", value=30), Parameter("kidnap_at_step", value=5),
            Parameter("odom_noise_xy", value=0.0), Parameter("odom_noise_yaw", value=0.0)])
        truths, odoms = [], []
        for _ in range(8):
            sim.step_once()
            truths.append(sim.truth.copy())
            odoms.append(sim.odom_pose.copy())
        assert sim.kidnapped_at == 4  # the 5th frame
        jumps = [float(np.hypot(*(truths[i + 1][:2] - truths[i][:2]))) for i in range(7)]
        odo = [float(np.hypot(*(odoms[i + 1][:2] - odoms[i][:2]))) for i in range(7)]
        assert odo[3] == 0.0  # the odometry felt nothing at the kidnapping...
        assert all(abs(j - o) < 1e-9 for i, (j, o) in enumerate(zip(jumps, odo, strict=True)) if i != 3)
        assert bool(sim.world.is_free(truths[4][None, :2])[0])  # ...to a free pose
        assert not np.allclose(truths[4], truths[3])
        sim.destroy_node()
    finally:
        rclpy.shutdown(context=ctx)


def test_diagnostics_levels_and_forced_kidnap_recovery_over_dds(untrained, tmp_path):
    """ERROR (no map) → ERROR (not initialized) → OK (converged) → ERROR (lost, kidnapped) → global relocalization."""
    sim_ref = [None]
    forced = LoadedModel(KidnapForcedModel(untrained.module, sim_ref), untrained.info, untrained.device,
                         untrained.path)
    s = Stack(untrained, forced, tmp_path, sim_overrides=[Parameter("kidnap_at_step", value=KIDNAP_AT)],
              loc_overrides=[Parameter("health.converged_xy", value=5.0),
                             Parameter("health.converged_yaw", value=1.0),
                             Parameter("health.converged_updates", value=2),
                             Parameter("health.warmup_updates", value=3),
                             Parameter("lost_updates_before_global", value=2)])
    sim_ref[0] = s.sim
    try:
        d = s.latest_diag()
        assert _level(d) == DiagnosticStatus.ERROR[0] and "no map" in d.message
        assert _kv(d)["has_map"] == "false"
        s.map_ready(8)
        n = len(s.diags)
        d = s.latest_diag(after=n)
        assert _level(d) == DiagnosticStatus.ERROR[0] and "not initialized" in d.message
        s.sim.step_once()  # frame 1, dropped: not initialized
        s.wait(lambda: s.loc.counters["dropped_not_ready"] >= 1, what="not-ready drop")
        s.init_pose(s.sim.truth, np.diag([0.01, 0.01, 0.001]))
        levels = []
        for _ in range(KIDNAP_AT - 2):  # frames 2..7: before the kidnapping
            levels.append(_level(d := s.step_and_wait()))
        assert levels[0] == DiagnosticStatus.WARN[0]  # not converged yet (N = 2 updates)
        assert levels[1:] == [DiagnosticStatus.OK[0]] * (len(levels) - 1), levels
        kv = _kv(d)
        assert kv["converged"] == "true" and kv["lost"] == "false" and float(kv["ess"]) == pytest.approx(64.0)
        assert float(kv["spread_xy_m"]) < 5.0 and float(kv["likelihood_ratio"]) == pytest.approx(1.0)
        assert kv["model_domain"] == "unrecorded"  # the untrained fixture's file records no training data
        assert s.sim.kidnapped_at is None
        after = []
        for _ in range(7):  # frame 8 is the kidnapping
            d = s.step_and_wait()
            after.append((_level(d), _kv(d)))
        assert s.sim.kidnapped_at == KIDNAP_AT - 1
        # ratio 0.5/0.95, 0.277, 0.146, 0.077, 0.040 < 0.05: lost (ERROR) at the 5th frame after the kidnapping.
        lvls = [lv for lv, _ in after]
        first_error = lvls.index(DiagnosticStatus.ERROR[0])
        assert first_error == 4 and after[first_error][1]["lost"] == "true", lvls
        # Two lost updates in a row restart global localization; its first update is WARN (spread).
        s.wait(lambda: s.loc.localizer.recoveries["global"] == 1, what="global relocalization")
        d = s.step_and_wait()
        assert _kv(d)["global_relocalizations"] == "1" and _kv(d)["mode"] == "global"
        assert _level(d) == DiagnosticStatus.WARN[0] and float(_kv(d)["spread_xy_m"]) > 5.0
        assert int(_kv(d)["num_particles"]) == 128
    finally:
        s.close()


# ---- shipped model --------------------------------------------------------------------------------
def _shipped():
    path = default_model_path()
    if not path.is_file():
        pytest.skip(f"trained model {path} not present")
    return load_model(path)


def _kidnap_run(model, *, recovery: dict, seed: int = 20_000_010, steps: int = 20, kidnap: int = 6):
    """A seeded ROS-free kidnapped-robot run with the Localizer; returns x-y errors (m) per step."""
    from dmn_ros.data import egomotion_from_poses
    from dmn_ros.worlds import make_world, smooth_trajectory

    rng = np.random.default_rng(seed)
    world = make_world("maze", seed=seed, image_size=(32, 32))
    try:
        ctx = world.sample_free_poses(16, rng)
        vm = ViewMap.for_model(model.info)
        vm.add(embeddings=embed_images(model, list(world.render(ctx))), poses=ctx, ids=[f"c/{i}" for i in range(16)])
        first = smooth_trajectory(world, rng, steps=kidnap)
        far = [p for p in world.sample_free_poses(64, rng) if np.hypot(*(p[:2] - first[-1, :2])) > 15.0]
        second = smooth_trajectory(world, rng, steps=steps - kidnap, start=far[0])  # kidnapped > 15 m away
        truth = np.concatenate([first, second])
        images = world.render(truth)
    finally:
        world.close()
    ego, _ = egomotion_from_poses(truth, rng=rng, noise_std=(0.05, 0.01))
    ego[kidnap] = 0.0  # the kidnapping is invisible to odometry
    # The raw likelihoods (temperature 1): the shipped calibration (0.125) damps the likelihood drop
    # that the lost rule watches by 8x, and with it the kidnap detection this test is about.
    cfg = LocalizerConfig(max_particles=512, tracking_particles=128, device="cpu", likelihood_scale=1.0,
                          health=HealthConfig(), **recovery)
    loc = Localizer(model, config=cfg, seed=0)
    loc.set_map(vm)
    loc.init_pose(truth[0], np.diag([0.25, 0.25, 0.01]))
    errs, actions = [], []
    for t in range(steps):
        est = loc.step(images[t], None if t == 0 else ego[t])
        errs.append(float(np.hypot(*(est.mean[:2] - truth[t, :2]))))
        actions.append(est.recovery)
    return np.asarray(errs), loc, actions


@pytest.mark.xfail(strict=True, reason="the shipped model's marginal likelihood varies more between ordinary "
                   "frames than it drops at a kidnapping, so the lost rule does not fire (docs/health.md). "
                   "Strict: the run is seeded, so a pass means a new model detects kidnappings and the docs "
                   "must say so")
def test_shipped_recovery_on_vs_off_after_kidnapping():
    """Same seeded kidnapped run with recovery off and with lost_updates_before_global = 2.

    Asserted: off never acts; on detects the kidnapping (a global relocalization after it and none
    before it). The errors and times to recover of both are printed (docs/health.md records them);
    whether the restart re-finds the robot depends on the model's global localization.
    """
    model = _shipped()
    kidnap = 6
    off, loc_off, act_off = _kidnap_run(model, recovery={}, kidnap=kidnap)
    on, _loc_on, act_on = _kidnap_run(model, recovery={"lost_updates_before_global": 2}, kidnap=kidnap)
    thr = 8.94
    t_off = time_to_recover(off[kidnap + 1 :], kidnap_step=0, threshold_m=thr, hold=3)
    t_on = time_to_recover(on[kidnap + 1 :], kidnap_step=0, threshold_m=thr, hold=3)
    fired = [t for t, a in enumerate(act_on) if a == "global"]
    print(f"recovery off: recovered after {t_off}, errors {np.round(off[kidnap:], 1)}; on: global at {fired}, "
          f"recovered after {t_on}, errors {np.round(on[kidnap:], 1)}")
    assert loc_off.recoveries == {"injections": 0, "injected_particles": 0, "global": 0} and not any(act_off)
    assert fired and fired[0] >= kidnap, fired  # frame `kidnap` is the first one seen from the new pose
    assert math.isfinite(on[-1])
