"""SAM2 backend plumbing with the real sam2 code and random weights (no checkpoint exists here).

Random weights say nothing about accuracy; these tests check that prompts are honoured, both
directions run, stop rules fire, shapes/geometry are right and checkpoints load strictly.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch

from config.schema import PropagationConfig
from models import sam2_backend
from models.device import DeviceError, choose_device
from models.prompts import BoxPrompt, MaskPrompt, PointPrompt, PromptError
from models.propagate import propagate as propagate_any
from models.sam2_backend import follow, plan_direction, stop_reason
from models.sam2_loader import CheckpointError, load_checkpoint_into, load_model
from models.sam2_video import LazyFrames, init_state_in_memory, memory_window

SIZE = 128  # smallest input the Hiera backbone takes comfortably; plumbing only


@pytest.fixture(scope="module")
def tiny():
    return load_model("configs/sam2.1/sam2.1_hiera_t.yaml", None, SIZE, "cpu", 2, seed=0, cache=False)


def volume(nz: int = 9, ny: int = 48, nx: int = 72) -> np.ndarray:
    """Non-square CT-like volume (HU) with a bright box-shaped structure over the middle slices."""
    rng = np.random.default_rng(0)
    image = rng.normal(0, 20, (nz, ny, nx)).astype(np.float32)
    image[2:7, 15:32, 25:50] += 150
    return image


def settings(mode: str = "video", sam2_extra: dict | None = None, **kw) -> PropagationConfig:
    return PropagationConfig(backend="sam2", sam2={"image_size": SIZE, "mode": mode, **(sam2_extra or {})},
                             device="cpu", **kw)


# ----------------------------------------------------------------------------- stop rules (pure)
def test_stop_reason_rules():
    assert stop_reason(0, 100, 0.1) == "empty"
    assert stop_reason(9, 100, 0.1) == "area_collapse"
    assert stop_reason(10, 100, 0.1) is None
    assert stop_reason(500, 100, 0.1) is None


@pytest.mark.parametrize("areas, extent_mm, expected", [
    ([100, 90, 80, 0, 70], 300.0, (3, "empty")),  # empty slice dropped, stop there
    ([100, 90, 5, 70], 300.0, (3, "area_collapse")),  # collapsed slice kept (tapering tip)
    ([100, 100, 100, 100], 300.0, (4, "edge_of_volume")),
    ([100] * 10, 6.0, (3, "max_extent_mm")),  # 2 mm slices: 3 slices = 6 mm
    ([], 300.0, (0, "edge_of_volume")),  # prompt on the volume's edge
])
def test_direction_loop_on_synthetic_area_sequences(areas, extent_mm, expected):
    """The loop both modes run, fed slices whose areas are known: stop rules past the prompted slice."""
    s = PropagationConfig(min_area_fraction=0.1, max_extent_mm=extent_mm)
    nz = len(areas) + 1
    direction = plan_direction(False, {0: 100}, nz, 2.0, s)
    frames = ((i, np.arange(200) < a, 1.0) for i, a in enumerate(areas[:direction.limit], start=1))
    mask, confidence = np.zeros((nz, 200), bool), np.zeros(nz, np.float32)
    record = follow(frames, direction, s, mask, confidence)
    assert (record["slices"], record["reason"]) == expected
    kept = [z for z in range(1, nz) if mask[z].any()]
    assert kept == list(range(1, expected[0] + 1))


def test_direction_loop_records_slices_between_prompts_whatever_their_area():
    """Slices up to the outermost prompted slice never stop the walk; past it the rules apply."""
    s = PropagationConfig(min_area_fraction=0.5)
    # prompts on slices 2 and 6 (areas 100, 80), walking up from 2: slices 3..5 are between them
    direction = plan_direction(False, {2: 100, 6: 80}, 10, 1.0, s)
    areas = {3: 0, 4: 10, 5: 90, 6: 80, 7: 60, 8: 30, 9: 70}
    frames = ((z, np.arange(200) < areas[z], 1.0) for z in range(3, 10))
    mask, confidence = np.zeros((10, 200), bool), np.zeros(10, np.float32)
    record = follow(frames, direction, s, mask, confidence, fixed={6})
    assert record["visited"] == [3, 4, 5, 7, 8]  # 6 is a prompted slice; 8 is below half of slice 6's area
    assert record["reason"] == "area_collapse" and record["last_slice"] == 8 and record["slices"] == 2
    assert mask[4].sum() == 10 and not mask[9].any()
    off = PropagationConfig(min_area_fraction=0.5, sam2={"stop_rules": False})
    direction = plan_direction(False, {2: 100, 6: 80}, 10, 1.0, off)
    frames = ((z, np.arange(200) < areas[z], 1.0) for z in range(3, 10))
    record = follow(frames, direction, off, mask, confidence, fixed={6})
    assert record["reason"] == "edge_of_volume" and record["last_slice"] == 9


# ----------------------------------------------------------------------------- bad input, devices
@pytest.mark.parametrize("prompt, match", [
    (BoxPrompt(20, 1, 1, 5, 5), "slice 20"),
    (BoxPrompt(4, 60, 10, 80, 20), "outside"),
    (BoxPrompt(4, 30, 10, 29, 20), "inverted"),
    (PointPrompt(4, ((10, 10, False),)), "no positive"),
    (PointPrompt(4, ()), "no points"),
    (PointPrompt(4, ((100, 10, True),)), "outside"),
    (MaskPrompt(4, np.zeros((48, 72), bool)), "empty"),
    (MaskPrompt(4, np.ones((72, 48), bool)), "shape"),
])
def test_bad_prompts_are_prompt_errors_before_any_model_work(prompt, match):
    with pytest.raises(PromptError, match=match):
        sam2_backend.propagate(volume(), (2.0, 1.0, 1.0), prompt, "CT", settings())


def test_sam2_backend_without_checkpoint_is_an_error_not_random_weights():
    with pytest.raises(CheckpointError, match="propagation.checkpoint"):
        propagate_any(volume(), (2.0, 1.0, 1.0), BoxPrompt(4, 25, 15, 49, 31), "CT", settings())


def test_missing_device_and_bad_image_size_are_clear_errors():
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="cuda"):
            choose_device("cuda")
    assert choose_device("auto", 2).type in ("cuda", "mps", "cpu")
    with pytest.raises(CheckpointError, match="multiple of 64"):
        load_model("tiny", None, 200, "cpu", cache=False)
    with pytest.raises(CheckpointError, match="model_cfg"):
        load_model("configs/sam9/nope.yaml", None, SIZE, "cpu", cache=False)


# ----------------------------------------------------------------------------- checkpoints
def test_missing_checkpoint_names_file_and_folder(tmp_path):
    missing = tmp_path / "models" / "sam2.1_hiera_tiny.pt"
    with pytest.raises(CheckpointError) as err:
        load_model("tiny", missing, SIZE, "cpu", cache=False)
    assert "sam2.1_hiera_tiny.pt" in str(err.value) and str(missing.parent) in str(err.value)
    assert "never downloads" in str(err.value)


@pytest.mark.sam2
def test_checkpoint_layouts_load_strictly_and_report_sha256(tmp_path, tiny):
    import hashlib

    sd = {k: v.half() for k, v in tiny.model.state_dict().items()}  # half: smaller files, same keys/shapes
    layouts = {
        "plain.pt": sd,
        "meta_sam2.1_hiera_tiny.pt": {"model": sd},
        "SAM2.1_b+_finetune.pt": {"model": sd, "epoch": 40},  # TrackRAD2025 (Meta's layout + extras)
        "stardust.pt": {"model_state_dict": {f"sam2_model.{k}": v for k, v in sd.items()}, "epoch": 3,
                        "optimizer_state_dict": {}},
    }
    fresh = load_model("tiny", None, SIZE, "cpu", seed=1, cache=False).model
    for name, obj in layouts.items():
        path = tmp_path / name
        torch.save(obj, path)
        digest = load_checkpoint_into(fresh, path, "tiny")
        assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
        key = "image_encoder.trunk.patch_embed.proj.weight"
        assert torch.equal(fresh.state_dict()[key], sd[key].float()), name
    # the full path through load_model returns the digest for the audit
    loaded = load_model("tiny", tmp_path / "plain.pt", SIZE, "cpu", cache=False)
    assert loaded.checkpoint_sha256 == hashlib.sha256((tmp_path / "plain.pt").read_bytes()).hexdigest()


@pytest.mark.sam2
def test_wrong_architecture_and_partial_checkpoints_are_refused(tmp_path, tiny):
    sd = {k: v.half() for k, v in tiny.model.state_dict().items()}
    path = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError) as err:  # tiny weights into the small config (more Hiera blocks)
        load_model("configs/sam2.1/sam2.1_hiera_s.yaml", path, SIZE, "cpu", cache=False)
    text = str(err.value)
    assert "sam2.1_hiera_tiny.pt" in text and str(tmp_path) in text and "missing" in text
    partial = dict(sd)
    partial.pop("sam_mask_decoder.iou_token.weight")
    partial["extra.head.weight"] = torch.zeros(3)
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match=r"1 missing .*iou_token.*1 unexpected .*extra\.head"):
        load_checkpoint_into(tiny.model, tmp_path / "partial.pt", "tiny")
    (tmp_path / "corrupt.pt").write_bytes(b"not a zip file at all")
    with pytest.raises(CheckpointError, match="corrupt.pt"):
        load_checkpoint_into(tiny.model, tmp_path / "corrupt.pt", "tiny")


@pytest.mark.sam2
def test_medsam2_512_config_is_built_by_overrides():
    loaded = load_model("sam2.1_hiera_t512", None, 512, "cpu", cache=False)
    model = loaded.model
    assert model.image_size == 512 and model.sam_image_embedding_size == 32
    layer = model.memory_attention.layers[0]
    assert layer.self_attn.freqs_cis.shape[0] == 32 * 32
    assert layer.cross_attn_image.freqs_cis.shape[0] == 32 * 32


# ----------------------------------------------------------------------------- in-memory video state
@pytest.mark.sam2
def test_in_memory_state_has_the_keys_of_sam2_init_state(tmp_path, tiny):
    import cv2

    for i in range(2):
        cv2.imwrite(str(tmp_path / f"{i:05d}.jpg"), np.full((32, 40, 3), 100 + i, np.uint8))
    with torch.inference_mode():
        real = tiny.model.init_state(str(tmp_path))
    ours = init_state_in_memory(tiny.model, LazyFrames(lambda i: np.zeros((32, 40), np.float32), 2, SIZE), 32, 40)
    assert set(ours) == set(real)
    assert (ours["video_height"], ours["video_width"], ours["num_frames"]) == (32, 40, 2)
    assert tuple(ours["images"][1].shape) == tuple(real["images"][1].shape) == (3, SIZE, SIZE)


# ----------------------------------------------------------------------------- propagation
@pytest.mark.sam2
def test_video_box_prompt_both_directions_shape_and_box_honoured(tiny):
    image = volume()
    box = BoxPrompt(4, 25, 15, 49, 31)
    result = sam2_backend.propagate(image, (2.0, 1.0, 1.0), box, "CT", settings(), loaded=tiny)
    assert result.backend == "sam2" and result.mask.shape == image.shape and result.mask.dtype == bool
    assert result.confidence.shape == (image.shape[0],)
    key = result.mask[4]
    assert key.any()
    rows, cols = np.nonzero(key)
    m = sam2_backend.BOX_CLIP_MARGIN_PX
    assert rows.min() >= 15 - m and rows.max() <= 31 + m and cols.min() >= 25 - m and cols.max() <= 49 + m
    visited = result.details["frames_visited"]
    assert visited["increasing_z"][:1] == [5] and visited["decreasing_z"][:1] == [3]
    for name, stop in result.details["stop"].items():
        assert stop["reason"] in ("empty", "area_collapse", "max_extent_mm", "edge_of_volume"), name
        if stop["reason"] == "edge_of_volume":
            assert visited[name][-1] in (0, image.shape[0] - 1)
    assert result.checkpoint_sha256 is None  # random weights: nothing loaded
    assert result.details["timings_s"]["total"] > 0


@pytest.mark.sam2
def test_mask_prompt_goes_through_add_new_mask_and_is_kept_on_the_key_slice(tiny):
    image = volume()
    yy, xx = np.mgrid[0:48, 0:72]
    drawn = ((yy - 23) / 8.0) ** 2 + ((xx - 37) / 12.0) ** 2 <= 1
    result = sam2_backend.propagate(image, (2.0, 1.0, 1.0), MaskPrompt(4, drawn), "CT", settings(), loaded=tiny)
    key = result.mask[4]
    dice = 2 * (key & drawn).sum() / (key.sum() + drawn.sum())
    assert dice > 0.95  # SAM2 uses a mask input as the key frame's output (use_mask_input_as_output_without_sam)
    assert set(result.details["frames_visited"]["increasing_z"]) <= set(range(5, 9))
    assert set(result.details["frames_visited"]["decreasing_z"]) <= set(range(0, 4))


@pytest.mark.sam2
def test_point_prompt_video_mode(tiny):
    result = sam2_backend.propagate(volume(), (2.0, 1.0, 1.0), PointPrompt(4, ((37, 23, True), (5, 5, False))),
                                    "CT", settings(), loaded=tiny)
    assert result.mask.shape == (9, 48, 72) and result.mask[4].any()


@pytest.mark.sam2
def test_stop_rules_fire_inside_the_real_loop(tiny):
    image = volume(nz=11)
    # Max extent: 2 mm slices, 4 mm allowed -> 2 slices each way and no further frame is even computed.
    result = sam2_backend.propagate(image, (2.0, 1.0, 1.0), MaskPrompt(5, image[5] > 75), "CT",
                                    settings(max_extent_mm=4.0), loaded=tiny)
    assert result.details["frames_visited"] == {"increasing_z": [6, 7], "decreasing_z": [4, 3]}
    assert {s["reason"] for s in result.details["stop"].values()} <= {"max_extent_mm", "empty", "area_collapse"}
    assert not result.mask[:3].any() and not result.mask[8:].any()
    # Area collapse: a key mask covering the whole slice; the random model's junk is smaller than that,
    # so with min_area_fraction 1.0 each direction stops at its first slice (which is kept).
    full = np.ones(image.shape[1:], bool)
    result = sam2_backend.propagate(image, (2.0, 1.0, 1.0), MaskPrompt(5, full), "CT",
                                    settings(min_area_fraction=1.0), loaded=tiny)
    assert result.details["frames_visited"] == {"increasing_z": [6], "decreasing_z": [4]}
    assert {s["reason"] for s in result.details["stop"].values()} <= {"area_collapse", "empty"}


@pytest.mark.sam2
def test_image_chain_mode_both_directions(tiny):
    image = volume()
    result = sam2_backend.propagate(image, (2.0, 1.0, 1.0), BoxPrompt(4, 25, 15, 49, 31), "CT",
                                    settings(mode="image_chain"), loaded=tiny)
    assert result.mask.shape == image.shape and result.details["mode"] == "image_chain"
    visited = result.details["frames_visited"]
    assert visited["increasing_z"][:1] == [5] and visited["decreasing_z"][:1] == [3]
    rows, cols = np.nonzero(result.mask[4])
    assert rows.min() >= 13 and rows.max() <= 33 and cols.min() >= 23 and cols.max() <= 51


@pytest.mark.sam2
def test_video_memory_bank_is_trimmed_on_long_volumes(tiny):
    image = volume(nz=40, ny=32, nx=40)
    image[:, 8:24, 10:30] += 150
    result = sam2_backend.propagate(image, (1.0, 1.0, 1.0), MaskPrompt(0, image[0] > 75), "MR",
                                    settings(min_area_fraction=0.0), loaded=tiny)
    assert result.mask.shape == image.shape
    window = memory_window(tiny.model)
    assert window < 40
    # every visited frame was encoded once (plus the key slice per pass); nothing was preloaded
    assert result.details["frames_encoded"] <= len(result.details["frames_visited"]["increasing_z"]) + 2
    assert len(result.details["frames_visited"]["increasing_z"]) > window  # long enough to need trimming
    # the window's frames plus the current one plus the conditioning (key) frame, however long the volume
    assert result.details["max_frames_held"] <= window + 2


# ----------------------------------------------------------------------------- the added steps, switchable
@pytest.mark.sam2
def test_added_steps_switch_off(tiny):
    image = volume()
    # stop_rules off: every slice to both edges, even where each slice is far below the prompted area
    full = MaskPrompt(4, np.ones(image.shape[1:], bool))
    no_stops = settings(min_area_fraction=1.0, max_extent_mm=2.0, sam2_extra={"stop_rules": False})
    result = sam2_backend.propagate(image, (2.0, 1.0, 1.0), full, "CT", no_stops, loaded=tiny)
    assert result.details["frames_visited"] == {"increasing_z": [5, 6, 7, 8], "decreasing_z": [3, 2, 1, 0]}
    assert {s["reason"] for s in result.details["stop"].values()} == {"edge_of_volume"}
    # fill_holes: a ring drawn on the key slice is filled, or kept as a ring
    yy, xx = np.mgrid[0:48, 0:72]
    r = np.hypot(yy - 23, xx - 37)
    ring = (r <= 10) & (r >= 5)
    only_key = {"max_extent_mm": 1.0}  # 2 mm slices: no slice past the prompt
    filled = sam2_backend.propagate(image, (2.0, 1.0, 1.0), MaskPrompt(4, ring), "CT", settings(**only_key),
                                    loaded=tiny)
    assert filled.mask[4].sum() == (r <= 10).sum()
    kept = sam2_backend.propagate(image, (2.0, 1.0, 1.0), MaskPrompt(4, ring), "CT",
                                  settings(**only_key, sam2_extra={"fill_holes": False}), loaded=tiny)
    assert np.array_equal(kept.mask[4], ring)
    # largest_component: two blobs on the prompted slice are two 3D components; the first one is kept
    blobs = (np.hypot(yy - 10, xx - 10) <= 4) | (np.hypot(yy - 35, xx - 55) <= 6)
    one = sam2_backend.propagate(image, (2.0, 1.0, 1.0), MaskPrompt(4, blobs), "CT", settings(**only_key), loaded=tiny)
    assert one.mask[4].sum() == (np.hypot(yy - 10, xx - 10) <= 4).sum()
    both = sam2_backend.propagate(image, (2.0, 1.0, 1.0), MaskPrompt(4, blobs), "CT",
                                  settings(**only_key, sam2_extra={"largest_component": False}), loaded=tiny)
    assert np.array_equal(both.mask[4], blobs)
    assert both.details["added_steps"]["largest_component"] is False


# ----------------------------------------------------------------------------- prompts on several slices
@pytest.mark.sam2
@pytest.mark.parametrize("mode, increasing, decreasing", [
    ("video", [3, 4, 5, 7], [1]),  # sam2: forward from the first prompted slice through the gap, reverse from it
    ("image_chain", [3, 4, 7], [5, 1]),  # the gap chained from both ends to its middle
])
def test_prompts_on_several_slices_pass_through_each_and_stop_only_beyond(tiny, mode, increasing, decreasing):
    image = volume()
    yy, xx = np.mgrid[0:48, 0:72]
    drawn = {z: ((yy - 23) / (5.0 + z)) ** 2 + ((xx - 37) / (8.0 + z)) ** 2 <= 1 for z in (2, 6)}
    prompts = [MaskPrompt(6, drawn[6]), MaskPrompt(2, drawn[2])]
    # 2 mm slices, 2 mm allowed: one slice past the outermost prompt each way; all between them.
    result = sam2_backend.propagate(image, (2.0, 1.0, 1.0), prompts, "CT",
                                    settings(mode, max_extent_mm=2.0, min_area_fraction=0.0), loaded=tiny)
    assert result.details["prompted_slices"] == [2, 6]
    assert result.details["frames_visited"] == {"increasing_z": increasing, "decreasing_z": decreasing}
    stop = result.details["stop"]
    assert stop["increasing_z"]["last_slice"] in (6, 7) and stop["decreasing_z"]["last_slice"] in (1, 2)
    for z in (2, 6):  # the result passes through each prompt, as drawn (both kept by largest_component)
        assert np.array_equal(result.mask[z], drawn[z]), z
    assert result.confidence[2] == result.confidence[6] == 1.0


@pytest.mark.sam2
def test_max_extent_counts_from_the_outermost_prompted_slice(tiny):
    image = volume(nz=12)
    prompts = [BoxPrompt(3, 25, 15, 49, 31), BoxPrompt(7, 25, 15, 49, 31)]
    result = sam2_backend.propagate(image, (2.0, 1.0, 1.0), prompts, "CT",
                                    settings(max_extent_mm=4.0, min_area_fraction=0.0), loaded=tiny)
    visited = result.details["frames_visited"]
    assert visited["increasing_z"][:3] == [4, 5, 6]
    assert set(visited["increasing_z"][3:]) <= {8, 9} and set(visited["decreasing_z"]) <= {2, 1}
    assert not result.mask[10:].any() and not result.mask[0].any()


@pytest.mark.parametrize("prompts, match", [
    ([PointPrompt(3, ((10, 10, False),)), PointPrompt(5, ((20, 20, False),))], "every prompt is a negative click"),
    ([BoxPrompt(4, 25, 15, 49, 31), BoxPrompt(4, 20, 10, 40, 30)], "slice 4 has 2 box"),
    ([BoxPrompt(4, 25, 15, 49, 31), MaskPrompt(4, np.ones((48, 72), bool))], "at most one box or one outline"),
    ([BoxPrompt(4, 25, 15, 49, 31), PointPrompt(12, ((10, 10, False),))], "slice 12"),
])
def test_bad_multi_slice_prompts_are_prompt_errors_before_any_model_work(prompts, match):
    with pytest.raises(PromptError, match=match):
        sam2_backend.propagate(volume(), (2.0, 1.0, 1.0), prompts, "CT", settings())


# ----------------------------------------------------------------------------- corrective clicks
@pytest.mark.sam2
@pytest.mark.parametrize("mode", ["video", "image_chain"])
def test_corrective_clicks_refine_reached_slices_start_new_ones_and_skip_unreached_negatives(tiny, mode):
    image = volume(nz=11)
    box = BoxPrompt(4, 25, 15, 49, 31)
    near = {"max_extent_mm": 2.0, "min_area_fraction": 0.0}  # 2 mm slices: the first run reaches 3 and 5 only
    first = sam2_backend.propagate(image, (2.0, 1.0, 1.0), box, "CT", settings(mode, **near), loaded=tiny)
    assert first.details["frames_visited"] == {"increasing_z": [5], "decreasing_z": [3]}
    corrections = [PointPrompt(5, ((30, 20, False),)),  # reached: refined from the first result
                   PointPrompt(8, ((37, 23, True),)),  # not reached, positive: a new prompted slice
                   PointPrompt(1, ((37, 23, False),))]  # not reached, negative: nothing there to remove
    result = sam2_backend.propagate(image, (2.0, 1.0, 1.0), [box, *corrections], "CT", settings(mode, **near),
                                    loaded=tiny)
    applied = {c["slice"]: c["applied"] for c in result.details["corrections"]}
    assert applied == {1: "ignored", 5: "refined", 8: "new_prompt"}
    new_prompt = [c for c in result.details["corrections"] if c["slice"] == 8][0]
    visited = result.details["frames_visited"]
    if new_prompt["area_px"]:  # the slice with the new positive click is a prompted slice: stops count from it
        assert 8 in result.details["prompted_slices"] and result.mask[8].any()
        assert set(visited["increasing_z"] + visited["decreasing_z"]) == {3, 5, 6, 7, 9}
    assert visited["decreasing_z"][-1] == 3  # below the box: one slice, as in the first run


@pytest.mark.sam2
def test_a_correction_refines_its_own_direction_only(tiny):
    """Video mode resets between directions: a correction above the box leaves the slices below unchanged."""
    image = volume()
    box = BoxPrompt(4, 25, 15, 49, 31)
    raw = {"stop_rules": False, "largest_component": False}
    first = sam2_backend.propagate(image, (2.0, 1.0, 1.0), box, "CT", settings(sam2_extra=raw), loaded=tiny)
    again = sam2_backend.propagate(image, (2.0, 1.0, 1.0), [box, PointPrompt(6, ((37, 23, True), (30, 17, False)))],
                                   "CT", settings(sam2_extra=raw), loaded=tiny)
    assert [c["applied"] for c in again.details["corrections"]] == ["refined"]
    assert 6 in again.details["prompted_slices"] or again.details["corrections"][0]["area_px"] == 0
    assert np.array_equal(again.mask[:5], first.mask[:5])
    assert np.array_equal(again.confidence[:5], first.confidence[:5])


@pytest.mark.sam2
def test_correct_gives_a_reviewers_corrections_to_the_video_predictor_and_cuts_to_the_extent(tmp_path, tiny):
    """models.corrections.correct with the sam2 backend: the reviewer's click on another slice is added on its
    frame after a first run (sam2_backend's `corrections`), a click on the box's slice joins the box, and the
    extent cuts the result; the weights come through the configured checkpoint, as in service."""
    import hashlib

    from models.corrections import Extent, correct

    path = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save({"model": tiny.model.state_dict()}, path)
    s = settings(checkpoint=path)
    image, box = volume(nz=11), BoxPrompt(4, 25, 15, 49, 31)
    later, on_box = PointPrompt(7, ((37, 23, True),)), PointPrompt(4, ((30, 20, False),))
    result = correct(image, (2.0, 1.0, 1.0), [box], [later, on_box, Extent(3, 7)], "CT", s)
    expected = sam2_backend.propagate(image, (2.0, 1.0, 1.0), [box, on_box], "CT", s, loaded=tiny,
                                      corrections=[later])
    assert result.backend == "sam2" and result.checkpoint_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert [(c["slice"], c["kind"]) for c in result.details["corrections"]] == [(7, "clicks")]
    assert np.array_equal(result.mask[3:8], expected.mask[3:8])
    assert not result.mask[:3].any() and not result.mask[8:].any()
    assert expected.mask[:3].any() or expected.mask[8:].any()  # the extent did cut something
