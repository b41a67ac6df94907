"""Key-slice mask from clicks for the weight-free propagator: a random walk seeded at the structure's own scale.

A click says where the structure is, not how big it is. Planners click inside, near the middle, so
the distance from the click to the structure's nearest edge (its inscribed radius rho) sets the
scale of everything else, in mm, whatever the pixel size:
1. rho: 32 rays from the click stop where the intensity, averaged over a few pixels ahead (at least
   2 pixels and 4 mm, and a fifth of the distance travelled: long rays in noisy images must not stop
   on noise), leaves the click's level by more than 2.5 noise SDs; rho is the lower quartile of the
   ray lengths (the near side of the structure, robust to rays slipping through a gap).
2. Seeds: the structure is the disc of 0.6 rho around each positive click; the surroundings are the
   pixels of the ring 1.5-3 rho out that look like background (log-likelihood ratio, structure vs
   ring histograms, below -1: where the ring crosses an elongated structure it stays unseeded),
   everything beyond 4 rho, and a disc of 0.6 times its own rho around each negative click.
3. A random walk (Grady 2006, scikit-image) labels the rest: boundaries settle on intensity edges.
   It sees intensities clipped to RW_CLIP noise SDs around the structure seeds' level (so bone and air
   elsewhere in the crop do not weaken the structure's own edges), and its boundary is then put
   half-way across the edge (`_halfway`).
2b. A result that does not stand out from the band around it (ring contrast below NO_EDGE_CONTRAST) and does
   not fit a trusted ray outline (4b; `edge_bounds`) found no edge: the rays ran on into a neighbour of the
   clicked intensity in many directions and the walk stopped inside it (totalseg-ct's right iliopsoas into the muscle beside it, the pancreas into bowel: key-slice
   Dice 0.18, 0.20). The walk is run again at the scale of the shortest ray (the nearest edge the click
   sees) and the result standing out more is kept (0.54, 0.56).
4. GrabCut-style re-estimation: the walk's result, where it is at least 0.6 rho deep, becomes the
   new structure seed (its histogram the new structure model, the ring and frame measured from it),
   and the walk is re-run until the region changes by < 2 % (at most 4 times). This carries the
   seeds along an elongated structure; bridges thinner than 1.2 rho carry none, so leaks into a
   neighbour through a narrow contact do not feed themselves.
4b. The rays also give an outline (`_ray_outline`): trusted when its lengths agree all around (a round
   structure with a closed boundary, e.g. a sarcoma behind a thin rim in muscle of its own intensity).
   A walk that spilt past it, or stopped well inside it, in most directions is run once more within
   it (`_disagrees`): the outline's inner part is structure, what lies well beyond it surroundings.
5. A structure is at least as large as its inscribed disc: if the walk gives less (a structure a
   few pixels across, which the smoothing leaves without a flat inside, e.g. a rib on 3 mm pixels),
   the pixels nearer the click's level than the ring's, within 1.5 rho and connected to the click,
   are added.
5b. A rim brighter than both the result and what lies beyond, closing the result in, is taken in
   (`_with_rim`): the cortex of a bone clicked in its marrow, the wall around a bowel's gas.
The pieces holding a positive click are kept, holes filled, negative discs cut out.
6. Scales are in mm: the noise is the residual after a 2 mm Gaussian (at least 2 px), and on pixels
   finer than 1 mm the walk also runs on ~2 mm blocks, whose result wins when the fine one is a
   speck inside it that fits no trusted outline (`_structure_at_scale`). Pixel counts remain only as
   resolution floors (a scale is never finer than a pixel or two) and as the walk's compute budget.
Negative clicks on a slice without a positive prompt mark a region to cut (`negative_region`).
bench/quality.py --prompt point (one click at the deepest point of the reference's middle slice):
key-slice Dice 0.66 on 39 organs of totalseg-ct/ct_3mm, 0.68 and 0.83 on the sts-001 GTV (CT, MR); the
previous fixed-scale rule got 0.57 and 0.63; a tight box gets 0.80 and 0.86. On the 29 organs of
totalseg-ct/dicom at 512 x 512 (--cases totalseg512): key slice 0.62, volume 0.59 (a box: 0.83, 0.70).
"""
from __future__ import annotations

import warnings

import numpy as np
from scipy import ndimage
from skimage.segmentation import random_walker

from models.intensity_model import SMOOTH_PX, histogram, llr, ring_contrast
from models.prompts import PointPrompt, PromptError

AIR_HU = -900.0  # below this on CT is air: a click there is refused if that air reaches the image's edge
N_RAYS = 32  # directions sampled from each click to find the structure's nearest edge
RAY_TOLERANCE = 2.5  # a ray stops where the intensity leaves the click's level by this many noise SDs,
RAY_RUN = 2  # averaged over the next RAY_RUN pixels (one odd pixel is noise, not an edge),
RAY_RUN_MM = 4.0  # and over at least this many mm (fine pixels are noisier; edges are blurred over mm anyway),
RAY_WINDOW = 0.2  # and over this fraction of the distance travelled (a long ray meets more noise excursions)
RAY_QUANTILE = 0.25  # inscribed radius: this quantile of the ray lengths (the near side)
# A walk that stops where nothing sets it apart from the band around it (intensity_model.ring_contrast, the
# difference of the means over the pooled SD, below this: the two distributions overlap by ~90 %) found no
# edge: it ran on into a neighbour of the clicked intensity and stopped inside it (step 2b; models/guard.py
# flags a click result that still does not stand out).
NO_EDGE_CONTRAST = 0.25
NEAR_EDGE_QUANTILE = 0.0  # ...it is then tried again at this quantile of the ray lengths: the nearest edge the click sees
# The ray outline (`_ray_outline`): rays on ~1 mm blocks (finer pixels resolve grains the rays stop on,
# coarser ones blur away a rim a millimetre or two thick), with a longer look-ahead (an interior speck
# of a heterogeneous tumour does not stop them) and then carried on to the edge it saw.
OUTLINE_GRID_MM = 1.0  # the outline's rays run on pixels block-averaged to about this size
OUTLINE_RUN_MM = 8.0  # ...averaged over at least this many mm ahead
RAY_OUTLINE_WINDOW = 9  # each ray's length is the median of this many neighbouring rays
RAY_OUTLINE_CV = 0.1  # the outline is trusted when its lengths vary by less than this (coefficient of variation)
RAY_SPILL = 1.1  # the walk disagrees with a trusted outline if it went beyond this many times it...
RAY_SHORT = 0.8  # ...or stopped within this many times it...
DISAGREE_DIRECTIONS = 0.5  # ...in more than this share of the directions (not one thin process);
RAY_OUTLINE_CORE = 0.6  # it is then re-run with the pixels within this many times the outline as structure
RAY_OUTLINE_BOUND = 1.3  # and those beyond this many times it as surroundings
SEED_FRACTION = 0.6  # structure seeds: the disc of this fraction of the inscribed radius
# A rim closing the walk's result in is taken in (`_with_rim`; 29 organs at 512 x 512 0.573 -> 0.591, mostly
# ribs clicked in their marrow; the 41 shared cases at 3 mm unchanged): it lies within this many inscribed
# radii outside the result (or more, up to RIM_MAX_MM), is this many noise SDs brighter than both sides,
# and encloses this share of it.
RIM_DEPTH = 0.3
RIM_SD = 3.0
RIM_CLOSED = 0.9
RIM_MAX_MM = 6.0  # ...and at most this thick (a humerus's cortex, clicked in its marrow: 0.22 -> 0.82 at 512 x 512)
RING_RADII = (1.5, 3.0)  # background candidates: this ring, in inscribed radii
FRAME_RADII = 4.0  # everything further than this many inscribed radii is background
BACKGROUND_LLR = -1.0  # a ring pixel is a background seed below this log-likelihood ratio
RW_BETA = 30.0  # random-walk edge sensitivity (scikit-image's beta, on intensities in noise units)
# scikit-image weighs each edge against the spread of the whole crop (beta / (10 x its SD)): bone and air
# in the crop made every soft-tissue edge weak, and on a large organ the walk faded into a disc around
# the click (liver at 512 x 512: Dice 0.64). Intensities are clipped to this many noise SDs around the
# structure seeds' level first: further is just "not the clicked tissue" (bench/quality.py --prompt point,
# 41 shared cases 0.526 -> 0.530, 29 organs at 512 x 512 0.530 -> 0.555; 5 SDs 0.527 / 0.547, 8 SDs
# 0.525 / 0.538).
RW_CLIP = 6.0
MAX_RESEEDS = 4  # the walk is re-seeded from its own result at most this often (it stops once stable)
RW_MAX_PX = 256  # the walk runs on the crop shrunk to this size (large structures: shape, not detail)
# Scales in mm. Fine pixels (interpolated MR at 0.4-0.5 mm) resolve texture and correlated noise, not
# structure: measured against a pixel-scale noise, every grain is an edge and a click found a speck
# (the sts-001 GTV resampled to 0.49 mm: key-slice Dice 0.012 CT, 0.018 MR, against 0.68 and 0.73 at
# its own 0.98 mm).
NOISE_SCALE_MM = 2.0  # noise: the residual after a Gaussian of this size (and at least 2 px)
COARSE_GRID_MM = 2.0  # pixels finer than half this are also walked on a grid of about this size...
SPECK_FRACTION = 0.25  # ...whose result wins when the fine one is less than this fraction of it


def _check_on_tissue(raw2d: np.ndarray, points: list[tuple[int, int]], slice_index: int, modality: str) -> None:
    """A positive click on the air around the patient (CT) or on the empty background (MR) has no
    structure to grow. Gas inside the patient (bowel, stomach, airway: air the body encloses on the
    slice) is a structure's content a planner may click: it is accepted."""
    ny, nx = raw2d.shape
    for y, x in points:
        rows, cols = slice(max(0, y - 2), min(ny, y + 3)), slice(max(0, x - 2), min(nx, x + 3))
        on_air = modality.upper() == "CT" and float(np.median(raw2d[rows, cols])) < AIR_HU
        if on_air and _outside_air(raw2d, rows, cols):
            raise PromptError(f"positive point (x={x}, y={y}) on slice {slice_index} is on air outside the "
                              f"patient ({float(raw2d[y, x]):.0f} HU, reaching the image's edge)")
        if modality.upper() != "CT" and float(raw2d[rows, cols].max()) <= float(raw2d.min()):
            raise PromptError(f"positive point (x={x}, y={y}) on slice {slice_index} is on "
                              "empty background (the image's minimum intensity all around it)")


def _outside_air(raw2d: np.ndarray, rows: slice, cols: slice) -> bool:
    """Whether the air (< AIR_HU) under the patch (rows, cols) connects to the slice's edge."""
    labels, _ = ndimage.label(raw2d < AIR_HU)
    under = np.unique(labels[rows, cols])
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    return bool(np.intersect1d(under[under > 0], edge).size)


def _noise(feature2d: np.ndarray, spacing_yx: tuple[float, float]) -> float:
    """Robust noise level: MAD of the residual after a Gaussian of NOISE_SCALE_MM (at least 2 px), over
    the non-background pixels."""
    residual = feature2d - ndimage.gaussian_filter(feature2d, [max(2.0, NOISE_SCALE_MM / s) for s in spacing_yx])
    tissue = feature2d > feature2d.min() + 0.05
    values = residual[tissue] if tissue.sum() > 100 else residual.ravel()
    return max(1.4826 * float(np.median(np.abs(values - np.median(values)))), 1e-3)


def _ray_lengths(feature2d: np.ndarray, y: int, x: int, noise: float, spacing_yx: tuple[float, float],
                 run_mm: float = RAY_RUN_MM, to_edge: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Length (mm) of each of the N_RAYS rays from the click, stopping at dissimilar pixels, and its angle.

    A ray stops where the mean of the next pixels (RAY_RUN, `run_mm`, RAY_WINDOW) leaves the
    click's 3 x 3 median by more than RAY_TOLERANCE noise SDs, or at the image's border. `to_edge`:
    it then goes on to the first of those next pixels that itself leaves the click's level (the look-ahead
    sees an edge before the ray reaches it: a long one would otherwise stop its length short).
    """
    ny, nx = feature2d.shape
    level = float(np.median(feature2d[max(0, y - 1):y + 2, max(0, x - 1):x + 2]))
    angles = np.linspace(0.0, 2.0 * np.pi, N_RAYS, endpoint=False)
    steps = np.arange(1, max(ny, nx) + 1)
    ry = np.rint(y + np.sin(angles)[:, None] * steps).astype(int)
    rx = np.rint(x + np.cos(angles)[:, None] * steps).astype(int)
    inside = (ry >= 0) & (ry < ny) & (rx >= 0) & (rx < nx)
    values = feature2d[np.clip(ry, 0, ny - 1), np.clip(rx, 0, nx - 1)].astype(np.float64)
    # mean of the next w pixels, w growing with the distance travelled: a long ray inside a large
    # structure meets many noise excursions, a real edge is a sustained change
    min_run = max(RAY_RUN, int(np.ceil(run_mm / min(spacing_yx))))
    window = np.maximum(min_run, np.ceil(RAY_WINDOW * steps)).astype(int)
    ends = np.minimum(np.arange(steps.size) + window, steps.size)
    sums = np.concatenate([np.zeros((N_RAYS, 1)), np.cumsum(values, axis=1)], axis=1)
    means = (sums[:, ends] - sums[:, :-1]) / (ends - np.arange(steps.size))
    stop = ~inside | (np.abs(means - level) > RAY_TOLERANCE * noise)
    pixels_in = np.argmax(stop, axis=1)  # similar pixels before the first stop, per ray
    if to_edge:
        j = np.arange(steps.size)
        ahead = (j >= pixels_in[:, None]) & (j < (pixels_in + window[pixels_in])[:, None])
        off = ahead & (~inside | (np.abs(values - level) > RAY_TOLERANCE * noise))
        beyond_window = np.minimum(pixels_in + window[pixels_in], steps.size - 1)
        pixels_in = np.where(off.any(axis=1), np.argmax(off, axis=1), beyond_window)
    step_mm = np.hypot(np.sin(angles) * spacing_yx[0], np.cos(angles) * spacing_yx[1])
    return (pixels_in + 0.5) * step_mm, angles


def _inscribed_radius(feature2d: np.ndarray, y: int, x: int, noise: float, spacing_yx: tuple[float, float],
                      quantile: float = RAY_QUANTILE) -> float:
    """Distance (mm) from the click to the structure's near edge: `quantile` of the ray lengths."""
    return float(np.quantile(_ray_lengths(feature2d, y, x, noise, spacing_yx)[0], quantile))


def _ray_outline(feature2d: np.ndarray, y: int, x: int, spacing_yx: tuple[float, float]) -> np.ndarray | None:
    """Per pixel, its distance from the click over the click's ray outline there (> 1: beyond the edge the
    rays found), or None when the rays disagree (the outline is then no shape to trust).

    Each ray's length is the circular median of RAY_OUTLINE_WINDOW neighbouring rays (a ray slipping
    through a gap or stopping on an interior speck is outvoted); the outline is trusted only when
    those lengths vary by less than RAY_OUTLINE_CV (coefficient of variation): every ray met the edge at
    about the same distance, the signature of a compact, round structure with a closed boundary.
    The rays run on pixels block-averaged to about OUTLINE_GRID_MM (finer pixels resolve texture, and
    the rays stop on grains; coarser ones blur away a rim a millimetre or two thick).
    """
    fy, fx = (max(1, int(OUTLINE_GRID_MM / s)) for s in spacing_yx)
    small, small_spacing = _block_mean(feature2d, fy, fx), (spacing_yx[0] * fy, spacing_yx[1] * fx)
    lengths, angles = _ray_lengths(small, y // fy, x // fx, _noise(small, small_spacing), small_spacing,
                                   OUTLINE_RUN_MM, to_edge=True)
    k = RAY_OUTLINE_WINDOW // 2
    ring = np.concatenate([lengths[-k:], lengths, lengths[:k]])
    outline = np.median(np.lib.stride_tricks.sliding_window_view(ring, RAY_OUTLINE_WINDOW), axis=1)
    if outline.std() >= RAY_OUTLINE_CV * outline.mean():
        return None
    yy, xx = np.mgrid[:feature2d.shape[0], :feature2d.shape[1]]
    dy, dx = (yy - y) * spacing_yx[0], (xx - x) * spacing_yx[1]
    theta = np.mod(np.arctan2(dy, dx), 2.0 * np.pi)
    edge = np.interp(theta, np.append(angles, 2.0 * np.pi), np.append(outline, outline[0]))
    return np.hypot(dy, dx) / edge


def _block_mean(image: np.ndarray, fy: int, fx: int) -> np.ndarray:
    """`image` averaged over fy x fx blocks (edges repeated to fill the last ones)."""
    if fy == 1 and fx == 1:
        return image
    ny, nx = image.shape
    h, w = -(-ny // fy) * fy, -(-nx // fx) * fx
    padded = np.pad(np.asarray(image, dtype=np.float32), ((0, h - ny), (0, w - nx)), mode="edge")
    return padded.reshape(h // fy, fy, w // fx, fx).mean(axis=(1, 3))


def click_scale_mm(feature2d: np.ndarray, y: int, x: int, spacing_yx: tuple[float, float]) -> float:
    """The inscribed radius (mm) of the structure under a click, as the walk measures it (rays, module
    docstring), on the slice's pixels and, for pixels finer than 1 mm, on ~2 mm blocks: the larger.
    Used by models/guard.py to judge a result against the click, whichever backend made it."""
    feature2d = np.asarray(feature2d, dtype=np.float32)
    rho = _inscribed_radius(feature2d, y, x, _noise(feature2d, spacing_yx), spacing_yx)
    fy, fx = (max(1, int(COARSE_GRID_MM / s)) for s in spacing_yx)
    if fy > 1 or fx > 1:
        small = _block_mean(feature2d, fy, fx)
        coarse_spacing = (spacing_yx[0] * fy, spacing_yx[1] * fx)
        rho = max(rho, _inscribed_radius(small, y // fy, x // fx, _noise(small, coarse_spacing), coarse_spacing))
    return max(rho, max(spacing_yx))


def _click_radii(feature2d: np.ndarray, pos: list[tuple[int, int]], spacing_yx: tuple[float, float],
                 noise: float, quantile: float = RAY_QUANTILE) -> np.ndarray:
    """Inscribed radius (mm, at least a pixel) at each click (`quantile` of its ray lengths)."""
    return np.array([max(_inscribed_radius(feature2d, y, x, noise, spacing_yx, quantile), max(spacing_yx))
                     for y, x in pos])


def _scale_map(radii: np.ndarray, pos: list[tuple[int, int]], shape: tuple[int, int],
               spacing_yx: tuple[float, float]) -> np.ndarray:
    """Per pixel, the inscribed radius of its nearest click: the local scale."""
    clicks = np.full(shape, -1, dtype=np.intp)
    for i, (y, x) in enumerate(pos):
        clicks[y, x] = i
    _, (iy, ix) = ndimage.distance_transform_edt(clicks < 0, sampling=spacing_yx, return_indices=True)
    return radii[clicks[iy, ix]]


def _seed_labels(feature2d: np.ndarray, core: np.ndarray, region: np.ndarray, rho: np.ndarray,
                 negatives: np.ndarray, spacing_yx: tuple[float, float]) -> np.ndarray:
    """Random-walk seeds: 1 structure (`core`), 2 surroundings (ring, frame, negatives), 0 free.

    Distances are from the core (discs of SEED_FRACTION rho at the start), so the ring and frame
    radii, counted from the click, are reduced by SEED_FRACTION rho. The structure's histogram
    comes from `region` (the core at the start, the last walk's result later).
    """
    px = max(spacing_yx)
    d = ndimage.distance_transform_edt(~core, sampling=spacing_yx)
    # a pixel or two of slack: at rho ~ 1 px the ring must still clear the structure's edge
    ring = ((d > (RING_RADII[0] - SEED_FRACTION) * rho + px) & (d <= (RING_RADII[1] - SEED_FRACTION) * rho + 2 * px)
            & ~region)
    labels = np.zeros(feature2d.shape, dtype=np.int32)
    if ring.any():
        score = ndimage.gaussian_filter(llr(feature2d, histogram(feature2d[region]), histogram(feature2d[ring])),
                                        SMOOTH_PX)
        labels[ring & (score < BACKGROUND_LLR)] = 2
    labels[(d > (FRAME_RADII - SEED_FRACTION) * rho + 3 * px) | negatives] = 2
    labels[core & ~negatives] = 1
    return labels


def _block_max(mask: np.ndarray, step: int) -> np.ndarray:
    """True where any pixel of the step x step block is (a seed survives shrinking)."""
    h, w = -(-mask.shape[0] // step) * step, -(-mask.shape[1] // step) * step
    padded = np.zeros((h, w), dtype=bool)
    padded[:mask.shape[0], :mask.shape[1]] = mask
    return padded.reshape(h // step, step, w // step, step).any(axis=(1, 3))


def _random_walk(feature2d: np.ndarray, labels: np.ndarray, spacing_yx: tuple[float, float],
                 noise: float) -> np.ndarray:
    """Probability of the structure label per pixel, on the seeds' crop (shrunk if large), else 0."""
    ys, xs = np.nonzero(labels != 2)
    rows = slice(max(0, ys.min() - 1), min(labels.shape[0], ys.max() + 2))
    cols = slice(max(0, xs.min() - 1), min(labels.shape[1], xs.max() + 2))
    crop = feature2d[rows, cols]
    if (labels == 1).any():
        level = float(np.median(feature2d[labels == 1]))
        crop = np.clip(crop, level - RW_CLIP * noise, level + RW_CLIP * noise)
    seeds = labels[rows, cols].copy()
    border = np.ones(seeds.shape, dtype=bool)
    border[1:-1, 1:-1] = False
    seeds[border & (seeds == 0)] = 2  # the crop's edge is beyond the frame: surroundings
    step = int(np.ceil(max(crop.shape) / RW_MAX_PX))
    if step > 1:
        fg = _block_max(seeds == 1, step)
        bg = _block_max(seeds == 2, step) & ~fg
        crop = ndimage.zoom(crop, np.divide(fg.shape, crop.shape), order=1, grid_mode=True, mode="nearest")
        seeds = np.where(fg, 1, np.where(bg, 2, 0)).astype(np.int32)
    sampling = np.array(spacing_yx) / max(spacing_yx)
    with warnings.catch_warnings():  # "probability outside [0, 1] within tolerance": harmless rounding
        warnings.simplefilter("ignore", UserWarning)
        prob = random_walker(crop / noise, seeds, beta=RW_BETA, mode="cg_j", tol=1e-3,
                             spacing=sampling, return_full_prob=True)[0]
    full_shape = (rows.stop - rows.start, cols.stop - cols.start)
    if prob.shape != full_shape:
        prob = ndimage.zoom(prob, np.divide(full_shape, prob.shape), order=1, grid_mode=True, mode="nearest")
    out = np.zeros(labels.shape, dtype=np.float32)
    out[rows, cols] = prob
    return out


def key_mask_from_points(feature2d: np.ndarray, raw2d: np.ndarray, prompt: PointPrompt,
                         spacing_yx: tuple[float, float], modality: str) -> np.ndarray:
    """The structure under the positive clicks on the key slice (the rule is in the module docstring).

    feature2d: the slice's [0, 1] feature image, smoothed; raw2d: its raw intensities (HU on CT).
    Several positive clicks may sit on separate pieces of one structure; negative clicks are
    surroundings and the pieces they fall on are cut away. Raises PromptError for a positive
    click on the air around the patient or on empty background, or when the negative clicks leave nothing.
    """
    _check_on_tissue(raw2d, [(y, x) for x, y, p in prompt.points if p], prompt.slice_index, modality)
    return _structure_at_scale(feature2d, prompt, spacing_yx)


def negative_region(feature2d: np.ndarray, prompt: PointPrompt, spacing_yx: tuple[float, float],
                    structure: np.ndarray | None = None) -> np.ndarray:
    """What the negative clicks of `prompt` mark: the tissue under them, found as a positive click finds
    its structure, competing with the slice's positive clicks and with the part of `structure` (the
    box's, outline's or propagation's mask on this slice) beyond 3 of the click's own inscribed radii
    (the outer edge of the ring the walk samples as surroundings). A leak that is all of `structure` is
    all marked; one attached to a larger structure is split from it where the two meet, even at the
    same intensity. Empty if the prompt has no negative click."""
    flipped = PointPrompt(prompt.slice_index, tuple((x, y, not p) for x, y, p in prompt.points))
    if not any(p for _, _, p in flipped.points):
        return np.zeros(np.shape(feature2d), dtype=bool)
    return _structure_at_scale(feature2d, flipped, spacing_yx, competitor=structure)


def _structure_at_scale(feature2d: np.ndarray, prompt: PointPrompt, spacing_yx: tuple[float, float],
                        competitor: np.ndarray | None = None) -> np.ndarray:
    """The clicked structure on the slice's own pixels and, where they are finer than half of
    COARSE_GRID_MM, also on pixels block-averaged to about COARSE_GRID_MM.

    A textured structure (a sarcoma on fine-pixel MR) breaks into grains on its own pixels and the
    click finds one grain; averaged to ~2 mm the texture is gone and the structure is whole. The
    coarse result wins only when the fine one is less than SPECK_FRACTION of it (a speck inside the
    structure) and does not fit the clicks' trusted ray outline (`_disagrees`); otherwise the fine one keeps
    its detail. On pixels of 1 mm and more nothing changes.
    """
    feature2d = np.asarray(feature2d, dtype=np.float32)
    ratio = _outline_ratio(feature2d, _positives(prompt), spacing_yx)  # once: the fine walk and the speck test
    fine = _clicked_structure(feature2d, prompt, spacing_yx, competitor, ratio)
    fy, fx = (max(1, int(COARSE_GRID_MM / s)) for s in spacing_yx)
    if fy == 1 and fx == 1:
        return fine
    ny, nx = feature2d.shape
    small_prompt = PointPrompt(prompt.slice_index, tuple((x // fx, y // fy, p) for x, y, p in prompt.points))
    small = _clicked_structure(_block_mean(feature2d, fy, fx), small_prompt, (spacing_yx[0] * fy, spacing_yx[1] * fx),
                               None if competitor is None else _block_mean(competitor, fy, fx) > 0.5)
    coarse = ndimage.zoom(small.astype(np.float32), (fy, fx), order=1, grid_mode=True, mode="nearest")[:ny, :nx] > 0.5
    for x, y, positive in prompt.points:  # the clicks themselves, whatever the rounding
        coarse[y, x] = positive
    if fine.sum() >= SPECK_FRACTION * coarse.sum():
        return fine
    # a fine result fitting the trusted ray outline is the structure, not a speck of it, however much
    # larger the ~2 mm walk (which can blur a thin rim away and fill same-intensity muscle) came out
    fits = ratio is not None and not _disagrees(fine, ratio, _positives(prompt), spacing_yx)
    return fine if fits else coarse


def _positives(prompt: PointPrompt) -> list[tuple[int, int]]:
    """(y, x) of the positive clicks not covered by a negative click on the same pixel."""
    negatives = {(x, y) for x, y, p in prompt.points if not p}
    return [(y, x) for x, y, p in prompt.points if p and (x, y) not in negatives]


def _clicked_structure(feature2d: np.ndarray, prompt: PointPrompt, spacing_yx: tuple[float, float],
                       competitor: np.ndarray | None = None, ratio: np.ndarray | None = None) -> np.ndarray:
    """The random walk at the clicks' own scale (module docstring), around the positive clicks.

    `competitor`: a region whose pixels beyond RING_RADII[1] inscribed radii of the clicks are
    surroundings seeds (negative_region). `ratio`: the clicks' trusted ray outline on these pixels
    (`_outline_ratio`), or None; a walk disagreeing with it is re-run within it (`_disagrees`). Not given
    on the ~2 mm blocks, which blur away the rim the rays find."""
    feature2d = np.asarray(feature2d, dtype=np.float32)
    seeds = np.zeros(feature2d.shape, dtype=bool)
    negatives = np.zeros(feature2d.shape, dtype=bool)
    for x, y, positive in prompt.points:
        (seeds if positive else negatives)[y, x] = True
    seeds &= ~negatives
    if not seeds.any():
        raise PromptError(f"the points on slice {prompt.slice_index} give an empty region "
                          "(negative points cover the positive ones?)")
    pos = _positives(prompt)
    noise = _noise(feature2d, spacing_yx)  # once per slice: the rays, the walks and the negative clicks share it
    negatives = _negative_discs(feature2d, negatives, seeds, spacing_yx, noise)
    to_click = ndimage.distance_transform_edt(~seeds, sampling=spacing_yx)
    radii = _click_radii(feature2d, pos, spacing_yx, noise)
    mask = _walk_at_scale(feature2d, seeds, negatives, _scale_map(radii, pos, feature2d.shape, spacing_yx), to_click,
                          spacing_yx, noise, competitor, ratio, pos)
    if competitor is not None:  # negative_region: the marked tissue's scale as it is
        return mask
    # a result with no edge around it ran on into a neighbour of the clicked intensity (module docstring, step
    # 2b): at the nearest edge the rays see, the walk may stop on that edge; the result standing out more from
    # what lies around it is kept
    if edge_bounds(feature2d, mask, pos, spacing_yx, ratio):
        return mask
    contrast = ring_contrast(feature2d, mask, spacing_yx)
    nearest = _click_radii(feature2d, pos, spacing_yx, noise, NEAR_EDGE_QUANTILE)
    if np.all(nearest >= radii):
        return mask
    near = _walk_at_scale(feature2d, seeds, negatives, _scale_map(nearest, pos, feature2d.shape, spacing_yx), to_click,
                          spacing_yx, noise, competitor, ratio, pos)
    return near if ring_contrast(feature2d, near, spacing_yx) > contrast else mask


def edge_bounds(feature2d: np.ndarray, mask: np.ndarray, pos: list[tuple[int, int]], spacing_yx: tuple[float, float],
                ratio: np.ndarray | None = None) -> bool:
    """Whether an edge bounds a click's result `mask` ((y, x) clicks `pos`): it stands out from the band around it
    (ring contrast at least NO_EDGE_CONTRAST), or it fits the clicks' trusted ray outline (`ratio`, computed if
    not given), whose rays met an edge all around (a tumour of its surroundings' intensity behind a thin rim).
    Used by models/guard.py too."""
    if ring_contrast(feature2d, mask, spacing_yx) >= NO_EDGE_CONTRAST:
        return True
    ratio = _outline_ratio(feature2d, pos, spacing_yx) if ratio is None else ratio
    return ratio is not None and not _disagrees(mask, ratio, pos, spacing_yx)


def _walk_at_scale(feature2d: np.ndarray, seeds: np.ndarray, negatives: np.ndarray, rho: np.ndarray,
                   to_click: np.ndarray, spacing_yx: tuple[float, float], noise: float, competitor: np.ndarray | None,
                   ratio: np.ndarray | None, pos: list[tuple[int, int]]) -> np.ndarray:
    """The walk at the local scale `rho` (module docstring, steps 2-5b)."""
    if competitor is not None:
        negatives = negatives | (competitor & (to_click > RING_RADII[1] * rho))
    mask = _walk(feature2d, seeds, negatives, rho, to_click, spacing_yx, noise)
    if ratio is not None and _disagrees(mask, ratio, pos, spacing_yx):
        mask = _walk(feature2d, seeds, negatives | (ratio > RAY_OUTLINE_BOUND), rho, to_click, spacing_yx, noise,
                     core=ratio <= RAY_OUTLINE_CORE, reseeds=0)
    return _with_rim(feature2d, mask, seeds, negatives, float(np.median(rho[seeds])), spacing_yx, noise)


def _with_rim(feature2d: np.ndarray, mask: np.ndarray, seeds: np.ndarray, negatives: np.ndarray, rho: float,
              spacing_yx: tuple[float, float], noise: float) -> np.ndarray:
    """`mask` with the wall that closes it in, if one does. A click at a bone's deepest point lands in its
    marrow, and the cortex is the bone; the wall around a bowel's gas, an enhancing rim around necrosis
    are the same. For a wall thickness from RIM_DEPTH rho (at least 2 px) up to RIM_MAX_MM (a long bone's
    cortex is thicker than a rib's, but a wall it stays), the first that fits: the wall is the pixels within
    that distance outside the mask brighter by RIM_SD noise SDs than both the mask and what lies as far
    again beyond, forming a closed ring (after a 1 px closing) around RIM_CLOSED of the mask. A darker ring
    (a fat plane between two organs) is never taken in."""
    if not mask.any():
        return mask
    px = max(spacing_yx)
    out = ndimage.distance_transform_edt(~mask, sampling=spacing_yx)
    level = float(np.median(feature2d[mask]))
    depth = max(2.0 * px, RIM_DEPTH * rho)
    while depth <= max(RIM_MAX_MM, 2.0 * px):
        band, beyond = (out > 0) & (out <= depth), (out > depth) & (out <= 2.0 * depth)
        if not beyond.any():
            break
        rim = band & (feature2d > max(level, float(np.median(feature2d[beyond]))) + RIM_SD * noise) & ~negatives
        if rim.any() and ndimage.binary_fill_holes(ndimage.binary_closing(rim))[mask].mean() >= RIM_CLOSED:
            return ndimage.binary_fill_holes(_clicked_pieces(mask | rim, seeds, negatives))
        depth += px
    return mask


def _walk(feature2d: np.ndarray, seeds: np.ndarray, negatives: np.ndarray, rho: np.ndarray,
          to_click: np.ndarray, spacing_yx: tuple[float, float], noise: float,
          core: np.ndarray | None = None, reseeds: int = MAX_RESEEDS) -> np.ndarray:
    """The walk re-seeded from its own result until stable, at most `reseeds` times (module docstring,
    steps 2-5); `core`: more structure seeds than the discs around the clicks."""
    discs = to_click <= np.maximum(SEED_FRACTION * rho, 0.5 * max(spacing_yx))
    core = (discs if core is None else discs | core) & ~negatives
    mask = core
    for _ in range(1 + reseeds):
        labels = _seed_labels(feature2d, core, mask, rho, negatives, spacing_yx)
        new = _clicked_pieces(_random_walk(feature2d, labels, spacing_yx, noise) > 0.5, seeds, negatives)
        converged = (new ^ mask).sum() <= 0.02 * mask.sum()
        mask = new
        if converged:
            break
        # re-seed from the walk: its part at least SEED_FRACTION rho deep is structure for sure, which
        # carries the seeds along an elongated structure (bridges thinner than that carry none)
        depth = ndimage.distance_transform_edt(np.pad(mask, 1), sampling=spacing_yx)[1:-1, 1:-1]
        core = (core | (depth >= SEED_FRACTION * rho)) & ~negatives
    if mask.sum() * spacing_yx[0] * spacing_yx[1] < np.pi * float(np.sum(rho[seeds] ** 2)):
        mask = _small_structure(feature2d, seeds, negatives, to_click, rho, spacing_yx) | mask
    return _halfway(feature2d, mask, negatives)


def _halfway(feature2d: np.ndarray, mask: np.ndarray, negatives: np.ndarray) -> np.ndarray:
    """`mask` plus the pixels just outside it nearer the structure's level than the surroundings' (median
    2-3 px out). The walk runs on intensities clipped at RW_CLIP noise SDs, which saturate on the
    structure's side of a strong edge: its boundary lies up to a pixel inside; this puts it half-way,
    where a threshold between the two would (41 shared cases 0.530 -> 0.537, 512 x 512 0.555 -> 0.573)."""
    if not mask.any():
        return mask
    near = ndimage.binary_dilation(mask)
    around = ndimage.binary_dilation(near, iterations=2) & ~near
    if not around.any():
        return mask
    level, surround = float(np.median(feature2d[mask])), float(np.median(feature2d[around]))
    return mask | (near & ~mask & ~negatives & (np.abs(feature2d - level) < np.abs(feature2d - surround)))


def _outline_ratio(feature2d: np.ndarray, pos: list[tuple[int, int]],
                   spacing_yx: tuple[float, float]) -> np.ndarray | None:
    """Per pixel, the least over the clicks of its distance over that click's ray outline (`_ray_outline`):
    > 1 beyond every outline. None if any click's rays disagree."""
    ratio = None
    for y, x in pos:
        own = _ray_outline(feature2d, y, x, spacing_yx)
        if own is None:
            return None
        ratio = own if ratio is None else np.minimum(ratio, own)
    return ratio


def _disagrees(mask: np.ndarray, ratio: np.ndarray, pos: list[tuple[int, int]],
               spacing_yx: tuple[float, float]) -> bool:
    """Whether the walk spilt over the trusted ray outline (beyond RAY_SPILL times it) or fell short of it
    (within RAY_SHORT times it) in more than DISAGREE_DIRECTIONS of the directions seen from a click: all
    around, through a thin or broken rim into same-intensity tissue, or stopped by a heterogeneous
    interior; not one thin process the outline's median smoothed away."""
    ny, nx = mask.shape
    for y, x in pos:
        yy, xx = np.mgrid[:ny, :nx]
        theta = np.mod(np.arctan2((yy - y) * spacing_yx[0], (xx - x) * spacing_yx[1]), 2.0 * np.pi)
        sector = np.floor(theta / (2.0 * np.pi) * N_RAYS).astype(int) % N_RAYS
        reach = np.zeros(N_RAYS)
        np.maximum.at(reach, sector[mask], ratio[mask])
        if max(np.mean(reach > RAY_SPILL), np.mean(reach < RAY_SHORT)) > DISAGREE_DIRECTIONS:
            return True
    return False


def _small_structure(feature2d: np.ndarray, seeds: np.ndarray, negatives: np.ndarray, to_click: np.ndarray,
                     rho: np.ndarray, spacing_yx: tuple[float, float]) -> np.ndarray:
    """Fallback when the walk gives less than the inscribed disc (a structure a few pixels across,
    blurred by the smoothing so that it has no flat inside): the pixels nearer the clicks' level than
    the surroundings' (median of the ring), connected to a click, within the ring's inner radius."""
    px = max(spacing_yx)
    level = float(np.median(feature2d[seeds]))
    ring = (to_click > RING_RADII[0] * rho + px) & (to_click <= RING_RADII[1] * rho + 2 * px)
    if not ring.any():
        return seeds
    surround = float(np.median(feature2d[ring]))
    nearer = np.abs(feature2d - level) < np.abs(feature2d - surround)
    return _clicked_pieces(nearer & (to_click <= RING_RADII[0] * rho + px), seeds, negatives)


def _negative_discs(feature2d: np.ndarray, negatives: np.ndarray, seeds: np.ndarray,
                    spacing_yx: tuple[float, float], noise: float) -> np.ndarray:
    """Each negative click grown to SEED_FRACTION of its own inscribed radius (the neighbour it marks).

    A single background pixel barely pulls a random walk; the disc is as sure of the neighbour as the
    positive click's disc is of the structure. It never reaches a positive click.
    """
    if not negatives.any():
        return negatives
    px = max(spacing_yx)
    pos = [(int(y), int(x)) for y, x in np.argwhere(negatives)]
    rho = _scale_map(_click_radii(feature2d, pos, spacing_yx, noise), pos, feature2d.shape, spacing_yx)
    to_neg = ndimage.distance_transform_edt(~negatives, sampling=spacing_yx)
    to_pos = ndimage.distance_transform_edt(~seeds, sampling=spacing_yx)
    return (to_neg <= np.maximum(SEED_FRACTION * rho, 0.5 * px)) & (to_neg < to_pos)


def _clicked_pieces(candidate: np.ndarray, seeds: np.ndarray, negatives: np.ndarray) -> np.ndarray:
    """The connected pieces of `candidate` holding a positive click, holes filled, negative clicks out."""
    labels, _ = ndimage.label(candidate & ~negatives)
    keep = np.unique(labels[seeds])
    return (ndimage.binary_fill_holes(np.isin(labels, keep[keep > 0])) & ~negatives) | seeds
