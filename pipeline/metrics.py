"""Agreement between a predicted and a reference mask: overlap, surface distances, dose.

All distances are in mm. `spacing_zyx` is given in the array's own axis order, (z, y, x) for a
volume as `Volume.array` holds it; for a 2D frame pass (y, x). (STARDUST hands the spacing over
reversed; we do not.)

Definitions follow TrackRAD2025's evaluation (LMUK-RADONC-PHYS-RES/trackrad2025, evaluation/):
- surface of a mask = mask XOR its binary erosion (face connectivity; a voxel on the array border
  counts as surface);
- directed surface distances = Euclidean distance transform (with spacing) of the other mask's
  surface, read at this mask's surface voxels;
- HD95 = max of the two directed 95th percentiles; MSD = mean of the two directed means
  (TrackRAD reports the pred->gt direction only; we make it symmetric);
- centre distance = Euclidean distance between the centres of mass, in mm;
- NSD (surface Dice, CVPR25 challenge) = share of both surfaces lying within `tolerance_mm` of the
  other surface, counted in surface voxels.
- relative D98 (cine only): see `relative_d98`.

Empty masks never raise. The documented values (also in `EMPTY_VALUES_DOC`):
- both empty: dice = nsd = 1, hd95 = msd = centre distance = 0, volume_ratio = 1 (they agree);
- exactly one empty: dice = nsd = 0, and each distance is the penalty `max_distance_mm`, the
  diagonal of the array's extent in mm (the worst error the image allows; TrackRAD likewise
  penalises with the image size), volume_ratio = 0 if the prediction is empty, None if the
  reference is empty (undefined).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import ndimage

EMPTY_VALUES_DOC = (
    "both empty: dice=nsd=1, distances=0, volume_ratio=1; one empty: dice=nsd=0, distances="
    "max_distance_mm (diagonal of the image in mm), volume_ratio=0 (pred empty) or None (gt empty)"
)


def _as_bool(mask: np.ndarray) -> np.ndarray:
    return np.asarray(mask).astype(bool, copy=False)


def _check(pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, ...]) -> tuple[float, ...]:
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {gt.shape}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing {spacing} has {len(spacing)} values for a {pred.ndim}D mask")
    if any(not s > 0 for s in spacing):
        raise ValueError(f"spacing {spacing} must be positive")
    return spacing


def max_distance_mm(shape: tuple[int, ...], spacing: tuple[float, ...]) -> float:
    """Diagonal of the array's extent in mm: the distance penalty when one mask is empty."""
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing))))


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice similarity coefficient 2|A∩B| / (|A|+|B|); 1.0 when both are empty."""
    pred, gt = _as_bool(pred), _as_bool(gt)
    total = int(pred.sum()) + int(gt.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, gt).sum()) / total


def _crop_to_union(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop both masks to the union's bounding box plus a 1-voxel margin (distances unchanged)."""
    union = pred | gt
    idx = np.argwhere(union)
    lo = np.maximum(idx.min(axis=0) - 1, 0)
    hi = np.minimum(idx.max(axis=0) + 2, union.shape)
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    # A mask touching the array border still touches the crop's border: its surface is unchanged.
    return pred[sl], gt[sl]


def surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels: mask XOR its erosion (face connectivity, outside the array = background)."""
    mask = _as_bool(mask)
    return mask ^ ndimage.binary_erosion(mask, border_value=0)


def directed_surface_distances(a: np.ndarray, b: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Distances (mm) from each surface voxel of `a` to the nearest surface voxel of `b`.

    Both masks must be non-empty.
    """
    a, b = _as_bool(a), _as_bool(b)
    spacing = _check(a, b, spacing)
    a, b = _crop_to_union(a, b)
    sa, sb = surface(a), surface(b)
    dist_to_b = ndimage.distance_transform_edt(~sb, sampling=spacing)
    return dist_to_b[sa]


def centre_of_mass_mm(mask: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Centre of mass of a non-empty mask in mm from voxel (0, ..., 0), array axis order."""
    mask = _as_bool(mask)
    return np.asarray(ndimage.center_of_mass(mask), dtype=float) * np.asarray(spacing, dtype=float)


def evaluate_masks(pred: np.ndarray, gt: np.ndarray, spacing_zyx: tuple[float, ...],
                   nsd_tolerance_mm: float = 2.0) -> dict[str, Any]:
    """All geometric metrics for one structure: the one function the CLI and the batch call.

    pred, gt: boolean masks of the same shape, (z, y, x) for volumes ((y, x) works too).
    spacing_zyx: voxel size in mm in the same axis order as the arrays.
    Returns a JSON-ready dict: dice, hd95_mm, msd_mm, nsd (at `nsd_tolerance_mm`), com_distance_mm,
    volume_ratio (pred/gt), pred_volume_ml, gt_volume_ml, pred_empty, gt_empty and, when a mask is
    empty, `empty_note` with the convention used (see the module docstring).
    """
    pred, gt = _as_bool(pred), _as_bool(gt)
    spacing = _check(pred, gt, spacing_zyx)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    n_pred, n_gt = int(pred.sum()), int(gt.sum())
    out: dict[str, Any] = {
        "dice": dice(pred, gt),
        "pred_volume_ml": n_pred * voxel_ml,
        "gt_volume_ml": n_gt * voxel_ml,
        "pred_empty": n_pred == 0,
        "gt_empty": n_gt == 0,
        "nsd_tolerance_mm": float(nsd_tolerance_mm),
    }
    if n_pred == 0 or n_gt == 0:
        both = n_pred == 0 and n_gt == 0
        penalty = 0.0 if both else max_distance_mm(pred.shape, spacing)
        out.update(hd95_mm=penalty, msd_mm=penalty, com_distance_mm=penalty,
                   nsd=1.0 if both else 0.0,
                   volume_ratio=1.0 if both else (0.0 if n_pred == 0 else None),
                   empty_note=EMPTY_VALUES_DOC)
        return out

    p, g = _crop_to_union(pred, gt)
    sp, sg = surface(p), surface(g)
    d_pred_to_gt = ndimage.distance_transform_edt(~sg, sampling=spacing)[sp]
    d_gt_to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)[sg]
    tol = float(nsd_tolerance_mm)
    within = int((d_pred_to_gt <= tol).sum()) + int((d_gt_to_pred <= tol).sum())
    out.update(
        hd95_mm=float(max(np.percentile(d_pred_to_gt, 95), np.percentile(d_gt_to_pred, 95))),
        msd_mm=float((d_pred_to_gt.mean() + d_gt_to_pred.mean()) / 2.0),
        nsd=within / float(d_pred_to_gt.size + d_gt_to_pred.size),
        com_distance_mm=float(np.linalg.norm(centre_of_mass_mm(pred, spacing) - centre_of_mass_mm(gt, spacing))),
        volume_ratio=n_pred / n_gt,
    )
    return out


def d98(dose: np.ndarray, target: np.ndarray) -> float:
    """Dose received by at least 98 % of the target voxels (the 2nd percentile of the target's dose)."""
    values = np.asarray(dose, dtype=float)[_as_bool(target)]
    if values.size == 0:
        raise ValueError("D98 of an empty target is undefined")
    return float(np.percentile(values, 2.0))


def relative_d98(pred_frames: np.ndarray, gt_frames: np.ndarray, spacing_yx: tuple[float, float] = (1.0, 1.0),
                 margin_mm: float = 3.0, sigma_mm: float = 4.0) -> float:
    """TrackRAD2025's dose metric for a cine sequence (t, y, x): how much target dose tracking keeps.

    A plan is mimicked from the first frame with a target: its GT is expanded by `margin_mm`
    (GTV->CTV), blurred with a Gaussian of `sigma_mm` and thresholded at 0.25 (a dose plateau with
    a penumbra; TrackRAD uses 3 px and sigma 4 px, 6 px for lung, at ~1 mm pixels). For each frame
    the dose is moved by the tracking error, predicted centre of mass minus true centre of mass,
    and the frames' doses are averaged. Result = D98 of the first-frame GT under the averaged
    shifted dose / D98 under the unshifted dose: 1.0 for perfect tracking, lower when errors push
    the penumbra into the target.

    Frames without a GT are skipped (as TrackRAD does). A frame whose prediction is empty delivers
    no dose to the target in our convention (a lost target cannot be tracked), which lowers the
    result. Raises ValueError if no frame has a GT.
    """
    pred_frames, gt_frames = _as_bool(pred_frames), _as_bool(gt_frames)
    if pred_frames.shape != gt_frames.shape or pred_frames.ndim != 3:
        raise ValueError(f"cine masks must be (t, y, x) of one shape, got {pred_frames.shape} and {gt_frames.shape}")
    spacing = np.asarray(spacing_yx, dtype=float)
    has_gt = gt_frames.any(axis=(1, 2))
    if not has_gt.any():
        raise ValueError("no frame has a reference mask: relative D98 is undefined")
    pred_frames, gt_frames = pred_frames[has_gt], gt_frames[has_gt]
    target = gt_frames[0]

    radius_px = np.maximum(np.round(margin_mm / spacing).astype(int), 0)
    footprint = _ellipse_footprint(radius_px)
    expanded = ndimage.binary_dilation(target, structure=footprint) if radius_px.any() else target
    blurred = ndimage.gaussian_filter(expanded.astype(np.float32), sigma=tuple(sigma_mm / spacing))
    dose0 = (blurred > 0.25).astype(np.float32)

    total = np.zeros_like(dose0)
    for pred, gt in zip(pred_frames, gt_frames):
        if not pred.any():
            continue  # lost target: no dose to it this frame
        shift_px = np.asarray(ndimage.center_of_mass(pred)) - np.asarray(ndimage.center_of_mass(gt))
        total += ndimage.shift(dose0, shift_px, order=3, mode="nearest")
    total /= len(gt_frames)
    reference = d98(dose0, target)
    return d98(total, target) / reference if reference > 0 else 0.0


def _ellipse_footprint(radius_px: np.ndarray) -> np.ndarray:
    """Boolean ellipse with the given per-axis radii in pixels (a disc for isotropic pixels)."""
    ry, rx = (int(r) for r in radius_px)
    yy, xx = np.mgrid[-ry:ry + 1, -rx:rx + 1]
    return ((yy / max(ry, 1)) ** 2 + (xx / max(rx, 1)) ** 2) <= 1.0 + 1e-9
