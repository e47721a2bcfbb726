"""CPU or GPU arrays for the tissue mask and the tile resize, with one code path.

The functions here take numpy or cupy arrays and the matching ``ndimage`` module
(scipy's or cupyx's), so the GPU path runs the same lines that the CPU tests
cover. ``array_modules("cuda")`` raises when CUDA is not usable.

The resize reproduces PIL's bicubic filter (Keys kernel with a = -0.5, widened by
the scale factor when shrinking, horizontal pass first, rounding to uint8 after
each pass), so tiles resized on the GPU match ``PIL.Image.resize`` within one grey
level (PIL uses 22-bit fixed-point weights where this uses float32).
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any
from typing import Literal

import numpy as np

Device = Literal["cpu", "cuda"]

_BICUBIC_A = -0.5


def cuda_unavailable_reason() -> str | None:
    """Return why CUDA cannot be used here, or None when a device is usable."""
    try:
        import cupy
    except ImportError as error:
        return f"cupy is not installed ({error})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # noqa: BLE001 - cupy raises several runtime errors
        return f"no CUDA runtime or driver ({type(error).__name__}: {error})"
    if count < 1:
        return "no CUDA device"
    return None


def array_modules(device: Device) -> tuple[ModuleType, ModuleType]:
    """Return (array module, ndimage module) for ``device``.

    Raises RuntimeError for "cuda" when no CUDA device is usable.
    """
    if device == "cpu":
        from scipy import ndimage

        return np, ndimage
    if device == "cuda":
        reason = cuda_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"CUDA is not available: {reason}")
        import cupy
        from cupyx.scipy import ndimage as cupy_ndimage

        return cupy, cupy_ndimage
    raise ValueError(f"invalid device {device!r}: expected 'cpu' or 'cuda'")


def to_numpy(array: Any) -> np.ndarray:
    """Return a numpy array, copying from the GPU when ``array`` is a cupy array."""
    if isinstance(array, np.ndarray):
        return array
    return array.get()


def _bicubic(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    a = _BICUBIC_A
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def bicubic_weights(in_size: int, out_size: int) -> np.ndarray:
    """Return float32 [out_size, in_size] weights of PIL's bicubic resampling."""
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = 2.0 * filter_scale
    weights = np.zeros((out_size, in_size), dtype=np.float64)
    for out_index in range(out_size):
        center = (out_index + 0.5) * scale
        first = max(int(center - support + 0.5), 0)
        last = min(int(center + support + 0.5), in_size)
        positions = np.arange(first, last)
        kernel = _bicubic((positions - center + 0.5) / filter_scale)
        total = kernel.sum()
        if total != 0.0:
            kernel = kernel / total
        weights[out_index, first:last] = kernel
    return weights.astype(np.float32)


def resize_tiles(tiles: Any, out_px: int, xp: ModuleType = np) -> Any:
    """Resize uint8 tiles [B, H, W, C] to [B, out_px, out_px, C] like PIL's bicubic."""
    batch, height, width, _ = tiles.shape
    if height == out_px and width == out_px:
        return tiles
    if math.prod(tiles.shape) == 0:
        raise ValueError(f"cannot resize empty tiles of shape {tiles.shape}")

    across = xp.asarray(bicubic_weights(width, out_px).T)  # [W, out]
    down = xp.asarray(bicubic_weights(height, out_px))  # [out, H]
    channels = tiles.shape[3]
    pixels = xp.ascontiguousarray(tiles.transpose(0, 1, 3, 2)).astype(xp.float32)

    # Both passes are batched matrix products, which BLAS or cuBLAS run.
    horizontal = xp.clip(xp.rint(xp.matmul(pixels, across)), 0, 255)  # [B, H, C, out]
    horizontal = horizontal.transpose(0, 1, 3, 2).reshape(
        batch, height, out_px * channels
    )
    vertical = xp.matmul(down, horizontal)  # [B, out, out * C]
    vertical = xp.clip(xp.rint(vertical), 0, 255).astype(xp.uint8)
    return vertical.reshape(batch, out_px, out_px, channels)
