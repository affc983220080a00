"""Every node parameter with its default and meaning, in one place (nav2_amcl style).

``config/dmn_localize.yaml`` lists the same names; a test checks that every
parameter declared here appears there. ``use_sim_time`` is declared by rclpy itself.
Values outside their range (:data:`LIMITS`, :data:`CHOICES`) stop a node at start; while it runs, only the
:data:`RUNTIME_LOCALIZATION` / :data:`RUNTIME_MAPPING` ones may change (``ros2 param set``),
again within range; the nodes refuse the rest with the reason.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

from rcl_interfaces.msg import ParameterDescriptor

from dmn_ros.errors import DmnError

ParamTable = dict[str, tuple[Any, str]]

COMMON: ParamTable = {
    "model_path": ("", "exported model file; empty: dmn_ros.export.default_model_path()"),
    "device": ("auto", "torch device: auto (cuda if available), cpu or cuda"),
    "global_frame_id": ("map", "frame of the map, contexts and published poses"),
    "map_topic": ("dmn_map", "view-embedding map (PointCloud2, reliable + transient_local)"),
    "map_info_topic": ("dmn_map_info", "map metadata JSON (std_msgs/String, reliable + transient_local)"),
}

MAPPING: ParamTable = {
    **COMMON,
    "image_topic": ("context/image", "context images (sensor_msgs/Image or CompressedImage)"),
    "use_compressed": (False, "subscribe CompressedImage on image_topic + '/compressed'"),
    "pose_topic": ("context/pose", "context poses in global_frame_id"),
    "pose_type": ("PoseStamped", "PoseStamped or PoseWithCovarianceStamped"),
    "pair_tolerance": (0.05, "max |image stamp - pose stamp| (s) to pair a context"),
    "max_unpaired": (50, "unpaired messages kept per side before the oldest is dropped and counted"),
    "robot_id": ("", "prefix of the stable view ids '<robot_id>/<seq>'; empty: the namespace ('/robot2' -> "
                     "'robot2'), 'robot1' in the root namespace"),
    "map_file": ("", "safetensors map loaded on start and autosaved; empty: in memory only"),
    "autosave": (True, "save map_file atomically after every change"),
    "max_contexts": (1000, "most views kept (own + shared); beyond it spatial thinning drops views; 0: unbounded"),
    "thinning_heading_scale": (2.0, "m per rad of heading difference in the thinning distance"),
    "share_contexts": (False, "publish own contexts on shared_topic and merge the peers' (multi-robot)"),
    "shared_topic": ("/dmn_shared_contexts", "shared contexts (PointCloud2); absolute so that namespaced robots meet"),
    "share_format": ("embeddings", "what own contexts are shared as: embeddings or images"),
    "shared_history": (20, "shared messages kept for late joiners (transient_local depth)"),
    "shared_batch": (50, "most contexts per shared message"),
    "sync_window": (10.0, "s after start in which each newly discovered peer is asked for the full map"),
}

LOCALIZATION: ParamTable = {
    **COMMON,
    "odom_frame_id": ("odom", "odometry frame (REP-105)"),
    "base_frame_id": ("base_link", "robot base frame"),
    "image_topic": ("camera/image", "query camera (sensor_msgs/Image or CompressedImage)"),
    "use_compressed": (False, "subscribe CompressedImage on image_topic + '/compressed'"),
    "odom_topic": ("odom", "nav_msgs/Odometry used for egomotion between image stamps"),
    "max_particles": (2048, "particles for global localization; with adaptive_particles the upper bound"),
    "tracking_particles": (256, "particles when tracking from an initial pose; with adaptive_particles the start"),
    "adaptive_particles": (False, "KLD-adaptive particle count in [min_particles, max_particles] at each "
                                  "resampling, as nav2_amcl (Fox 2003)"),
    "min_particles": (500, "lower bound of the adaptive count (nav2_amcl); clamped to max_particles"),
    "pf_err": (0.05, "KLD epsilon: max K-L error of the sampled belief (nav2_amcl)"),
    "pf_z": (0.99, "KLD z: standard-normal quantile value in the bound, used as is (nav2_amcl)"),
    "kld_bin_xy": (0.5, "m, x-y histogram bin of the KLD bound (nav2_amcl hard-codes 0.5)"),
    "kld_bin_yaw": (math.radians(10.0), "rad, yaw histogram bin of the KLD bound (nav2_amcl: 10 deg)"),
    "update_min_d": (0.2, "translation (m) since the last update needed for a new filter update"),
    "update_min_a": (0.1, "rotation (rad) since the last update needed for a new filter update"),
    "transform_tolerance": (1.0, "s: wait for a frame's odometry, hold of the last odometry, map->odom post-dating"),
    "set_initial_pose": (False, "start tracking from initial_pose.* instead of waiting"),
    "initial_pose.x": (0.0, "m"),
    "initial_pose.y": (0.0, "m"),
    "initial_pose.yaw": (0.0, "rad"),
    "initial_pose.std_xy": (6.0, "m, std of the initial belief (paper tracking: 6 m)"),
    "initial_pose.std_yaw": (math.radians(30.0), "rad, std of the initial belief (paper: 30 deg)"),
    "global_localization_on_map": (False, "start global localization when the first map arrives"),
    "motion_noise_xy": (0.2, "m, per-step std of the particles' translation noise"),
    "motion_noise_yaw": (0.05, "rad, per-step std of the particles' rotation noise"),
    "resample_threshold": (0.5, "systematic resampling when ESS < threshold * K"),
    "nearest_contexts": (0, "attend only to the M contexts nearest each particle (0: all); for large maps"),
    "cluster_radius": (0.0, "m; 0: publish the particles' weighted mean (the paper's estimate); > 0: the mean of "
                            "the heaviest particle cluster of this radius, as nav2_amcl publishes"),
    "random_seed": (0, "seed of the filter's random generator"),
    "tf_broadcast": (True, "broadcast map->odom (needs tf2_ros importable)"),
    "process_rate": (20.0, "Hz of the worker that filters the newest frame"),
    "publish_particles": (True, "publish particle_cloud (PoseArray)"),
    "max_published_particles": (512, "particles in particle_cloud / markers (highest weights)"),
    "odom_buffer_s": (30.0, "s of odometry kept for interpolation"),
    "health.alpha_slow": (0.05, "per-update weight of the long-term observation likelihood average"),
    "health.alpha_fast": (0.5, "per-update weight of the short-term observation likelihood average"),
    "health.converged_xy": (2.0, "m, x-y particle spread below which the belief is concentrated"),
    "health.converged_yaw": (0.35, "rad, circular yaw spread below which the belief is concentrated"),
    "health.converged_updates": (3, "consecutive concentrated updates for 'converged'"),
    "health.lost_ratio": (0.05, "'lost' (ERROR) when exp(ll_fast - ll_slow) is below this"),
    "health.warmup_updates": (5, "updates after a (re)initialization before 'lost' can be declared"),
    "recovery_alpha_slow": (0.0, "nav2_amcl recovery: long-term likelihood average for random particles; 0: off"),
    "recovery_alpha_fast": (0.0, "nav2_amcl recovery: short-term likelihood average for random particles; 0: off"),
    "lost_updates_before_global": (0, "restart global localization after this many lost updates; 0: never"),
    "covariance_inflation": (0.0, "x-y variance factor of published covariances; 0: the model's metadata, else 1"),
    "diagnostics_period": (1.0, "s between /diagnostics messages while no filter update runs"),
    "max_stamp_ahead": (10.0, "s: images and odometry stamped further ahead of the node clock are dropped; 0: off"),
    "odom_jump_m": (3.0, "m between consecutive odometry messages treated as an odometry reset/jump; 0: off"),
    "time_reset_s": (1.0, "s: odometry or a frame stamped this far before the newest one (bag loop, sim restart) "
                          "resets the node's time: buffers cleared, belief kept; 0: off"),
    "initialpose_margin": (10.0, "m: initialpose farther than this outside the map's view extent is rejected; 0: off"),
    "save_pose_rate": (0.5, "Hz at which the last estimate is saved to pose_file; 0: never"),
    "pose_file": ("", "YAML file of the saved pose; empty: $ROS_HOME (~/.ros)/dmn_ros_<namespace_node>_pose.yaml"),
    "initialize_at_saved_pose": (False, "start tracking from pose_file (if valid) instead of waiting"),
}

SIM: ParamTable = {
    "global_frame_id": ("map", "frame of ground truth and contexts"),
    "odom_frame_id": ("odom", "odometry frame"),
    "base_frame_id": ("base_link", "robot frame"),
    "camera_frame_id": ("camera", "frame of the camera images"),
    "domain": ("maze", "worlds domain: maze or rooms"),
    "world_seed": (20_000_000, "world to build (test split from 20 000 000)"),
    "image_size": (32, "square image side in pixels"),
    "image_encoding": ("rgb8", "rgb8 or bgr8"),
    "rate": (2.0, "Hz of camera/odometry publishing; 0: driven by step() calls only"),
    "trajectory_steps": (400, "length of the stored trajectory the robot drives along (then reversed)"),
    "num_contexts": (32, "context image-pose pairs published for the mapping node"),
    "contexts_from": ("free_space", "free_space (random free poses) or trajectory (a second stored drive)"),
    "odom_noise_xy": (0.02, "m, per-step std of odometry translation noise"),
    "odom_noise_yaw": (0.01, "rad, per-step std of odometry rotation noise"),
    "kidnap_at_step": (0, "teleport to a random free pose > 15 m away at this frame (1-based), odometry "
                          "unaware; 0: never"),
    "publish_clock": (False, "publish /clock with simulated time (use with use_sim_time)"),
    "camera_topic": ("camera/image", "query images"),
    "odom_topic": ("odom", "nav_msgs/Odometry"),
    "ground_truth_topic": ("ground_truth", "PoseStamped truth in global_frame_id"),
    "context_image_topic": ("context/image", "context images for the mapping node"),
    "context_pose_topic": ("context/pose", "context poses for the mapping node"),
}


RUNTIME_LOCALIZATION = frozenset({
    "update_min_d", "update_min_a", "transform_tolerance", "odom_buffer_s", "motion_noise_xy", "motion_noise_yaw",
    "resample_threshold", "cluster_radius", "recovery_alpha_slow", "recovery_alpha_fast",
    "lost_updates_before_global", *(k for k in LOCALIZATION if k.startswith("health.")),
    "global_localization_on_map", "tf_broadcast", "process_rate", "publish_particles", "max_published_particles",
    "diagnostics_period", "max_stamp_ahead", "odom_jump_m", "time_reset_s", "initialpose_margin", "save_pose_rate",
})
"""localization_node parameters that may change while it runs (the rest are read at start only)."""
RUNTIME_MAPPING = frozenset({"pair_tolerance", "max_unpaired", "autosave", "shared_batch"})
"""mapping_node parameters that may change while it runs (the rest are read at start only)."""

Check = Callable[[Any], "str | None"]


def _at_least(lo: float) -> Check:
    return lambda v: None if v >= lo else f"must be >= {lo}"


def _above(lo: float) -> Check:
    return lambda v: None if v > lo else f"must be > {lo}"


def _within(lo: float, hi: float, *, open_lo: bool = False) -> Check:
    return lambda v: None if (lo < v if open_lo else lo <= v) and v <= hi else (
        f"must lie in {'(' if open_lo else '['}{lo}, {hi}]")


LIMITS: dict[str, Check] = {
    **{k: _at_least(0.0) for k in (
        "update_min_d", "update_min_a", "transform_tolerance", "motion_noise_xy", "motion_noise_yaw",
        "cluster_radius", "covariance_inflation", "diagnostics_period", "max_stamp_ahead", "odom_jump_m",
        "time_reset_s", "initialpose_margin", "save_pose_rate", "initial_pose.std_xy", "initial_pose.std_yaw",
        "lost_updates_before_global", "nearest_contexts", "max_published_particles", "health.converged_xy",
        "health.converged_yaw", "health.lost_ratio", "health.warmup_updates", "pair_tolerance", "max_contexts",
        "thinning_heading_scale", "sync_window",
        "rate", "odom_noise_xy", "odom_noise_yaw", "num_contexts", "kidnap_at_step", "world_seed")},
    **{k: _at_least(1) for k in ("max_particles", "tracking_particles", "min_particles", "health.converged_updates",
                                 "max_unpaired", "shared_history", "shared_batch", "image_size")},
    "trajectory_steps": _at_least(2),  # sim_node drives there and back: a period of 2 * (steps - 1) frames
    **{k: _above(0.0) for k in ("odom_buffer_s", "process_rate", "pf_err", "kld_bin_xy", "kld_bin_yaw")},
    "resample_threshold": _within(0.0, 1.0),
    "recovery_alpha_slow": _within(0.0, 1.0),
    "recovery_alpha_fast": _within(0.0, 1.0),
    "health.alpha_slow": _within(0.0, 1.0, open_lo=True),
    "health.alpha_fast": _within(0.0, 1.0, open_lo=True),
}
"""Range of each numeric parameter (by name, in every table that declares it); NaN and infinities never pass."""
CHOICES: dict[str, tuple[str, ...]] = {
    "image_encoding": ("rgb8", "bgr8"),
    "contexts_from": ("free_space", "trajectory"),
}
"""Allowed values of string parameters (by name, in every table that declares it)."""


def problems(values: dict[str, Any]) -> list[str]:
    """``'name = value: reason'`` for every value in ``values`` outside its range (:data:`LIMITS`, :data:`CHOICES`)."""
    out = []
    for name, v in values.items():
        if name in CHOICES and v not in CHOICES[name]:
            out.append(f"{name} = {v!r}: must be one of {', '.join(CHOICES[name])}")
            continue
        check = LIMITS.get(name)
        if check is None or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        reason = "must be finite" if not math.isfinite(v) else check(v)
        if reason:
            out.append(f"{name} = {v}: {reason}")
    return out


def check_update(current: dict[str, Any], table: ParamTable, runtime: frozenset[str],
                 changes: Iterable[Any]) -> tuple[dict[str, Any], str | None]:
    """The new values of ``changes`` (rclpy Parameters) and None, or ``({}, reason)`` to refuse them all.

    A parameter outside ``runtime`` may be "set" to its current value (re-loading the same YAML),
    not changed; names not in ``table`` (``use_sim_time``) are rclpy's own and ignored here.
    """
    new: dict[str, Any] = {}
    for prm in changes:
        if prm.name not in table:
            continue
        if prm.name not in runtime and prm.value != current.get(prm.name):
            return {}, f"{prm.name} is read at start only: restart the node to change it"
        new[prm.name] = prm.value
    bad = problems(new)
    return ({}, "; ".join(bad)) if bad else (new, None)


def declare(node: Any, table: ParamTable) -> dict[str, Any]:
    """Declare ``table`` on ``node`` and return the current values (YAML/overrides applied).

    Raises :class:`~dmn_ros.errors.DmnError` naming every value outside its range (:data:`LIMITS`, :data:`CHOICES`).
    """
    out: dict[str, Any] = {}
    for name, (default, doc) in table.items():
        node.declare_parameter(name, default, ParameterDescriptor(description=doc))
        out[name] = node.get_parameter(name).value
    bad = problems(out)
    if bad:
        raise DmnError(f"{node.get_name()}: invalid parameters: {'; '.join(bad)}")
    return out
