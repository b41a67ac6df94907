"""The weight-free `classic` propagator: no checkpoint, any modality, CPU only.

1. Key slice: the prompt becomes a 2D mask. A box is a tight rectangle around the structure, so
   an intensity model (histogram inside the box, centre-weighted, vs a ring around it) is
   iterated GrabCut-style inside the box; clicks seed a random walk at the structure's own scale
   (models/classic_points.py); a mask is used as drawn.
2. Propagation, slice by slice in both directions: the previous slice's mask is carried onto the
   next slice (moved by the shift that best matches its patch, then by 2D demons registration of
   the two slices in `register_refine`), turned into a spatial prior (signed distance, in mm) and
   combined with the intensity log-likelihood ratio of the running structure/surroundings model;
   the posterior > 0.5 inside a search band, restricted to the components touching the carried
   mask and opened at a tenth of the cross-section's diameter (cuts leaks through thin bridges),
   is the new slice.
3. Stop rules per direction: empty mask, intensities that no longer match the key slice's model
   (mean log-likelihood ratio below `classic.min_likelihood_ratio`), area collapse below
   `min_area_fraction` of the key slice (that last small slice is kept: structures taper), the
   volume's edge, or `max_extent_mm` from the key slice.
4. Prompts on several slices (`propagate`): the middle box or outline (else the slice with most
   positive clicks) is propagated as above; every other prompted slice, and every correction a
   reviewer adds (`Correcting`, models/corrections.py), then changes its own slice and is carried
   only as far as it changes the result (the corrections section below).

Works on raw intensities, mapped to features by models/intensity_model.py (CT by HU, anything else
by percentiles), one slice at a time and only for the slices the propagation visits.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from config.schema import PropagationConfig
from models.classic_points import (
    _check_on_tissue,
    click_scale_mm,
    key_mask_from_points,
    negative_region,
)
from models.confidence import box_regions
from models.intensity_model import (
    SMOOTH_PX,
    histogram,
    llr,
    ring_around,
    ring_contrast,
    slice_features,
)
from models.postprocess import fill_holes_per_slice
from models.prompts import (
    BoxPrompt,
    MaskPrompt,
    PointPrompt,
    Prompt,
    PromptError,
    check_prompts,
    is_positive,
)
from models.result import PropagationResult

GRABCUT_MAX_PX = 128  # GrabCut runs on the box crop shrunk to this size (speed on 512 x 512 organs)
TEMPLATE_SEARCH_MM = 10.0  # how far a cross-section may shift between neighbouring slices (ribs, vessels)
TEMPLATE_PENALTY = 0.02  # correlation given up per mm of shift (per slice gap): small shifts win ties
GAP_CONFIDENCE = 0.5  # slices filled by interpolation between prompts, not by a chain: neither sure nor unsure
OPENING_FRACTION = 0.1  # per-slice opening radius, as a fraction of the cross-section's equivalent diameter
# A box candidate filling more than this share of its box found no boundary inside it (a structure as
# dense as its neighbours): a tight box's corners are then taken as background, the inscribed ellipse
# being the shape of a structure touching all four sides (sts-001 GTV, key slice 0.86 -> 0.94 on CT and MR).
BOX_FULL_FILL = 0.9
# A candidate whose mean differs from the ring around it by at least this many pooled SDs stands out from its
# surroundings: it is a structure, not the tissue around one (`_tight_box_score`).
DISTINCT_CONTRAST = 1.0
# Key-slice stability (`_key_stability`): a box's corners moved by this share of its sides (at least a pixel):
# where a planner's box for the same structure may as well have been.
STABILITY_BOX_FRACTION = 0.04


# ----------------------------------------------------------------------------- key slice
def _box_crop(shape: tuple[int, int], box: BoxPrompt) -> tuple[int, int, int, int]:
    """Rows/columns (y0, y1, x0, x1, end exclusive) of the box plus a surroundings margin half the box wide."""
    ny, nx = shape
    margin = max(3, round(0.5 * max(box.x1 - box.x0 + 1, box.y1 - box.y0 + 1)))
    return (max(0, box.y0 - margin), min(ny, box.y1 + margin + 1),
            max(0, box.x0 - margin), min(nx, box.x1 + margin + 1))


def _histogram_candidate(feature2d: np.ndarray, box: BoxPrompt, iterations: int = 3) -> np.ndarray:
    """Iterated histogram model inside the box (centre-weighted start) vs the ring around it."""
    x0, y0, x1, y1 = box.x0, box.y0, box.x1, box.y1
    bw, bh = x1 - x0 + 1, y1 - y0 + 1
    cy0, cy1, cx0, cx1 = _box_crop(feature2d.shape, box)
    crop = feature2d[cy0:cy1, cx0:cx1]
    inbox = np.zeros(crop.shape, dtype=bool)
    inbox[y0 - cy0:y1 - cy0 + 1, x0 - cx0:x1 - cx0 + 1] = True
    outside = ~inbox
    if not outside.any():  # box covers the whole slice: nothing to contrast with
        outside = ~ndimage.binary_erosion(inbox, iterations=max(1, min(bw, bh) // 8))
    # First structure model weighted to the box centre: a tight box's corners are mostly background.
    yy, xx = np.mgrid[:crop.shape[0], :crop.shape[1]]
    cy, cx = (y0 + y1) / 2.0 - cy0, (x0 + x1) / 2.0 - cx0
    centre_w = np.exp(-2.0 * (((yy - cy) / (bh / 2.0 + 0.5)) ** 2 + ((xx - cx) / (bw / 2.0 + 0.5)) ** 2))
    fg = histogram(crop[inbox], centre_w[inbox])
    bg = histogram(crop[outside]) if outside.any() else histogram(crop[inbox])
    mask = inbox
    for _ in range(iterations):
        score = ndimage.gaussian_filter(llr(crop, fg, bg), SMOOTH_PX)
        candidate = (score > 0) & inbox
        if candidate.sum() < 3:
            break
        mask = candidate
        fg = histogram(crop[mask])
    out = np.zeros(feature2d.shape, dtype=bool)
    out[cy0:cy1, cx0:cx1] = _drop_specks(mask)
    return out


def _drop_specks(mask: np.ndarray) -> np.ndarray:
    """Keep every sizeable piece (>= 20 % of the largest: a box may hold a structure in two parts), fill holes."""
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        mask = np.isin(labels, np.flatnonzero(sizes >= 0.2 * sizes.max()))
    return ndimage.binary_fill_holes(mask)


def _grabcut_tight_candidate(feature2d: np.ndarray, box: BoxPrompt, channels: str, iterations: int = 5,
                             pin_rounds: int = 3) -> np.ndarray:
    """GrabCut (OpenCV: colour GMMs + graph cut) from the box, with the tightness prior enforced.

    A tight box means the structure reaches every row and every column of the box. Plain GrabCut
    often shrinks the structure (or loses it) on low-contrast medical images; for each box row or
    column left uncovered, the pixel most like the current foreground is pinned as foreground and
    the cut is re-evaluated (the "pinpointing" approximation of Lempitsky et al., ICCV 2009).
    `channels`: "scales" (intensity at 0, 1.5 and 3 px smoothing) or "gray" (intensity only).
    """
    cy0, cy1, cx0, cx1 = _box_crop(feature2d.shape, box)
    step = int(np.ceil(max(cy1 - cy0, cx1 - cx0) / GRABCUT_MAX_PX))
    if step > 1:  # large structure: cut at reduced resolution (GMMs and the cut need shape, not detail)
        crop = feature2d[cy0:cy1, cx0:cx1]
        h, w = crop.shape[0] // step * step, crop.shape[1] // step * step
        small_img = crop[:h, :w].reshape(h // step, step, w // step, step).mean(axis=(1, 3))
        small_box = BoxPrompt(box.slice_index, (box.x0 - cx0) // step, (box.y0 - cy0) // step,
                              min((box.x1 - cx0) // step, w // step - 1), min((box.y1 - cy0) // step, h // step - 1))
        small = _grabcut_tight_candidate(small_img, small_box, channels, iterations, pin_rounds)
        out = np.zeros(feature2d.shape, dtype=bool)
        out[cy0:cy0 + h, cx0:cx0 + w] = np.repeat(np.repeat(small, step, axis=0), step, axis=1)
        inbox = np.zeros_like(out)
        inbox[box.y0:box.y1 + 1, box.x0:box.x1 + 1] = True
        return out & inbox
    crop = feature2d[cy0:cy1, cx0:cx1]
    planes = ([crop] * 3 if channels == "gray"
              else [crop, ndimage.gaussian_filter(crop, 1.5), ndimage.gaussian_filter(crop, 3.0)])
    image8 = np.ascontiguousarray(np.stack([(np.clip(c, 0.0, 1.0) * 255).astype(np.uint8) for c in planes], -1))
    by = slice(box.y0 - cy0, box.y1 - cy0 + 1)
    bx = slice(box.x0 - cx0, box.x1 - cx0 + 1)
    labels = np.full(crop.shape, cv2.GC_BGD, np.uint8)  # outside a tight box: surely background
    labels[by, bx] = cv2.GC_PR_FGD
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    try:
        cv2.setRNGSeed(0)  # GrabCut seeds its colour models by k-means on OpenCV's global RNG: same input, same cut
        cv2.grabCut(image8, labels, None, bgd, fgd, iterations, cv2.GC_INIT_WITH_MASK)
        fg = (labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)
        sub = crop[by, bx]
        for _ in range(pin_rounds):
            inbox = fg[by, bx]
            rows, cols = np.flatnonzero(~inbox.any(axis=1)), np.flatnonzero(~inbox.any(axis=0))
            if rows.size == 0 and cols.size == 0:
                break
            typical = float(np.median(crop[fg])) if fg.any() else float(np.median(sub))
            pins = labels[by, bx]  # a view: pins land in `labels`
            for r in rows:
                pins[r, int(np.argmin(np.abs(sub[r] - typical)))] = cv2.GC_FGD
            for c in cols:
                pins[int(np.argmin(np.abs(sub[:, c] - typical))), c] = cv2.GC_FGD
            cv2.grabCut(image8, labels, None, bgd, fgd, 2, cv2.GC_EVAL)
            fg = (labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)
    except cv2.error:  # too few pixels for the GMMs (tiny box, box filling the slice): no candidate
        return np.zeros(feature2d.shape, dtype=bool)
    out = np.zeros(feature2d.shape, dtype=bool)
    labels, _ = ndimage.label(fg)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    fg = np.isin(labels, np.flatnonzero(sizes >= 3))  # pins left isolated (1-2 px) are not the structure
    out[cy0:cy1, cx0:cx1] = ndimage.binary_fill_holes(fg)
    return out


def _box_coverage(mask: np.ndarray, box: BoxPrompt) -> float:
    """Share of the box's rows and columns the mask reaches (1 for any mask a tight box fits)."""
    sub = mask[box.y0:box.y1 + 1, box.x0:box.x1 + 1]
    return 0.5 * (float(sub.any(axis=1).mean()) + float(sub.any(axis=0).mean()))


def _inscribed_ellipse(shape: tuple[int, int], box: BoxPrompt) -> np.ndarray:
    """The ellipse touching the box's four sides (pixel centres within it), on an image of `shape`."""
    yy, xx = np.ogrid[:shape[0], :shape[1]]
    ry, rx = (box.y1 - box.y0 + 1) / 2.0, (box.x1 - box.x0 + 1) / 2.0
    return ((yy - (box.y0 + box.y1) / 2.0) / ry) ** 2 + ((xx - (box.x0 + box.x1) / 2.0) / rx) ** 2 <= 1.0


def _cut_full_box(mask: np.ndarray, box: BoxPrompt) -> np.ndarray:
    """`mask` cut to the box's inscribed ellipse if it fills more than BOX_FULL_FILL of the box (see there)."""
    if mask[box.y0:box.y1 + 1, box.x0:box.x1 + 1].mean() <= BOX_FULL_FILL:
        return mask
    cut = mask & _inscribed_ellipse(mask.shape, box)
    return cut if cut.any() else mask


def key_mask_from_box(feature2d: np.ndarray, box: BoxPrompt,
                      spacing_yx: tuple[float, float] = (1.0, 1.0), method: str = "tight_select") -> np.ndarray:
    """Segment the structure inside a tight box.

    `histogram`: the iterated intensity model alone. `tight_select` (default): three candidates
    (that model, and GrabCut with the tightness prior on two feature sets), chosen by what a tight box
    means (`_tight_box_score`). A winner filling nearly all of the box is cut to the box's inscribed
    ellipse (`BOX_FULL_FILL`). No per-structure choice is made.
    """
    return _chosen(feature2d, _box_candidates(feature2d, box, method), box, spacing_yx, method)


def _box_candidates(feature2d: np.ndarray, box: BoxPrompt, method: str) -> list[np.ndarray]:
    """The masks `key_mask_from_box` chooses from (see there)."""
    hist = _histogram_candidate(feature2d, box)
    if method == "histogram":
        return [hist]
    return [hist] + [c for c in (_grabcut_tight_candidate(feature2d, box, channels)
                                 for channels in ("gray", "scales")) if c.any()]


def _chosen(feature2d: np.ndarray, candidates: list[np.ndarray], box: BoxPrompt, spacing_yx: tuple[float, float],
            method: str) -> np.ndarray:
    if method == "histogram":
        return candidates[0]
    best = max(candidates, key=lambda c: _tight_box_score(feature2d, c, box, spacing_yx))
    return _cut_full_box(best, box)


def _tight_box_score(feature2d: np.ndarray, mask: np.ndarray, box: BoxPrompt,
                     spacing_yx: tuple[float, float]) -> tuple[float, bool, bool, float]:
    """How well a candidate fits a tight box, compared in this order:
    1. the share of the box's rows and columns it reaches (a tight box touches its structure on all four
       sides), in steps of 0.1 so noise at the box's edge does not decide;
    2. whether it stands out from the 10 mm ring around it (ring contrast >= DISTINCT_CONTRAST): a lung
       crescent around a liver dome does, the liver does not;
    3. whether it covers the box's centre (models/confidence.py `box_regions`): when nothing stands out
       (a tumour against chest wall of its own density), what fills the box's centre is the structure and
       the aerated lung or fat filling its corners is not;
    4. the ring contrast itself.
    """
    contrast = ring_contrast(feature2d, mask, spacing_yx)
    centre, _ = box_regions(mask.shape, box)
    return (round(_box_coverage(mask, box), 1), contrast >= DISTINCT_CONTRAST,
            bool(mask[centre].mean() >= 0.5), contrast)


# ----------------------------------------------------------------------------- propagation step
def _bbox(mask: np.ndarray, margin: int) -> tuple[slice, slice]:
    """Rows and columns of the mask's bounding box grown by `margin` (within the slice)."""
    ys, xs = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))  # not np.nonzero: 10x faster
    return (slice(max(0, ys[0] - margin), min(mask.shape[0], ys[-1] + margin + 1)),
            slice(max(0, xs[0] - margin), min(mask.shape[1], xs[-1] + margin + 1)))


def _template_shift(previous_image: np.ndarray, image: np.ndarray, previous: np.ndarray,
                    spacing_yx: tuple[float, float], dz: float) -> tuple[int, int]:
    """Whole-pixel shift (dy, dx) of the structure's patch from the previous slice to this one.

    Demons follow deformation but lose a small structure that moves further than its own width
    between slices (a rib, a vessel, a bowel loop running obliquely). Normalised cross-correlation
    of the patch around the structure, searched within TEMPLATE_SEARCH_MM, finds that move first;
    each mm of shift costs TEMPLATE_PENALTY per slice gap, so a static structure keeps (0, 0).
    """
    rows, cols = _bbox(previous, 2)
    ny, nx = image.shape
    y0, y1, x0, x1 = rows.start, rows.stop, cols.start, cols.stop
    template = np.ascontiguousarray(previous_image[y0:y1, x0:x1], dtype=np.float32)
    reach = int(np.ceil(TEMPLATE_SEARCH_MM / min(spacing_yx)))
    sy0, sy1, sx0, sx1 = max(0, y0 - reach), min(ny, y1 + reach), max(0, x0 - reach), min(nx, x1 + reach)
    search = np.ascontiguousarray(image[sy0:sy1, sx0:sx1], dtype=np.float32)
    if template.std() < 1e-4 or search.shape[0] <= template.shape[0] and search.shape[1] <= template.shape[1]:
        return 0, 0
    # flat windows (air, padding) give NaN correlations: never the best match
    score = np.nan_to_num(cv2.matchTemplate(search, template, cv2.TM_CCOEFF_NORMED), nan=-1.0, posinf=-1.0, neginf=-1.0)
    oy, ox = y0 - sy0, x0 - sx0  # position of "no shift" in the score map
    yy, xx = np.mgrid[:score.shape[0], :score.shape[1]]
    shift_mm = np.hypot((yy - oy) * spacing_yx[0], (xx - ox) * spacing_yx[1])
    score -= TEMPLATE_PENALTY * shift_mm / max(dz, 1e-3)
    by, bx = np.unravel_index(int(np.argmax(score)), score.shape)
    return int(by - oy), int(bx - ox)


def _shifted(image: np.ndarray, shift: tuple[int, int], rows: slice, cols: slice) -> np.ndarray:
    """The (rows, cols) crop of `image` moved by `shift` whole pixels (edges repeated)."""
    r = np.clip(np.arange(rows.start, rows.stop) - shift[0], 0, image.shape[0] - 1)
    c = np.clip(np.arange(cols.start, cols.stop) - shift[1], 0, image.shape[1] - 1)
    return image[np.ix_(r, c)]


def _open_relative(mask: np.ndarray, fraction: float = OPENING_FRACTION) -> np.ndarray:
    """Open with a disc scaled to the cross-section (fraction x equivalent diameter).

    Cuts the thin bridges by which a same-intensity neighbour leaks in, at the structure's own
    scale: a 5 cm tumour loses attachments under ~1 cm wide, a 1 cm rib is left alone.
    """
    radius = round(fraction * 2.0 * np.sqrt(mask.sum() / np.pi))
    if radius < 1:
        return mask
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    opened = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, disc) > 0
    return _drop_specks(opened) if opened.any() else mask


REGISTRATION_MAX_PX = 96  # demons run on the crop shrunk to this size: the prior needs shape, not detail


def _demons_warp(fixed: np.ndarray, moving: np.ndarray, masks: Sequence[np.ndarray],
                 iterations: int) -> list[np.ndarray]:
    """Carry each of `masks` from the `moving` slice to the `fixed` slice by 2D symmetric-forces demons
    (one registration of the two slices, whatever the number of masks).

    Large crops are registered at a reduced resolution (the refinement restores the boundary
    detail at full resolution), which keeps a 512 x 512 liver at tens of ms per slice.
    """
    step = int(np.ceil(max(fixed.shape) / REGISTRATION_MAX_PX))
    if step > 1:
        shape = fixed.shape
        small = _demons_warp(fixed[::step, ::step], moving[::step, ::step],
                             [ndimage.uniform_filter(m.astype(np.float32), step)[::step, ::step] > 0.5 for m in masks],
                             iterations)
        return [np.repeat(np.repeat(m, step, axis=0), step, axis=1)[:shape[0], :shape[1]] for m in small]
    f = sitk.GetImageFromArray(fixed.astype(np.float32))
    m = sitk.GetImageFromArray(moving.astype(np.float32))
    demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
    demons.SetNumberOfThreads(1)  # crops of <= 96 px: thread start-up costs more than it saves
    demons.SetNumberOfIterations(iterations)
    demons.SetStandardDeviations(1.5)  # field smoothing in pixels: local, but not per-pixel, motion
    field = demons.Execute(f, m)
    cast = sitk.CastImageFilter()
    cast.SetOutputPixelType(sitk.sitkVectorFloat64)
    cast.SetNumberOfThreads(1)
    transform = sitk.DisplacementFieldTransform(cast.Execute(field))
    resample = sitk.ResampleImageFilter()
    resample.SetReferenceImage(f)
    resample.SetTransform(transform)
    resample.SetInterpolator(sitk.sitkLinear)
    resample.SetNumberOfThreads(1)
    return [sitk.GetArrayFromImage(resample.Execute(sitk.GetImageFromArray(m.astype(np.float32)))) > 0.5
            for m in masks]


def _refine(likelihood: np.ndarray, prior_mask: np.ndarray, spacing_yx: tuple[float, float], prior_width_mm: float,
            search_mm: float) -> tuple[np.ndarray, float]:
    """Posterior of intensity model x signed-distance prior; returns (mask, mean posterior in mask).

    `likelihood`: the smoothed log-likelihood ratio structure vs surroundings of the slice's pixels."""
    outside = ndimage.distance_transform_edt(~prior_mask, sampling=spacing_yx)
    inside = ndimage.distance_transform_edt(prior_mask, sampling=spacing_yx)
    signed = outside - inside  # mm, > 0 outside the carried mask
    logit = likelihood - signed / prior_width_mm
    mask = (logit > 0) & (signed <= search_mm)
    labels, n = ndimage.label(mask)
    if n:
        touching = np.unique(labels[mask & prior_mask])
        mask = np.isin(labels, touching[touching > 0])
    mask = ndimage.binary_fill_holes(mask)
    confidence = float(np.mean(1.0 / (1.0 + np.exp(-np.clip(logit[mask], -30, 30))))) if mask.any() else 0.0
    return mask, confidence


def _components_through_keys(mask: np.ndarray, keys: Sequence[int]) -> np.ndarray:
    """The 26-connected 3D components that contain part of a prompted slice's mask (all of its pieces)."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if n <= 1:
        return mask
    keep = np.unique(np.concatenate([labels[k][mask[k]] for k in keys]))
    return np.isin(labels, keep[keep > 0])


def _signed_distance(mask: np.ndarray, spacing_yx: tuple[float, float]) -> np.ndarray:
    """mm to the mask's edge, < 0 inside."""
    return (ndimage.distance_transform_edt(~mask, sampling=spacing_yx)
            - ndimage.distance_transform_edt(mask, sampling=spacing_yx))


def _overlapping_pieces(mask: np.ndarray, other: np.ndarray) -> np.ndarray:
    """The connected pieces of `mask` that share a pixel with `other`."""
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    keep = np.unique(labels[mask & other])
    return np.isin(labels, keep[keep > 0])


def _blend(near: np.ndarray, far: np.ndarray, weight_near: float, spacing_yx: tuple[float, float]) -> np.ndarray:
    """A slice between two that disagree, `near` the one it is nearer to (weight_near >= 0.5) or not.

    Pieces both have are blended: their signed distances weighted (shape interpolation). A piece only
    one has (a part that appears or ends between the two) is kept on the slices nearer its own side.
    """
    out = (near & ~_overlapping_pieces(near, far)) if weight_near >= 0.5 else np.zeros_like(near)
    if weight_near < 0.5:
        out |= far & ~_overlapping_pieces(far, near)
    shared_n, shared_f = _overlapping_pieces(near, far), _overlapping_pieces(far, near)
    if shared_n.any():
        rows, cols = _bbox(shared_n | shared_f, 2)
        sd = (weight_near * _signed_distance(shared_n[rows, cols], spacing_yx)
              + (1.0 - weight_near) * _signed_distance(shared_f[rows, cols], spacing_yx))
        out[rows, cols] |= sd < 0
    return out


@dataclass
class _Chain:
    """What one slice-to-slice chain needs: the volume's features and the step's scales and rules."""

    features: Callable[[int], np.ndarray]
    nz: int
    dz: float
    spacing_yx: tuple[float, float]
    settings: PropagationConfig
    visited: int = 0

    def run(self, key: np.ndarray, k: int, direction: int) -> tuple[dict, dict, dict]:
        """Carry `key` (slice k) slice by slice in `direction` until a stop rule fires.

        Returns ({z: mask}, {z: confidence}, stop record).
        """
        features, settings, spacing_yx = self.features, self.settings, self.spacing_yx
        fg_key, bg_key = self.model(key, k)
        fg, bg = fg_key.copy(), bg_key.copy()
        key_area = int(key.sum())
        alpha = settings.classic.model_update
        masks: dict[int, np.ndarray] = {}
        confidence: dict[int, float] = {}
        previous, z = key, k
        while True:
            z += direction
            if not 0 <= z < self.nz:
                reason = "edge_of_volume"
                break
            if abs(z - k) * self.dz > settings.max_extent_mm:
                reason = "max_extent_mm"
                break
            self.visited += 1
            new, conf = self.step(previous, z, direction, fg, bg)
            if not new.any():
                reason = "empty"
                break
            values = features(z)[new]
            match = float(np.mean(llr(values, fg_key, bg_key)))
            if match < settings.classic.min_likelihood_ratio:
                reason = "intensity_mismatch"
                break
            masks[z], confidence[z] = new, conf
            if new.sum() < settings.min_area_fraction * key_area:
                reason = "area_collapse"  # kept: a tapering tip is still the structure
                break
            previous = new
            if alpha > 0:
                fg = (1 - alpha) * fg + alpha * histogram(values)
                around = ring_around(new, spacing_yx)
                if around.any():
                    bg = (1 - alpha) * bg + alpha * histogram(features(z)[around])
        last = z - direction
        return masks, confidence, {"reason": reason, "last_slice": int(last), "slices": int(abs(last - k))}

    def model(self, mask: np.ndarray, z: int) -> tuple[np.ndarray, np.ndarray]:
        """The intensity model (structure, surroundings histograms) of `mask` on slice z."""
        ring = ring_around(mask, self.spacing_yx)
        feature2d = self.features(z)
        return histogram(feature2d[mask]), histogram(feature2d[ring] if ring.any() else feature2d[~mask])

    def step(self, previous: np.ndarray, z: int, direction: int, fg: np.ndarray, bg: np.ndarray,
             stages: dict[str, np.ndarray] | None = None) -> tuple[np.ndarray, float]:
        """Slice z's mask from `previous` (slice z - direction) and the intensity model (fg, bg): moved by
        the patch shift, registered (`register_refine`), refined, opened. Returns (mask, confidence);
        `stages`, if given, receives each of those masks ("shifted", "registered", "refined", "opened")
        so bench/propagation_step.py can tell which one loses what.
        """
        [(new, conf)], _ = self.steps([previous], z, direction, fg, bg, stages)
        return new, conf

    def steps(self, previous: Sequence[np.ndarray], z: int, direction: int, fg: np.ndarray, bg: np.ndarray,
              stages: dict[str, np.ndarray] | None = None) -> tuple[list[tuple[np.ndarray, float]], tuple[int, int]]:
        """`step` for several versions of slice z - direction at once (a corrected slice and the slice
        before the correction), with one patch shift (of their union), one registration and one
        intensity model: their results differ only where the versions do. Returns ([(mask, confidence)
        per version], the patch shift); `stages` as in `step`, for the first version."""
        features, settings, spacing_yx = self.features, self.settings, self.spacing_yx
        dy, dx = spacing_yx
        # How far a boundary may move between slices, and how soft the shape prior is: both scale with
        # the slice gap (an oblique surface moves ~ gap x slope) but never drop below a pixel or two.
        # The prior is firm (half a pixel or a quarter gap): the carried mask is already registered, so
        # intensities only have to settle the boundary (bench/quality.py --prompt mask, mean Dice over the
        # 41 cases before the patch-matched carry: 0.676 at this width, 0.660 at twice it).
        search_mm = max(2.0 * dy, self.dz)
        prior_width_mm = 0.5 * max(dy, 0.5 * self.dz)
        margin_px = int(np.ceil(search_mm / min(dy, dx))) + 3
        use_registration = settings.classic.method == "register_refine"
        union = np.logical_or.reduce(list(previous))
        results = [(np.zeros_like(union), 0.0) for _ in previous]
        if not union.any():
            return results, (0, 0)
        shift = _template_shift(features(z - direction), features(z), union, spacing_yx, self.dz)
        moved = [ndimage.shift(m.astype(np.uint8), shift, order=0) > 0 if shift != (0, 0) else m for m in previous]
        rows, cols = _bbox(np.logical_or.reduce(moved) | union, margin_px + (20 if use_registration else 0))
        priors = [m[rows, cols] for m in moved]
        stage_crops = {"shifted": priors[0]}
        if use_registration:
            carried = _demons_warp(features(z)[rows, cols], _shifted(features(z - direction), shift, rows, cols),
                                   priors, settings.classic.registration_iterations)
            priors = [c if c.any() else p for c, p in zip(carried, priors)]
            stage_crops["registered"] = priors[0]
        likelihood = ndimage.gaussian_filter(llr(features(z)[rows, cols], fg, bg), SMOOTH_PX)
        for i, prior in enumerate(priors):
            if not prior.any():
                continue
            new_crop, conf = _refine(likelihood, prior, spacing_yx, prior_width_mm, search_mm)
            refined = new_crop
            if new_crop.any():
                new_crop = _open_relative(new_crop)
            if i == 0:
                stage_crops.update(refined=refined, opened=new_crop)
            new = np.zeros_like(union)
            new[rows, cols] = new_crop
            results[i] = (new, conf)
        if stages is not None:
            for name, crop in stage_crops.items():
                stages[name] = np.zeros_like(union)
                stages[name][rows, cols] = crop
        return results, shift


def _spread(key: np.ndarray, k: int, chain: _Chain) -> tuple[np.ndarray, np.ndarray, dict]:
    """Mask and confidence through the volume from the prompted slice k's mask `key`: a chain runs
    outward in each direction until a stop rule fires; only the 3D components through slice k are kept."""
    mask = np.zeros((chain.nz,) + key.shape, dtype=bool)
    confidence = np.zeros(chain.nz, dtype=np.float32)
    stop: dict[str, dict[str, Any]] = {}
    for direction, name in ((1, "increasing_z"), (-1, "decreasing_z")):
        masks, conf, stop[name] = chain.run(key, k, direction)
        for z, m in masks.items():
            mask[z], confidence[z] = m, conf[z]
    mask[k], confidence[k] = key, 1.0
    zs, ys, xs = (np.flatnonzero(mask.any(axis=a)) for a in ((1, 2), (0, 2), (0, 1)))
    box = (slice(zs[0], zs[-1] + 1), slice(ys[0], ys[-1] + 1), slice(xs[0], xs[-1] + 1))
    mask[box] = fill_holes_per_slice(_components_through_keys(mask[box], [k - zs[0]]))
    mask[k] = key  # the result passes through the prompt as it was segmented
    confidence[~mask.any(axis=(1, 2))] = 0.0
    return mask, confidence, stop


def _slice_key(features2d: np.ndarray, raw2d: np.ndarray, base: BoxPrompt | MaskPrompt | None,
               clicks: PointPrompt | None, spacing_yx: tuple[float, float], modality: str,
               settings: PropagationConfig) -> np.ndarray:
    """The key slice's mask: the box or outline, plus what the positive clicks find, less what the
    negative clicks mark."""
    if isinstance(base, MaskPrompt):
        key = np.asarray(base.mask, dtype=bool).copy()
    elif isinstance(base, BoxPrompt):
        key = key_mask_from_box(features2d, base, spacing_yx, settings.classic.key_slice)
    else:
        key = np.zeros(features2d.shape, dtype=bool)
    if clicks is not None:
        if any(p for _, _, p in clicks.points):
            key |= key_mask_from_points(features2d, raw2d, clicks, spacing_yx, modality)
        if not all(p for _, _, p in clicks.points) and key.any():
            key &= ~negative_region(features2d, clicks, spacing_yx, structure=key)
    return key


def _moved_boxes(box: BoxPrompt, shape: tuple[int, int]) -> list[BoxPrompt]:
    """The box with two opposite corners moved in and out by STABILITY_BOX_FRACTION of its sides (at least a
    pixel): where a planner's box of the same structure may as well have been."""
    ny, nx = shape
    dy, dx = (max(1, round(STABILITY_BOX_FRACTION * n)) for n in (box.y1 - box.y0 + 1, box.x1 - box.x0 + 1))
    out = []
    for sy, sx, corner in ((-dy, -dx, 0), (dy, dx, 0), (dy, dx, 1), (-dy, -dx, 1)):
        x0, y0, x1, y1 = box.x0, box.y0, box.x1, box.y1
        if corner == 0:
            x0, y0 = x0 + sx, y0 + sy
        else:
            x1, y1 = x1 + sx, y1 + sy
        x0, x1, y0, y1 = max(0, x0), min(nx - 1, x1), max(0, y0), min(ny - 1, y1)
        if x0 <= x1 and y0 <= y1:
            out.append(BoxPrompt(box.slice_index, x0, y0, x1, y1))
    return out


def _key_stability(features2d: np.ndarray, base: BoxPrompt | MaskPrompt, clicks: PointPrompt | None,
                   key: np.ndarray, spacing_yx: tuple[float, float],
                   settings: PropagationConfig) -> tuple[float | None, dict | None]:
    """(stability, alternative) of a box's mask `key` on its slice; (None, None) for anything but a box alone on
    its slice. (Clicks are not moved: a random walk per moved click costs seconds on a large organ; their fit
    to the result is judged instead.)

    stability: the mean Dice between `key` and the masks of the box moved a little (`_moved_boxes`): 1 when
    the answer does not depend on the box's last pixel or two, low when it flips (the structure confidence's
    `stability`, models/confidence.py).
    alternative: another structure the box fits clearly better by contrast (`_key_alternative`), or None."""
    if not isinstance(base, BoxPrompt) or clicks is not None:
        return None, None
    method = settings.classic.key_slice
    scores, seen = [], []
    for moved in _moved_boxes(base, key.shape):
        candidates = _box_candidates(features2d, moved, method)
        other = _chosen(features2d, candidates, moved, spacing_yx, method)
        scores.append(_overlap(other, key))
        seen += candidates
    own = _box_candidates(features2d, base, method) if method != "histogram" else []
    return (float(np.mean(scores)) if scores else None,
            _key_alternative(features2d, base, key, own + seen, spacing_yx))


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two masks (0 when both are empty)."""
    return 2.0 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


# Another structure the box fits (`_key_alternative`): a candidate of the box or of a box moved a little that
# reaches at least this share of the box's rows and columns (as a tight box's structure does, less a pixel
# at a side), overlaps the answer by less than ALTERNATIVE_MAX_DICE (another structure, not another outline
# of it), and stands out from the ring around it by DISTINCT_CONTRAST pooled SDs more than the answer does.
# The key slice prefers what covers the box's centre (`_tight_box_score`): right for a tumour with lung in
# its box's corners, wrong for a lung crescent boxed around a liver dome (which covers the centre and barely
# stands out); the box alone cannot tell them apart, so the result says so (models/guard.py).
ALTERNATIVE_MIN_REACH = 0.85
ALTERNATIVE_MAX_DICE = 0.2


def _key_alternative(features2d: np.ndarray, box: BoxPrompt, key: np.ndarray, candidates: Sequence[np.ndarray],
                     spacing_yx: tuple[float, float]) -> dict | None:
    """The most distinct candidate fitting `box` as well as `key` does but apart from it, if it stands out
    DISTINCT_CONTRAST more than `key` (its area in pixels, its and the key's ring contrast), else None."""
    own = ring_contrast(features2d, key, spacing_yx)
    best = None
    for c in candidates:
        if _box_coverage(c, box) < ALTERNATIVE_MIN_REACH or _overlap(c, key) >= ALTERNATIVE_MAX_DICE:
            continue
        contrast = ring_contrast(features2d, c, spacing_yx)
        if contrast >= own + DISTINCT_CONTRAST and (best is None or contrast > best["contrast"]):
            best = {"area_px": int(c.sum()), "contrast": round(contrast, 2), "key_contrast": round(own, 2)}
    return best


def _boxes_stability(chain: "_Chain", image: np.ndarray, prompts: Sequence[Prompt], k: int, key: np.ndarray,
                     modality: str, settings: PropagationConfig) -> tuple[dict[int, float], dict[int, dict]]:
    """`_key_stability` of every box drawn alone on its slice (`key`: the mask of slice `k`, already found):
    the stability and the alternative (where there is one) by slice."""
    stability, alternatives = {}, {}
    for box in (p for p in prompts if isinstance(p, BoxPrompt)):
        z = box.slice_index
        clicks = next((p for p in prompts if isinstance(p, PointPrompt) and p.slice_index == z), None)
        if clicks is not None:
            continue
        own = key if z == k else _slice_key(chain.features(z), image[z], box, None, chain.spacing_yx, modality,
                                             settings)
        value, alternative = _key_stability(chain.features(z), box, None, own, chain.spacing_yx, settings)
        if value is not None:
            stability[z] = value
        if alternative is not None:
            alternatives[z] = alternative
    return stability, alternatives


# ----------------------------------------------------------------------------- corrections
# A prompt added to a result (a further prompt of the planner's, a reviewer's correction) changes its own
# slice, and is carried outward only as far as it changes the result (`Correcting._carry`): each step
# carries both the corrected slice and the slice as it was before the correction (`_Chain.steps`: one
# shift, one registration, one intensity model), and only their difference, where it continues the
# difference of the slice before, is applied to the result there. The carry stops where that difference
# vanishes, at a slice a prompt set (the result is blended toward it if the difference is still there),
# at the extent, by the chain's own stop rules where the correction extends the structure, or for a click,
# at its reach (`_click_reach_mm`), fading into the result toward it. The other slices keep what the result
# had, so a correction never undoes another slice's agreement with its prompt.
EDIT_MIN_PX = 1  # a carried difference below this many pixels...
EDIT_MIN_FRACTION = 0.02  # ...or this share of the slice's mask changes nothing: the carry stops
# A removal is carried only into what looks like the removed tissue when the two tissues differ by this mean
# log-likelihood ratio (a filled hilum's fat is not carried into the kidney of the next slice).
DISTINCT_LLR = 1.0
# A carried change's steps see the masks within this many pixels (+ its reach) of the change only: both versions
# are cut alike, so their difference near the change is the same, at the cost of the change's size.
CARRY_WINDOW_PX = 24
# A box added to a result whose own segmentation agrees with the result there (Dice) only cuts the result to
# it: a second segmentation's boundary noise is no correction to carry.
BOX_AGREES = 0.9
# A click on a slice with a mask changes it within this many times the click's distance to the contour:
# a reviewer clicks in the middle of what is wrong (the CVPR 2025 protocol: its deepest point), so that
# lies within about twice that distance (a rim a few pixels thick, a lobe of a neighbour); a click's own
# structure found beyond (an iso-intense neighbour) is no part of the correction.
CLICK_REACH = 2.0
# On a slice a positive prompt is on (the planner's box), one click removes at most this share of the mask
# (the part nearest it): a click misread as marking most of the slice (deep in a filled concavity) cannot
# take the prompt's structure away. Elsewhere a click deep in a wrongly followed slice takes all of it.
CLICK_MAX_CHANGE = 0.5
# The clicked tissue looks like the rest of its side (iso-intense, or one of the tissues the structure is
# made of, as a rib's marrow) when at least this share of the rest's pixels are nearer its level than the rest's.
ALIKE_SHARE = 0.2
LEVEL_MIN_PX = 9  # a tissue's level and spread are taken from at least this many pixels
# What a click apart from the result finds (on a slice the result does not reach, or a separate part) may be
# at most this many times the result's cross-section there (or on its nearest slice); more is an iso-intense
# neighbour the walk ran into, and is cut to a disc of that cross-section's size around the click.
FOUND_AREA = 1.5


def _within_size(found: np.ndarray, positives: Sequence[tuple[int, int]], area_px: float) -> np.ndarray:
    """`found` (what clicks at (y, x) found apart from the result) if at most FOUND_AREA times `area_px`
    (the result's cross-section there), else its part within a disc of that cross-section's size
    around each click: an iso-intense neighbour the walk ran into is no part of the correction."""
    if area_px <= 0 or found.sum() <= FOUND_AREA * area_px:
        return found
    yy, xx = np.ogrid[:found.shape[0], :found.shape[1]]
    near = np.zeros_like(found)
    for y, x in positives:
        near |= np.hypot(yy - y, xx - x) <= np.sqrt(area_px / np.pi)
    return _overlapping_pieces(found & near, _points_mask(positives, found.shape))


def _clicks_correction(features2d: np.ndarray, raw2d: np.ndarray, current: np.ndarray, clicks: PointPrompt,
                       spacing_yx: tuple[float, float], modality: str, held: bool = False,
                       found: np.ndarray | None = None) -> np.ndarray:
    """Slice mask `current` corrected by clicks. A positive click outside it whose own structure is
    narrower than its distance to it (`click_scale_mm`; any, if `current` is empty) is on a separate
    part: what it finds (as on a key slice) joins, `_within_size`. Positive clicks next to it add, and
    negative clicks inside it remove, what looks like the clicked tissue near them (`_relabel`). `found`:
    what all the clicks find as on a key slice, if already known (`Correcting._continuation`)."""
    new = current
    negatives = [pt for pt in clicks.points if not pt[2]]
    missed = [(x, y, p) for x, y, p in clicks.points if p and not current[y, x]]
    if missed:
        _check_on_tissue(raw2d, [(y, x) for x, y, _ in missed], clicks.slice_index, modality)
        apart = [c for c in missed if not current.any()
                 or click_scale_mm(features2d, c[1], c[0], spacing_yx) < _distance_to(current, c[1], c[0], spacing_yx)]
        if apart:
            if found is None or len(apart) < len(missed):
                found = key_mask_from_points(features2d, raw2d, PointPrompt(clicks.slice_index, (*apart, *negatives)),
                                             spacing_yx, modality)
            new = new | _within_size(found, [(y, x) for x, y, _ in apart], float(current.sum()))
        beside = [c for c in missed if c not in apart]
        if beside:
            new = _relabel(raw2d, new, beside, negatives, spacing_yx)
    inside = [(x, y, p) for x, y, p in negatives if new[y, x]]
    if inside:
        new = _relabel(raw2d, new, inside, [pt for pt in clicks.points if pt[2]], spacing_yx,
                       CLICK_MAX_CHANGE if held else None)
    return new


def _relabel(raw2d: np.ndarray, mask: np.ndarray, clicks: list[tuple[int, int, bool]],
             others: list[tuple[int, int, bool]], spacing_yx: tuple[float, float],
             max_change: float | None = None) -> np.ndarray:
    """`mask` changed near clicks all positive outside it, or all negative inside it.

    A click sits in the middle of what is wrong, at a distance d from the contour (the CVPR 2025
    protocol clicks the deepest point of the error): its zone is the layer along the contour as thick
    as the click is deep (d, + half a pixel) within CLICK_REACH x d of it (for a piece clicked at its
    centre, all of it). A zone pixel connected to a click changes side if its raw intensity is nearer
    that of the tissue under the click (a disc of d / 2) than that of the rest of the click's side, in a
    ring just beyond its reach (the structure, for a negative click; the surroundings, for a positive
    one; if the ring holds too little of it, that side beyond the clicked disc, as in a hole the result
    filled). Raw intensities, unsmoothed: an error may be a pixel wide. Where the rest holds the clicked
    tissue too (ALIKE_SHARE: a structure iso-intense with its neighbour, a rib's marrow), or too few
    pixels tell them apart (LEVEL_MIN_PX), the zone less a pixel along its rim changes side (the error
    around a click a pixel deep may be that pixel alone). Negative `others` stay out. `max_change`: at
    most this share of the mask changes (its part nearest the clicks; None: at most the mask's size)."""
    positive = clicks[0][2]
    px = max(spacing_yx)
    side = ~mask if positive else mask
    depth = ndimage.distance_transform_edt(side, sampling=spacing_yx)
    yy, xx = np.ogrid[:mask.shape[0], :mask.shape[1]]
    zone, core, rest, inner, wider = (np.zeros_like(mask) for _ in range(5))
    to_clicks = np.full(mask.shape, np.inf)
    for x, y, _ in clicks:
        d = max(float(depth[y, x]), px)
        to_click = np.hypot((yy - y) * spacing_yx[0], (xx - x) * spacing_yx[1])
        to_clicks = np.minimum(to_clicks, to_click)
        layer = (to_click <= CLICK_REACH * d) & (depth <= d + 0.5 * px) & side
        zone |= layer
        inner |= to_click < CLICK_REACH * d - px
        core |= to_click <= max(0.5 * d, 0.5 * px)
        rest |= side & (to_click > CLICK_REACH * d) & (to_click <= CLICK_REACH * d + 3.0 * px)
        wider |= to_click <= 2.0 * CLICK_REACH * d
    if not zone.any():
        return mask
    if rest.sum() < LEVEL_MIN_PX:  # the zone takes in all of the side nearby (a click deep in a filled hole)
        rest = side & ~core & (wider if positive else side)
    like = zone & inner
    if rest.sum() >= LEVEL_MIN_PX:
        raw = np.asarray(raw2d, dtype=np.float32)
        clicked, level = float(np.median(raw[core & side])), float(np.median(raw[rest]))
        if np.mean(np.abs(raw[rest] - clicked) < np.abs(raw[rest] - level)) < ALIKE_SHARE:
            like = zone & (np.abs(raw - clicked) < np.abs(raw - level))
    for x, y, _ in others:
        like[y, x] = False
    seeds = _points_mask([(y, x) for x, y, _ in clicks], mask.shape)
    change = _overlapping_pieces(like | seeds, seeds) & side
    most = max(int((max_change or 1.0) * mask.sum()), 1)
    if change.sum() > most:  # the part nearest the click
        change &= to_clicks <= np.sort(to_clicks[change])[most - 1]
    return ndimage.binary_fill_holes(mask | change) if positive else mask & ~change


def _removed_tissue(feature2d: np.ndarray, removed: np.ndarray, kept: np.ndarray) -> np.ndarray | None:
    """The histogram of what a correction removed, if it tells that tissue from what it kept (each side's
    pixels are on average more likely under its own histogram by DISTINCT_LLR); None if not (a leak into
    an iso-intense neighbour: then what the removal continues into goes whatever it looks like)."""
    if removed.sum() < EDIT_MIN_PX or kept.sum() < EDIT_MIN_PX:
        return None
    away, structure = histogram(feature2d[removed]), histogram(feature2d[kept])
    if (float(np.mean(llr(feature2d[removed], away, structure))) < DISTINCT_LLR
            or float(np.mean(llr(feature2d[kept], structure, away))) < DISTINCT_LLR):
        return None
    return away


def _click_reach_mm(mask: np.ndarray, clicks: PointPrompt, spacing_yx: tuple[float, float]) -> float | None:
    """How far through the slices clicks on a slice with a mask are carried: CLICK_REACH times their
    greatest distance to the contour (mm, at least a pixel), as far as they reach in-plane (`_relabel`).
    None on an empty slice: the clicks then continue the structure, under the chain's own stop rules."""
    if not mask.any():
        return None
    depth = max(_distance_to(mask if p else ~mask, y, x, spacing_yx) for x, y, p in clicks.points)
    return CLICK_REACH * max(depth, max(spacing_yx))


def _distance_to(target: np.ndarray, y: int, x: int, spacing_yx: tuple[float, float]) -> float:
    """mm from pixel (y, x) to the nearest pixel of `target` (0 on it, inf if it is empty): the value
    `ndimage.distance_transform_edt(~target, sampling=spacing_yx)` has there, without the whole slice's."""
    if target[y, x]:
        return 0.0
    ys, xs = np.nonzero(target)
    if not ys.size:
        return float("inf")
    dy, dx = (ys - y).astype(np.float64) * spacing_yx[0], (xs - x).astype(np.float64) * spacing_yx[1]
    return float(np.sqrt(np.min(dy * dy + dx * dx)))


def _points_mask(points: Sequence[tuple[int, int]], shape: tuple[int, int]) -> np.ndarray:
    """A mask of the (y, x) `points`."""
    out = np.zeros(shape, dtype=bool)
    for y, x in points:
        out[y, x] = True
    return out


def _cut_near(mask: np.ndarray, region: np.ndarray) -> np.ndarray:
    """`mask` without `region`, and without the slivers that leaves next to it (thinner than the opening at
    the mask's scale, OPENING_FRACTION of its diameter): a leak a correction takes away goes entirely,
    the rest of the mask stays as it was."""
    rest = mask & ~region
    if not (mask & region).any() or not rest.any():
        return rest
    radius = round(OPENING_FRACTION * 2.0 * np.sqrt(mask.sum() / np.pi))
    if radius < 1:
        return rest
    rows, cols = _bbox(region, 3 * radius + 2)
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    near = cv2.dilate(region[rows, cols].astype(np.uint8), disc) > 0
    opened = cv2.morphologyEx(rest[rows, cols].astype(np.uint8), cv2.MORPH_OPEN, disc) > 0
    out = rest.copy()
    out[rows, cols] &= ~(near & ~opened)
    return out


def _fade(new: np.ndarray, old: np.ndarray, weight_new: float, spacing_yx: tuple[float, float]) -> np.ndarray:
    """`_blend` of a corrected slice mask with the result it corrects, computed where they differ only."""
    differ = new ^ old
    if not differ.any() or weight_new >= 1.0:
        return new
    rows, cols = _bbox(differ, 4)
    out = new.copy()
    out[rows, cols] = _blend(new[rows, cols], old[rows, cols], weight_new, spacing_yx)
    return out


def _box_correction(features2d: np.ndarray, current: np.ndarray, box: BoxPrompt, spacing_yx: tuple[float, float],
                    settings: PropagationConfig) -> np.ndarray:
    """`current` cut to the box if the box's own segmentation (`key_mask_from_box`) agrees with it
    (BOX_AGREES), or if it scores higher by that segmentation's rule (reaching more of the box's rows
    and columns, then standing out more from its ring); else the box's own segmentation."""
    own = key_mask_from_box(features2d, box, spacing_yx, settings.classic.key_slice)
    kept = current.copy()
    kept[:box.y0], kept[box.y1 + 1:], kept[:, :box.x0], kept[:, box.x1 + 1:] = False, False, False, False
    if not kept.any():
        return own
    if 2.0 * (own & kept).sum() / (own.sum() + kept.sum()) >= BOX_AGREES:
        return kept
    score = [(round(_box_coverage(m, box), 1), ring_contrast(features2d, m, spacing_yx)) for m in (own, kept)]
    return kept if score[1] > score[0] else own


def _near(edit: np.ndarray, shift: tuple[int, int], reach_px: int) -> np.ndarray:
    """Pixels within `reach_px` of `edit` or of `edit` moved by `shift`: where a carried difference may continue."""
    moved = ndimage.shift(edit.astype(np.uint8), shift, order=0) > 0 if shift != (0, 0) else edit
    seeds = edit | moved
    if not seeds.any():
        return seeds
    rows, cols = _bbox(seeds, reach_px + 1)
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * reach_px + 1, 2 * reach_px + 1))
    out = np.zeros_like(edit)
    out[rows, cols] = cv2.dilate(seeds[rows, cols].astype(np.uint8), disc) > 0
    return out


@dataclass
class Correcting:
    """A result taking prompts added one at a time (`add`) and an extent (`limit`): its mask and
    confidence, the slices a prompt set (`locked`: a carry stops there) and the slices the structure
    may span (first..last)."""

    image: np.ndarray
    chain: _Chain
    modality: str
    mask: np.ndarray
    confidence: np.ndarray
    locked: set[int]
    held: set[int]  # slices a positive prompt is on: no correction empties them
    first: int
    last: int

    @classmethod
    def start(cls, image: np.ndarray, spacing_zyx: tuple[float, float, float], mask: np.ndarray,
              confidence: np.ndarray, locked: Sequence[int], held: Sequence[int], modality: str = "",
              settings: PropagationConfig | None = None, extent: tuple[int, int] | None = None,
              features: Callable[[int], np.ndarray] | None = None) -> "Correcting":
        """A result (`mask`, `confidence`: copied) ready to be corrected; `locked`: the slices its prompts
        set, `held`: those of them a positive prompt is on; `features`: `slice_features(image, modality)`
        if already at hand (kept between corrections of the same image)."""
        settings = settings or PropagationConfig()
        image = np.asarray(image)
        chain = _Chain(features or slice_features(image, modality), image.shape[0], float(spacing_zyx[0]),
                       (float(spacing_zyx[1]), float(spacing_zyx[2])), settings)
        first, last = extent if extent is not None else (0, image.shape[0] - 1)
        return cls(image, chain, modality, np.array(mask, dtype=bool), np.array(confidence, dtype=np.float32),
                   {int(z) for z in locked}, {int(z) for z in held}, int(first), int(last))

    def add(self, prompt: Prompt) -> dict[str, Any]:
        """Correct the result by `prompt` on its slice and carry that outward (module comment above).

        A positive prompt outside first..last widens it to its slice (the newer word). Returns a record:
        the slice, what was done ("changed", "no change", "nothing found", "outside the extent") and how
        far each direction's carry went. Raises PromptError only for a prompt that cannot be used at all
        (a click on the air outside the patient).
        """
        z = prompt.slice_index
        kind = "box" if isinstance(prompt, BoxPrompt) else "outline" if isinstance(prompt, MaskPrompt) else "clicks"
        record: dict[str, Any] = {"slice": int(z), "kind": kind}
        if not self.first <= z <= self.last:
            if not is_positive(prompt):
                return {**record, "applied": "outside the extent"}
            self.first, self.last = min(self.first, z), max(self.last, z)
        chain, settings = self.chain, self.chain.settings
        before = self.mask[z].copy()
        if isinstance(prompt, MaskPrompt):
            new = np.asarray(prompt.mask, dtype=bool).copy()
        elif isinstance(prompt, BoxPrompt):
            new = _box_correction(chain.features(z), before, prompt, chain.spacing_yx, settings)
        elif before.any() or not is_positive(prompt) or not self.mask.any():
            new = _clicks_correction(chain.features(z), self.image[z], before, prompt, chain.spacing_yx, self.modality,
                                     held=z in self.held)
        else:
            new = self._continuation(prompt)
        if z in self.held and not new.any():
            return {**record, "applied": "it would empty a slice a prompt says holds the structure"}
        self.locked.add(int(z))
        if is_positive(prompt):
            self.held.add(int(z))
        self.mask[z], self.confidence[z] = new, 1.0 if new.any() else 0.0  # a prompted slice: as the prompt says
        if np.array_equal(new, before):
            nothing = is_positive(prompt) and not new.any()
            return {**record, "applied": "nothing found" if nothing else "no change"}
        fg, bg = chain.model(new if new.any() else before, z)
        record["applied"] = "changed"
        reach_mm = _click_reach_mm(before, prompt, chain.spacing_yx) if isinstance(prompt, PointPrompt) else None
        most_removed = new.sum() < 0.5 * before.sum()  # the slice was mostly wrong: the structure ends near here
        for direction, name in ((1, "increasing_z"), (-1, "decreasing_z")):
            toward_prompts = any((p - z) * direction > 0 for p in self.locked)
            if not new.any() and toward_prompts:  # an emptied slice ends the structure on its outer side only
                record[name] = {"reason": "emptied_slice", "slices": []}
                continue
            reach = None if most_removed and not toward_prompts else reach_mm
            record[name] = self._carry(z, new, before, direction, fg, bg, reach)
        for side in (-1, 1):
            self._fill_gap(z, side)
        self.confidence[~self.mask.any(axis=(1, 2))] = 0.0
        return record

    def _continuation(self, clicks: PointPrompt) -> np.ndarray:
        """A slice the result does not reach, clicked: the result's nearest slice carried on to it (the
        structure goes on further than the chain's stop rule let it), if that holds the positive clicks and
        still looks like the structure (the chain's intensity rule); else what the clicks find there (as on
        a key slice) if at most FOUND_AREA times the result's nearest cross-section; else the carried mask
        corrected by the clicks as any slice is (`_clicks_correction`), or what they find `_within_size`."""
        z, chain, settings = clicks.slice_index, self.chain, self.chain.settings
        filled = np.flatnonzero(self.mask.any(axis=(1, 2)))
        s = int(filled[np.argmin(np.abs(filled - z))])
        direction = 1 if z > s else -1
        carried, (fg, bg) = self.mask[s], chain.model(self.mask[s], s)
        for k in range(s + direction, z + direction, direction):
            carried, _ = chain.step(carried, k, direction, fg, bg)
        positives = [(y, x) for x, y, p in clicks.points if p]
        if (carried.any() and all(carried[y, x] for y, x in positives)
                and float(np.mean(llr(chain.features(z)[carried], fg, bg))) >= settings.classic.min_likelihood_ratio):
            return _clicks_correction(chain.features(z), self.image[z], carried, clicks, chain.spacing_yx,
                                      self.modality)
        found = key_mask_from_points(chain.features(z), self.image[z], clicks, chain.spacing_yx, self.modality)
        area = float(self.mask[s].sum())
        if found.sum() <= FOUND_AREA * area or not carried.any():
            return _within_size(found, positives, area)
        return _clicks_correction(chain.features(z), self.image[z], carried, clicks, chain.spacing_yx, self.modality,
                                  found=found)

    def limit(self, first: int, last: int) -> dict[str, Any]:
        """The structure runs from slice `first` to `last`: cut what lies outside, and carry the result
        on to them where it stopped short (no stop rule but an empty slice: the reviewer says it is there)."""
        self.mask[:first], self.mask[last + 1:] = False, False
        self.confidence[:first], self.confidence[last + 1:] = 0.0, 0.0
        self.first, self.last = int(first), int(last)
        filled = np.flatnonzero(self.mask.any(axis=(1, 2)))
        record: dict[str, Any] = {"extent": [int(first), int(last)], "extended": []}
        if filled.size:
            for start, end, direction in ((int(filled[-1]), last, 1), (int(filled[0]), first, -1)):
                previous, (fg, bg) = self.mask[start], self.chain.model(self.mask[start], start)
                for z in range(start + direction, end + direction, direction):
                    new, conf = self.chain.step(previous, z, direction, fg, bg)
                    if not new.any():
                        break
                    self.mask[z], self.confidence[z], previous = new, conf, new
                    record["extended"].append(z)
        return record

    def _carry(self, z0: int, new0: np.ndarray, before0: np.ndarray, direction: int, fg: np.ndarray,
               bg: np.ndarray, reach_mm: float | None = None) -> dict[str, Any]:
        """Carry the change of slice z0 (`before0` -> `new0`) in `direction` (module comment above); where
        the result has a mask, no further than `reach_mm` (None: no limit), fading out toward it."""
        chain, settings = self.chain, self.chain.settings
        reach_px = int(np.ceil(max(2.0 * chain.spacing_yx[0], chain.dz) / min(chain.spacing_yx))) + 2
        unlike = _removed_tissue(chain.features(z0), before0 & ~new0, new0)
        edited: dict[int, tuple[np.ndarray, float]] = {}
        previous, previous_before, edit = new0, before0, new0 ^ before0
        z = z0
        while True:
            z += direction
            if not 0 <= z < chain.nz:
                reason = "edge_of_volume"
                break
            if not self.first <= z <= self.last:
                reason = "extent"
                break
            if z in self.locked:
                reason = "prompted_slice"
                break
            old = self.mask[z]
            if not old.any() and abs(z - z0) * chain.dz > settings.max_extent_mm:
                reason = "max_extent_mm"
                break
            if old.any() and reach_mm is not None and abs(z - z0) * chain.dz > reach_mm:
                reason = "reach"
                break
            chain.visited += 1
            window = np.zeros_like(edit)  # the steps see the masks only around the change: its cost, not the organ's
            window[_bbox(edit, CARRY_WINDOW_PX + reach_px)] = True
            [(carried, conf), (carried_before, _)], shift = chain.steps([previous & window, previous_before & window],
                                                                         z, direction, fg, bg)
            near = _near(edit, shift, reach_px) & window
            removal = carried_before & ~carried & near
            if unlike is not None:  # only what looks like the tissue the correction took away
                removal &= ndimage.gaussian_filter(llr(chain.features(z), unlike, fg), SMOOTH_PX) > 0
            new = _cut_near(old | (carried & ~carried_before & near), removal)
            change = int((new ^ old).sum())
            if change < max(EDIT_MIN_PX, EDIT_MIN_FRACTION * max(int(new.sum()), int(old.sum()))):
                reason = "agrees"
                break
            if not old.any():  # the correction extends the structure here: the chain's own stop rules
                if float(np.mean(llr(chain.features(z)[new], fg, bg))) < settings.classic.min_likelihood_ratio:
                    reason = "intensity_mismatch"
                    break
            edited[z] = new, conf if new.any() else 0.0
            if not old.any() and new.sum() < settings.min_area_fraction * max(int(new0.sum()), 1):
                reason = "area_collapse"  # kept, as a chain keeps a tapering tip
                break
            previous, previous_before, edit = new, old, new ^ old
        for k, (new, conf) in edited.items():  # faded toward the result at a prompted slice or the reach
            weight = abs(z - k) / abs(z - z0) if reason == "prompted_slice" else 1.0
            if reach_mm is not None and self.mask[k].any():
                weight = min(weight, 1.0 - abs(k - z0) * chain.dz / (reach_mm + chain.dz))
            edited[k] = _fade(new, self.mask[k], weight, chain.spacing_yx), conf
        for k, (new, conf) in edited.items():
            self.mask[k], self.confidence[k] = new, conf
        return {"reason": reason, "slices": sorted(edited)}

    def _fill_gap(self, z: int, side: int) -> None:
        """Slices left empty between slice z and the nearest prompted slice on `side` get the shape
        interpolated between the nearest filled slices (both prompts say the structure is there), with
        GAP_CONFIDENCE; not past a slice a prompt emptied."""
        beyond = [p for p in self.locked if (p - z) * side > 0]
        if not beyond or not self.mask[z].any():
            return
        a, b = sorted((z, min(beyond, key=lambda p: abs(p - z))))
        if not self.mask[a].any() or not self.mask[b].any():
            return
        filled = [k for k in range(a, b + 1) if self.mask[k].any()]
        for lo, hi in zip(filled, filled[1:]):
            for k in range(lo + 1, hi):
                self.mask[k] = _blend(self.mask[lo], self.mask[hi], (hi - k) / (hi - lo), self.chain.spacing_yx)
                self.confidence[k] = GAP_CONFIDENCE

# ----------------------------------------------------------------------------- entry point
def _first_prompts(given: Sequence[Prompt], checked: Sequence[Prompt]) -> tuple[list[Prompt], list[Prompt]]:
    """(the prompts the propagation starts from, the others in the order they correct it).

    With a box or an outline: the one nearest the middle of the drawn slices (a middle box is the
    planner's best-placed prompt), with its slice's clicks; the other drawn slices correct it, nearest
    first, then the other clicks in the order given. With clicks only: the first positive click as
    given (the planner's first click), then the others in the order given (later ones correct it).
    """
    drawn = sorted({p.slice_index for p in checked if isinstance(p, (BoxPrompt, MaskPrompt))})
    if drawn:
        mid = 0.5 * (drawn[0] + drawn[-1])
        k = min(drawn, key=lambda z: (abs(z - mid), z))
        first = [p for p in checked if p.slice_index == k]
        rest = [p for p in checked if p.slice_index != k and isinstance(p, (BoxPrompt, MaskPrompt))]
        rest.sort(key=lambda p: (abs(p.slice_index - k), p.slice_index))
        return first, rest + [p for p in given if p.slice_index != k and isinstance(p, PointPrompt)]
    start = next(p for p in given if is_positive(p))
    return [start], [p for p in given if p is not start]


def propagate(
    image: np.ndarray,
    spacing_zyx: tuple[float, float, float],
    prompts: Prompt | Sequence[Prompt],
    modality: str = "",
    settings: PropagationConfig | None = None,
) -> PropagationResult:
    """Spread `prompts` (on one or more slices) through `image` (z, y, x, raw intensities, HU for CT).

    spacing_zyx: voxel size in mm, array order. modality: "CT", "MR" or "" (unknown).
    One prompted slice (`_first_prompts`) is propagated through the volume; every other prompt then
    corrects that result (`Correcting.add`: its own slice, carried only as far as it changes the
    result), boxes and outlines first, nearest first, then clicks in the order given. The same prompts
    in the same order always give the same result.
    Raises PromptError for unusable prompts (outside the image, zero-area box, point on the air around
    the patient, mask on a missing slice or empty, nothing found on the first prompted slice).
    """
    settings = settings or PropagationConfig()
    t_start = time.perf_counter()
    image = np.asarray(image)
    given = (prompts,) if isinstance(prompts, (BoxPrompt, PointPrompt, MaskPrompt)) else tuple(prompts)
    checked = check_prompts(image.shape, spacing_zyx, given)
    first, others = _first_prompts(given, checked)
    k = first[0].slice_index
    work = Correcting.start(image, spacing_zyx, np.zeros(image.shape, dtype=bool), np.zeros(image.shape[0]),
                            [k], [k], modality, settings)
    chain = work.chain
    drawn = next((p for p in first if isinstance(p, (BoxPrompt, MaskPrompt))), None)
    clicks = next((p for p in first if isinstance(p, PointPrompt)), None)
    key = _slice_key(chain.features(k), image[k], drawn, clicks, chain.spacing_yx, modality, settings)
    if not key.any():
        raise PromptError(f"no structure found in the prompt on slice {k}")
    t_key = time.perf_counter()
    stability, alternatives = _boxes_stability(chain, image, checked, k, key, modality, settings)
    work.mask, work.confidence, stop = _spread(key, k, chain)
    corrections = [work.add(p) for p in others]
    for z, value in stability.items():  # a boxed slice is as sure as its answer is stable
        work.confidence[z] = value
    t_end = time.perf_counter()
    return PropagationResult(
        mask=work.mask,
        confidence=work.confidence,
        backend="classic",
        details={
            "method": settings.classic.method,
            "key_slice": int(k),
            "key_area_px": int(key.sum()),
            "prompt_slices": sorted({int(p.slice_index) for p in checked if is_positive(p)}),
            "key_stability": {int(z): round(v, 3) for z, v in stability.items()},
            "key_alternatives": {int(z): a for z, a in alternatives.items()},
            "stop": stop,
            "corrections": corrections,
            "timings_s": {"key_slice": t_key - t_start, "propagation": t_end - t_key, "total": t_end - t_start,
                          "per_slice": (t_end - t_key) / max(chain.visited, 1)},
        },
    )
