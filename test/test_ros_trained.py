"""The shipped model on real rclpy nodes over DDS: tracking and global localization accuracy.

A module of its own so that no other stack (test_ros_nodes.py keeps one alive per module) shares its
topics: a second localization node on ``dmn_pose`` would put its own poses among the ones measured.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")

from rclpy.parameter import Parameter  # noqa: E402
from ros_helpers import initialpose_msg  # noqa: E402
from std_srvs.srv import Empty, Trigger  # noqa: E402
from test_ros_nodes import Stack  # noqa: E402

from dmn_ros.export import default_model_path, load_model  # noqa: E402
from dmn_ros.ros.conversions import pose_to_xyyaw  # noqa: E402

pytestmark = pytest.mark.ros


def test_trained_tracking_and_global(tmp_path):
    """Accuracy with the shipped model; skipped only if ``models/dmn_maze32.pt`` is absent."""
    path = default_model_path()
    if not path.is_file():
        pytest.skip(f"trained model {path} not present")
    model = load_model(path)
    s = Stack(model, tmp_path, num_contexts=32,
              loc_overrides=[Parameter("max_particles", value=1024), Parameter("tracking_particles", value=256)])
    try:
        s.map_ready(32)
        # Tracking: start 3 m off with the paper's σ (6 m, 30°) and converge within 5 steps.
        s.sim.step_once()
        truth = s.sim.truth
        s.initialpose.publish(initialpose_msg(truth + np.array([3.0, 0.0, 0.2]),
                                              np.diag([36.0, 36.0, math.radians(30) ** 2])))
        s.wait(lambda: s.loc.localizer.mode == "tracking", what="tracking")
        errs = []
        for _ in range(5):
            s.step_and_wait()
            est = pose_to_xyyaw(s.poses[-1].pose.pose)
            errs.append(float(np.hypot(*(est[:2] - s.sim.truth[:2]))))
        assert errs[-1] < 6.0, f"tracking errors {errs}"
        # Global: success (< 8.94 m) at t = 5 on 3 fixed seeded episodes. The shipped model gets 1/3
        # (docs/RESULTS.md); the paper-level "most of them" is not reached yet, so the bound is >= 1.
        ok = 0
        for seed in (20_000_010, 20_000_011, 20_000_012):
            s.mapping._on_clear(None, Trigger.Response())
            s.sim.reset(seed)
            s.map_ready(32)
            s.call(Empty, "reinitialize_global_localization")
            for _ in range(5):
                s.step_and_wait()
            est = pose_to_xyyaw(s.poses[-1].pose.pose)
            ok += float(np.hypot(*(est[:2] - s.sim.truth[:2]))) < 8.94
        assert ok >= 1, f"global successes {ok}/3"
    finally:
        s.close()
