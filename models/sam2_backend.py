"""The SAM2 propagator: prompts on one or more slices spread through a volume by the real `sam2` package.

Modes (`propagation.sam2.mode`):
- `video` (default, MedSAM2's scheme): the slices are SAM2 video frames fed from memory
  (models/sam2_video.py: exactly the input sam2's own `init_state` makes of the same 8-bit slices).
  Every prompted slice is a conditioning frame. As sam2 orders several conditioning frames itself,
  `propagate_in_video` runs forward from the lowest prompted slice (through the slices between the
  prompts, each of which attends to every conditioning frame, then on past the highest), then in
  reverse from the lowest prompted slice.
- `image_chain` (STARDUST's box mode): the image predictor segments each prompted slice from its
  prompt and every other slice from its neighbour's mask box grown by `sam2.chain_box_margin_mm`.
  Between two prompted slices each half is chained from its nearer prompt; past them, outward.
Both modes share one direction loop (`follow`): which slices, the stop rules, what is recorded.

What rtprop adds around sam2, each switchable in `propagation.sam2` (`condition_on: prompt` and the
rest off give sam2's own masks; tests/test_sam2_parity.py holds the logits to upstream's):
- `condition_on: mask`: each prompted slice is segmented first and the video predictor is then
  conditioned on that mask (`add_new_mask`), so both directions start from exactly the prompted-slice
  result; `prompt` gives the box/clicks to the video predictor as they are (`add_new_points_or_box`).
- `clip_box_output`: a box's output is cut to the box (+BOX_CLIP_MARGIN_PX, grown to the positive
  clicks on that slice): a planner's box bounds the structure.
- `reset_between_directions`: the reverse pass starts from a fresh state with the prompts re-added
  (MedSAM2); off, it continues from the forward pass's state, whose memories near the start it then
  reads (Meta's demo).
- `stop_rules`: past the outermost prompted slice of a direction, it stops on an empty slice (not
  kept), on a slice smaller than `min_area_fraction` of that prompted slice (kept: structures
  taper), at `max_extent_mm` from it, or at the volume's edge. Slices between prompts never stop.
- `largest_component`: only the 3D components through a prompted slice are kept.
- `fill_holes`: holes are filled per slice (sam2's own hole filling needs its CUDA `_C` op, so the
  loader builds the predictor with fill_hole_area=0, which is what sam2 does without that op).

Prompts (`plan_prompts`): a box or an outline is a primary prompt, with the clicks on its slice (box
and clicks in one call, as SAM2 is trained; an outline, then the clicks refining it). A slice with
clicks only is a correction of the result the primary prompts give (if no slice holds a box or
outline, the slices with a positive click are the primary prompts), and so is each of a reviewer's
`corrections` (clicks, a box or an outline on any other slice, `correction_slices`). Corrections rerun
sam2's interactive scheme statelessly: propagate from the primary prompts (pass 1, stop rules as in a
first run, only as far as the corrections need); add each correction on its slice the video
predictor's own way (clicks and a box through `add_new_points_or_box`, an outline through
`add_new_mask`; a slice pass 1 reached is refined from its tracked output, which sam2 uses as the mask
input, and becomes a conditioning frame; a slice it did not reach gets the correction as a new
prompt, or, clicks all negative, is left out: nothing there to remove); propagate again (pass 2, the
result).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from config.schema import PropagationConfig
from models.device import inference_context
from models.postprocess import fill_holes_per_slice, largest_component_3d
from models.preprocess import normalise
from models.prompts import (
    BoxPrompt,
    MaskPrompt,
    PointPrompt,
    Prompt,
    PromptError,
    check_prompt,
    check_prompts,
    is_positive,
)
from models.result import PropagationResult
from models.sam2_loader import CheckpointError, LoadedModel, load_model
from models.sam2_video import (
    LazyFrames,
    init_state_in_memory,
    memory_window,
    state_frame_count,
    trim_memory,
)

OBJ_ID = 1
BOX_CLIP_MARGIN_PX = 2  # SAM masks may overshoot a tight box by a pixel or so of partial volume
DIRECTIONS = (False, True)  # reverse: increasing z first, then decreasing z
# The `propagation.sam2` switches of the steps rtprop adds around sam2 (recorded in each result's details).
ADDED_STEPS = ("condition_on", "clip_box_output", "reset_between_directions", "stop_rules", "largest_component",
               "fill_holes")
LogitsSink = Callable[[str, int, torch.Tensor], None]  # (direction name, slice, (H, W) logits) as sam2 yields them


# ----------------------------------------------------------------------------- prompts per slice
@dataclass(frozen=True)
class SlicePrompt:
    """Everything drawn on one slice: a box or an outline (or neither), and clicks."""

    z: int
    box: BoxPrompt | None = None
    outline: MaskPrompt | None = None
    clicks: PointPrompt | None = None

    @property
    def positive(self) -> bool:
        return self.box is not None or self.outline is not None or (self.clicks is not None
                                                                     and is_positive(self.clicks))


def plan_prompts(prompts: Sequence[Prompt]) -> tuple[list[SlicePrompt], list[SlicePrompt]]:
    """(primary prompts, corrections), each by slice, from `check_prompts`' output (see the module docstring)."""
    by_slice: dict[int, dict[str, Prompt]] = {}
    for prompt in prompts:
        kind = "box" if isinstance(prompt, BoxPrompt) else "outline" if isinstance(prompt, MaskPrompt) else "clicks"
        by_slice.setdefault(prompt.slice_index, {})[kind] = prompt
    slices = [SlicePrompt(z, **by_slice[z]) for z in sorted(by_slice)]
    drawn = [s for s in slices if s.box is not None or s.outline is not None]
    if drawn:
        return drawn, [s for s in slices if s.box is None and s.outline is None]
    return [s for s in slices if s.positive], [s for s in slices if not s.positive]


def _point_arrays(prompt: PointPrompt) -> tuple[np.ndarray, np.ndarray]:
    coords = np.array([[x, y] for x, y, _ in prompt.points], dtype=np.float32)
    labels = np.array([1 if positive else 0 for _, _, positive in prompt.points], dtype=np.int32)
    return coords, labels


def _box_array(box: BoxPrompt) -> np.ndarray:
    return np.array([box.x0, box.y0, box.x1, box.y1], dtype=np.float32)


def clip_to_box(mask: np.ndarray, box: BoxPrompt, clicks: PointPrompt | None = None,
                margin_px: int = BOX_CLIP_MARGIN_PX) -> np.ndarray:
    """`mask` cut to `box` + `margin_px`, the box first grown to enclose the positive `clicks` on its slice."""
    x0, y0, x1, y1 = box.x0, box.y0, box.x1, box.y1
    for x, y, positive in (clicks.points if clicks is not None else ()):
        if positive:
            x0, y0, x1, y1 = min(x0, x), min(y0, y), max(x1, x), max(y1, y)
    out = np.zeros_like(mask, dtype=bool)
    ny, nx = mask.shape
    r0, r1 = max(y0 - margin_px, 0), min(y1 + margin_px + 1, ny)
    c0, c1 = max(x0 - margin_px, 0), min(x1 + margin_px + 1, nx)
    out[r0:r1, c0:c1] = mask[r0:r1, c0:c1]
    return out


def correction_slices(primary: Sequence[SlicePrompt], clicked: Sequence[SlicePrompt],
                      corrections: Sequence[Prompt]) -> list[SlicePrompt]:
    """The corrections by slice: slices of `clicked` (the prompts' click-only slices), then `corrections`
    (a reviewer's, in the order made: a box or an outline replaces what was drawn and clicked on its
    slice before it, clicks add to it). A correction on a primary prompt's slice is refused: it changes
    that prompt (add it to the prompts)."""
    on_primary = sorted({c.slice_index for c in corrections} & {p.z for p in primary})
    if on_primary:
        raise PromptError(f"corrections on prompted slice(s) {on_primary}: give them with that slice's prompt")
    by_slice = {c.z: c for c in clicked}
    for c in corrections:
        here = by_slice.get(c.slice_index, SlicePrompt(c.slice_index))
        if isinstance(c, BoxPrompt):
            here = SlicePrompt(c.slice_index, box=c)
        elif isinstance(c, MaskPrompt):
            here = SlicePrompt(c.slice_index, outline=c)
        else:
            points = (here.clicks.points if here.clicks is not None else ()) + tuple(c.points)
            here = SlicePrompt(c.slice_index, here.box, here.outline, PointPrompt(c.slice_index, points))
        by_slice[c.slice_index] = here
    return [by_slice[z] for z in sorted(by_slice)]


def _correction_record(correction: SlicePrompt) -> dict[str, Any]:
    """What a correction held, for `details["corrections"]`."""
    kind = "box" if correction.box is not None else "outline" if correction.outline is not None else "clicks"
    clicks = len(correction.clicks.points) if correction.clicks is not None else 0
    return {"slice": correction.z, "kind": kind, "clicks": clicks}


def _no_structure(prompt: SlicePrompt) -> PromptError:
    drawn = "box" if prompt.box is not None else "outline" if prompt.outline is not None else "clicks"
    return PromptError(f"SAM2 found no structure for the {drawn} on slice {prompt.z}: draw a tighter box, "
                       "add points or give a contour")


# ----------------------------------------------------------------------------- stop rules, the direction loop
def stop_reason(area_px: int, key_area_px: int, min_area_fraction: float) -> str | None:
    """Why propagation must stop at a slice of `area_px`, or None to go on.

    "empty": nothing found (the slice is dropped); "area_collapse": below `min_area_fraction` of the
    prompted slice (the slice is kept, the next is not looked at).
    """
    if area_px <= 0:
        return "empty"
    if area_px < min_area_fraction * key_area_px:
        return "area_collapse"
    return None


def max_steps(spacing_z_mm: float, max_extent_mm: float) -> int:
    """Slices one may go from a prompted slice without exceeding `max_extent_mm`."""
    return int(np.floor(max_extent_mm / spacing_z_mm + 1e-9))


@dataclass(frozen=True)
class Direction:
    """One direction of propagation; the stop rules apply past `outermost`, its last prompted slice."""

    reverse: bool
    outermost: int
    reference_area_px: int  # the outermost prompted slice's area: area_collapse is measured against it
    limit: int  # slices that may be added past `outermost`
    available: int  # slices the volume has past `outermost`

    @property
    def name(self) -> str:
        return "decreasing_z" if self.reverse else "increasing_z"

    @property
    def step(self) -> int:
        return -1 if self.reverse else 1


def plan_direction(reverse: bool, prompted_areas: dict[int, int], nz: int, spacing_z_mm: float,
                   settings: PropagationConfig) -> Direction:
    """Where a direction's stop rules start and how far it may go (`sam2.stop_rules` off: to the edge)."""
    outermost = min(prompted_areas) if reverse else max(prompted_areas)
    available = outermost if reverse else nz - 1 - outermost
    limit = available
    if settings.sam2.stop_rules:
        limit = min(available, max_steps(spacing_z_mm, settings.max_extent_mm))
    return Direction(reverse, outermost, prompted_areas[outermost], limit, available)


def follow(frames: Iterator[tuple[int, np.ndarray, float]], direction: Direction, settings: PropagationConfig,
           mask: np.ndarray, confidence: np.ndarray, fixed: Collection[int] = ()) -> dict[str, Any]:
    """Record `frames` ((slice, mask, confidence), in the direction's order) into `mask`/`confidence`.

    Slices in `fixed` (prompted slices, recorded already) are passed over; slices up to
    `direction.outermost` are recorded as they come; past it the stop rules apply (and `frames` is
    closed at the stop). Returns the stop record: reason, last slice with structure, slices past the
    outermost prompt, slices looked at.
    """
    reason = "max_extent_mm" if direction.limit < direction.available else "edge_of_volume"
    last, visited = direction.outermost, []
    for z, slice_mask, slice_confidence in frames:
        if z in fixed:
            continue
        visited.append(z)
        beyond = (z - direction.outermost) * direction.step > 0
        why = None
        if beyond and settings.sam2.stop_rules:
            why = stop_reason(int(slice_mask.sum()), direction.reference_area_px, settings.min_area_fraction)
        if why != "empty":
            mask[z], confidence[z] = slice_mask, slice_confidence
            if beyond and slice_mask.any():
                last = z
        if why is not None:
            reason = why
            break
    close = getattr(frames, "close", None)
    if close is not None:
        close()
    return {"reason": reason, "last_slice": last, "slices": abs(last - direction.outermost), "visited": visited}


@dataclass
class _Timer:
    totals: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, seconds: float) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + seconds


def _window_around(slices: Collection[int], window: int) -> set[int]:
    return {t for z in slices for t in range(z - window, z + window + 1)}


# ----------------------------------------------------------------------------- video mode
@dataclass
class _Video:
    """A sam2 video session on the volume: the predictor, its state and the memory-trimming bookkeeping."""

    predictor: Any
    state: dict
    window: int
    timer: _Timer
    keep: set[int] = field(default_factory=set)  # outputs kept past the window (a later call reads them)
    held_max: int = 0

    def add_prompt(self, prompt: SlicePrompt) -> np.ndarray:
        """One slice's prompts as an initial conditioning frame; the (H, W) logits sam2 returns for it."""
        p, z = self.predictor, prompt.z
        logits = None
        if prompt.outline is not None:
            outline = torch.from_numpy(np.asarray(prompt.outline.mask, dtype=bool))
            _, _, logits = p.add_new_mask(self.state, frame_idx=z, obj_id=OBJ_ID, mask=outline)
        if prompt.box is not None or prompt.clicks is not None:
            coords, labels = _point_arrays(prompt.clicks) if prompt.clicks is not None else (None, None)
            box = _box_array(prompt.box) if prompt.box is not None else None
            _, _, logits = p.add_new_points_or_box(self.state, frame_idx=z, obj_id=OBJ_ID, points=coords,
                                                   labels=labels, box=box)
        return logits[0, 0]

    def add_correction(self, prompt: SlicePrompt) -> tuple[str, np.ndarray | None]:
        """A correction on its slice, the video predictor's own way (`add_prompt`: clicks or a box through
        `add_new_points_or_box`, an outline through `add_new_mask`): ("refined" | "new_prompt" | "ignored",
        the slice's new mask). sam2 refines a tracked slice from its tracked output."""
        tracked = prompt.z in self.state["frames_tracked_per_obj"].get(self.state["obj_id_to_idx"][OBJ_ID], {})
        if not tracked and not prompt.positive:
            return "ignored", None
        return ("refined" if tracked else "new_prompt"), (self.add_prompt(prompt) > 0).cpu().numpy()

    def frames(self, start: int, count: int, reverse: bool, name: str,
               on_logits: LogitsSink | None = None) -> Iterator[tuple[int, np.ndarray, float]]:
        """`propagate_in_video` from `start` over `count` more slices: (slice, mask, confidence) per frame."""
        if count <= 0:
            return
        generator = self.predictor.propagate_in_video(self.state, start_frame_idx=start,
                                                      max_frame_num_to_track=count, reverse=reverse)
        try:
            t_model = time.perf_counter()
            for frame_idx, _, logits in generator:
                t_post = time.perf_counter()
                self.timer.add("model", t_post - t_model)
                z, logit2d = int(frame_idx), logits[0, 0]
                if on_logits is not None:
                    on_logits(name, z, logit2d)
                slice_mask = (logit2d > 0).cpu().numpy()
                score = float(torch.sigmoid(logit2d[logit2d > 0].float()).mean()) if slice_mask.any() else 0.0
                self.timer.add("postprocess", time.perf_counter() - t_post)
                yield z, slice_mask, score
                t_post = time.perf_counter()
                trim_memory(self.state, z, reverse, self.window, keep=self.keep)
                self.held_max = max(self.held_max, state_frame_count(self.state))
                t_model = time.perf_counter()
                self.timer.add("postprocess", t_model - t_post)
        finally:
            generator.close()


def _pass_length(direction: Direction, start: int) -> int:
    """Slices a video pass from `start` covers: up to the outermost prompted slice, then as far as allowed."""
    return abs(direction.outermost - start) + direction.limit


def _propagate_video(loaded: LoadedModel, norm: np.ndarray, spacing_zyx: tuple[float, float, float],
                     primary: list[SlicePrompt], corrections: list[SlicePrompt], settings: PropagationConfig,
                     timer: _Timer, on_logits: LogitsSink | None) -> tuple[np.ndarray, np.ndarray, dict]:
    s = settings.sam2
    nz, ny, nx = norm.shape
    frames = LazyFrames(lambda i: norm[i], nz, loaded.image_size)
    video = _Video(loaded.model, init_state_in_memory(loaded.model, frames, ny, nx, offload_state_to_cpu=True),
                   memory_window(loaded.model), timer)
    start = primary[0].z  # sam2 starts both directions at the first conditioning frame

    t0 = time.perf_counter()
    prompted: dict[int, np.ndarray] = {}
    for prompt in primary:
        if s.condition_on == "mask" and prompt.outline is not None and prompt.clicks is None:
            prompted[prompt.z] = np.asarray(prompt.outline.mask, dtype=bool)  # used as drawn
            continue
        result = (video.add_prompt(prompt) > 0).cpu().numpy()
        if prompt.box is not None and s.clip_box_output:
            result = clip_to_box(result, prompt.box, prompt.clicks)
        if not result.any():
            raise _no_structure(prompt)
        prompted[prompt.z] = result
    timer.add("key_slice", time.perf_counter() - t0)

    mask = np.zeros((nz, ny, nx), dtype=bool)
    confidence = np.zeros(nz, dtype=np.float32)
    for z, result in prompted.items():
        mask[z], confidence[z] = result, 1.0
    primary_areas = {z: int(m.sum()) for z, m in prompted.items()}

    def condition() -> None:
        video.predictor.reset_state(video.state)
        for prompt in primary:
            if s.condition_on == "mask":
                video.predictor.add_new_mask(video.state, frame_idx=prompt.z, obj_id=OBJ_ID,
                                             mask=torch.from_numpy(prompted[prompt.z]))
            else:
                video.add_prompt(prompt)

    # Without a reset the other direction reads the outputs next to the start slice: keep them.
    near_start = set() if s.reset_between_directions else _window_around([start], video.window)
    sessions = [(reverse,) for reverse in DIRECTIONS] if s.reset_between_directions else [DIRECTIONS]
    stop: dict[str, dict[str, Any]] = {}
    visited: dict[str, list[int]] = {}
    applied: list[dict[str, Any]] = []
    positive_areas = dict(primary_areas)
    state_holds_prompts = s.condition_on == "prompt"  # the key-slice calls above added them as they are
    for session in sessions:
        here = [c for c in corrections if (c.z < start) in session]
        areas = dict(primary_areas)
        planned = [plan_direction(reverse, areas, nz, spacing_zyx[0], settings) for reverse in session]
        if not here and not any(_pass_length(d, start) for d in planned):
            for direction in planned:  # nothing to propagate (prompted slice on the volume's edge): no session
                stop[direction.name] = follow(iter(()), direction, settings, mask, confidence)
                visited[direction.name] = stop[direction.name].pop("visited")
            continue
        if not state_holds_prompts:
            condition()
        state_holds_prompts = False
        if here:
            # Pass 1, the first result: as far as the corrections need (and, without a reset, as far as
            # the other direction reads), then the corrections' clicks on their slices.
            video.keep = near_start | _window_around([c.z for c in here], video.window)
            scratch_mask, scratch_confidence = np.zeros_like(mask), np.zeros_like(confidence)
            for reverse in session:
                direction = plan_direction(reverse, primary_areas, nz, spacing_zyx[0], settings)
                full = _pass_length(direction, start)
                needed = max([abs(c.z - start) for c in here if (c.z < start) == reverse], default=0)
                count = min(full, needed if s.reset_between_directions else max(needed, video.window))
                follow(video.frames(start, count, reverse, direction.name), direction, settings, scratch_mask,
                       scratch_confidence, fixed=prompted)
            for correction in here:
                outcome, result = video.add_correction(correction)
                if result is not None and correction.box is not None and s.clip_box_output:
                    result = clip_to_box(result, correction.box, correction.clicks)
                area = int(result.sum()) if result is not None else 0
                applied.append({**_correction_record(correction), "applied": outcome, "area_px": area})
                if correction.positive and area > 0:  # a prompted slice now, recorded as given
                    areas[correction.z] = area
                    prompted[correction.z] = result
                    mask[correction.z], confidence[correction.z] = result, 1.0
        video.keep = near_start
        for reverse in session:
            direction = plan_direction(reverse, areas, nz, spacing_zyx[0], settings)
            slices = video.frames(start, _pass_length(direction, start), reverse, direction.name, on_logits)
            record = follow(slices, direction, settings, mask, confidence, fixed=prompted)
            visited[direction.name] = record.pop("visited")
            stop[direction.name] = record
        positive_areas.update(areas)
    video.predictor.reset_state(video.state)
    return mask, confidence, {"stop": stop, "frames_visited": visited, "prompted_slices": sorted(positive_areas),
                              "corrections": sorted(applied, key=lambda a: a["slice"]),
                              "key_area_px": primary_areas[start], "frames_encoded": frames.encoded,
                              "memory_window_frames": video.window, "max_frames_held": video.held_max}


# ----------------------------------------------------------------------------- image-chain mode
class _ChainPredictor:
    """sam2's SAM2ImagePredictor, with its feature sizes fitted to `image_size`, on [0, 1] grey slices."""

    def __init__(self, loaded: LoadedModel):
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        self.predictor = SAM2ImagePredictor(loaded.model)
        s = self.image_size = loaded.image_size
        # sam2 hard-codes the 1024-px feature sizes; MedSAM2's 512-px model needs them scaled.
        self.predictor._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]

    def set_slice(self, slice01: np.ndarray) -> None:
        """The slice as a float RGB image through sam2's own `set_image` (its transforms: resize, mean/std)."""
        self.predictor.set_image(np.repeat(np.asarray(slice01, dtype=np.float32)[..., None], 3, axis=2))

    def predict(self, box: np.ndarray | None = None, coords: np.ndarray | None = None,
                labels: np.ndarray | None = None,
                mask_input: np.ndarray | None = None) -> tuple[np.ndarray, float, np.ndarray]:
        """(mask, predicted IoU, low-res logits); a single click alone gets sam2's three masks, the best kept."""
        multimask = box is None and mask_input is None and coords is not None and len(coords) == 1
        masks, scores, low_res = self.predictor.predict(point_coords=coords, point_labels=labels, box=box,
                                                        mask_input=mask_input, multimask_output=multimask)
        best = int(np.argmax(scores))
        return masks[best].astype(bool), float(scores[best]), low_res[best][None]

    def outline_logits(self, outline: np.ndarray) -> np.ndarray:
        """An outline as SAM's low-res mask input: sam2's `add_new_mask` resize, then its ±10 `_use_mask_as_output`."""
        s = self.image_size
        m = torch.from_numpy(np.asarray(outline, dtype=np.float32))[None, None]
        m = (F.interpolate(m, size=(s, s), mode="bilinear", align_corners=False, antialias=True) >= 0.5).float()
        logits = F.interpolate(m * 20.0 - 10.0, size=(s // 4, s // 4), mode="bilinear", align_corners=False,
                               antialias=True)
        return logits[0].numpy()

    def segment(self, slice01: np.ndarray, prompt: SlicePrompt, clip: bool) -> np.ndarray:
        """A prompted slice from its own prompts (an outline alone is used as drawn)."""
        if prompt.outline is not None and prompt.clicks is None:
            return np.asarray(prompt.outline.mask, dtype=bool)
        self.set_slice(slice01)
        coords, labels = _point_arrays(prompt.clicks) if prompt.clicks is not None else (None, None)
        mask_input = self.outline_logits(prompt.outline.mask) if prompt.outline is not None else None
        result, _, _ = self.predict(_box_array(prompt.box) if prompt.box is not None else None, coords, labels,
                                    mask_input)
        return clip_to_box(result, prompt.box, prompt.clicks) if prompt.box is not None and clip else result


def _box_with_margin(mask2d: np.ndarray, margin_yx_px: tuple[int, int]) -> np.ndarray:
    rows, cols = np.nonzero(mask2d)
    ny, nx = mask2d.shape
    my, mx = margin_yx_px
    return np.array([max(cols.min() - mx, 0), max(rows.min() - my, 0),
                     min(cols.max() + mx, nx - 1), min(rows.max() + my, ny - 1)], dtype=np.float32)


def _chain_frames(chain: _ChainPredictor, norm: np.ndarray, start_mask: np.ndarray, start: int, step: int, count: int,
                  margin_yx_px: tuple[int, int], overrides: dict[int, tuple[np.ndarray, float]],
                  seen: dict[int, tuple[np.ndarray, np.ndarray]], timer: _Timer
                  ) -> Iterator[tuple[int, np.ndarray, float]]:
    """Slices start+step ... start+step*count, each prompted with the last non-empty mask's box.

    A corrected slice (`overrides`) gives its corrected mask instead. `seen` collects, for the slices
    it names, the box used and sam2's low-res logits (what a correction there refines).
    """
    previous = start_mask
    for i in range(1, count + 1):
        z = start + step * i
        if z in overrides:
            result, score = overrides[z]
        else:
            t_model = time.perf_counter()
            box = _box_with_margin(previous, margin_yx_px)
            chain.set_slice(norm[z])
            result, score, low_res = chain.predict(box=box)
            timer.add("model", time.perf_counter() - t_model)
            if z in seen:
                seen[z] = (box, low_res)
        yield z, result, float(np.clip(score, 0, 1))
        if result.any():
            previous = result


def _chain_pass(chain: _ChainPredictor, norm: np.ndarray, spacing_zyx: tuple[float, float, float],
                prompted: dict[int, np.ndarray], overrides: dict[int, tuple[np.ndarray, float]],
                settings: PropagationConfig, mask: np.ndarray, confidence: np.ndarray,
                seen: dict[int, tuple[np.ndarray, np.ndarray]], timer: _Timer) -> tuple[dict, dict]:
    """Chain from every prompted slice: each gap between two from both ends to its middle, then outward."""
    nz = norm.shape[0]
    margin = (int(np.ceil(settings.sam2.chain_box_margin_mm / spacing_zyx[1])),
              int(np.ceil(settings.sam2.chain_box_margin_mm / spacing_zyx[2])))
    areas = {z: int(m.sum()) for z, m in prompted.items()}
    visited: dict[str, list[int]] = {"increasing_z": [], "decreasing_z": []}
    stop: dict[str, dict[str, Any]] = {}
    slices = sorted(prompted)
    for a, b in zip(slices, slices[1:]):
        middle = (a + b) // 2
        for start, end in ((a, middle), (b, middle + 1)):
            step = 1 if end >= start else -1
            inside = Direction(step < 0, b if step > 0 else a, 0, 0, 0)  # every slice of the gap is before it
            frames = _chain_frames(chain, norm, prompted[start], start, step, abs(end - start), margin, overrides,
                                   seen, timer)
            visited[inside.name] += follow(frames, inside, settings, mask, confidence)["visited"]
    for reverse in DIRECTIONS:
        direction = plan_direction(reverse, areas, nz, spacing_zyx[0], settings)
        frames = _chain_frames(chain, norm, prompted[direction.outermost], direction.outermost, direction.step,
                               direction.limit, margin, overrides, seen, timer)
        record = follow(frames, direction, settings, mask, confidence)
        visited[direction.name] += record.pop("visited")
        stop[direction.name] = record
    return stop, visited


def _propagate_chain(loaded: LoadedModel, norm: np.ndarray, spacing_zyx: tuple[float, float, float],
                     primary: list[SlicePrompt], corrections: list[SlicePrompt], settings: PropagationConfig,
                     timer: _Timer, on_logits: LogitsSink | None) -> tuple[np.ndarray, np.ndarray, dict]:
    chain = _ChainPredictor(loaded)
    nz, ny, nx = norm.shape
    t0 = time.perf_counter()
    prompted: dict[int, np.ndarray] = {}
    for prompt in primary:
        prompted[prompt.z] = chain.segment(norm[prompt.z], prompt, settings.sam2.clip_box_output)
        if not prompted[prompt.z].any():
            raise _no_structure(prompt)
    timer.add("key_slice", time.perf_counter() - t0)
    key_area = int(prompted[primary[0].z].sum())
    overrides: dict[int, tuple[np.ndarray, float]] = {}
    applied: list[dict[str, Any]] = []
    if corrections:
        # Pass 1, the first result; each correction refines what it gave on that slice (box + clicks +
        # its logits as the mask input, SAM's interactive scheme), or starts from its clicks alone.
        seen: dict[int, Any] = {c.z: None for c in corrections}
        _chain_pass(chain, norm, spacing_zyx, prompted, {}, settings, np.zeros((nz, ny, nx), bool),
                    np.zeros(nz, np.float32), seen, timer)
        for correction in corrections:
            coords, labels = _point_arrays(correction.clicks) if correction.clicks is not None else (None, None)
            drawn = _box_array(correction.box) if correction.box is not None else None
            outline = chain.outline_logits(correction.outline.mask) if correction.outline is not None else None
            if correction.outline is not None and correction.clicks is None:
                result, score, outcome = np.asarray(correction.outline.mask, dtype=bool), 1.0, "outline"
            elif seen[correction.z] is not None:  # SAM's interactive step: its last output as the mask input
                box, low_res = seen[correction.z]
                chain.set_slice(norm[correction.z])
                result, score, _ = chain.predict(box if drawn is None else drawn, coords, labels,
                                                 low_res if outline is None else outline)
                outcome = "refined"
            elif correction.positive:
                chain.set_slice(norm[correction.z])
                result, score, _ = chain.predict(drawn, coords, labels, outline)
                outcome = "new_prompt"
            else:
                applied.append({**_correction_record(correction), "applied": "ignored", "area_px": 0})
                continue
            if correction.box is not None and settings.sam2.clip_box_output:
                result = clip_to_box(result, correction.box, correction.clicks)
            applied.append({**_correction_record(correction), "applied": outcome, "area_px": int(result.sum())})
            if correction.positive and result.any():
                prompted[correction.z] = result
            else:
                overrides[correction.z] = (result, float(np.clip(score, 0, 1)))
    mask = np.zeros((nz, ny, nx), dtype=bool)
    confidence = np.zeros(nz, dtype=np.float32)
    for z, result in prompted.items():
        mask[z], confidence[z] = result, 1.0
    stop, visited = _chain_pass(chain, norm, spacing_zyx, prompted, overrides, settings, mask, confidence, {}, timer)
    return mask, confidence, {"stop": stop, "frames_visited": visited, "prompted_slices": sorted(prompted),
                              "corrections": applied, "key_area_px": key_area}


# ----------------------------------------------------------------------------- entry point
def load_configured_model(settings: PropagationConfig) -> LoadedModel:
    """The model `settings` name. Random weights are never used in service: no checkpoint is an error."""
    if settings.checkpoint is None:
        raise CheckpointError("the sam2 backend needs propagation.checkpoint (a SAM2/SAM2.1/MedSAM2 weights file "
                              "on this node; rtprop never downloads weights), or use backend classic/auto")
    return load_model(settings.sam2.model_cfg, settings.checkpoint, settings.sam2.image_size, settings.device,
                      settings.cpu_threads)


def with_weights(settings: PropagationConfig, checkpoint: Path, architecture: str = "",
                 image_size: int | None = None) -> PropagationConfig:
    """The settings that run a registered checkpoint (models/backends.py): its file, its model config and
    input size (the configured ones when the registration left them empty)."""
    sam2 = settings.sam2.model_copy(update={"model_cfg": architecture or settings.sam2.model_cfg,
                                            "image_size": image_size or settings.sam2.image_size})
    return settings.model_copy(update={"backend": "sam2", "checkpoint": Path(checkpoint), "sam2": sam2})


def check_weights(path: Path, settings: PropagationConfig) -> None:
    """`path` loads strictly as the model `settings` name (CheckpointError naming the file otherwise):
    what `rtprop models add` checks before a file is registered. Built on the CPU, not cached."""
    load_model(settings.sam2.model_cfg, path, settings.sam2.image_size, "cpu", settings.cpu_threads, cache=False)


def preprocess(image: np.ndarray, modality: str, settings: PropagationConfig) -> np.ndarray:
    """CT window or MR percentiles -> float32 [0, 1], the seeds' normalisation (8-bit, 3 channels per frame later)."""
    return normalise(image, modality, settings.ct_window_level, settings.ct_window_width,
                     tuple(settings.mr_percentiles))


def keep_prompted_components(mask: np.ndarray, slices: Sequence[int]) -> np.ndarray:
    """The 3D components through the prompted `slices` (on each, the one through its first voxel)."""
    kept = np.zeros_like(mask, dtype=bool)
    for z in slices:
        voxels = np.argwhere(mask[z])
        if len(voxels):
            kept |= largest_component_3d(mask, keep_index=(z, *(int(v) for v in voxels[0])))
    return kept


def propagate(
    image: np.ndarray,
    spacing_zyx: tuple[float, float, float],
    prompts: Prompt | Sequence[Prompt],
    modality: str = "",
    settings: PropagationConfig | None = None,
    loaded: LoadedModel | None = None,
    on_logits: LogitsSink | None = None,
    corrections: Sequence[Prompt] = (),
) -> PropagationResult:
    """Spread `prompts` (on one or more slices) through `image` (z, y, x) with SAM2; mask on the image's own grid.

    `corrections`: a reviewer's prompts on slices without a box or outline, in the order made, added
    after a first propagation on their frames and propagated again (`correction_slices`, module docstring).

    `loaded` lets a caller (tests, bench) pass a model already built; otherwise it is built from
    `settings` (checkpoint, sam2.model_cfg, sam2.image_size, device) and cached. `on_logits`
    receives, in video mode, every frame's video-resolution logits of the final passes as sam2
    yields them (parity checks; soft masks for a review page).
    Raises PromptError for an unusable prompt, CheckpointError for a missing or unfitting checkpoint.
    """
    settings = settings or PropagationConfig()
    image = np.asarray(image)
    primary, clicked = plan_prompts(check_prompts(image.shape, spacing_zyx, prompts))
    for c in corrections:
        check_prompt(image.shape, spacing_zyx, c, negative_only_ok=True)
    corrections = correction_slices(primary, clicked, corrections)
    t_start = time.perf_counter()
    if loaded is None:
        loaded = load_configured_model(settings)
    t_loaded = time.perf_counter()
    norm = preprocess(image, modality, settings)
    timer = _Timer()
    run = _propagate_chain if settings.sam2.mode == "image_chain" else _propagate_video
    with inference_context(loaded.device):
        mask, confidence, info = run(loaded, norm, spacing_zyx, primary, corrections, settings, timer, on_logits)
    t_prop = time.perf_counter()
    if settings.sam2.largest_component:
        mask = keep_prompted_components(mask, info["prompted_slices"])
    if settings.sam2.fill_holes:
        mask = fill_holes_per_slice(mask)
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
            "key_slice": primary[0].z,
            "added_steps": {k: getattr(settings.sam2, k) for k in ADDED_STEPS},
            **info,
            "timings_s": {"load_model": t_loaded - t_start, **timer.totals, "propagation": t_prop - t_loaded,
                          "total": t_end - t_start, "per_slice": (t_prop - t_loaded) / max(n_slices + 1, 1)},
        },
    )

