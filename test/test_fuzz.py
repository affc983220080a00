"""Property tests (hypothesis): random bytes and fields into the message conversions and the file loaders.

Nothing may escape but the documented error types: ImageDecodeError (images), PoseInputError
(poses), MapError (map clouds and files), SharedContextError (shared contexts), ModelLoadError
(model files), ValueError (stamps, saved-pose files).
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmn_ros.errors import MapError, ModelLoadError
from dmn_ros.export import export_model, load_model
from dmn_ros.images import SUPPORTED_ENCODINGS, ImageDecodeError, decode_compressed, decode_raw
from dmn_ros.maps import ViewMap
from dmn_ros.model import DMN

rclpy = pytest.importorskip("rclpy")

from geometry_msgs.msg import Pose  # noqa: E402
from sensor_msgs.msg import PointCloud2, PointField  # noqa: E402

from dmn_ros.ros.conversions import (  # noqa: E402
    PoseInputError,
    pointcloud_to_shared_batch,
    pointcloud_to_view_map,
    pose_to_xyyaw,
    sec_to_stamp,
)
from dmn_ros.ros.localization_node import read_pose_file  # noqa: E402
from dmn_ros.sharing import SharedContextError  # noqa: E402

FAST = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
EMBED = (4, 2, 2)  # small embeddings keep the clouds small
FP = "0123456789abcdef"

sizes = st.one_of(st.integers(0, 12), st.sampled_from([2**31 - 1, 2**32 - 1, 10**6]))
floats = st.floats(allow_nan=True, allow_infinity=True)


@FAST
@given(encoding=st.one_of(st.sampled_from([*SUPPORTED_ENCODINGS, "16UC1", "32FC1", "RGB8", ""]), st.text(max_size=8)),
       height=sizes, width=sizes, step=sizes, data=st.binary(max_size=600))
def test_decode_raw_only_image_errors(encoding, height, width, step, data):
    try:
        out = decode_raw(encoding=encoding, height=height, width=width, step=step, data=data)
    except ImageDecodeError:
        return
    assert out.dtype == np.uint8 and out.shape == (height, width, 3)


png_head = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"


@FAST
@given(prefix=st.sampled_from([b"", png_head, b"\xff\xd8", b"\xff\xd8\xff\xc0\x00\x11\x08", b"GIF89a", b"BM"]),
       body=st.binary(max_size=300))
def test_decode_compressed_only_image_errors(prefix, body):
    try:
        out = decode_compressed(prefix + body, "fuzz")
    except ImageDecodeError:
        return
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3


@FAST
@given(vals=st.lists(floats, min_size=7, max_size=7))
def test_pose_to_xyyaw_only_pose_errors(vals):
    p = Pose()
    p.position.x, p.position.y, p.position.z = vals[:3]
    p.orientation.x, p.orientation.y, p.orientation.z, p.orientation.w = vals[3:]
    try:
        out = pose_to_xyyaw(p)
    except PoseInputError:
        return
    assert np.isfinite(out).all() and -np.pi - 1e-9 <= out[2] <= np.pi + 1e-9


@FAST
@given(t=floats)
def test_sec_to_stamp_value_error_only(t):
    try:
        stamp = sec_to_stamp(t)
    except ValueError:
        return
    assert stamp.sec + stamp.nanosec * 1e-9 == pytest.approx(t, abs=1e-6)


field_names = st.sampled_from(["x", "y", "z", "yaw", "id", f"emb_{FP}", "emb_ffff", "rgb8_2x2", "rgb8_-1x-1",
                               "rgb8_0x5", "rgb8_axb", "rgb8_", "emb_", "other"])
fields = st.lists(st.builds(PointField, name=field_names, offset=st.sampled_from([0, 4, 8, 12, 16, 32, 40, 48, 56, 70]),
                            datatype=st.integers(0, 9), count=st.sampled_from([0, 1, 3, 4, 12, 16, 32, 1000])),
                  max_size=6)


@st.composite
def clouds(draw):
    msg = PointCloud2()
    msg.header.frame_id = draw(st.sampled_from(["map", "", "odom"]))
    msg.height, msg.width = draw(st.integers(0, 3)), draw(st.integers(0, 4))
    msg.fields = draw(fields)
    msg.is_bigendian = draw(st.booleans())
    msg.point_step = draw(st.sampled_from([0, 4, 16, 32, 56, 59, 60, 68, 72, 100]))
    n = msg.height * msg.width * msg.point_step
    exact = draw(st.booleans())
    msg.data = draw(st.binary(min_size=n, max_size=n)) if exact and n < 2000 else draw(st.binary(max_size=300))
    return msg


@FAST
@given(msg=clouds(), ids=st.one_of(st.none(), st.lists(st.text(max_size=4), max_size=4)))
def test_map_cloud_only_map_errors(msg, ids):
    try:
        vm = pointcloud_to_view_map(msg, fingerprint=FP, embed_shape=EMBED, meters_per_unit=20.0, ids=ids)
    except MapError:
        return
    assert vm.embeddings.shape[1:] == EMBED and np.isfinite(vm.poses).all()


@FAST
@given(msg=clouds())
def test_shared_cloud_only_shared_errors(msg):
    try:
        batch = pointcloud_to_shared_batch(msg, embed_shape=EMBED)
    except SharedContextError:
        return
    assert len(batch.ids) == batch.poses.shape[0]


def _map_bytes(meta: object, tensors: dict[str, np.ndarray]) -> bytes:
    from safetensors.numpy import save

    return save(tensors, metadata={"dmn_map": json.dumps(meta)})


good_meta = {"format": "dmn_ros.map/1", "fingerprint": FP, "meters_per_unit": 20.0, "embed_shape": list(EMBED),
             "frame_id": "map", "ids": ["a/000001", "a/000002"]}
json_values = st.recursive(st.one_of(st.none(), st.booleans(), floats, st.integers(-10, 10**12), st.text(max_size=6)),
                           lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(st.text(max_size=4), c,
                                                                                        max_size=3)), max_leaves=8)


@FAST
@given(key=st.sampled_from([*good_meta, None]), value=json_values,
       emb_dtype=st.sampled_from(["<f4", "<f8", "<i4", "<f2"]), n_emb=st.integers(0, 3), n_pose=st.integers(0, 3),
       cut=st.one_of(st.none(), st.integers(0, 400)))
def test_map_file_only_map_errors(key, value, emb_dtype, n_emb, n_pose, cut):
    meta = dict(good_meta)
    if key is not None:
        meta[key] = value
    tensors = {"embeddings": np.ones((n_emb, *EMBED), dtype=emb_dtype), "poses": np.zeros((n_pose, 3))}
    data = _map_bytes(meta if key != "format" or value is not None else [1, 2], tensors)
    if cut is not None:
        data = data[:cut]
    try:
        vm = ViewMap.from_bytes(data, expected_fingerprint=FP)
    except MapError:
        return
    assert len(vm) == len(vm.ids) == vm.embeddings.shape[0] and vm.embeddings.dtype == np.float32


@FAST
@given(data=st.binary(max_size=400))
def test_map_file_random_bytes(data):
    with pytest.raises(MapError):
        ViewMap.from_bytes(struct.pack("<Q", len(data)) + data if data[:1] == b"{" else data)


@FAST
@given(text=st.one_of(st.text(max_size=200), st.builds(lambda d: "format: dmn_ros.pose/1\nframe_id: map\n" + d,
                                                       st.text(max_size=120))))
def test_pose_file_only_value_errors(tmp_path, text):
    path = tmp_path / "pose.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        mean, cov = read_pose_file(path, frame_id="map")
    except ValueError:
        return
    assert np.isfinite(mean).all() and cov.shape == (3, 3)


@pytest.fixture(scope="module")
def model_bytes(tmp_path_factory) -> bytes:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("fz") / "m.pt"
    export_model(DMN(), path, meters_per_unit=20.0)
    return path.read_bytes()


@settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_model_loader_only_model_errors(model_bytes, tmp_path, data):
    """Truncated, bit-flipped or random model files: ModelLoadError (or a model that loads intact)."""
    kind = data.draw(st.sampled_from(["truncate", "flip", "random"]))
    blob = bytearray(model_bytes)
    if kind == "truncate":
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    elif kind == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            blob[data.draw(st.integers(0, len(blob) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    else:
        blob = bytearray(data.draw(st.binary(max_size=2000)))
    path = tmp_path / "fuzz.pt"
    path.write_bytes(bytes(blob))
    try:
        m = load_model(path)
    except ModelLoadError:
        return
    assert m.info.fingerprint and m.info.embed_shape  # a flip in unused bytes can leave a loadable file


def test_no_pickle_in_user_file_loaders():
    """Safe files: every loader of a user-supplied file avoids pickle (grep of the package source)."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parent.parent / "dmn_ros"
    src = {p: p.read_text() for p in root.rglob("*.py")}
    for p, text in src.items():
        assert not re.search(r"^\s*import pickle|^\s*from pickle|pickle\.load|cPickle", text, re.M), p
        for m in re.finditer(r"np\.load\(([^)]*)\)", text):
            assert "allow_pickle=False" in m.group(1), (p, m.group(0))
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in m.group(1), (p, m.group(0))
        assert not re.search(r"yaml\.(load|unsafe_load|full_load)\(", text), p
    assert "safetensors" in src[root / "maps.py"] and "torch.jit.load" in src[root / "export.py"]


def test_io_roundtrip_sanity():
    """The strategies above can produce valid inputs too (the fuzzers are not only testing rejection)."""
    vm = ViewMap(fingerprint=FP, meters_per_unit=20.0, embed_shape=EMBED)
    vm.add(embeddings=np.ones((2, *EMBED)), poses=np.zeros((2, 3)), ids=["a/000001", "a/000002"])
    assert len(ViewMap.from_bytes(vm.to_bytes(), expected_fingerprint=FP)) == 2
    assert len(ViewMap.from_bytes(_map_bytes(good_meta, {"embeddings": np.ones((2, *EMBED), "<f4"),
                                                         "poses": np.zeros((2, 3))}))) == 2
