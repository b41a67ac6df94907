"""Mask clean-up shared by the backends: largest 3D component, hole filling per slice.

SAM2's own hole filling needs its CUDA `_C` extension, absent on CPU installs, so we do it here.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage


def largest_component_3d(mask: np.ndarray, keep_index: tuple[int, ...] | None = None) -> np.ndarray:
    """Keep the largest 26-connected component; with `keep_index` (z,y,x), the one containing it if any."""
    mask = np.asarray(mask, dtype=bool)
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if n <= 1:
        return mask
    if keep_index is not None and labels[keep_index] > 0:
        return labels == labels[keep_index]
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def fill_holes_per_slice(mask: np.ndarray, max_hole_area_px: int | None = None) -> np.ndarray:
    """Fill enclosed holes slice by slice; with `max_hole_area_px`, only holes up to that size."""
    out = np.asarray(mask, dtype=bool).copy()
    for z in range(out.shape[0]):
        if not out[z].any():
            continue
        filled = ndimage.binary_fill_holes(out[z])
        if max_hole_area_px is None:
            out[z] = filled
            continue
        holes, n = ndimage.label(filled & ~out[z])
        if n:
            sizes = np.bincount(holes.ravel())
            small = np.flatnonzero(sizes <= max_hole_area_px)
            out[z] |= np.isin(holes, small[small > 0])
    return out
