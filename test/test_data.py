"""Data: on-disk format round trip, split disjointness, episode sampling and torch streams."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from dmn_ros.data import (
    SPLIT_SEED_OFFSETS,
    SPLITS,
    DatasetDir,
    DatasetFormatError,
    DatasetMeta,
    EnvViews,
    egomotion_from_poses,
    env_name,
    env_seed,
    generate_env_views,
    sample_episode_from_views,
)
from dmn_ros.data.torch_dataset import EpisodeDataset, OnTheFlyEpisodes
from dmn_ros.geometry import compose
from dmn_ros.worlds import make_world, smooth_trajectory


def _fake_views(name: str = "fake_00000000", *, n_traj: int = 4, steps: int = 10, seed: int = 0) -> EnvViews:
    """Views whose image encodes the row index, so episodes can be traced back to rows."""
    rng = np.random.default_rng(seed)
    n = n_traj * steps
    poses = np.c_[rng.uniform(-19, 19, (n, 2)), rng.uniform(-np.pi, np.pi, n)]
    images = np.zeros((n, 8, 8, 3), np.uint8)
    images[:, 0, 0, 0] = np.arange(n) % 256
    images[:, 0, 0, 1] = np.arange(n) // 256
    ids = np.repeat(np.arange(n_traj, dtype=np.int32), steps)
    return EnvViews(images=images, poses=poses, stamps=np.arange(n, dtype=np.float64), trajectory_ids=ids,
                    name=name)


def _rows(images: np.ndarray) -> np.ndarray:
    return images[:, 0, 0, 0].astype(int) + 256 * images[:, 0, 0, 1].astype(int)


@pytest.fixture(scope="module")
def maze_views() -> EnvViews:
    with make_world("maze", seed=env_seed("train", 0), image_size=(16, 16)) as w:
        return generate_env_views(w, np.random.default_rng(0), num_trajectories=3, steps=8,
                                  name=env_name("maze", w.seed))


def _make_dataset(root, views_by_split: dict[str, list[EnvViews]], image_size=(8, 8)) -> DatasetDir:
    ds = DatasetDir.create(root, DatasetMeta(image_size=image_size, domain="maze"))
    for split, vs in views_by_split.items():
        for v in vs:
            ds.write_env(v, split=split)
    return ds


def test_split_seeds_are_disjoint() -> None:
    n = 50_000
    seeds = {s: {env_seed(s, i) for i in range(n)} for s in SPLITS}
    for a, b in itertools.combinations(SPLITS, 2):
        assert not seeds[a] & seeds[b]
    offsets = sorted(SPLIT_SEED_OFFSETS.values())
    assert all(hi - lo >= 10_000_000 for lo, hi in itertools.pairwise(offsets))
    with pytest.raises(ValueError):
        env_seed("train", 10_000_000)  # would run into the val range
    with pytest.raises(ValueError):
        env_seed("holdout", 0)


def test_egomotion_composes_back_to_poses() -> None:
    with make_world("maze", seed=7) as w:
        poses = smooth_trajectory(w, np.random.default_rng(1), steps=40)
    noisy, exact = egomotion_from_poses(poses, rng=np.random.default_rng(0), noise_std=(0.1, 0.05))
    np.testing.assert_array_equal(exact[0], 0.0)
    np.testing.assert_array_equal(noisy[0], 0.0)
    for t in range(1, len(poses)):
        np.testing.assert_allclose(compose(poses[t - 1], exact[t]), poses[t], atol=1e-9)
    # Dead reckoning with the exact odometry reproduces the whole trajectory.
    p = poses[0]
    for t in range(1, len(poses)):
        p = compose(p, exact[t])
    np.testing.assert_allclose(p, poses[-1], atol=1e-9)
    assert not np.allclose(noisy, exact)
    with pytest.raises(ValueError):
        egomotion_from_poses(poses, noise_std=(0.1, 0.0))


def test_dataset_round_trip_atomic_and_pickle_free(tmp_path, maze_views: EnvViews) -> None:
    ds = DatasetDir.create(tmp_path / "ds", DatasetMeta(image_size=(16, 16), domain="maze"))
    ds.write_env(maze_views, split="train")
    back = DatasetDir(tmp_path / "ds")
    assert back.env_names("train") == [maze_views.name] and back.env_names("test") == []
    v = back.load_env(maze_views.name)
    for key in ("images", "poses", "stamps", "trajectory_ids"):
        np.testing.assert_array_equal(getattr(v, key), getattr(maze_views, key))
    assert v.images.dtype == np.uint8 and v.poses.dtype == np.float64 and v.trajectory_ids.dtype == np.int32
    with np.load(back.env_path(maze_views.name), allow_pickle=False) as z:
        assert sorted(z.files) == ["images", "poses", "stamps", "trajectory_ids"]
    leftovers = [p for p in (tmp_path / "ds").rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]
    assert leftovers == []
    meta = yaml.safe_load((tmp_path / "ds" / "dataset.yaml").read_text())
    assert meta["format_version"] == 1 and meta["image_size"] == [16, 16] and meta["meters_per_unit"] == 20.0
    assert meta["bounds"] == [-20.0, 20.0, -20.0, 20.0] and meta["camera"] == "eye"
    assert back.meta.metric_scale().meters_per_unit == 20.0
    # Reopening with create() keeps the contents; a conflicting image size is refused.
    assert DatasetDir.create(tmp_path / "ds", DatasetMeta(image_size=(16, 16))).env_names("train")
    with pytest.raises(DatasetFormatError):
        DatasetDir.create(tmp_path / "ds", DatasetMeta(image_size=(32, 32)))
    with pytest.raises(DatasetFormatError, match="disjoint"):
        back.add_to_split("val", [maze_views.name])


def test_failed_write_leaves_no_temp_file(tmp_path) -> None:
    ds = DatasetDir.create(tmp_path, DatasetMeta(image_size=(8, 8)))
    bad = _fake_views()
    bad.images = bad.images.astype(np.float32)
    with pytest.raises(DatasetFormatError):
        ds.write_env(bad, split="train")
    assert sorted(p.name for p in (tmp_path / "envs").iterdir()) == []


def test_segment_episode_is_a_stored_trajectory_piece() -> None:
    views = _fake_views()
    rng = np.random.default_rng(0)
    for _ in range(50):
        ep = sample_episode_from_views(views, rng, num_contexts=6, T=5, query_mode="segment")
        q, c = _rows(ep.query_images), _rows(ep.context_images)
        assert np.all(np.diff(q) == 1) and len(set(views.trajectory_ids[q])) == 1
        assert not set(q) & set(c)
        np.testing.assert_array_equal(ep.query_poses, views.poses[q])
        np.testing.assert_array_equal(ep.context_poses, views.poses[c])
        for t in range(1, 5):
            np.testing.assert_allclose(compose(ep.query_poses[t - 1], ep.egomotion[t]), ep.query_poses[t],
                                       atol=1e-9)
        assert ep.context_images.shape == (6, 8, 8, 3) and ep.egomotion.shape == (5, 3)


def test_random_order_episode_and_contexts_exclude_queries() -> None:
    views = _fake_views()
    rng = np.random.default_rng(1)
    for _ in range(50):
        ep = sample_episode_from_views(views, rng, num_contexts=10, T=5, query_mode="random_order")
        q, c = _rows(ep.query_images), _rows(ep.context_images)
        assert len(set(q)) == 5 and not set(q) & set(c) and len(set(c)) == 10


def test_near_contexts_and_far_fraction() -> None:
    views = _fake_views(n_traj=10, steps=30)
    rng = np.random.default_rng(2)
    for _ in range(30):
        ep = sample_episode_from_views(views, rng, num_contexts=4, T=3, context_mode="near",
                                       near_radius_m=6.0)
        d = np.hypot(*(ep.context_poses[:, :2] - ep.query_poses[0, :2]).T)
        all_d = np.hypot(*(views.poses[:, :2] - ep.query_poses[0, :2]).T)
        # Either all within the radius, or they are the nearest available ones.
        assert (d <= 6.0).all() or d.max() <= np.sort(all_d)[4 + 3]
        ep = sample_episode_from_views(views, rng, num_contexts=4, T=3, context_mode="near",
                                       near_radius_m=6.0, far_fraction=0.5)
        d = np.hypot(*(ep.context_poses[:, :2] - ep.query_poses[0, :2]).T)
        assert (d > 6.0).sum() >= 2


def _write_fake_split(tmp_path, n_envs: int = 4) -> DatasetDir:
    return _make_dataset(tmp_path, {"train": [_fake_views(f"fake_{i:08d}", seed=i) for i in range(n_envs)]})


def test_episode_dataset_shapes_and_batches(tmp_path) -> None:
    _write_fake_split(tmp_path)
    ds = EpisodeDataset(tmp_path, "train", num_contexts=3, T=4, num_episodes=2, seed=0)
    item = next(iter(ds))
    assert item["context_images"].shape == (3, 3, 8, 8) and item["context_images"].dtype == torch.float32
    assert 0.0 <= float(item["context_images"].min()) and float(item["query_images"].max()) <= 1.0
    assert item["query_images"].shape == (4, 3, 8, 8) and item["query_poses"].shape == (4, 3)
    assert item["egomotion"].shape == (4, 3) and float(item["egomotion"][0].abs().sum()) == 0.0
    assert item["query_poses"].dtype == torch.float32 and item["env_id"].startswith("fake_")
    batched = EpisodeDataset(tmp_path, "train", num_contexts=(1, 6), T=4, batch_size=5, num_episodes=6)
    ncs = set()
    for b in batched:
        assert b["context_images"].shape[0] == 5 and b["context_images"].shape[2:] == (3, 8, 8)
        assert b["context_poses"].shape == (5, b["context_images"].shape[1], 3)
        assert b["query_images"].shape == (5, 4, 3, 8, 8) and len(b["env_id"]) == 5
        ncs.add(b["context_images"].shape[1])
    assert len(ncs) > 1 and all(1 <= n <= 6 for n in ncs)


def test_two_workers_produce_different_episodes(tmp_path) -> None:
    _write_fake_split(tmp_path)
    ds = EpisodeDataset(tmp_path, "train", num_contexts=2, T=3, num_episodes=4, seed=3)
    loader = DataLoader(ds, batch_size=None, num_workers=2)
    items = list(loader)
    assert len(items) == 8
    keys = {tuple(it["query_poses"].flatten().tolist()) for it in items}
    assert len(keys) == 8  # no episode repeated across workers
    # Same seed, same stream: reproducible.
    loader2 = DataLoader(ds, batch_size=None, num_workers=2)
    again = [tuple(it["query_poses"].flatten().tolist()) for it in loader2]
    assert again == [tuple(it["query_poses"].flatten().tolist()) for it in items]


def test_on_the_fly_matches_cached_layout() -> None:
    ds = OnTheFlyEpisodes("maze", seed=0, image_size=(16, 16), num_trajectories=2, steps=6,
                          num_contexts=3, T=3, batch_size=2, num_episodes=1)
    b = next(iter(ds))
    assert b["context_images"].shape == (2, 3, 3, 16, 16) and b["query_images"].shape == (2, 3, 3, 16, 16)
    assert b["egomotion"].shape == (2, 3, 3) and b["env_id"][0].startswith("maze_")


@pytest.mark.parametrize("text, reason", [
    ("- image_size\n- bounds\n", "expected a mapping of fields, got a list"),
    ("format_version: [1\nimage_size: 8\n", "not valid YAML"),
    ("format_version: 1\nimage_size: [8, 8]\nmeters_per_unit: twenty\nbounds: [-1, 1, -1, 1]\n", "malformed field"),
])
def test_corrupt_dataset_yaml_is_a_format_error_naming_the_file(tmp_path, capsys, text, reason) -> None:
    from dmn_ros.data.cli import main as dataset_cli

    DatasetDir.create(tmp_path / "ds", DatasetMeta(image_size=(8, 8)))
    meta = tmp_path / "ds" / "dataset.yaml"
    meta.write_text(text)
    with pytest.raises(DatasetFormatError, match=reason) as err:
        DatasetDir(tmp_path / "ds")
    assert str(meta) in str(err.value)
    assert dataset_cli(["check", str(tmp_path / "ds")]) == 2  # dmn-dataset: one line, no traceback
    out = capsys.readouterr().err
    assert out.startswith("dmn-dataset: error: ") and str(meta) in out and reason in out
