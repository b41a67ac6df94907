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
