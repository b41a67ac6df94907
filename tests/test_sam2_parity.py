"""rtprop's SAM2 is upstream's SAM2: same weights, same prompt, same logits (issue 12, item 6).

Upstream here is the `sam2` package driven as its README and MedSAM2's scripts drive it: frames
from a folder through its own `init_state` (the 8-bit slices as lossless PNG data in `<n>.jpg`
files: PIL opens them by content, so no JPEG loss), `add_new_points_or_box`, `propagate_in_video`
forward and in reverse. rtprop runs its in-memory video path with its added steps switched off
(`RAW`). A seeded random-init tiny model at 256 px; slices not 256 x 256, so every frame is resized.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from config.schema import PropagationConfig
from models import sam2_backend
from models.prompts import BoxPrompt, MaskPrompt, PointPrompt
from models.sam2_loader import load_model
from models.sam2_video import to_model_input

SIZE = 256
TOLERANCE = 1e-5
RAW = {"condition_on": "prompt", "clip_box_output": False, "stop_rules": False, "largest_component": False,
       "fill_holes": False}
SPACING = (2.0, 0.8, 0.8)

pytestmark = pytest.mark.sam2


@pytest.fixture(scope="module")
def tiny():
    return load_model("configs/sam2.1/sam2.1_hiera_t.yaml", None, SIZE, "cpu", 2, seed=0, cache=False)


@pytest.fixture(scope="module")
def tiny128():
    """The same at 128 px, for the longer runs (several passes, long volumes)."""
    return load_model("configs/sam2.1/sam2.1_hiera_t.yaml", None, 128, "cpu", 2, seed=0, cache=False)


def phantom(nz: int = 7, ny: int = 90, nx: int = 120) -> np.ndarray:
    """CT (HU): noisy soft tissue with a brighter ellipsoid that drifts and shrinks across the slices."""
    rng = np.random.default_rng(1)
    image = rng.normal(20, 25, (nz, ny, nx)).astype(np.float32)
    yy, xx = np.mgrid[0:ny, 0:nx]
    for z in range(nz):
        ry, rx = 22 - 1.5 * abs(z - nz // 2), 30 - 2.0 * abs(z - nz // 2)
        image[z][((yy - 45 - z) / ry) ** 2 + ((xx - 60 + z) / rx) ** 2 <= 1] += 120
    return image


def settings(size: int = SIZE, **sam2) -> PropagationConfig:
    return PropagationConfig(backend="sam2", device="cpu", sam2={"image_size": size, **RAW, **sam2})


def png_folder(image: np.ndarray, folder: Path) -> Path:
    """The slices as upstream gets them: rtprop's [0, 1] normalisation, 8 bits as MedSAM2 makes them."""
    norm = sam2_backend.preprocess(image, "CT", settings())
    folder.mkdir()
    for z in range(norm.shape[0]):
        Image.fromarray(np.uint8(np.clip(norm[z], 0, 1) * 255)).save(folder / f"{z}.jpg", format="PNG")
    return folder


def prompt_kwargs(prompt) -> dict:
    if isinstance(prompt, BoxPrompt):
        return {"frame_idx": prompt.slice_index, "box": np.array([prompt.x0, prompt.y0, prompt.x1, prompt.y1],
                                                                 np.float32)}
    return {"frame_idx": prompt.slice_index,
            "points": np.array([[x, y] for x, y, _ in prompt.points], np.float32),
            "labels": np.array([int(p) for _, _, p in prompt.points], np.int32)}


def add_to(model, state, prompt) -> None:
    """One prompt on its frame, upstream's own call for it (an outline through `add_new_mask`)."""
    if isinstance(prompt, MaskPrompt):
        model.add_new_mask(state, frame_idx=prompt.slice_index, obj_id=1, mask=torch.from_numpy(prompt.mask))
    else:
        model.add_new_points_or_box(state, obj_id=1, **prompt_kwargs(prompt))


def upstream(model, folder: Path, prompts: list, reset: bool,
             corrections: list = ()) -> dict[str, dict[int, torch.Tensor]]:
    """Upstream's own calls; with `corrections`, its interactive scheme: propagate, click, propagate again."""
    out: dict[str, dict[int, torch.Tensor]] = {}
    with torch.inference_mode():
        state = model.init_state(str(folder))

        def add_prompts():
            for prompt in prompts:
                model.add_new_points_or_box(state, obj_id=1, **prompt_kwargs(prompt))

        def run(reverse: bool) -> dict[int, torch.Tensor]:
            return {int(z): logits[0, 0].clone() for z, _, logits in model.propagate_in_video(state, reverse=reverse)}

        def correct(reverse: bool | None):
            for c in corrections:
                if reverse is None or (c.slice_index < prompts[0].slice_index) == reverse:
                    add_to(model, state, c)

        add_prompts()
        if reset:  # MedSAM2: forward, reset, prompts again, reverse (a correction belongs to its direction)
            for reverse, name in ((False, "increasing_z"), (True, "decreasing_z")):
                if reverse:
                    model.reset_state(state)
                    add_prompts()
                if any((c.slice_index < prompts[0].slice_index) == reverse for c in corrections):
                    run(reverse)
                    correct(reverse)
                out[name] = run(reverse)
        else:  # Meta's demo: forward then reverse on one state
            if corrections:
                run(False), run(True)
                correct(None)
            out["increasing_z"], out["decreasing_z"] = run(False), run(True)
    return out


def ours(loaded, image: np.ndarray, prompts: list, corrections: list = (),
         **sam2) -> dict[str, dict[int, torch.Tensor]]:
    out: dict[str, dict[int, torch.Tensor]] = {"increasing_z": {}, "decreasing_z": {}}
    result = sam2_backend.propagate(image, SPACING, prompts, "CT", settings(loaded.image_size, **sam2), loaded=loaded,
                                    on_logits=lambda name, z, logits: out[name].__setitem__(z, logits.clone()),
                                    corrections=corrections)
    out["details"] = result.details
    return out


def max_delta(a: dict[str, dict[int, torch.Tensor]], b: dict[str, dict[int, torch.Tensor]]) -> dict[str, float]:
    """Largest |logit difference| per direction; both must hold the same frames in the same order."""
    names = ("increasing_z", "decreasing_z")
    assert [list(a[n]) for n in names] == [list(b[n]) for n in names]
    return {n: max(float((a[n][z] - b[n][z]).abs().max()) for z in a[n]) for n in names}


def test_video_input_is_upstream_loader_output_bit_for_bit(tmp_path):
    """The frame tensor: rtprop's in-memory conversion == sam2's loader on the PNG (resized and not)."""
    from sam2.utils.misc import load_video_frames_from_jpg_images

    rng = np.random.default_rng(0)
    for size, shape in ((SIZE, (90, 120)), (SIZE, (SIZE, SIZE)), (512, (700, 384))):
        frames = rng.random((2, *shape)).astype(np.float32)
        folder = tmp_path / f"{size}_{shape[0]}"
        folder.mkdir()
        for i, f in enumerate(frames):
            Image.fromarray(np.uint8(f * 255)).save(folder / f"{i}.jpg", format="PNG")
        images, height, width = load_video_frames_from_jpg_images(str(folder), size, offload_video_to_cpu=True,
                                                                  compute_device=torch.device("cpu"))
        assert (height, width) == shape
        assert torch.equal(torch.stack([to_model_input(f, size) for f in frames]), images)


@pytest.mark.parametrize("prompt, reset", [
    (BoxPrompt(3, 38, 28, 84, 66), True),  # MedSAM2's scheme
    (BoxPrompt(3, 38, 28, 84, 66), False),  # Meta's demo
    (PointPrompt(3, ((62, 47, True), (10, 10, False))), True),
])
def test_video_logits_equal_upstream_on_every_frame_both_directions(tmp_path, tiny, prompt, reset):
    image = phantom()
    theirs = upstream(tiny.model, png_folder(image, tmp_path / "frames"), [prompt], reset)
    mine = ours(tiny, image, [prompt], reset_between_directions=reset)
    assert list(mine["increasing_z"]) == [3, 4, 5, 6] and list(mine["decreasing_z"]) == [3, 2, 1, 0]
    delta = max_delta(mine, theirs)
    print(f"max |delta logit| {delta}")
    assert max(delta.values()) <= TOLERANCE, delta


@pytest.mark.parametrize("reset", [True, False])
def test_prompts_on_several_slices_and_a_correction_equal_upstream(tmp_path, tiny128, reset):
    """Boxes on slices 1 and 4 (conditioning frames both), then a negative click on slice 5 after a first run."""
    image = phantom()
    boxes = [BoxPrompt(1, 36, 24, 88, 62), BoxPrompt(4, 38, 30, 84, 68)]
    correction = PointPrompt(5, ((60, 50, False),))
    folder = png_folder(image, tmp_path / "frames")
    for corrections in ([], [correction]):
        theirs = upstream(tiny128.model, folder, boxes, reset, corrections)
        mine = ours(tiny128, image, boxes + corrections, reset_between_directions=reset)
        assert list(mine["increasing_z"]) == [1, 2, 3, 4, 5, 6] and list(mine["decreasing_z"]) == [1, 0]
        delta = max_delta(mine, theirs)
        print(f"corrections {len(corrections)}: max |delta logit| {delta}")
        assert max(delta.values()) <= TOLERANCE, delta
    assert mine["details"]["corrections"] == [{"slice": 5, "kind": "clicks", "clicks": 1, "applied": "refined",
                                               "area_px": mine["details"]["corrections"][0]["area_px"]}]


@pytest.mark.parametrize("reset", [True, False])
def test_a_reviewers_outline_or_box_on_another_slice_is_upstreams_interactive_scheme(tmp_path, tiny128, reset):
    """A box on slice 1; after a first run a reviewer draws an outline on slice 5 (sam2: `add_new_mask` on that
    frame), or a box on slice 4 and then the outline (`add_new_points_or_box`, `add_new_mask`), propagated
    again: the logits are upstream's."""
    image = phantom()
    box = BoxPrompt(1, 36, 24, 88, 62)
    yy, xx = np.mgrid[:90, :120]
    outline = MaskPrompt(5, ((yy - 50) / 16.0) ** 2 + ((xx - 62) / 22.0) ** 2 <= 1)
    folder = png_folder(image, tmp_path / "frames")
    for corrections in ([outline], [BoxPrompt(4, 38, 28, 86, 70), outline]):
        theirs = upstream(tiny128.model, folder, [box], reset, corrections)
        mine = ours(tiny128, image, [box], corrections, reset_between_directions=reset)
        delta = max_delta(mine, theirs)
        print(f"corrections {len(corrections)}: max |delta logit| {delta}")
        assert max(delta.values()) <= TOLERANCE, delta
    assert [(c["slice"], c["kind"]) for c in mine["details"]["corrections"]] == [(4, "box"), (5, "outline")]


def test_memory_trimming_changes_no_logit_on_a_long_volume(tmp_path, tiny128):
    """24 frames > sam2's memory window: rtprop drops what sam2 can no longer read, upstream keeps all.

    Without a reset the reverse pass reads the forward pass's outputs next to the start: kept too.
    """
    image = phantom(nz=24, ny=60, nx=70)
    prompt = BoxPrompt(4, 25, 20, 50, 45)
    theirs = upstream(tiny128.model, png_folder(image, tmp_path / "frames"), [prompt], reset=False)
    mine = ours(tiny128, image, [prompt], reset_between_directions=False)
    assert mine["details"]["max_frames_held"] < 24  # trimming did happen
    assert max(max_delta(mine, theirs).values()) <= TOLERANCE


def test_image_chain_is_upstream_image_predictor(tiny):
    """Chain mode's slices == sam2's SAM2ImagePredictor on the [0, 1] slice as an RGB image, same boxes."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    image = phantom()
    box = BoxPrompt(3, 38, 28, 84, 66)
    s = settings(mode="image_chain", stop_rules=False)
    result = sam2_backend.propagate(image, SPACING, box, "CT", s, loaded=tiny)
    predictor = SAM2ImagePredictor(tiny.model)
    predictor._bb_feat_sizes = [(SIZE // 4,) * 2, (SIZE // 8,) * 2, (SIZE // 16,) * 2]
    norm = sam2_backend.preprocess(image, "CT", s)
    margin = int(np.ceil(s.sam2.chain_box_margin_mm / SPACING[1]))
    expected_box = np.array([box.x0, box.y0, box.x1, box.y1], np.float32)
    for z in (3, 4):
        with torch.inference_mode():
            predictor.set_image(np.dstack([norm[z]] * 3))
            masks, _, _ = predictor.predict(box=expected_box, multimask_output=False)
        assert np.array_equal(result.mask[z], masks[0].astype(bool)), z
        rows, cols = np.nonzero(result.mask[z])
        expected_box = np.array([cols.min() - margin, rows.min() - margin, cols.max() + margin,
                                 rows.max() + margin], np.float32).clip(0, [119, 89, 119, 89])
