"""Localizer: shapes, metric ↔ normalized conversion, initialization, steps, map handling."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from dmn_ros.errors import FingerprintMismatchError
from dmn_ros.export import LoadedModel, default_model_path, load_model
from dmn_ros.geometry import compose
from dmn_ros.localizer import Estimate, Localizer, LocalizerConfig, NotReadyError, embed_images
from dmn_ros.maps import ViewMap


@pytest.fixture(scope="module")
def model(untrained):
    """The conftest untrained model under this module's name."""
    return untrained


def _images(n: int, seed: int = 0, size: int = 32) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8) for _ in range(n)]


def _view_map(model, poses: np.ndarray) -> ViewMap:
    m = ViewMap.for_model(model.info)
    ids = [f"r/{i}" for i in range(len(poses))]
    m.add(embeddings=embed_images(model, _images(len(poses))), poses=poses, ids=ids)
    return m


CFG = LocalizerConfig(max_particles=64, tracking_particles=16, device="cpu")


def test_embed_images_shape(model):
    emb = embed_images(model, _images(3, size=48))  # resized to the model's 32×32
    assert emb.shape == (3, *model.info.embed_shape) and emb.dtype == np.float32


def test_embed_and_localize_where_the_module_really_is(model):
    """A LoadedModel whose ``device`` field is stale (here: says meta, the module is on the CPU) still works."""
    own = load_model(model.path)
    stale = LoadedModel(own.module, own.info, torch.device("meta"), own.path)
    np.testing.assert_array_equal(embed_images(stale, _images(2)), embed_images(own, _images(2)))
    loc = Localizer(stale, config=CFG, seed=0)
    assert loc.model.module is own.module  # already on the Localizer's device: shared, not copied
    loc.set_map(_view_map(own, np.array([[0.0, 0.0, 0.0], [4.0, 2.0, 1.0]])))
    loc.init_global()
    assert np.isfinite(loc.step(_images(1)[0]).mean).all()


# torch's own ScriptModule.to("meta") reads .grad of non-leaf tensors while it fails; not ours to fix
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
def test_localizer_never_moves_the_callers_module(model):
    """The Localizer runs its own copy on its device; the caller's module (used by build_map, embed_images,
    other Localizers) stays where its LoadedModel says. Meta is the other device a CPU-only machine has: the
    move fails there (a clear ValueError), on the copy."""
    own = load_model(model.path)
    with pytest.raises(ValueError, match="cannot run the model on device meta"):
        Localizer(own, config=replace(CFG, device="meta"), seed=0)
    assert {p.device.type for p in own.module.parameters()} == {"cpu"} and own.device == torch.device("cpu")
    assert embed_images(own, _images(1)).shape == (1, *own.info.embed_shape)


def test_not_ready_until_map_and_belief(model):
    loc = Localizer(model, config=CFG, seed=0)
    assert not loc.ready
    with pytest.raises(NotReadyError):
        loc.step(_images(1)[0])
    with pytest.raises(NotReadyError):
        loc.init_global()  # no map, no bounds
    loc.set_map(_view_map(model, np.array([[0.0, 0.0, 0.0], [4.0, 2.0, 1.0]])))
    assert loc.has_map and not loc.ready
    loc.init_global()
    assert loc.ready and loc.mode == "global"


def test_global_init_bounds_metric(model):
    loc = Localizer(model, config=CFG, seed=0)
    poses = np.array([[100.0, 50.0, 0.0], [110.0, 56.0, 1.0]])  # far from the origin: origin moves to the map
    loc.set_map(_view_map(model, poses))
    loc.init_global()
    p = loc.particles_metric()
    assert p.shape == (64, 3)
    assert p[:, 0].min() >= 98.0 - 1e-4 and p[:, 0].max() <= 112.0 + 1e-4
    assert p[:, 1].min() >= 48.0 - 1e-4 and p[:, 1].max() <= 58.0 + 1e-4
    assert np.all(np.abs(p[:, 2]) <= math.pi + 1e-6)
    # normalized particles are centred on the map: |x| ≤ (7 + 2) / 20
    assert float(loc.belief.particles[..., :2].abs().max()) <= 9.0 / 20.0 + 1e-5
    np.testing.assert_allclose(loc.weights(), np.full(64, 1 / 64), rtol=1e-5)
    loc.init_global((0.0, 1.0, 2.0, 3.0))
    p = loc.particles_metric()
    assert p[:, 0].min() >= -1e-5 and p[:, 0].max() <= 1.0 + 1e-5 and p[:, 1].min() >= 2.0 - 1e-5


def test_init_pose_metric_covariance(model):
    cfg = LocalizerConfig(max_particles=64, tracking_particles=4000, device="cpu")
    loc = Localizer(model, config=cfg, seed=1)
    loc.set_map(_view_map(model, np.array([[10.0, -5.0, 0.0], [14.0, -1.0, 2.0]])))
    cov = np.diag([4.0, 1.0, 0.04])
    cov[0, 1] = cov[1, 0] = 1.0
    loc.init_pose([12.0, -3.0, 0.5], cov)
    assert loc.mode == "tracking"
    p = loc.particles_metric()
    assert p.shape == (4000, 3)
    np.testing.assert_allclose(p.mean(axis=0), [12.0, -3.0, 0.5], atol=0.1)
    np.testing.assert_allclose(np.cov(p.T), cov, atol=0.25 * np.abs(cov).max() * 0.5 + 0.01)
    mean, c = loc.current_estimate()
    np.testing.assert_allclose(mean, [12.0, -3.0, 0.5], atol=0.1)
    assert c[0, 0] == pytest.approx(4.0, rel=0.1) and c[2, 2] == pytest.approx(0.04, rel=0.15)
    with pytest.raises(ValueError):
        loc.init_pose([np.nan, 0, 0], np.eye(3))
    with pytest.raises(ValueError):
        loc.init_pose([0, 0, 0], -np.eye(3))


def test_step_shapes_and_motion(model):
    # No motion noise and no resampling: each particle moves exactly by Δ composed in its own frame.
    cfg = LocalizerConfig(
        max_particles=32, tracking_particles=8, motion_noise_xy_m=0.0, motion_noise_yaw_rad=0.0,
        resample_threshold=0.0, device="cpu",
    )
    loc = Localizer(model, config=cfg, seed=0)
    loc.set_map(_view_map(model, np.array([[0.0, 0.0, 0.0], [6.0, 3.0, 1.0], [-4.0, 2.0, -2.0]])))
    loc.init_pose([1.0, 1.0, 0.3], np.diag([1.0, 1.0, 0.1]))
    before = loc.particles_metric()
    delta = np.array([1.0, 0.5, 0.2])
    est = loc.step(_images(1, seed=5, size=64)[0], delta)
    assert isinstance(est, Estimate)
    assert est.mean.shape == (3,) and est.covariance.shape == (3, 3) and est.num_particles == 8
    assert 1.0 <= est.ess <= 8.0 + 1e-4 and est.latency_ms > 0 and est.spread >= 0
    np.testing.assert_allclose(est.covariance, est.covariance.T, atol=1e-9)
    after = loc.particles_metric()
    np.testing.assert_allclose(after, compose(before, np.broadcast_to(delta, before.shape)), atol=1e-4)
    w = loc.weights()
    assert w.shape == (8,) and w.sum() == pytest.approx(1.0, abs=1e-5)
    # Weighted mean of the particles is the reported estimate (x, y).
    np.testing.assert_allclose(est.mean[:2], (w[:, None] * after[:, :2]).sum(0), atol=1e-4)
    # A float tensor frame works, and nomotion_update leaves particles in place.
    est2 = loc.nomotion_update(torch.rand(3, 32, 32))
    np.testing.assert_allclose(loc.particles_metric(), after, atol=1e-5)
    assert est2.num_particles == 8
    with pytest.raises(ValueError):
        loc.step(_images(1)[0], [np.nan, 0, 0])


def test_cluster_radius_publishes_the_heaviest_mode(model):
    """With ``cluster_radius_m`` the estimate is the heaviest disc's mean, in metres, not the weighted mean."""
    with pytest.raises(ValueError, match="cluster_radius_m"):
        Localizer(model, config=LocalizerConfig(cluster_radius_m=-1.0, device="cpu"))
    cfg = LocalizerConfig(max_particles=256, tracking_particles=256, resample_threshold=0.0, cluster_radius_m=3.0,
                          device="cpu")
    loc = Localizer(model, config=cfg, seed=0)
    loc.set_map(_view_map(model, np.array([[0.0, 0.0, 0.0], [6.0, 3.0, 1.0]])))
    loc.init_global((-20.0, 20.0, -20.0, 20.0))
    est = loc.step(_images(1, seed=5)[0], None)
    p, w = loc.particles_metric(), loc.weights()
    seeds = p[np.argsort(w)[-64:], :2]
    mass = [w[np.hypot(*(p[:, :2] - s).T) <= 3.0].sum() for s in seeds]
    inside = np.hypot(*(p[:, :2] - seeds[int(np.argmax(mass))]).T) <= 3.0
    expected = (w[inside, None] * p[inside, :2]).sum(0) / w[inside].sum()
    np.testing.assert_allclose(est.mean[:2], expected, atol=1e-3)
    assert np.hypot(*(est.mean[:2] - (w[:, None] * p[:, :2]).sum(0))) > 0.5  # a uniform belief's mean differs
    np.testing.assert_allclose(loc.current_estimate()[0][:2], expected, atol=1e-3)


def test_map_fingerprint_and_origin_shift(model):
    loc = Localizer(model, config=CFG, seed=0)
    foreign = ViewMap(fingerprint="0000", meters_per_unit=20.0, embed_shape=model.info.embed_shape)
    with pytest.raises(FingerprintMismatchError):
        loc.set_map(foreign)
    loc.set_map(_view_map(model, np.array([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0]])))
    loc.init_pose([1.0, 0.0, 0.0], np.diag([0.5, 0.5, 0.1]))
    before = loc.particles_metric()
    # A new map with another centre keeps the belief where it is in meters.
    loc.set_map(_view_map(model, np.array([[30.0, 10.0, 0.0], [34.0, 12.0, 0.0]])))
    np.testing.assert_allclose(loc.particles_metric(), before, atol=1e-4)
    warnings = loc.set_map(_view_map(model, np.array([[0.0, 0.0, 0.0], [200.0, 0.0, 0.0]])))
    assert warnings and "twice" in warnings[0]
    loc.set_map(ViewMap.for_model(model.info))  # empty map: no steps
    assert not loc.ready


@pytest.mark.slow
def test_trained_model_tracking_converges():
    """Accuracy check with the shipped model; skipped only when ``models/dmn_maze32.pt`` is absent."""
    path = default_model_path()
    if not path.is_file():
        pytest.skip(f"trained model {path} not present")
    from dmn_ros.data import egomotion_from_poses
    from dmn_ros.worlds import make_world, smooth_trajectory

    model = load_model(path)
    errs = []
    for seed in range(20_000_000, 20_000_004):
        rng = np.random.default_rng(seed)
        with make_world("maze", seed=seed, image_size=(model.info.image_height, model.info.image_width)) as w:
            ctx = w.sample_free_poses(32, rng)
            traj = smooth_trajectory(w, rng, steps=5)
            ctx_img, q_img = w.render(ctx), w.render(traj)
        vm = ViewMap.for_model(model.info)
        vm.add(embeddings=embed_images(model, list(ctx_img)), poses=ctx, ids=[str(i) for i in range(32)])
        loc = Localizer(model, config=LocalizerConfig(device="cpu"), seed=seed)
        loc.set_map(vm)
        loc.init_pose(traj[0] + rng.normal(0, [2.0, 2.0, 0.2]), np.diag([36.0, 36.0, math.radians(30) ** 2]))
        ego, _ = egomotion_from_poses(traj)
        for t in range(5):
            est = loc.step(q_img[t], None if t == 0 else ego[t])
        errs.append(float(np.hypot(*(est.mean[:2] - traj[-1, :2]))))
    rmse = float(np.sqrt(np.mean(np.square(errs))))
    assert rmse < 6.0, f"tracking RMSE at t=5 {rmse:.2f} m (errors {errs})"


def test_non_finite_likelihoods_refuse_the_frame_and_keep_the_belief(model):
    """A model that yields NaN likelihoods (here: NaN weights) raises DegenerateUpdateError; the belief and
    health stay as they were instead of every weight turning NaN for good."""
    import copy

    from dmn_ros.errors import DmnError
    from dmn_ros.localizer import DegenerateUpdateError

    broken = copy.deepcopy(model.module)
    with torch.no_grad():
        for p in broken.parameters():
            p.fill_(float("nan"))
    loc = Localizer(LoadedModel(broken, model.info, model.device, model.path), config=CFG, seed=0)
    loc.set_map(_view_map(model, np.array([[0.0, 0.0, 0.0], [4.0, 2.0, 1.0]])))
    loc.init_pose([1.0, 1.0, 0.0], np.diag([0.5, 0.5, 0.1]))
    particles, weights, health = loc.particles_metric(), loc.weights(), loc.health_state
    with pytest.raises(DegenerateUpdateError, match="belief unchanged") as err:
        loc.step(_images(1)[0], [0.5, 0.0, 0.0])
    assert isinstance(err.value, DmnError)  # the localization node counts it as a step error and goes on
    np.testing.assert_array_equal(loc.particles_metric(), particles)
    np.testing.assert_array_equal(loc.weights(), weights)
    assert loc.health_state == health and np.isfinite(loc.weights()).all()


def test_load_model_device_names(model):
    """``auto`` works as in LocalizerConfig; a CUDA request without CUDA, or an unknown name, is a ModelLoadError
    that says so (not a raw RuntimeError, nor "not a readable TorchScript archive")."""
    from dmn_ros.errors import ModelLoadError

    assert load_model(model.path, device="auto").device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ModelLoadError, match="unknown device 'gpu'"):
        load_model(model.path, device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            load_model(model.path, device="cuda")
