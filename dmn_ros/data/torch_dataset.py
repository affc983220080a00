"""PyTorch streams of episodes, from a cached dataset split or from freshly rendered worlds.

Both yield dicts with the same keys and layouts, either single episodes or, with
``batch_size``, ready-made batches. The number of contexts may be a (min, max) range;
it is drawn once per *batch* (as GQN does) so every batch stacks without padding.
Each DataLoader worker seeds its own rng from (seed, worker id), so two workers
never produce the same stream.
"""

from __future__ import annotations

import inspect
import os
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from dmn_ros.data.dataset_format import DatasetDir, EnvViews, env_name, env_seed
from dmn_ros.data.episodes import (
    ContextMode,
    Episode,
    QueryMode,
    generate_env_views,
    sample_episode_from_views,
)
from dmn_ros.images import to_tensor

__all__ = ["EpisodeDataset", "OnTheFlyEpisodes", "episode_to_tensors", "stack_episodes"]

NumContexts = int | tuple[int, int]


def episode_to_tensors(ep: Episode) -> dict[str, Any]:
    """Episode -> dict of tensors; poses stay metric float32 (the model normalizes with MetricScale)."""
    return {
        "context_images": to_tensor(ep.context_images),  # (Nc, 3, H, W)
        "context_poses": torch.from_numpy(ep.context_poses).float(),  # (Nc, 3)
        "query_images": to_tensor(ep.query_images),  # (T, 3, H, W)
        "query_poses": torch.from_numpy(ep.query_poses).float(),  # (T, 3)
        "egomotion": torch.from_numpy(ep.egomotion).float(),  # (T, 3), row 0 zero
        "egomotion_true": torch.from_numpy(ep.egomotion_true).float(),  # (T, 3)
        "area_size_m": torch.tensor(ep.area_size_m, dtype=torch.float32),  # ()
        "env_id": ep.env_id,  # str
    }


def stack_episodes(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack per-episode dicts into a batch (leading B); ``env_id`` becomes a list of str."""
    return {
        k: [d[k] for d in items] if k == "env_id" else torch.stack([d[k] for d in items]) for k in items[0]
    }


def _worker_rng(seed: int) -> tuple[np.random.Generator, int, int]:
    info = get_worker_info()
    wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
    return np.random.default_rng([int(seed), wid, 0x5EED]), wid, nw


class _EpisodeStream(IterableDataset):
    """Shared knobs and batching; subclasses supply environments.

    ``sampling`` takes the options of :func:`sample_episode_from_views` (``query_mode``, ``context_mode``,
    ``near_radius_m``, ``near_yaw_deg``, ``far_fraction``, ``odom_noise``) with its defaults.
    """

    def __init__(
        self,
        *,
        seed: int,
        num_episodes: int | None,
        num_contexts: NumContexts = 4,
        T: int = 5,
        batch_size: int | None = None,
        first_batch: int | None = None,
        **sampling: Any,
    ) -> None:
        super().__init__()
        self.first_batch = first_batch
        """None: one random stream per worker. An int: batch k (counting from this one) draws from its own
        generator seeded by ``(seed, worker, k)``, so a stream restarted at batch n continues exactly
        where an uninterrupted one would be (training resume)."""
        self.num_contexts = num_contexts
        """Contexts per episode, or (min, max) inclusive drawn per batch."""
        self.T = int(T)
        """Query steps per episode."""
        self.batch_size = batch_size
        """None: yield single episodes; else yield batches of this size."""
        if "area_size_m" in sampling:
            raise TypeError("area_size_m comes from the environments, not an argument")
        opts = inspect.signature(sample_episode_from_views).bind(None, None, num_contexts=0, T=self.T, **sampling)
        opts.apply_defaults()  # unknown options fail here, not later in a worker
        self.sample_kwargs: dict[str, Any] = {
            k: v for k, v in opts.arguments.items() if k not in ("views", "rng", "num_contexts", "area_size_m")}
        self.sample_kwargs.update(query_mode=QueryMode(self.sample_kwargs["query_mode"]),
                                  context_mode=ContextMode(self.sample_kwargs["context_mode"]),
                                  odom_noise=tuple(self.sample_kwargs["odom_noise"]))
        self.seed = int(seed)
        """Base seed; each worker derives its own stream from it."""
        self.num_episodes = num_episodes
        """Episodes (or batches, in batch mode) per worker per iteration; None = endless."""

    def _draw_nc(self, rng: np.random.Generator) -> int:
        if isinstance(self.num_contexts, int):
            return self.num_contexts
        lo, hi = self.num_contexts
        return int(rng.integers(lo, hi + 1))

    def _next_views(self, rng: np.random.Generator) -> tuple[EnvViews, float]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rng, wid, nw = _worker_rng(self.seed)
        self._start_worker(wid, nw)
        k = 0
        while self.num_episodes is None or k < self.num_episodes:
            if self.first_batch is not None:
                rng = np.random.default_rng([self.seed, wid, 0x5EED, self.first_batch + k])
            k += 1
            nc = self._draw_nc(rng)
            items = []
            for _ in range(self.batch_size or 1):
                views, area = self._next_views(rng)
                ep = sample_episode_from_views(views, rng, num_contexts=nc, area_size_m=area,
                                               **self.sample_kwargs)
                items.append(episode_to_tensors(ep))
            yield stack_episodes(items) if self.batch_size else items[0]

    def _start_worker(self, worker_id: int, num_workers: int) -> None:
        pass


class EpisodeDataset(_EpisodeStream):
    """Episodes sampled from a cached :class:`DatasetDir` split: a random environment per episode.

    ``episodes``: ``num_contexts`` (default 4), ``T`` (5), ``batch_size`` (None) and the sampling options of
    :func:`sample_episode_from_views`, with its defaults.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str,
        *,
        seed: int = 0,
        num_episodes: int | None = None,
        cache_envs: int = 512,
        **episodes: Any,
    ) -> None:
        super().__init__(seed=seed, num_episodes=num_episodes, **episodes)
        self.root = str(root)
        self.split = split
        ds = DatasetDir(root)
        self.env_list = ds.env_names(split)
        """Environment names of the split."""
        if not self.env_list:
            raise ValueError(f"{root}: split {split!r} has no environments")
        self.area_size_m = float(ds.meta.bounds[1] - ds.meta.bounds[0])
        self.cache_envs = int(cache_envs)
        self._ds: DatasetDir | None = None
        self._cache: OrderedDict[str, EnvViews] = OrderedDict()

    def _next_views(self, rng: np.random.Generator) -> tuple[EnvViews, float]:
        if self._ds is None:
            self._ds = DatasetDir(self.root)
        name = self.env_list[int(rng.integers(len(self.env_list)))]
        views = self._cache.get(name)
        if views is None:
            views = self._ds.load_env(name)
            self._cache[name] = views
            if len(self._cache) > self.cache_envs:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(name)
        return views, self.area_size_m


class OnTheFlyEpisodes(_EpisodeStream):
    """Episodes from freshly rendered worlds (no cache); same output as :class:`EpisodeDataset`.

    Each worker renders its own worlds (seeds ``env_seed(split, first_env_index + worker + k·workers)``)
    and draws ``episodes_per_world`` episodes from each before moving on. ``episodes``: as for
    :class:`EpisodeDataset`.
    """

    def __init__(
        self,
        domain: str,
        seed: int,
        *,
        split: str = "train",
        first_env_index: int = 5_000_000,
        image_size: tuple[int, int] = (32, 32),
        fov_deg: float = 90.0,
        num_trajectories: int = 4,
        steps: int = 20,
        episodes_per_world: int = 8,
        num_episodes: int | None = None,
        **episodes: Any,
    ) -> None:
        super().__init__(seed=seed, num_episodes=num_episodes, **episodes)
        self.domain, self.split, self.first_env_index = domain, split, int(first_env_index)
        self.image_size, self.fov_deg = tuple(image_size), float(fov_deg)
        self.num_trajectories, self.steps = int(num_trajectories), int(steps)
        self.episodes_per_world = int(episodes_per_world)
        self._views: EnvViews | None = None
        self._used = 0
        self._k = 0
        self._wid, self._nw = 0, 1

    def _start_worker(self, worker_id: int, num_workers: int) -> None:
        self._wid, self._nw, self._k, self._views = worker_id, num_workers, 0, None

    def _next_views(self, rng: np.random.Generator) -> tuple[EnvViews, float]:
        from dmn_ros.worlds import make_world  # lazy: importing sets up GL only where rendering happens

        if self._views is None or self._used >= self.episodes_per_world:
            idx = self.first_env_index + self._wid + self._k * self._nw
            self._k += 1
            seed = env_seed(self.split, idx)
            with make_world(self.domain, seed=seed, image_size=self.image_size, fov_deg=self.fov_deg) as w:
                self._views = generate_env_views(w, np.random.default_rng([seed, 1]),
                                                 num_trajectories=self.num_trajectories, steps=self.steps,
                                                 name=env_name(self.domain, seed))
                self._area = w.area_size_m
            self._used = 0
        self._used += 1
        return self._views, self._area
