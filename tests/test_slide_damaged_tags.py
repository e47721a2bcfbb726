"""Slides whose TIFF tags the fuzz job damaged fail with a clear error, not a TypeError.

The mutations are the ones ``benchmarks/fuzz.py`` recorded as unexpected
exceptions: a tag value or count overwritten so that tifffile cannot convert it.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from histomet.errors import SlideOpenError
from histomet.slide import open_slide

from .conftest import REPO_ROOT


def _fuzz_module():
    path = REPO_ROOT / "benchmarks" / "fuzz.py"
    spec = importlib.util.spec_from_file_location("histomet_fuzz", path)
    module = importlib.util.module_from_spec(spec)
    # Dataclasses look their module up in sys.modules while the module runs.
    sys.modules["histomet_fuzz"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "source, mutations, kind",
    [
        ("pathml_small_HE_levels.tiff", [("structure", 33, 0, 0, 1)], "TypeError"),
        (
            "pathml_small_HE_levels.tiff",
            [
                ("structure", 508, -1, 2147483647, 4),
                ("truncate", 0.030409518912074336),
                ("truncate", 0.030409518912074336),
            ],
            "struct.error",
        ),
        (
            "pathml_small_HE_levels.tiff",
            [("structure", 589, 8, 7, 4), ("zero", 0.42401255441674046, 920)],
            "TypeError",
        ),
    ],
)
def test_damaged_tags_are_a_clear_error(
    shared_slides, tmp_path: Path, source, mutations, kind
):
    pytest.importorskip("hypothesis", reason="benchmarks/fuzz.py imports hypothesis")
    fuzz = _fuzz_module()
    damaged = tmp_path / f"damaged{Path(source).suffix}"
    damaged.write_bytes(fuzz.mutate(fuzz.load_source(source), mutations))
    with pytest.raises(SlideOpenError) as raised:
        with open_slide(damaged, mpp_override=0.5):
            pass
    message = str(raised.value)
    assert (
        f"TIFF tags are damaged: an image's tags could not be read ({kind})" in message
    )
    assert "Copy the slide again" in message
