"""The paper's alternative models (SPEC "Baselines"): latent image map + PF, latent vector map + PF, regression."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dmn_ros.data.torch_dataset import EpisodeDataset
from dmn_ros.errors import FingerprintMismatchError, ModelLoadError
from dmn_ros.export import META_FILE, export_model, load_model
from dmn_ros.geometry import MetricScale
from dmn_ros.localizer import Localizer, LocalizerConfig, embed_images
from dmn_ros.maps import ViewMap
from dmn_ros.model import DMN, LatentImageMap, LatentVectorMap, PoseRegression, build_model, model_config
from dmn_ros.model.latent_map import pose_channels
from dmn_ros.training.config import load_config
from dmn_ros.training.loss import pose_mse
from dmn_ros.training.trainer import load_checkpoint, make_loss, model_from_checkpoint, normalize_batch, train

LATENT = (LatentImageMap, LatentVectorMap)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _inputs(b: int = 2, n: int = 3, k: int = 5, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    ctx = torch.rand(b, n, 3, 32, 32, generator=g)
    cposes = torch.rand(b, n, 3, generator=g) * 2 - 1
    particles = torch.rand(b, k, 3, generator=g) * 2 - 1
    query = torch.rand(b, 3, 32, 32, generator=g)
    return ctx, cposes, particles, query


def _embed(model: torch.nn.Module, ctx: torch.Tensor) -> torch.Tensor:
    b, n = ctx.shape[:2]
    return model.embed_views(ctx.flatten(0, 1)).reshape(b, n, 64, 8, 8)


@pytest.mark.parametrize("cls", LATENT)
def test_latent_shapes_free_k_nc_and_chunking(cls) -> None:
    torch.manual_seed(0)
    model = cls().eval()
    for n, k in ((1, 1), (3, 7), (6, 40)):
        ctx, cposes, particles, query = _inputs(n=n, k=k)
        ll = model(query, _embed(model, ctx), cposes, particles)
        assert ll.shape == (2, k) and torch.isfinite(ll).all()
    # Chunking over particles (bounded memory) gives the same numbers.
    chunked = cls(max_rows=6)
    chunked.load_state_dict(model.state_dict())
    emb = _embed(model, ctx)
    torch.testing.assert_close(chunked(query, emb, cposes, particles), model(query, emb, cposes, particles))
    assert model_config(model)["kind"] == model.kind and build_model(model.config()).kind == model.kind


def test_latent_image_factorization_equals_literal_concatenation() -> None:
    """prepare_map/log_likelihood_prepared split the first convs by linearity; the literal reading concatenates."""
    torch.manual_seed(1)
    m = LatentImageMap().eval()
    ctx, cposes, particles, query = _inputs(n=4, k=6)
    b, n, k = 2, 4, 6
    emb = _embed(m, ctx)
    tiled = pose_channels(cposes)[..., None, None].expand(b, n, 4, 8, 8)
    x = torch.cat([emb, tiled], dim=2).reshape(b * n, 68, 8, 8)
    enc = m.enc_rest(torch.relu(m.enc_first.conv(x))).reshape(b, n, 64, 8, 8).mean(1)  # the latent image
    f = m.cnn5_head(m.query_trunk(query))
    ptile = pose_channels(particles)[..., None, None].expand(b, k, 4, 8, 8)
    x6 = torch.cat([enc.unsqueeze(1).expand(b, k, 64, 8, 8), f.unsqueeze(1).expand(b, k, 64, 8, 8), ptile], dim=2)
    h = m.cnn6_rest(torch.relu(m.cnn6_first(x6.reshape(b * k, -1, 8, 8))))
    literal = m.fc1(h).reshape(b, k)
    torch.testing.assert_close(m(query, emb, cposes, particles), literal, atol=1e-4, rtol=1e-4)
    map_a, _ = m.prepare_map(emb)
    torch.testing.assert_close(m.latent_map(map_a, cposes), enc, atol=1e-5, rtol=1e-5)


def test_latent_vector_map_is_one_vector_per_map() -> None:
    m = LatentVectorMap(vector_dim=16).eval()
    ctx, cposes, _, _ = _inputs(n=5)
    map_a, map_g = m.prepare_map(_embed(m, ctx))
    assert m.latent_map(map_a, cposes).shape == (2, 16) and map_g.shape == (2, 5, 0, 8, 8)
    # Context order does not matter: the map is a mean.
    perm = torch.tensor([4, 2, 0, 1, 3])
    torch.testing.assert_close(m.latent_map(map_a[:, perm], cposes[:, perm]), m.latent_map(map_a, cposes))


def test_regression_shapes_and_relative_pose() -> None:
    torch.manual_seed(0)
    m = PoseRegression().eval()
    ctx, cposes, _, query = _inputs(n=3)
    prev = torch.tensor([[0.2, -0.3, 3.0], [0.0, 0.5, -3.0]])
    out = m(query, _embed(m, ctx), cposes, prev)
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    assert (out[:, 2] >= -np.pi).all() and (out[:, 2] < np.pi).all()
    # The head starts small: the first estimate is near the previous one (the prior's mean at t = 0).
    assert (out[:, :2] - prev[:, :2]).abs().max() < 0.5


def _every_param_has_grad(model: torch.nn.Module) -> None:
    missing = [name for name, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
               or float(p.grad.abs().sum()) == 0.0]
    assert not missing, f"no gradient reaches {missing}"


@pytest.mark.parametrize("cls", LATENT)
def test_latent_gradients_reach_every_parameter(cls) -> None:
    torch.manual_seed(0)
    model = cls()
    ctx, cposes, particles, query = _inputs(n=3, k=4)
    ll = model(query, _embed(model, ctx), cposes, particles)
    (torch.log_softmax(ll, dim=1)[:, 0].sum() + ll.pow(2).mean()).backward()
    _every_param_has_grad(model)


def test_regression_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    model = PoseRegression()
    ctx, cposes, _, query = _inputs(n=3)
    out = model(query, _embed(model, ctx), cposes, torch.zeros(2, 3))
    pose_mse(out, torch.tensor([[0.3, 0.1, 1.0], [-0.2, 0.4, -1.0]])).backward()
    _every_param_has_grad(model)


@pytest.mark.parametrize("cls", LATENT)
def test_latent_export_round_trip_and_filter_interface(cls, tmp_path: Path) -> None:
    from dmn_ros.filter import FilterConfig, encode_map, filter_step, init_uniform

    torch.manual_seed(0)
    model = cls().eval()
    info = export_model(model, tmp_path / "m.pt", meters_per_unit=20.0)
    loaded = load_model(tmp_path / "m.pt")
    assert loaded.info.config["kind"] == model.kind and loaded.info.fingerprint == info.fingerprint
    assert loaded.info.embed_shape == (64, 8, 8)
    ctx, cposes, particles, query = _inputs(n=4, k=9)
    with torch.no_grad():
        for m in (model, loaded.module):
            pm = encode_map(m, images=ctx, poses=cposes)
            q, hq = m.prepare_query(query)
            ll = m.log_likelihood_prepared(pm.map_a, pm.map_g, pm.poses, q, hq, particles, 0)
            if m is model:
                eager = ll
        torch.testing.assert_close(ll, eager, atol=1e-5, rtol=1e-5)
        # The particle filter runs it unchanged.
        belief = init_uniform(batch=2, num_particles=16, bounds=(-1, 1, -1, 1), generator=torch.Generator())
        res = filter_step(loaded.module, belief=belief, prepared_map=pm, query=query, egomotion=None,
                          config=FilterConfig(nearest_contexts=2))
        assert torch.isfinite(res.mean).all() and res.log_likelihood.shape == (2, 16)


def test_regression_export_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = PoseRegression().eval()
    export_model(model, tmp_path / "r.pt", meters_per_unit=20.0)
    loaded = load_model(tmp_path / "r.pt")
    assert loaded.info.config["kind"] == "regression"
    ctx, cposes, _, query = _inputs(n=3)
    prev = torch.tensor([[0.1, 0.2, 0.3], [-0.5, 0.0, 2.0]])
    with torch.no_grad():
        eager = model(query, _embed(model, ctx), cposes, prev)
        scripted = loaded.module(query, _embed(loaded.module, ctx), cposes, prev)
    torch.testing.assert_close(scripted, eager, atol=1e-5, rtol=1e-5)
    from dmn_ros.localizer import Localizer

    with pytest.raises(ValueError, match="no observation model for the particle filter"):
        Localizer(loaded)


def _rewrite_meta(src: Path, dst: Path, **changes) -> None:
    extra = {META_FILE: ""}
    module = torch.jit.load(str(src), _extra_files=extra)
    meta = json.loads(extra[META_FILE])
    meta["config"].update(changes)
    buf = io.BytesIO()
    torch.jit.save(module, buf, _extra_files={META_FILE: json.dumps(meta)})
    dst.write_bytes(buf.getvalue())


def test_other_kind_maps_and_mislabelled_models_are_rejected(tmp_path: Path) -> None:
    torch.manual_seed(0)
    export_model(DMN(), tmp_path / "dmn.pt", meters_per_unit=20.0)
    export_model(LatentImageMap(), tmp_path / "lat.pt", meters_per_unit=20.0)
    dmn, lat = load_model(tmp_path / "dmn.pt"), load_model(tmp_path / "lat.pt")
    assert dmn.info.config["kind"] == "dmn" and dmn.info.fingerprint != lat.info.fingerprint
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8) for _ in range(3)]
    poses = np.array([[0.0, 0.0, 0.0], [4.0, 2.0, 1.0], [-3.0, 5.0, -2.0]])
    cfg = LocalizerConfig(max_particles=32, tracking_particles=16, device="cpu")

    dmn_map = ViewMap.for_model(dmn.info)
    dmn_map.add(embeddings=embed_images(dmn, images), poses=poses, ids=["a", "b", "c"])
    with pytest.raises(FingerprintMismatchError):
        Localizer(lat, config=cfg).set_map(dmn_map)
    with pytest.raises(FingerprintMismatchError):
        ViewMap.from_bytes(dmn_map.to_bytes(), expected_fingerprint=lat.info.fingerprint)

    # Its own map works through the unchanged Localizer.
    lat_map = ViewMap.for_model(lat.info)
    lat_map.add(embeddings=embed_images(lat, images), poses=poses, ids=["a", "b", "c"])
    loc = Localizer(lat, config=cfg, seed=0)
    loc.set_map(lat_map)
    loc.init_global()
    est = loc.step(images[0])
    assert np.isfinite(est.mean).all()

    # Metadata naming another kind than the archive holds, or no known kind, is refused at load.
    _rewrite_meta(tmp_path / "lat.pt", tmp_path / "as_regression.pt", kind="regression")
    with pytest.raises(ModelLoadError, match="lacks methods"):
        load_model(tmp_path / "as_regression.pt")
    _rewrite_meta(tmp_path / "lat.pt", tmp_path / "unknown.pt", kind="transformer")
    with pytest.raises(ModelLoadError, match="unknown model kind"):
        load_model(tmp_path / "unknown.pt")
    with pytest.raises(ValueError, match="does not take"):
        build_model({"kind": "latent_vector", "attention": False})


@pytest.mark.parametrize("kind", ["latent_image", "latent_vector", "regression"])
def test_twenty_steps_lower_the_loss(kind: str, tiny_dataset: Path, tmp_path: Path) -> None:
    """Overfit one fixed batch with the trainer's loss (same prior draws every step): the loss must fall."""
    cfg = load_config(None, [f"data={tiny_dataset}", f"model.kind={kind}", "num_particles=16", "init_offset=true"])
    torch.manual_seed(0)
    model = build_model({"image_height": 32, "image_width": 32, **cfg.model})
    crit = make_loss(model, cfg, MetricScale(20.0))
    ds = EpisodeDataset(str(tiny_dataset), "train", num_contexts=(3, 3), T=2, batch_size=4, query_mode="segment",
                        context_mode="near", seed=0, num_episodes=1)
    batch = normalize_batch(next(iter(ds)), MetricScale(20.0), torch.device("cpu"))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(21):
        torch.manual_seed(123)
        loss, mse = crit(batch)
        assert torch.isfinite(loss) and torch.isfinite(mse)
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("kind", ["latent_vector", "regression"])
def test_dmn_train_and_dmn_eval_run_the_baseline(kind: str, tiny_dataset: Path, tmp_path: Path) -> None:
    """dmn-train (checkpoint, export) and dmn-eval (same metrics) with ``model.kind``."""
    from dmn_ros.evaluation.cli import main as eval_main

    out = tmp_path / kind
    cfg = load_config(None, [f"data={tiny_dataset}", f"out={out}", f"model.kind={kind}", "max_steps=2", "batch_size=2",
                             "num_particles=8", "val_every=2", "val_episodes=2", "checkpoint_minutes=0"])
    exported = train(cfg, progress=False)
    loaded = load_model(exported)
    assert loaded.info.config["kind"] == kind
    state = load_checkpoint(out / "checkpoint_last.pt")
    assert state["model_config"]["kind"] == kind and model_from_checkpoint(state).kind == kind
    rc = eval_main(["--model", str(exported), "--data", str(tiny_dataset), "--out", str(tmp_path / "eval"),
                    "--episodes", "2", "--T", "5", "--k-global", "32", "--k-tracking", "16"])
    assert rc == 0
    summary = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert len(summary["global_success"]) == 5 and len(summary["tracking_rmse_m"]) == 5
    assert summary["method"] != "DMN"


def test_regression_eval_protocol_uses_prior_mean(tiny_dataset: Path) -> None:
    from dmn_ros.evaluation import EvalSettings, make_episode_set, run_regression

    eps = make_episode_set(str(tiny_dataset), num_episodes=3, num_contexts=4, T=3, seed=0)
    errs = run_regression(PoseRegression().eval(), eps, EvalSettings(mode="tracking", T=3, batch_episodes=2))
    assert errs.shape == (3, 3) and np.isfinite(errs).all()


def test_fine_tuning_init_keeps_the_kind(tmp_path: Path) -> None:
    from dmn_ros.export import weights_fingerprint
    from dmn_ros.training.trainer import load_init_model

    torch.manual_seed(0)
    info = export_model(LatentVectorMap(vector_dim=16), tmp_path / "v.pt", meters_per_unit=20.0)
    model, mpu, _ = load_init_model(tmp_path / "v.pt", image_size=(32, 32), overrides={"kind": "latent_vector"})
    assert isinstance(model, LatentVectorMap) and model.vector_dim == 16 and mpu == 20.0
    assert weights_fingerprint(model) == info.fingerprint
    with pytest.raises(ValueError, match="change the architecture"):
        load_init_model(tmp_path / "v.pt", image_size=(32, 32), overrides={"kind": "dmn"})
    # Checkpoints written before kinds existed have no "kind": they are DMNs.
    assert isinstance(model_from_checkpoint({"model_config": DMN().config(), "model": DMN().state_dict()}), DMN)


def test_dmn_eval_compare_rows_equal_each_models_own_run(tiny_dataset: Path, tmp_path: Path) -> None:
    """--compare puts other methods in the same table on the same episodes: each row is that model's own dmn-eval."""
    from dmn_ros.evaluation.cli import main as eval_main

    torch.manual_seed(0)
    export_model(DMN(), tmp_path / "dmn.pt", meters_per_unit=20.0)
    export_model(LatentVectorMap(), tmp_path / "vec.pt", meters_per_unit=20.0)
    export_model(PoseRegression(), tmp_path / "reg.pt", meters_per_unit=20.0)
    common = ["--data", str(tiny_dataset), "--episodes", "3", "--T", "5", "--k-global", "32", "--k-tracking", "16",
              "--no-health"]
    assert eval_main(["--model", str(tmp_path / "dmn.pt"), "--out", str(tmp_path / "all"), *common,
                      "--compare", f"latent vector={tmp_path / 'vec.pt'}", "--compare",
                      f"regression={tmp_path / 'reg.pt'}"]) == 0
    together = json.loads((tmp_path / "all" / "results.json").read_text())
    assert list(together["compared"]) == ["latent vector", "regression"]
    md = (tmp_path / "all" / "results.md").read_text()
    assert "| latent vector |" in md and "| regression |" in md
    for label, path in (("latent vector", "vec.pt"), ("regression", "reg.pt")):
        assert eval_main(["--model", str(tmp_path / path), "--out", str(tmp_path / label), *common]) == 0
        alone = json.loads((tmp_path / label / "results.json").read_text())
        assert together["compared"][label]["global_success"] == alone["global_success"]
        assert together["compared"][label]["tracking_rmse_m"] == alone["tracking_rmse_m"]
    with pytest.raises(SystemExit, match="LABEL=MODEL"):
        eval_main(["--model", str(tmp_path / "dmn.pt"), *common, "--compare", str(tmp_path / "vec.pt")])
