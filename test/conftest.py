"""Shared fixtures: a tiny rendered maze dataset, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest


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
