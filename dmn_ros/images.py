"""Camera frames from plain message fields to the model's input, without ROS.

The nodes, the demo and the bag tools all decode images here, so one set of
rules decides what an acceptable frame is. Functions take the fields of a
``sensor_msgs/Image`` (encoding, height, width, step, data) or the bytes of a
``CompressedImage``, never the messages, so this module imports no ROS code.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from dmn_ros.errors import DmnError

__all__ = [
    "MAX_COMPRESSED_PIXELS",
    "SUPPORTED_ENCODINGS",
    "ImageDecodeError",
    "as_model_image",
    "compressed_size",
    "decode_compressed",
    "decode_raw",
    "encode_raw",
    "prepare_image",
    "resize_rgb",
    "to_tensor",
]


class ImageDecodeError(DmnError):
    """A frame cannot be turned into an RGB image: unsupported encoding, bad size or corrupt bytes."""


# encoding -> (channels, cv2 conversion to RGB or None)
_ENCODINGS: dict[str, tuple[int, int | None]] = {
    "rgb8": (3, None),
    "bgr8": (3, cv2.COLOR_BGR2RGB),
    "rgba8": (4, cv2.COLOR_RGBA2RGB),
    "bgra8": (4, cv2.COLOR_BGRA2RGB),
    "mono8": (1, cv2.COLOR_GRAY2RGB),
}
SUPPORTED_ENCODINGS: tuple[str, ...] = tuple(_ENCODINGS)
"""Raw encodings :func:`decode_raw` accepts (8-bit colour or grey); depth/float encodings are refused."""


def _as_bytes_array(data: object) -> np.ndarray:
    """bytes, bytearray, memoryview, ``array.array('B')`` (rclpy's ``uint8[]``) or ndarray → flat uint8."""
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).view(np.uint8).ravel()
    try:
        return np.frombuffer(data, dtype=np.uint8)  # type: ignore[call-overload]
    except (TypeError, ValueError) as exc:
        raise ImageDecodeError(f"image data of type {type(data).__name__} is not a byte buffer") from exc


def decode_raw(*, encoding: str, height: int, width: int, step: int, data: bytes | bytearray | memoryview |
               np.ndarray) -> np.ndarray:
    """``sensor_msgs/Image`` fields → RGB uint8 ``(H, W, 3)`` (a fresh, contiguous array).

    ``step`` is the row length in bytes and may include padding; ``data`` must hold
    exactly ``height * step`` bytes.
    """
    enc = (encoding or "").lower()
    if enc not in _ENCODINGS:
        raise ImageDecodeError(
            f"unsupported image encoding {encoding!r}; expected one of {', '.join(SUPPORTED_ENCODINGS)}"
        )
    channels, conversion = _ENCODINGS[enc]
    height, width, step = int(height), int(width), int(step)
    if height <= 0 or width <= 0:
        raise ImageDecodeError(f"image has zero size ({height}x{width})")
    if step < width * channels:
        raise ImageDecodeError(f"step {step} < width {width} × {channels} channels for {encoding}")
    buf = _as_bytes_array(data)
    if buf.size != height * step:
        raise ImageDecodeError(
            f"image data has {buf.size} bytes, expected height {height} × step {step} = {height * step}"
        )
    rows = buf.reshape(height, step)[:, : width * channels]
    img = rows.reshape(height, width, channels)
    if conversion is None:
        return np.ascontiguousarray(img)
    if channels == 1:
        img = img[:, :, 0]
    return cv2.cvtColor(np.ascontiguousarray(img), conversion)


def encode_raw(rgb: np.ndarray, encoding: str = "rgb8") -> tuple[int, int, int, bytes]:
    """RGB uint8 ``(H, W, 3)`` → ``(height, width, step, data)`` for ``encoding`` (rgb8 or bgr8)."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ImageDecodeError(f"expected RGB uint8 (H, W, 3), got {rgb.dtype} {rgb.shape}")
    if encoding == "bgr8":
        rgb = rgb[:, :, ::-1]
    elif encoding != "rgb8":
        raise ImageDecodeError(f"cannot encode to {encoding!r}; use rgb8 or bgr8")
    h, w = rgb.shape[:2]
    return h, w, w * 3, np.ascontiguousarray(rgb).tobytes()


MAX_COMPRESSED_PIXELS = 64 * 1024 * 1024
"""Largest ``width · height`` a compressed frame may declare (a decompression bomb is refused unread)."""
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def compressed_size(buf: bytes) -> tuple[str, int, int]:
    """``(codec, width, height)`` from a PNG or JPEG header, without decoding; ImageDecodeError otherwise."""
    if buf.startswith(_PNG_MAGIC):
        if len(buf) < 24 or buf[12:16] != b"IHDR":
            raise ImageDecodeError("png header is truncated")
        return "png", int.from_bytes(buf[16:20], "big"), int.from_bytes(buf[20:24], "big")
    if buf.startswith(b"\xff\xd8"):
        i = 2
        while i + 4 <= len(buf):
            if buf[i] != 0xFF:
                raise ImageDecodeError(f"jpeg marker expected at byte {i}")
            marker = buf[i + 1]
            if marker == 0xFF:  # fill byte
                i += 1
                continue
            if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
                i += 2
                continue
            if marker in _JPEG_SOF:
                if i + 9 > len(buf):
                    break
                return "jpeg", int.from_bytes(buf[i + 7 : i + 9], "big"), int.from_bytes(buf[i + 5 : i + 7], "big")
            i += 2 + int.from_bytes(buf[i + 2 : i + 4], "big")
        raise ImageDecodeError("jpeg has no frame header")
    raise ImageDecodeError(f"compressed image is neither png nor jpeg (starts with {buf[:8]!r})")


def decode_compressed(data: bytes | bytearray | memoryview | np.ndarray, fmt: str = "") -> np.ndarray:
    """``sensor_msgs/CompressedImage`` bytes (jpeg or png) → RGB uint8 ``(H, W, 3)``.

    ``fmt`` is the message's ``format`` field; it is only used in error messages,
    since the codec is recognized from the bytes themselves. Other codecs, and frames
    declaring more than :data:`MAX_COMPRESSED_PIXELS`, are refused before decoding.
    """
    buf = _as_bytes_array(data)
    what = fmt or "unknown format"
    if buf.size == 0:
        raise ImageDecodeError(f"compressed image ({what}) is empty")
    try:
        codec, width, height = compressed_size(buf[: 1 << 20].tobytes())  # headers precede the pixels
    except ImageDecodeError as exc:
        raise ImageDecodeError(f"compressed image ({what}, {buf.size} bytes) is corrupt: {exc}") from exc
    if width * height > MAX_COMPRESSED_PIXELS:
        raise ImageDecodeError(f"compressed image ({what}) declares {width}x{height} pixels, more than "
                               f"{MAX_COMPRESSED_PIXELS}")
    try:
        img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    except cv2.error as exc:
        raise ImageDecodeError(f"compressed image ({what}, {buf.size} bytes) is corrupt: {exc}") from exc
    if img is None or img.size == 0:
        raise ImageDecodeError(f"compressed image ({what}, {codec}, {buf.size} bytes) is corrupt")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def resize_rgb(rgb: np.ndarray, *, height: int, width: int) -> np.ndarray:
    """Resize to the model's size with area averaging (``cv2.INTER_AREA``); a no-op at the right size."""
    if rgb.size == 0:
        raise ImageDecodeError(f"image is empty (shape {tuple(rgb.shape)})")
    if rgb.shape[0] == height and rgb.shape[1] == width:
        return rgb
    return cv2.resize(rgb, (int(width), int(height)), interpolation=cv2.INTER_AREA)


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """RGB uint8 ``(..., H, W, 3)`` → float32 ``(..., 3, H, W)`` in [0, 1], the models' input convention.

    One image or a batch of any leading shape (the data pipeline's ``(N, H, W, 3)`` stacks).
    """
    rgb = np.asarray(rgb)
    if rgb.ndim < 3 or rgb.shape[-1] != 3:
        raise ImageDecodeError(f"expected RGB images (..., H, W, 3), got shape {rgb.shape}")
    if rgb.dtype != np.uint8:
        raise ImageDecodeError(f"expected uint8 pixels, got {rgb.dtype}")
    return torch.from_numpy(np.ascontiguousarray(rgb)).movedim(-1, -3).float().div_(255.0)


def prepare_image(rgb: np.ndarray, *, height: int, width: int) -> torch.Tensor:
    """Resize then convert: what a node does to every frame before the model sees it."""
    return to_tensor(resize_rgb(rgb, height=height, width=width))


def as_model_image(image: np.ndarray | torch.Tensor, *, height: int, width: int) -> torch.Tensor:
    """Any image a Python user holds → the model's float32 ``(3, height, width)`` in [0, 1].

    Accepts numpy arrays and torch tensors, channels last ``(H, W, 3)`` (the camera convention)
    or first ``(3, H, W)`` (torch's), uint8 in [0, 255] or float in [0, 1]. uint8 numpy frames
    take the nodes' exact path (:func:`prepare_image`), so the API and ROS see identical inputs.
    Floats outside [0, 1] are refused rather than clipped: they usually mean 0–255 floats,
    which would silently saturate every pixel.
    """
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
        return prepare_image(image, height=height, width=width)
    t = torch.as_tensor(image).detach().cpu() if not isinstance(image, torch.Tensor) else image.detach().cpu()
    if t.dim() != 3 or 3 not in (t.shape[0], t.shape[2]):
        raise ImageDecodeError(f"expected an RGB image (H, W, 3) or (3, H, W), got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ImageDecodeError(f"image is empty (shape {tuple(t.shape)})")
    if t.shape[2] == 3:
        t = t.permute(2, 0, 1)
    if t.dtype == torch.uint8:
        t = t.float().div_(255.0)
    elif t.is_floating_point():
        t = t.float()
        if not bool(torch.isfinite(t).all()):
            raise ImageDecodeError("image has non-finite pixels")
        lo, hi = float(t.min()), float(t.max())
        if lo < 0.0 or hi > 1.0:
            raise ImageDecodeError(f"float images must lie in [0, 1], got [{lo:.3g}, {hi:.3g}] "
                                   "(divide 0-255 floats by 255)")
    else:
        raise ImageDecodeError(f"expected uint8 or float pixels, got {t.dtype}")
    if tuple(t.shape[1:]) != (height, width):  # the same cv2 area filter as the uint8 path
        hwc = resize_rgb(np.ascontiguousarray(t.permute(1, 2, 0).numpy()), height=height, width=width)
        t = torch.from_numpy(np.ascontiguousarray(hwc)).permute(2, 0, 1)
    return t.contiguous()
