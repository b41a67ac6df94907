"""Classic propagator with prompts on several slices and corrective clicks: phantoms with known truth."""
from __future__ import annotations

import numpy as np

from models import classic
from models.prompts import BoxPrompt, MaskPrompt, PointPrompt
from pipeline.metrics import dice
from pipeline.prompts import box_from_slice
from phantoms import extent, phantom

SPACING = (3.0, 1.0, 1.0)


def disc_stack(shape: tuple[int, int, int], radii: dict[int, float], centre: tuple[float, float]) -> np.ndarray:
    """A stack of discs: radius radii[z] (pixels) on slice z, nothing on the others."""
    yy, xx = np.mgrid[:shape[1], :shape[2]]
    truth = np.zeros(shape, dtype=bool)
    for z, r in radii.items():
        truth[z] = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= r ** 2
    return truth


def test_boxes_on_three_slices_are_each_honoured_on_their_own_slice():
    # An ellipsoid whose cross-section moves: each box must give the structure on its own slice.
    zz, yy, xx = np.mgrid[:30, :80, :96]
    truth = ((zz - 15) / 12.0) ** 2 + ((yy - 40) / 16.0) ** 2 + ((xx - 30 - 1.2 * zz) / 16.0) ** 2 <= 1
    image = phantom(truth, seed=11)
    boxes = [box_from_slice(truth[z], z) for z in (8, 15, 22)]
    result = classic.propagate(image, SPACING, boxes, "CT")
    for box in boxes:
        z = box.slice_index
        inside = np.zeros(truth.shape[1:], dtype=bool)
        inside[box.y0:box.y1 + 1, box.x0:box.x1 + 1] = True
        assert not (result.mask[z] & ~inside).any(), z  # the result on a boxed slice stays in its box
        assert dice(result.mask[z], truth[z]) > 0.85, z
        assert result.confidence[z] > 0.9  # a boxed slice is as sure as it is stable when the box moves a pixel
    assert result.details["prompt_slices"] == [8, 15, 22]
    assert dice(result.mask, truth) > 0.85


def test_slices_between_two_outlines_are_bounded_by_both():
    # A cone with no edge at all to its surroundings (same intensity: only the prompts say where it
    # is): radius 6 px on slice 5 growing to 20 px on slice 25. From one outline, propagation can only
    # copy or lose it; from outlines at both ends, the slices between lie between the two.
    radii = {z: 6.0 + 14.0 * (z - 5) / 20 for z in range(5, 26)}
    truth = disc_stack((30, 64, 64), radii, (32, 32))
    image = phantom(np.zeros_like(truth), seed=12)  # iso-intense: noise only
    result = classic.propagate(image, SPACING, [MaskPrompt(5, truth[5]), MaskPrompt(25, truth[25])], "CT")
    assert np.array_equal(result.mask[5], truth[5]) and np.array_equal(result.mask[25], truth[25])
    between = slice(6, 25)
    assert dice(result.mask[between], truth[between]) > 0.9
    for z in range(6, 25):  # every slice between is bounded by the two prompts
        assert truth[5].sum() * 0.8 <= result.mask[z].sum() <= truth[25].sum() * 1.2, z
    one = classic.propagate(image, SPACING, MaskPrompt(5, truth[5]), "CT")
    assert dice(one.mask[between], truth[between]) < dice(result.mask[between], truth[between]) - 0.2


def test_beyond_the_outermost_prompts_propagation_runs_outward():
    truth = disc_stack((40, 64, 64), {z: 12.0 for z in range(6, 34)}, (32, 30))
    image = phantom(truth, seed=13)
    result = classic.propagate(image, SPACING, [box_from_slice(truth[z], z) for z in (15, 22)], "CT")
    lo, hi = extent(result.mask)
    assert abs(lo - 6) <= 1 and abs(hi - 33) <= 1, (lo, hi)
    assert dice(result.mask, truth) > 0.9


def leaking_phantom() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A cylinder on slices 4..17 overlapping, from slice 12 on, a same-intensity neighbour that runs on
    to slice 35: propagation from the cylinder follows the neighbour past the cylinder's end."""
    yy, xx = np.mgrid[:64, :96]
    structure = np.zeros((36, 64, 96), dtype=bool)
    structure[4:18] = ((yy - 32) ** 2 + (xx - 30) ** 2 <= 12 ** 2)[None]
    neighbour = np.zeros_like(structure)
    neighbour[12:36] = ((yy - 32) ** 2 + (xx - 50) ** 2 <= 12 ** 2)[None]
    return structure, neighbour & ~structure, phantom(structure | neighbour, seed=14)


def test_negative_click_on_a_leak_removes_it_and_stops_the_propagation_there():
    truth, neighbour, image = leaking_phantom()
    box = box_from_slice(truth[10], 10)
    first = classic.propagate(image, SPACING, box, "CT")
    assert first.mask[24:].sum() > 0.5 * neighbour[24:].sum()  # the phantom does leak past the end (slice 17)
    click = PointPrompt(24, ((50, 32, False),))  # on the leak, beyond the structure's end
    corrected = classic.propagate(image, SPACING, [box, click], "CT")
    assert not corrected.mask[25:].any()  # nothing beyond the clicked slice
    assert corrected.mask[24].sum() < 0.1 * first.mask[24].sum()  # on it, at most a rim beyond the click's reach
    [record] = corrected.details["corrections"]
    assert record["slice"] == 24 and record["applied"] == "changed"
    assert dice(corrected.mask, truth) > dice(first.mask, truth) + 0.1
    right = slice(4, 18)  # where the first result was right, it still is
    assert dice(corrected.mask[right], truth[right]) >= dice(first.mask[right], truth[right]) - 0.02


def test_positive_click_in_a_miss_adds_the_missed_part():
    # A structure whose lower half (slices 16..29) is darker (-20 HU, between its 60 HU and the fat's
    # -80): propagation from a box on the upper half stops at the change. A click on the missed half
    # brings it in; the upper half stays.
    truth = disc_stack((34, 64, 64), {z: 12.0 for z in range(4, 30)}, (32, 32))
    image = phantom(truth, seed=15)
    image[16:30][truth[16:30]] -= 80.0
    box = box_from_slice(truth[10], 10)
    first = classic.propagate(image, SPACING, box, "CT")
    assert extent(first.mask)[1] < 20  # the phantom really stops it
    click = PointPrompt(24, ((32, 32, True),))
    corrected = classic.propagate(image, SPACING, [box, click], "CT")
    lower, upper = slice(16, 30), slice(4, 16)
    assert dice(corrected.mask[lower], truth[lower]) > 0.85
    assert dice(corrected.mask[upper], truth[upper]) >= dice(first.mask[upper], truth[upper]) - 0.02
    assert dice(corrected.mask, truth) > dice(first.mask, truth) + 0.2


def test_positive_click_on_a_partly_found_slice_keeps_what_was_found():
    # Two pieces of one structure separated by a 4 px gap: piece A on slices 4..25, piece B on 14..25.
    # A box around A on slice 8 follows A only; a click in B on slice 20 adds B there and on its
    # neighbours, and A is kept on the clicked slice.
    yy, xx = np.mgrid[:64, :96]
    a = (yy - 32) ** 2 + (xx - 28) ** 2 <= 11 ** 2
    b = (yy - 32) ** 2 + (xx - 53) ** 2 <= 10 ** 2  # 4 px of fat between the two pieces
    truth = np.zeros((30, 64, 96), dtype=bool)
    truth[4:26] = a[None]
    truth[14:26] |= b[None]
    image = phantom(truth, seed=16)
    box = box_from_slice(truth[8], 8)
    first = classic.propagate(image, SPACING, box, "CT")
    assert (first.mask[20] & b).sum() < 0.1 * b.sum()
    corrected = classic.propagate(image, SPACING, [box, PointPrompt(20, ((53, 32, True),))], "CT")
    assert dice(corrected.mask[20], truth[20]) > 0.85  # both pieces on the clicked slice
    assert [(c["slice"], c["applied"]) for c in corrected.details["corrections"]] == [(20, "changed")]
    for z in (16, 24):
        assert (corrected.mask[z] & b).sum() > 0.7 * b.sum(), z
    assert dice(corrected.mask, truth) > dice(first.mask, truth) + 0.1


def test_same_prompts_give_the_same_result_in_any_order():
    truth, _, image = leaking_phantom()
    prompts = [box_from_slice(truth[10], 10), PointPrompt(22, ((52, 32, False),)), PointPrompt(6, ((30, 32, True),))]
    one = classic.propagate(image, SPACING, prompts, "CT")
    two = classic.propagate(image, SPACING, prompts[::-1], "CT")
    assert np.array_equal(one.mask, two.mask)
    assert np.array_equal(one.confidence, two.confidence)


def test_clicks_on_several_slices_each_find_the_structure():
    truth = disc_stack((36, 64, 64), {z: 6.0 + 0.4 * z for z in range(3, 33)}, (30, 34))
    image = phantom(truth, seed=17)
    clicks = [PointPrompt(z, ((34, 30, True),)) for z in (8, 18, 28)]
    result = classic.propagate(image, SPACING, clicks, "CT")
    for z in (8, 18, 28):
        assert dice(result.mask[z], truth[z]) > 0.8, z
    assert dice(result.mask, truth) > 0.85


def test_box_with_a_negative_click_cuts_the_neighbour_inside_the_box():
    # A loose box holds the structure and a same-intensity neighbour pressed against it (no edge
    # between them): the box alone takes both; a negative click on the neighbour splits it off.
    yy, xx = np.mgrid[:64, :96]
    truth = np.zeros((30, 64, 96), dtype=bool)
    truth[4:26] = ((yy - 32) ** 2 + (xx - 30) ** 2 <= 12 ** 2)[None]
    neighbour = np.zeros_like(truth)
    neighbour[4:26] = ((yy - 32) ** 2 + (xx - 52) ** 2 <= 11 ** 2)[None]
    neighbour &= ~truth
    image = phantom(truth | neighbour, seed=18)
    box = BoxPrompt(14, 18, 20, 63, 44)
    plain = classic.propagate(image, SPACING, box, "CT")
    assert (plain.mask[14] & neighbour[14]).sum() > 0.5 * neighbour[14].sum()
    with_click = classic.propagate(image, SPACING, [box, PointPrompt(14, ((54, 32, False),))], "CT")
    assert (with_click.mask[14] & neighbour[14]).sum() < 0.1 * neighbour[14].sum()
    assert dice(with_click.mask[14], truth[14]) > 0.9
    assert dice(with_click.mask, truth) > dice(plain.mask, truth) + 0.1
