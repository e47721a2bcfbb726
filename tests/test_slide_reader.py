"""Slide reader: formats, reader fallback, MPP, pixel format and region reads."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from histomet.errors import MissingMppError
from histomet.errors import SlideNotFoundError
from histomet.errors import SlideOpenError
from histomet.errors import UnsupportedImageError
from histomet.slide import composite_on_white
from histomet.slide import mpp_from_resolution
from histomet.slide import open_slide
from histomet.slide import reader as reader_module
from histomet.slide.mpp import microns_per_unit
from histomet.slide.mpp import pixels_per_unit

from .slide.synthetic import background
from .slide.synthetic import paint_tissue
from .slide.synthetic import set_resolution_tags
from .slide.synthetic import write_pyramid

READERS = ("cucim", "openslide")


def _tissue_slide(width: int = 512, height: int = 512) -> np.ndarray:
    image = background(width, height)
    paint_tissue(image, (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
    return image


# Real slides


def test_cmu_small_opens_with_cucim(shared_slides: Path) -> None:
    with open_slide(shared_slides / "CMU-1-Small-Region.svs") as slide:
        info = slide.info

    assert info.reader == "cucim"
    assert info.mpp == pytest.approx(0.499, abs=0.001)
    assert info.mpp_source == "metadata"
    assert info.objective_power == 20.0
    assert info.vendor == "aperio"
    assert info.dimensions == (2220, 2967)
    assert info.level_count == 1
    assert info.level_downsamples == (1.0,)


def test_cmu_small_openslide_gives_same_info(shared_slides: Path) -> None:
    path = shared_slides / "CMU-1-Small-Region.svs"
    with open_slide(path, reader="cucim") as cucim_slide:
        cucim_info = cucim_slide.info
        cucim_pixels = cucim_slide.read_region((1000, 1200), 0, (64, 48))
    with open_slide(path, reader="openslide") as openslide_slide:
        openslide_info = openslide_slide.info
        openslide_pixels = openslide_slide.read_region((1000, 1200), 0, (64, 48))

    assert openslide_info.reader == "openslide"
    assert openslide_info.mpp == cucim_info.mpp
    assert openslide_info.objective_power == cucim_info.objective_power
    assert openslide_info.level_dimensions == cucim_info.level_dimensions
    # Both decode the same JPEG tiles, with different JPEG libraries.
    difference = np.abs(cucim_pixels.astype(int) - openslide_pixels.astype(int))
    assert difference.mean() < 2.0


def test_ndpi_falls_back_to_openslide(shared_slides: Path) -> None:
    with open_slide(shared_slides / "hamamatsu_test3-DAPI-2-387.ndpi") as slide:
        info = slide.info

    assert info.reader == "openslide"
    assert info.vendor == "hamamatsu"
    assert info.mpp == pytest.approx(0.228175, abs=1e-5)
    assert info.objective_power == 40.0
    assert info.level_count == 7


def test_ndpi_forced_cucim_raises_open_error(shared_slides: Path) -> None:
    path = shared_slides / "hamamatsu_test3-DAPI-2-387.ndpi"
    with pytest.raises(SlideOpenError) as caught:
        open_slide(path, reader="cucim", display_name="slide A")

    message = str(caught.value)
    assert "cuCIM" in message
    assert "slide A" in message
    assert str(path) not in message


def test_dicom_folder_opens_with_openslide(shared_slides: Path) -> None:
    with open_slide(shared_slides / "dicom_cmu1_small") as slide:
        info = slide.info
        region = slide.read_region((0, 0), info.level_count - 1, (4, 4))

    assert info.reader == "openslide"
    assert info.vendor == "dicom"
    assert info.level_count == 12
    assert info.dimensions == (2220, 2967)
    assert info.mpp == pytest.approx(0.499, abs=0.001)
    # Measured, not assumed: (2220 / 1110 + 2967 / 1483) / 2.
    assert info.level_downsamples[1] == pytest.approx(2.000337, abs=1e-6)
    assert region.shape == (4, 4, 3)
    # The last level is 1x1, so all but one pixel is white padding.
    assert (region[1:, :] == 255).all()


def test_dicom_folder_forced_cucim_raises(shared_slides: Path) -> None:
    with pytest.raises(SlideOpenError, match="it is a DICOM WSI"):
        open_slide(shared_slides / "dicom_cmu1_small", reader="cucim")


def test_folder_without_dicom_raises(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a slide\n")

    with pytest.raises(SlideOpenError, match="no DICOM WSI"):
        open_slide(tmp_path)


def test_tcga_without_mpp_raises_missing_mpp(shared_slides: Path) -> None:
    with pytest.raises(MissingMppError) as caught:
        open_slide(shared_slides / "tcga-cr-7395-01a-01-ts1.svs")

    message = str(caught.value)
    assert "--mpp" in message
    assert "neither MPP nor objective power" in message
    assert caught.value.exit_code == 3


def test_tcga_with_override_records_user(shared_slides: Path) -> None:
    path = shared_slides / "tcga-cr-7395-01a-01-ts1.svs"
    with open_slide(path, mpp_override=0.25) as slide:
        info = slide.info

    assert info.mpp == 0.25
    assert info.mpp_source == "user"
    assert info.objective_power is None
    assert info.level_count == 2
    assert info.level_downsamples[1] == pytest.approx(2.0005055, abs=1e-6)


def test_override_wins_over_metadata(shared_slides: Path) -> None:
    path = shared_slides / "CMU-1-Small-Region.svs"
    with open_slide(path, mpp_override=0.26) as slide:
        info = slide.info

    assert info.mpp == 0.26
    assert info.mpp_source == "user"


@pytest.mark.parametrize("bad_override", [0.0, -0.25, 40.0, float("nan")])
def test_invalid_override_raises_value_error(
    shared_slides: Path, bad_override: float
) -> None:
    path = shared_slides / "CMU-1-Small-Region.svs"
    with pytest.raises(ValueError, match="invalid MPP override"):
        open_slide(path, mpp_override=bad_override)


def test_require_mpp_false_opens_without_mpp(shared_slides: Path) -> None:
    path = shared_slides / "tcga-cr-7395-01a-01-ts1.svs"
    with open_slide(path, require_mpp=False) as slide:
        info = slide.info

    assert info.mpp is None
    assert info.mpp_source is None
    with pytest.raises(ValueError, match="MPP is unknown"):
        info.level_mpp(0)


def test_require_mpp_false_ignores_implausible_mpp(shared_slides: Path) -> None:
    path = shared_slides / "pathml_small_HE_levels.tiff"
    with open_slide(path, require_mpp=False) as slide:
        info = slide.info

    assert info.mpp is None
    assert info.level_count == 4


def test_kidney_striped_opens_with_tifffile(shared_slides: Path) -> None:
    path = shared_slides / "kidney-48-5.tif"
    with pytest.raises(MissingMppError, match="--mpp"):
        open_slide(path)

    with open_slide(path, mpp_override=0.5) as slide:
        info = slide.info
        region = slide.read_region((700, 400), 0, (64, 48))
    with open_slide(path, mpp_override=0.5, reader="cucim") as slide:
        cucim_info = slide.info
        # cuCIM returns RGBA for this file, and the reader composites it to RGB.
        cucim_region = slide.read_region((700, 400), 0, (64, 48))

    assert info.reader == "tifffile"
    assert info.level_count == 1
    assert info.dimensions == (1493, 901)
    assert region.shape == (48, 64, 3)
    assert region.dtype == np.uint8
    assert cucim_info.reader == "cucim"
    assert np.array_equal(region, cucim_region)


def test_smalltif_16bit_gray_is_unsupported(shared_slides: Path) -> None:
    with pytest.raises(UnsupportedImageError) as caught:
        open_slide(shared_slides / "pathml_smalltif.tif")

    message = str(caught.value)
    assert "1\u00d7uint16" in message
    assert "8-bit RGB brightfield" in message


def test_implausible_mpp_is_treated_as_missing(shared_slides: Path) -> None:
    path = shared_slides / "pathml_small_HE_levels.tiff"
    with pytest.raises(MissingMppError) as caught:
        open_slide(path)

    assert "352.858" in str(caught.value)
    assert "outside the plausible range" in str(caught.value)
    assert "--mpp" in str(caught.value)


@pytest.mark.parametrize("reader", READERS)
def test_implausible_mpp_then_objective_power_warns(
    tmp_path: Path, reader: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_pyramid(
        tmp_path / "slide.svs",
        _tissue_slide(),
        (2,),
        description=_svs_like_description("AppMag = 40|MPP = 352.86"),
    )

    with caplog.at_level(logging.WARNING, logger="histomet.slide.mpp"):
        with open_slide(path, reader=reader) as slide:
            info = slide.info

    assert info.mpp == pytest.approx(0.25)
    assert info.mpp_source == "objective_power"
    assert "ignoring MPP 352.86" in caplog.text
    assert "objective power 40x" in caplog.text
    assert str(path) not in caplog.text


@pytest.mark.parametrize("reader", READERS)
def test_small_levels_edge_read_is_padded(shared_slides: Path, reader: str) -> None:
    path = shared_slides / "pathml_small_HE_levels.tiff"
    with open_slide(path, reader=reader, mpp_override=0.5) as slide:
        info = slide.info
        region = slide.read_region((0, 0), 0, (256, 256))

    assert info.level_downsamples[2] == pytest.approx(4.016129, abs=1e-6)
    assert info.level_downsamples[3] == pytest.approx(8.086312, abs=1e-6)
    assert region.shape == (256, 256, 3)
    # The image is 300x250, so rows 250 to 255 lie past the bottom edge.
    assert (region[250:] == 255).all()
    assert not (region[:250] == 255).all()


def test_small_levels_pixels_match_between_readers(shared_slides: Path) -> None:
    path = shared_slides / "pathml_small_HE_levels.tiff"
    regions = []
    for reader in READERS:
        with open_slide(path, reader=reader, mpp_override=0.5) as slide:
            regions.append(slide.read_region((0, 0), 0, (256, 256)))

    assert np.array_equal(regions[0], regions[1])


def test_missing_path_raises_not_found(tmp_path: Path) -> None:
    path = tmp_path / "absent.svs"
    with pytest.raises(SlideNotFoundError) as caught:
        open_slide(path)

    assert str(path) not in str(caught.value)
    assert caught.value.exit_code == 3


def test_text_file_renamed_svs_raises_open_error(tmp_path: Path) -> None:
    path = tmp_path / "report.svs"
    path.write_text("this is a text file, not a slide\n" * 20)

    with pytest.raises(SlideOpenError) as caught:
        open_slide(path)

    message = str(caught.value)
    assert "cuCIM" in message
    assert "OpenSlide" in message
    assert "Supported formats" in message
    assert str(path) not in message


def test_invalid_reader_name_raises() -> None:
    with pytest.raises(ValueError, match="invalid reader"):
        open_slide("anything.svs", reader="tiffslide")  # type: ignore[arg-type]


# MPP from TIFF resolution tags


@pytest.mark.parametrize(
    ("unit", "expected"),
    [
        ("cm", 1e4),
        ("Centimeter", 1e4),
        ("CENTIMETERS", 1e4),
        ("inch", 25_400.0),
        ("Inches", 25_400.0),
        ("mm", 1e3),
        ("millimeter", 1e3),
        ("um", 1.0),
        ("\u00b5m", 1.0),
        ("\u03bcm", 1.0),
        ("micron", 1.0),
        ("Micrometer", 1.0),
        (2, 25_400.0),
        (3, 1e4),
        ("none", None),
        (1, None),
        ("", None),
        (None, None),
        ("furlong", None),
    ],
)
def test_resolution_unit_spellings(unit: str | int | None, expected: float) -> None:
    assert microns_per_unit(unit) == expected


def test_rational_resolution_uses_denominator() -> None:
    assert pixels_per_unit((400_000, 10)) == 40_000.0
    assert mpp_from_resolution((400_000, 10), "centimeter") == pytest.approx(0.25)


def test_zero_denominator_is_missing() -> None:
    assert pixels_per_unit((40_000, 0)) is None
    assert mpp_from_resolution((40_000, 0), "centimeter") is None


def test_zero_resolution_is_missing() -> None:
    assert pixels_per_unit(0.0) is None
    assert pixels_per_unit((0, 1)) is None


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize(
    ("rational", "unit"),
    [
        ((400_000, 10), "CENTIMETER"),
        ((101_600, 1), "INCH"),
        ((4_000, 1), 4),  # tifffile's non-standard MILLIMETER code
    ],
    ids=["centimeter-denominator-10", "inch", "millimeter"],
)
def test_tiff_resolution_gives_mpp_quarter(
    tmp_path: Path, reader: str, rational: tuple[int, int], unit: str | int
) -> None:
    path = write_pyramid(
        tmp_path / "slide.tif",
        _tissue_slide(),
        (2,),
        resolution=(1.0, 1.0),
        resolution_unit=unit,
    )
    set_resolution_tags(path, rational)

    with open_slide(path, reader=reader) as slide:
        info = slide.info

    assert info.mpp == pytest.approx(0.25, abs=1e-6)
    assert info.mpp_source == "metadata"


@pytest.mark.parametrize("reader", READERS)
def test_tiff_resolution_zero_denominator_is_missing(
    tmp_path: Path, reader: str
) -> None:
    path = write_pyramid(
        tmp_path / "slide.tif",
        _tissue_slide(),
        (2,),
        resolution=(1.0, 1.0),
        resolution_unit="CENTIMETER",
    )
    set_resolution_tags(path, (40_000, 0))

    # cuCIM 26.6 reports a spacing of 1 µm/px for this file, which must not be used.
    with pytest.raises(MissingMppError, match="neither MPP nor objective power"):
        open_slide(path, reader=reader)


@pytest.mark.parametrize("reader", READERS)
def test_tiff_resolution_unit_none_is_missing(tmp_path: Path, reader: str) -> None:
    path = write_pyramid(
        tmp_path / "slide.tif",
        _tissue_slide(),
        (2,),
        resolution=(4.0, 4.0),
        resolution_unit="NONE",
    )

    with pytest.raises(MissingMppError, match="--mpp"):
        open_slide(path, reader=reader)


# MPP from Aperio descriptions and objective power


def _svs_like_description(fields: str) -> str:
    return f"Aperio Image Library v12.0.0\r\n512x512 (256x256) RGB|{fields}"


@pytest.mark.parametrize("reader", READERS)
def test_aperio_description_mpp(tmp_path: Path, reader: str) -> None:
    path = write_pyramid(
        tmp_path / "slide.svs",
        _tissue_slide(),
        (2,),
        description=_svs_like_description("AppMag = 40|MPP = 0.2500"),
    )

    with open_slide(path, reader=reader) as slide:
        info = slide.info

    assert info.vendor == "aperio"
    assert info.mpp == pytest.approx(0.25, abs=1e-6)
    assert info.mpp_source == "metadata"
    assert info.objective_power == 40.0


@pytest.mark.parametrize("reader", READERS)
def test_objective_power_fallback_warns(
    tmp_path: Path, reader: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_pyramid(
        tmp_path / "slide.svs",
        _tissue_slide(),
        (2,),
        description=_svs_like_description("AppMag = 20"),
    )

    with caplog.at_level(logging.WARNING, logger="histomet.slide.mpp"):
        with open_slide(path, reader=reader) as slide:
            info = slide.info

    assert info.mpp == pytest.approx(0.5)
    assert info.mpp_source == "objective_power"
    assert "objective power 20x" in caplog.text
    assert str(path) not in caplog.text


# Pixel formats other than 8-bit RGB


@pytest.mark.parametrize(
    ("pixels", "photometric", "expected_format"),
    [
        (np.full((512, 512), 200, np.uint8), "minisblack", "1\u00d7uint8"),
        (np.full((512, 512), 4000, np.uint16), "minisblack", "1\u00d7uint16"),
        (np.full((512, 512, 3), 4000, np.uint16), "rgb", "3\u00d7uint16"),
    ],
    ids=["gray8", "gray16", "rgb16"],
)
@pytest.mark.parametrize("reader", ("auto", *READERS))
def test_non_rgb8_is_unsupported(
    tmp_path: Path,
    pixels: np.ndarray,
    photometric: str,
    expected_format: str,
    reader: str,
) -> None:
    path = write_pyramid(
        tmp_path / "slide.tif",
        pixels,
        (2,),
        photometric=photometric,
        resolution=(40_000.0, 40_000.0),
        resolution_unit="CENTIMETER",
    )

    with pytest.raises(UnsupportedImageError) as caught:
        open_slide(path, reader=reader)

    assert expected_format in str(caught.value)


# read_region and thumbnail


@pytest.mark.parametrize("reader", READERS)
def test_level_past_last_raises(tmp_path: Path, reader: str) -> None:
    path = write_pyramid(
        tmp_path / "slide.tif",
        _tissue_slide(),
        (2,),
        resolution=(40_000.0, 40_000.0),
        resolution_unit="CENTIMETER",
    )

    with open_slide(path, reader=reader) as slide:
        with pytest.raises(ValueError, match="invalid level 2"):
            slide.read_region((0, 0), 2, (16, 16))
        with pytest.raises(ValueError, match="invalid level -1"):
            slide.read_region((0, 0), -1, (16, 16))


@pytest.mark.parametrize("reader", READERS)
def test_region_fully_outside_is_white(tmp_path: Path, reader: str) -> None:
    path = write_pyramid(
        tmp_path / "slide.tif",
        _tissue_slide(),
        (2,),
        resolution=(40_000.0, 40_000.0),
        resolution_unit="CENTIMETER",
    )

    with open_slide(path, reader=reader) as slide:
        right = slide.read_region((600, 0), 0, (32, 32))
        negative = slide.read_region((-40, -40), 1, (16, 16))

    assert (right == 255).all()
    assert (negative == 255).all()


@pytest.mark.parametrize("reader", READERS)
def test_negative_location_pads_top_left(tmp_path: Path, reader: str) -> None:
    image = _tissue_slide()
    path = write_pyramid(
        tmp_path / "slide.tif",
        image,
        (2,),
        resolution=(40_000.0, 40_000.0),
        resolution_unit="CENTIMETER",
    )

    with open_slide(path, reader=reader) as slide:
        region = slide.read_region((-10, -20), 0, (64, 64))

    assert (region[:20] == 255).all()
    assert (region[:, :10] == 255).all()
    assert np.array_equal(region[20:, 10:], image[:44, :54])


def test_closed_slide_rejects_reads(shared_slides: Path) -> None:
    slide = open_slide(shared_slides / "CMU-1-Small-Region.svs")
    slide.close()
    slide.close()

    with pytest.raises(ValueError, match="closed"):
        slide.read_region((0, 0), 0, (8, 8))


def test_composite_on_white_blends_alpha() -> None:
    rgba = np.array(
        [[[10, 20, 30, 255], [10, 20, 30, 0], [0, 0, 0, 128]]], dtype=np.uint8
    )

    rgb = composite_on_white(rgba)

    assert rgb.tolist() == [[[10, 20, 30], [255, 255, 255], [127, 127, 127]]]


def test_thumbnail_uses_smallest_level_above_size(tmp_path: Path) -> None:
    image = _tissue_slide(2048, 1024)
    path = write_pyramid(
        tmp_path / "slide.tif",
        image,
        (4, 16),
        resolution=(40_000.0, 40_000.0),
        resolution_unit="CENTIMETER",
    )

    with open_slide(path) as slide:
        thumbnail, downsample = slide.thumbnail(400)

    # Level 1 (512x256) is the smallest level at least 400 px wide.
    assert thumbnail.shape == (200, 400, 3)
    assert thumbnail.dtype == np.uint8
    assert downsample == pytest.approx(2048 / 400)


def test_thumbnail_never_upscales(tmp_path: Path) -> None:
    path = write_pyramid(
        tmp_path / "slide.tif",
        _tissue_slide(300, 200),
        (),
        resolution=(40_000.0, 40_000.0),
        resolution_unit="CENTIMETER",
    )

    with open_slide(path) as slide:
        thumbnail, downsample = slide.thumbnail(1024)

    assert thumbnail.shape == (200, 300, 3)
    assert downsample == 1.0


def test_thumbnail_strips_match_single_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_pyramid(
        tmp_path / "slide.tif",
        _tissue_slide(1536, 1024),
        (),
        resolution=(40_000.0, 40_000.0),
        resolution_unit="CENTIMETER",
    )

    with open_slide(path) as slide:
        whole, whole_downsample = slide.thumbnail(500)
        # A budget of 40 KiB forces strips of 4 to 8 rows.
        monkeypatch.setattr(reader_module, "_THUMBNAIL_STRIP_BYTES", 40 * 1024)
        stripped, stripped_downsample = slide.thumbnail(500)

    assert stripped_downsample == whole_downsample
    assert np.array_equal(stripped, whole)


def test_cucim_tile_cache_matches_direct_reads(shared_slides: Path) -> None:
    path = shared_slides / "tcga-cr-7395-01a-01-ts1.svs"
    with open_slide(path, reader="cucim", mpp_override=0.25) as slide:
        backend = slide._backend
        # Unaligned with the 256 px tiles, at both levels and at the level edge.
        for level, x, y, width, height in [
            (0, 100, 130, 600, 300),
            (1, 511, 511, 512, 512),
            (1, 2000, 1700, 221, 83),
        ]:
            assembled = backend.read_level(level, x, y, width, height)
            direct = backend._read_direct(level, x, y, width, height)

            assert assembled.shape == direct.shape
            assert np.array_equal(assembled, direct)
