"""Prompts derived from an existing contour: the middle slice of a fully contoured ROI.

Used by `rtprop recontour`, the demo, the nightly batch and the quality benchmark, so all of them
prompt the same way.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from models.prompts import BoxPrompt, MaskPrompt, PointPrompt, Prompt, PromptError


def middle_slice(mask: np.ndarray) -> int:
    """The middle of the ROI's z extent; if that slice is empty, the contoured slice nearest to it."""
    slices = np.flatnonzero(np.asarray(mask, dtype=bool).any(axis=(1, 2)))
    if slices.size == 0:
        raise PromptError("the ROI is empty: no slice to take a prompt from")
    middle = (int(slices[0]) + int(slices[-1])) // 2
    return int(slices[np.argmin(np.abs(slices - middle))])


def box_from_slice(mask2d: np.ndarray, z: int) -> BoxPrompt:
    """The tight bounding rectangle of a 2D mask (inclusive voxel indices)."""
    rows = np.flatnonzero(mask2d.any(axis=1))
    cols = np.flatnonzero(mask2d.any(axis=0))
    if rows.size == 0:
        raise PromptError(f"slice {z} of the ROI is empty")
    return BoxPrompt(z, int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1]))


def point_from_slice(mask2d: np.ndarray, z: int) -> PointPrompt:
    """One positive click at the interior point farthest from the contour (always inside the ROI)."""
    if not mask2d.any():
        raise PromptError(f"slice {z} of the ROI is empty")
    depth = ndimage.distance_transform_edt(np.pad(mask2d, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return PointPrompt(z, ((int(x), int(y), True),))


def prompt_from_roi(mask: np.ndarray, kind: str = "box") -> Prompt:
    """A `box`, `point` or `mask` prompt from the ROI's middle slice."""
    z = middle_slice(mask)
    key = np.asarray(mask[z], dtype=bool)
    if kind == "box":
        return box_from_slice(key, z)
    if kind == "point":
        return point_from_slice(key, z)
    if kind == "mask":
        return MaskPrompt(z, key.copy())
    raise PromptError(f"unknown prompt kind {kind!r}: use box, point or mask")


# --------------------------------------------------------------------------- prompts typed on the command line
def parse_box(text: str) -> BoxPrompt:
    """`Z,X0,Y0,X1,Y1` (voxel indices; X along columns, Y along rows) -> a box on slice Z."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 5:
        raise PromptError(f"box {text!r}: expected Z,X0,Y0,X1,Y1")
    try:
        z, x0, y0, x1, y1 = (int(p) for p in parts)
    except ValueError as exc:
        raise PromptError(f"box {text!r}: indices must be integers") from exc
    return BoxPrompt(z, x0, y0, x1, y1)


def parse_point(text: str) -> tuple[int, int, int, bool]:
    """`Z,X,Y[,+|-]` -> (z, x, y, positive); a click without a sign is positive."""
    parts = [p.strip() for p in text.split(",")]
    sign = True
    if len(parts) == 4:
        if parts[3] not in ("+", "-"):
            raise PromptError(f"point {text!r}: the fourth field must be + or -")
        sign = parts[3] == "+"
        parts = parts[:3]
    if len(parts) != 3:
        raise PromptError(f"point {text!r}: expected Z,X,Y or Z,X,Y,+|-")
    try:
        z, x, y = (int(p) for p in parts)
    except ValueError as exc:
        raise PromptError(f"point {text!r}: indices must be integers") from exc
    return z, x, y, sign


def prompts_from_args(boxes: tuple[str, ...], points: tuple[str, ...], mask: np.ndarray | None,
                      slice_index: int | None, shape_zyx: tuple[int, ...]) -> list[Prompt]:
    """The prompts `--box`, `--point` (each repeatable, any slices) and `--mask [--slice]` describe.

    A 3D mask without `--slice` gives one outline per non-empty slice; a 2D mask needs `--slice`.
    """
    prompts: list[Prompt] = [parse_box(b) for b in boxes]
    clicks: dict[int, list[tuple[int, int, bool]]] = {}
    for text in points:
        z, x, y, positive = parse_point(text)
        clicks.setdefault(z, []).append((x, y, positive))
    prompts += [PointPrompt(z, tuple(c)) for z, c in sorted(clicks.items())]
    if mask is not None:
        mask = np.asarray(mask).astype(bool)
        if mask.ndim == 3 and mask.shape != tuple(shape_zyx):
            raise PromptError(f"the mask has shape {mask.shape}, the volume {tuple(shape_zyx)}")
        if slice_index is not None:
            plane = mask[slice_index] if mask.ndim == 3 and 0 <= slice_index < mask.shape[0] else mask
            if mask.ndim == 3 and not 0 <= slice_index < mask.shape[0]:
                raise PromptError(f"--slice {slice_index} is outside the mask's slices 0..{mask.shape[0] - 1}")
            prompts.append(MaskPrompt(slice_index, plane.copy()))
        elif mask.ndim == 3:
            drawn = np.flatnonzero(mask.any(axis=(1, 2)))
            if drawn.size == 0:
                raise PromptError("the mask is empty on every slice: nothing to propagate")
            prompts += [MaskPrompt(int(z), mask[z].copy()) for z in drawn]
        else:
            raise PromptError("a 2D mask needs --slice Z (the slice it was drawn on)")
    if not prompts:
        raise PromptError("no prompt given: use --box, --point (repeatable) or --mask")
    return prompts
