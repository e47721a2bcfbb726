"""Microns per pixel (MPP): parsing TIFF resolution tags and choosing the slide's MPP.

Readers report the physical pixel size in different ways: OpenSlide as
``openslide.mpp-x``, Aperio as an ``MPP`` field in the image description, plain TIFF
files as a rational ``XResolution`` in pixels per ``ResolutionUnit``. This module
turns each of these into microns per pixel, rejects values that cannot be a
brightfield scan, and applies the order of precedence in ``choose_mpp``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

from histomet.errors import MissingMppError

_LOGGER = logging.getLogger(__name__)

# Range of MPP accepted as a real scan. Light microscopy resolves about 0.2 µm, so
# a finer sampling than 0.05 µm/px is not a scan, and 20 µm/px is a 0.5x overview.
MIN_PLAUSIBLE_MPP = 0.05
MAX_PLAUSIBLE_MPP = 20.0

# Microns per pixel of a 1x objective, so mpp = 10 / objective power.
# This is the usual scanner convention (20x -> 0.5 µm/px, 40x -> 0.25 µm/px), but
# real scanners differ from it: a Hamamatsu NDPI sample at 40x reports 0.228 µm/px.
_MPP_AT_1X = 10.0

# Relative difference between x and y MPP above which the pixels count as non-square.
_MAX_ANISOTROPY = 0.01

MppSource = Literal["metadata", "objective_power", "user"]

# Microns per resolution unit, keyed by every spelling seen in TIFF writers and
# reader metadata (lower case). TIFF codes 2 and 3 are standard. 4 and 5 are
# tifffile's non-standard MILLIMETER and MICROMETER codes.
_MICRONS_PER_UNIT: dict[str, float] = {
    "cm": 1e4,
    "centimeter": 1e4,
    "centimeters": 1e4,
    "centimetre": 1e4,
    "centimetres": 1e4,
    "3": 1e4,
    "in": 25_400.0,
    "inch": 25_400.0,
    "inches": 25_400.0,
    "2": 25_400.0,
    "mm": 1e3,
    "millimeter": 1e3,
    "millimeters": 1e3,
    "millimetre": 1e3,
    "millimetres": 1e3,
    "4": 1e3,
    "um": 1.0,
    "\u00b5m": 1.0,  # MICRO SIGN
    "\u03bcm": 1.0,  # GREEK SMALL LETTER MU
    "micron": 1.0,
    "microns": 1.0,
    "micrometer": 1.0,
    "micrometers": 1.0,
    "micrometre": 1.0,
    "micrometres": 1.0,
    "5": 1.0,
}


@dataclass(frozen=True)
class MppCandidate:
    """An MPP read from one metadata field, before the plausibility check."""

    mpp_x: float
    mpp_y: float
    origin: str  # where the value came from, for log messages

    @property
    def mpp(self) -> float:
        """Mean of the x and y MPP."""
        return (self.mpp_x + self.mpp_y) / 2.0


@dataclass(frozen=True)
class MppChoice:
    """The slide's MPP and where it came from."""

    mpp: float
    source: MppSource


def microns_per_unit(unit: str | int | None) -> float | None:
    """Return microns per resolution unit, or None for "none", unknown or missing.

    Accepts a TIFF ResolutionUnit code (an int or an enum such as tifffile's
    RESUNIT) or a unit name in any case and spelling (cm, centimeter, inch, mm, um,
    µm, micron, micrometer and their plurals).
    """
    if unit is None:
        return None

    if isinstance(unit, int):
        key = str(int(unit))
    else:
        key = str(unit).strip().lower()
    return _MICRONS_PER_UNIT.get(key)


def pixels_per_unit(resolution: float | tuple[int, int] | None) -> float | None:
    """Return a TIFF resolution as a float, or None when it is missing or invalid.

    ``resolution`` is a float or the tag's rational ``(numerator, denominator)``.
    A zero denominator, a value of zero or less, and NaN all give None.
    """
    if resolution is None:
        return None

    if isinstance(resolution, tuple):
        numerator, denominator = resolution
        if denominator == 0:
            return None
        value = float(numerator) / float(denominator)
    else:
        value = float(resolution)

    if not math.isfinite(value) or value <= 0.0:
        return None
    return value


def mpp_from_resolution(
    resolution: float | tuple[int, int] | None, unit: str | int | None
) -> float | None:
    """Convert a TIFF resolution (pixels per unit) to microns per pixel.

    Returns None when the unit is "none" or unknown or the resolution is invalid.
    The result is not checked for plausibility here.
    """
    microns = microns_per_unit(unit)
    per_unit = pixels_per_unit(resolution)
    if microns is None or per_unit is None:
        return None
    return microns / per_unit


def parse_positive_float(text: str | float | None) -> float | None:
    """Parse a metadata value as a positive finite float, or return None."""
    if text is None:
        return None

    try:
        value = float(text)
    except (TypeError, ValueError):
        return None

    if not math.isfinite(value) or value <= 0.0:
        return None
    return value


def is_plausible_mpp(mpp: float) -> bool:
    """Return True when ``mpp`` lies within the range of real brightfield scans."""
    return MIN_PLAUSIBLE_MPP <= mpp <= MAX_PLAUSIBLE_MPP


def choose_mpp(
    candidates: list[MppCandidate],
    objective_power: float | None,
    mpp_override: float | None,
    *,
    slide_id: str,
    display_name: str,
) -> MppChoice:
    """Choose the slide's MPP from metadata, objective power or the user's value.

    Precedence: ``mpp_override`` when given, then the first plausible metadata
    candidate, then 10 / objective power with a warning. Implausible metadata values
    (outside 0.05 to 20 µm/px) are skipped, with a warning when another source
    gives the MPP. With none of these
    it raises MissingMppError, and it never assumes a magnification.
    """
    if mpp_override is not None:
        return MppChoice(mpp=validate_mpp_override(mpp_override), source="user")

    rejected: list[MppCandidate] = []
    for candidate in candidates:
        if not is_plausible_mpp(candidate.mpp):
            if not any(math.isclose(candidate.mpp, r.mpp) for r in rejected):
                rejected.append(candidate)
            continue

        _warn_rejected(rejected, slide_id)
        anisotropy = abs(candidate.mpp_x - candidate.mpp_y) / candidate.mpp
        if anisotropy > _MAX_ANISOTROPY:
            _LOGGER.warning(
                "slide %s: pixels are not square (MPP x %.6g, y %.6g from %s), "
                "using their mean %.6g µm/px",
                slide_id,
                candidate.mpp_x,
                candidate.mpp_y,
                candidate.origin,
                candidate.mpp,
            )
        return MppChoice(mpp=candidate.mpp, source="metadata")

    if objective_power is not None:
        estimate = _MPP_AT_1X / objective_power
        if is_plausible_mpp(estimate):
            _warn_rejected(rejected, slide_id)
            _LOGGER.warning(
                "slide %s: no MPP in the metadata, estimating %.4g µm/px from "
                "objective power %gx. Pass an MPP override if the scanner differs",
                slide_id,
                estimate,
                objective_power,
            )
            return MppChoice(mpp=estimate, source="objective_power")

    if rejected:
        reason = (
            f"its metadata gives {rejected[0].mpp:.6g} µm/px, outside the plausible "
            f"range {MIN_PLAUSIBLE_MPP:g} to {MAX_PLAUSIBLE_MPP:g} µm/px"
        )
    else:
        reason = "its metadata has neither MPP nor objective power"
    raise MissingMppError(
        f"microns per pixel unknown for {display_name}: {reason}",
        "Pass --mpp MICRONS (mpp_override in Python), for example --mpp 0.25 "
        "for a 40x scan or --mpp 0.5 for a 20x scan",
    )


def _warn_rejected(rejected: list[MppCandidate], slide_id: str) -> None:
    """Log the implausible values skipped on the way to an MPP that was found.

    When no MPP is found, the error names the rejected value instead.
    """
    for candidate in rejected:
        _LOGGER.warning(
            "slide %s: ignoring MPP %.6g µm/px from %s because it is outside "
            "the plausible range %g to %g µm/px",
            slide_id,
            candidate.mpp,
            candidate.origin,
            MIN_PLAUSIBLE_MPP,
            MAX_PLAUSIBLE_MPP,
        )


def validate_mpp_override(mpp_override: float) -> float:
    """Return the user's MPP as a float, raising ValueError unless it is plausible."""
    value = parse_positive_float(mpp_override)
    if value is None or not is_plausible_mpp(value):
        raise ValueError(
            f"invalid MPP override {mpp_override!r}: expected microns per pixel "
            f"between {MIN_PLAUSIBLE_MPP:g} and {MAX_PLAUSIBLE_MPP:g} "
            "(0.25 for a 40x scan), not a magnification"
        )
    return value
