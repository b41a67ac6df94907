"""The SAM2 propagator: a one-slice prompt spread through a volume by the real `sam2` package.

Two modes (`propagation.sam2.mode`):
- `video` (default, MedSAM2's scheme): the slices are SAM2 video frames fed from memory
  (models/sam2_video.py). The prompt gives the key-slice mask; then for each direction the state is
  reset, that mask is added with `add_new_mask` on the key slice and `propagate_in_video` runs
  forward, then in reverse. Adding the same key mask in both passes means both halves start from
  exactly what the planner accepted.
- `image_chain` (STARDUST's box mode): the image predictor segments each slice on its own, prompted
  with the box of the previous slice's mask plus `sam2.chain_box_margin_mm`, in both directions.

Key slice: a box prompt is run through SAM2 and the result clipped to the box (a planner's box bounds
the structure); points are run through SAM2 (multimask for a single click, best score kept); a mask
prompt is used as drawn. The model, not a known extent, decides where the structure ends: per
direction, propagation stops on an empty slice, on a slice smaller than `min_area_fraction` of the
key slice (kept: structures taper), at `max_extent_mm` from the key slice or at the volume's edge.
Then the largest 3D component (the one through the key slice) is kept and holes are filled per
slice (sam2's own hole filling needs the CUDA `_C` op).
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from config.schema import PropagationConfig
from models.preprocess import normalise
from models.device import inference_context
from models.postprocess import fill_holes_per_slice, largest_component_3d
from models.prompts import (
    BoxPrompt,
    MaskPrompt,
    PointPrompt,
    Prompt,
    PromptError,
    check_prompts,
    single_prompt,
)
from models.result import PropagationResult
from models.sam2_loader import CheckpointError, LoadedModel, load_model
from models.sam2_video import (
    LazyFrames,
    init_state_in_memory,
    memory_window,
    state_frame_count,
    to_model_input,
    trim_memory,
)

OBJ_ID = 1
BOX_CLIP_MARGIN_PX = 2  # SAM masks may overshoot a tight box by a pixel or so of partial volume
DIRECTIONS = ((False, "increasing_z"), (True, "decreasing_z"))


# ----------------------------------------------------------------------------- stop rules
def stop_reason(area_px: int, key_area_px: int, min_area_fraction: float) -> str | None:
    """Why propagation must stop at a slice of `area_px`, or None to go on.

    "empty": nothing found (the slice is dropped); "area_collapse": below `min_area_fraction` of the
    key slice (the slice is kept, the next is not looked at).
    """
    if area_px <= 0:
        return "empty"
    if area_px < min_area_fraction * key_area_px:
        return "area_collapse"
    return None


def max_steps(spacing_z_mm: float, max_extent_mm: float) -> int:
    """Slices one may go from the key slice without exceeding `max_extent_mm`."""
    return int(np.floor(max_extent_mm / spacing_z_mm + 1e-9))


def walk(areas_by_step: list[int], key_area_px: int, spacing_z_mm: float, settings: PropagationConfig,
         slices_available: int) -> tuple[int, str]:
    """Apply the stop rules to the areas found 1, 2, ... slices from the key slice (pure function).

    Returns (slices kept, reason). `slices_available` is how many slices the volume has that way.
    """
    limit = min(slices_available, max_steps(spacing_z_mm, settings.max_extent_mm))
    for step, area in enumerate(areas_by_step[:limit], start=1):
        reason = stop_reason(int(area), key_area_px, settings.min_area_fraction)
        if reason == "empty":
            return step - 1, reason
        if reason == "area_collapse":
            return step, reason
    if limit < slices_available:
        return limit, "max_extent_mm"
    return limit, "edge_of_volume"


# ----------------------------------------------------------------------------- inputs
def clip_to_box(mask: np.ndarray, box: BoxPrompt, margin_px: int = BOX_CLIP_MARGIN_PX) -> np.ndarray:
    out = np.zeros_like(mask, dtype=bool)
    ny, nx = mask.shape
    r0, r1 = max(box.y0 - margin_px, 0), min(box.y1 + margin_px + 1, ny)
    c0, c1 = max(box.x0 - margin_px, 0), min(box.x1 + margin_px + 1, nx)
    out[r0:r1, c0:c1] = mask[r0:r1, c0:c1]
    return out


def _point_arrays(prompt: PointPrompt) -> tuple[np.ndarray, np.ndarray]:
    coords = np.array([[x, y] for x, y, _ in prompt.points], dtype=np.float32)
    labels = np.array([1 if positive else 0 for _, _, positive in prompt.points], dtype=np.int32)
    return coords, labels


@dataclass
class _Timer:
    totals: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, seconds: float) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + seconds


# ----------------------------------------------------------------------------- video mode
def _video_key_mask(predictor: Any, state: dict, prompt: Prompt) -> np.ndarray:
    k = prompt.slice_index
    if isinstance(prompt, MaskPrompt):
        return np.asarray(prompt.mask).astype(bool)
    if isinstance(prompt, BoxPrompt):
        _, _, logits = predictor.add_new_points_or_box(
            state, frame_idx=k, obj_id=OBJ_ID, box=np.array([prompt.x0, prompt.y0, prompt.x1, prompt.y1], np.float32))
        return clip_to_box((logits[0, 0] > 0).cpu().numpy(), prompt)
    coords, labels = _point_arrays(prompt)
    _, _, logits = predictor.add_new_points_or_box(state, frame_idx=k, obj_id=OBJ_ID, points=coords, labels=labels)
    return (logits[0, 0] > 0).cpu().numpy()


def _propagate_video(loaded: LoadedModel, norm: np.ndarray, spacing_zyx: tuple[float, float, float],
                     prompt: Prompt, settings: PropagationConfig, timer: _Timer) -> tuple[np.ndarray, np.ndarray, dict]:
    predictor = loaded.model
    nz, ny, nx = norm.shape
    k = prompt.slice_index
    frames = LazyFrames(lambda i: norm[i], nz, loaded.image_size)
    state = init_state_in_memory(predictor, frames, ny, nx, offload_state_to_cpu=True)
    window = memory_window(predictor)

    t0 = time.perf_counter()
    key = _video_key_mask(predictor, state, prompt)
    timer.add("key_slice", time.perf_counter() - t0)
    if not key.any():
        raise PromptError(f"SAM2 found no structure for the {type(prompt).__name__} on slice {k}: draw a tighter "
                          "box, add points or give a contour")
    key_area = int(key.sum())
    mask = np.zeros((nz, ny, nx), dtype=bool)
    confidence = np.zeros(nz, dtype=np.float32)
    mask[k] = key
    confidence[k] = 1.0
    steps_allowed = max_steps(spacing_zyx[0], settings.max_extent_mm)
    stop: dict[str, dict[str, Any]] = {}
    trace: dict[str, list[int]] = {}
    held_max = 0
    for reverse, name in DIRECTIONS:
        available = k if reverse else nz - 1 - k
        limit = min(available, steps_allowed)
        visited: list[int] = []
        reason = "max_extent_mm" if limit < available else "edge_of_volume"
        last = k
        if limit > 0:
            predictor.reset_state(state)
            predictor.add_new_mask(state, frame_idx=k, obj_id=OBJ_ID, mask=torch.from_numpy(key))
            generator = predictor.propagate_in_video(state, start_frame_idx=k, max_frame_num_to_track=limit,
                                                     reverse=reverse)
            t_model = time.perf_counter()
            for frame_idx, _, logits in generator:
                timer.add("model", time.perf_counter() - t_model)
                if frame_idx == k:
                    t_model = time.perf_counter()
                    continue
                t_post = time.perf_counter()
                visited.append(int(frame_idx))
                logit2d = logits[0, 0]
                slice_mask = (logit2d > 0).cpu().numpy()
                why = stop_reason(int(slice_mask.sum()), key_area, settings.min_area_fraction)
                if why != "empty":
                    mask[frame_idx] = slice_mask
                    confidence[frame_idx] = float(torch.sigmoid(logit2d[logit2d > 0].float()).mean())
                    last = int(frame_idx)
                trim_memory(state, int(frame_idx), reverse, window)
                held_max = max(held_max, state_frame_count(state))
                timer.add("postprocess", time.perf_counter() - t_post)
                if why is not None:
                    reason = why
                    generator.close()
                    break
                t_model = time.perf_counter()
        stop[name] = {"reason": reason, "last_slice": last, "slices": abs(last - k)}
        trace[name] = visited
    predictor.reset_state(state)
    return mask, confidence, {"stop": stop, "frames_visited": trace, "key_area_px": key_area,
                              "frames_encoded": frames.encoded,
                              "memory_window_frames": window, "max_frames_held": held_max}


# ----------------------------------------------------------------------------- image-chain mode
class _ChainPredictor:
    """sam2's SAM2ImagePredictor on our preprocessed tensors (any image_size)."""

    def __init__(self, loaded: LoadedModel):
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        self.loaded = loaded
        self.predictor = SAM2ImagePredictor(loaded.model)
        s = loaded.image_size
        # sam2 hard-codes the 1024-px feature sizes; MedSAM2's 512-px model needs them scaled.
        self.predictor._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]

    def set_slice(self, slice01: np.ndarray) -> None:
        p, model = self.predictor, self.predictor.model
        p.reset_predictor()
        p._orig_hw = [tuple(slice01.shape)]
        image = to_model_input(slice01, self.loaded.image_size)[None].to(self.loaded.device)
        backbone_out = model.forward_image(image)
        _, vision_feats, _, _ = model._prepare_backbone_features(backbone_out)
        if model.directly_add_no_mem_embed:
            vision_feats[-1] = vision_feats[-1] + model.no_mem_embed
        feats = [feat.permute(1, 2, 0).view(1, -1, *size)
                 for feat, size in zip(vision_feats[::-1], p._bb_feat_sizes[::-1])][::-1]
        p._features = {"image_embed": feats[-1], "high_res_feats": feats[:-1]}
        p._is_image_set = True

    def predict(self, box: np.ndarray | None = None, coords: np.ndarray | None = None,
                labels: np.ndarray | None = None) -> tuple[np.ndarray, float]:
        multimask = box is None and coords is not None and len(coords) == 1
        masks, scores, _ = self.predictor.predict(point_coords=coords, point_labels=labels, box=box,
                                                  multimask_output=multimask)
        best = int(np.argmax(scores))
        return masks[best].astype(bool), float(scores[best])


def _box_with_margin(mask2d: np.ndarray, margin_yx_px: tuple[int, int]) -> np.ndarray:
    rows, cols = np.nonzero(mask2d)
    ny, nx = mask2d.shape
    my, mx = margin_yx_px
    return np.array([max(cols.min() - mx, 0), max(rows.min() - my, 0),
                     min(cols.max() + mx, nx - 1), min(rows.max() + my, ny - 1)], dtype=np.float32)


def _propagate_chain(loaded: LoadedModel, norm: np.ndarray, spacing_zyx: tuple[float, float, float],
                     prompt: Prompt, settings: PropagationConfig, timer: _Timer) -> tuple[np.ndarray, np.ndarray, dict]:
    chain = _ChainPredictor(loaded)
    nz, ny, nx = norm.shape
    k = prompt.slice_index
    t0 = time.perf_counter()
    if isinstance(prompt, MaskPrompt):
        key = np.asarray(prompt.mask).astype(bool)
    else:
        chain.set_slice(norm[k])
        if isinstance(prompt, BoxPrompt):
            key, _ = chain.predict(box=np.array([prompt.x0, prompt.y0, prompt.x1, prompt.y1], np.float32))
            key = clip_to_box(key, prompt)
        else:
            coords, labels = _point_arrays(prompt)
            key, _ = chain.predict(coords=coords, labels=labels)
    timer.add("key_slice", time.perf_counter() - t0)
    if not key.any():
        raise PromptError(f"SAM2 found no structure for the {type(prompt).__name__} on slice {k}: draw a tighter "
                          "box, add points or give a contour")
    margin = (int(np.ceil(settings.sam2.chain_box_margin_mm / spacing_zyx[1])),
              int(np.ceil(settings.sam2.chain_box_margin_mm / spacing_zyx[2])))
    key_area = int(key.sum())
    mask = np.zeros((nz, ny, nx), dtype=bool)
    confidence = np.zeros(nz, dtype=np.float32)
    mask[k] = key
    confidence[k] = 1.0
    steps_allowed = max_steps(spacing_zyx[0], settings.max_extent_mm)
    stop: dict[str, dict[str, Any]] = {}
    trace: dict[str, list[int]] = {}
    for reverse, name in DIRECTIONS:
        step = -1 if reverse else 1
        available = k if reverse else nz - 1 - k
        limit = min(available, steps_allowed)
        reason = "max_extent_mm" if limit < available else "edge_of_volume"
        previous, last, visited = key, k, []
        for i in range(1, limit + 1):
            z = k + step * i
            visited.append(z)
            t_model = time.perf_counter()
            chain.set_slice(norm[z])
            new, score = chain.predict(box=_box_with_margin(previous, margin))
            timer.add("model", time.perf_counter() - t_model)
            why = stop_reason(int(new.sum()), key_area, settings.min_area_fraction)
            if why != "empty":
                mask[z], confidence[z], last, previous = new, float(np.clip(score, 0, 1)), z, new
            if why is not None:
                reason = why
                break
        stop[name] = {"reason": reason, "last_slice": last, "slices": abs(last - k)}
        trace[name] = visited
    return mask, confidence, {"stop": stop, "frames_visited": trace, "key_area_px": key_area}


# ----------------------------------------------------------------------------- entry point
def load_configured_model(settings: PropagationConfig) -> LoadedModel:
    """The model `settings` name. Random weights are never used in service: no checkpoint is an error."""
    if settings.checkpoint is None:
        raise CheckpointError("the sam2 backend needs propagation.checkpoint (a SAM2/SAM2.1/MedSAM2 weights file "
                              "on this node; rtprop never downloads weights), or use backend classic/auto")
    return load_model(settings.sam2.model_cfg, settings.checkpoint, settings.sam2.image_size, settings.device,
                      settings.cpu_threads)


def preprocess(image: np.ndarray, modality: str, settings: PropagationConfig) -> np.ndarray:
    """CT window or MR percentiles -> float32 [0, 1], the seeds' normalisation (3 channels added per frame)."""
    return normalise(image, modality, settings.ct_window_level, settings.ct_window_width,
                     tuple(settings.mr_percentiles))


def propagate(
    image: np.ndarray,
    spacing_zyx: tuple[float, float, float],
    prompts: Prompt | Sequence[Prompt],
    modality: str = "",
    settings: PropagationConfig | None = None,
    loaded: LoadedModel | None = None,
) -> PropagationResult:
    """Spread `prompts` through `image` (z, y, x) with SAM2; mask on the image's own grid.

    `loaded` lets a caller (tests, bench) pass a model already built; otherwise it is built from
    `settings` (checkpoint, sam2.model_cfg, sam2.image_size, device) and cached.
    Raises PromptError for an unusable prompt, CheckpointError for a missing or unfitting checkpoint.
    """
    settings = settings or PropagationConfig()
    image = np.asarray(image)
    prompt = single_prompt(check_prompts(image.shape, spacing_zyx, prompts), "sam2")
    t_start = time.perf_counter()
    if loaded is None:
        loaded = load_configured_model(settings)
    t_loaded = time.perf_counter()
    norm = preprocess(image, modality, settings)
    timer = _Timer()
    run = _propagate_chain if settings.sam2.mode == "image_chain" else _propagate_video
    with inference_context(loaded.device):
        mask, confidence, info = run(loaded, norm, spacing_zyx, prompt, settings, timer)
    t_prop = time.perf_counter()
    k = prompt.slice_index
    key_voxel = tuple(int(v) for v in np.argwhere(mask[k])[0])
    mask = fill_holes_per_slice(largest_component_3d(mask, keep_index=(k, *key_voxel)))
    confidence[~mask.any(axis=(1, 2))] = 0.0
    t_end = time.perf_counter()
    n_slices = sum(len(v) for v in info["frames_visited"].values())
    return PropagationResult(
        mask=mask,
        confidence=confidence,
        backend="sam2",
        checkpoint_sha256=loaded.checkpoint_sha256,
        details={
            "mode": settings.sam2.mode,
            "model_config": loaded.config_name,
            "checkpoint": str(loaded.checkpoint) if loaded.checkpoint else None,
            "image_size": loaded.image_size,
            "device": str(loaded.device),
            "key_slice": k,
            **info,
            "timings_s": {"load_model": t_loaded - t_start, **timer.totals, "propagation": t_prop - t_loaded,
                          "total": t_end - t_start, "per_slice": (t_prop - t_loaded) / max(n_slices + 1, 1)},
        },
    )
