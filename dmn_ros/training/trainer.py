"""End-to-end training of the DMN through the differentiable particle filter (SPEC "Training").

The paper's recipe is one-step tracking: a Gaussian prior (σ 6 m, 6 m, 30°)
around the true pose, K = 32 particles, Nc = 4 contexts, the MSE loss with
α = 0.5 on the filter's estimate, Adam, early stopping on validation loss.
On a CPU budget we add a context curriculum, a mixture NLL term and a contrastive
ranking term (SPEC: "A curriculum is likely needed on this budget"); all are in the
config and default to the paper's recipe when the curriculum has one random stage and
``nll_weight = rank_weight = 0``.

``model.kind`` selects the model (:data:`dmn_ros.model.MODEL_KINDS`): the latent-map
baselines train through the same filter and loss (:class:`EpisodeLoss`); the regression
baseline has no filter and trains with :class:`RegressionLoss` (same pose MSE).
"""

from __future__ import annotations

import io
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dmn_ros.data import DatasetDir
from dmn_ros.data.torch_dataset import EpisodeDataset
from dmn_ros.export import META_FILE, atomic_write_bytes, export_model, resolve_device, training_data_summary
from dmn_ros.filter import FilterConfig, PreparedMap, encode_map, init_gaussian, init_uniform, run_episode
from dmn_ros.geometry import MetricScale, wrap_angle
from dmn_ros.model import PARTICLE_FILTER_KINDS, build_model, model_config, model_kind, regress_sequence
from dmn_ros.model.kinds import constructor_args
from dmn_ros.training.config import TrainConfig
from dmn_ros.training.loss import mixture_nll, pose_mse

log = logging.getLogger(__name__)

CHECKPOINT_LAST = "checkpoint_last.pt"
CHECKPOINT_BEST = "checkpoint_best.pt"
RANK_NC = 16
"""Contexts per episode for ``val_metric=truth_rank`` (the paper's evaluation Nc)."""


class _PoseLoss(nn.Module):
    """Model, config, scale and the prior's spread (normalized) shared by the losses below."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, scale: MetricScale) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.scale = scale
        s = cfg.init_std
        self.init_std = (s[0] / scale.meters_per_unit, s[1] / scale.meters_per_unit, math.radians(s[2]))

    def initial_mean(self, truth: torch.Tensor) -> torch.Tensor:
        """The prior's mean ``(B, 3)``: the true first pose, drawn around it with ``init_std`` if ``init_offset``."""
        mean = truth[:, 0]
        if self.cfg.init_offset:
            mean = mean + torch.randn_like(mean) * mean.new_tensor(self.init_std)
        return mean


class EpisodeLoss(_PoseLoss):
    """Filter an episode batch and return the loss; a module so DistributedDataParallel can wrap it.

    ``bounds`` (normalized ``xmin, xmax, ymin, ymax``) is where ``rank_weight``'s negatives are drawn.
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, scale: MetricScale,
                 bounds: tuple[float, float, float, float] = (-1.0, 1.0, -1.0, 1.0)) -> None:
        super().__init__(model, cfg, scale)
        self.bounds = bounds
        n = cfg.transition_noise
        self.filter_cfg = FilterConfig(
            transition_noise=(n[0] / scale.meters_per_unit, n[1] / scale.meters_per_unit, math.radians(n[2])),
            resampling="soft",
            soft_alpha=cfg.soft_alpha,
        )

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(loss, mse of the last step)``; batch tensors are already normalized."""
        truth = batch["query_poses"]  # (B, T, 3)
        mean = self.initial_mean(truth)
        belief = init_gaussian(mean=mean, std=self.init_std, num_particles=self.cfg.num_particles)
        pm = encode_map(self.model, images=batch["context_images"], poses=batch["context_poses"])
        results, _ = run_episode(
            self.model,
            belief=belief,
            prepared_map=pm,
            queries=batch["query_images"],
            egomotion=batch["egomotion"],
            config=self.filter_cfg,
        )
        std_xy = self.cfg.nll_std[0] / self.scale.meters_per_unit
        std_yaw = math.radians(self.cfg.nll_std[1])
        loss = truth.new_zeros(())
        mse_last = truth.new_zeros(())
        for t, res in enumerate(results):
            mse = pose_mse(res.mean, truth[:, t], yaw_weight=self.cfg.yaw_weight)
            loss = loss + mse
            if self.cfg.nll_weight > 0:
                loss = loss + self.cfg.nll_weight * mixture_nll(res.updated, truth[:, t], std_xy=std_xy,
                                                                std_yaw=std_yaw)
            mse_last = mse
        loss = loss / len(results)
        self.last_error_xy = torch.linalg.norm(results[-1].mean[:, :2].detach().float() - truth[:, -1, :2], dim=-1)
        if self.cfg.rank_weight > 0:
            loss = loss + self.cfg.rank_weight * self.rank_loss(pm, batch["query_images"], truth)
        return loss, mse_last.detach()

    def rank_loss(self, pm: PreparedMap, queries: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
        """Mean over steps of the positives' cross-entropy against the negatives, 1.0 at chance."""
        steps = truth.shape[1]
        m, n_pos = self.cfg.rank_negatives, self.cfg.rank_positives
        total = truth.new_zeros(())
        for t in range(steps):
            q, hq = self.model.prepare_query(queries[:, t])
            hard = round(self.cfg.rank_hard_fraction * m)
            poses = torch.cat([self.positives(truth[:, t], n_pos), self.negatives(truth[:, t], m - hard)], dim=1)
            if hard > 0:
                poses = torch.cat([poses, self.mined_negatives(pm, q, hq, truth[:, t], hard)], dim=1)
            ll = self.model.log_likelihood_prepared(pm.map_a, pm.map_g, pm.poses, q, hq, poses, 0).float()
            total = total - (torch.logsumexp(ll[:, :n_pos], dim=1) - torch.logsumexp(ll, dim=1)).mean()
        return total / (steps * math.log((n_pos + m) / n_pos))

    def positives(self, truth: torch.Tensor, n: int) -> torch.Tensor:
        """``(B, n, 3)`` poses drawn around ``truth`` with ``rank_positive_std`` (all at the truth when it is 0)."""
        s = self.cfg.rank_positive_std
        std = truth.new_tensor([s[0] / self.scale.meters_per_unit, s[1] / self.scale.meters_per_unit,
                                math.radians(s[2])])
        poses = truth[:, None] + torch.randn(truth.shape[0], n, 3, device=truth.device, dtype=truth.dtype) * std
        return torch.cat([poses[..., :2], wrap_angle(poses[..., 2:])], dim=-1)

    @torch.no_grad()
    def mined_negatives(self, pm: PreparedMap, q: torch.Tensor, hq: torch.Tensor, truth: torch.Tensor,
                        n: int) -> torch.Tensor:
        """``(B, n, 3)``: the model's highest-scoring uniform poses at least ``rank_hard_min_m`` from ``truth``."""
        c = self.cfg.rank_hard_candidates
        cand = init_uniform(batch=truth.shape[0], num_particles=c, bounds=self.bounds, device=truth.device,
                            dtype=truth.dtype).particles
        ll = self.model.log_likelihood_prepared(pm.map_a, pm.map_g, pm.poses, q, hq, cand, 0)
        dist = torch.linalg.norm(cand[..., :2] - truth[:, None, :2], dim=-1) * self.scale.meters_per_unit
        ll = ll.masked_fill(dist < self.cfg.rank_hard_min_m, float("-inf"))
        idx = ll.topk(n, dim=1).indices
        return torch.gather(cand, 1, idx[..., None].expand(-1, -1, 3))

    def negatives(self, truth: torch.Tensor, m: int) -> torch.Tensor:
        """``(B, m, 3)`` poses: ``rank_near_fraction`` of all negatives in an annulus at ``truth``, the rest uniform."""
        b = truth.shape[0]
        near = min(m, round(self.cfg.rank_near_fraction * self.cfg.rank_negatives))
        uniform = init_uniform(batch=b, num_particles=m - near, bounds=self.bounds, device=truth.device,
                               dtype=truth.dtype).particles
        if near == 0:
            return uniform
        r_lo, r_hi = (r / self.scale.meters_per_unit for r in self.cfg.rank_near_radius_m)
        u = torch.rand(b, near, 3, device=truth.device, dtype=truth.dtype)
        radius = r_lo + (r_hi - r_lo) * u[..., 0]
        angle = 2 * math.pi * u[..., 1]
        around = torch.stack([truth[:, None, 0] + radius * torch.cos(angle),
                              truth[:, None, 1] + radius * torch.sin(angle),
                              wrap_angle(truth[:, None, 2] + 2 * math.pi * u[..., 2])], dim=-1)
        return torch.cat([around, uniform], dim=1)


class RegressionLoss(_PoseLoss):
    """The regression baseline's loss: the same pose MSE, on the regressed pose (no particles, no weights).

    The one "particle" starts at the prior's mean (``init_offset`` draws it around the
    truth like :class:`EpisodeLoss` does) and follows the regressed estimates.
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, scale: MetricScale) -> None:
        super().__init__(model, cfg, scale)
        if cfg.nll_weight > 0:
            log.warning("nll_weight is ignored by the regression model: it has no particle mixture")

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(loss, mse of the last step)``, as :meth:`EpisodeLoss.forward`."""
        truth = batch["query_poses"]
        initial = self.initial_mean(truth)
        ctx = batch["context_images"]
        b, n = ctx.shape[:2]
        emb = self.model.embed_views(ctx.flatten(0, 1))
        map_v, map_u = self.model.prepare_map(emb.reshape(b, n, *emb.shape[1:]))
        estimates = regress_sequence(self.model, map_v=map_v, map_u=map_u, context_poses=batch["context_poses"],
                                     queries=batch["query_images"], egomotion=batch["egomotion"], initial=initial)
        losses = [pose_mse(est, truth[:, t], yaw_weight=self.cfg.yaw_weight) for t, est in enumerate(estimates)]
        self.last_error_xy = torch.linalg.norm(estimates[-1][:, :2].detach().float() - truth[:, -1, :2], dim=-1)
        return torch.stack(losses).mean(), losses[-1].detach()


def make_loss(model: nn.Module, cfg: TrainConfig, scale: MetricScale,
              bounds: tuple[float, float, float, float] = (-1.0, 1.0, -1.0, 1.0)) -> nn.Module:
    """:class:`EpisodeLoss` for the particle-filter kinds, :class:`RegressionLoss` for ``regression``."""
    kind = model_config(model)["kind"]
    if kind in PARTICLE_FILTER_KINDS:
        return EpisodeLoss(model, cfg, scale, bounds)
    if cfg.rank_weight > 0:
        log.warning("rank_weight is ignored by the regression model: it scores no poses")
    return RegressionLoss(model, cfg, scale)


def normalize_batch(batch: dict[str, Any], scale: MetricScale, device: torch.device) -> dict[str, torch.Tensor]:
    """Metric poses → the model's normalized coordinates (the one metric scale, SPEC)."""
    return {
        "context_images": batch["context_images"].to(device, non_blocking=True),
        "query_images": batch["query_images"].to(device, non_blocking=True),
        "context_poses": scale.to_normalized(batch["context_poses"]).to(device),
        "query_poses": scale.to_normalized(batch["query_poses"]).to(device),
        "egomotion": scale.delta_to_normalized(batch["egomotion"]).to(device),
    }


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomic, and loadable with ``torch.load(weights_only=True)``: tensors and plain containers only."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """A dmn-train checkpoint, loaded with ``torch.load(weights_only=True)``.

    Raises ``OSError`` for an unreadable file and ``ValueError`` for anything that is not a checkpoint,
    an exported model (``model.pt``) in particular.
    """
    import zipfile

    path = Path(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
        if any(n.endswith(("/constants.pkl", f"/extra/{META_FILE}")) or "/code/" in n for n in names):
            raise ValueError(f"{path} is an exported model (TorchScript), not a training checkpoint: pass "
                             "checkpoint_best.pt or checkpoint_last.pt from dmn-train")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except OSError:
        raise
    except Exception as exc:  # unpickling refused (weights_only), truncated or foreign file
        raise ValueError(f"{path}: not a dmn-train checkpoint (torch.load with weights_only=True: "
                         f"{type(exc).__name__})") from exc
    if not isinstance(state, dict) or not {"model", "model_config"} <= set(state):
        raise ValueError(f"{path}: not a dmn-train checkpoint (no model / model_config)")
    return state


def model_from_checkpoint(state: dict[str, Any]) -> nn.Module:
    """The model of ``state["model_config"]["kind"]`` (``dmn`` for checkpoints that predate kinds)."""
    model = build_model(state["model_config"])
    model.load_state_dict(state["model"])
    return model


def checked_architecture(config: dict[str, Any], source: str, *, image_size: tuple[int, int],
                         overrides: dict[str, Any]) -> dict[str, Any]:
    """The constructor arguments (and kind) of a recorded model config, checked against the dataset and overrides.

    ``source`` names where the config came from (``init=PATH``, ``checkpoint PATH``) in the messages. Raises
    ``ValueError`` when the dataset's image size or the ``model.*`` overrides do not match the architecture.
    """
    # Only constructor arguments: e.g. a covariance calibration fitted for the init weights is stale after fine-tuning.
    kind = model_kind(config)
    arch = constructor_args(kind) | {"kind"}
    dropped = sorted(set(config) - arch)
    if dropped:
        log.info("%s: not carried over to the trained model: %s", source, dropped)
    config = {k: v for k, v in config.items() if k in arch}
    size = (int(config.get("image_height", 0)), int(config.get("image_width", 0)))
    if size != tuple(image_size):
        raise ValueError(f"{source}: model images are {size[0]}x{size[1]} but the dataset's are "
                         f"{image_size[0]}x{image_size[1]}; convert with --image-size {size[0]}x{size[1]}")
    config["kind"] = kind
    clash = {k: (v, config.get(k)) for k, v in overrides.items() if config.get(k) != v}
    if clash:
        raise ValueError(f"{source}: model.* overrides change the architecture {clash} (given, recorded)")
    return config


def load_init_model(path: str | Path, *, image_size: tuple[int, int],
                    overrides: dict[str, Any]) -> tuple[nn.Module, float, float]:
    """A model (of the init's kind) with the weights of an exported model or a checkpoint.

    Returns ``(model, meters_per_unit, area_size_m)``.

    Raises ``ValueError`` when the dataset's image size or the ``model.*`` overrides do not
    match the init model's architecture.
    """
    from dmn_ros.errors import ModelLoadError
    from dmn_ros.export import load_model, weights_fingerprint

    try:
        loaded = load_model(path)
        config, state = dict(loaded.info.config), loaded.module.state_dict()
        mpu, area, fingerprint = loaded.info.meters_per_unit, loaded.info.area_size_m, loaded.info.fingerprint
    except ModelLoadError as exc:
        try:
            ckpt = load_checkpoint(path)
            config, state = dict(ckpt["model_config"]), ckpt["model"]
            mpu, area, fingerprint = float(ckpt["meters_per_unit"]), float(ckpt["area_size_m"]), None
        except Exception as exc2:
            raise ValueError(f"init={path}: neither an exported model ({exc}) nor a checkpoint ({exc2})") from exc2
    config = checked_architecture(config, f"init={path}", image_size=image_size, overrides=overrides)
    model = build_model(config)
    model.load_state_dict(state)
    if fingerprint is not None and weights_fingerprint(model) != fingerprint:
        raise ValueError(f"init={path}: weights do not match the model's fingerprint {fingerprint}")
    log.info("fine-tuning from %s (%s, meters_per_unit %.3g, area %.1f m)", path, config, mpu, area)
    return model, float(mpu), float(area)


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> DistInfo:
    """torchrun sets WORLD_SIZE/RANK; gloo on CPU, nccl on CUDA."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistInfo()
    import torch.distributed as dist

    use_cuda = resolve_device(device_name, fallback=False).type == "cuda"
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    info = DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if use_cuda:
        torch.cuda.set_device(info.local_rank)
    return info


def validation_batches(cfg: TrainConfig, num_contexts: int = 4) -> list[dict[str, Any]]:
    """A fixed, seeded set of paper-protocol episodes (random contexts) from the val split."""
    ds = EpisodeDataset(cfg.data, "val", num_contexts=num_contexts, T=cfg.T, batch_size=cfg.batch_size,
                        query_mode=cfg.query_mode, context_mode="random", seed=10_000 + cfg.seed,
                        num_episodes=max(1, cfg.val_episodes // cfg.batch_size))
    return list(ds)


@torch.no_grad()
def evaluate_loss(crit: nn.Module, batches: list[dict[str, Any]], device: torch.device,
                  success_m: float = 8.94) -> dict[str, float]:
    """Mean loss and last-step MSE, and the share of episodes whose last estimate is within ``success_m``.

    Draws from a forked RNG seeded the same every time (comparable numbers), so validation never
    changes the training run's own random stream.
    """
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(1234)
        was_training = crit.training
        crit.eval()
        total, mse_total, hits, count = 0.0, 0.0, 0, 0
        for b in batches:
            loss, mse = crit(normalize_batch(b, crit.scale, device))
            total += float(loss)
            mse_total += float(mse)
            err_m = crit.last_error_xy * crit.scale.meters_per_unit
            hits += int((err_m < success_m).sum())
            count += int(err_m.numel())
        crit.train(was_training)
    n = max(1, len(batches))
    return {"loss": total / n, "mse": mse_total / n, "success": hits / max(1, count)}


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's torch random state (CPU, and CUDA when training there), for exact resume."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def weights_digest(model: nn.Module) -> str:
    """A short hash of the parameters: equal on every rank while DistributedDataParallel keeps them in sync."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def train(cfg: TrainConfig, *, resume: bool = True, progress: bool = True) -> Path:
    """Run (or resume) training; returns the path of the exported best model."""
    if not cfg.data:
        raise ValueError("data= is required: the dataset directory to train on (dmn-world generate, dmn-dataset)")
    if not cfg.out:
        raise ValueError("out= is required: the directory for checkpoints, logs and the exported model")
    dist_info = init_distributed(cfg.device)
    device = resolve_device(cfg.device, fallback=False)  # a training run asked for CUDA must not crawl on CPU
    if device.type == "cuda" and dist_info.world_size > 1:
        device = torch.device("cuda", dist_info.local_rank)
    out = Path(cfg.out)
    meta = DatasetDir(cfg.data).meta
    out.mkdir(parents=True, exist_ok=True)
    scale = MetricScale(meta.meters_per_unit)
    area = float(meta.bounds[1] - meta.bounds[0])
    torch.manual_seed(cfg.seed * 1000 + dist_info.rank)

    last_path = out / CHECKPOINT_LAST
    state = load_checkpoint(last_path, device) if resume and last_path.is_file() else None
    if state is not None:  # the run's own model and metric scale, as recorded; init was used when the run began
        model = build_model(checked_architecture(dict(state["model_config"]), f"checkpoint {last_path}",
                                                 image_size=tuple(meta.image_size), overrides=cfg.model))
        model.load_state_dict(state["model"])
        if float(state["meters_per_unit"]) != scale.meters_per_unit:
            log.warning("dataset meters_per_unit %.3g differs from the run's %.3g: normalizing with the run's",
                        scale.meters_per_unit, float(state["meters_per_unit"]))
        scale = MetricScale(float(state["meters_per_unit"]))
        area = max(area, float(state["area_size_m"]))
        model = model.to(device)
    elif cfg.init:  # fine-tuning: the init model's architecture and metric scale win over the data's
        model, init_mpu, init_area = load_init_model(cfg.init, image_size=tuple(meta.image_size), overrides=cfg.model)
        if init_mpu != scale.meters_per_unit:
            log.warning("dataset meters_per_unit %.3g differs from the init model's %.3g: normalizing with the "
                        "model's", scale.meters_per_unit, init_mpu)
            scale = MetricScale(init_mpu)
        if area > 2.0 * init_area:
            log.warning("dataset area %.1f m is more than twice the init model's training area %.1f m", area,
                        init_area)
        area = max(area, init_area)
        model = model.to(device)
    else:
        model = build_model({"image_height": meta.image_size[0], "image_width": meta.image_size[1],
                             **cfg.model}).to(device)
    if state is None and dist_info.is_main:  # a fresh run: never export or resume an earlier run's checkpoints
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for name in (CHECKPOINT_BEST, CHECKPOINT_LAST):
            if (out / name).is_file():  # kept aside, not deleted: it may be the only copy of hours of training
                kept = out / f"{Path(name).stem}.earlier-{stamp}.pt"
                log.warning("fresh run: %s of an earlier run moved to %s", out / name, kept)
                (out / name).rename(kept)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, best_val, bad_evals = 0, math.inf, 0
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        step, best_val, bad_evals = int(state["step"]), float(state["best_val"]), int(state["bad_evals"])
        states = state.get("rng_states")
        if states is not None and len(states) == dist_info.world_size:  # same rank count: continue exactly
            set_rng_state(states[dist_info.rank], device)
        elif dist_info.is_main:
            log.warning("checkpoint has no random state for %d ranks: random draws restart from the seed",
                        dist_info.world_size)
        if dist_info.is_main:
            log.info("resumed from %s at step %d (best val %.4f)", last_path, step, best_val)
        del state

    crit = make_loss(model, cfg, scale, scale.bounds_to_normalized(meta.bounds))
    if cfg.val_metric == "truth_rank" and model_config(model)["kind"] not in PARTICLE_FILTER_KINDS:
        raise ValueError(f"val_metric=truth_rank needs a model that scores poses; {model_config(model)['kind']} "
                         "regresses them: use val_metric=loss")
    runner: nn.Module = crit
    if dist_info.world_size > 1:
        # Without attention CNN3 gets no gradient (the ablations "no attention" and "neither").
        runner = nn.parallel.DistributedDataParallel(
            crit, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=not model_config(model).get("attention", True))
    writer = None
    if dist_info.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tb"))
    val_batches = validation_batches(cfg) if dist_info.is_main else []
    val_ranking = None
    if dist_info.is_main and cfg.val_metric == "truth_rank":
        import dataclasses

        from dmn_ros.evaluation.protocol import make_episode_set

        val_ranking = make_episode_set(cfg.data, split="val", num_episodes=cfg.val_episodes, num_contexts=RANK_NC,
                                       T=1, seed=20_000 + cfg.seed)
        val_ranking = dataclasses.replace(val_ranking, scale=scale)  # the run's scale, as training normalizes
    success_m = 8.94 * area / 40.0

    training_data = training_data_summary(meta, cfg.data)

    def gathered_rng_states() -> list[dict[str, torch.Tensor]]:
        """Every rank's random state (collective: all ranks call it at the same step)."""
        mine = rng_state(device)
        if dist_info.world_size == 1:
            return [mine]
        import torch.distributed as dist

        states: list[Any] = [None] * dist_info.world_size
        dist.all_gather_object(states, {k: v.cpu() for k, v in mine.items()})
        return states

    def state_dict(rng_states: list[dict[str, torch.Tensor]] | None = None) -> dict[str, Any]:
        return {
            "model": model.state_dict(),
            "model_config": model_config(model),
            "optimizer": opt.state_dict(),
            "step": step,
            "best_val": best_val,
            "bad_evals": bad_evals,
            "meters_per_unit": scale.meters_per_unit,
            "area_size_m": area,
            "config": cfg.to_dict(),
            "training_data": training_data,
            **({"rng_states": rng_states} if rng_states is not None else {}),
        }

    def validate(at_step: int) -> float:
        """Log the validation scalars; returns the checkpoint-selection score (lower is better)."""
        assert writer is not None
        val = evaluate_loss(crit, val_batches, device, success_m)
        writer.add_scalar("val/loss", val["loss"], at_step)
        writer.add_scalar("val/mse", val["mse"], at_step)
        writer.add_scalar("val/rmse_m", math.sqrt(max(val["mse"], 0.0)) * scale.meters_per_unit, at_step)
        writer.add_scalar("val/success", val["success"], at_step)
        log.info("step %d val loss %.4f mse %.4f success %.3f (< %.2f m)", at_step, val["loss"], val["mse"],
                 val["success"], success_m)
        if val_ranking is None:
            return val["loss"]
        from dmn_ros.evaluation.ranking import truth_rank

        model.eval()
        rank = float(truth_rank(model, val_ranking, num_contexts=RANK_NC, device=device).mean())
        writer.add_scalar("val/truth_rank", rank, at_step)
        log.info("step %d val truth rank %.4f (Nc %d)", at_step, rank, RANK_NC)
        if max(cfg.rank_positive_std) > 0:  # select on the basin the positives train, not the exact truth
            rank = float(truth_rank(model, val_ranking, num_contexts=RANK_NC, device=device,
                                    truth_std=cfg.rank_positive_std).mean())
            writer.add_scalar("val/basin_rank", rank, at_step)
            log.info("step %d val basin rank %.4f (truth jittered by %s)", at_step, rank, cfg.rank_positive_std)
        f = cfg.rank_near_fraction
        if f > 0:  # select on the same mix of negatives the rank term trains on
            near = float(truth_rank(model, val_ranking, num_contexts=RANK_NC, device=device,
                                    near_radius_m=cfg.rank_near_radius_m).mean())
            writer.add_scalar("val/truth_rank_near", near, at_step)
            log.info("step %d val truth rank near %.4f (%g-%g m)", at_step, near, *cfg.rank_near_radius_m)
            rank = (1 - f) * rank + f * near
        model.train()
        return -rank

    from tqdm import tqdm

    bar = tqdm(total=cfg.max_steps, initial=step, disable=not (progress and dist_info.is_main), desc="train",
               dynamic_ncols=True)
    start = time.monotonic()
    last_ckpt = time.monotonic()
    stage = None
    stream = None
    stop = False
    interrupted = {"flag": False}

    def _graceful(signum: int, _frame: object) -> None:
        """SIGTERM/SIGINT finish the step, checkpoint and export instead of losing the run."""
        interrupted["flag"] = True
        log.warning("signal %d: stopping after this step", signum)

    import signal
    import threading

    old_handlers = {}
    if threading.current_thread() is threading.main_thread():
        old_handlers = {sig: signal.signal(sig, _graceful) for sig in (signal.SIGTERM, signal.SIGINT)}
    ema = None
    if bad_evals >= cfg.patience:  # resuming a run that already stopped early: export, don't train on
        stop = True
        if dist_info.is_main:
            log.info("the run stopped early at step %d (%d evaluations without improvement, patience %d): "
                     "exporting only; raise patience= to train on", step, bad_evals, cfg.patience)
    while step < cfg.max_steps and not stop:
        new_stage = cfg.stage_at(step)
        if new_stage != stage:
            stage = new_stage
            stage_start = cfg.stage_start(step)
            ds = EpisodeDataset(
                cfg.data, "train", num_contexts=stage.num_contexts, T=cfg.T, batch_size=cfg.batch_size,
                query_mode=cfg.query_mode, context_mode=stage.context_mode, near_radius_m=stage.near_radius_m,
                near_yaw_deg=stage.near_yaw_deg, far_fraction=stage.far_fraction, odom_noise=cfg.odom_noise,
                seed=cfg.seed * 1_000_003 + stage_start * 101 + dist_info.rank, first_batch=step - stage_start,
            )
            stream = iter(ds)
            if dist_info.is_main:
                log.info("step %d: curriculum stage %s", step, stage)
        assert stream is not None
        batch = normalize_batch(next(stream), scale, device)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                            enabled=cfg.amp and device.type == "cuda"):
            loss, mse = runner(batch)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        lv = float(loss.detach())
        ema = lv if ema is None else 0.98 * ema + 0.02 * lv
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.4f}", nc=batch["context_images"].shape[1])
        if writer is not None:
            writer.add_scalar("train/loss", lv, step)
            writer.add_scalar("train/mse", float(mse), step)
            writer.add_scalar("train/grad_norm", float(gnorm), step)
            writer.add_scalar("train/lr", opt.param_groups[0]["lr"], step)
        improved = False
        if dist_info.is_main and step % cfg.val_every == 0:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                score = validate(step)  # validation never shifts the training run's random stream
            final_stage = stage == cfg.curriculum[-1]
            if score < best_val:
                best_val, bad_evals, improved = score, 0, True
            elif final_stage:  # patience counts only once the paper's protocol is being trained
                bad_evals += 1
            log.info("step %d (best %s %.4f, bad %d)", step, cfg.val_metric,
                     abs(best_val) if val_ranking is not None else best_val, bad_evals)
            if bad_evals >= cfg.patience:
                log.info("early stop: no validation improvement in %d evaluations", cfg.patience)
                stop = True
        if (time.monotonic() - start) / 60.0 > cfg.max_minutes or interrupted["flag"]:
            stop = True
        # checkpoint_last is written with every new best too, so a kill between the two never resumes
        # with a stale best_val or patience count.
        save = dist_info.is_main and (stop or improved or time.monotonic() - last_ckpt > cfg.checkpoint_minutes * 60.0)
        if dist_info.world_size > 1:  # every rank learns of a stop or a save (the random states are gathered)
            import torch.distributed as dist

            flags = torch.tensor([float(stop), float(save)], device=device)
            dist.all_reduce(flags)
            stop, save = bool(flags[0].item() > 0), bool(flags[1].item() > 0)
        if save:
            ckpt = state_dict(gathered_rng_states())
            if dist_info.is_main:
                if improved:
                    save_checkpoint(out / CHECKPOINT_BEST, ckpt)
                save_checkpoint(last_path, ckpt)
                last_ckpt = time.monotonic()
    bar.close()
    for sig, handler in old_handlers.items():
        signal.signal(sig, handler)
    exported = out / "model.pt"
    final_states = gathered_rng_states()
    if dist_info.world_size > 1 and step > 0:  # DDP keeps the ranks' weights equal; say so in the log
        import torch.distributed as dist

        digests: list[Any] = [None] * dist_info.world_size
        dist.all_gather_object(digests, weights_digest(model))
        if dist_info.is_main:
            if len(set(digests)) != 1:
                raise RuntimeError(f"the ranks' weights differ after step {step}: digests {digests}")
            log.info("all %d ranks hold identical weights at step %d (digest %s)", dist_info.world_size, step,
                     digests[0])
    if dist_info.is_main:
        save_checkpoint(last_path, state_dict(final_states))
        best = out / CHECKPOINT_BEST
        src = load_checkpoint(best if best.is_file() else last_path)
        info = export_model(model_from_checkpoint(src), exported, meters_per_unit=scale.meters_per_unit,
                            area_size_m=area, training=src.get("training_data"),
                            description=f"{model_config(model)['kind']} trained on {cfg.data}, step {src['step']}")
        log.info("exported %s (fingerprint %s)", exported, info.fingerprint)
        if writer is not None:
            writer.close()
    if dist_info.world_size > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return exported
