"""dmn-train end to end on a tiny rendered dataset: checkpoints, resume, export, DDP under torchrun."""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dmn_ros.export import export_model, load_model, weights_fingerprint
from dmn_ros.model import DMN
from dmn_ros.training.config import Stage, load_config
from dmn_ros.training.trainer import CHECKPOINT_BEST, CHECKPOINT_LAST, load_checkpoint, model_from_checkpoint, train

SMALL = ["batch_size=4", "num_particles=8", "val_every=2", "val_episodes=8", "checkpoint_minutes=0"]


def test_config_yaml_and_overrides(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("lr: 0.01\ncurriculum:\n  - {until_step: 5, context_mode: near, num_contexts: [1, 2]}\n"
                 "  - {until_step: 1000, context_mode: random}\n")
    cfg = load_config(p, ["lr=2e-3", "model.attention=false", "init_std=[1, 2, 3]"])
    assert cfg.lr == 0.002 and isinstance(cfg.lr, float)
    assert cfg.model == {"attention": False} and cfg.init_std == (1, 2, 3)
    assert cfg.stage_at(0) == Stage(until_step=5, context_mode="near", num_contexts=(1, 2))
    assert cfg.stage_at(5).context_mode == "random" and cfg.stage_at(10**6).context_mode == "random"
    with pytest.raises(ValueError, match="unknown config keys"):
        load_config(None, ["learning_rate=1"])
    with pytest.raises(ValueError, match="key=value"):
        load_config(None, ["lr"])


def test_train_checkpoint_resume_export(tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = load_config(None, [f"data={tiny_dataset}", f"out={out}", "max_steps=3", *SMALL,
                             "curriculum=[{until_step: 2, context_mode: near, num_contexts: [1, 2]},"
                             " {until_step: 100, context_mode: random, num_contexts: [2, 3]}]"])
    exported = train(cfg, progress=False)
    state = load_checkpoint(out / CHECKPOINT_LAST)  # weights_only=True inside
    assert state["step"] == 3
    assert (out / CHECKPOINT_BEST).is_file() and any((out / "tb").iterdir())
    loaded = load_model(exported)
    best = model_from_checkpoint(load_checkpoint(out / CHECKPOINT_BEST))
    assert loaded.info.fingerprint == weights_fingerprint(best)
    assert loaded.info.meters_per_unit == 20.0 and (loaded.info.image_height, loaded.info.image_width) == (32, 32)

    # dmn-export turns the checkpoint into the same model train() exported.
    from dmn_ros.training.export_cli import main as export_main

    assert export_main([str(out / CHECKPOINT_BEST), str(tmp_path / "again.pt")]) == 0
    assert load_model(tmp_path / "again.pt").info.fingerprint == loaded.info.fingerprint
    # Both record the training data's domain; a checkpoint from before that record gets it from its
    # dataset directory, or only the directory's name when that is gone.
    from dmn_ros.export import training_domain
    from dmn_ros.training.trainer import save_checkpoint

    assert training_domain(loaded.info) == "maze" and loaded.info.config["training"]["dataset"] == str(tiny_dataset)
    assert load_model(tmp_path / "again.pt").info.config["training"] == loaded.info.config["training"]
    old = {k: v for k, v in load_checkpoint(out / CHECKPOINT_BEST).items() if k != "training_data"}
    save_checkpoint(tmp_path / "old.pt", old)
    assert export_main([str(tmp_path / "old.pt"), str(tmp_path / "old_model.pt")]) == 0
    assert training_domain(load_model(tmp_path / "old_model.pt").info) == "maze"
    save_checkpoint(tmp_path / "gone.pt", {**old, "config": {**old["config"], "data": str(tmp_path / "no_such")}})
    assert export_main([str(tmp_path / "gone.pt"), str(tmp_path / "gone_model.pt")]) == 0
    gone = load_model(tmp_path / "gone_model.pt").info
    assert training_domain(gone) == "" and gone.config["training"] == {"dataset": str(tmp_path / "no_such")}
    # ... and with --calibrate stores a fitted covariance inflation that the Localizer applies.
    from dmn_ros.localizer import Localizer

    assert export_main([str(out / CHECKPOINT_BEST), str(tmp_path / "cal.pt"), "--calibrate", str(tiny_dataset),
                        "--calibrate-episodes", "2"]) == 0
    cal = load_model(tmp_path / "cal.pt")
    s = cal.info.config["calibration"]["covariance_inflation"]
    # Both frame streams are fitted by default: robot-like segments (plain keys) and independent views.
    assert set(cal.info.config["calibration"]) == {"likelihood_scale", "covariance_inflation",
                                                   "likelihood_scale_independent", "covariance_inflation_independent"}
    assert s > 0 and cal.info.fingerprint == loaded.info.fingerprint
    assert Localizer(cal).covariance_inflation == pytest.approx(s)
    assert Localizer(cal).likelihood_scale == cal.info.config["calibration"]["likelihood_scale"]
    from dmn_ros.training.export_cli import SCALE_GRID
    # Re-export of the same weights: the calibration is copied, and an eval's headline goes into the metadata.
    fp = loaded.info.fingerprint
    ev = {"fingerprints": [fp], "threshold_m": 8.94, "global_success": [[0.25, 0.5, 0.5, 0.5, 0.75]],
          "tracking_rmse_m": [[3.0, 2.0, 2.0, 2.0, 1.5]], "episode_set": {"split": "test", "episodes": 4}}
    (tmp_path / "results.json").write_text(json.dumps(ev))
    assert export_main([str(out / CHECKPOINT_BEST), str(tmp_path / "re.pt"), "--calibration-from",
                        str(tmp_path / "cal.pt"), "--results", str(tmp_path / "results.json")]) == 0
    re_info = load_model(tmp_path / "re.pt").info
    assert re_info.config["calibration"] == cal.info.config["calibration"] and re_info.fingerprint == fp
    # Re-fit one stream on top of a copied calibration: the other stream's values are kept as they were.
    export_model(best, tmp_path / "seeded.pt", meters_per_unit=20.0,
                 calibration={"likelihood_scale": 0.3, "covariance_inflation": 1.7})
    assert export_main([str(out / CHECKPOINT_BEST), str(tmp_path / "refit.pt"), "--calibration-from",
                        str(tmp_path / "seeded.pt"), "--calibrate", str(tiny_dataset), "--calibrate-episodes", "2",
                        "--calibrate-queries", "random_order", "--calibrate-nc", "3"]) == 0
    refit = load_model(tmp_path / "refit.pt").info.config["calibration"]
    assert refit["likelihood_scale"] == 0.3 and refit["covariance_inflation"] == 1.7
    assert refit["likelihood_scale_independent"] in SCALE_GRID and refit["covariance_inflation_independent"] > 0
    # Streams fitted in separate runs combine: later files win on the keys they share.
    export_model(best, tmp_path / "ind_only.pt", meters_per_unit=20.0,
                 calibration={"likelihood_scale_independent": 2.0, "covariance_inflation": 0.9})
    assert export_main([str(out / CHECKPOINT_BEST), str(tmp_path / "both.pt"), "--calibration-from",
                        str(tmp_path / "seeded.pt"), "--calibration-from", str(tmp_path / "ind_only.pt")]) == 0
    assert load_model(tmp_path / "both.pt").info.config["calibration"] == {
        "likelihood_scale": 0.3, "covariance_inflation": 0.9, "likelihood_scale_independent": 2.0}
    assert re_info.config["results"] == {"global_success_t1": 0.25, "global_success_t5": 0.75,
                                         "tracking_rmse_m_t5": 1.5, "success_threshold_m": 8.94,
                                         "episode_set": {"split": "test", "episodes": 4}}
    (tmp_path / "other.json").write_text(json.dumps({**ev, "fingerprints": ["0000000000000000"]}))
    with pytest.raises(SystemExit):  # figures of other weights
        export_main([str(out / CHECKPOINT_BEST), str(tmp_path / "x.pt"), "--results", str(tmp_path / "other.json")])
    export_model(DMN(), tmp_path / "untrained.pt", meters_per_unit=20.0, calibration={"likelihood_scale": 0.5})
    with pytest.raises(SystemExit, match="does not apply"):  # a calibration fitted for other weights
        export_main([str(out / CHECKPOINT_BEST), str(tmp_path / "y.pt"), "--calibration-from",
                     str(tmp_path / "untrained.pt")])

    # Resume: continues from step 3 with the saved weights, not from scratch.
    before = {k: v.clone() for k, v in state["model"].items()}
    train(cfg.__class__(**{**cfg.__dict__, "max_steps": 5}), progress=False)
    state2 = load_checkpoint(out / CHECKPOINT_LAST)
    assert state2["step"] == 5
    changed = any(not torch.equal(before[k], state2["model"][k]) for k in before)
    assert changed


def test_checkpoint_refuses_arbitrary_pickles(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):  # would run code under a plain torch.load
            return (os.system, ("echo pwned",))

    p = tmp_path / "evil.pt"
    torch.save({"model": Evil()}, p)
    with pytest.raises(Exception, match=r"[Ww]eights only|weights_only|Unsupported"):
        load_checkpoint(p)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("model", [[], ["model.attention=false"]], ids=["dmn", "no_attention"])
def test_torchrun_two_processes_gloo(tiny_dataset: Path, tmp_path: Path, model: list[str]) -> None:
    """Two ranks train in step and end with identical weights (the ablation without attention leaves
    CNN3 without a gradient, which DDP must be told about)."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "dmn_ros.training.cli", "--device", "cpu", "--threads", "1",
           f"data={tiny_dataset}", f"out={out}", "max_steps=2", *SMALL, *model]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = load_checkpoint(out / CHECKPOINT_LAST)
    assert state["step"] == 2 and len(state["rng_states"]) == 2
    assert not torch.equal(state["rng_states"][0]["cpu"], state["rng_states"][1]["cpu"])  # ranks draw apart
    # Each rank hashed its own weights after the last step; rank 0 compared the gathered digests.
    assert re.search(r"all 2 ranks hold identical weights at step 2 \(digest [0-9a-f]{16}\)", proc.stderr), \
        proc.stderr[-3000:]
    load_model(out / "model.pt")


def _rank_batch(tiny_dataset: Path, cfg) -> dict[str, torch.Tensor]:
    from dmn_ros.data.torch_dataset import EpisodeDataset
    from dmn_ros.geometry import MetricScale
    from dmn_ros.training.trainer import normalize_batch

    ds = EpisodeDataset(str(tiny_dataset), "train", num_contexts=(2, 2), T=1, batch_size=4, context_mode="random",
                        seed=3)
    return normalize_batch(next(iter(ds)), MetricScale(20.0), torch.device("cpu"))


def test_rank_loss_is_one_at_chance_and_trains_the_observation_model(tiny_dataset: Path) -> None:
    """Equal log-likelihoods give cross-entropy log(1+M), normalized to exactly 1; Adam steps then lower it."""
    from dmn_ros.filter import encode_map
    from dmn_ros.geometry import MetricScale
    from dmn_ros.training.trainer import EpisodeLoss

    cfg = load_config(None, ["rank_weight=1", "rank_negatives=15", "num_particles=8"])
    torch.manual_seed(0)
    model = DMN()
    crit = EpisodeLoss(model, cfg, MetricScale(20.0))
    batch = _rank_batch(tiny_dataset, cfg)

    def rank() -> torch.Tensor:
        pm = encode_map(model, images=batch["context_images"], poses=batch["context_poses"])
        return crit.rank_loss(pm, batch["query_images"], batch["query_poses"])

    last_fc = model.fc1[-1]
    with torch.no_grad():
        saved = last_fc.weight.clone()
        last_fc.weight.zero_()  # every pose scores the bias: a uniform softmax over 1 + 15 poses
    assert float(rank().detach()) == pytest.approx(1.0, abs=1e-6)
    with torch.no_grad():
        last_fc.weight.copy_(saved)

    loss = rank()
    loss.backward()
    grad = model.cnn1_trunk[0].weight.grad  # CNN1: the map side, behind the attention
    assert grad is not None and grad.abs().sum() > 0
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    torch.manual_seed(1)
    first = float(rank().detach())
    for _ in range(20):  # the same batch: the true poses must come to outscore the negatives
        opt.zero_grad()
        rank().backward()
        opt.step()
    torch.manual_seed(1)  # the same negatives as `first`
    assert float(rank().detach()) < 0.8 * first


def test_rank_negatives_mix_near_annulus_and_uniform_map() -> None:
    """``rank_near_fraction`` of the negatives lie 2-10 m from the truth; the rest cover the map bounds."""
    from dmn_ros.geometry import MetricScale
    from dmn_ros.training.trainer import EpisodeLoss

    cfg = load_config(None, ["rank_weight=1", "rank_negatives=40", "rank_near_fraction=0.25",
                             "rank_near_radius_m=[2.0, 10.0]"])
    scale = MetricScale(20.0)  # 20 m per unit: the annulus is 0.1-0.5 units
    crit = EpisodeLoss(DMN(), cfg, scale, bounds=(-1.0, 1.0, -0.5, 0.5))
    truth = torch.tensor([[0.9, 0.4, 3.0], [-0.2, 0.0, -1.0]])
    torch.manual_seed(0)
    neg = crit.negatives(truth, 40)
    assert neg.shape == (2, 40, 3)
    near, uniform = neg[:, :10], neg[:, 10:]
    dist_m = torch.linalg.norm(near[..., :2] - truth[:, None, :2], dim=-1) * 20.0
    assert float(dist_m.min()) >= 2.0 - 1e-4 and float(dist_m.max()) <= 10.0 + 1e-4
    assert float(uniform[..., 0].min()) >= -1.0 and float(uniform[..., 0].max()) <= 1.0
    assert float(uniform[..., 1].min()) >= -0.5 and float(uniform[..., 1].max()) <= 0.5
    assert float(neg[..., 2].abs().max()) <= math.pi + 1e-6
    assert float(torch.linalg.norm(uniform[..., :2] - truth[:, None, :2], dim=-1).max()) * 20.0 > 10.0
    with pytest.raises(ValueError, match="rank_near_fraction"):
        load_config(None, ["rank_near_fraction=1.5"])
    with pytest.raises(ValueError, match="rank_near_radius_m"):
        load_config(None, ["rank_near_radius_m=[5.0, 2.0]"])


def test_mined_negatives_are_the_best_scoring_far_poses(tiny_dataset: Path) -> None:
    """Mined negatives are the top scorers among the candidates farther than ``rank_hard_min_m``; the term trains."""
    from dmn_ros.filter import encode_map, init_uniform
    from dmn_ros.geometry import MetricScale
    from dmn_ros.training.trainer import EpisodeLoss

    cfg = load_config(None, ["rank_weight=1", "rank_negatives=16", "rank_hard_fraction=0.25",
                             "rank_hard_candidates=64", "rank_hard_min_m=10.0", "num_particles=8"])
    torch.manual_seed(0)
    model = DMN()
    crit = EpisodeLoss(model, cfg, MetricScale(20.0))
    batch = _rank_batch(tiny_dataset, cfg)
    truth = batch["query_poses"][:, 0]
    pm = encode_map(model, images=batch["context_images"], poses=batch["context_poses"])
    q, hq = model.prepare_query(batch["query_images"][:, 0])
    torch.manual_seed(5)
    mined = crit.mined_negatives(pm, q, hq, truth, 4)
    assert mined.shape == (4, 4, 3) and not mined.requires_grad
    torch.manual_seed(5)  # the same candidates, scored here independently
    cand = init_uniform(batch=4, num_particles=64, bounds=crit.bounds).particles
    with torch.no_grad():
        ll = model.log_likelihood_prepared(pm.map_a, pm.map_g, pm.poses, q, hq, cand, 0)
    far = torch.linalg.norm(cand[..., :2] - truth[:, None, :2], dim=-1) * 20.0 >= 10.0
    for b in range(4):
        scores = ll[b][far[b]]
        want = cand[b][far[b]][scores.argsort(descending=True)[:4]]
        assert torch.allclose(mined[b], want)  # the four best far candidates, best first
        assert float(torch.linalg.norm(mined[b, :, :2] - truth[b, :2], dim=-1).min()) * 20.0 >= 10.0

    def rank() -> torch.Tensor:
        p = encode_map(model, images=batch["context_images"], poses=batch["context_poses"])
        return crit.rank_loss(p, batch["query_images"], batch["query_poses"])

    loss = rank()  # 12 uniform + 4 mined negatives
    loss.backward()
    assert float(loss.detach()) > 0 and model.cnn1_trunk[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="rank_hard_fraction"):
        load_config(None, ["rank_hard_fraction=0.6", "rank_near_fraction=0.5"])
    with pytest.raises(ValueError, match="rank_hard_candidates"):
        load_config(None, ["rank_hard_fraction=0.5", "rank_hard_candidates=8"])


def test_rank_positives_jitter_around_the_truth_and_keep_chance_at_one(tiny_dataset: Path) -> None:
    """Jittered positives have the configured spread; with every pose scored alike the term is still 1.0."""
    from dmn_ros.filter import encode_map
    from dmn_ros.geometry import MetricScale
    from dmn_ros.training.trainer import EpisodeLoss

    cfg = load_config(None, ["rank_weight=1", "rank_negatives=12", "rank_positives=4",
                             "rank_positive_std=[2.0, 2.0, 20.0]", "num_particles=8"])
    crit = EpisodeLoss(DMN(), cfg, MetricScale(20.0))
    truth = torch.tensor([[0.1, -0.3, 3.1]])
    torch.manual_seed(0)
    pos = crit.positives(truth, 20000)
    spread = (pos - truth[:, None]).std(dim=1)[0]
    assert float(spread[0]) * 20.0 == pytest.approx(2.0, rel=0.05)
    assert float(spread[1]) * 20.0 == pytest.approx(2.0, rel=0.05)
    assert float(pos[..., 2].abs().max()) <= math.pi  # wrapped: 3.1 rad plus 20° crosses ±π
    exact = EpisodeLoss(DMN(), load_config(None, ["rank_positives=3"]), MetricScale(20.0))
    assert torch.allclose(exact.positives(truth, 3), truth[:, None].expand(1, 3, 3), atol=1e-6)

    model = crit.model
    batch = _rank_batch(tiny_dataset, cfg)
    with torch.no_grad():
        model.fc1[-1].weight.zero_()  # every pose scores the bias
    pm = encode_map(model, images=batch["context_images"], poses=batch["context_poses"])
    chance = crit.rank_loss(pm, batch["query_images"], batch["query_poses"])
    assert float(chance.detach()) == pytest.approx(1.0, abs=1e-6)  # log((4 + 12) / 4) normalized
    with pytest.raises(ValueError, match="rank_positives"):
        load_config(None, ["rank_positives=0"])


def test_truth_rank_selects_the_best_checkpoint(tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "rank"
    cfg = load_config(None, [f"data={tiny_dataset}", f"out={out}", "max_steps=2", *SMALL, "val_every=1",
                             "rank_weight=1", "rank_negatives=7", "val_metric=truth_rank",
                             "curriculum=[{until_step: 100, context_mode: random, num_contexts: [2, 2]}]"])
    train(cfg, progress=False)
    best = load_checkpoint(out / CHECKPOINT_BEST)
    assert -1.0 <= best["best_val"] <= 0.0  # minus the truth rank, a share in [0, 1]
    assert load_checkpoint(out / CHECKPOINT_LAST)["best_val"] <= best["best_val"]
    with pytest.raises(ValueError, match="val_metric"):
        load_config(None, ["val_metric=accuracy"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_training_on_cuda_without_cuda_is_a_clear_error(tiny_dataset: Path, tmp_path: Path) -> None:
    """A run that asked for a GPU must not silently crawl on the CPU for hours."""
    cfg = load_config(None, [f"data={tiny_dataset}", f"out={tmp_path / 'cuda'}", "device=cuda", "max_steps=1",
                             *SMALL])
    with pytest.raises(ValueError, match="CUDA is not available"):
        train(cfg, progress=False)


def test_resume_uses_the_checkpoints_model_and_scale_not_init(tiny_dataset: Path, tmp_path: Path) -> None:
    """A resumed run rebuilds what its checkpoint recorded (kind, architecture, metric scale); init is not read."""
    base = tmp_path / "base"
    train(load_config(None, [f"data={tiny_dataset}", f"out={base}", "max_steps=1", *SMALL,
                             "model.kind=latent_vector"]), progress=False)
    init = tmp_path / "init.pt"
    (base / "model.pt").rename(init)
    out = tmp_path / "ft"
    cfg = load_config(None, [f"data={tiny_dataset}", f"out={out}", f"init={init}", "max_steps=1", *SMALL])
    train(cfg, progress=False)
    init.unlink()  # e.g. a fine-tune from a file that has since moved
    state = load_checkpoint(out / CHECKPOINT_LAST)
    assert state["model_config"]["kind"] == "latent_vector" and state["step"] == 1
    from dmn_ros.training.trainer import save_checkpoint

    save_checkpoint(out / CHECKPOINT_LAST, {**state, "meters_per_unit": 10.0})  # the run's scale, not the data's 20
    train(cfg.__class__(**{**cfg.__dict__, "max_steps": 2}), progress=False)
    assert load_checkpoint(out / CHECKPOINT_LAST)["step"] == 2
    info = load_model(out / "model.pt").info
    assert info.config["kind"] == "latent_vector" and info.meters_per_unit == 10.0
    with pytest.raises(ValueError, match="overrides change the architecture"):  # contradicts the recorded kind
        train(cfg.__class__(**{**cfg.__dict__, "max_steps": 3, "model": {"kind": "dmn"}}), progress=False)


def test_fresh_run_never_exports_an_earlier_runs_checkpoint(tiny_dataset: Path, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "run"
    cfg = load_config(None, [f"data={tiny_dataset}", f"out={out}", "max_steps=2", *SMALL])
    train(cfg, progress=False)
    assert (out / CHECKPOINT_BEST).is_file()
    # --no-resume, and no validation in this run: nothing of the earlier run may be exported.
    caplog.set_level("WARNING")
    train(cfg.__class__(**{**cfg.__dict__, "max_steps": 1, "val_every": 100, "seed": 1}), resume=False,
          progress=False)
    assert not (out / CHECKPOINT_BEST).is_file() and "earlier run" in caplog.text
    (kept,) = out.glob("checkpoint_best.earlier-*.pt")  # set aside, not deleted
    assert load_checkpoint(kept)["step"] == 2
    last = load_checkpoint(out / CHECKPOINT_LAST)
    assert last["step"] == 1
    assert load_model(out / "model.pt").info.fingerprint == weights_fingerprint(model_from_checkpoint(last))


def test_no_machine_specific_paths_data_is_required(tmp_path: Path) -> None:
    """dmn-train without data= is a clear error, never the authors' dataset; user-facing commands pass their paths."""
    from dmn_ros.training.config import TrainConfig

    assert TrainConfig().data == "" and not TrainConfig().out.startswith("/")
    cfg = load_config(None, [f"out={tmp_path / 'run'}"])
    with pytest.raises(ValueError, match="data= is required"):
        train(cfg, progress=False)
    assert not (tmp_path / "run").exists()
    from dmn_ros.evaluation.cli import main as eval_main

    with pytest.raises(SystemExit) as exc:  # --data has no default either
        eval_main(["--model", str(tmp_path / "m.pt")])
    assert exc.value.code == 2
    root = Path(__file__).resolve().parent.parent
    docs = [root / "README.md", *(p for p in sorted((root / "docs").glob("*.md")) if p.name != "RESULTS.md")]
    for doc in docs:  # docs/RESULTS.md keeps the authors' exact commands as the record of what was run
        text = doc.read_text().replace("\\\n", " ")  # code blocks' continued lines, and inline code across lines
        commands = [*(ln for ln in text.splitlines() if ln.count("`") % 2 == 0),
                    *(span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", text,
                                                                                         flags=re.S)))]
        for command in commands:
            if "--config config/train_" in command:
                assert "data=" in command and "out=" in command, f"{doc.name}: {command.strip()}"
    assert "/work/" not in (root / "README.md").read_text()
    script = (root / "scripts" / "compare_models.sh").read_text()
    assert "/work/" not in script and "${DATA:-data/maze32}" in script


def test_stage_start_is_where_the_stage_began() -> None:
    cfg = load_config(None, ["curriculum=[{until_step: 10, context_mode: near},"
                             " {until_step: 20, context_mode: random}]"])
    assert [cfg.stage_start(s) for s in (0, 9, 10, 19, 20, 500)] == [0, 0, 10, 10, 10, 10]
    assert load_config(None, []).stage_start(123) == 0


def test_resume_continues_exactly_as_an_uninterrupted_run(tiny_dataset: Path, tmp_path: Path) -> None:
    """6 steps straight equal 3 steps, a stop and a resume to 6: same batches, same random draws, with
    validations (forked random state) and a curriculum stage change in between."""
    common = [f"data={tiny_dataset}", *SMALL, "curriculum=[{until_step: 2, context_mode: near, num_contexts: [1, 2]},"
              " {until_step: 100, context_mode: random, num_contexts: [2, 3]}]"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(load_config(None, [*common, f"out={straight}", "max_steps=6"]), progress=False)
    train(load_config(None, [*common, f"out={split}", "max_steps=3"]), progress=False)
    train(load_config(None, [*common, f"out={split}", "max_steps=6"]), progress=False)
    a, b = load_checkpoint(straight / CHECKPOINT_LAST), load_checkpoint(split / CHECKPOINT_LAST)
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_validation_leaves_the_training_random_stream_alone_and_reports_success(tiny_dataset: Path) -> None:
    from dmn_ros.geometry import MetricScale
    from dmn_ros.training.trainer import EpisodeLoss, evaluate_loss, validation_batches

    cfg = load_config(None, [f"data={tiny_dataset}", *SMALL])
    crit = EpisodeLoss(DMN(), cfg, MetricScale(20.0))
    batches = validation_batches(cfg)
    cpu = torch.device("cpu")
    torch.manual_seed(5)
    before = torch.get_rng_state()
    val = evaluate_loss(crit, batches, cpu, success_m=8.94)
    assert torch.equal(torch.get_rng_state(), before)
    assert 0.0 <= val["success"] <= 1.0
    assert evaluate_loss(crit, batches, cpu, success_m=1e9)["success"] == 1.0
    assert evaluate_loss(crit, batches, cpu, success_m=0.0)["success"] == 0.0
    # the same draws every time: comparable numbers between validations
    assert evaluate_loss(crit, batches, cpu, success_m=8.94) == val


def test_resuming_an_early_stopped_run_only_exports(tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "stopped"
    cfg = load_config(None, [f"data={tiny_dataset}", f"out={out}", *SMALL, "lr=0", "patience=1", "val_every=1",
                             "max_steps=50"])
    train(cfg, progress=False)
    first = load_checkpoint(out / CHECKPOINT_LAST)
    assert first["step"] == 2 and first["bad_evals"] == 1  # step 1 sets the best, step 2 does not beat it
    (out / "model.pt").unlink()
    train(cfg, progress=False)
    assert load_checkpoint(out / CHECKPOINT_LAST)["step"] == 2
    load_model(out / "model.pt")


def test_truth_rank_selection_uses_the_runs_metric_scale(tiny_dataset: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A run at 10 m per unit on a 20 m-per-unit dataset scores its val poses at 10, as it trains."""
    from dmn_ros.evaluation import ranking
    from dmn_ros.training.trainer import save_checkpoint

    out = tmp_path / "scaled"
    base = [f"data={tiny_dataset}", f"out={out}", *SMALL, "val_every=1", "val_metric=truth_rank", "rank_weight=1",
            "rank_negatives=7", "curriculum=[{until_step: 100, context_mode: random, num_contexts: [2, 2]}]"]
    train(load_config(None, [*base, "max_steps=1"]), progress=False)
    save_checkpoint(out / CHECKPOINT_LAST, {**load_checkpoint(out / CHECKPOINT_LAST), "meters_per_unit": 10.0})
    seen: list[float] = []
    real = ranking.truth_rank

    def recording(model, episodes, **kw):  # the real ranking, recording the scale it was given
        seen.append(episodes.scale.meters_per_unit)
        return real(model, episodes, **kw)

    monkeypatch.setattr(ranking, "truth_rank", recording)
    train(load_config(None, [*base, "max_steps=2"]), progress=False)
    assert seen and set(seen) == {10.0}
    assert load_model(out / "model.pt").info.meters_per_unit == 10.0
