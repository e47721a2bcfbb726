"""The in-graph resize matches torch's and PIL's antialiased bicubic resize."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from histomet.models.resize import SeparableResize
from histomet.models.resize import antialiased_bicubic_matrix

# (input px, output px): CONCH's 512 -> 448, the tiny config's 96 -> 64, a tiny
# tower behind 512 px tiles, an upscale, an odd ratio and a strong downscale.
SIZE_PAIRS = [(512, 448), (96, 64), (512, 64), (64, 96), (100, 37), (37, 8)]

# Max abs difference on 0..1 images against torch's float64 antialiased bicubic
# (measured: about 5e-8 in float64 and 2e-7 in float32). The reference is
# float64 because torch's own float32 kernel is up to 4.1e-5 off its float64
# result at 512 -> 448 (torch 2.13, CPU).
TORCH_TOLERANCE = 1e-6


@pytest.mark.parametrize(("in_px", "out_px"), SIZE_PAIRS)
def test_resize_matrix_rows_sum_to_one(in_px: int, out_px: int) -> None:
    matrix = antialiased_bicubic_matrix(in_px, out_px)

    assert matrix.shape == (out_px, in_px)
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-12)


@pytest.mark.parametrize(("in_px", "out_px"), SIZE_PAIRS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_resize_matches_torch_antialiased_bicubic(
    in_px: int, out_px: int, dtype: torch.dtype
) -> None:
    generator = torch.Generator().manual_seed(in_px * 1000 + out_px)
    images = torch.rand(2, 3, in_px, in_px, generator=generator, dtype=torch.float64)
    resize = SeparableResize(in_px, out_px).to(dtype)

    expected = F.interpolate(
        images,
        size=(out_px, out_px),
        mode="bicubic",
        antialias=True,
        align_corners=False,
    )
    actual = resize(images.to(dtype)).double()

    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() <= TORCH_TOLERANCE


@pytest.mark.parametrize(("in_px", "out_px"), [(512, 448), (96, 64), (64, 96)])
def test_resize_matches_pil_bicubic(in_px: int, out_px: int) -> None:
    # Pixels in 64..191: PIL rounds and clips its intermediate row pass to uint8,
    # and on full-range noise that clipping alone moves pixels by up to 24 levels.
    rng = np.random.default_rng(in_px + out_px)
    tile = rng.integers(64, 192, size=(in_px, in_px, 3), dtype=np.uint8)
    expected = np.asarray(
        Image.fromarray(tile).resize((out_px, out_px), Image.Resampling.BICUBIC)
    ).astype(np.float64)

    resize = SeparableResize(in_px, out_px).double()
    channels_first = torch.from_numpy(tile).permute(2, 0, 1).double()
    actual = resize(channels_first).permute(1, 2, 0).numpy()

    assert np.abs(np.round(actual) - expected).max() <= 1.0


def test_resize_is_identity_for_equal_sizes() -> None:
    images = torch.rand(1, 3, 48, 48)
    resize = SeparableResize(48, 48)

    assert resize(images) is images


def test_resize_matrix_rejects_empty_sizes() -> None:
    with pytest.raises(ValueError, match="positive"):
        antialiased_bicubic_matrix(0, 4)
