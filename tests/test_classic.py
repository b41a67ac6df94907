"""The weight-free classic propagator: synthetic phantoms with known truth, bad prompts, one real case set."""
from __future__ import annotations

import numpy as np
import pytest

from config.schema import PropagationConfig
from models import classic
from models.intensity_model import histogram, slice_features
from models.prompts import BoxPrompt, MaskPrompt, PointPrompt, PromptError
from pipeline.metrics import dice
from phantoms import ellipsoid, extent, phantom
from pipeline.prompts import prompt_from_roi

SETTINGS = {m: PropagationConfig(backend="classic", classic={"method": m}) for m in ("register_refine", "intensity")}


@pytest.mark.parametrize("method", ["register_refine", "intensity"])
def test_ellipsoid_in_noise_is_found_with_its_extent(method):
    spacing = (2.5, 1.0, 1.0)
    truth = ellipsoid(spacing=spacing)  # ends inside the volume at both ends (slices 7..33)
    image = phantom(truth)
    result = classic.propagate(image, spacing, prompt_from_roi(truth, "box"), "CT", SETTINGS[method])
    assert result.mask.shape == truth.shape and result.mask.dtype == bool
    assert dice(result.mask, truth) > 0.85
    lo, hi = extent(truth)
    plo, phi = extent(result.mask)
    assert abs(plo - lo) <= 1 and abs(phi - hi) <= 1, (plo, phi, lo, hi)
    # no confidence where there is no mask, high confidence in the middle
    assert np.all(result.confidence[~result.mask.any(axis=(1, 2))] == 0)
    assert result.confidence[20] > 0.5
    assert set(result.details["stop"]) == {"increasing_z", "decreasing_z"}
    assert result.backend == "classic"


def test_structure_ending_inside_the_volume_stops_near_its_end():
    # A cylinder on slices 5..24 of 40: beyond it there is only fat, so both directions must stop.
    shape = (40, 64, 64)
    yy, xx = np.mgrid[:64, :64]
    truth = np.zeros(shape, dtype=bool)
    truth[5:25] = ((yy - 32) ** 2 + (xx - 30) ** 2 <= 12 ** 2)[None]
    image = phantom(truth, seed=1)
    result = classic.propagate(image, (3.0, 1.0, 1.0), BoxPrompt(15, 18, 20, 42, 44), "CT")
    plo, phi = extent(result.mask)
    assert abs(plo - 5) <= 1 and abs(phi - 24) <= 1, (plo, phi)
    assert dice(result.mask, truth) > 0.9
    stops = result.details["stop"]
    assert stops["increasing_z"]["reason"] != "edge_of_volume"
    assert stops["decreasing_z"]["reason"] != "edge_of_volume"


def test_max_extent_mm_limits_the_propagation():
    truth = np.zeros((40, 64, 64), dtype=bool)
    yy, xx = np.mgrid[:64, :64]
    truth[:] = ((yy - 32) ** 2 + (xx - 32) ** 2 <= 10 ** 2)[None]
    image = phantom(truth, seed=2)
    settings = PropagationConfig(backend="classic", max_extent_mm=15.0)  # 5 slices of 3 mm each way
    result = classic.propagate(image, (3.0, 1.0, 1.0), BoxPrompt(20, 22, 22, 42, 42), "CT", settings)
    assert extent(result.mask) == (15, 25)
    assert result.details["stop"]["increasing_z"]["reason"] == "max_extent_mm"


@pytest.mark.parametrize("method", ["register_refine", "intensity"])
def test_cylinder_moving_between_slices_is_tracked(method):
    # Centre moves 1.5 px per slice (45 px over 30 slices): copying the key slice would lose it.
    shape = (31, 80, 110)
    yy, xx = np.mgrid[:80, :110]
    truth = np.zeros(shape, dtype=bool)
    for z in range(shape[0]):
        truth[z] = (yy - 40) ** 2 + (xx - (32 + 1.5 * z)) ** 2 <= 11 ** 2
    image = phantom(truth, seed=3)
    result = classic.propagate(image, (2.0, 1.0, 1.0), prompt_from_roi(truth, "box"), "CT", SETTINGS[method])
    copied = np.repeat(truth[15][None], shape[0], axis=0)
    assert dice(copied, truth) < 0.5  # the phantom really demands tracking
    assert dice(result.mask, truth) > 0.85
    assert dice(result.mask[0], truth[0]) > 0.7 and dice(result.mask[-1], truth[-1]) > 0.7


def test_one_step_reports_each_stage_and_ends_on_the_moved_structure():
    # A disc moving 6 px between two slices: the copy misses half of it, the patch shift recentres it,
    # and the step's result (what the chain keeps) is the last stage reported to bench/propagation_step.py.
    yy, xx = np.mgrid[:64, :96]
    truth = np.stack([(yy - 32) ** 2 + (xx - 40 - 6 * z) ** 2 <= 8 ** 2 for z in range(2)])
    image = phantom(truth, seed=5)
    features = slice_features(image, "CT")
    chain = classic._Chain(features, 2, 2.0, (1.0, 1.0), PropagationConfig(backend="classic"))
    fg, bg = histogram(features(0)[truth[0]]), histogram(features(0)[~truth[0]])
    stages: dict[str, np.ndarray] = {}
    mask, confidence = chain.step(truth[0], 1, 1, fg, bg, stages)
    assert list(stages) == ["shifted", "registered", "refined", "opened"]
    assert dice(truth[0], truth[1]) < 0.7
    assert dice(stages["shifted"], truth[1]) > 0.9
    assert np.array_equal(stages["opened"], mask) and dice(mask, truth[1]) > 0.9
    assert 0.5 < confidence <= 1.0


def test_small_structure_moving_further_than_its_width_is_followed():
    # A 7 px rod (bone in muscle) crossing the slices obliquely: its cross-section moves 7 px per
    # slice, so it does not overlap itself between neighbours (a rib seen on 3 mm axial slices).
    # Demons alone lose it after one slice; the patch match finds the move first.
    shape = (15, 64, 128)
    yy, xx = np.mgrid[:64, :128]
    truth = np.stack([(yy - 32) ** 2 + (xx - 64 - 7 * (z - 7)) ** 2 <= 3 ** 2 for z in range(shape[0])])
    image = phantom(truth, inside_hu=400.0, outside_hu=40.0, seed=3)
    result = classic.propagate(image, (3.0, 1.0, 1.0), MaskPrompt(7, truth[7]), "CT")
    assert extent(result.mask) == (0, 14)
    assert dice(result.mask, truth) > 0.85
    for z in (0, 14):  # the far ends are where drift would show
        assert dice(result.mask[z], truth[z]) > 0.6, z


def test_same_intensity_neighbour_behind_a_thin_bridge_stays_out():
    # An ellipsoid next to a same-intensity blob, joined on every slice by a 3 px bridge: the
    # per-slice opening (a tenth of the cross-section's diameter) cuts the bridge, so the
    # propagation does not creep into the neighbour slice after slice.
    zz, yy, xx = np.mgrid[:30, :96, :96]
    truth = ((zz - 15) * 3.0 / 40) ** 2 + ((yy - 48) / 18.0) ** 2 + ((xx - 34) / 18.0) ** 2 <= 1
    neighbour = ((yy - 48) / 16.0) ** 2 + ((xx - 72) / 12.0) ** 2 <= 1
    bridge = (np.abs(yy - 48) <= 1) & (xx >= 34) & (xx <= 72)
    image = phantom(truth | ((neighbour | bridge) & ~truth), seed=4)
    result = classic.propagate(image, (3.0, 1.0, 1.0), MaskPrompt(15, truth[15]), "CT")
    assert dice(result.mask, truth) > 0.9
    assert (result.mask & neighbour).sum() < 0.02 * neighbour.sum()


def test_unknown_modality_uses_percentiles_not_hu():
    # MR-like: positive arbitrary units, structure darker than its surroundings.
    truth = ellipsoid()
    rng = np.random.default_rng(4)
    image = np.where(truth, 300.0, 800.0) + rng.normal(0, 40, truth.shape)
    result = classic.propagate(image.astype(np.float32), (2.5, 1.0, 1.0), prompt_from_roi(truth, "box"), "")
    assert dice(result.mask, truth) > 0.85


def test_mask_prompt_is_used_as_drawn_on_its_slice():
    truth = ellipsoid()
    image = phantom(truth, seed=5)
    drawn = truth[20].copy()
    drawn[:, :48] = False  # the planner drew only half: the key slice must keep exactly that
    result = classic.propagate(image, (2.5, 1.0, 1.0), MaskPrompt(20, drawn), "CT")
    assert np.array_equal(result.mask[20], drawn)
    assert result.confidence[20] == 1.0


def test_point_prompt_segments_the_structure():
    truth = ellipsoid()
    image = phantom(truth, seed=6)
    result = classic.propagate(image, (2.5, 1.0, 1.0), PointPrompt(20, ((48, 48, True),)), "CT")
    assert dice(result.mask[20], truth[20]) > 0.85
    assert dice(result.mask, truth) > 0.8


# ------------------------------------------------------------------ bad prompts
@pytest.fixture
def ct():
    truth = ellipsoid()
    image = phantom(truth, seed=7)
    image[:, :, :10] = -1000.0  # a strip of air at the left
    return image


@pytest.mark.parametrize("prompt, message", [
    (BoxPrompt(20, 80, 40, 120, 60), "outside"),
    (BoxPrompt(20, -5, 40, 20, 60), "outside"),
    (BoxPrompt(20, 30, 40, 29, 60), "inverted"),  # x1 < x0
    (BoxPrompt(20, 30, 40, 50, 39), "inverted"),  # y1 < y0
    (BoxPrompt(40, 30, 40, 50, 60), "slices 0..39"),
    (BoxPrompt(-1, 30, 40, 50, 60), "slices 0..39"),
    (PointPrompt(20, ((3, 48, True),)), "on air"),
    (PointPrompt(20, ((48, 48, False),)), "no positive point"),
    (PointPrompt(20, ((200, 48, True),)), "outside"),
    (MaskPrompt(45, np.ones((96, 96), dtype=bool)), "slices 0..39"),
    (MaskPrompt(20, np.zeros((96, 96), dtype=bool)), "empty"),
    (MaskPrompt(20, np.ones((50, 96), dtype=bool)), "shape"),
])
def test_bad_prompts_raise_prompt_error(ct, prompt, message):
    with pytest.raises(PromptError, match=message):
        classic.propagate(ct, (2.5, 1.0, 1.0), prompt, "CT")


@pytest.mark.parametrize("key_slice", ["tight_select", "histogram"])
def test_one_pixel_wide_box_is_accepted(key_slice):
    # box_from_slice gives inclusive indices: a 1-pixel-wide structure has x0 == x1, a 1-pixel box
    truth = np.zeros((20, 64, 64), dtype=bool)
    truth[5:15, 20:40, 32] = True
    image = phantom(truth, inside_hu=400.0, seed=8)  # a thin bright (contrast-filled) line
    prompt = prompt_from_roi(truth, "box")
    assert prompt.x0 == prompt.x1
    settings = PropagationConfig(backend="classic", classic={"key_slice": key_slice})
    result = classic.propagate(image, (3.0, 1.0, 1.0), prompt, "CT", settings)
    assert result.mask[prompt.slice_index].any()
    assert dice(result.mask[prompt.slice_index], truth[prompt.slice_index]) > 0.5


def test_key_slice_reaches_every_row_and_column_of_a_tight_box():
    # A crescent (lung-like, dark) wrapped around a bright blob: the blob fills the box's centre, so
    # a centre-weighted intensity model takes the blob; only the crescent reaches every row and column.
    yy, xx = np.mgrid[:96, :96]
    outer = (yy - 56) ** 2 + (xx - 48) ** 2 <= 30 ** 2
    inner = (yy - 62) ** 2 + (xx - 48) ** 2 <= 26 ** 2
    crescent = outer & ~inner & (yy <= 62)
    truth = np.repeat(crescent[None], 9, axis=0)
    rng = np.random.default_rng(9)
    image = np.full(truth.shape, 40.0, np.float32)  # soft tissue everywhere ...
    image[truth] = -800.0  # ... the crescent is lung
    image += rng.normal(0.0, 15.0, truth.shape).astype(np.float32)
    prompt = prompt_from_roi(truth, "box")
    tight = classic.propagate(image, (3.0, 1.0, 1.0), prompt, "CT")
    assert dice(tight.mask[4], truth[4]) > 0.95  # the histogram model alone gets ~0.88 here (it takes blob rim)
    sub = tight.mask[4][prompt.y0:prompt.y1 + 1, prompt.x0:prompt.x1 + 1]
    assert sub.any(axis=1).all() and sub.any(axis=0).all()


def test_structure_as_dense_as_its_neighbours_is_cut_to_the_box_s_ellipse():
    # A round tumour inside muscle of the same density: nothing inside the tight box marks a boundary,
    # every candidate fills the box; its corners are then background (a filled box scores ~0.88 here).
    yy, xx = np.mgrid[:96, :96]
    disc = (yy - 48) ** 2 + (xx - 48) ** 2 <= 20 ** 2
    truth = np.repeat(disc[None], 9, axis=0)
    muscle = np.zeros_like(truth)
    muscle[:, 16:80, 12:84] = True
    rng = np.random.default_rng(10)
    image = np.full(truth.shape, -100.0, np.float32)  # fat around ...
    image[muscle] = 50.0  # ... a muscle block holding the tumour at the same density
    image += rng.normal(0.0, 10.0, truth.shape).astype(np.float32)
    prompt = prompt_from_roi(truth, "box")
    key = classic.key_mask_from_box(slice_features(image, "CT")(4), prompt)
    assert dice(key, truth[4]) > 0.95


def test_point_on_tissue_next_to_air_is_accepted(ct):
    # the air check must look at the click, not reject everything in an image that has air
    result = classic.propagate(ct, (2.5, 1.0, 1.0), PointPrompt(20, ((48, 48, True),)), "CT")
    assert result.mask.any()


# ------------------------------------------------------------------ real data
@pytest.fixture(scope="module")
def ct_3mm(shared_data):
    SimpleITK = pytest.importorskip("SimpleITK")
    folder = shared_data / "totalseg-ct"
    image = SimpleITK.ReadImage(str(folder / "ct_3mm.nii.gz"))
    array = SimpleITK.GetArrayFromImage(image).astype(np.float32)
    labels = SimpleITK.GetArrayFromImage(SimpleITK.ReadImage(str(folder / "ct_3mm_labels.nii.gz")))
    spacing = tuple(float(s) for s in reversed(image.GetSpacing()))
    organs = [v for v in np.unique(labels)[1:] if (labels == v).any(axis=(1, 2)).sum() >= 5]  # as bench/quality.py
    return array, labels, spacing, organs


def test_real_ct_key_slice_from_a_tight_box(ct_3mm):
    # Key-slice Dice caps everything after it. All 39 organs of ct_3mm spanning >= 5 slices, box =
    # tight bounding box of the reference on its middle slice. Measured: tight_select 0.805,
    # histogram 0.732 (lung lobe 14: 0.85 vs 0.00; liver 0.61 both; costal cartilage ~0 both).
    array, labels, spacing, organs = ct_3mm
    features = slice_features(array, "CT")
    scores = {m: [] for m in ("tight_select", "histogram")}
    for value in organs:
        truth = labels == value
        prompt = prompt_from_roi(truth, "box")
        for method, values in scores.items():
            key = classic.key_mask_from_box(features(prompt.slice_index), prompt, spacing[1:], method)
            values.append(dice(key, truth[prompt.slice_index]))
    assert np.mean(scores["tight_select"]) >= 0.78, np.round(scores["tight_select"], 2)
    assert np.mean(scores["tight_select"]) >= np.mean(scores["histogram"]) + 0.04


# Subset: the solid organs of ct_3mm that lie in fat (spleen, both kidneys) and the two autochthon
# muscles: the regime the classic method is built for (a structure with its own intensity and a
# boundary it can see). It is a regression guard, NOT the acceptance target: on all 39 organs the
# method scores ~0.62 (see bench/quality.py and the all-organs test below), below 0.75; the guard
# fails if propagation, stop rules or the key-slice model degrade. Runs in ~5 s.
REAL_SUBSET = (1, 2, 3, 86, 87)


def _box_prompt_scores(array, labels, spacing, values) -> tuple[list[float], list[float]]:
    """Dice of classic from a middle-slice box, and of copying that slice everywhere, per label."""
    scores, baseline = [], []
    for value in values:
        truth = labels == value
        prompt = prompt_from_roi(truth, "box")
        scores.append(dice(classic.propagate(array, spacing, prompt, "CT").mask, truth))
        baseline.append(dice(np.repeat(truth[prompt.slice_index][None], truth.shape[0], axis=0), truth))
    return scores, baseline


def test_real_ct_solid_organs_mean_dice(ct_3mm):
    array, labels, spacing, _ = ct_3mm
    scores, baseline = _box_prompt_scores(array, labels, spacing, REAL_SUBSET)
    assert np.mean(scores) >= 0.75, dict(zip(REAL_SUBSET, np.round(scores, 3)))
    assert np.mean(scores) > np.mean(baseline) + 0.1  # and clearly better than copying the key slice


def test_real_ct_all_organs_mean_dice(ct_3mm):
    # The full acceptance set (39 organs), what the method truly achieves: 0.620 mean Dice with
    # register_refine + tight_select (copy-everywhere baseline 0.367). Below the 0.75 target: this
    # guards against regressions, it does not claim the target.
    array, labels, spacing, organs = ct_3mm
    scores, baseline = _box_prompt_scores(array, labels, spacing, organs)
    assert np.mean(scores) >= 0.60, np.round(scores, 2)
    assert np.mean(scores) > np.mean(baseline) + 0.15
