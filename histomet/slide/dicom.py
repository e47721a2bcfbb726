"""DICOM WSI series: find the instances, check the pyramid, and check the colours.

OpenSlide reads a DICOM whole-slide image from any one instance and finds the rest
of the series in the same folder. Two faults reach the pixels unreported that way:

* A series without its full-resolution instance opens with the next level as
  level 0, so the slide is tiled from a resampled copy.
* OpenSlide 4.0.1 trusts ``PhotometricInterpretation``. An instance that declares
  RGB while its JPEG frames are JFIF (YCbCr) files, as the wsi2dcm converter
  writes them, is returned as raw YCbCr, so every colour is wrong.

This module reads the headers with pydicom (no pixel data, except one JPEG frame of
the full-resolution instance for the colour check) and reports both.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from histomet.errors import SlideOpenError

_LOGGER = logging.getLogger(__name__)

# The DICOM Part 10 preamble is 128 bytes, followed by this magic.
_DICM_OFFSET = 128
_DICM_MAGIC = b"DICM"

VL_WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"

# Conversion that OpenSlide's pixels need to match what the JPEG frames encode.
ColourFix = Literal["none", "ycbcr_to_rgb"]


@dataclass(frozen=True)
class DicomInstance:
    """Header fields of one VOLUME instance of a DICOM WSI series."""

    path: Path
    columns: int  # TotalPixelMatrixColumns
    rows: int  # TotalPixelMatrixRows
    resampled: bool  # ImageType value 4 is RESAMPLED, so it is not the base level
    photometric: str
    transfer_syntax: str


@dataclass(frozen=True)
class DicomSeries:
    """The VOLUME instances of one series, finest first, and the colour fix to apply."""

    instances: tuple[DicomInstance, ...]
    colour_fix: ColourFix

    @property
    def open_path(self) -> Path:
        """The instance to hand to OpenSlide: the full-resolution one."""
        return self.instances[0].path


def is_dicom_file(path: Path) -> bool:
    """Return True when ``path`` is a DICOM Part 10 file (checks the magic only)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(_DICM_OFFSET)
            return handle.read(len(_DICM_MAGIC)) == _DICM_MAGIC
    except OSError:
        return False


def find_series(path: Path, display_name: str) -> DicomSeries:
    """Find and check the DICOM WSI series of a folder, or of one of its instances.

    A folder must hold exactly one WSI series, and an instance selects its own
    series among the files next to it. Files are recognised by the DICOM magic, so
    a suffix is not needed.

    Raises SlideOpenError when there is no WSI instance, when a folder contains more
    than one series, or when the full-resolution level is missing.
    """
    import pydicom
    import pydicom.errors

    folder = path if path.is_dir() else path.parent
    requested_series: str | None = None
    if not path.is_dir():
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
            requested_series = str(header.SeriesInstanceUID)
        except (pydicom.errors.InvalidDicomError, AttributeError, OSError) as error:
            raise SlideOpenError(
                f"{display_name} is not a readable DICOM instance "
                f"({type(error).__name__})",
                "Pass a DICOM WSI instance or its folder; the file may be damaged",
            ) from error

    by_series: dict[str, list[DicomInstance]] = {}
    for child in sorted(folder.iterdir()):
        if not child.is_file() or not is_dicom_file(child):
            continue
        try:
            header = pydicom.dcmread(child, stop_before_pixels=True)
        except (pydicom.errors.InvalidDicomError, OSError) as error:
            # A damaged file of the series shows up as a missing level or in
            # OpenSlide; an unrelated one does not matter.
            _LOGGER.warning(
                "skipping an unreadable DICOM file: %s", type(error).__name__
            )
            continue
        if str(header.get("SOPClassUID", "")) != VL_WSI_SOP_CLASS:
            continue
        series = str(header.SeriesInstanceUID)
        instance = _volume_instance(child, header)
        if instance is not None:
            by_series.setdefault(series, []).append(instance)

    if requested_series is not None:
        by_series = {requested_series: by_series.get(requested_series, [])}
    if not any(by_series.values()):
        raise SlideOpenError(
            f"cannot open {display_name} as a slide: no DICOM WSI (VL Whole Slide "
            "Microscopy) volume instance found",
            "Pass a slide file, or a folder that holds one DICOM WSI series",
        )
    if len(by_series) > 1:
        raise SlideOpenError(
            f"{display_name} contains {len(by_series)} DICOM WSI series",
            "Pass one instance of the series to predict, or a folder with one series",
        )

    instances = sorted(
        next(iter(by_series.values())), key=lambda item: -(item.columns * item.rows)
    )
    _check_base_level(instances, display_name)
    colour_fix = _colour_fix(instances[0], display_name)
    return DicomSeries(instances=tuple(instances), colour_fix=colour_fix)


def _volume_instance(path: Path, header: object) -> DicomInstance | None:
    """Return the instance's fields, or None for a label, overview or thumbnail."""
    image_type = [str(value).upper() for value in getattr(header, "ImageType", [])]
    if len(image_type) >= 3 and image_type[2] != "VOLUME":
        return None
    return DicomInstance(
        path=path,
        columns=int(header.TotalPixelMatrixColumns),
        rows=int(header.TotalPixelMatrixRows),
        resampled=len(image_type) >= 4 and image_type[3] == "RESAMPLED",
        photometric=str(header.PhotometricInterpretation),
        transfer_syntax=str(header.file_meta.TransferSyntaxUID),
    )


def _check_base_level(instances: list[DicomInstance], display_name: str) -> None:
    """Raise SlideOpenError when the finest instance is a resampled level."""
    finest = instances[0]
    if not finest.resampled:
        return
    raise SlideOpenError(
        f"the DICOM WSI series of {display_name} has no full-resolution level: its "
        f"finest instance ({finest.columns}x{finest.rows} px) has ImageType "
        "RESAMPLED, so the base instance is missing",
        "Copy every instance of the series into the folder, including the one "
        "whose ImageType ends in NONE",
    )


def _colour_fix(base: DicomInstance, display_name: str) -> ColourFix:
    """Decide whether OpenSlide's pixels need YCbCr to RGB conversion.

    Only JPEG baseline frames of an instance that declares RGB can be affected. The
    first frame is decoded with PIL, which follows the JFIF and Adobe markers as
    libjpeg does by default, and compared with the same frame read by OpenSlide.
    """
    if base.transfer_syntax != JPEG_BASELINE or base.photometric != "RGB":
        return "none"

    # NOTE: only the base instance's first frame is compared; the other levels
    # are assumed to be encoded the same way, as one converter writes them all.

    import openslide
    from PIL import Image

    frame = _first_frame(base.path)
    with Image.open(io.BytesIO(frame)) as image:
        expected = np.asarray(image.convert("RGB"), dtype=np.int16)
    height, width = expected.shape[:2]
    with openslide.OpenSlide(base.path) as slide:
        region = slide.read_region((0, 0), 0, (width, height))
    got = np.asarray(region)[..., :3]

    if np.abs(got.astype(np.int16) - expected).max() <= 2:
        return "none"
    converted = ycbcr_to_rgb(got).astype(np.int16)
    if np.abs(converted - expected).max() <= 2:
        _LOGGER.warning(
            "DICOM frames are YCbCr JPEG although the header declares RGB; "
            "converting OpenSlide's pixels to RGB"
        )
        return "ycbcr_to_rgb"
    raise SlideOpenError(
        f"OpenSlide decodes the DICOM frames of {display_name} with colours that "
        "match neither RGB nor YCbCr",
        "Convert the slide to pyramidal TIFF or re-export the DICOM series",
    )


def _first_frame(path: Path) -> bytes:
    import pydicom
    from pydicom.encaps import generate_fragmented_frames

    dataset = pydicom.dcmread(path)
    frames = generate_fragmented_frames(
        dataset.PixelData, number_of_frames=int(dataset.get("NumberOfFrames", 1))
    )
    return b"".join(next(iter(frames)))


def ycbcr_to_rgb(pixels: np.ndarray) -> np.ndarray:
    """Convert uint8 YCbCr [..., 3] to RGB with the JFIF (full-range BT.601) matrix.

    This is the conversion libjpeg applies to JFIF files, and it matches PIL's
    decode of the same frames exactly on the wsi2dcm sample.
    """
    ycc = pixels.astype(np.float32)
    luma = ycc[..., 0]
    blue = ycc[..., 1] - 128.0
    red = ycc[..., 2] - 128.0
    rgb = np.empty(pixels.shape, dtype=np.float32)
    rgb[..., 0] = luma + 1.402 * red
    rgb[..., 1] = luma - 0.344136 * blue - 0.714136 * red
    rgb[..., 2] = luma + 1.772 * blue
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
