"""Prompts: what the planner drew, each on one slice. Voxel indices in (z, y, x) array order.

One structure may carry several prompts: on several slices (first, middle and last slice of the
target), and on one slice a box with clicks (corrective clicks after a first result). A slice may
hold at most one box and at most one outline, not both.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from config.errors import UserError

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


class PromptError(UserError):
    """A prompt that cannot be used: outside the image, empty, on a slice that does not exist..."""


def check_prompt(image_shape_zyx: tuple[int, ...], spacing_zyx: tuple[float, ...], prompt: Prompt,
                 *, negative_only_ok: bool = False) -> None:
    """Refuse, before any model work, a prompt the image cannot take; the message names what is wrong.

    Box indices are inclusive, so x0 == x1 is a one-pixel-wide box; only an inverted box has no area.
    `negative_only_ok`: clicks that are all negative are allowed (another prompt says what to segment).
    """
    if len(image_shape_zyx) != 3 or min(image_shape_zyx) < 1:
        raise ValueError(f"image must be 3D (z, y, x) with at least one slice, got shape {tuple(image_shape_zyx)}")
    if len(spacing_zyx) != 3 or any(not float(s) > 0 for s in spacing_zyx):
        raise ValueError(f"spacing_zyx must be 3 positive numbers in mm, got {spacing_zyx}")
    nz, ny, nx = image_shape_zyx
    if not isinstance(prompt, (BoxPrompt, PointPrompt, MaskPrompt)):
        raise PromptError(f"unknown prompt type {type(prompt).__name__}")
    z = prompt.slice_index
    if not 0 <= z < nz:
        raise PromptError(f"prompt on slice {z}, but the series has slices 0..{nz - 1}")
    if isinstance(prompt, BoxPrompt):
        corners = (prompt.x0, prompt.y0, prompt.x1, prompt.y1)
        if not (0 <= prompt.x0 < nx and 0 <= prompt.x1 < nx and 0 <= prompt.y0 < ny and 0 <= prompt.y1 < ny):
            raise PromptError(f"box (x0, y0, x1, y1) = {corners} on slice {z} lies outside the {nx} x {ny} "
                              f"image (columns 0..{nx - 1}, rows 0..{ny - 1})")
        if prompt.x1 < prompt.x0 or prompt.y1 < prompt.y0:
            raise PromptError(f"box (x0, y0, x1, y1) = {corners} on slice {z} is inverted (no area): "
                              "x1 must be >= x0 and y1 >= y0 (inclusive pixel indices)")
    elif isinstance(prompt, PointPrompt):
        if not prompt.points:
            raise PromptError(f"point prompt on slice {z} has no points")
        for x, y, _ in prompt.points:
            if not (0 <= x < nx and 0 <= y < ny):
                raise PromptError(f"point (x={x}, y={y}) on slice {z} lies outside the {nx} x {ny} image")
        if not negative_only_ok and not any(positive for _, _, positive in prompt.points):
            raise PromptError(f"point prompt on slice {z} has no positive point: nothing to segment")
    else:
        mask = np.asarray(prompt.mask)
        if mask.shape != (ny, nx):
            raise PromptError(f"mask prompt on slice {z} has shape {mask.shape}, the image slices are {(ny, nx)}")
        if not mask.astype(bool).any():
            raise PromptError(f"mask prompt on slice {z} is empty")


def is_positive(prompt: Prompt) -> bool:
    """Does this prompt say where the structure is (a box, an outline or a positive click)?"""
    return not isinstance(prompt, PointPrompt) or any(positive for _, _, positive in prompt.points)


def check_prompts(image_shape_zyx: tuple[int, ...], spacing_zyx: tuple[float, ...],
                  prompts: Prompt | Sequence[Prompt]) -> tuple[Prompt, ...]:
    """All prompts of one structure, checked and ordered by slice; one prompt is a tuple of one.

    Each prompt must fit the image (`check_prompt`); at least one must be positive; a slice holds at
    most one box and one outline, never both; a slice's clicks are merged into one PointPrompt.
    """
    items = (prompts,) if isinstance(prompts, (BoxPrompt, PointPrompt, MaskPrompt)) else tuple(prompts)
    if not items:
        raise PromptError("no prompt given")
    for prompt in items:
        check_prompt(image_shape_zyx, spacing_zyx, prompt, negative_only_ok=len(items) > 1)
    if not any(is_positive(p) for p in items):
        raise PromptError("every prompt is a negative click: nothing says where the structure is")
    out: list[Prompt] = []
    for z in sorted({p.slice_index for p in items}):
        here = [p for p in items if p.slice_index == z]
        boxes = [p for p in here if isinstance(p, BoxPrompt)]
        masks = [p for p in here if isinstance(p, MaskPrompt)]
        if len(boxes) > 1 or len(masks) > 1 or (boxes and masks):
            raise PromptError(f"slice {z} has {len(boxes)} box(es) and {len(masks)} outline(s): give at most one "
                              "box or one outline per slice (clicks may be added to either)")
        clicks = tuple(pt for p in here if isinstance(p, PointPrompt) for pt in p.points)
        out.extend(boxes + masks)
        if clicks:
            out.append(PointPrompt(z, clicks))
    return tuple(out)


def prompt_slices(prompts: Sequence[Prompt]) -> list[int]:
    """The prompted slices, in order."""
    return sorted({p.slice_index for p in prompts})


def single_prompt(prompts: Sequence[Prompt], backend: str) -> Prompt:
    """The one prompt of a backend that does not (yet) take several; a clear error otherwise."""
    if len(prompts) != 1:
        raise PromptError(f"the {backend} backend takes one prompt per structure; got {len(prompts)} on slices "
                          f"{prompt_slices(prompts)}")
    return prompts[0]
