"""The one rule for a complete series: slices evenly spaced along their normal, none missing.

Both the node's series completion (dicom_node/completion.py) and the series reader
(converters/series.py) decide with `check_contiguity`, so a series is never accepted as complete
and then refused when its job reads it.

A series is contiguous when its positions along the slice normal are distinct and evenly spaced
within max(POSITION_TOL_MM, SPACING_REL_TOL x spacing) (scanner rounding). Missing slices show as
  - a step of about k x spacing (k >= 2): k - 1 slices missing between its two positions;
  - every step about m x SliceThickness (m >= 2) while the InstanceNumbers, in position order, also
    jump by m: every m-th slice arrived (a series sent with "every other slice" is not a gapped
    protocol; a gapped MR protocol numbers its slices 1, 2, 3 ...).
Deliberately variable spacing (2 mm through the target, 5 mm elsewhere) is not supported: the
volume model has one slice spacing. It is refused with the positions named.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

POSITION_TOL_MM = 0.01  # absolute floor for position comparisons
SPACING_REL_TOL = 0.01  # slice gaps may differ from the series' spacing by 1 % (scanner rounding)


@dataclass
class Contiguity:
    """The verdict on one series; `missing_mm` are positions along the normal, for the audit."""

    ok: bool
    reason: str = ""
    slices: int = 0
    spacing_mm: float | None = None
    missing_mm: list[float] = field(default_factory=list)
    final: bool = False  # more slices arriving cannot fix it (tilt, mixed grids, ...)


def _mm(values: Sequence[float]) -> str:
    shown = ", ".join(f"{v:.2f}" for v in values[:10])
    return f"[{shown}{f', ... ({len(values)} in all)' if len(values) > 10 else ''}] mm"


def check_contiguity(along_mm: Sequence[float], *, thickness_mm: float | None = None,
                     instance_numbers: Sequence[int | None] | None = None) -> Contiguity:
    """Are slices at these positions along the normal (any order) one complete, evenly spaced stack?

    `thickness_mm`: SliceThickness of the series; `instance_numbers`: InstanceNumber per position
    (same order as `along_mm`, None where absent).
    """
    along = np.asarray(along_mm, dtype=float)
    if along.size < 2:
        return Contiguity(True, "single slice position", slices=int(along.size))
    order = np.argsort(along, kind="stable")
    along = along[order]
    gaps = np.diff(along)
    dup = np.flatnonzero(gaps < POSITION_TOL_MM)
    if dup.size:
        return Contiguity(False, f"duplicate slice position(s): two images at {_mm(along[dup].tolist())} along the "
                                 "normal", slices=int(along.size))
    spacing = float(gaps.min())
    tol = max(POSITION_TOL_MM, SPACING_REL_TOL * spacing)
    whole = np.round(gaps / spacing)
    fits = np.abs(gaps - whole * spacing) <= tol * np.maximum(whole, 1)
    if not fits.all():
        usual = float(np.median(gaps))
        bad = np.flatnonzero(np.abs(gaps - usual) > max(POSITION_TOL_MM, SPACING_REL_TOL * usual))
        steps = ", ".join(f"{gaps[i]:.3f} mm after {along[i]:.2f} mm" for i in bad[:10])
        return Contiguity(False, f"non-uniform slice spacing: steps of {steps} along the normal, where the others are "
                                 f"{usual:.3f} mm (variable spacing is not supported)", slices=int(along.size),
                          spacing_mm=usual)
    missing = [round(float(along[i] + m * spacing), 2) for i in np.flatnonzero(whole > 1)
               for m in range(1, int(whole[i]))]
    if missing:
        return Contiguity(False, f"{len(missing)} slice(s) missing at {_mm(missing)} along the normal "
                                 f"(spacing {spacing:.3f} mm, {along.size} present)", slices=int(along.size),
                          spacing_mm=spacing, missing_mm=missing)
    skipped = _every_mth_slice(spacing, tol, thickness_mm, instance_numbers, order)
    if skipped:
        missing = [round(float(a + spacing * j / skipped), 2) for a in along[:-1] for j in range(1, skipped)]
        return Contiguity(False, f"only one slice in {skipped} is here: spacing {spacing:.3f} mm is {skipped} x "
                                 f"SliceThickness {thickness_mm:g} mm and the InstanceNumbers jump by {skipped}; "
                                 f"missing at {_mm(missing)}", slices=int(along.size), spacing_mm=spacing,
                          missing_mm=missing)
    return Contiguity(True, f"{along.size} positions, spacing {spacing:.3f} mm", slices=int(along.size),
                      spacing_mm=spacing)


def _every_mth_slice(spacing: float, tol: float, thickness_mm: float | None,
                     instance_numbers: Sequence[int | None] | None, order: np.ndarray) -> int:
    """m >= 2 when spacing = m x thickness AND the InstanceNumbers step by m; else 0."""
    if not thickness_mm or thickness_mm <= 0 or instance_numbers is None:
        return 0
    m = int(round(spacing / thickness_mm))
    if m < 2 or abs(spacing - m * thickness_mm) > tol * m:
        return 0
    numbers = [instance_numbers[i] for i in order]
    if any(n is None for n in numbers):
        return 0
    steps = np.abs(np.diff(np.asarray(numbers, dtype=float)))
    return m if steps.size and np.all(steps == m) else 0
