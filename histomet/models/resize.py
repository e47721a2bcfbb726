"""Antialiased bicubic resampling written as constant matrices.

ONNX has no antialiased resize that the TorchScript exporter emits: with torch
2.13, ``F.interpolate(..., antialias=True)`` raises ``UnsupportedOperatorError``
for bicubic and bilinear. Resampling is separable, so a resize of an image
``x [..., H, W]`` is ``Wh @ x @ Ww.T`` with one ``[out, in]`` weight matrix per
axis. Those are two ``MatMul`` nodes with constant weights, which every
runtime supports.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["BICUBIC_A", "SeparableResize", "antialiased_bicubic_matrix"]

# Keys' cubic convolution parameter used by PIL's BICUBIC filter and by torch's
# antialiased bicubic kernel (torch uses -0.75 only without antialiasing).
BICUBIC_A = -0.5

# The cubic kernel is zero outside |x| < 2 (in units of the kernel scale).
_CUBIC_SUPPORT = 2.0


def _cubic_kernel(x: np.ndarray, a: float) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def antialiased_bicubic_matrix(
    in_px: int, out_px: int, a: float = BICUBIC_A
) -> np.ndarray:
    """Build the float64 ``[out_px, in_px]`` weights of a 1-D bicubic resize.

    Pixel centres are aligned (``align_corners=False``). When downscaling by
    ``scale = in_px / out_px > 1``, the kernel is stretched by ``scale`` so it
    low-pass filters before sampling, as PIL's ``Image.resize`` and torch's
    ``antialias=True`` do. Taps that fall outside the image are dropped and each
    row is renormalised to sum to 1, so the edges are not padded.
    """
    if in_px < 1 or out_px < 1:
        raise ValueError(f"resize sizes must be positive, got {in_px} -> {out_px}")

    scale = in_px / out_px
    kernel_scale = max(scale, 1.0)
    support = _CUBIC_SUPPORT * kernel_scale

    weights = np.zeros((out_px, in_px), dtype=np.float64)
    for i in range(out_px):
        centre = (i + 0.5) * scale
        first = max(int(np.floor(centre - support)), 0)
        last = min(int(np.ceil(centre + support)), in_px)
        taps = np.arange(first, last)
        row = _cubic_kernel((taps + 0.5 - centre) / kernel_scale, a)
        total = row.sum()
        if total == 0.0:
            raise ValueError(f"empty resize kernel at output pixel {i}")
        weights[i, taps] = row / total
    return weights


class SeparableResize(nn.Module):
    """Resize ``[..., in_px, in_px]`` images to ``[..., out_px, out_px]``.

    The module is the identity when ``in_px == out_px``, so the graph then
    contains no resize at all.
    """

    def __init__(self, in_px: int, out_px: int) -> None:
        super().__init__()
        self.in_px = in_px
        self.out_px = out_px
        matrix = torch.from_numpy(antialiased_bicubic_matrix(in_px, out_px))

        # Non-persistent: the weights follow from the sizes, so checkpoints
        # never carry them.
        self.register_buffer("rows", matrix.float(), persistent=False)
        cols_t = matrix.t().contiguous().float()
        self.register_buffer("cols_t", cols_t, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.in_px == self.out_px:
            return images
        resized_cols = torch.matmul(images, self.cols_t)
        return torch.matmul(self.rows, resized_cols)
