"""Convolution stacks written as the SPEC's layer tables (filters-kernel-stride-activation)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

# (filters, kernel, stride, relu?) per layer, SPEC "Networks" table.
LayerSpec = tuple[int, int, int, bool]

CNN1: tuple[LayerSpec, ...] = ((32, 2, 2, True), (32, 3, 1, True), (64, 2, 2, True), (64, 3, 1, True))
CNN2: tuple[LayerSpec, ...] = ((64, 3, 1, True), (32, 3, 1, False))
CNN3: tuple[LayerSpec, ...] = (
    (32, 2, 2, True), (32, 3, 1, True), (64, 2, 2, True), (32, 3, 1, True), (64, 3, 1, True), (32, 3, 1, False),
)
CNN4: tuple[LayerSpec, ...] = ((128, 3, 1, True), (64, 3, 1, True))
CNN5: tuple[LayerSpec, ...] = (
    (32, 2, 2, True), (32, 3, 1, True), (64, 2, 2, True), (64, 3, 1, True), (128, 3, 1, True), (64, 3, 1, True),
)
CNN6: tuple[LayerSpec, ...] = ((64, 3, 1, True), (64, 3, 1, True), (64, 3, 1, True))


def conv_layer(in_channels: int, filters: int, kernel: int, stride: int) -> nn.Conv2d:
    """'same' padding: 3x3/stride 1 pads by one; 2x2/stride 2 needs none on even sizes."""
    padding = kernel // 2 if stride == 1 else 0
    return nn.Conv2d(in_channels, filters, kernel, stride=stride, padding=padding)


def conv_stack(in_channels: int, layers: Sequence[LayerSpec]) -> nn.Sequential:
    mods: list[nn.Module] = []
    c = in_channels
    for filters, kernel, stride, relu in layers:
        mods.append(conv_layer(c, filters, kernel, stride))
        if relu:
            mods.append(nn.ReLU())
        c = filters
    return nn.Sequential(*mods)


def conv_positions(seq: nn.Sequential) -> list[int]:
    """Indices of the Conv2d modules in a stack, for callers that split it."""
    return [i for i, m in enumerate(seq) if isinstance(m, nn.Conv2d)]


def init_weights(module: nn.Module) -> None:
    """He init for ReLU stacks; zero biases so the tiled pose term starts neutral."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def output_hw(height: int, width: int) -> tuple[int, int]:
    if height % 4 or width % 4:
        raise ValueError(f"image size must be divisible by 4 (two stride-2 layers), got {height}x{width}")
    return height // 4, width // 4


def valid_tap_weights(weight: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Per-position sum of the kernel taps that land inside the image.

    A constant (tiled) input convolved with zero padding equals ``E[:, :, y, x] @ v``
    where ``E`` sums the taps that see real pixels at ``(y, x)``; only border
    positions differ from the full kernel sum. This makes the pose term of CNN2's
    first convolution a per-position affine map instead of a convolution.

    Args:
        weight: ``(O, I, k, k)`` with odd ``k`` and 'same' padding.
    Returns:
        ``(O, I, height, width)``.
    """
    out_c, in_c, kh, kw = weight.shape
    ones = torch.ones(1, 1, height, width, dtype=weight.dtype, device=weight.device)
    # For tap (u, v), the mask of output positions whose input pixel exists.
    masks = torch.nn.functional.conv2d(
        ones, torch.eye(kh * kw, dtype=weight.dtype, device=weight.device).view(kh * kw, 1, kh, kw),
        padding=(kh // 2, kw // 2),
    )  # (1, kh*kw, H, W)
    # conv2d is cross-correlation: tap (u, v) reads input (y+u-1, x+v-1); the eye kernel above
    # places a one at (u, v), so channel u*kw+v reports exactly that pixel's existence.
    return torch.einsum("oit,thw->oihw", weight.reshape(out_c, in_c, kh * kw), masks[0])
