"""The public Python API as a script uses it: the README example, image forms, build_map, localize."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from dmn_ros.errors import FingerprintMismatchError, MapError
from dmn_ros.images import ImageDecodeError, as_model_image
from dmn_ros.localizer import Localizer, LocalizerConfig, build_map, embed_images
from dmn_ros.maps import ViewMap

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
API_DOC = ROOT / "docs" / "api.md"
RNG = np.random.default_rng(7)


def _frames(n: int, size: tuple[int, int] = (40, 48)) -> np.ndarray:
    return RNG.integers(0, 256, size=(n, *size, 3), dtype=np.uint8)


def test_readme_example_runs_as_written(capsys):
    """The README promises its Python block runs unchanged on a fresh setup; this is that block."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) == 1, "the README has one Python example"
    exec(compile(blocks[0], str(README), "exec"), {"__name__": "readme_example"})
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("error")]
    assert len(lines) == 5  # one estimate per frame of the 5-step path
    for ln in lines:
        err, spread = (float(v) for v in re.findall(r"([\d.]+) m", ln))
        assert 0.0 <= err < 60.0 and 0.0 <= spread < 30.0  # inside the 40 m maze's diagonal


def test_api_doc_runs_as_one_script(capsys):
    """docs/api.md's blocks, in order and sharing one namespace, as the page says they run."""
    blocks = re.findall(r"```python\n(.*?)```", API_DOC.read_text(), re.S)
    assert len(blocks) >= 3
    ns: dict = {"__name__": "api_doc"}
    for block in blocks:
        exec(compile(block, str(API_DOC), "exec"), ns)
    out = capsys.readouterr().out
    assert ns["info"].fingerprint in out
    errors = [float(v) for v in re.findall(r"^error ([\d.]+) m", out, re.M)]
    assert len(errors) == 6
    # Tracking from 0.7 m off with the map of this maze: it must stay localized (the shipped model
    # tracks such starts within about a metre; a lost filter drifts by many metres in six frames).
    assert max(errors) < 3.0, errors


def test_every_image_form_gives_the_node_input():
    """uint8 HWC numpy is the node's path; torch, CHW and [0, 1] floats must reach the model identically."""
    img = _frames(1)[0]
    ref = as_model_image(img, height=32, width=32)
    assert ref.shape == (3, 32, 32) and ref.dtype == torch.float32
    forms = [
        torch.from_numpy(img),  # HWC uint8 tensor
        torch.from_numpy(img).permute(2, 0, 1),  # CHW uint8 tensor
        torch.from_numpy(img).permute(2, 0, 1).float() / 255.0,  # CHW float tensor
        img.astype(np.float32) / 255.0,  # HWC float32 numpy
        img.astype(np.float64) / 255.0,  # HWC float64 numpy
        np.ascontiguousarray(img.transpose(2, 0, 1)),  # CHW uint8 numpy
    ]
    for f in forms:
        out = as_model_image(f, height=32, width=32)
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32
        # uint8 resizing rounds to whole levels; the float path does not: half a level apart at most.
        assert float((out - ref).abs().max()) <= 0.5 / 255 + 1e-6
    same_size = as_model_image(img[:32, :32], height=32, width=32)
    np.testing.assert_array_equal(same_size.permute(1, 2, 0).numpy() * 255.0, img[:32, :32].astype(np.float32))


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (np.full((8, 8, 3), 200.0, dtype=np.float32), r"\[0, 1\]"),  # 0-255 floats
        (np.full((8, 8, 3), np.nan, dtype=np.float32), "non-finite"),
        (np.zeros((8, 8), dtype=np.uint8), "shape"),
        (np.zeros((8, 8, 4), dtype=np.uint8), "shape"),
        (np.zeros((8, 8, 3), dtype=np.int32), "int32"),
    ],
)
def test_bad_images_are_refused_with_a_reason(bad, match):
    with pytest.raises(ImageDecodeError, match=match):
        as_model_image(bad, height=32, width=32)


def test_build_map_carries_the_model_and_checks_poses(untrained):
    poses = np.array([[0.0, 0.0, 0.0], [5.0, 1.0, 1.5], [-3.0, 4.0, -2.0]])
    frames = _frames(3)
    vm = build_map(untrained, frames, poses, frame_id="site")
    assert isinstance(vm, ViewMap) and len(vm) == 3 and vm.frame_id == "site"
    assert vm.fingerprint == untrained.info.fingerprint
    assert vm.ids == ["view/000000", "view/000001", "view/000002"]
    np.testing.assert_allclose(vm.embeddings, embed_images(untrained, list(frames)), atol=1e-6)
    np.testing.assert_array_equal(vm.poses, poses)
    # The same views as a float torch batch, channels first, at the model's size (no resize rounding).
    small = _frames(3, size=(32, 32))
    as_torch = torch.from_numpy(small).permute(0, 3, 1, 2).float() / 255.0
    np.testing.assert_allclose(build_map(untrained, as_torch, poses).embeddings,
                               build_map(untrained, small, poses).embeddings, atol=1e-5)
    assert build_map(untrained, frames, poses, ids=["a", "b", "c"]).ids == ["a", "b", "c"]
    with pytest.raises(MapError, match=r"\(3, 3\)"):
        build_map(untrained, frames, poses[:2])
    with pytest.raises(MapError, match="non-finite"):
        build_map(untrained, frames, np.where(poses == 5.0, np.nan, poses))
    foreign = ViewMap(fingerprint="0" * 16, meters_per_unit=vm.meters_per_unit, embed_shape=vm.embed_shape)
    foreign.add(embeddings=vm.embeddings, poses=vm.poses, ids=vm.ids)
    with pytest.raises(FingerprintMismatchError):
        Localizer(untrained, config=LocalizerConfig(device="cpu")).set_map(foreign)


def test_localize_is_step_with_odometry_differences(untrained):
    """localize() must be exactly the node's per-frame step with the odometry change between frames."""
    poses = np.array([[0.0, 0.0, 0.0], [6.0, 3.0, 1.0], [-4.0, 2.0, -2.0]])
    vm = build_map(untrained, _frames(3), poses)
    frames = _frames(4)
    odom = np.array([[10.0, 10.0, 0.0], [11.0, 10.0, 0.0], [11.0, 10.0, np.pi / 2], [11.0, 12.0, np.pi / 2]])
    cfg = LocalizerConfig(max_particles=128, tracking_particles=64, device="cpu")
    cov = np.diag([1.0, 1.0, 0.05])

    a = Localizer(untrained, config=cfg, seed=3)
    a.set_map(vm)
    a.init_pose([0.0, 0.0, 0.0], cov)
    got = a.localize(frames, odometry=odom)

    b = Localizer(untrained, config=cfg, seed=3)
    b.set_map(vm)
    b.init_pose([0.0, 0.0, 0.0], cov)
    # In the frame of the previous odometry pose: 1 m forward; a quarter turn; 2 m forward.
    deltas = [None, [1.0, 0.0, 0.0], [0.0, 0.0, np.pi / 2], [2.0, 0.0, 0.0]]
    want = [b.step(f, d) for f, d in zip(frames, deltas, strict=True)]
    assert len(got) == 4
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g.mean, w.mean, atol=1e-5)
        np.testing.assert_allclose(g.covariance, w.covariance, atol=1e-5)
    np.testing.assert_allclose(a.particles_metric(), b.particles_metric(), atol=1e-5)
    # Without odometry the particles only diffuse by the motion noise, with no drift.
    c = Localizer(untrained, config=LocalizerConfig(max_particles=128, tracking_particles=4000,
                                                    motion_noise_xy_m=0.0, motion_noise_yaw_rad=0.0,
                                                    resample_threshold=0.0, device="cpu"), seed=3)
    c.set_map(vm)
    c.init_pose([1.0, 2.0, 0.5], cov)
    before = c.particles_metric()
    c.localize(frames[:2])
    np.testing.assert_allclose(c.particles_metric(), before, atol=1e-5)
    with pytest.raises(ValueError, match=r"\(4, 3\)"):
        a.localize(frames, odometry=odom[:3])
