"""Corrections a reviewer adds to a result: more prompts on any slice, and where the structure ends.

A correction is a prompt (`BoxPrompt`, `PointPrompt`, `MaskPrompt` on one slice) or an `Extent`.
`correct` gives the result of a structure's prompts plus its corrections; it is handed the previous
result so that a backend may re-run only what a correction changes. This first version propagates
prompts and corrections together and clips to the extent; the interface is what callers rely on.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from config.schema import PropagationConfig
from models import guard
from models.prompts import Prompt, PromptError, check_prompts
from models.propagate import propagate
from models.result import PropagationResult


@dataclass(frozen=True)
class Extent:
    """The structure runs from slice `first` to slice `last` (inclusive voxel indices) and no further."""

    first: int
    last: int


Correction = Prompt | Extent


def check_extent(n_slices: int, extent: Extent, prompts: Sequence[Prompt]) -> None:
    """Refuse an extent outside the series, inverted, or leaving out a slice the planner prompted."""
    if not 0 <= extent.first <= extent.last < n_slices:
        raise PromptError(f"extent {extent.first}..{extent.last} must satisfy 0 <= first <= last <= {n_slices - 1}")
    outside = sorted({p.slice_index for p in prompts if not extent.first <= p.slice_index <= extent.last})
    if outside:
        raise PromptError(f"extent {extent.first}..{extent.last} leaves out prompted slice(s) {outside}")


def correct(image: np.ndarray, spacing_zyx: tuple[float, float, float], prompts: Sequence[Prompt],
            corrections: Sequence[Correction], modality: str = "", settings: PropagationConfig | None = None,
            previous: PropagationResult | None = None) -> PropagationResult:
    """The result of `prompts` plus `corrections` (in the order they were made; the last extent wins).

    `previous` is the result before the newest correction (None: none yet); a backend may use it to
    re-run only the slices the correction reaches. Raises PromptError naming a correction that cannot
    be used.
    """
    image = np.asarray(image)
    extents = [c for c in corrections if isinstance(c, Extent)]
    added = [c for c in corrections if not isinstance(c, Extent)]
    result = propagate(image, spacing_zyx, [*prompts, *added], modality, settings)
    if extents:
        extent = extents[-1]
        check_extent(image.shape[0], extent, [*prompts, *added])
        outside = np.ones(image.shape[0], dtype=bool)
        outside[extent.first:extent.last + 1] = False
        result.mask[outside] = False
        result.confidence = np.where(outside, 0.0, result.confidence)
        checked = check_prompts(image.shape, spacing_zyx, [*prompts, *added])
        result.warnings = guard.assess(image, spacing_zyx, checked, result, modality)
    return result
