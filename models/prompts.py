"""Prompts: what the planner drew on one slice. Voxel indices in (z, y, x) array order."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BoxPrompt:
    """A rectangle on slice `slice_index`: columns x0..x1 and rows y0..y1, inclusive voxel indices."""

    slice_index: int
    x0: int
    y0: int
    x1: int
    y1: int


@dataclass(frozen=True)
class PointPrompt:
    """Clicks on slice `slice_index`: (x, y, positive) with x the column and y the row."""

    slice_index: int
    points: tuple[tuple[int, int, bool], ...]


@dataclass(frozen=True)
class MaskPrompt:
    """A contour already drawn on slice `slice_index`, as a boolean (y, x) mask."""

    slice_index: int
    mask: np.ndarray


Prompt = BoxPrompt | PointPrompt | MaskPrompt


class PromptError(ValueError):
    """A prompt that cannot be used: outside the image, empty, on a slice that does not exist..."""
