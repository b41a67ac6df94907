"""Cine-MR tumour tracking: the first frame's mask followed through a 2D+t sequence, streamed.

Frames come one at a time from a `converters.cine.CineSource`; each frame's mask goes to a sink
(normally `converters.cine.CineLabelWriter`) and is not kept, so memory does not grow with the
sequence (TrackRAD2025 sequences reach 20,000 frames).

Backends (`propagation.backend`, `auto` = sam2 when a checkpoint is set; each registered in
models/backends.py with its tracker):
- classic, `cine.classic_method`:
  - `ecc` (default): the region around the first-frame mask (a template from frame 0) is found in
    each frame by normalised cross-correlation (coarse, any shift within `cine.roi_margin_mm` of the
    last position), then refined to an affine motion by OpenCV's ECC maximisation weighted to the
    tumour and a ring around it; the first-frame mask is warped by that affine. Always registered
    to frame 0, so errors do not accumulate. Confidence: ECC's correlation coefficient. A frame
    whose affine stage fails is placed by the cross-correlation (translation) alone and says so:
    a log line, a `TrackingFallbackWarning`, `TrackingSummary.warnings`, the frames counted in
    `details["translation_only_frames"]` and a confidence of at most FALLBACK_CONFIDENCE_MAX.
  - `flow`: dense Farneback optical flow from each frame back to frame 0 over that region; the
    first-frame mask is pulled through the flow (handles deformation, costs more, drifts less
    gracefully when the tumour leaves the region). Confidence: the correlation of frame 0, carried
    by the flow, with the frame around the tumour.
- sam2: the video predictor with the first-frame mask as its only conditioning frame, frames fed
  lazily and the memory bank trimmed to what SAM2 can still attend to (models/sam2_video.py).
"""
from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from scipy import ndimage

from config.schema import PropagationConfig
from converters.cine import CineSource
from models.prompts import PromptError

LOG = logging.getLogger("rtprop.models.tracking")

Sink = Callable[[int, np.ndarray, float, float], Any]  # (frame, mask, confidence, latency_ms)
TEMPLATE_MARGIN_MM = 6.0  # around the tumour's box: the template must include its edges and some surroundings
ECC_CRITERIA = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 40, 1e-4)
# An affine that shrinks the tumour below 0.7 or stretches it beyond 1.4 x frame 0's size along any
# direction is a failed fit (ECC collapsed or blew up the template), not breathing motion.
STRETCH_RANGE = (0.7, 1.4)
# A frame placed by translation alone reports at most this (x its cross-correlation score): its shape
# was not followed, and this is below the 0.3 under which models/guard.py calls a confidence low.
FALLBACK_CONFIDENCE_MAX = 0.25


class TrackingFallbackWarning(UserWarning):
    """Frames of a cine sequence were placed by translation alone: the affine stage failed on them."""


class AffineRefused(Exception):
    """The ECC affine stage failed or gave an implausible affine on a frame; the message says which."""


@dataclass
class TrackingSummary:
    name: str
    backend: str  # "classic" or "sam2"
    method: str  # ecc | flow | sam2 model config
    n_frames: int
    latency_ms_mean: float
    latency_ms_p95: float
    labels_path: Path | None = None
    csv_path: Path | None = None
    checkpoint_sha256: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # what a reader must know (frames not tracked as stated)


def _scaling(frame0: np.ndarray) -> tuple[float, float]:
    """Intensity window from the first frame (fixed for the sequence, so the template stays comparable)."""
    lo, hi = np.percentile(frame0, [1.0, 99.5])
    return float(lo), float(hi if hi > lo else lo + 1.0)


def _unit(frame: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.clip((np.asarray(frame, np.float32) - lo) / (hi - lo), 0.0, 1.0)


def _shape_frame(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(W, W^-1), W the square root of the mask's (x, y) covariance: the tumour's own axes and extents.

    In these coordinates the tumour is round, so an affine's effect on its shape is W^-1 A W's stretch.
    """
    values, vectors = np.linalg.eigh(np.cov(np.nonzero(mask)[::-1]))
    root = np.sqrt(np.clip(values, 1.0 / 12, None))  # 1/12 px^2: the variance of one pixel's width
    return vectors @ np.diag(root) @ vectors.T, vectors @ np.diag(1.0 / root) @ vectors.T


def _ranges(frames: Sequence[int], limit: int = 20) -> str:
    """Frame numbers as runs ("1-4, 9"), at most `limit` runs (a 20,000-frame sequence stays readable)."""
    runs: list[list[int]] = []
    for t in frames:
        if runs and t == runs[-1][1] + 1:
            runs[-1][1] = t
        else:
            runs.append([t, t])
    text = ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs[:limit])
    return text + (f", ... ({len(runs) - limit} more runs)" if len(runs) > limit else "")


def _bbox(mask: np.ndarray, margin_yx: tuple[int, int]) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(mask)
    ny, nx = mask.shape
    return (max(rows.min() - margin_yx[0], 0), min(rows.max() + margin_yx[0] + 1, ny),
            max(cols.min() - margin_yx[1], 0), min(cols.max() + margin_yx[1] + 1, nx))


def check_first_mask(first_mask: np.ndarray, source: CineSource) -> np.ndarray:
    mask = np.asarray(first_mask).astype(bool)
    if mask.shape != tuple(source.shape):
        raise PromptError(f"{source.name}: first-frame mask {mask.shape} does not match the frames {source.shape}")
    if not mask.any():
        raise PromptError(f"{source.name}: the first-frame mask is empty: nothing to track")
    if source.n_frames < 1:
        raise PromptError(f"{source.name}: the sequence has no frames")
    return mask


# ----------------------------------------------------------------------------- classic
@dataclass(frozen=True)
class FrameTrack:
    """One frame's result from a classic tracker."""

    mask: np.ndarray
    confidence: float  # in [0, 1]
    fallback: str | None = None  # why the frame was placed by translation alone; None: the full method ran


class EccTracker:
    """Template from frame 0 around the mask; per frame: NCC search, then affine ECC refinement.

    A frame whose affine stage fails (ECC raises, or its affine stretches the tumour beyond
    STRETCH_RANGE) keeps the cross-correlation placement, says why in `FrameTrack.fallback` and
    reports at most FALLBACK_CONFIDENCE_MAX.
    """

    def __init__(self, frame0: np.ndarray, mask0: np.ndarray, spacing_mm: tuple[float, float], search_mm: float):
        self.lo, self.hi = _scaling(frame0)
        self.shape = mask0.shape
        tm = (int(np.ceil(TEMPLATE_MARGIN_MM / spacing_mm[0])), int(np.ceil(TEMPLATE_MARGIN_MM / spacing_mm[1])))
        r0, r1, c0, c1 = _bbox(mask0, tm)
        unit0 = _unit(frame0, self.lo, self.hi)
        self.template = np.ascontiguousarray(unit0[r0:r1, c0:c1])
        self.mask_tpl = mask0[r0:r1, c0:c1].astype(np.float32)
        # ECC weights: the tumour and a ring of ~TEMPLATE_MARGIN around it, where its edges are.
        ring = ndimage.binary_dilation(mask0, iterations=max(tm))[r0:r1, c0:c1]
        self.weights = ring.astype(np.uint8)
        self.search = (int(np.ceil(search_mm / spacing_mm[0])), int(np.ceil(search_mm / spacing_mm[1])))
        self.warp = np.array([[1, 0, c0], [0, 1, r0]], dtype=np.float32)  # template (x, y) -> frame (x, y)
        self.center_tpl = np.array([(c1 - c0 - 1) / 2.0, (r1 - r0 - 1) / 2.0], dtype=np.float32)
        self.shape_frame = _shape_frame(self.mask_tpl)

    def _coarse(self, unit: np.ndarray) -> tuple[np.ndarray, float]:
        """Translation-only placement by normalised cross-correlation within the search window, and its score."""
        th, tw = self.template.shape
        ny, nx = unit.shape
        cx, cy = self.warp[:, :2] @ self.center_tpl + self.warp[:, 2]
        top, left = int(round(cy - (th - 1) / 2)), int(round(cx - (tw - 1) / 2))
        r0, c0 = max(top - self.search[0], 0), max(left - self.search[1], 0)
        r1, c1 = min(top + th + self.search[0], ny), min(left + tw + self.search[1], nx)
        if r1 - r0 < th or c1 - c0 < tw:
            return self.warp.copy(), 0.0
        score = cv2.matchTemplate(unit[r0:r1, c0:c1], self.template, cv2.TM_CCOEFF_NORMED)
        _, best, _, (bx, by) = cv2.minMaxLoc(score)
        if not best > 0:  # nothing in the window resembles the template (a blank frame): stay where it was
            return self.warp.copy(), 0.0
        matched_center = np.array([c0 + bx + (tw - 1) / 2.0, r0 + by + (th - 1) / 2.0], dtype=np.float32)
        warp = self.warp.copy()
        warp[:, 2] = matched_center - warp[:, :2] @ self.center_tpl
        return warp, float(best)

    def _affine(self, unit: np.ndarray, warp: np.ndarray) -> tuple[np.ndarray, float]:
        """ECC affine refinement from `warp`; raises AffineRefused with the reason when it fails."""
        try:
            # The template mask is the ring weights; the input mask (valid frame pixels) is all of it.
            rho, refined = cv2.findTransformECCWithMask(self.template, unit, self.weights, None, warp.copy(),
                                                        cv2.MOTION_AFFINE, ECC_CRITERIA, 3)
        except cv2.error as exc:  # no convergence, NaN (a blank frame), or an API mismatch: each is named
            raise AffineRefused(f"ECC failed: {exc.err.split('. ')[0].rstrip('.')[:120]}") from None
        linear = refined[:, :2].astype(np.float64)
        # Judged on the tumour, not on the parameters: an elliptic tumour is matched equally well by a
        # family of affines (rotations and shears that map it onto itself), all giving its mask; in the
        # tumour's own axes they are rotations, stretch 1.
        w, w_inv = self.shape_frame
        stretch = np.linalg.svd(w_inv @ linear @ w, compute_uv=False)
        low, high = STRETCH_RANGE
        if np.linalg.det(linear) <= 0 or stretch.min() < low or stretch.max() > high:
            LOG.debug("affine refused: stretch %.2f-%.2f, det %.2f", *stretch[::-1], np.linalg.det(linear))
            raise AffineRefused(f"affine stretches the tumour outside x{low}-{high}, or mirrors it")
        return refined, float(rho)

    def step(self, frame: np.ndarray) -> FrameTrack:
        unit = _unit(frame, self.lo, self.hi)
        warp, ncc = self._coarse(unit)
        fallback = None
        try:
            warp, rho = self._affine(unit, warp)
            confidence = rho
        except AffineRefused as refused:
            fallback = str(refused)
            confidence = FALLBACK_CONFIDENCE_MAX * ncc
        self.warp = warp.astype(np.float32)
        moved = cv2.warpAffine(self.mask_tpl, self.warp, (self.shape[1], self.shape[0]), flags=cv2.INTER_LINEAR)
        return FrameTrack(moved >= 0.5, float(np.clip(confidence, 0.0, 1.0)), fallback)


class FlowTracker:
    """Dense Farneback flow from each frame back to frame 0 over the region around the mask."""

    def __init__(self, frame0: np.ndarray, mask0: np.ndarray, spacing_mm: tuple[float, float], search_mm: float):
        self.lo, self.hi = _scaling(frame0)
        self.shape = mask0.shape
        margin = (int(np.ceil(search_mm / spacing_mm[0])), int(np.ceil(search_mm / spacing_mm[1])))
        self.r0, self.r1, self.c0, self.c1 = _bbox(mask0, margin)
        self.ref8 = self._u8(frame0)
        self.mask_roi = mask0[self.r0:self.r1, self.c0:self.c1].astype(np.float32)
        gy, gx = np.mgrid[0:self.r1 - self.r0, 0:self.c1 - self.c0].astype(np.float32)
        self.grid = (gx, gy)
        self.levels = int(np.clip(np.log2(max(margin) / 2.0 + 1), 2, 5))
        tm = int(np.ceil(TEMPLATE_MARGIN_MM / min(spacing_mm)))
        self.ring = ndimage.binary_dilation(mask0, iterations=tm)[self.r0:self.r1, self.c0:self.c1].astype(np.uint8)

    def _u8(self, frame: np.ndarray) -> np.ndarray:
        return (255 * _unit(frame, self.lo, self.hi)[self.r0:self.r1, self.c0:self.c1]).astype(np.uint8)

    def step(self, frame: np.ndarray) -> FrameTrack:
        moving8 = self._u8(frame)
        flow = cv2.calcOpticalFlowFarneback(moving8, self.ref8, None, 0.5, self.levels, 15, 3, 5, 1.1, 0)
        map_x, map_y = self.grid[0] + flow[..., 0], self.grid[1] + flow[..., 1]
        pulled = cv2.remap(self.mask_roi, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        out = np.zeros(self.shape, dtype=bool)
        out[self.r0:self.r1, self.c0:self.c1] = pulled >= 0.5
        # Confidence: how well frame 0, carried by the same flow, matches this frame around the tumour.
        carried = cv2.remap(self.ref8, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        ring = cv2.remap(self.ring, map_x, map_y, cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        rho = cv2.computeECC(carried, moving8, ring) if ring.any() else 0.0
        return FrameTrack(out, float(np.clip(rho if np.isfinite(rho) else 0.0, 0.0, 1.0)))


def track_classic(source: CineSource, mask0: np.ndarray, settings: PropagationConfig, sink: Sink,
                  loaded: Any = None) -> dict:
    frame0 = source.frame(0)
    method = settings.cine.classic_method
    tracker = (FlowTracker if method == "flow" else EccTracker)(frame0, mask0, source.spacing_mm,
                                                                settings.cine.roi_margin_mm)
    sink(0, mask0, 1.0, 0.0)
    latencies: list[float] = []
    fallbacks: dict[str, list[int]] = {}  # reason -> frames placed by translation alone
    for t in range(1, source.n_frames):
        frame = source.frame(t)
        t0 = time.perf_counter()
        result = tracker.step(frame)
        latencies.append((time.perf_counter() - t0) * 1000)
        if result.fallback is not None:
            if not fallbacks:
                LOG.info("%s: frame %d placed by translation only (%s)", source.name, t, result.fallback)
            fallbacks.setdefault(result.fallback, []).append(t)
        sink(t, result.mask, result.confidence, latencies[-1])
    n_fallback = sum(len(frames) for frames in fallbacks.values())
    info: dict[str, Any] = {"method": method, "latencies_ms": latencies}
    if method == "ecc":
        info["affine_frames"] = source.n_frames - 1 - n_fallback
        info["translation_only_frames"] = {reason: _ranges(frames) for reason, frames in fallbacks.items()}
    if n_fallback:
        message = (f"{source.name}: {n_fallback} of {source.n_frames - 1} frames placed by translation only, "
                   f"their confidence <= {FALLBACK_CONFIDENCE_MAX}: "
                   + "; ".join(f"{reason} (frames {_ranges(frames)})" for reason, frames in fallbacks.items()))
        LOG.warning("%s", message)
        warnings.warn(message, TrackingFallbackWarning, stacklevel=3)
        info["warnings"] = [message]
    return info


# ----------------------------------------------------------------------------- sam2
def track_sam2(source: CineSource, mask0: np.ndarray, settings: PropagationConfig, sink: Sink,
                loaded: Any = None) -> dict:
    import torch

    from models.device import inference_context
    from models.sam2_backend import load_configured_model
    from models.sam2_video import (
        LazyFrames,
        init_state_in_memory,
        memory_window,
        state_frame_count,
        trim_memory,
    )

    if loaded is None:
        loaded = load_configured_model(settings)
    predictor = loaded.model
    lo, hi = _scaling(source.frame(0))
    frames = LazyFrames(lambda t: _unit(source.frame(t), lo, hi), source.n_frames, loaded.image_size)
    window = memory_window(predictor)
    latencies: list[float] = []
    held_max = 0
    with inference_context(loaded.device):
        state = init_state_in_memory(predictor, frames, *source.shape, offload_state_to_cpu=True)
        predictor.add_new_mask(state, frame_idx=0, obj_id=1, mask=torch.from_numpy(mask0))
        t0 = time.perf_counter()
        for t, _, logits in predictor.propagate_in_video(state, start_frame_idx=0):
            logit2d = logits[0, 0]
            mask = (logit2d > 0).cpu().numpy()
            confidence = float(torch.sigmoid(logit2d[logit2d > 0].float()).mean()) if mask.any() else 0.0
            trim_memory(state, int(t), False, window)
            held_max = max(held_max, state_frame_count(state))
            latency = (time.perf_counter() - t0) * 1000
            if t > 0:
                latencies.append(latency)
            sink(int(t), mask0 if t == 0 else mask, 1.0 if t == 0 else confidence, 0.0 if t == 0 else latency)
            t0 = time.perf_counter()
        predictor.reset_state(state)
    return {"method": loaded.config_name, "latencies_ms": latencies, "memory_window_frames": window,
            "max_frames_held": held_max, "checkpoint_sha256": loaded.checkpoint_sha256,
            "image_size": loaded.image_size}


# ----------------------------------------------------------------------------- entry points
def track(source: CineSource, first_mask: np.ndarray, settings: PropagationConfig | None = None,
          sink: Sink | None = None, loaded: Any = None) -> TrackingSummary:
    """Follow `first_mask` (frame 0, (rows, cols) bool) through `source`; each frame's mask goes to `sink`.

    Frame 0's output is the given mask. `loaded` (a models.sam2_loader.LoadedModel) overrides the
    configured SAM2 model (tests, bench). Frames not tracked by the stated method are named in the
    summary's `warnings` (and a TrackingFallbackWarning).
    """
    from models import backends

    settings = settings or PropagationConfig()
    mask0 = check_first_mask(first_mask, source)
    sink = sink or (lambda *args: None)
    spec = backends.choose(settings, has_weights=True if loaded is not None else None)
    backend = spec.name
    t_start = time.perf_counter()
    info = spec.track()(source, mask0, settings, sink, loaded)
    latencies = np.asarray(info.pop("latencies_ms") or [0.0])
    return TrackingSummary(
        name=source.name, backend=backend, method=str(info.get("method")), n_frames=source.n_frames,
        latency_ms_mean=float(latencies.mean()), latency_ms_p95=float(np.percentile(latencies, 95)),
        checkpoint_sha256=info.pop("checkpoint_sha256", None), warnings=info.pop("warnings", []),
        details={**info, "total_s": time.perf_counter() - t_start, "frame_rate_hz": source.frame_rate_hz},
    )
