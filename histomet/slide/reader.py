"""Open a whole-slide image with cuCIM or OpenSlide and read it as 8-bit RGB.

``open_slide`` tries cuCIM first and falls back to OpenSlide for formats cuCIM cannot
read. A ``Slide`` behaves the same under both readers: ``read_region`` uses
OpenSlide's coordinate convention, pads past the slide edge with white and composites
alpha onto white, and the MPP comes from one order of precedence (see
``histomet.slide.mpp.choose_mpp``).

Log messages name a slide only by ``Slide.slide_id``, a hash of its path, because
slide file names can contain patient identifiers.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
from dataclasses import dataclass
from dataclasses import replace
from os import PathLike
from pathlib import Path
from types import TracebackType
from typing import Literal

import numpy as np
from PIL import Image

from histomet.errors import MissingMppError
from histomet.errors import SlideNotFoundError
from histomet.errors import SlideOpenError
from histomet.errors import SlideReadError
from histomet.errors import UnsupportedImageError
from histomet.slide.backends import BackendOpenError
from histomet.slide.backends import CucimBackend
from histomet.slide.backends import OpenSlideBackend
from histomet.slide.backends import ReaderName
from histomet.slide.backends import SlideBackend
from histomet.slide.backends import TifffileBackend
from histomet.slide.backends import measured_downsamples
from histomet.slide.dicom import find_series
from histomet.slide.dicom import is_dicom_file
from histomet.slide.mpp import MppSource
from histomet.slide.mpp import choose_mpp
from histomet.slide.mpp import validate_mpp_override
from histomet.slide.probe import probe_cucim
from histomet.slide.tiff_header import TiffHeader
from histomet.slide.tiff_header import check_pixel_format
from histomet.slide.tiff_header import check_tiff_complete
from histomet.slide.tiff_header import has_tiff_magic
from histomet.slide.tiff_header import read_tiff_header

_LOGGER = logging.getLogger(__name__)

ReaderChoice = Literal["auto", "cucim", "openslide", "tifffile"]
READER_CHOICES: tuple[ReaderChoice, ...] = ("auto", "cucim", "openslide", "tifffile")

# OpenSlide's error for an NDPI tile offset it resolved wrongly.
_NDPI_MARKER_ERROR = re.compile(r"Expected marker at (\d+)")

SUPPORTED_FORMATS = (
    "pyramidal or tiled TIFF, Aperio SVS and Philips TIFF (cuCIM or OpenSlide), "
    "and Hamamatsu NDPI/VMS, Leica SCN, MIRAX MRXS, Sakura SVSLIDE, Ventana BIF, "
    "Zeiss CZI and DICOM WSI (OpenSlide), and plain striped RGB TIFF (tifffile)"
)

# Bytes of level pixels that one thumbnail strip may hold, as RGBA.
_THUMBNAIL_STRIP_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class SlideInfo:
    """Geometry and physical scale of an open slide. Dimensions are (width, height)."""

    reader: ReaderName
    dimensions: tuple[int, int]
    level_count: int
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]  # measured from dimensions, level 0 is 1.0
    mpp: float | None  # µm per level-0 pixel; None only with require_mpp=False
    mpp_source: MppSource | None
    objective_power: float | None
    vendor: str | None  # OpenSlide's vendor name, e.g. "aperio", "generic-tiff"
    warnings: tuple[str, ...] = ()  # what the reader corrected or fell back from

    def level_mpp(self, level: int) -> float:
        """Return the MPP of ``level``, raising ValueError when the MPP is unknown."""
        if self.mpp is None:
            raise ValueError("the slide's MPP is unknown")
        return self.mpp * self.level_downsamples[level]


def slide_id_for_path(path: str | PathLike[str]) -> str:
    """Return a short hash of the absolute path, the slide's name in logs."""
    # fsencode keeps file names that are not valid UTF-8 hashable.
    absolute = os.fsencode(Path(path).absolute())
    return hashlib.sha256(absolute).hexdigest()[:12]


class Slide:
    """An open slide. Use it as a context manager, or call ``close()``."""

    def __init__(
        self,
        backend: SlideBackend,
        info: SlideInfo,
        *,
        slide_id: str,
        display_name: str,
    ) -> None:
        self._backend = backend
        self._closed = False
        self.info = info
        self.slide_id = slide_id
        self.display_name = display_name

    def __enter__(self) -> Slide:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Release the reader's file handle. Calling it again does nothing."""
        if not self._closed:
            self._closed = True
            self._backend.close()

    def read_region(
        self, location_l0: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        """Read a region as uint8 RGB [height, width, 3].

        ``location_l0`` is the top-left corner in level-0 pixels and ``size`` is
        (width, height) in ``level``'s pixels, as in OpenSlide. The corner maps to
        level pixel ``floor(location / downsample)``. Pixels outside the slide are
        white (255) and transparent pixels are composited onto white, with either
        reader. Raises ValueError for a level that does not exist.
        """
        self._check_level(level)
        downsample = self.info.level_downsamples[level]
        x_level = math.floor(location_l0[0] / downsample)
        y_level = math.floor(location_l0[1] / downsample)
        return self._read_level_region(level, x_level, y_level, size[0], size[1])

    def thumbnail(self, max_px: int) -> tuple[np.ndarray, float]:
        """Compute an RGB thumbnail whose long side is at most ``max_px``.

        Reads the lowest-resolution level whose long side is still at least
        ``max_px`` (level 0 when no level is that large), in horizontal strips so
        memory stays bounded for large single-level slides. Each strip is reduced by
        an integer box average, and PIL's box filter makes the final size, so the
        thumbnail is never upscaled. Returns the thumbnail and the number of level-0
        pixels per thumbnail pixel (measured along x).
        """
        if max_px < 1:
            raise ValueError(f"invalid thumbnail size {max_px}: expected max_px >= 1")
        self._check_open()

        level = self._thumbnail_level(max_px)
        width, height = self.info.level_dimensions[level]
        scale = min(1.0, max_px / max(width, height))
        out_width = max(1, round(width * scale))
        out_height = max(1, round(height * scale))

        # Integer box reduction first, so the array kept in memory is less than
        # twice the thumbnail size along each side.
        factor = max(1, math.floor(min(width / out_width, height / out_height)))
        reduced = self._read_level_reduced(level, factor)

        image = Image.fromarray(reduced)
        if image.size != (out_width, out_height):
            image = image.resize((out_width, out_height), Image.Resampling.BOX)
        thumbnail = np.ascontiguousarray(np.asarray(image))

        covered_width_l0 = (
            reduced.shape[1] * factor * self.info.level_downsamples[level]
        )
        return thumbnail, covered_width_l0 / out_width

    def _thumbnail_level(self, max_px: int) -> int:
        chosen = 0
        for level, (width, height) in enumerate(self.info.level_dimensions):
            if max(width, height) >= max_px:
                chosen = level
        return chosen

    def _read_level_reduced(self, level: int, factor: int) -> np.ndarray:
        """Read a whole level box-averaged by ``factor``, strip by strip.

        The last ``width % factor`` columns and ``height % factor`` rows are left
        out, which is less than one output pixel.
        """
        width, height = self.info.level_dimensions[level]
        reduced_width = width // factor
        reduced_height = height // factor
        reduced = np.empty((reduced_height, reduced_width, 3), dtype=np.uint8)

        rows_in_budget = _THUMBNAIL_STRIP_BYTES // (4 * reduced_width * factor)
        strip_rows = max(factor, rows_in_budget // factor * factor)
        used_rows = reduced_height * factor
        for y_level in range(0, used_rows, strip_rows):
            rows = min(strip_rows, used_rows - y_level)
            strip = self._read_level_region(
                level, 0, y_level, reduced_width * factor, rows
            )
            if factor > 1:
                blocks = strip.reshape(rows // factor, factor, reduced_width, factor, 3)
                sums = blocks.sum(axis=(1, 3), dtype=np.uint32)
                strip = ((sums + factor * factor // 2) // (factor * factor)).astype(
                    np.uint8
                )
            first = y_level // factor
            reduced[first : first + strip.shape[0]] = strip
        return reduced

    def _read_level_region(
        self, level: int, x_level: int, y_level: int, width: int, height: int
    ) -> np.ndarray:
        """Read a region in level pixels, padding outside the level with white."""
        self._check_open()
        if width < 1 or height < 1:
            raise ValueError(f"invalid region size ({width}, {height}): expected >= 1")

        level_width, level_height = self.info.level_dimensions[level]
        left = max(x_level, 0)
        top = max(y_level, 0)
        right = min(x_level + width, level_width)
        bottom = min(y_level + height, level_height)

        region = np.full((height, width, 3), 255, dtype=np.uint8)
        if right <= left or bottom <= top:
            return region

        try:
            pixels = self._backend.read_level(
                level, left, top, right - left, bottom - top
            )
        except Exception as error:  # noqa: BLE001 - each reader raises its own types
            raise SlideReadError(
                f"{self.info.reader} failed to decode {self.display_name} at level "
                f"{level}, region ({left}, {top}, {right - left}x{bottom - top}): "
                f"{type(error).__name__}: {' '.join(str(error).split())}",
                "the file is corrupt or truncated; no prediction was made",
            ) from error
        region[top - y_level : bottom - y_level, left - x_level : right - x_level] = (
            composite_on_white(pixels)
        )
        return region

    def _check_level(self, level: int) -> None:
        if not 0 <= level < self.info.level_count:
            raise ValueError(
                f"invalid level {level}: the slide has levels 0 to "
                f"{self.info.level_count - 1}"
            )

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("the slide is closed")


def composite_on_white(pixels: np.ndarray) -> np.ndarray:
    """Return uint8 RGB, compositing RGBA onto white (transparent becomes 255).

    Expects straight (not premultiplied) alpha, which both readers return.
    """
    if pixels.ndim != 3 or pixels.shape[2] not in (3, 4):
        raise ValueError(f"expected RGB or RGBA pixels, got shape {pixels.shape}")
    if pixels.shape[2] == 3:
        return pixels

    rgb = pixels[..., :3]
    alpha = pixels[..., 3:4]
    if alpha.min() == 255:
        return rgb

    alpha16 = alpha.astype(np.uint16)
    blended = rgb.astype(np.uint16) * alpha16 + 255 * (255 - alpha16)
    return ((blended + 127) // 255).astype(np.uint8)


def open_slide(
    path: str | PathLike[str],
    *,
    reader: ReaderChoice = "auto",
    mpp_override: float | None = None,
    display_name: str = "the slide",
    require_mpp: bool = True,
) -> Slide:
    """Open a slide file, a DICOM WSI folder or one of its instances, and its MPP.

    ``reader="auto"`` picks, in this order: OpenSlide for DICOM, tifffile for a
    striped (non-tiled) TIFF, cuCIM when a child process has opened the file with
    it without crashing (see ``histomet.slide.probe``), and OpenSlide otherwise.
    ``display_name`` is the slide's name in error messages, which never contain
    the path otherwise.

    Raises SlideNotFoundError for a missing path, UnsupportedImageError for pixels
    that are not 8-bit RGB, SlideOpenError when no reader opens the file, and
    MissingMppError when the MPP is unknown and ``require_mpp`` is true. Raises
    ValueError for an invalid ``reader`` or ``mpp_override``.
    """
    if reader not in READER_CHOICES:
        raise ValueError(
            f"invalid reader {reader!r}: expected one of {', '.join(READER_CHOICES)}"
        )
    if mpp_override is not None:
        validate_mpp_override(mpp_override)

    slide_path = Path(path)
    if not slide_path.exists():
        raise SlideNotFoundError(
            f"no file or folder at the path given for {display_name}",
            "Check the path and that the storage is mounted",
        )
    if slide_path.is_file() and slide_path.stat().st_size == 0:
        raise SlideOpenError(
            f"{display_name} is an empty file (0 bytes)",
            "Copy the slide again; the transfer may have failed",
        )
    slide_id = slide_id_for_path(slide_path)

    header = None
    warnings: list[str] = []
    if slide_path.is_dir() or is_dicom_file(slide_path):
        backend = _open_dicom(slide_path, reader, display_name, warnings)
    else:
        if has_tiff_magic(slide_path):
            check_tiff_complete(slide_path, display_name)
        header = read_tiff_header(slide_path)
        if header is not None:
            check_pixel_format(header, display_name)
        backend = _open_backend(
            slide_path, reader, header, slide_id, display_name, warnings
        )

    try:
        info = _slide_info(
            backend, header, mpp_override, require_mpp, slide_id, display_name
        )
        info = replace(info, warnings=tuple(warnings))
    except BaseException:
        backend.close()
        raise

    _LOGGER.info(
        "slide %s: opened with %s, %d levels, level 0 %dx%d, MPP %s (%s)",
        slide_id,
        info.reader,
        info.level_count,
        info.dimensions[0],
        info.dimensions[1],
        f"{info.mpp:.4g}" if info.mpp is not None else "unknown",
        info.mpp_source,
    )
    return Slide(backend, info, slide_id=slide_id, display_name=display_name)


def _slide_info(
    backend: SlideBackend,
    header: TiffHeader | None,
    mpp_override: float | None,
    require_mpp: bool,
    slide_id: str,
    display_name: str,
) -> SlideInfo:
    """Check the reader's pixel format, choose the MPP and describe the slide."""
    _check_backend_pixel_format(backend, display_name)
    candidates = backend.mpp_candidates()
    header_candidate = header.mpp_candidate() if header is not None else None
    if header_candidate is not None:
        candidates.append(header_candidate)

    mpp: float | None = None
    mpp_source: MppSource | None = None
    try:
        choice = choose_mpp(
            candidates,
            backend.objective_power,
            mpp_override,
            slide_id=slide_id,
            display_name=display_name,
        )
        mpp = choice.mpp
        mpp_source = choice.source
    except MissingMppError:
        if require_mpp:
            raise

    level_dimensions = backend.level_dimensions
    return SlideInfo(
        reader=backend.name,
        dimensions=level_dimensions[0],
        level_count=len(level_dimensions),
        level_dimensions=level_dimensions,
        level_downsamples=measured_downsamples(level_dimensions),
        mpp=mpp,
        mpp_source=mpp_source,
        objective_power=backend.objective_power,
        vendor=backend.vendor,
    )


def _open_dicom(
    path: Path, reader: ReaderChoice, display_name: str, warnings: list[str]
) -> SlideBackend:
    """Open a DICOM WSI folder or instance with OpenSlide, after checking the series."""
    if reader not in ("auto", "openslide"):
        raise SlideOpenError(
            f"the {reader} reader cannot open {display_name}: it is a DICOM WSI",
            "Use reader 'auto' or 'openslide' for DICOM WSI",
        )
    series = find_series(path, display_name)
    if series.colour_fix == "ycbcr_to_rgb":
        warnings.append(
            "DICOM JPEG frames are YCbCr although the header declares RGB; "
            "pixels converted to RGB"
        )
    try:
        return OpenSlideBackend(series.open_path, colour_fix=series.colour_fix)
    except BackendOpenError as error:
        raise SlideOpenError(
            f"OpenSlide failed to open the DICOM WSI {display_name} ({error})",
            "Check that every instance of the series is present and readable",
        ) from error


def _open_backend(
    path: Path,
    reader: ReaderChoice,
    header: TiffHeader | None,
    slide_id: str,
    display_name: str,
    warnings: list[str],
) -> SlideBackend:
    """Open a file with the requested reader, or choose one for ``auto``."""
    failures: list[str] = []
    plain_tiff = header is not None and not header.tiled

    if reader == "tifffile" or (reader == "auto" and plain_tiff):
        try:
            return TifffileBackend(path)
        except BackendOpenError as error:
            failures.append(f"tifffile: {error}")

    if reader in ("auto", "cucim"):
        probe = probe_cucim(path)
        if probe.ok:
            try:
                return CucimBackend(path)
            except BackendOpenError as error:
                failures.append(f"cuCIM: {error}")
        else:
            failures.append(f"cuCIM: {probe.detail}")
        if reader == "auto":
            _LOGGER.info(
                "slide %s: cuCIM cannot open it (%s), trying OpenSlide",
                slide_id,
                failures[-1],
            )
            if probe.outcome in ("crashed", "timed_out"):
                warnings.append(f"cuCIM probe {probe.outcome}: {probe.detail}")

    if reader in ("auto", "openslide"):
        try:
            return OpenSlideBackend(path)
        except BackendOpenError as error:
            failures.append(f"OpenSlide: {error}")
            _raise_for_large_ndpi(str(error), display_name, error)

    raise SlideOpenError(
        f"failed to open {display_name} with any slide reader ({', '.join(failures)})",
        f"Supported formats are {SUPPORTED_FORMATS}",
    )


def _raise_for_large_ndpi(message: str, display_name: str, cause: Exception) -> None:
    """Raise a specific error for OpenSlide's failure on NDPI files over 4 GiB.

    NDPI stores 32-bit offsets and keeps their high bits elsewhere. OpenSlide
    guesses them and fails with "Expected marker at N" for an offset beyond 4 GiB.
    """
    match = _NDPI_MARKER_ERROR.search(message)
    if match is None or int(match.group(1)) < 2**32:
        return
    raise SlideOpenError(
        f"unsupported format: OpenSlide cannot resolve the tile offsets beyond 4 GiB "
        f"in {display_name}, as in NDPI files over 4 GiB, which store only their "
        f"low 32 bits ({message})",
        "Convert it to a pyramidal BigTIFF (for example with vips tiffsave "
        "--tile --pyramid --bigtiff) and predict the converted file",
    ) from cause


def _check_backend_pixel_format(backend: SlideBackend, display_name: str) -> None:
    """Raise UnsupportedImageError unless the reader delivers 8-bit RGB or RGBA."""
    if backend.sample_bits == 8 and backend.channel_count in (3, 4):
        return

    pixel_format = f"{backend.channel_count}\u00d7{backend.sample_bits}-bit"
    raise UnsupportedImageError(
        f"unsupported pixel format: {pixel_format} in {display_name}",
        "HistoMet needs 8-bit RGB brightfield images",
    )
