"""Pixel format and resolution tags of a TIFF file's first image, read with tifffile.

Both slide readers hide details that matter here. cuCIM expands grayscale to RGBA
and reports a spacing of 1 µm/px when the resolution denominator is 0. OpenSlide
rejects non-RGB TIFFs with a generic "unsupported format" error. So the product reads
the first IFD's tags itself: only the header is parsed, no pixel data is decoded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import tifffile

from histomet.errors import UnsupportedImageError
from histomet.slide.mpp import MppCandidate
from histomet.slide.mpp import mpp_from_resolution

_LOGGER = logging.getLogger(__name__)

# Photometric interpretations that decode to RGB: RGB and the YCbCr that JPEG
# tiles in SVS and NDPI files use.
_COLOUR_PHOTOMETRICS = {"RGB", "YCBCR"}


@dataclass(frozen=True)
class TiffHeader:
    """Tags of the first IFD that decide whether and how the product reads a TIFF."""

    samples_per_pixel: int
    dtype: str  # numpy dtype name of one sample, e.g. "uint8"
    bits_per_sample: int
    photometric: str  # tifffile PHOTOMETRIC name, e.g. "RGB", "MINISBLACK"
    x_resolution: tuple[int, int] | None  # rational pixels per unit
    y_resolution: tuple[int, int] | None
    resolution_unit: int | None  # TIFF code: 1 none, 2 inch, 3 cm (4, 5 tifffile)
    tiled: bool = True  # False for a striped image
    is_ndpi: bool = False

    @property
    def pixel_format(self) -> str:
        """Samples per pixel and sample type, e.g. ``3×uint8``."""
        return f"{self.samples_per_pixel}\u00d7{self.dtype}"

    def is_rgb8(self) -> bool:
        """Return True for 8-bit RGB, or RGBA stored as RGB plus one extra sample."""
        return (
            self.dtype == "uint8"
            and self.bits_per_sample == 8
            and self.photometric in _COLOUR_PHOTOMETRICS
            and self.samples_per_pixel in (3, 4)
        )

    def mpp_candidate(self) -> MppCandidate | None:
        """Return the MPP from the resolution tags, or None when they give none."""
        mpp_x = mpp_from_resolution(self.x_resolution, self.resolution_unit)
        mpp_y = mpp_from_resolution(self.y_resolution, self.resolution_unit)
        if mpp_x is None or mpp_y is None:
            return None
        return MppCandidate(mpp_x=mpp_x, mpp_y=mpp_y, origin="TIFF resolution tags")


def read_tiff_header(path: Path) -> TiffHeader | None:
    """Read the first IFD's tags, or return None when ``path`` is not a TIFF file."""
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            return TiffHeader(
                samples_per_pixel=int(page.samplesperpixel),
                dtype=page.dtype.name if page.dtype is not None else "unknown",
                bits_per_sample=int(page.bitspersample),
                photometric=_photometric_name(page.photometric),
                x_resolution=_rational_tag(page, "XResolution"),
                y_resolution=_rational_tag(page, "YResolution"),
                resolution_unit=_int_tag(page, "ResolutionUnit"),
                tiled=bool(page.is_tiled),
                is_ndpi=bool(tif.is_ndpi),
            )
    except (tifffile.TiffFileError, ValueError, OSError, IndexError) as error:
        _LOGGER.debug("not read as a TIFF: %s", type(error).__name__)
        return None


def check_pixel_format(header: TiffHeader, display_name: str) -> None:
    """Raise UnsupportedImageError unless the image is 8-bit RGB or RGBA."""
    if header.is_rgb8():
        return

    raise UnsupportedImageError(
        f"unsupported pixel format: {header.pixel_format} "
        f"({header.photometric}) in {display_name}",
        "HistoMet needs 8-bit RGB brightfield images, so grayscale, 16-bit and "
        "multi-channel fluorescence images are rejected",
    )


def _photometric_name(photometric: object) -> str:
    name = getattr(photometric, "name", None)
    if name is not None:
        return str(name)
    return str(photometric)


def _rational_tag(page: tifffile.TiffPage, name: str) -> tuple[int, int] | None:
    tag = page.tags.get(name)
    if tag is None:
        return None

    value = tag.value
    if isinstance(value, tuple) and len(value) == 2:
        return int(value[0]), int(value[1])
    return None


def _int_tag(page: tifffile.TiffPage, name: str) -> int | None:
    tag = page.tags.get(name)
    if tag is None:
        return None
    return int(tag.value)
