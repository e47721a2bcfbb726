"""Slide reading, MPP, tissue mask, tile grid and batched tile reads.

Typical use::

    with open_slide(path, display_name=name) as slide:
        thumbnail, downsample = slide.thumbnail(2048)
        mask = detect_tissue(thumbnail, downsample=downsample, mpp=slide.info.mpp)
        grid = plan_tiles(slide.info, mask, tile_px=512, target_mpp=0.5)
        for batch in iter_tile_batches(slide, grid, batch_size=64):
            ...
"""

from histomet.slide.mpp import MAX_PLAUSIBLE_MPP
from histomet.slide.mpp import MIN_PLAUSIBLE_MPP
from histomet.slide.mpp import MppSource
from histomet.slide.mpp import mpp_from_resolution
from histomet.slide.reader import ReaderChoice
from histomet.slide.reader import Slide
from histomet.slide.reader import SlideInfo
from histomet.slide.reader import composite_on_white
from histomet.slide.reader import open_slide
from histomet.slide.reader import slide_id_for_path
from histomet.slide.tiling import TileBatch
from histomet.slide.tiling import TileGrid
from histomet.slide.tiling import choose_read_level
from histomet.slide.tiling import iter_tile_batches
from histomet.slide.tiling import plan_slide_tiles
from histomet.slide.tiling import plan_tiles
from histomet.slide.tissue import TissueMask
from histomet.slide.tissue import detect_tissue

__all__ = [
    "MAX_PLAUSIBLE_MPP",
    "MIN_PLAUSIBLE_MPP",
    "MppSource",
    "ReaderChoice",
    "Slide",
    "SlideInfo",
    "TileBatch",
    "TileGrid",
    "TissueMask",
    "choose_read_level",
    "composite_on_white",
    "detect_tissue",
    "iter_tile_batches",
    "mpp_from_resolution",
    "open_slide",
    "plan_slide_tiles",
    "plan_tiles",
    "slide_id_for_path",
]
