"""``histomet-client tiles``: open, mask and tile a slide without a server.

It is the quality-control step before a prediction: it reports the reader, the
level read, the MPP and where it came from, and the tile count, for the same tile
size and MPP as the demo model unless the options set others. By default every tile is
also read and decoded, so a corrupt tile fails here as it would in a prediction.
Exit codes: 0 the slide tiles (0 tiles included), 3 the slide cannot be read.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from histomet.client.native_output import NativeOutputMonitor
from histomet.client.native_output import check_decode_errors
from histomet.errors import InputError
from histomet.errors import SlideNotFoundError
from histomet.slide import iter_tile_batches
from histomet.slide import open_slide
from histomet.slide import plan_slide_tiles
from histomet.slide.geojson import slide_feature_collection
from histomet.slide.reader import READER_CHOICES

RESULT_SCHEMA = "histomet.tiles/1"
# The demo model's contract (CONCH-style 512 px tiles at 20x). A served model
# declares its own, which `predict` reads from the server.
DEFAULT_TILE_PX = 512
DEFAULT_TARGET_MPP = 0.5
DEFAULT_MIN_TISSUE_FRACTION = 0.25
THUMBNAIL_MAX_PX = 2048


@dataclass(frozen=True)
class TilesOptions:
    """Settings of one tiling run."""

    reader: str = "auto"
    mpp: float | None = None
    tile_px: int = DEFAULT_TILE_PX
    target_mpp: float = DEFAULT_TARGET_MPP
    min_tissue_fraction: float = DEFAULT_MIN_TISSUE_FRACTION
    read_tiles: bool = True
    batch_size: int = 32
    show_paths: bool = False


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def add_tiles_arguments(
    parser: argparse.ArgumentParser, mpp_type: Callable[[str], float]
) -> None:
    """Add the ``tiles`` subcommand's arguments to ``parser``."""
    from histomet.arguments import positive_float
    from histomet.arguments import positive_int

    parser.add_argument("slide", type=Path, help="slide file, or DICOM WSI folder")
    parser.add_argument(
        "--json", type=Path, help="write the report as JSON to this file"
    )
    parser.add_argument(
        "--geojson",
        type=Path,
        help="write tissue contours and tiles as GeoJSON (level-0 pixels, for QuPath)",
    )
    parser.add_argument(
        "--mpp",
        type=mpp_type,
        help="microns per pixel at level 0, for slides whose metadata lacks it; "
        "overrides the metadata when given",
    )
    parser.add_argument(
        "--reader",
        choices=READER_CHOICES,
        default="auto",
        help="slide reader (default: auto)",
    )
    parser.add_argument(
        "--tile-px",
        type=positive_int,
        default=DEFAULT_TILE_PX,
        help=f"tile side delivered to the model, in pixels (default: {DEFAULT_TILE_PX})",
    )
    parser.add_argument(
        "--target-mpp",
        type=positive_float,
        default=DEFAULT_TARGET_MPP,
        help=f"microns per pixel of a tile (default: {DEFAULT_TARGET_MPP})",
    )
    parser.add_argument(
        "--min-tissue-fraction",
        type=_fraction,
        default=DEFAULT_MIN_TISSUE_FRACTION,
        help="minimum tissue fraction of a kept tile, 0 to 1 "
        f"(default: {DEFAULT_MIN_TISSUE_FRACTION})",
    )
    parser.add_argument(
        "--plan-only",
        action="store_true",
        help="plan the grid without reading the tiles (faster, but decode errors "
        "in tiles go unnoticed)",
    )
    parser.add_argument(
        "--show-paths",
        action="store_true",
        help="name the slide's path in messages (off by default: file names can "
        "hold patient identifiers)",
    )
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors")


def tile_slide(path: Path, options: TilesOptions) -> tuple[dict, dict]:
    """Open, mask and tile one slide; return the report and its GeoJSON.

    Raises a ``HistometError`` subclass for a slide that cannot be read.
    """
    from histomet.client.native_output import active_monitor
    from histomet.client import identity

    started = time.perf_counter()
    display_name = str(path) if options.show_paths else "the slide"
    if not path.exists():
        where = f"at {path}" if options.show_paths else "at the path given"
        raise SlideNotFoundError(
            f"slide not found: no file or folder {where}", "check the path"
        )
    if not (path.is_file() or path.is_dir()):
        raise InputError(
            f"{display_name} is not a regular file or folder",
            "give a slide file or a DICOM WSI folder",
        )

    monitor = active_monitor()
    mark = monitor.mark() if monitor is not None else 0
    timings: dict[str, float] = {}
    with open_slide(
        path, reader=options.reader, mpp_override=options.mpp, display_name=display_name
    ) as slide:
        info = slide.info
        timings["open_s"] = time.perf_counter() - started

        step = time.perf_counter()
        mask, grid = plan_slide_tiles(
            slide,
            tile_px=options.tile_px,
            target_mpp=options.target_mpp,
            min_tissue_fraction=options.min_tissue_fraction,
            thumbnail_max_px=THUMBNAIL_MAX_PX,
        )
        timings["tissue_s"] = time.perf_counter() - step

        tiles_read = 0
        if options.read_tiles:
            step = time.perf_counter()
            for batch in iter_tile_batches(slide, grid, options.batch_size):
                tiles_read += len(batch.tiles)
            timings["tile_reads_s"] = time.perf_counter() - step
    _check_decode_errors(monitor, mark, display_name)
    timings["total_s"] = time.perf_counter() - started

    report = {
        "schema": RESULT_SCHEMA,
        "status": "ok" if grid.n_tiles else "no_tissue",
        "message": None if grid.n_tiles else _no_tissue_message(options),
        "slide": {
            "id": identity.slide_id(path, identity.load_key()),
            "reader": info.reader,
            "vendor": info.vendor,
            "dimensions": list(info.dimensions),
            "level_count": info.level_count,
            "level_dimensions": [list(size) for size in info.level_dimensions],
            "level_downsamples": [round(d, 6) for d in info.level_downsamples],
            "mpp": round(float(info.mpp), 6),
            "mpp_source": info.mpp_source,
            "objective_power": info.objective_power,
            "warnings": list(info.warnings),
        },
        "tissue": {
            "fraction": round(float(mask.tissue_fraction), 6),
            "method": mask.method,
        },
        "grid": {
            "tiles": grid.n_tiles,
            "tile_px": grid.tile_px,
            "target_mpp": grid.target_mpp,
            "tile_mpp": round(float(grid.tile_mpp), 6),
            "read_level": grid.level,
            "read_px": grid.read_px,
            "tile_size_l0": round(float(grid.tile_size_l0), 4),
            "min_tissue_fraction": options.min_tissue_fraction,
            "tiles_read": tiles_read if options.read_tiles else None,
            "coordinates": "level-0 pixels, top-left corner of each tile",
        },
        "timing_s": {key: round(value, 3) for key, value in timings.items()},
    }
    return report, slide_feature_collection(mask, grid)


def _no_tissue_message(options: TilesOptions) -> str:
    return (
        "no tissue found: no tile has at least "
        f"{options.min_tissue_fraction:.0%} tissue"
    )


def _check_decode_errors(
    monitor: NativeOutputMonitor | None, mark: int, display_name: str
) -> None:
    check_decode_errors(monitor, mark, display_name, "the file is corrupt or truncated")


def format_tiles_summary(report: dict) -> str:
    """Return the short human summary of a tiling report; never names the file."""
    slide = report["slide"]
    grid = report["grid"]
    lines = [
        f"slide   {slide['id']}  reader {slide['reader']}  {slide['mpp']:.4g} µm/px "
        f"({slide['mpp_source']})  {slide['level_count']} levels, level 0 "
        f"{slide['dimensions'][0]}x{slide['dimensions'][1]}",
        f"grid    {grid['tiles']} tiles of {grid['tile_px']} px at "
        f"{grid['tile_mpp']:.4g} µm/px, read as {grid['read_px']} px at level "
        f"{grid['read_level']}; tissue {report['tissue']['fraction']:.1%} of the slide",
    ]
    for warning in slide["warnings"]:
        lines.append(f"warning {warning}")
    if report["status"] == "no_tissue":
        lines.append(f"result  {report['message']}")
    return "\n".join(lines)


def run_tiles(args: argparse.Namespace) -> int:
    """Run the ``tiles`` subcommand and return its exit code."""
    from histomet.client.cli import _secrets
    from histomet.client.cli import check_output_path
    from histomet.client.cli import write_json

    outputs = {}
    for name in ("json", "geojson"):
        value = getattr(args, name)
        outputs[name] = check_output_path(value, args.slide) if value else None
    options = TilesOptions(
        reader=args.reader,
        mpp=args.mpp,
        tile_px=args.tile_px,
        target_mpp=args.target_mpp,
        min_tissue_fraction=args.min_tissue_fraction,
        read_tiles=not args.plan_only,
        show_paths=args.show_paths,
    )
    with NativeOutputMonitor(_secrets(args)):
        report, geojson = tile_slide(args.slide, options)

    if outputs["json"] is not None:
        write_json(outputs["json"], report)
    if outputs["geojson"] is not None:
        write_json(outputs["geojson"], geojson)
    if not args.quiet:
        print(format_tiles_summary(report))
        sys.stdout.flush()
    return 0
