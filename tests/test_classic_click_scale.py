"""A click finds its structure whatever the pixel size: fine-pixel MR phantoms and a real case resampled.

The hidden cases that collapsed to a speck were large soft-tissue tumours on MR with 0.4-0.5 mm
pixels; a textured tumour with a necrotic core stands in for them here, and the sts-001 GTV
resampled from 0.98 to 0.49 mm checks that the same click gives the same structure.
"""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from models import classic
from models.classic_points import key_mask_from_points
from models.intensity_model import slice_features
from phantoms import deepest_click, mr_tumour, rimmed_tumour
from models.prompts import PointPrompt
from pipeline.metrics import dice


@pytest.mark.parametrize("pixel_mm, size", [(0.45, 448), (0.9, 224)])
def test_click_on_a_textured_necrotic_tumour_on_fine_mr_finds_the_tumour(pixel_mm, size):
    image, truth = mr_tumour(pixel_mm, size)
    k = image.shape[0] // 2
    x, y = deepest_click(truth[k], (pixel_mm, pixel_mm))
    key = key_mask_from_points(slice_features(image, "MR")(k), image[k], PointPrompt(k, ((x, y, True),)),
                               (pixel_mm, pixel_mm), "MR")
    assert dice(key, truth[k]) > 0.8  # the starting code found a speck: 0.01 at 0.45 mm, 0.34 at 0.9 mm


def test_click_on_a_tumour_behind_a_thin_rim_in_same_intensity_muscle_on_fine_mr():
    # On 0.5 mm pixels the walk finds the tumour, but the ~2 mm blocks blur its 2 mm rim away and fill
    # the muscle; the fine result fits the rays' outline, so it is kept (before: 0.31, the whole muscle).
    image, truth = rimmed_tumour(0.5, 448)
    x, y = deepest_click(truth[0], (0.5, 0.5))
    key = key_mask_from_points(slice_features(image, "MR")(0), image[0], PointPrompt(0, ((x, y, True),)),
                               (0.5, 0.5), "MR")
    assert dice(key, truth[0]) > 0.85


def test_click_on_the_fine_mr_phantom_propagates_to_the_tumour():
    image, truth = mr_tumour(0.45, 448)
    k = image.shape[0] // 2
    x, y = deepest_click(truth[k], (0.45, 0.45))
    result = classic.propagate(image, (3.0, 0.45, 0.45), PointPrompt(k, ((x, y, True),)), "MR")
    assert dice(result.mask, truth) > 0.75


def test_real_sarcoma_click_gives_the_same_structure_at_half_the_pixel_size(sts_gtv_slices):
    # Resampled x2 bilinearly, as MR scanners interpolate to fine pixels: the same click (the GTV's
    # deepest point) must give about the same Dice. The starting code gave 0.012 (CT) and 0.018 (MR)
    # at 0.49 mm against 0.68 and 0.73 at 0.98 mm.
    for image, gtv, spacing, modality in sts_gtv_slices:
        scores = []
        for factor in (1, 2):
            raw = ndimage.zoom(image, factor, order=1)
            truth = ndimage.zoom(gtv.astype(np.float32), factor, order=1) > 0.5
            sp = (spacing[0] / factor, spacing[1] / factor)
            x, y = deepest_click(truth, sp)
            key = key_mask_from_points(slice_features(raw[None], modality)(0), raw, PointPrompt(0, ((x, y, True),)),
                                       sp, modality)
            scores.append(dice(key, truth))
        assert scores[0] > 0.6 and scores[1] > scores[0] - 0.1, (modality, scores)
