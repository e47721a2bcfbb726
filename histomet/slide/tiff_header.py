"""Pixel format and resolution tags of a TIFF file's first image, read with tifffile.

Both slide readers hide details that matter here. cuCIM expands grayscale to RGBA
and reports a spacing of 1 µm/px when the resolution denominator is 0. OpenSlide
rejects non-RGB TIFFs with a generic "unsupported format" error. So the product reads
the first IFD's tags itself: only the header is parsed, no pixel data is decoded.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import tifffile

from histomet.errors import SlideOpenError
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
    except _DAMAGED_TAG_ERRORS as error:
        raise _damaged_tags(error) from error


# Exceptions that tifffile raises for a tag of the wrong type or count, whose value
# it cannot convert. The header is present but damaged.
_DAMAGED_TAG_ERRORS = (TypeError, struct.error, KeyError, AttributeError)


def _damaged_tags(error: Exception) -> SlideOpenError:
    kind = "struct.error" if isinstance(error, struct.error) else type(error).__name__
    return SlideOpenError(
        f"the slide's TIFF tags are damaged: an image's tags could not be read ({kind})",
        "Copy the slide again; if the copy is damaged too, export it again from "
        "the scanner software",
    )


_TIFF_MAGICS = {
    b"II*\x00": ("<", False),
    b"MM\x00*": (">", False),
    b"II+\x00": ("<", True),
    b"MM\x00+": (">", True),
}
_MAX_IFDS = 100_000
# Bytes per value of each TIFF field type (BYTE, ASCII, SHORT, LONG, RATIONAL, ...).
_TYPE_BYTES = {
    1: 1,
    2: 1,
    3: 2,
    4: 4,
    5: 8,
    6: 1,
    7: 1,
    8: 2,
    9: 4,
    10: 8,
    11: 4,
    12: 8,
    13: 4,
    16: 8,
    17: 8,
    18: 8,
}


def has_tiff_magic(path: Path) -> bool:
    """Return True when the file starts with a classic or BigTIFF header."""
    with open(path, "rb") as handle:
        return handle.read(4) in _TIFF_MAGICS


def check_tiff_complete(path: Path, display_name: str) -> None:
    """Raise SlideOpenError when a TIFF's directories or pixel data pass its end.

    Walks the chain of IFD offsets from the header and checks that every strip or
    tile of every page lies inside the file. A copy cut short by a failed transfer
    fails here with the offsets, instead of as "unsupported format" in a reader.
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        offset = _first_bad_ifd_offset(handle, size)
    if offset is not None:
        raise SlideOpenError(
            f"{display_name} is truncated or corrupt: TIFF directory data at byte "
            f"{offset} lies past the end of the file ({size} bytes)",
            "Copy the slide again; the transfer may have been cut short",
        )

    try:
        with tifffile.TiffFile(path) as tif:
            for index, page in enumerate(tif.pages):
                ends = [o + c for o, c in zip(page.dataoffsets, page.databytecounts)]
                if ends and max(ends) > size:
                    raise SlideOpenError(
                        f"{display_name} is truncated: pixel data of TIFF page "
                        f"{index} ends at byte {max(ends)}, past the end of the "
                        f"file ({size} bytes)",
                        "Copy the slide again; the transfer may have been cut short",
                    )
    except (tifffile.TiffFileError, ValueError, OSError, IndexError) as error:
        _LOGGER.debug("TIFF completeness not checked: %s", type(error).__name__)
    except _DAMAGED_TAG_ERRORS as error:
        raise _damaged_tags(error) from error


def _first_bad_ifd_offset(handle, size: int) -> int | None:
    """Follow the IFD chain; return the first offset that lies past the file end.

    The offsets checked are those of each IFD and of each tag value stored
    outside its IFD entry.
    """
    header = handle.read(16)
    byte_order, big = _TIFF_MAGICS[header[:4]]
    if big:
        (offset,) = struct.unpack(byte_order + "Q", header[8:16])
        count_format, entry_size, next_format = "Q", 20, "Q"
    else:
        (offset,) = struct.unpack(byte_order + "I", header[4:8])
        count_format, entry_size, next_format = "H", 12, "I"
        # NOTE: NDPI files over 4 GiB keep the high bits of offsets elsewhere,
        # so their 32-bit chain cannot be followed here.
        if size > 2**32:
            return None

    count_size = struct.calcsize(count_format)
    next_size = struct.calcsize(next_format)
    seen: set[int] = set()
    while offset and len(seen) < _MAX_IFDS and offset not in seen:
        seen.add(offset)
        if offset + count_size > size:
            return offset
        handle.seek(offset)
        (entries,) = struct.unpack(byte_order + count_format, handle.read(count_size))
        next_at = offset + count_size + entries * entry_size
        if next_at + next_size > size:
            return offset
        table = handle.read(entries * entry_size)
        bad_value = _first_bad_value_offset(table, byte_order, big, size)
        if bad_value is not None:
            return bad_value
        handle.seek(next_at)
        (offset,) = struct.unpack(byte_order + next_format, handle.read(next_size))
    return None


def _first_bad_value_offset(
    table: bytes, byte_order: str, big: bool, size: int
) -> int | None:
    entry_format = byte_order + ("HHQQ" if big else "HHII")
    entry_size = struct.calcsize(entry_format)
    inline_bytes = 8 if big else 4
    for start in range(0, len(table), entry_size):
        _, field_type, count, value = struct.unpack(
            entry_format, table[start : start + entry_size]
        )
        length = _TYPE_BYTES.get(field_type, 1) * count
        if length > inline_bytes and value + length > size:
            return value
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
