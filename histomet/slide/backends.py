"""Thin adapters over cuCIM, OpenSlide and tifffile with one interface for the reader.

An adapter only reads regions that lie inside a level, addressed in that level's
pixels. Clipping, padding, alpha compositing and the choice of MPP happen once, in
``histomet.slide.reader``, so both readers behave the same at the slide edge.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any
from typing import Literal
from typing import Protocol

import numpy as np

from histomet.slide.dicom import ColourFix
from histomet.slide.dicom import ycbcr_to_rgb
from histomet.slide.mpp import MppCandidate
from histomet.slide.mpp import parse_positive_float

ReaderName = Literal["cucim", "openslide", "tifffile"]


class BackendOpenError(Exception):
    """A reader could not open the file. The message never contains the path."""


class SlideBackend(Protocol):
    """Interface of the cuCIM and OpenSlide adapters that the slide reader uses."""

    name: ReaderName
    level_dimensions: tuple[tuple[int, int], ...]  # (width, height) per level
    vendor: str | None
    objective_power: float | None
    channel_count: int  # channels that read_level returns, 3 or 4
    sample_bits: int

    def mpp_candidates(self) -> list[MppCandidate]:
        """Return MPP values from the reader's metadata, most trusted first."""
        ...

    def read_level(
        self, level: int, x_level: int, y_level: int, width: int, height: int
    ) -> np.ndarray:
        """Read a region inside ``level``, at that level's pixel coordinates.

        Returns uint8 [height, width, 3 or 4], RGB or RGBA.
        """
        ...

    def close(self) -> None:
        """Release the file handle."""
        ...


def measured_downsamples(
    level_dimensions: tuple[tuple[int, int], ...],
) -> tuple[float, ...]:
    """Return each level's downsample as the mean of its width and height ratios.

    This is how OpenSlide computes ``level_downsamples``. Computing it here from
    the dimensions gives both readers the same float, which cuCIM otherwise reports
    in single precision.
    """
    width_0, height_0 = level_dimensions[0]
    downsamples = []
    for width, height in level_dimensions:
        downsamples.append((width_0 / width + height_0 / height) / 2.0)
    return tuple(downsamples)


def scrub_path(message: str, path: Path) -> str:
    """Replace every spelling of ``path`` in a reader's error message with "file".

    Slide paths can contain patient identifiers, and these messages are logged.
    """
    for spelling in {str(path), str(path.resolve()), path.as_posix()}:
        message = message.replace(spelling, "file")
    return message


class CucimBackend:
    """cuCIM's ``CuImage`` (CPU decode here, and the GPU path where CUDA is present)."""

    name: ReaderName = "cucim"

    def __init__(self, path: Path) -> None:
        try:
            from cucim import CuImage
        except ImportError as error:
            raise BackendOpenError(f"cuCIM is not installed ({error})") from error

        # NOTE: cuCIM and its libtiff print warnings and decode errors, with the
        # file path, to descriptors 1 and 2 from C++. Python logging cannot filter
        # them; histomet-client captures and redacts both descriptors, but other
        # callers of this module see them raw.
        try:
            self._image = CuImage(str(path))
        except (ValueError, RuntimeError, TypeError) as error:
            # TypeError: cuCIM takes only paths that encode as UTF-8.
            reason = scrub_path(str(error), path)
            raise BackendOpenError(reason) from error

        resolutions = self._image.resolutions
        self.level_dimensions = tuple(
            (int(width), int(height))
            for width, height in resolutions["level_dimensions"]
        )
        self._downsamples = tuple(float(d) for d in resolutions["level_downsamples"])
        self._tile_sizes = tuple(
            (int(width), int(height))
            for width, height in resolutions.get("level_tile_sizes", ())
        )
        self._tiles: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
        self._tile_bytes = 0
        self._lock = threading.Lock()
        metadata: dict[str, Any] = self._image.metadata
        self._aperio: dict[str, str] = metadata.get("aperio", {})
        self.vendor = _cucim_vendor(metadata)
        self.objective_power = parse_positive_float(self._aperio.get("AppMag"))
        self.sample_bits = int(self._image.dtype.bits)
        self.channel_count = len(self._image.channel_names)

    def mpp_candidates(self) -> list[MppCandidate]:
        """Return the Aperio ``MPP`` field when present.

        cuCIM's ``spacing()`` is not used: cuCIM 26.6 reports 1 µm/px when the TIFF
        resolution denominator is 0. The reader takes TIFF resolution tags from the
        file header instead.
        """
        aperio_mpp = parse_positive_float(self._aperio.get("MPP"))
        if aperio_mpp is None:
            return []
        return [MppCandidate(aperio_mpp, aperio_mpp, "Aperio MPP field")]

    # Decoded native tiles kept per slide, so that grid tiles that are not aligned
    # with the file's tiles do not decode a shared tile again.
    _TILE_CACHE_BYTES = 96 * 1024 * 1024

    def read_level(
        self, level: int, x_level: int, y_level: int, width: int, height: int
    ) -> np.ndarray:
        """Read an in-bounds region, assembled from the file's tiles at ``level``.

        cuCIM 26.6 keeps no tile cache by default, so a 512 px read that straddles
        256 px JPEG 2000 tiles decoded up to 9 of them, and its neighbour decoded 3
        of those again. Each native tile is read aligned (one decode) and kept in
        an LRU cache. Levels without a tile size are read directly.
        """
        tile_width, tile_height = (
            self._tile_sizes[level] if level < len(self._tile_sizes) else (0, 0)
        )
        if tile_width <= 0 or tile_height <= 0:
            return self._read_direct(level, x_level, y_level, width, height)

        out: np.ndarray | None = None
        for row in range(
            y_level // tile_height, (y_level + height - 1) // tile_height + 1
        ):
            for column in range(
                x_level // tile_width, (x_level + width - 1) // tile_width + 1
            ):
                tile = self._native_tile(level, column, row, tile_width, tile_height)
                if out is None:
                    out = np.empty((height, width, tile.shape[2]), dtype=tile.dtype)
                left = max(x_level, column * tile_width)
                top = max(y_level, row * tile_height)
                right = min(x_level + width, column * tile_width + tile.shape[1])
                bottom = min(y_level + height, row * tile_height + tile.shape[0])
                out[
                    top - y_level : bottom - y_level, left - x_level : right - x_level
                ] = tile[
                    top - row * tile_height : bottom - row * tile_height,
                    left - column * tile_width : right - column * tile_width,
                ]
        assert out is not None
        return out

    def _native_tile(
        self, level: int, column: int, row: int, tile_width: int, tile_height: int
    ) -> np.ndarray:
        key = (level, column, row)
        with self._lock:
            cached = self._tiles.get(key)
            if cached is not None:
                self._tiles.move_to_end(key)
                return cached

        level_width, level_height = self.level_dimensions[level]
        x_level = column * tile_width
        y_level = row * tile_height
        width = min(tile_width, level_width - x_level)
        height = min(tile_height, level_height - y_level)
        tile = self._read_direct(level, x_level, y_level, width, height)

        with self._lock:
            if key not in self._tiles:
                self._tiles[key] = tile
                self._tile_bytes += tile.nbytes
            while self._tile_bytes > self._TILE_CACHE_BYTES and len(self._tiles) > 1:
                _, evicted = self._tiles.popitem(last=False)
                self._tile_bytes -= evicted.nbytes
        return tile

    def _read_direct(
        self, level: int, x_level: int, y_level: int, width: int, height: int
    ) -> np.ndarray:
        """Read a region with cuCIM, which takes level-0 locations.

        cuCIM maps a level-0 location to ``floor(location / downsample)`` with its
        own downsample, so the location passed is the smallest integer that maps
        back to ``(x_level, y_level)``.
        """
        downsample = self._downsamples[level]
        location = (
            math.ceil(x_level * downsample),
            math.ceil(y_level * downsample),
        )
        region = self._image.read_region(
            location=location, size=(width, height), level=level
        )
        return np.asarray(region)

    def close(self) -> None:
        """Close the cuCIM image and drop its cached tiles."""
        with self._lock:
            self._tiles.clear()
            self._tile_bytes = 0
        self._image.close()


class OpenSlideBackend:
    """OpenSlide, used for formats cuCIM cannot read (NDPI, DICOM, MRXS and others)."""

    name: ReaderName = "openslide"

    def __init__(self, path: Path, colour_fix: ColourFix = "none") -> None:
        try:
            import openslide
        except ImportError as error:
            raise BackendOpenError(f"OpenSlide is not installed ({error})") from error

        self._colour_fix = colour_fix
        try:
            self._slide = openslide.OpenSlide(path)
        except openslide.OpenSlideError as error:
            reason = scrub_path(str(error), path)
            raise BackendOpenError(reason) from error

        self.level_dimensions = tuple(
            (int(width), int(height)) for width, height in self._slide.level_dimensions
        )
        self._downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        self._properties = dict(self._slide.properties)
        self.vendor = self._properties.get("openslide.vendor")
        self.objective_power = parse_positive_float(
            self._properties.get("openslide.objective-power")
        )
        # openslide-python returns every format as 8-bit RGBA with straight alpha.
        self.sample_bits = 8
        self.channel_count = 4

    def mpp_candidates(self) -> list[MppCandidate]:
        """Return ``openslide.mpp-x/y`` when present.

        OpenSlide 4.0.1 sets them from TIFF resolution tags only for inch and
        centimeter units. The reader parses the tags from the file header for the
        other units.
        """
        mpp_x = parse_positive_float(self._properties.get("openslide.mpp-x"))
        mpp_y = parse_positive_float(self._properties.get("openslide.mpp-y"))
        if mpp_x is None or mpp_y is None:
            return []
        return [MppCandidate(mpp_x, mpp_y, "openslide.mpp-x/y")]

    def read_level(
        self, level: int, x_level: int, y_level: int, width: int, height: int
    ) -> np.ndarray:
        """Read an in-bounds region with OpenSlide, which takes level-0 locations.

        The location is rounded to the nearest level-0 pixel. When the downsample is
        not an integer, OpenSlide interpolates that sub-pixel remainder (under half
        a level pixel), so pixels can differ slightly from cuCIM's.
        """
        downsample = self._downsamples[level]
        location = (round(x_level * downsample), round(y_level * downsample))
        # OpenSlide 4.0.1 raises on every JPEG error and warning libjpeg reports
        # (truncated data, bad Huffman codes, extra bytes). NOTE: a bit flip that
        # still decodes to a valid JPEG stream is reported by no decoder, and SVS
        # files carry no checksums, so such damage reaches the pixels unreported.
        region = np.asarray(self._slide.read_region(location, level, (width, height)))
        if self._colour_fix == "ycbcr_to_rgb":
            region = region.copy()
            region[..., :3] = ycbcr_to_rgb(region[..., :3])
        return region

    def close(self) -> None:
        """Close the OpenSlide handle."""
        self._slide.close()


class TifffileBackend:
    """tifffile for plain single-level TIFFs, such as striped (non-tiled) images.

    Neither slide reader suits these: OpenSlide rejects striped TIFFs, and cuCIM
    reads them through a slow whole-image path. Strips are decoded on demand with
    tifffile (imagecodecs supplies the codecs) and the most recent ones are kept,
    within ``_STRIP_CACHE_BYTES``.
    """

    name: ReaderName = "tifffile"
    _STRIP_CACHE_BYTES = 64 * 1024 * 1024

    def __init__(self, path: Path) -> None:
        import tifffile

        try:
            self._tiff = tifffile.TiffFile(path)
        except (tifffile.TiffFileError, ValueError, OSError) as error:
            raise BackendOpenError(scrub_path(str(error), path)) from error

        try:
            self._page = self._tiff.pages[0]
            self._check_layout()
        except BaseException:
            self._tiff.close()
            raise

        page = self._page
        self.level_dimensions = ((int(page.imagewidth), int(page.imagelength)),)
        self.vendor = "generic-tiff"
        self.objective_power = None
        self.sample_bits = int(page.bitspersample)
        self.channel_count = int(page.samplesperpixel)
        self._rows_per_strip = min(int(page.rowsperstrip), int(page.imagelength))
        self._strips: OrderedDict[int, np.ndarray] = OrderedDict()
        self._strip_bytes = 0
        # Reads come from several threads; the file position and the cache are shared.
        self._lock = threading.Lock()

    def _check_layout(self) -> None:
        page = self._page
        if page.is_tiled:
            raise BackendOpenError("the image is tiled; a slide reader handles it")
        if int(page.planarconfig) != 1:
            raise BackendOpenError("planar (separate) sample layout is not supported")
        if page.samplesperpixel not in (3, 4):
            raise BackendOpenError(f"{page.samplesperpixel} samples per pixel")

    def mpp_candidates(self) -> list[MppCandidate]:
        """Return nothing: the reader takes TIFF resolution tags from the header."""
        return []

    def read_level(
        self, level: int, x_level: int, y_level: int, width: int, height: int
    ) -> np.ndarray:
        """Read an in-bounds region of the only level from its strips."""
        if level != 0:
            raise ValueError(f"invalid level {level}: a plain TIFF has only level 0")
        out = np.empty((height, width, self.channel_count), dtype=np.uint8)
        first = y_level // self._rows_per_strip
        last = (y_level + height - 1) // self._rows_per_strip
        for index in range(first, last + 1):
            with self._lock:
                strip = self._strip(index)
            strip_top = index * self._rows_per_strip
            top = max(y_level, strip_top)
            bottom = min(y_level + height, strip_top + strip.shape[0])
            out[top - y_level : bottom - y_level] = strip[
                top - strip_top : bottom - strip_top, x_level : x_level + width
            ]
        return out

    def _strip(self, index: int) -> np.ndarray:
        cached = self._strips.get(index)
        if cached is not None:
            self._strips.move_to_end(index)
            return cached

        page = self._page
        handle = self._tiff.filehandle
        handle.seek(page.dataoffsets[index])
        data = handle.read(page.databytecounts[index])
        if len(data) != page.databytecounts[index]:
            raise OSError(f"strip {index} is truncated: the file ends inside it")
        segment, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
        rows = min(
            self._rows_per_strip, page.imagelength - index * self._rows_per_strip
        )
        strip = np.asarray(segment).reshape(-1, page.imagewidth, self.channel_count)
        strip = np.ascontiguousarray(strip[:rows])

        self._strips[index] = strip
        self._strip_bytes += strip.nbytes
        while self._strip_bytes > self._STRIP_CACHE_BYTES and len(self._strips) > 1:
            _, evicted = self._strips.popitem(last=False)
            self._strip_bytes -= evicted.nbytes
        return strip

    def close(self) -> None:
        """Close the file."""
        self._strips.clear()
        self._tiff.close()


def _cucim_vendor(metadata: dict[str, Any]) -> str | None:
    """Return the vendor in OpenSlide's ``openslide.vendor`` spelling."""
    if "aperio" in metadata:
        return "aperio"
    if "philips" in metadata:
        return "philips"
    if "tiff" in metadata:
        return "generic-tiff"
    return None
