"""Datasets for DMN: the on-disk format, episode sampling, and PyTorch streams.

One format (``dataset.yaml`` + ``envs/<name>.npz``, no pickle) serves synthetic worlds
and users' own robot logs alike (converted by ``from_bag``, ``from_folder`` and ``dmn-dataset``);
episodes follow the odometry convention of
``dmn_ros.geometry`` (``egomotion[t] = relative(pose[t-1], pose[t])``, row 0 zero).
"""

from __future__ import annotations

from dmn_ros.data.dataset_format import (
    FORMAT_VERSION,
    SPLIT_SEED_OFFSETS,
    SPLITS,
    DatasetDir,
    DatasetFormatError,
    DatasetMeta,
    EnvViews,
    env_name,
    env_seed,
)
from dmn_ros.data.episodes import (
    ContextMode,
    Episode,
    QueryMode,
    egomotion_from_poses,
    generate_env_views,
    sample_episode_from_views,
)

__all__ = [
    "FORMAT_VERSION",
    "SPLITS",
    "SPLIT_SEED_OFFSETS",
    "ContextMode",
    "ConvertOptions",
    "DatasetDir",
    "DatasetFormatError",
    "DatasetMeta",
    "EnvViews",
    "Episode",
    "EpisodeDataset",
    "OnTheFlyEpisodes",
    "QueryMode",
    "TimeRange",
    "bag_to_views",
    "egomotion_from_poses",
    "env_name",
    "env_seed",
    "folder_to_views",
    "generate_env_views",
    "sample_episode_from_views",
]


def __getattr__(name: str) -> object:
    # torch is heavy; import the torch streams only when asked for.
    if name in ("EpisodeDataset", "OnTheFlyEpisodes"):
        from dmn_ros.data import torch_dataset

        return getattr(torch_dataset, name)
    # Own-data converters pull in rosbags and OpenCV: also imported only when asked for.
    if name in ("ConvertOptions", "TimeRange", "bag_to_views"):
        from dmn_ros.data import from_bag

        return getattr(from_bag, name)
    if name == "folder_to_views":
        from dmn_ros.data import from_folder

        return getattr(from_folder, name)
    raise AttributeError(name)
