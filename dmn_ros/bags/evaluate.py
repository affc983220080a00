"""dmn-bag-eval: replay bags through the Localizer offline (or score a live localization_node) and report.

Offline, each camera frame of a bag goes through :class:`dmn_ros.localizer.Localizer`
exactly as ``localization_node`` would feed it: egomotion ``relative(odom(t_prev),
odom(t))`` from interpolated odometry between the stamps of two *processed* frames
(SPEC convention), frames skipped when the motion is below ``update_min_d`` /
``update_min_a``, the first frame weighed without motion, the same filter settings and
seed. No ROS is needed, and nothing waits for wall-clock time.

Metrics (one bag = one trajectory; ``t`` = processed step, 1-based as in the paper):
x-y error ``e_t = |est_xy(t) - gt_xy(t)|`` with ground truth interpolated at the
estimate's stamp; RMSE over time ``sqrt(mean_bags e_t²)``; success at step t =
share of bags with ``e_t < 8.94 m · area/40``; time to first success; per-step latency.

Health (``metrics["health"]``, docs/health.md): time to converge from a uniform start (global mode),
time to recover after a kidnapping (bags from ``dmn-bag-record --kidnap-at-step``, or ``--kidnap-stamp``),
95 % ellipse coverage and mean NEES of the published covariance, and the per-step converged / lost
flags. Recovery (``--lost-updates-before-global``, ``--recovery-alpha-slow/-fast``) can be switched on
to compare.
"""

from __future__ import annotations

import argparse
import enum
import json
import math
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from dmn_ros.bags.errors import BagError
from dmn_ros.bags.reader import BagData, PoseStream, find_bags, load_bag
from dmn_ros.bags.record import KIDNAP_STAMP_KEY
from dmn_ros.bags.topics import TopicNames, add_topic_options, topics_from_args
from dmn_ros.errors import DmnError, console_main
from dmn_ros.evaluation.health_metrics import (
    COVERAGE_FROM_INDEX,
    ellipse_coverage,
    time_to_converge,
    time_to_recover,
)
from dmn_ros.evaluation.protocol import rmse, success_rate, success_threshold_m
from dmn_ros.files import atomic_write_text
from dmn_ros.ros.transforms import OdometryBuffer, interpolate_pose

__all__ = [
    "EvalOptions",
    "MapSource",
    "Mode",
    "StepTrace",
    "evaluate_bag",
    "evaluate_paths",
    "health_summary",
    "main",
    "replay",
    "score",
]

# Defaults of localization_node (dmn_ros/ros/params.py; a test checks they agree).
NODE_UPDATE_MIN_D = 0.2
NODE_UPDATE_MIN_A = 0.1
NODE_TRANSFORM_TOLERANCE = 1.0
NODE_MOTION_NOISE_XY = 0.2
NODE_MOTION_NOISE_YAW = 0.05
NODE_RESAMPLE_THRESHOLD = 0.5
DEFAULT_AREA_M = 40.0


class MapSource(enum.Enum):
    """Where the evaluation's view-embedding map comes from."""

    BAG = "bag"
    """Context image-pose pairs on the bag's context topics (what mapping_node would build)."""
    FILE = "file"
    """A saved map file (safetensors, :class:`dmn_ros.maps.ViewMap`)."""
    PATH = "path"
    """Camera frames along the ground-truth path, one every ``context_every_m`` meters travelled."""


class Mode(enum.Enum):
    GLOBAL = "global"
    """Uniform prior over the map's extent + margin, all yaws (the node's reinitialize_global_localization)."""
    TRACKING = "tracking"
    """Gaussian prior around the first ground-truth pose (the node's initialpose)."""


@dataclass(frozen=True)
class EvalOptions:
    """Everything that decides an evaluation's numbers."""

    topics: TopicNames = field(default_factory=TopicNames)
    map_source: MapSource = MapSource.BAG
    map_file: str | None = None
    context_every_m: float = 5.0
    model_path: str | None = None
    """Exported model (None: the shipped ``models/dmn_maze32.pt``)."""
    mode: Mode = Mode.GLOBAL
    particles: int | None = None
    """K (None: 2048 global, 256 tracking, as the node)."""
    seed: int = 0
    """The filter's seed (the node's ``random_seed``)."""
    update_min_d: float = NODE_UPDATE_MIN_D
    update_min_a: float = NODE_UPDATE_MIN_A
    motion_noise_xy: float = NODE_MOTION_NOISE_XY
    motion_noise_yaw: float = NODE_MOTION_NOISE_YAW
    resample_threshold: float = NODE_RESAMPLE_THRESHOLD
    tracking_std_xy: float = 6.0
    tracking_std_yaw: float = math.radians(30.0)
    success_steps: tuple[int, ...] = (1, 5)
    """Steps (1-based processed frames) at which success is reported."""
    area_size_m: float | None = None
    """For the success threshold (None: the bag's ``dmn_ros.area_size_m`` custom data, else 40 m)."""
    estimate_topic: str | None = None
    """Score this recorded pose topic instead of running the filter (e.g. ``/ground_truth``, ``/amcl_pose``)."""
    max_frames: int | None = None
    only_stamps: tuple[float, ...] | None = None
    """Process only the frames with these stamps (e.g. those a live node processed), to compare like with like."""
    device: str = "cpu"
    plots: bool = True
    progress: bool = True
    lost_updates_before_global: int = 0
    """The Localizer's global restart after this many lost updates (0: off, the node's default)."""
    recovery_alpha_slow: float = 0.0
    """AMCL-style injection (with ``recovery_alpha_fast``; both > 0 to switch it on)."""
    recovery_alpha_fast: float = 0.0
    kidnap_stamp: float | None = None
    """Stamp (s) of the first frame after a kidnapping (None: the bag's ``dmn_ros.kidnap_stamp`` custom data)."""
    recover_hold: int = 3
    """Recovered = the error stays under the success threshold for this many consecutive steps."""


@dataclass
class StepTrace:
    """The estimates of one run, one row per processed frame."""

    stamps: list[float] = field(default_factory=list)
    poses: list[np.ndarray] = field(default_factory=list)
    latency_ms: list[float] = field(default_factory=list)
    spread_m: list[float] = field(default_factory=list)
    frame_index: list[int] = field(default_factory=list)
    covariances: list[np.ndarray] = field(default_factory=list)
    """Published ``(3, 3)`` covariances (with the Localizer's inflation), one per step; empty when scored."""
    converged: list[bool] = field(default_factory=list)
    lost: list[bool] = field(default_factory=list)
    likelihood_ratio: list[float] = field(default_factory=list)
    recovery: list[str] = field(default_factory=list)
    recoveries: dict[str, int] | None = None
    """The Localizer's recovery counters at the end of the run."""
    skipped: dict[str, int] = field(default_factory=lambda: {"small_motion": 0, "no_odom": 0, "bad_image": 0})

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self.stamps, dtype=np.float64), np.asarray(self.poses, dtype=np.float64).reshape(-1, 3)


# ---- scoring (shared by offline and live) ---------------------------------------------------
def truth_at(gt: PoseStream, stamps: np.ndarray, *, tolerance_s: float = 0.05) -> np.ndarray:
    """Ground truth interpolated at ``stamps`` ``(N, 3)``; NaN rows where no truth brackets the stamp."""
    out = np.full((len(stamps), 3), np.nan)
    if not len(gt):
        return out
    for i, t in enumerate(stamps):
        j = int(np.searchsorted(gt.stamps, t))
        if j < len(gt) and abs(gt.stamps[j] - t) <= 1e-9:
            out[i] = gt.poses[j]
        elif 0 < j < len(gt):
            out[i] = interpolate_pose(gt.stamps[j - 1], gt.poses[j - 1], gt.stamps[j], gt.poses[j], t)
        elif j == 0 and gt.stamps[0] - t <= tolerance_s:
            out[i] = gt.poses[0]
        elif j == len(gt) and t - gt.stamps[-1] <= tolerance_s:
            out[i] = gt.poses[-1]
    return out


def score(
    stamps: np.ndarray,
    poses: np.ndarray,
    gt: PoseStream,
    *,
    area_size_m: float,
    success_steps: tuple[int, ...] = (1, 5),
    latency_ms: list[float] | None = None,
) -> dict[str, Any]:
    """Per-step x-y errors of ``poses`` at ``stamps`` against ``gt``, and the one-trajectory metrics."""
    stamps = np.asarray(stamps, dtype=np.float64)
    poses = np.asarray(poses, dtype=np.float64).reshape(-1, 3)
    truth = truth_at(gt, stamps)
    err = np.hypot(poses[:, 0] - truth[:, 0], poses[:, 1] - truth[:, 1])
    yaw_err = np.abs(np.angle(np.exp(1j * (poses[:, 2] - truth[:, 2]))))
    thr = success_threshold_m(area_size_m)
    ok = np.isfinite(err)
    t0 = float(stamps[0]) if len(stamps) else 0.0
    first = next((i for i in range(len(err)) if ok[i] and err[i] < thr), None)
    lat = np.asarray(latency_ms or [], dtype=np.float64)
    return {
        "steps": len(stamps),
        "steps_with_truth": int(ok.sum()),
        "area_size_m": float(area_size_m),
        "success_threshold_m": thr,
        "rmse_m": float(np.sqrt(np.mean(err[ok] ** 2))) if ok.any() else None,
        "final_error_m": float(err[ok][-1]) if ok.any() else None,
        "errors_m": [None if not np.isfinite(e) else float(e) for e in err],
        "yaw_errors_rad": [None if not np.isfinite(e) else float(e) for e in yaw_err],
        "times_s": [float(t - t0) for t in stamps],
        "success_at_step": {str(s): (bool(err[s - 1] < thr) if s <= len(err) and ok[s - 1] else None)
                            for s in success_steps},
        "first_success_step": None if first is None else first + 1,
        "time_to_first_success_s": None if first is None else float(stamps[first] - t0),
        "latency_ms": None if not lat.size else {
            "mean": float(lat.mean()), "p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95)),
            "max": float(lat.max())},
    }


def _finite(v: float) -> float | None:
    return float(v) if v is not None and math.isfinite(v) else None


def health_summary(
    stamps: np.ndarray,
    poses: np.ndarray,
    gt: PoseStream,
    trace: StepTrace,
    *,
    area_size_m: float,
    kidnap_stamp: float | None,
    global_start: bool,
    recover_hold: int = 3,
) -> dict[str, Any]:
    """Time to converge / recover, ellipse coverage and NEES of one run (docs/health.md, "dmn-bag-eval").

    Keys that need the filter's flags or covariance (converged, lost, coverage) are None for a scored
    pose topic; ``time_to_recover_*`` only needs the errors. Coverage covers processed steps from index
    ``COVERAGE_FROM_INDEX`` on with truth, leaving out the kidnapped stretch (kidnap step until recovered,
    or the rest of the run): it measures calibration while localized, not the kidnapping itself.
    """
    stamps = np.asarray(stamps, dtype=np.float64)
    poses = np.asarray(poses, dtype=np.float64).reshape(-1, 3)
    truth = truth_at(gt, stamps)
    err = np.hypot(poses[:, 0] - truth[:, 0], poses[:, 1] - truth[:, 1])
    thr = success_threshold_m(area_size_m)
    n = len(stamps)
    has_flags = len(trace.converged) == n and n > 0
    t0 = float(stamps[0]) if n else 0.0
    k = None  # 0-based step of the first processed frame at or after the kidnapping
    if kidnap_stamp is not None:
        after = np.flatnonzero(stamps >= kidnap_stamp - 1e-6)
        k = int(after[0]) if after.size else None
    ttr = None if k is None else time_to_recover(err, kidnap_step=k, threshold_m=thr, hold=recover_hold)
    conv_idx = None
    if has_flags and global_start:
        end = n if k is None else k
        conv_idx = time_to_converge(trace.converged[:end], err[:end], threshold_m=thr)
    coverage = nees_mean = None
    used = 0
    if len(trace.covariances) == n and n > 0:
        keep = np.isfinite(truth).all(axis=1)
        keep[:COVERAGE_FROM_INDEX] = False
        if k is not None:
            keep[k : n if ttr is None else k + ttr] = False
        used = int(keep.sum())
        cov = np.asarray(trace.covariances, dtype=np.float64)[keep][:, :2, :2]
        c, m = ellipse_coverage(poses[keep, :2] - truth[keep, :2], cov)
        coverage, nees_mean = _finite(c), _finite(m)
    lost = np.asarray(trace.lost, dtype=bool) if has_flags else None
    return {
        "kidnap_stamp_s": kidnap_stamp,
        "kidnap_step": None if k is None else k + 1,
        "recovered": None if k is None else ttr is not None,
        "time_to_recover_steps": ttr,
        "time_to_recover_s": None if ttr is None or k is None else float(stamps[k + ttr] - kidnap_stamp),
        "recover_hold": recover_hold,
        "converged_at_step": None if conv_idx is None else conv_idx + 1,
        "time_to_converge_s": None if conv_idx is None else float(stamps[conv_idx] - t0),
        "coverage_95": coverage,
        "mean_nees": nees_mean,
        "coverage_steps": used,
        "lost_updates": None if lost is None else int(lost.sum()),
        "lost_before_kidnap": None if lost is None else int(lost[: n if k is None else k].sum()),
        "recoveries": trace.recoveries,
        "converged": [bool(v) for v in trace.converged] if has_flags else None,
        "lost": [bool(v) for v in trace.lost] if has_flags else None,
        "likelihood_ratio": [_finite(v) for v in trace.likelihood_ratio] if has_flags else None,
        "recovery": list(trace.recovery) if has_flags else None,
    }


def _mean(values: list[Any]) -> float | None:
    v = [float(x) for x in values if x is not None]
    return float(np.mean(v)) if v else None


def aggregate_health(ok: list[dict[str, Any]]) -> dict[str, Any]:
    """Across bags: mean coverage / NEES, how many converged and recovered, and their mean times."""
    hs = [r["metrics"]["health"] for r in ok if r["metrics"].get("health")]
    conv_runs = [h for h in hs if h["converged"] is not None]
    kid = [h for h in hs if h["kidnap_step"] is not None]
    return {
        "coverage_95_mean": _mean([h["coverage_95"] for h in hs]),
        "mean_nees_mean": _mean([h["mean_nees"] for h in hs]),
        "runs_with_flags": len(conv_runs),
        "converged_runs": sum(h["converged_at_step"] is not None for h in conv_runs),
        "converged_at_step_mean": _mean([h["converged_at_step"] for h in conv_runs]),
        "kidnapped_bags": len(kid),
        "recovered_bags": sum(bool(h["recovered"]) for h in kid),
        "time_to_recover_steps_mean": _mean([h["time_to_recover_steps"] for h in kid]),
        "lost_rate_before_kidnap": _mean([float(h["lost_before_kidnap"] > 0) for h in conv_runs]),
    }


def aggregate(results: list[dict[str, Any]], success_steps: tuple[int, ...]) -> dict[str, Any]:
    """Across bags: RMSE over time ``sqrt(mean_bags e_t²)`` and success rates at the given steps."""
    ok = [r for r in results if r.get("metrics")]
    if not ok:
        return {"bags": len(results), "bags_scored": 0}
    T = min(len(r["metrics"]["errors_m"]) for r in ok)
    E = np.array([[np.nan if e is None else e for e in r["metrics"]["errors_m"][:T]] for r in ok], dtype=float)
    thr = ok[0]["metrics"]["success_threshold_m"]
    out: dict[str, Any] = {
        "bags": len(results),
        "bags_scored": len(ok),
        "bags_failed": len(results) - len(ok),
        "common_steps": T,
        "formula": "rmse_t = sqrt(mean over bags of e_t^2); success_t = share of bags with e_t < threshold",
        "success_threshold_m": thr,
        "rmse_over_time_m": [float(v) for v in rmse(E)] if T else [],
        "rmse_all_steps_m": float(np.sqrt(np.nanmean(np.concatenate(
            [np.square([e for e in r["metrics"]["errors_m"] if e is not None]) for r in ok])))),
        "success_rate": {str(s): float(success_rate(E[:, s - 1 : s], thr)[0]) for s in success_steps if s <= T},
    }
    lat = [r["metrics"]["latency_ms"]["mean"] for r in ok if r["metrics"].get("latency_ms")]
    if lat:
        out["latency_ms_mean"] = float(np.mean(lat))
    if any(r["metrics"].get("health") for r in ok):
        out["health"] = aggregate_health(ok)
    return out


# ---- offline replay -------------------------------------------------------------------------
def build_map(data: BagData, model: Any, opts: EvalOptions, skipped: dict[str, int] | None = None) -> Any:
    """The view-embedding map for ``opts.map_source`` (contexts embedded with the model's CNN1).

    With ``--map-source path`` an undecodable frame is not taken as a context (the next decodable one is);
    each such frame is counted in ``skipped["bad_context_image"]``.
    """
    from dmn_ros.images import ImageDecodeError
    from dmn_ros.localizer import build_map as build_view_map
    from dmn_ros.maps import ViewMap

    if opts.map_source == MapSource.FILE:
        if not opts.map_file:
            raise BagError("--map-source file needs --map-file")
        return ViewMap.load(opts.map_file, expected_fingerprint=model.info.fingerprint)
    if opts.map_source == MapSource.BAG:
        stamps = [c[0] for c in data.contexts]
        images = [c[1] for c in data.contexts]
        poses = np.stack([c[2] for c in data.contexts])
    else:
        if data.ground_truth is None or not len(data.ground_truth):
            raise BagError(f"{data.path}: --map-source path needs ground truth", path=data.path)
        truth = truth_at(data.ground_truth, data.frame_stamps)
        pick, images, travelled, last = [], [], 0.0, None
        for i, p in enumerate(truth):
            if not np.isfinite(p).all():
                continue
            if last is not None:
                travelled += float(np.hypot(*(p[:2] - last[:2])))
            last = p
            if not pick or travelled >= opts.context_every_m:
                try:
                    images.append(data.image(i))
                except ImageDecodeError:  # replay counts the same frame as a bad_image drop
                    if skipped is not None:
                        skipped["bad_context_image"] = skipped.get("bad_context_image", 0) + 1
                    continue
                pick.append(i)
                travelled = 0.0
        stamps = [float(data.frame_stamps[i]) for i in pick]
        poses = truth[pick]
    return build_view_map(model, images, poses, ids=[f"bag/{i:06d}@{s:.3f}" for i, s in enumerate(stamps)])


def make_localizer(model: Any, view_map: Any, data: BagData, opts: EvalOptions) -> Any:
    """A Localizer configured and initialized as the node would be (same seed, K, noise, prior)."""
    from dmn_ros.localizer import Localizer, LocalizerConfig

    k = opts.particles
    cfg = LocalizerConfig(
        max_particles=int(k or 2048), tracking_particles=int(k or 256), motion_noise_xy_m=opts.motion_noise_xy,
        motion_noise_yaw_rad=opts.motion_noise_yaw, resample_threshold=opts.resample_threshold, device=opts.device,
        lost_updates_before_global=opts.lost_updates_before_global, recovery_alpha_slow=opts.recovery_alpha_slow,
        recovery_alpha_fast=opts.recovery_alpha_fast)
    loc = Localizer(model, config=cfg, seed=opts.seed)
    loc.set_map(view_map)
    if opts.mode == Mode.GLOBAL:
        loc.init_global()
    else:
        if data.ground_truth is None or not len(data.frame_stamps):
            raise BagError(f"{data.path}: tracking needs ground truth for the initial pose", path=data.path)
        mean = initial_pose(data.ground_truth, float(data.frame_stamps[0]))
        loc.init_pose(mean, tracking_cov(opts))
    return loc


def initial_pose(gt: PoseStream, stamp: float) -> np.ndarray:
    p = truth_at(gt, np.array([stamp]), tolerance_s=1.0)[0]
    if not np.isfinite(p).all():
        raise BagError(f"no ground truth near the first frame ({stamp:.3f} s) for the initial pose")
    return p


def tracking_cov(opts: EvalOptions) -> np.ndarray:
    return np.diag([opts.tracking_std_xy**2, opts.tracking_std_xy**2, opts.tracking_std_yaw**2])


def replay(data: BagData, localizer: Any, opts: EvalOptions) -> StepTrace:
    """Feed the bag's frames to ``localizer`` with the node's frame-selection and egomotion rules."""
    from tqdm import tqdm

    from dmn_ros.images import ImageDecodeError
    from dmn_ros.localizer import DegenerateUpdateError

    odom = None
    if data.odom is not None and len(data.odom):
        odom = OdometryBuffer(max_age_s=math.inf, tolerance_s=NODE_TRANSFORM_TOLERANCE)
        for t, p in zip(data.odom.stamps, data.odom.poses, strict=True):
            odom.add(float(t), p)
    trace = StepTrace()
    wanted = None if opts.only_stamps is None else np.asarray(opts.only_stamps, dtype=np.float64)
    last: float | None = None
    n = len(data.frames) if opts.max_frames is None else min(opts.max_frames, len(data.frames))
    bar = tqdm(range(n), desc=data.path.name, unit="frame", disable=not opts.progress, leave=False, file=sys.stderr)
    for i in bar:
        stamp = float(data.frame_stamps[i])
        if wanted is not None and not np.any(np.abs(wanted - stamp) < 1e-6):
            trace.skipped["not_selected"] = trace.skipped.get("not_selected", 0) + 1
            continue
        delta = None
        if last is not None and odom is not None:
            delta = odom.egomotion(last, stamp)
            if delta is None:
                trace.skipped["no_odom"] += 1
                continue
            if math.hypot(delta[0], delta[1]) < opts.update_min_d and abs(delta[2]) < opts.update_min_a:
                trace.skipped["small_motion"] += 1
                continue
        try:
            rgb = data.image(i)
        except ImageDecodeError:
            trace.skipped["bad_image"] += 1
            continue
        try:
            est = localizer.step(rgb, delta)
        except DegenerateUpdateError:  # the node counts it (step_errors) and goes on; the belief is unchanged
            trace.skipped["degenerate_update"] = trace.skipped.get("degenerate_update", 0) + 1
            continue
        last = stamp
        trace.stamps.append(stamp)
        trace.poses.append(est.mean)
        trace.latency_ms.append(est.latency_ms)
        trace.spread_m.append(est.spread)
        trace.frame_index.append(i)
        trace.covariances.append(np.asarray(est.covariance, dtype=np.float64))
        h = est.health
        trace.converged.append(bool(h.converged) if h is not None else False)
        trace.lost.append(bool(h.lost) if h is not None else False)
        trace.likelihood_ratio.append(float(h.likelihood_ratio) if h is not None else math.nan)
        trace.recovery.append(est.recovery)
    bar.close()
    trace.recoveries = dict(getattr(localizer, "recoveries", {}) or {})
    return trace


def _area(data: BagData | None, opts: EvalOptions) -> float:
    if opts.area_size_m:
        return float(opts.area_size_m)
    if data is not None and data.area_size_m:
        return float(data.area_size_m)
    return DEFAULT_AREA_M


def evaluate_bag(bag: str | Path, opts: EvalOptions, *, out_dir: str | Path | None = None,
                 model: Any = None) -> dict[str, Any]:
    """Evaluate one bag; writes TUM files, plots and ``summary.json`` into ``out_dir`` when given."""
    bag = Path(bag)
    scoring_only = opts.estimate_topic is not None
    data = load_bag(bag, topics=opts.topics, need_contexts=(not scoring_only and opts.map_source == MapSource.BAG),
                    need_odom=not scoring_only, need_camera=not scoring_only, estimate_topic=opts.estimate_topic)
    contexts = np.zeros((0, 3))
    if scoring_only:
        assert data.estimate is not None
        stamps, poses = data.estimate.stamps, data.estimate.poses
        if opts.max_frames is not None:
            stamps, poses = stamps[: opts.max_frames], poses[: opts.max_frames]
        trace = StepTrace(stamps=list(stamps), poses=list(poses))
    else:
        if model is None:
            from dmn_ros.export import default_model_path, load_model

            model = load_model(opts.model_path or default_model_path(), device=opts.device)
        map_skipped: dict[str, int] = {}
        vm = build_map(data, model, opts, map_skipped)
        contexts = vm.poses.copy()
        loc = make_localizer(model, vm, data, opts)
        trace = replay(data, loc, opts)
        trace.skipped.update(map_skipped)
    stamps, poses = trace.arrays()
    assert data.ground_truth is not None
    metrics = score(stamps, poses, data.ground_truth, area_size_m=_area(data, opts),
                    success_steps=opts.success_steps, latency_ms=trace.latency_ms)
    metrics["health"] = health_summary(
        stamps, poses, data.ground_truth, trace, area_size_m=_area(data, opts), kidnap_stamp=kidnap_stamp(data, opts),
        global_start=not scoring_only and opts.mode == Mode.GLOBAL, recover_hold=opts.recover_hold)
    result: dict[str, Any] = {
        "bag": str(bag),
        "partial": data.truncated is not None,
        "truncated": data.truncated,
        "frames_in_bag": len(data.frames),
        "frames_processed": len(trace.stamps),
        "frame_indices": trace.frame_index,
        "skipped": trace.skipped,
        "contexts": len(contexts),
        "world": data.custom_data.get("dmn_ros.world"),
        "metrics": metrics,
    }
    if model is not None:  # which weights, trained for which kind of world, produced these figures
        from dmn_ros.export import training_domain

        result["model"] = {"path": model.path, "fingerprint": model.info.fingerprint,
                           "training_domain": training_domain(model.info) or None}
    if out_dir is not None:
        write_outputs(Path(out_dir), stamps=stamps, poses=poses, gt=data.ground_truth, contexts=contexts,
                      result=result, opts=opts)
    return result


def kidnap_stamp(data: BagData, opts: EvalOptions) -> float | None:
    """``--kidnap-stamp`` if given, else the bag's ``dmn_ros.kidnap_stamp`` custom data (dmn-bag-record)."""
    if opts.kidnap_stamp is not None:
        return float(opts.kidnap_stamp)
    v = data.custom_data.get(KIDNAP_STAMP_KEY)
    try:
        return float(v) if v else None
    except ValueError:
        return None


def options_json(opts: EvalOptions) -> dict[str, Any]:
    d = asdict(opts)
    d["map_source"], d["mode"] = opts.map_source.value, opts.mode.value
    d["tracking_std_yaw_deg"] = math.degrees(d.pop("tracking_std_yaw"))
    return d


def write_outputs(out: Path, *, stamps: np.ndarray, poses: np.ndarray, gt: PoseStream, contexts: np.ndarray,
                  result: dict[str, Any], opts: EvalOptions) -> None:
    from dmn_ros.bags.plots import plot_error, plot_trajectory
    from dmn_ros.bags.tum import write_tum

    out.mkdir(parents=True, exist_ok=True)
    truth = truth_at(gt, stamps)
    ok = np.isfinite(truth).all(axis=1)
    write_tum(out / "estimate.tum", stamps, poses)
    write_tum(out / "ground_truth.tum", stamps[ok], truth[ok])
    files = {"estimate_tum": "estimate.tum", "ground_truth_tum": "ground_truth.tum"}
    if opts.plots:
        m = result["metrics"]
        title = f"{Path(result['bag']).name}: RMSE {m['rmse_m'] or float('nan'):.2f} m over {m['steps']} steps"
        plot_trajectory(out / "trajectory.png", estimate=poses, truth=gt.poses, contexts=contexts, title=title)
        errs = np.array([np.nan if e is None else e for e in m["errors_m"]])
        plot_error(out / "error.png", times=np.asarray(m["times_s"]), errors=errs,
                   threshold_m=m["success_threshold_m"], title=title)
        files.update(trajectory_png="trajectory.png", error_png="error.png")
    result["files"] = files
    _write_json(out / "summary.json", {**result, "options": options_json(opts)})


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str))


def _safe_name(bag: Path, root: Path) -> str:
    rel = bag.relative_to(root) if bag != root and root in bag.parents else Path(bag.name)
    return "_".join(rel.parts) or bag.name


def evaluate_paths(paths: list[str | Path], opts: EvalOptions, *, out_dir: str | Path) -> dict[str, Any]:
    """Evaluate every bag under ``paths``; each bag's outputs are written as soon as it is done, and a bag
    that fails (any :class:`~dmn_ros.errors.DmnError`) is recorded with its error while the others go on.
    Writes ``summary.json`` at the end. A model that cannot be loaded raises ``ModelLoadError``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bags: list[tuple[Path, Path]] = []
    results: list[dict[str, Any]] = []
    for p in paths:
        try:
            bags += [(b, Path(p)) for b in find_bags(p)]
        except BagError as exc:
            results.append({"bag": str(p), "error": type(exc).__name__, "message": str(exc)})
    model = None
    if opts.estimate_topic is None and bags:
        from dmn_ros.export import default_model_path, load_model

        model = load_model(opts.model_path or default_model_path(), device=opts.device)
    single = len(bags) == 1 and not results
    for bag, root in bags:
        target = out if single else out / _safe_name(bag, root)
        try:
            results.append(evaluate_bag(bag, opts, out_dir=target, model=model))
        except DmnError as exc:  # a bad bag, a map from other weights, an empty map: this bag's failure
            res = {"bag": str(bag), "error": type(exc).__name__, "message": str(exc)}
            results.append(res)
            target.mkdir(parents=True, exist_ok=True)
            _write_json(target / "summary.json", {**res, "options": options_json(opts)})
    summary = {"options": options_json(opts), "aggregate": aggregate(results, opts.success_steps),
               "bags": [{k: v for k, v in r.items() if k not in ("frame_indices",)} for r in results]}
    if not single:
        _write_json(out / "summary.json", summary)
    return summary


def format_table(summary: dict[str, Any]) -> str:
    """One row per bag plus the aggregate, for the terminal."""
    steps = summary["options"]["success_steps"]
    head = f"{'bag':<34} {'steps':>5} {'RMSE m':>7} {'final m':>7} " + " ".join(
        f"{'ok@' + str(s):>5}" for s in steps) + f" {'t1st s':>6} {'lat ms':>7} {'conv@':>5} {'recov':>5} " \
        f"{'cov95':>5} {'NEES':>7}  note"
    rows = [head, "-" * len(head)]
    for r in summary["bags"]:
        name = Path(r["bag"]).name[:34]
        if "error" in r:
            rows.append(f"{name:<34} {'-':>5} {'-':>7} {'-':>7} " + " ".join(f"{'-':>5}" for _ in steps)
                        + f" {'-':>6} {'-':>7} {'-':>5} {'-':>5} {'-':>5} {'-':>7}  {r['error']}: "
                          f"{r['message'][:120]}")
            continue
        m = r["metrics"]

        def f(v: Any, fmt: str = ".2f") -> str:
            return "-" if v is None else format(v, fmt)

        flags = [m["success_at_step"][str(s)] for s in steps]
        ok = " ".join(f"{'-' if v is None else ('yes' if v else 'no'):>5}" for v in flags)
        lat = m["latency_ms"]["mean"] if m.get("latency_ms") else None
        note = "partial (truncated)" if r.get("partial") else ""
        h = m.get("health") or {}
        recov = "-" if h.get("kidnap_step") is None else (
            "never" if h.get("time_to_recover_steps") is None else str(h["time_to_recover_steps"]))
        rows.append(f"{name:<34} {m['steps']:>5} {f(m['rmse_m']):>7} {f(m['final_error_m']):>7} {ok} "
                    f"{f(m['time_to_first_success_s'], '.1f'):>6} {f(lat, '.1f'):>7} "
                    f"{f(h.get('converged_at_step'), 'd'):>5} {recov:>5} {f(h.get('coverage_95')):>5} "
                    f"{f(h.get('mean_nees'), '.3g'):>7}  {note}")
    a = summary["aggregate"]
    if a.get("bags_scored"):
        rates = ", ".join(f"t={s}: {v:.0%}" for s, v in a["success_rate"].items())
        rows.append("-" * len(head))
        rows.append(f"{a['bags_scored']}/{a['bags']} bags scored; RMSE all steps {a['rmse_all_steps_m']:.2f} m; "
                    f"success ({rates}) with error < {a['success_threshold_m']:.2f} m")
        h = a.get("health")
        if h:
            def g(v: Any, fmt: str = ".2f") -> str:
                return "-" if v is None else format(v, fmt)

            rows.append(f"health: converged {h['converged_runs']}/{h['runs_with_flags']} runs (mean step "
                        f"{g(h['converged_at_step_mean'], '.1f')}); recovered {h['recovered_bags']}/"
                        f"{h['kidnapped_bags']} kidnapped bags (mean {g(h['time_to_recover_steps_mean'], '.1f')} "
                        f"steps); 95% coverage {g(h['coverage_95_mean'])}, mean NEES {g(h['mean_nees_mean'], '.3g')}")
    rows.append("conv@ = step converged and right (global); recov = steps from the kidnapping until right; "
                f"cov95/NEES over steps >= {COVERAGE_FROM_INDEX + 1} (docs/health.md)")
    return "\n".join(rows)


def success_steps(text: str) -> tuple[int, ...]:
    """``--success-steps``: comma-separated 1-based steps (argparse reports a ``ValueError`` with the usage)."""
    steps = tuple(int(s) for s in text.split(",") if s.strip())
    if not steps or min(steps) < 1:
        raise ValueError(text)
    return steps


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dmn-bag-eval", description=__doc__.splitlines()[0])
    ap.add_argument("bags", nargs="*", help="bag directories, .mcap/.db3 files, or directories of bags")
    ap.add_argument("--out", default="out/bag_eval", help="output directory (default: out/bag_eval)")
    ap.add_argument("--model", default=None, help="exported model (default: shipped models/dmn_maze32.pt)")
    ap.add_argument("--map-source", choices=[m.value for m in MapSource], default="bag")
    ap.add_argument("--map-file", default=None, help="saved map (with --map-source file)")
    ap.add_argument("--context-every", type=float, default=5.0, help="meters between contexts (--map-source path)")
    ap.add_argument("--mode", choices=[m.value for m in Mode], default="global")
    ap.add_argument("-k", "--particles", type=int, default=None, help="K (default 2048 global, 256 tracking)")
    ap.add_argument("--seed", type=int, default=0, help="filter seed (the node's random_seed)")
    ap.add_argument("--update-min-d", type=float, default=NODE_UPDATE_MIN_D)
    ap.add_argument("--update-min-a", type=float, default=NODE_UPDATE_MIN_A)
    ap.add_argument("--success-steps", type=success_steps, default=(1, 5),
                    help="comma-separated steps (1-based) for success rates")
    ap.add_argument("--area-size", type=float, default=None, help="area side (m) for the success threshold")
    ap.add_argument("--max-frames", type=int, default=None)
    ap.add_argument("--estimate-topic", default=None,
                    help="score this recorded pose topic instead of running the filter")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--lost-updates-before-global", type=int, default=0,
                    help="restart global localization after this many lost updates (0: off, the node's default)")
    ap.add_argument("--recovery-alpha-slow", type=float, default=0.0, help="AMCL injection (0: off; e.g. 0.001)")
    ap.add_argument("--recovery-alpha-fast", type=float, default=0.0, help="AMCL injection (0: off; e.g. 0.1)")
    ap.add_argument("--kidnap-stamp", type=float, default=None,
                    help="stamp (s) of the first frame after a kidnapping (default: the bag's dmn_ros.kidnap_stamp)")
    ap.add_argument("--recover-hold", type=int, default=3,
                    help="recovered = error under the success threshold for this many consecutive steps")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    add_topic_options(ap)
    ap.add_argument("--live", action="store_true",
                    help="score a running localization_node: listen to --pose-topic and the ground truth")
    ap.add_argument("--pose-topic", default="/dmn_pose", help="the node's output (with --live)")
    ap.add_argument("--idle-timeout", type=float, default=10.0,
                    help="--live: stop this long after the last pose (after the first one)")
    ap.add_argument("--duration", type=float, default=None, help="--live: stop after this many seconds")
    return ap


def options_from_args(args: argparse.Namespace) -> EvalOptions:
    topics = topics_from_args(args, estimate=args.pose_topic)
    return EvalOptions(
        topics=topics, map_source=MapSource(args.map_source), map_file=args.map_file,
        context_every_m=args.context_every, model_path=args.model, mode=Mode(args.mode), particles=args.particles,
        seed=args.seed, update_min_d=args.update_min_d, update_min_a=args.update_min_a,
        success_steps=tuple(args.success_steps),
        area_size_m=args.area_size, estimate_topic=args.estimate_topic, max_frames=args.max_frames,
        device=args.device, plots=not args.no_plots, progress=not args.no_progress,
        lost_updates_before_global=args.lost_updates_before_global, recovery_alpha_slow=args.recovery_alpha_slow,
        recovery_alpha_fast=args.recovery_alpha_fast, kidnap_stamp=args.kidnap_stamp, recover_hold=args.recover_hold,
    )


@console_main("dmn-bag-eval")  # run-level errors, e.g. --model unreadable (each bag's own failure is in the summary)
def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    opts = options_from_args(args)
    if not args.live and not args.bags:
        ap.error("give at least one bag (or --live)")
    if args.live:
        from dmn_ros.bags.live import run_live

        summary = run_live(bag=args.bags[0] if args.bags else None, opts=replace(opts, plots=not args.no_plots),
                           out_dir=args.out, idle_timeout_s=args.idle_timeout, duration_s=args.duration)
    else:
        summary = evaluate_paths(args.bags, opts, out_dir=args.out)
    print(format_table(summary))
    print(f"results in {args.out}/")
    return 1 if any("error" in r for r in summary["bags"]) else 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
