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
from models.prompts import PointPrompt
from pipeline.metrics import dice


def mr_tumour(pixel_mm: float, size: int, texture: float = 30.0, seed: int = 0,
              n_slices: int = 9) -> tuple[np.ndarray, np.ndarray]:
    """T1-like thigh on 3 mm slices: fat (800) around muscle (380) and a 60 x 44 mm tumour (500, texture of
    SD `texture` with a ~1.5 mm grain) holding a dark necrotic core (200, 22 x 16 mm, off-centre);
    noise SD 20 per pixel. Returns (image zyx, tumour mask zyx, core included)."""
    rng = np.random.default_rng(seed)
    c = (size - 1) / 2.0
    z, y, x = np.meshgrid((np.arange(n_slices) - (n_slices - 1) / 2) * 3.0, (np.arange(size) - c) * pixel_mm,
                          (np.arange(size) - c) * pixel_mm, indexing="ij")
    tumour = (z / 40.0) ** 2 + (y / 22.0) ** 2 + ((x - 10) / 30.0) ** 2 <= 1
    core = tumour & ((z / 20.0) ** 2 + ((y - 8) / 8.0) ** 2 + ((x + 8) / 11.0) ** 2 <= 1)
    image = np.zeros(z.shape, np.float32)
    image[(y / 90.0) ** 2 + (x / 95.0) ** 2 <= 1] = 800.0
    image[(y / 75.0) ** 2 + (x / 80.0) ** 2 <= 1] = 380.0
    grain = np.stack([ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), 1.5 / pixel_mm) for _ in range(n_slices)])
    grain /= grain.std()
    image[tumour] = 500.0 + texture * grain[tumour]
    image[core] = 200.0 + 0.5 * texture * grain[core]
    image += rng.normal(0, 20.0, image.shape).astype(np.float32)
    return np.clip(image, 0, None), tumour


def deepest_click(mask2d: np.ndarray, spacing_yx: tuple[float, float]) -> tuple[int, int]:
    depth = ndimage.distance_transform_edt(np.pad(mask2d, 1), sampling=spacing_yx)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return int(x), int(y)


@pytest.mark.parametrize("pixel_mm, size", [(0.45, 448), (0.9, 224)])
def test_click_on_a_textured_necrotic_tumour_on_fine_mr_finds_the_tumour(pixel_mm, size):
    image, truth = mr_tumour(pixel_mm, size)
    k = image.shape[0] // 2
    x, y = deepest_click(truth[k], (pixel_mm, pixel_mm))
    key = key_mask_from_points(slice_features(image, "MR")(k), image[k], PointPrompt(k, ((x, y, True),)),
                               (pixel_mm, pixel_mm), "MR")
    assert dice(key, truth[k]) > 0.8  # the starting code found a speck: 0.01 at 0.45 mm, 0.34 at 0.9 mm


def test_click_on_the_fine_mr_phantom_propagates_to_the_tumour():
    image, truth = mr_tumour(0.45, 448)
    k = image.shape[0] // 2
    x, y = deepest_click(truth[k], (0.45, 0.45))
    result = classic.propagate(image, (3.0, 0.45, 0.45), PointPrompt(k, ((x, y, True),)), "MR")
    assert dice(result.mask, truth) > 0.75


@pytest.fixture(scope="module")
def sts_gtv_slices(shared_data):
    """The middle GTV slice of sts-001 on CT and MR (image, mask, spacing_yx, modality)."""
    from converters.rtstruct_read import read_rtstruct
    from converters.series import read_series

    out = []
    for folder, modality in (("CT", "CT"), ("MR_T1", "MR")):
        volume = read_series(shared_data / "sts-001" / folder / "image")
        rtstruct = next((shared_data / "sts-001" / folder / "rtstruct").glob("*.dcm"))
        gtv = np.asarray(read_rtstruct(rtstruct, volume).rois[0].mask, dtype=bool)
        slices = np.flatnonzero(gtv.any(axis=(1, 2)))
        k = int(slices[len(slices) // 2])
        out.append((volume.array[k].astype(np.float32), gtv[k], tuple(volume.geometry.spacing_zyx[1:]), modality))
    return out


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
