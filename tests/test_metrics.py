"""pipeline.metrics on shapes whose answers are known analytically."""
from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.metrics import dice, evaluate_masks, max_distance_mm, relative_d98


def sphere(shape, centre_mm, radius_mm, spacing):
    """Voxels whose centre lies within radius_mm of centre_mm (all in mm, array axis order)."""
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    return sum((g - c) ** 2 for g, c in zip(grids, centre_mm)) <= radius_mm ** 2


def cube(shape, lo, side):
    m = np.zeros(shape, dtype=bool)
    m[tuple(slice(a, a + side) for a in lo)] = True
    return m


def test_dice_of_offset_cubes_follows_the_overlap_formula():
    a = cube((30, 30, 30), (5, 5, 5), 10)
    b = cube((30, 30, 30), (5, 5, 8), 10)  # shifted 3 voxels along x: overlap 10*10*7
    assert dice(a, b) == pytest.approx(2 * 700 / 2000)
    assert evaluate_masks(a, b, (1, 1, 1))["dice"] == pytest.approx(0.7)


def test_com_distance_is_exact_and_uses_spacing_in_array_order():
    a = cube((40, 40, 40), (5, 5, 5), 10)
    b = cube((40, 40, 40), (8, 9, 5), 10)  # shifted (3, 4, 0) voxels in (z, y, x)
    spacing = (2.5, 1.0, 0.5)
    got = evaluate_masks(a, b, spacing)["com_distance_mm"]
    assert got == pytest.approx(math.hypot(3 * 2.5, 4 * 1.0))
    # the reversed spacing (STARDUST's mistake) gives another answer: the order matters
    assert evaluate_masks(a, b, spacing[::-1])["com_distance_mm"] != pytest.approx(got)


def test_concentric_spheres_hd95_and_msd_equal_the_radius_gap_in_mm_with_anisotropic_spacing():
    spacing = (2.0, 0.8, 0.8)  # thick slices, fine pixels
    shape = (40, 100, 100)
    centre = (39.0, 39.6, 40.0)
    inner, outer = sphere(shape, centre, 20.0, spacing), sphere(shape, centre, 26.0, spacing)
    m = evaluate_masks(inner, outer, spacing)
    # every surface point of one sphere is 6 mm from the other; voxelisation adds < 1 voxel
    assert m["hd95_mm"] == pytest.approx(6.0, abs=1.5)
    assert m["msd_mm"] == pytest.approx(6.0, abs=1.0)
    assert m["nsd"] < 0.1  # 6 mm apart, 2 mm tolerance: almost no surface agrees
    assert m["volume_ratio"] == pytest.approx((20 / 26) ** 3, rel=0.05)
    # the same voxels read with isotropic 0.8 mm spacing are oblate spheroids: the gap is still
    # 6 mm in-plane but 2.4 mm along z (6 / 2 * 0.8), so the mean distance lies between the two
    iso = evaluate_masks(inner, outer, (0.8, 0.8, 0.8))
    assert 2.4 < iso["msd_mm"] < m["msd_mm"] - 0.5


def test_offset_spheres_hd95_is_95_percent_and_msd_half_of_the_offset():
    # Sphere B = sphere A moved by d: a surface point at polar angle t is ~d|cos t| from the other
    # surface, and |cos t| is uniform on [0, 1] over a sphere: P95 = 0.95 d, mean = 0.5 d.
    spacing = (1.0, 1.0, 1.0)
    shape = (70, 70, 80)
    d = 8.0
    a = sphere(shape, (35, 35, 35), 25.0, spacing)
    b = sphere(shape, (35, 35, 35 + d), 25.0, spacing)
    m = evaluate_masks(a, b, spacing)
    assert m["hd95_mm"] == pytest.approx(0.95 * d, abs=1.0)
    assert m["msd_mm"] == pytest.approx(0.5 * d, abs=0.7)
    assert m["com_distance_mm"] == pytest.approx(d, abs=1e-9)


def test_nsd_is_one_within_tolerance():
    spacing = (1.0, 1.0, 1.0)
    a = sphere((50, 50, 50), (25, 25, 25), 15.0, spacing)
    b = sphere((50, 50, 50), (25, 25, 25), 16.0, spacing)
    assert evaluate_masks(a, b, spacing)["nsd"] == pytest.approx(1.0)
    assert evaluate_masks(a, b, spacing, nsd_tolerance_mm=0.5)["nsd"] < 0.9


def test_empty_masks_give_documented_values():
    shape, spacing = (10, 20, 30), (3.0, 1.0, 1.0)
    empty = np.zeros(shape, dtype=bool)
    full = cube(shape, (2, 2, 2), 5)
    both = evaluate_masks(empty, empty, spacing)
    assert (both["dice"], both["nsd"], both["hd95_mm"], both["msd_mm"], both["com_distance_mm"], both["volume_ratio"]) \
        == (1.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    penalty = max_distance_mm(shape, spacing)
    assert penalty == pytest.approx(math.sqrt(30 ** 2 + 20 ** 2 + 30 ** 2))
    no_pred = evaluate_masks(empty, full, spacing)
    assert no_pred["dice"] == 0.0 and no_pred["nsd"] == 0.0 and no_pred["volume_ratio"] == 0.0
    assert no_pred["hd95_mm"] == no_pred["msd_mm"] == no_pred["com_distance_mm"] == pytest.approx(penalty)
    no_gt = evaluate_masks(full, empty, spacing)
    assert no_gt["dice"] == 0.0 and no_gt["volume_ratio"] is None and no_gt["gt_empty"]


def test_shape_and_spacing_mismatches_are_errors():
    with pytest.raises(ValueError, match="shape"):
        evaluate_masks(np.zeros((2, 3, 4)), np.zeros((2, 3, 5)), (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        evaluate_masks(np.zeros((2, 3, 4)), np.zeros((2, 3, 4)), (1, 1))


def test_identical_masks_are_perfect():
    a = sphere((20, 30, 30), (10, 15, 15), 7.0, (1, 1, 1))
    m = evaluate_masks(a, a, (2.0, 1.0, 1.0))
    assert (m["dice"], m["hd95_mm"], m["msd_mm"], m["nsd"], m["com_distance_mm"]) == (1.0, 0.0, 0.0, 1.0, 0.0)


def _cine(n_frames=6, shape=(80, 80), radius=8.0, motion_px=None, pred_offset_px=(0.0, 0.0)):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    gt, pred = [], []
    for t in range(n_frames):
        cy, cx = 40.0 + (motion_px[t] if motion_px is not None else 0.0), 40.0
        gt.append((yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2)
        pred.append((yy - cy - pred_offset_px[0]) ** 2 + (xx - cx - pred_offset_px[1]) ** 2 <= radius ** 2)
    return np.array(pred), np.array(gt)


def test_relative_d98_is_one_for_perfect_tracking_and_drops_with_error():
    pred, gt = _cine(motion_px=[0, 3, 6, 3, 0, -3])
    assert relative_d98(gt, gt) == pytest.approx(1.0)
    # the 3 px margin + 0.25 threshold of the blur leave a plateau: a 1 px error costs nothing
    small = relative_d98(*_cine(motion_px=[0, 3, 6, 3, 0, -3], pred_offset_px=(1.0, 0.0)))
    large = relative_d98(*_cine(motion_px=[0, 3, 6, 3, 0, -3], pred_offset_px=(8.0, 0.0)))
    assert small == pytest.approx(1.0, abs=0.02)
    assert large < 0.8
    # the same 8 px error is only 4 mm on 0.5 mm pixels where the margin is 6 px: milder
    assert relative_d98(*_cine(pred_offset_px=(8.0, 0.0)), spacing_yx=(0.5, 0.5)) > large


def test_relative_d98_counts_lost_frames_as_no_dose():
    pred, gt = _cine()
    pred[1::2] = False  # target lost on half of the frames
    assert relative_d98(pred, gt) == pytest.approx(0.5, abs=0.05)
