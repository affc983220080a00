"""Shared fixtures: a tiny rendered maze dataset, built once per test session; an untrained exported model.

Also claims this pytest run's own ROS_DOMAIN_ID before any test module is imported, so the tests
that start real rclpy nodes (test/ros_helpers.py) never see another run's nodes over DDS.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_DOMAIN_LOCK = []
"""The open lock file that holds this run's ROS domain ids (released when the process ends)."""


def _claim_ros_domain_id() -> int:
    """An even id d in 100..198 such that no other pytest run on this machine holds d or d + 1 (the soak in
    test_reliability.py runs on d + 1): tried from the pid on, each claimed with an exclusive lock on a file
    in the temp directory that stays held for the whole run."""
    import fcntl

    start = os.getpid() % 50
    for k in range(50):
        d = 100 + 2 * ((start + k) % 50)
        try:
            f = open(Path(tempfile.gettempdir()) / f"dmn_ros_test_domains_{d}.lock", "a")
        except OSError:
            continue
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            continue
        _DOMAIN_LOCK.append(f)
        return d
    return 100 + 2 * start


os.environ["ROS_DOMAIN_ID"] = str(_claim_ros_domain_id())
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
os.environ.setdefault("ROS_LOCALHOST_ONLY", "1")


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two train, one val and one test maze, 2 trajectories x 30 views each, 32x32."""
    from dmn_ros.worlds.cli import main as world_cli

    out = tmp_path_factory.mktemp("data") / "maze32"
    for split, n in (("train", 2), ("val", 1), ("test", 1)):
        rc = world_cli(["generate", "--domain", "maze", "--split", split, "--num-envs", str(n),
                        "--views-per-env", "60", "--image-size", "32", "--out", str(out)])
        assert rc in (0, None)
    return out


@pytest.fixture(scope="module")
def untrained(tmp_path_factory: pytest.TempPathFactory):
    """An untrained DMN (seed 0) exported and loaded back, once per test module."""
    import torch

    from dmn_ros.export import export_model, load_model
    from dmn_ros.model import DMN

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("m") / "untrained.pt"
    export_model(DMN(), path, meters_per_unit=20.0)
    return load_model(path)


@pytest.fixture(scope="module")
def ctx():
    """An rclpy context on this run's ROS domain, per module (test/ros_helpers.py)."""
    import rclpy
    from ros_helpers import init_context

    c = init_context()
    yield c
    rclpy.try_shutdown(context=c)


@pytest.fixture(scope="module")
def map_msg(untrained):
    """A small map message for :func:`node` (test/node_feed.py)."""
    from node_feed import map_message

    return map_message(untrained)


@pytest.fixture
def node(untrained, ctx, map_msg, request):
    """A LocalizationNode with the small map, global localization on, no motion gate (test/node_feed.py);
    a module may define its own ``node``."""
    from node_feed import make_node, node_name

    n = make_node(untrained, ctx, map_msg, node_name(request))
    yield n
    n.destroy_node()
