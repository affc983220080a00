"""ViewMap: editing, safetensors round trip, fingerprint rejection, damaged files, atomic saves."""

from __future__ import annotations

import json
import os
from unittest import mock

import numpy as np
import pytest

from dmn_ros.errors import FingerprintMismatchError, MapError
from dmn_ros.maps import ViewMap


def _map(n: int = 3, fp: str = "abc123") -> ViewMap:
    rng = np.random.default_rng(1)
    m = ViewMap(fingerprint=fp, meters_per_unit=20.0, embed_shape=(4, 2, 2), frame_id="map")
    m.add(
        embeddings=rng.normal(size=(n, 4, 2, 2)).astype(np.float32),
        poses=np.column_stack([np.arange(n) * 1.5, -np.arange(n), np.linspace(-3, 3, n)]),
        ids=[f"robot1/{i:06d}" for i in range(n)],
    )
    return m


def test_add_replace_remove_clear():
    m = _map(3)
    assert len(m) == 3 and m.embeddings.dtype == np.float32 and m.poses.shape == (3, 3)
    m.add(embeddings=np.ones((1, 4, 2, 2)), poses=np.array([[9.0, 9.0, 0.0]]), ids=["robot1/000001"])
    assert len(m) == 3 and m.ids[-1] == "robot1/000001"
    np.testing.assert_array_equal(m.poses[-1], [9, 9, 0])
    assert m.extent() == (0.0, 9.0, -2.0, 9.0)
    assert m.remove(["robot1/000000", "nope"]) == 1 and len(m) == 2
    m.clear()
    assert len(m) == 0 and m.extent() is None and m.embeddings.shape == (0, 4, 2, 2)


def test_add_validates():
    m = _map(1)
    with pytest.raises(MapError, match="shape"):
        m.add(embeddings=np.zeros((1, 4, 2, 3)), poses=np.zeros((1, 3)), ids=["a"])
    with pytest.raises(MapError, match="poses"):
        m.add(embeddings=np.zeros((1, 4, 2, 2)), poses=np.zeros((1, 2)), ids=["a"])
    with pytest.raises(MapError, match="non-finite"):
        m.add(embeddings=np.zeros((1, 4, 2, 2)), poses=np.array([[np.nan, 0, 0]]), ids=["a"])


def test_roundtrip(tmp_path):
    m = _map(4)
    path = tmp_path / "maps" / "m.safetensors"
    m.save(path)
    back = ViewMap.load(path, expected_fingerprint="abc123")
    assert back.ids == m.ids and back.frame_id == "map" and back.fingerprint == "abc123"
    assert back.embed_shape == (4, 2, 2) and back.meters_per_unit == 20.0
    np.testing.assert_array_equal(back.embeddings, m.embeddings)
    np.testing.assert_array_equal(back.poses, m.poses)
    # No pickle: the file is a safetensors header (JSON) followed by raw tensor bytes.
    raw = path.read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert set(header) == {"__metadata__", "embeddings", "poses"}
    # An empty map round-trips too.
    empty = ViewMap(fingerprint="abc123", meters_per_unit=20.0, embed_shape=(4, 2, 2))
    empty.save(tmp_path / "e.safetensors")
    assert len(ViewMap.load(tmp_path / "e.safetensors")) == 0


def test_fingerprint_rejected(tmp_path):
    _map(2, fp="other").save(tmp_path / "m.safetensors")
    with pytest.raises(FingerprintMismatchError, match="other"):
        ViewMap.load(tmp_path / "m.safetensors", expected_fingerprint="abc123")
    assert issubclass(FingerprintMismatchError, MapError)


def test_corrupt_truncated_missing(tmp_path):
    path = tmp_path / "m.safetensors"
    _map(3).save(path)
    data = path.read_bytes()
    for bad in (data[: len(data) // 2], data[:5], b"", b"\x00" * 64, b"not a map at all" * 10):
        path.write_bytes(bad)
        with pytest.raises(MapError):
            ViewMap.load(path)
    with pytest.raises(MapError, match="cannot read"):
        ViewMap.load(tmp_path / "missing.safetensors")


def test_failed_save_keeps_previous_file(tmp_path):
    path = tmp_path / "m.safetensors"
    _map(2).save(path)
    before = path.read_bytes()
    with mock.patch("os.fsync", side_effect=OSError("disk full")), pytest.raises(OSError):
        _map(5).save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left
    assert len(ViewMap.load(path)) == 2
    assert os.stat(path).st_size == len(before)
