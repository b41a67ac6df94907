"""Key-slice mask from clicks for the weight-free propagator: grow from the positive points.

A click says where the structure is, not how big it is, so two candidates are made and the one that
stands out more from the ring around it wins (as for boxes in models/classic.py):
- local: an intensity model of the click's 3 mm neighbourhood against a 15-40 mm ring, with a
  spatial prior fading over ~20 mm: right for structures a few cm across;
- grown: the region of intensities similar to the click's, grown at tolerances from 1.5 to 8 times
  the slice's noise (below ~1.5 the similar pixels do not join up across a structure: speckle, not
  a region). It grows slowly while the tolerance is below the contrast of the structure's edges and
  jumps in area when it spills over its weakest edge; the region just before the largest relative
  jump is taken. Right for large structures, whose 15-40 mm ring is still inside them.
Negative clicks are background: a grown region that reaches one has spilled (the region before it
is taken), they join the local model's background, and they are never part of the result.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from models.intensity_model import SMOOTH_PX, histogram, llr, ring_contrast
from models.prompts import PointPrompt, PromptError

AIR_HU = -900.0  # a positive click whose neighbourhood is below this on CT is on air
STEPS = tuple(float(v) for v in np.geomspace(1.5, 8.0, 10))  # similarity to the click, in noise units
MAX_RADIUS_MM = 100.0  # a clicked structure's key-slice section reaches at most this far from the click
LOCAL_SEED_MM = 3.0  # local candidate: the structure's intensities come from this close to the clicks
LOCAL_RING_MM = (15.0, 40.0)  # local candidate: its surroundings' intensities come from this ring
LOCAL_PRIOR_MM = 20.0  # local candidate: each mm from the clicks costs 1/20 of a log-likelihood unit


def _check_on_tissue(raw2d: np.ndarray, points: list[tuple[int, int]], slice_index: int, modality: str) -> None:
    """A positive click on air (CT) or on the empty background (MR) has no structure to grow."""
    ny, nx = raw2d.shape
    for y, x in points:
        patch = raw2d[max(0, y - 2):min(ny, y + 3), max(0, x - 2):min(nx, x + 3)]
        if modality.upper() == "CT" and float(np.median(patch)) < AIR_HU:
            raise PromptError(f"positive point (x={x}, y={y}) on slice {slice_index} is on air "
                              f"({float(raw2d[y, x]):.0f} HU, nothing structure-like around it)")
        if modality.upper() != "CT" and float(patch.max()) <= float(raw2d.min()):
            raise PromptError(f"positive point (x={x}, y={y}) on slice {slice_index} is on "
                              "empty background (the image's minimum intensity all around it)")


def _noise(feature2d: np.ndarray) -> float:
    """Robust noise level: MAD of the residual after a 2 px Gaussian, over the non-background pixels."""
    residual = feature2d - ndimage.gaussian_filter(feature2d, 2.0)
    tissue = feature2d > feature2d.min() + 0.05
    values = residual[tissue] if tissue.sum() > 100 else residual.ravel()
    return max(1.4826 * float(np.median(np.abs(values - np.median(values)))), 1e-3)


def _region(similar: np.ndarray, reach: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """The connected pieces of `similar & reach` that contain a positive click, holes filled."""
    labels, _ = ndimage.label(similar & reach)
    keep = np.unique(labels[seeds])
    return ndimage.binary_fill_holes(np.isin(labels, keep[keep > 0]))


def _local_region(feature2d: np.ndarray, seeds: np.ndarray, negatives: np.ndarray, to_pos: np.ndarray) -> np.ndarray:
    """Intensity model of the clicks' neighbourhood vs a ring 15-40 mm out, prior fading over 20 mm."""
    fg = histogram(feature2d[to_pos <= LOCAL_SEED_MM])
    surround = ((to_pos > LOCAL_RING_MM[0]) & (to_pos <= LOCAL_RING_MM[1])) | negatives
    score = ndimage.gaussian_filter(llr(feature2d, fg, histogram(feature2d[surround])), SMOOTH_PX)
    return _region((score - to_pos / LOCAL_PRIOR_MM > 0) | (to_pos <= 1.5), ~negatives, seeds)


def _grown_region(feature2d: np.ndarray, seeds: np.ndarray, negatives: np.ndarray, to_pos: np.ndarray,
                  spacing_yx: tuple[float, float]) -> np.ndarray:
    """Similar-intensity region at the tolerance just before its largest relative jump in area."""
    level = float(np.median(feature2d[to_pos <= max(spacing_yx)]))  # the click's neighbours, not its own noise
    noise = _noise(feature2d)
    reach = to_pos <= MAX_RADIUS_MM
    regions = [_region(np.abs(feature2d - level) <= t * noise, reach, seeds) | seeds for t in STEPS]
    # a region reaching a negative click has spilled: its "area" is infinite, so the jump is there
    areas = np.array([np.inf if (r & negatives).any() else r.sum() for r in regions], dtype=float)
    if np.isinf(areas[0]):
        return np.zeros_like(seeds)
    with np.errstate(invalid="ignore"):
        jumps = np.nan_to_num(areas[1:] / np.maximum(areas[:-1], 1.0), nan=0.0, posinf=np.inf)
    return regions[int(np.argmax(jumps))]


def key_mask_from_points(feature2d: np.ndarray, raw2d: np.ndarray, prompt: PointPrompt,
                         spacing_yx: tuple[float, float], modality: str) -> np.ndarray:
    """The structure under the positive clicks on the key slice (the rule is in the module docstring).

    feature2d: the slice's [0, 1] feature image, smoothed; raw2d: its raw intensities (HU on CT).
    Raises PromptError for a click on air/background or when negative clicks leave nothing.
    """
    pos = [(y, x) for x, y, p in prompt.points if p]
    neg = [(y, x) for x, y, p in prompt.points if not p]
    _check_on_tissue(raw2d, pos, prompt.slice_index, modality)
    seeds = np.zeros(feature2d.shape, dtype=bool)
    seeds[tuple(np.array(pos).T)] = True
    negatives = np.zeros(feature2d.shape, dtype=bool)
    if neg:
        negatives[tuple(np.array(neg).T)] = True
    seeds &= ~negatives
    if not seeds.any():
        raise PromptError(f"the points on slice {prompt.slice_index} give an empty region "
                          "(negative points cover the positive ones?)")
    to_pos = ndimage.distance_transform_edt(~seeds, sampling=spacing_yx)
    candidates = (_grown_region(feature2d, seeds, negatives, to_pos, spacing_yx),
                  _local_region(feature2d, seeds, negatives, to_pos))
    return max(candidates, key=lambda m: ring_contrast(feature2d, m, spacing_yx) if m.sum() >= 3 else -1.0)
