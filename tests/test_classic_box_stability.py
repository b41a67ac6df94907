"""A box's key slice does not flip on a pixel of the box (issue 19, item 1).

Which pixels inside a tight box are the structure must not depend on where exactly its edges fell: the
same structure boxed one or two pixels wider or narrower gives the same key slice. The real failure: an
NSCLC GTV whose box one pixel wider outlined the aerated lung (Dice 0.01, no warning). The phantoms here
are a lobulated tumour wedged between chest wall and mediastinum of its own density, with aerated lung in
its box's other corners; a lesion darker than everything around it; and a lesion with a bright rim.
"""
from __future__ import annotations

import numpy as np
import pytest

from config.schema import PropagationConfig
from models import classic
from models.intensity_model import slice_features
from models.propagate import propagate
from phantoms import dark_lesion, lung_crescent, lung_tumour, one_pixel_boxes, rimmed_lesion
from pipeline.metrics import dice
from pipeline.prompts import prompt_from_roi

# Two of the wedged-tumour phantoms on which the starting code flipped: a box two pixels wider all round
# gave Dice 0.19 (the wall and lung), one a pixel narrower on the right 0.32.
WEDGED = {"wider": dict(seed=915, walls=((0.01, 2.43), (2.09, 7.89)), radii_mm=(14.32, 24.44), lobes=0.15),
          "narrower": dict(seed=136, walls=((0.83, 5.09), (3.14, 8.38)), radii_mm=(11.23, 23.9), lobes=0.22)}


def key_slices(image: np.ndarray, truth: np.ndarray, modality: str, spacing_yx=(0.98, 0.98)) -> list[float]:
    """Key-slice Dice from the tight box and each of `one_pixel_boxes` of it."""
    box = prompt_from_roi(truth, "box")
    features = slice_features(image, modality)(box.slice_index)
    return [dice(classic.key_mask_from_box(features, b, spacing_yx), truth[box.slice_index])
            for b in one_pixel_boxes(box)]


@pytest.mark.parametrize("case", sorted(WEDGED))
def test_tumour_against_wall_with_lung_in_its_box_s_corners_does_not_flip(case):
    image, truth = lung_tumour(**WEDGED[case])
    scores = key_slices(image, truth, "CT")
    assert scores[0] > 0.75
    assert min(scores) > 0.7, np.round(scores, 2)  # the starting code: 0.19 ("wider"), 0.32 ("narrower")


def test_wedged_tumour_propagates_from_every_nearby_box():
    # Through the volume, 9 slices: the starting code gave 0.27 from the box a pixel narrower on the right
    # (the wall followed instead of the tumour), 0.57-0.73 from the others.
    image, truth = lung_tumour(n_slices=9, **WEDGED["narrower"])
    box = prompt_from_roi(truth, "box")
    scores = [dice(propagate(image, (3.0, 0.98, 0.98), b, "CT", PropagationConfig(backend="classic")).mask, truth)
              for b in one_pixel_boxes(box)]
    assert min(scores) > 0.5, np.round(scores, 2)


def test_the_same_box_gives_the_same_key_slice_whatever_ran_before():
    # GrabCut seeds its colour models by k-means on OpenCV's global random state: before, the same box gave
    # another key slice after other GrabCut calls in the process (Dice 0.90 or 0.13 on such a phantom).
    image, truth = lung_tumour(**WEDGED["wider"])
    boxes = one_pixel_boxes(prompt_from_roi(truth, "box"))
    features = slice_features(image, "CT")(boxes[0].slice_index)
    first = [classic.key_mask_from_box(features, b, (0.98, 0.98)) for b in boxes]
    again = [classic.key_mask_from_box(features, b, (0.98, 0.98)) for b in reversed(boxes)][::-1]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))


@pytest.mark.parametrize("seed", [0, 1])
def test_structure_darker_than_its_surroundings_is_kept_from_every_nearby_box(seed):
    image, truth = dark_lesion(seed)
    assert min(key_slices(image, truth, "MR", (1.0, 1.0))) > 0.8


@pytest.mark.parametrize("seed", [0, 1])
def test_structure_with_a_bright_rim_is_rim_and_core_from_every_nearby_box(seed):
    image, truth = rimmed_lesion(seed)
    assert min(key_slices(image, truth, "CT", (1.0, 1.0))) > 0.8


# A lung crescent over a liver dome (the right lower lobe of totalseg-ct, whose box moved by 2 px gave the liver,
# Dice 0.00, with no warning): the box fits the dome as well as the crescent, and the key slice prefers what
# covers the box's centre. The box alone cannot tell which one was meant, so the result must say so.
CRESCENTS = [dict(lung_mm=4.0, seed=1), dict(lung_mm=5.0)]


@pytest.mark.parametrize("kind", range(len(CRESCENTS)))
def test_a_box_that_also_fits_a_more_distinct_structure_is_never_silently_the_other_one(kind):
    image, truth = lung_crescent(**CRESCENTS[kind])
    flipped = []
    for box in one_pixel_boxes(prompt_from_roi(truth, "box")):
        result = propagate(image, (3.0, 2.0, 2.0), box, "CT", PropagationConfig(backend="classic"))
        if dice(result.mask, truth) < 0.3:
            flipped.append(result.warnings)
    # the starting code: the box 2 px smaller all round gave the liver (Dice 0.00) with no warning at all
    assert all(any("the box also fits another structure" in w for w in warnings) for warnings in flipped), flipped


@pytest.mark.parametrize("make, modality, spacing_yx", [
    (lambda: lung_tumour(**WEDGED["wider"]), "CT", (0.98, 0.98)),
    (lambda: lung_tumour(**WEDGED["narrower"]), "CT", (0.98, 0.98)),
    (lambda: dark_lesion(0), "MR", (1.0, 1.0)),
    (lambda: rimmed_lesion(0), "CT", (1.0, 1.0)),
])
def test_a_box_around_one_structure_finds_no_other(make, modality, spacing_yx):
    # a tumour with lung in its box's corners, a lesion darker than its surroundings, one with a bright rim: what
    # else the box holds is their surroundings, which stand out less than they do (no false alarm)
    image, truth = make()
    settings = PropagationConfig(backend="classic")
    for box in one_pixel_boxes(prompt_from_roi(truth, "box")):
        features = slice_features(image, modality)(box.slice_index)
        key = classic.key_mask_from_box(features, box, spacing_yx)
        _, alternative = classic._key_stability(features, box, None, key, spacing_yx, settings)
        assert alternative is None, (box, alternative)
