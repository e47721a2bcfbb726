"""Read the cohort's labels CSV and match it to the features folder.

Columns: ``patient_id``, ``slide_id`` (the features file's stem),
``metastasis`` (0 or 1) and ``site`` (the metastatic site label, empty when
there is none). Extra columns are ignored.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from histomet.errors import InputError

__all__ = ["REQUIRED_COLUMNS", "LabelledSlide", "read_labels", "site_labels"]

REQUIRED_COLUMNS = ("patient_id", "slide_id", "metastasis", "site")


@dataclass(frozen=True)
class LabelledSlide:
    """One row of the labels CSV, matched to its features file."""

    patient_id: str
    slide_id: str
    metastasis: int
    site: str | None
    features_path: Path


def _row_error(path: Path, line: int, message: str, hint: str) -> InputError:
    return InputError(f"{path.name} line {line}: {message}", hint)


def _parse_row(
    row: dict[str, str], line: int, path: Path, features_dir: Path
) -> LabelledSlide:
    patient_id = (row["patient_id"] or "").strip()
    slide_id = (row["slide_id"] or "").strip()
    if not patient_id or not slide_id:
        raise _row_error(path, line, "empty patient_id or slide_id", "Fill in both ids")
    metastasis_text = (row["metastasis"] or "").strip()
    if metastasis_text not in ("0", "1"):
        raise _row_error(
            path,
            line,
            f"invalid metastasis value {metastasis_text!r}",
            "Use 0 or 1",
        )
    metastasis = int(metastasis_text)
    site = (row["site"] or "").strip() or None
    if site is not None and metastasis == 0:
        raise _row_error(
            path,
            line,
            f"site {site!r} on a non-metastatic case",
            "Leave site empty where metastasis is 0, or set metastasis to 1",
        )
    features_path = features_dir / f"{slide_id}.h5"
    if not features_path.is_file():
        raise _row_error(
            path,
            line,
            f"unknown slide {slide_id!r}: no {features_path.name} in the features "
            "folder",
            "Run histomet embed on the slide, or remove the row",
        )
    return LabelledSlide(patient_id, slide_id, metastasis, site, features_path)


def read_labels(path: Path, features_dir: Path) -> list[LabelledSlide]:
    """Read and check every row of the labels CSV.

    Raises :class:`InputError` naming the line for a missing column, an
    invalid metastasis value, a site on a non-metastatic case, a repeated
    slide, or a slide without a features file.
    """
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        missing = [name for name in REQUIRED_COLUMNS if name not in columns]
        if missing:
            raise InputError(
                f"{path.name} is missing the columns {missing}",
                f"Give a header row with {', '.join(REQUIRED_COLUMNS)}",
            )
        slides: list[LabelledSlide] = []
        seen: dict[str, int] = {}
        # Line 1 is the header, so data rows start at line 2.
        for line, row in enumerate(reader, start=2):
            slide = _parse_row(row, line, path, features_dir)
            if slide.slide_id in seen:
                raise _row_error(
                    path,
                    line,
                    f"slide {slide.slide_id!r} repeats line {seen[slide.slide_id]}",
                    "List every slide once",
                )
            seen[slide.slide_id] = line
            slides.append(slide)
    if not slides:
        raise InputError(f"{path.name} has no data rows", "Add one row per slide")
    return slides


def site_labels(slides: Sequence[LabelledSlide]) -> tuple[str, ...]:
    """Return the sorted distinct site labels of the metastatic slides."""
    return tuple(sorted({s.site for s in slides if s.site is not None}))
