"""A guard against implausible propagation results: human-readable reasons, whichever backend ran.

`assess` looks at what every backend shares: the image, its spacing, the checked prompts and
the result's mask and per-slice confidence (and structure confidence); besides, where a backend reports
another structure its box fits (`details["key_alternatives"]`, the classic one), it says so. An empty
list means nothing looks wrong; each reason
names the slice and the numbers behind it, so a planner can check the place it points to.
`models.propagate.propagate` fills `PropagationResult.warnings` with it. Whether a flagged job is
held is the pipeline's decision (`guard.hold_implausible`), not this module's.

Each threshold says what a correct result never (or hardly ever) does; none is fitted to cases.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from models.classic_points import NO_EDGE_CONTRAST, click_scale_mm, edge_bounds
from models.confidence import SIGNAL_NAMES, box_fit
from models.intensity_model import ring_contrast, slice_features
from models.prompts import BoxPrompt, MaskPrompt, PointPrompt, Prompt
from models.result import PropagationResult

# A tight box touches its structure on all four sides, so a connected structure reaches every row
# and column of it (less a pixel or two a planner's box may miss by: models/confidence.py); a result
# reaching fewer than this share of them did not find what the box holds.
BOX_MIN_COVERAGE = 0.6
# ...and a structure fills a fair part of its tight box (an ellipse fills 79 %, a thin oblique rib
# or a crescent 10-20 %); below this the box is mostly empty of what the result found.
BOX_MIN_FILL = 0.05
# ...and it covers the box's centre: a result covering less than this share of the box's central region
# (models/confidence.py `box_regions`) is what lies around the structure (lung or fat in the box's corners), or
# a crescent or a C-shape (worth a look too).
BOX_MIN_CENTRE = 0.25
# ...and it has the intensity of what the box's centre holds: a result nearer in intensity to the box's
# corners than to its centre (where the two differ) is the surroundings.
BOX_MAX_CORNER_LIKENESS = 0.5
# An outline is the structure on its slice: a result that keeps less than this Dice of it was
# not propagated from the outline.
OUTLINE_MIN_DICE = 0.8
# A click sits inside its structure, whose inscribed radius the rays measure (classic_points); a
# result whose piece at the click is less than this fraction as deep is a speck of the structure.
CLICK_MIN_DEPTH_FRACTION = 0.3
# ...and a click sits near its structure's middle: a result more than this many times as deep as the structure
# the click's rays measure, where the click is less than CLICK_MIN_CENTRALITY as deep as the result's deepest
# point, has its bulk somewhere else: it went past the clicked structure into a neighbour (each alone is common:
# an elongated structure, a click off its middle; a textured tumour clicked beside its dark core gives 2.25 and
# 0.49, the spinal cord of totalseg-ct leaking into the tissue behind it 3.3 and 0.40).
CLICK_MAX_DEPTH_RATIO = 2.5
CLICK_MIN_CENTRALITY = 0.5
# ...and a click's result is bounded by nothing but the structure's edge (a box bounds its result, a click does
# not): one that stands out from the band around it (models/intensity_model.py ring_contrast) by less than this,
# and fits no trusted outline of the click's rays, has no edge where it stops (the two intensity distributions
# overlap by ~90 %): it stopped inside tissue of the clicked intensity, mostly a neighbour of that intensity it
# ran into (classic_points.edge_bounds, step 2b).
CLICK_MIN_CONTRAST = NO_EDGE_CONTRAST
# No structure worth a click is smaller than this on its clicked slice (a 5 mm disc is 20 mm2).
SPECK_MM2 = 20.0
# Cross-sections change gradually between neighbouring slices: an area step by more than this
# factor, where both slices hold a sizeable part of the structure (at least half of its
# median cross-section: tapering tips change fast and are left alone; the median, because a leak
# inflates the largest), is a leak into a neighbour or a part lost.
JUMP_FACTOR = 2.5
JUMP_MIN_SHARE = 0.5
# A result that runs from its prompts over more than EDGE_RUN_MM to the first or last slice, with a
# cross-section there of at least EDGE_MIN_SHARE of its largest, is either cut off by the scan or ran
# on along a tube (spinal canal, bowel, vessel): planning scans cover a target with several cm to
# spare. A plain "touches an end slice" rule would flag 23 of the 41 shared reference masks
# themselves (the ct_3mm volume is a 90 mm crop): a structure close to the scan's end is normal.
EDGE_RUN_MM = 50.0
EDGE_MIN_SHARE = 0.5
# Touching the image's own border in-plane: only body outline, couch or air reach it.
BORDER_MIN_PX = 3
# Per-slice confidence (mean posterior, or SAM2's score; a classic box's slice: its stability) below this: the
# backend itself doubts it.
CONFIDENCE_MIN = 0.3
# The structure confidence (models/confidence.py, about the probability that Dice >= 0.5) below this: on the
# shared cases with moved prompts it holds the flips the prompt checks miss; 0.5 held a third of the fine small
# structures at 3 mm, 0.3 let flips through (bench/quality.py --jitter 2; docs/propagators.md).
STRUCTURE_CONFIDENCE_MIN = 0.45


def _ranges(slices: Sequence[int]) -> str:
    """'3-5, 9' for [3, 4, 5, 9]."""
    out, start = [], None
    for i, z in enumerate(slices):
        if start is None:
            start = z
        if i + 1 == len(slices) or slices[i + 1] != z + 1:
            out.append(f"{start}" if start == z else f"{start}-{z}")
            start = None
    return ", ".join(out)


def _box_reasons(box: BoxPrompt, mask2d: np.ndarray, feature2d: np.ndarray) -> list[str]:
    fit = box_fit(feature2d, box, mask2d)
    z = box.slice_index
    reasons = []
    if fit.fill < BOX_MIN_FILL:
        reasons.append(f"slice {z}: the result fills {100 * fit.fill:.0f} % of the box "
                       f"(a tight box is at least {100 * BOX_MIN_FILL:.0f} % structure)")
    if fit.reach < BOX_MIN_COVERAGE:
        reasons.append(f"slice {z}: the result reaches {100 * fit.reach:.0f} % of the box's rows and "
                       f"columns (a structure touches all four sides of a tight box)")
    if fit.centre < BOX_MIN_CENTRE:
        reasons.append(f"slice {z}: the result leaves the box's centre out (covers {100 * fit.centre:.0f} % of it; "
                       "a tight box's structure covers its centre)")
    if fit.corners_differ and fit.corner_likeness > BOX_MAX_CORNER_LIKENESS:
        reasons.append(f"slice {z}: the result has the intensity of the box's corners, not of its centre "
                       "(what fills a tight box's corners surrounds the structure)")
    return reasons


def _alternative_reasons(z: int, alternatives: dict) -> list[str]:
    """The backend found another structure the box fits, apart from the result and standing out more from what
    surrounds it (models/classic.py `_key_alternative`): the box alone does not say which one was meant."""
    found = alternatives.get(z, alternatives.get(str(z)))
    if not found:
        return []
    return [f"slice {z}: the box also fits another structure ({found['area_px']} px, apart from the result) that "
            f"stands out more from what surrounds it (contrast {found['contrast']:.1f} against the result's "
            f"{found['key_contrast']:.1f}): check which one was meant"]


def _click_reasons(clicks: PointPrompt, mask2d: np.ndarray, feature2d: np.ndarray,
                   spacing_yx: tuple[float, float], bounded: bool = False) -> list[str]:
    """`bounded`: a box or outline on the same slice bounds the result there (its contrast is then not judged)."""
    reasons = []
    z = clicks.slice_index
    area_mm2 = float(mask2d.sum()) * spacing_yx[0] * spacing_yx[1]
    positives = [(x, y) for x, y, p in clicks.points if p]
    if positives and area_mm2 < SPECK_MM2:
        reasons.append(f"slice {z}: the clicked structure is {area_mm2:.0f} mm2, a speck (under {SPECK_MM2:.0f} mm2)")
    if positives and area_mm2 >= SPECK_MM2 and not bounded and not edge_bounds(
            feature2d, mask2d, [(y, x) for x, y in positives], spacing_yx):
        reasons.append(f"slice {z}: the clicked result hardly stands out from the tissue around it (contrast "
                       f"{ring_contrast(feature2d, mask2d, spacing_yx):.2f}, under {CLICK_MIN_CONTRAST}) and fits no "
                       "outline the click's rays see: no edge bounds it, it may run on into a neighbour of the same "
                       "intensity")
    depth = ndimage.distance_transform_edt(np.pad(mask2d, 1), sampling=spacing_yx)[1:-1, 1:-1]
    labels, _ = ndimage.label(mask2d)
    for x, y, positive in clicks.points:
        if positive and not mask2d[y, x]:
            reasons.append(f"slice {z}: the positive click at (x={x}, y={y}) is outside the result")
        elif not positive and mask2d[y, x]:
            reasons.append(f"slice {z}: the negative click at (x={x}, y={y}) is inside the result")
        elif positive and area_mm2 >= SPECK_MM2:
            scale = click_scale_mm(feature2d, y, x, spacing_yx)
            piece_depth = float(depth[labels == labels[y, x]].max())
            if piece_depth < CLICK_MIN_DEPTH_FRACTION * scale:
                reasons.append(f"slice {z}: the result at the click (x={x}, y={y}) is {2 * piece_depth:.0f} mm across, "
                               f"the structure the click sits in about {2 * scale:.0f} mm")
            elif piece_depth > CLICK_MAX_DEPTH_RATIO * scale and depth[y, x] < CLICK_MIN_CENTRALITY * piece_depth:
                reasons.append(f"slice {z}: the result is {2 * piece_depth:.0f} mm across and the click (x={x}, y={y}) "
                               f"near its edge, the structure the click sits in about {2 * scale:.0f} mm: it runs on "
                               "into a neighbour")
    return reasons


def _shape_reasons(mask: np.ndarray, confidence: np.ndarray, prompt_slices: Sequence[int], dz: float) -> list[str]:
    reasons = []
    area = mask.sum(axis=(1, 2)).astype(np.float64)
    filled = np.flatnonzero(area)
    if filled.size == 0:
        return ["the result is empty"]
    largest, typical = float(area.max()), float(np.median(area[filled]))
    jumps = [int(z) for z in range(filled[0], filled[-1])
             if min(area[z], area[z + 1]) >= JUMP_MIN_SHARE * typical
             and max(area[z], area[z + 1]) > JUMP_FACTOR * min(area[z], area[z + 1])]
    if jumps:
        z = jumps[0]
        reasons.append(f"the area jumps between neighbouring slices ({', '.join(f'{j}-{j + 1}' for j in jumps)}; "
                       f"{area[z]:.0f} to {area[z + 1]:.0f} px at {z}-{z + 1}): a leak or a lost part")
    for z, name in ((0, "first"), (mask.shape[0] - 1, "last")):
        run_mm = dz * min(abs(z - p) for p in prompt_slices)
        if area[z] >= EDGE_MIN_SHARE * largest and run_mm > EDGE_RUN_MM:
            reasons.append(f"the structure runs {run_mm:.0f} mm from its prompts to the {name} slice of the volume "
                           f"({z}) at {100 * area[z] / largest:.0f} % of its largest cross-section")
    border = np.zeros(mask.shape[1:], dtype=bool)
    border[0, :] = border[-1, :] = border[:, 0] = border[:, -1] = True
    touching = [int(z) for z in filled if int((mask[z] & border).sum()) >= BORDER_MIN_PX]
    if touching:
        reasons.append(f"the result touches the image's border on slices {_ranges(touching)}")
    doubtful = [int(z) for z in filled if confidence[z] < CONFIDENCE_MIN]
    if doubtful:
        reasons.append(f"confidence below {CONFIDENCE_MIN} on slices {_ranges(doubtful)}")
    return reasons


def assess(image: np.ndarray, spacing_zyx: tuple[float, float, float], prompts: Sequence[Prompt],
           result: PropagationResult, modality: str = "") -> list[str]:
    """Reasons `result` looks implausible for these prompts (empty: nothing found wrong).

    `prompts` as `models.prompts.check_prompts` returns them; `image` (z, y, x) raw values.
    """
    mask = np.asarray(result.mask, dtype=bool)
    spacing_yx = (float(spacing_zyx[1]), float(spacing_zyx[2]))
    reasons: list[str] = []
    features = None
    bounded_slices = {p.slice_index for p in prompts if isinstance(p, (BoxPrompt, MaskPrompt))}
    for prompt in prompts:
        on_slice = mask[prompt.slice_index]
        if isinstance(prompt, BoxPrompt):
            features = features or slice_features(image, modality)
            reasons += _box_reasons(prompt, on_slice, features(prompt.slice_index))
            reasons += _alternative_reasons(prompt.slice_index, result.details.get("key_alternatives") or {})
        elif isinstance(prompt, MaskPrompt):
            drawn = np.asarray(prompt.mask, dtype=bool)
            score = 2.0 * float((drawn & on_slice).sum()) / max(float(drawn.sum() + on_slice.sum()), 1.0)
            if score < OUTLINE_MIN_DICE:
                reasons.append(f"slice {prompt.slice_index}: the result keeps Dice {score:.2f} of the outline drawn")
        else:
            features = features or slice_features(image, modality)
            reasons += _click_reasons(prompt, on_slice, features(prompt.slice_index), spacing_yx,
                                      bounded=prompt.slice_index in bounded_slices)
    # the backend's own per-slice confidence (models.propagate caps the result's at the structure's, judged below)
    backend = np.asarray(result.details.get("backend_confidence", result.confidence), dtype=float)
    reasons += _shape_reasons(mask, backend, [p.slice_index for p in prompts],
                              float(spacing_zyx[0]))
    if result.structure_confidence is not None and mask.any() and result.structure_confidence < STRUCTURE_CONFIDENCE_MIN:
        reasons.append(f"confidence {result.structure_confidence:.2f} for the whole structure (below "
                       f"{STRUCTURE_CONFIDENCE_MIN}: {_weakest(result)})")
    return reasons


def _weakest(result: PropagationResult) -> str:
    """What pulls the structure confidence down most (models/confidence.py signals), in words."""
    values = {k: v for k, v in (result.details.get("confidence_signals") or {}).items() if k in SIGNAL_NAMES}
    if not values:
        return "no signal recorded"
    name = min(values, key=lambda k: values[k])
    return f"weakest: {SIGNAL_NAMES.get(name, name)} {values[name]:.2f}"
