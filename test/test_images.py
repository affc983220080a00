"""Image decoding: every supported encoding, every rejected one, compressed frames, resize, tensor."""

from __future__ import annotations

import array

import cv2
import numpy as np
import pytest
import torch

from dmn_ros.errors import DmnError
from dmn_ros.images import (
    ImageDecodeError,
    decode_compressed,
    decode_raw,
    encode_raw,
    prepare_image,
    resize_rgb,
    to_tensor,
)


@pytest.fixture
def rgb() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)


def _raw(img: np.ndarray, pad: int = 0) -> tuple[int, int, int, bytes]:
    h, w = img.shape[:2]
    c = 1 if img.ndim == 2 else img.shape[2]
    rows = img.reshape(h, w * c)
    rows = np.concatenate([rows, np.zeros((h, pad), np.uint8)], axis=1)
    return h, w, w * c + pad, rows.tobytes()


def test_rgb8_identity_and_padding(rgb):
    for pad in (0, 3):
        h, w, step, data = _raw(rgb, pad)
        out = decode_raw(encoding="rgb8", height=h, width=w, step=step, data=data)
        assert out.dtype == np.uint8 and out.shape == (6, 5, 3)
        np.testing.assert_array_equal(out, rgb)


def test_bgr8_rgba8_bgra8_mono8(rgb):
    h, w, step, data = _raw(rgb[:, :, ::-1].copy())
    np.testing.assert_array_equal(decode_raw(encoding="bgr8", height=h, width=w, step=step, data=data), rgb)
    alpha = np.full((6, 5, 1), 7, np.uint8)
    h, w, step, data = _raw(np.concatenate([rgb, alpha], axis=2))
    np.testing.assert_array_equal(decode_raw(encoding="rgba8", height=h, width=w, step=step, data=data), rgb)
    h, w, step, data = _raw(np.concatenate([rgb[:, :, ::-1], alpha], axis=2))
    np.testing.assert_array_equal(decode_raw(encoding="bgra8", height=h, width=w, step=step, data=data), rgb)
    grey = rgb[:, :, 0].copy()
    h, w, step, data = _raw(grey, pad=1)
    out = decode_raw(encoding="mono8", height=h, width=w, step=step, data=data)
    assert out.shape == (6, 5, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], grey)


def test_rclpy_style_buffers(rgb):
    h, w, step, data = _raw(rgb)
    for buf in (array.array("B", data), bytearray(data), memoryview(data), np.frombuffer(data, np.uint8)):
        out = decode_raw(encoding="rgb8", height=h, width=w, step=step, data=buf)
        np.testing.assert_array_equal(out, rgb)


@pytest.mark.parametrize("encoding", ["16UC1", "32FC1", "bayer_rggb8", "yuv422", "", "nonsense"])
def test_unsupported_encodings(encoding):
    with pytest.raises(ImageDecodeError, match="unsupported image encoding"):
        decode_raw(encoding=encoding, height=2, width=2, step=8, data=b"\0" * 16)


def test_size_errors(rgb):
    h, w, step, data = _raw(rgb)
    with pytest.raises(ImageDecodeError, match="bytes"):
        decode_raw(encoding="rgb8", height=h, width=w, step=step, data=data[:-1])
    with pytest.raises(ImageDecodeError, match="bytes"):
        decode_raw(encoding="rgb8", height=h, width=w, step=step + 1, data=data)
    with pytest.raises(ImageDecodeError, match="step"):
        decode_raw(encoding="rgb8", height=h, width=w, step=w * 3 - 1, data=data)
    with pytest.raises(ImageDecodeError, match="zero size"):
        decode_raw(encoding="rgb8", height=0, width=w, step=step, data=b"")
    with pytest.raises(ImageDecodeError, match="zero size"):
        decode_raw(encoding="rgb8", height=h, width=0, step=0, data=b"")
    assert issubclass(ImageDecodeError, DmnError)


def test_encode_raw_roundtrip(rgb):
    for enc in ("rgb8", "bgr8"):
        h, w, step, data = encode_raw(rgb, enc)
        np.testing.assert_array_equal(decode_raw(encoding=enc, height=h, width=w, step=step, data=data), rgb)


def test_compressed_png_lossless_and_jpeg(rgb):
    ok, png = cv2.imencode(".png", rgb[:, :, ::-1])
    assert ok
    np.testing.assert_array_equal(decode_compressed(png.tobytes(), "png"), rgb)
    smooth = np.tile(np.linspace(0, 255, 16, dtype=np.uint8)[None, :, None], (16, 1, 3))
    ok, jpg = cv2.imencode(".jpg", smooth[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
    out = decode_compressed(jpg.tobytes(), "jpeg")
    assert out.shape == (16, 16, 3) and np.abs(out.astype(int) - smooth).max() < 12


def test_compressed_corrupt_and_empty():
    with pytest.raises(ImageDecodeError, match="corrupt"):
        decode_compressed(b"\x89PNG garbage bytes", "png")
    with pytest.raises(ImageDecodeError, match="empty"):
        decode_compressed(b"", "jpeg")


def test_resize_area_and_tensor():
    img = np.zeros((64, 64, 3), np.uint8)
    img[:, 32:] = 200
    small = resize_rgb(img, height=32, width=32)
    assert small.shape == (32, 32, 3)
    assert small[0, 0, 0] == 0 and small[0, 31, 0] == 200
    assert resize_rgb(small, height=32, width=32) is small
    t = to_tensor(small)
    assert t.shape == (3, 32, 32) and t.dtype == torch.float32
    assert float(t.max()) == pytest.approx(200 / 255) and float(t.min()) == 0.0
    p = prepare_image(img, height=16, width=8)
    assert p.shape == (3, 16, 8)
    with pytest.raises(ImageDecodeError):
        to_tensor(np.zeros((4, 4), np.uint8))
    with pytest.raises(ImageDecodeError):
        to_tensor(np.zeros((4, 4, 3), np.float32))


@pytest.mark.parametrize("empty", [np.zeros((0, 0, 3), np.uint8), np.zeros((0, 5, 3), np.uint8),
                                   np.zeros((4, 0, 3), np.float32), torch.zeros(3, 0, 0)])
def test_empty_images_are_decode_errors(empty):
    """An empty frame is an ImageDecodeError (the node counts it as a bad image), not a raw cv2/torch error."""
    from dmn_ros.images import as_model_image

    with pytest.raises(ImageDecodeError, match="empty"):
        as_model_image(empty, height=32, width=32)
    if isinstance(empty, np.ndarray):
        with pytest.raises(ImageDecodeError, match="empty"):
            resize_rgb(empty, height=32, width=32)


def test_to_tensor_converts_batches_as_single_images():
    """The one uint8 → float conversion: the data pipeline's (N, H, W, 3) stacks go through it too."""
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, size=(2, 4, 5, 6, 3), dtype=np.uint8)
    t = to_tensor(batch)
    assert t.shape == (2, 4, 3, 5, 6) and t.dtype == torch.float32
    torch.testing.assert_close(t[1, 2], to_tensor(batch[1, 2]), rtol=0, atol=0)
    assert float(t.max()) <= 1.0 and float(t.min()) >= 0.0
