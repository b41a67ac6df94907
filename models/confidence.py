"""How good a propagation result is likely to be: one number in [0, 1] per structure, whichever backend ran.

Nothing here sees the reference. A result is checked against what it can be checked against:
- its own prompts, on their slices (`box_fit`, `click_fit`, the outline's Dice): a tight box touches its
  structure on all four sides, the structure covers the box's centre and has the centre's intensity,
  not the corners'; a click sits inside its structure, near its middle, and the structure is about as
  large as the click's rays measure (models/classic_points.py);
- how clearly the result stands out from the tissue around it on the prompted slice (ring contrast):
  an iso-intense neighbour is where a result leaks;
- its size in pixels: a cross-section a few pixels across is delineated to within a pixel at best;
- the backend's own per-slice confidence on the slices it propagated to;
- for the classic backend, how stable the prompted slice is when the prompt moves by a pixel or two
  (`details["key_stability"]`, models/classic.py): an answer that changes with the box's last pixel
  is not known.
models/guard.py turns the same measures into reasons (one definition of each); `structure_confidence`
combines them into one number (`SIGNAL_WEIGHTS`, calibrated by bench/quality.py against Dice).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from models.classic_points import click_scale_mm
from models.intensity_model import ring_contrast, slice_features
from models.prompts import BoxPrompt, MaskPrompt, PointPrompt, Prompt
from models.result import PropagationResult

# A planner's box is tight to within a pixel or two (more on a large box): the rows and columns within
# this tolerance of each side are not required to hold the structure.
BOX_TOLERANCE_PX = 2
BOX_TOLERANCE_FRACTION = 0.05
# The box's centre: the ellipse of this fraction of the inscribed ellipse's radii (at least a pixel).
CENTRE_FRACTION = 0.25


def box_tolerance(box: BoxPrompt) -> tuple[int, int]:
    """Rows and columns (dy, dx) by which a planner's tight box may miss its structure on each side."""
    h, w = box.y1 - box.y0 + 1, box.x1 - box.x0 + 1
    return tuple(int(min(max(BOX_TOLERANCE_PX, BOX_TOLERANCE_FRACTION * n), (n - 1) / 4)) for n in (h, w))


def _in_box(shape: tuple[int, int], box: BoxPrompt) -> np.ndarray:
    out = np.zeros(shape, dtype=bool)
    out[box.y0:box.y1 + 1, box.x0:box.x1 + 1] = True
    return out


def box_regions(shape: tuple[int, int], box: BoxPrompt) -> tuple[np.ndarray, np.ndarray]:
    """(centre, corners) of a box: the central ellipse (CENTRE_FRACTION of the inscribed one) and the box
    outside its inscribed ellipse. A tight box's corners are its structure's surroundings."""
    yy, xx = np.ogrid[:shape[0], :shape[1]]
    cy, cx = (box.y0 + box.y1) / 2.0, (box.x0 + box.x1) / 2.0
    ry, rx = (box.y1 - box.y0 + 1) / 2.0, (box.x1 - box.x0 + 1) / 2.0
    r2 = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
    centre = ((yy - cy) / max(CENTRE_FRACTION * ry, 0.75)) ** 2 + ((xx - cx) / max(CENTRE_FRACTION * rx, 0.75)) ** 2 <= 1
    return centre & _in_box(shape, box), (r2 > 1.0) & _in_box(shape, box)


@dataclass(frozen=True)
class BoxFit:
    """How a result on a box's slice fits that box (each in [0, 1])."""

    fill: float  # share of the box the result fills
    reach: float  # share of the box's rows and columns, less BOX_TOLERANCE at each side, it reaches
    centre: float  # share of the box's central region it covers
    corner_likeness: float  # 1: its median intensity is the corners' (inside their interquartile range, outside the
    # centre's), 0: the centre's, 0.5: neither or both
    corners_differ: bool  # whether the centre's and the corners' interquartile ranges are apart (else likeness is 0.5)


def box_fit(feature2d: np.ndarray, box: BoxPrompt, mask2d: np.ndarray) -> BoxFit:
    """Measure `mask2d` against `box` on that slice's feature image (models/intensity_model.py)."""
    ty, tx = box_tolerance(box)
    inner = mask2d[box.y0 + ty:box.y1 - ty + 1, box.x0 + tx:box.x1 - tx + 1]
    reach = 0.5 * (float(inner.any(axis=1).mean()) + float(inner.any(axis=0).mean())) if inner.size else 0.0
    inside = mask2d[box.y0:box.y1 + 1, box.x0:box.x1 + 1]
    centre, corners = box_regions(mask2d.shape, box)
    covered = float(mask2d[centre].mean()) if centre.any() else 0.0
    likeness, differ = 0.5, False
    if mask2d.any() and centre.any() and corners.any():
        # robust to noise and to a structure with its own intensity: the result's median counts as the
        # corners' (or the centre's) only inside that region's interquartile range, and only where the two
        # ranges are apart
        level = float(np.median(feature2d[mask2d]))
        (c_lo, c_hi), (k_lo, k_hi) = (np.percentile(feature2d[r], [25, 75]) for r in (centre, corners))
        differ = c_hi < k_lo or k_hi < c_lo
        if differ:
            in_centre, in_corners = c_lo <= level <= c_hi, k_lo <= level <= k_hi
            likeness = 1.0 if in_corners and not in_centre else 0.0 if in_centre and not in_corners else 0.5
    return BoxFit(float(inside.mean()), reach, covered, likeness, differ)


@dataclass(frozen=True)
class ClickFit:
    """How a result on a clicked slice fits its positive clicks (the worst click)."""

    inside: bool  # every positive click lies in the result
    depth_ratio: float  # the result's depth at the click over the structure's inscribed radius the rays measure
    centrality: float  # the result's depth at the click over the depth of its deepest point (planners click mid-structure)


def click_fit(feature2d: np.ndarray, clicks: PointPrompt, mask2d: np.ndarray,
              spacing_yx: tuple[float, float]) -> ClickFit | None:
    """Measure `mask2d` against the positive clicks of `clicks` (None if there is none)."""
    positives = [(x, y) for x, y, p in clicks.points if p]
    if not positives:
        return None
    depth = ndimage.distance_transform_edt(np.pad(mask2d, 1), sampling=spacing_yx)[1:-1, 1:-1]
    labels, _ = ndimage.label(mask2d)
    inside, ratio, central = True, np.inf, np.inf
    for x, y in positives:
        if not mask2d[y, x]:
            return ClickFit(False, 0.0, 0.0)
        piece = labels == labels[y, x]
        deepest = float(depth[piece].max())
        ratio = min(ratio, deepest / click_scale_mm(feature2d, y, x, spacing_yx))
        central = min(central, float(depth[y, x]) / max(deepest, 1e-6))
    return ClickFit(inside, float(ratio), float(central))


def outline_dice(prompt: MaskPrompt, mask2d: np.ndarray) -> float:
    drawn = np.asarray(prompt.mask, dtype=bool)
    return 2.0 * float((drawn & mask2d).sum()) / max(float(drawn.sum() + mask2d.sum()), 1.0)


def _ramp(value: float, low: float, high: float) -> float:
    """0 at or below `low`, 1 at or above `high`, linear between."""
    return float(np.clip((value - low) / (high - low), 0.0, 1.0))


def edge_strength(feature2d: np.ndarray, mask2d: np.ndarray) -> float:
    """Median intensity step across the result's outline, in noise SDs (the step between the mean inside and
    outside over 2 px either side of each outline pixel): an outline the image draws is far above 1, one the
    method had to guess (a leak stopped in uniform tissue, a tumour as dense as muscle) near it."""
    if not mask2d.any() or mask2d.all():
        return 0.0
    inner = mask2d & ~ndimage.binary_erosion(mask2d)
    residual = feature2d - ndimage.gaussian_filter(feature2d, 2.0)
    noise = max(1.4826 * float(np.median(np.abs(residual - np.median(residual)))), 1e-3)
    inside = ndimage.uniform_filter(np.where(mask2d, feature2d, 0.0), 5) / np.maximum(
        ndimage.uniform_filter(mask2d.astype(float), 5), 1e-6)
    outside = ndimage.uniform_filter(np.where(~mask2d, feature2d, 0.0), 5) / np.maximum(
        ndimage.uniform_filter((~mask2d).astype(float), 5), 1e-6)
    return float(np.median(np.abs(inside - outside)[inner]) / noise)


def signals(image: np.ndarray, spacing_zyx: tuple[float, float, float], prompts: Sequence[Prompt],
            result: PropagationResult, modality: str = "",
            features: Callable[[int], np.ndarray] | None = None) -> tuple[dict[str, float], dict[str, float]]:
    """The measures the structure confidence is made of, each in [0, 1] (1: nothing doubtful), and the raw
    values they come from."""
    mask = np.asarray(result.mask, dtype=bool)
    spacing_yx = (float(spacing_zyx[1]), float(spacing_zyx[2]))
    features = features or slice_features(image, modality)
    prompt_fit, contrast, size, edges = [], [], [], []
    for prompt in prompts:
        on_slice = mask[prompt.slice_index]
        if isinstance(prompt, BoxPrompt):
            fit = box_fit(features(prompt.slice_index), prompt, on_slice)
            corner = _ramp(1.0 - fit.corner_likeness, 0.3, 0.6) if fit.corners_differ else 1.0
            prompt_fit.append(min(_ramp(fit.reach, 0.5, 0.9), _ramp(fit.fill, 0.03, 0.15),
                                  max(_ramp(fit.centre, 0.0, 0.5), 0.5 * corner), corner))
        elif isinstance(prompt, MaskPrompt):
            prompt_fit.append(_ramp(outline_dice(prompt, on_slice), 0.6, 0.9))
        else:
            fit = click_fit(features(prompt.slice_index), prompt, on_slice, spacing_yx)
            if fit is not None:
                prompt_fit.append(0.0 if not fit.inside else min(_ramp(fit.depth_ratio, 0.2, 0.6),
                                                                 _ramp(fit.centrality, 0.2, 0.5)))
        if on_slice.any() and (isinstance(prompt, (BoxPrompt, MaskPrompt)) or any(p for *_, p in prompt.points)):
            contrast.append(ring_contrast(features(prompt.slice_index), on_slice, spacing_yx))
            size.append(2.0 * np.sqrt(float(on_slice.sum()) / np.pi))
            edges.append(edge_strength(features(prompt.slice_index), on_slice))
    filled = mask.any(axis=(1, 2))
    prompted = {p.slice_index for p in prompts}
    propagated = [float(result.confidence[z]) for z in np.flatnonzero(filled) if z not in prompted]
    stability = result.details.get("key_stability")
    raw = {"contrast": min(contrast) if contrast else 0.0, "size_px": min(size) if size else 0.0,
           "edges": min(edges) if edges else 0.0}
    ramped = {
        "prompt_fit": min(prompt_fit) if prompt_fit else 0.0,
        "contrast": _ramp(raw["contrast"], 0.5, 2.5),
        "size": _ramp(raw["size_px"], 3.0, 12.0),  # equivalent diameter in pixels
        "edges": _ramp(raw["edges"], 1.0, 4.0),
        "propagation": float(np.mean(propagated)) if propagated else 1.0,
        "stability": float(min(stability.values())) if stability else 1.0,
    }
    return ramped, raw


# What each signal says, for the guard's reason (models/guard.py).
SIGNAL_NAMES = {"prompt_fit": "fit to the prompt", "contrast": "contrast with the tissue around it",
                "size": "size in pixels", "edges": "edges along its outline",
                "propagation": "the backend's confidence on the propagated slices",
                "stability": "stability when the box moves a pixel"}
# Each signal's weight in the logit of the structure confidence, and the bias: a logistic regression of
# "Dice >= 0.5" on the signals (weights held >= 0), fitted on the classic backend's 777 results of
# `bench/quality.py --jitter 2` (boxes, 41 shared cases and 29 organs at 512 x 512) and `--prompt point
# --jitter-mm 2` (41 shared cases), rounded; AUROC 0.81 there, 0.78 leaving each structure out in turn
# (docs/propagators.md). SAM2 gets the same combination uncalibrated (no checkpoint here) and no stability.
SIGNAL_WEIGHTS = {"prompt_fit": 1.2, "contrast": 1.6, "size": 2.4, "edges": 0.4, "propagation": 0.5, "stability": 1.4}
BIAS = -4.9


def combine(values: dict[str, float]) -> float:
    """The structure confidence from its signals: a logistic of their weighted sum."""
    logit = BIAS + sum(SIGNAL_WEIGHTS[k] * values[k] for k in SIGNAL_WEIGHTS)
    return float(1.0 / (1.0 + np.exp(-logit)))


def structure_confidence(image: np.ndarray, spacing_zyx: tuple[float, float, float], prompts: Sequence[Prompt],
                         result: PropagationResult, modality: str = "") -> tuple[float, dict[str, float]]:
    """(confidence in [0, 1], its signals and their raw values) for `result`: 0 for an empty result."""
    if not np.asarray(result.mask).any():
        return 0.0, {}
    values, raw = signals(image, spacing_zyx, prompts, result, modality)
    return combine(values), {**values, **{f"raw_{k}": round(v, 4) for k, v in raw.items()}}
