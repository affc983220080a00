"""How well an observation model ranks the true pose among random poses: a selection metric for training runs.

The training loss on random contexts (and the filter metrics) mix the model's ability to match
images with its calibration and with how often a context happens to see the query's place. The
rank of the true pose's log-likelihood among uniformly drawn poses isolates the first: 0.5 is
chance, 1.0 puts the truth above every random pose. In this project's runs, checkpoints with a
*higher* validation loss ranked the truth better (docs/RESULTS.md), so this is what chose the
shipped checkpoint.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from dmn_ros.evaluation.protocol import EpisodeSet
from dmn_ros.filter.runner import ObservationModel, encode_map
from dmn_ros.images import to_tensor


@torch.inference_mode()
def truth_rank(
    model: ObservationModel,
    episodes: EpisodeSet,
    *,
    num_contexts: int,
    num_random: int = 255,
    seed: int = 0,
    device: torch.device | str = "cpu",
    near_radius_m: tuple[float, float] | None = None,
    truth_std: tuple[float, float, float] | None = None,
    num_truth: int = 16,
) -> np.ndarray:
    """Per episode: the share of ``num_random`` uniform poses (map bounds, all yaws) that score below the truth.

    With ``near_radius_m`` the poses lie instead at a distance uniform in that range from the
    truth (any yaw): how peaked the likelihood is around the truth, not which region wins.
    With ``truth_std`` (meters, meters, degrees) ``num_truth`` poses drawn around the truth take
    its place and their shares are averaged: how wide the basin is that a filter's particles,
    which never sit exactly on the truth, must fall into.
    Uses each episode's first query frame and first ``num_contexts`` contexts; ``(E,)`` in [0, 1].
    """
    dev = torch.device(device)
    scale = episodes.scale
    rng = np.random.default_rng(seed)
    xmin, xmax, ymin, ymax = episodes.bounds
    out = np.zeros(len(episodes.episodes))
    for i, e in enumerate(episodes.episodes):
        ctx = to_tensor(e.context_images[:num_contexts])[None].to(dev)
        cpose = torch.from_numpy(scale.to_normalized(e.context_poses[:num_contexts])).float()[None].to(dev)
        pm = encode_map(model, images=ctx, poses=cpose)
        rnd = np.stack([rng.uniform(xmin, xmax, num_random), rng.uniform(ymin, ymax, num_random),
                        rng.uniform(-math.pi, math.pi, num_random)], axis=1)
        if near_radius_m is not None:
            radius = rng.uniform(near_radius_m[0], near_radius_m[1], num_random)
            angle = rng.uniform(0.0, 2 * math.pi, num_random)
            rnd[:, 0] = e.query_poses[0, 0] + radius * np.cos(angle)
            rnd[:, 1] = e.query_poses[0, 1] + radius * np.sin(angle)
        truths = e.query_poses[:1]
        if truth_std is not None:
            std = np.array([truth_std[0], truth_std[1], math.radians(truth_std[2])])
            truths = truths + rng.normal(size=(num_truth, 3)) * std
        poses = np.concatenate([truths, rnd])
        particles = torch.from_numpy(scale.to_normalized(poses)).float()[None].to(dev)
        q, hq = model.prepare_query(to_tensor(e.query_images[:1]).to(dev))
        ll = model.log_likelihood_prepared(pm.map_a, pm.map_g, pm.poses, q, hq, particles, 0)[0]
        k = len(truths)
        out[i] = float((ll[None, k:] < ll[:k, None]).float().mean())
    return out
