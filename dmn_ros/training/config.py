"""Training configuration: one dataclass, readable from YAML, overridable from the command line."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class Stage:
    """One curriculum stage: how contexts are drawn until ``until_step``."""

    until_step: int
    context_mode: str = "random"
    """``near``: contexts around the query (easy); ``random``: the paper's protocol."""
    near_radius_m: float = 5.0
    near_yaw_deg: float = 180.0
    """Near contexts also face within this angle of the query, so they see the same scene."""
    far_fraction: float = 0.0
    num_contexts: tuple[int, int] = (4, 4)
    """Nc is drawn per batch from this inclusive range (GQN-style, so any Nc works at test time)."""


VAL_METRICS = ("loss", "truth_rank")


@dataclass(frozen=True)
class TrainConfig:
    data: str = ""
    """Dataset directory (``dmn_ros.data`` format); required for training (``data=...``)."""
    out: str = "runs/dmn"
    """Checkpoints, TensorBoard logs and the exported model go here."""
    model: dict[str, Any] = field(default_factory=dict)
    """DMN constructor overrides, e.g. ``{attention: false}`` for the ablation."""
    seed: int = 0
    device: str = "auto"
    batch_size: int = 16
    num_particles: int = 32
    T: int = 1
    """Steps per training episode; the paper trains one-step tracking."""
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 10.0
    max_steps: int = 100_000
    max_minutes: float = math.inf
    init_std: tuple[float, float, float] = (6.0, 6.0, 30.0)
    """Tracking prior σ in meters, meters, degrees (paper: 6 m, 6 m, 30°)."""
    init_offset: bool = False
    """Draw the prior's mean itself around the truth (σ above) instead of centering it on the truth.

    Centered, the prior's mean already is the answer and the loss barely rewards a
    good observation model; offset, the filter must move the estimate to the truth.
    """
    transition_noise: tuple[float, float, float] = (0.2, 0.2, 5.0)
    """Motion noise σ in meters, meters, degrees."""
    soft_alpha: float = 0.5
    yaw_weight: float = 0.5
    nll_weight: float = 0.0
    """Weight of the mixture NLL added to the paper's MSE (0 disables it)."""
    nll_std: tuple[float, float] = (1.0, 10.0)
    """Kernel σ of the NLL in meters and degrees."""
    rank_weight: float = 0.0
    """Weight of a contrastive term on the observation model (0 disables it): the cross-entropy of the
    true pose against ``rank_negatives`` uniform poses, divided by its chance level log(1 + negatives).

    Jonschkowski et al. train DPF measurement models this way. Through the filter, the MSE only
    sees the K prior particles around the truth; this term asks directly for what global
    localization needs, the true place scoring above every other place of the map.
    """
    rank_negatives: int = 31
    rank_positives: int = 1
    rank_positive_std: tuple[float, float, float] = (0.0, 0.0, 0.0)
    """The rank term's positives: ``rank_positives`` poses drawn around the truth with this σ (meters,
    meters, degrees), scored together against the negatives (the cross-entropy of their summed probability).

    At the exact truth the term rewards a likelihood that may be far too sharp for a filter: with
    K = 2048 particles in a 40 m maze the nearest particle is typically ~3 m and ~30° away, and run
    v6 ranked the truth above 92 % of uniform poses but poses 2 m / 20° off above only 70 %.
    Jittered positives ask for a basin as wide as the particle spacing."""
    rank_near_fraction: float = 0.0
    """Share of the negatives drawn near the truth instead of uniformly over the map.

    Uniform negatives are nearly all far away, so they teach which region is right but not a
    likelihood that peaks within metres of the truth, which tracking and the last steps of
    global localization need (run v6 in docs/RESULTS.md)."""
    rank_near_radius_m: tuple[float, float] = (2.0, 10.0)
    """Near negatives lie at a distance uniform in this range (meters) from the truth, any yaw."""
    rank_hard_fraction: float = 0.0
    """Share of the negatives mined from the model itself: the best-scoring of ``rank_hard_candidates``
    uniform poses farther than ``rank_hard_min_m`` from the truth.

    Global localization fails when some wrong place outscores the truth's basin, and uniform
    negatives almost never hit such a place: the basin then only has to beat an average pose
    (run v8's basin rank 0.72), where it would have to beat nearly the whole map (≈ 0.99). Measured in
    run v12 (docs/RESULTS.md): it widened the basin against uniform poses but halved the filter's val
    success from v8, so no shipped recipe uses it."""
    rank_hard_candidates: int = 256
    rank_hard_min_m: float = 6.0
    """Mined negatives lie at least this far from the truth (meters), so they never sit in the
    positives' basin (the jittered positives spread about 3 m)."""
    val_metric: str = "loss"
    """What chooses ``checkpoint_best``: ``loss`` (the paper's validation loss, lower is better) or
    ``truth_rank`` (:func:`dmn_ros.evaluation.ranking.truth_rank` on val episodes, higher is better)."""
    query_mode: str = "segment"
    odom_noise: tuple[float, float] = (0.0, 0.0)
    curriculum: tuple[Stage, ...] = (Stage(until_step=10**9),)
    val_every: int = 250
    val_episodes: int = 128
    patience: int = 20
    """Validations without improvement before early stopping."""
    checkpoint_minutes: float = 5.0
    amp: bool = True
    """bf16 autocast on CUDA (ignored on CPU, where it is slower here)."""
    channels_last: bool = False
    init: str = ""
    """Fine-tune from this exported model (``.pt`` from dmn-export/dmn-train) or checkpoint: its
    architecture and metric scale are kept; "" trains from scratch (docs/own_data.md)."""

    def stage_at(self, step: int) -> Stage:
        for s in self.curriculum:
            if step < s.until_step:
                return s
        return self.curriculum[-1]

    def stage_start(self, step: int) -> int:
        """The step at which the stage that ``step`` is in began (where its data stream starts)."""
        stage = self.stage_at(step)
        i = next(i for i, s in enumerate(self.curriculum) if s is stage)
        return self.curriculum[i - 1].until_step if i > 0 else 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _number_or_str(value: Any) -> Any:
    """YAML 1.1 reads ``5e-4`` as a string; users mean a number."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _coerce(name: str, value: Any) -> Any:
    value = _number_or_str(value)
    if name == "curriculum":
        if not isinstance(value, (list, tuple)) or not value:
            raise ValueError(f"curriculum must be a non-empty list of stages, got {value!r}")
        stage_keys = {f.name for f in dataclasses.fields(Stage)}
        stages = []
        for s in value:
            if not isinstance(s, dict):
                raise ValueError(f"curriculum stage {s!r} is not a mapping of {sorted(stage_keys)}")
            if set(s) - stage_keys:
                raise ValueError(f"curriculum stage {s}: unknown keys {sorted(set(s) - stage_keys)}; a stage takes "
                                 f"{sorted(stage_keys)}")
            if "until_step" not in s:
                raise ValueError(f"curriculum stage {s} has no until_step")
            stages.append(Stage(**{**s, "num_contexts": tuple(s.get("num_contexts", (4, 4)))}))
        return tuple(stages)
    if isinstance(value, list):
        return tuple(_number_or_str(v) for v in value)
    return value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """YAML file, then ``key=value`` overrides (values parsed as YAML)."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"config {path}: not valid YAML ({exc})") from exc
        if not isinstance(raw, dict):
            raise ValueError(f"config {path}: expected key: value pairs, got {type(raw).__name__}")
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        k, v = item.split("=", 1)
        node = raw
        keys = k.split(".")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {key} is not a mapping")
        try:
            node[keys[-1]] = yaml.safe_load(v)
        except yaml.YAMLError as exc:
            raise ValueError(f"override {item!r}: value is not valid YAML ({exc})") from exc
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"unknown config keys: {sorted(unknown)}")
    try:
        cfg = TrainConfig(**{k: _coerce(k, v) for k, v in raw.items()})
    except TypeError as exc:  # e.g. a curriculum that is not a list of stages
        raise ValueError(f"config: {exc}") from exc
    if cfg.val_metric not in VAL_METRICS:
        raise ValueError(f"val_metric must be one of {VAL_METRICS}, got {cfg.val_metric!r}")
    if cfg.rank_weight > 0 and cfg.rank_negatives < 1:
        raise ValueError(f"rank_negatives must be >= 1 when rank_weight > 0, got {cfg.rank_negatives}")
    if cfg.rank_positives < 1 or min(cfg.rank_positive_std) < 0:
        raise ValueError(f"rank_positives must be >= 1 and rank_positive_std >= 0, got {cfg.rank_positives}, "
                         f"{cfg.rank_positive_std}")
    if not 0.0 <= cfg.rank_near_fraction <= 1.0:
        raise ValueError(f"rank_near_fraction must be in [0, 1], got {cfg.rank_near_fraction}")
    if not 0.0 <= cfg.rank_hard_fraction <= 1.0 or cfg.rank_near_fraction + cfg.rank_hard_fraction > 1.0:
        raise ValueError(f"rank_hard_fraction must be in [0, 1] and rank_near_fraction + rank_hard_fraction <= 1, "
                         f"got {cfg.rank_hard_fraction} and {cfg.rank_near_fraction}")
    hard = round(cfg.rank_hard_fraction * cfg.rank_negatives)
    if hard > 0 and (cfg.rank_hard_candidates < hard or cfg.rank_hard_min_m < 0):
        raise ValueError(f"rank_hard_candidates must be >= the mined negatives ({hard}) and rank_hard_min_m >= 0, "
                         f"got {cfg.rank_hard_candidates} and {cfg.rank_hard_min_m}")
    lo, hi = cfg.rank_near_radius_m
    if not 0.0 <= lo <= hi:
        raise ValueError(f"rank_near_radius_m must be [min, max] with 0 <= min <= max, got {cfg.rank_near_radius_m}")
    return cfg
