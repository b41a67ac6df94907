"""Fine-tune the SAM2 backend's model on NPZ volumes (the MedSAM2 layout `converters.volume_io.write_npz` writes).

SAM2's training code is not in the pip package. This is a compact training forward built from the
model's own pieces (`forward_image`, `_prepare_backbone_features`, `_track_step`, the memory
encoder), doing at training time what the backend does at inference time:
- video mode (MedSAM2's scheme; what `propagation.sam2.mode: video` runs): a clip of `clip_frames`
  consecutive slices, starting on a slice of the ROI and going up or down. The first slice is a
  conditioning frame given the reference mask (as the backend's `add_new_mask` on the key slice);
  the others are tracked through the memory bank with gradients through the memory, so memory
  attention, memory encoder and object pointers learn too. Slices past the ROI's end are kept:
  the model learns where a structure stops.
- image mode (STARDUST's scheme; the backend's key slice): one slice, the ROI's bounding box with
  jitter (each side moved by up to `box_jitter` of the box's size) as the prompt.
Loss per frame, as SAM2's trainer has it with BCE in place of focal loss: Dice + BCE of the best of
the multimask outputs (of the one mask for a box), MSE of the IoU head against the real IoU, BCE of
the object score; a frame without the ROI counts the object score only. AdamW, linear warm-up then
cosine decay, gradient clipping, gradient accumulation, bf16 autocast on CUDA only (CPU: float32).

Resumable and deterministic: the samples and the dropout of step s depend only on (seed, s), so
no random state carries from one step to the next; weights, AdamW moments, scheduler and curve are
saved every `save_every` steps to `OUT.state.pt` (atomically). Started again with the same `out`,
a run continues from its last saved step and ends with the same weights as an uninterrupted run.
The finished checkpoint `OUT` is `{"model": state_dict}` (Meta's layout) of the model built by
`models.sam2_loader.load_model`, so `propagation.checkpoint: OUT` loads it strictly.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from config.errors import UserError
from config.schema import PropagationConfig
from converters.volume_io import read_mask, read_npz
from models.preprocess import normalise
from models.sam2_loader import LoadedModel, load_model, sha256_of
from models.sam2_video import to_model_input

LOG = logging.getLogger("rtprop.models.finetune")
BACKEND = "sam2"  # the registered backend (models/backends.py) whose checkpoints this trains
STATE_FORMAT = "rtprop-finetune-state/1"
# The decoder writes -1024 into the masks of frames it scores as "no object"; clamped for the BCE
# so that the curve shows the loss the model can act on (those logits carry no gradient anyway).
LOGIT_CLAMP = 32.0
# Keys of FinetuneSettings that must match for a run to be resumed (the rest may change, e.g. save_every).
RUN_IDENTITY = ("model_cfg", "image_size", "seed", "steps", "lr", "weight_decay", "warmup_fraction", "accumulate",
                "mode", "clip_frames", "box_jitter", "freeze_image_encoder", "freeze_prompt_encoder",
                "grad_clip", "random_init")


class FinetuneError(UserError):
    """Training cannot start or resume (bad data, a different run in the same output); says which file or key."""


@dataclass(frozen=True)
class TrainItem:
    """One ROI of one NPZ volume: `gts == label` is its mask."""

    path: Path
    label: int
    roi: str
    patient: str  # pseudonymous (hashed) patient ID: the unit of the train/validation split


@dataclass
class FinetuneSettings:
    steps: int = 200
    image_size: int = 512
    model_cfg: str = "configs/sam2.1/sam2.1_hiera_t.yaml"
    base: Path | None = None  # checkpoint to start from; None with random_init (tests, benchmarks)
    random_init: bool = False
    seed: int = 0
    lr: float = 1e-5
    weight_decay: float = 0.01
    warmup_fraction: float = 0.05
    accumulate: int = 1  # samples per optimizer step
    mode: Literal["video", "image", "both"] = "video"
    clip_frames: int = 8  # video mode: slices per clip (SAM2 and MedSAM2 train on 8)
    box_jitter: float = 0.1  # image mode: each box side moves by up to this fraction of the box size
    freeze_image_encoder: bool = False
    freeze_prompt_encoder: bool = False
    grad_clip: float = 1.0
    save_every: int = 25
    device: str = "auto"
    cpu_threads: int = 2
    cache_volumes: int = 16  # NPZ volumes kept decoded in memory

    def identity(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items() if k in RUN_IDENTITY}


@dataclass
class TrainResult:
    loaded: LoadedModel  # the trained model, in eval mode, ready for models.sam2_backend.propagate(loaded=...)
    checkpoint: Path
    checkpoint_sha256: str
    base_sha256: str | None
    curve: list[dict[str, float]]
    steps: int
    resumed_from: list[int] = field(default_factory=list)  # steps at which earlier attempts stopped
    seconds: float = 0.0
    device: str = ""


# ----------------------------------------------------------------------------- data
def npz_items(path: Path, names: dict[int, str] | None = None, patient: str | None = None) -> list[TrainItem]:
    """The ROIs of one NPZ: one item per non-zero `gts` label (named `names[label]`, else `label<N>`)."""
    gts = read_mask(path)
    labels = [int(v) for v in np.unique(gts) if v != 0]
    if not labels:
        raise FinetuneError(f"{path}: its 'gts' label map is empty: no ROI to train on")
    who = patient or _default_patient(path)
    return [TrainItem(Path(path), v, (names or {}).get(v, f"label{v}"), who) for v in labels]


def _default_patient(path: Path) -> str:
    """NPZ without a manifest: the study (hashed StudyInstanceUID) is the patient, else the file name."""
    study = read_npz(path).study_instance_uid
    return hashlib.sha256((study or Path(path).stem).encode("utf-8")).hexdigest()


class VolumeCache:
    """Decoded training volumes ((z, y, x) float32 in [0, 1], bool mask), the last `size` kept."""

    def __init__(self, propagation: PropagationConfig, size: int = 16) -> None:
        self.propagation = propagation
        self.size = max(1, size)
        self._volumes: OrderedDict[Path, np.ndarray] = OrderedDict()
        self._masks: dict[tuple[Path, int], np.ndarray] = {}

    def frames(self, path: Path) -> np.ndarray:
        if path in self._volumes:
            self._volumes.move_to_end(path)
            return self._volumes[path]
        volume = read_npz(path)
        image = volume.array
        if image.dtype == np.uint8:  # stored normalised (write_npz normalised=, MedSAM2's own files)
            frames = image.astype(np.float32) / 255.0
        else:
            p = self.propagation
            frames = normalise(image, volume.modality, p.ct_window_level, p.ct_window_width, tuple(p.mr_percentiles))
        self._volumes[path] = frames
        while len(self._volumes) > self.size:
            gone, _ = self._volumes.popitem(last=False)
            self._masks = {k: v for k, v in self._masks.items() if k[0] != gone}
        return frames

    def mask(self, item: TrainItem) -> np.ndarray:
        key = (item.path, item.label)
        if key not in self._masks:
            gts = read_mask(item.path)
            frames = self.frames(item.path)
            if gts.shape != frames.shape:
                raise FinetuneError(f"{item.path}: gts {gts.shape} and imgs {frames.shape} differ")
            self._masks[key] = gts == item.label
            if not self._masks[key].any():
                raise FinetuneError(f"{item.path}: label {item.label} ({item.roi}) is empty")
        return self._masks[key]


@dataclass
class Sample:
    """What one training sample feeds the model: frames, targets, the first frame's prompt."""

    frames: torch.Tensor  # (T, 3, S, S) model input
    targets: torch.Tensor  # (T, 1, S, S) float 0/1
    box: torch.Tensor | None  # (1, 2, 2) box corners in model pixels (image mode), else None
    kind: str  # "video" | "image"
    item: TrainItem
    slices: list[int]


def resize_mask(mask2d: np.ndarray, image_size: int) -> torch.Tensor:
    """A (H, W) mask at model size (1, 1, S, S), as the video predictor's `add_new_mask` resizes it."""
    t = torch.from_numpy(np.ascontiguousarray(mask2d, dtype=np.float32))[None, None]
    if t.shape[-2:] == (image_size, image_size):
        return t
    t = F.interpolate(t, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    return (t >= 0.5).float()


def jittered_box(mask2d: np.ndarray, rng: np.random.Generator, jitter: float) -> tuple[float, float, float, float]:
    """The mask's bounding box (x0, y0, x1, y1, pixel indices), each side moved by up to `jitter` x its size."""
    rows, cols = np.flatnonzero(mask2d.any(axis=1)), np.flatnonzero(mask2d.any(axis=0))
    x0, x1, y0, y1 = float(cols[0]), float(cols[-1]), float(rows[0]), float(rows[-1])
    w, h = x1 - x0 + 1, y1 - y0 + 1
    dx0, dx1 = rng.uniform(-jitter, jitter, 2) * w
    dy0, dy1 = rng.uniform(-jitter, jitter, 2) * h
    ny, nx = mask2d.shape
    x0, x1 = np.clip([x0 + dx0, x1 + dx1], 0, nx - 1)
    y0, y1 = np.clip([y0 + dy0, y1 + dy1], 0, ny - 1)
    return float(min(x0, x1)), float(min(y0, y1)), float(max(x0, x1)), float(max(y0, y1))


def clip_slices(mask: np.ndarray, key: int, length: int, rng: np.random.Generator) -> list[int]:
    """`length` consecutive slices from `key`, up or down (at random; the other way if the volume ends)."""
    nz = mask.shape[0]
    up = list(range(key, min(nz, key + length)))
    down = list(range(key, max(-1, key - length), -1))
    first, second = (up, down) if rng.random() < 0.5 else (down, up)
    return first if len(first) == length or len(first) >= len(second) else second


def draw_sample(items: list[TrainItem], cache: VolumeCache, settings: FinetuneSettings,
                rng: np.random.Generator) -> Sample:
    """One random sample: an item, a slice of its ROI, and a clip (video) or a jittered box (image)."""
    item = items[int(rng.integers(len(items)))]
    frames01, mask = cache.frames(item.path), cache.mask(item)
    present = np.flatnonzero(mask.any(axis=(1, 2)))
    key = int(present[int(rng.integers(len(present)))])
    kind = settings.mode if settings.mode != "both" else ("video" if rng.random() < 0.5 else "image")
    s = settings.image_size
    slices = clip_slices(mask, key, settings.clip_frames, rng) if kind == "video" else [key]
    frames = torch.stack([to_model_input(frames01[z], s) for z in slices])
    targets = torch.cat([resize_mask(mask[z], s) for z in slices])
    box = None
    if kind == "image":
        ny, nx = mask.shape[1:]
        x0, y0, x1, y1 = jittered_box(mask[key], rng, settings.box_jitter)
        box = torch.tensor([[[x0 / nx * s, y0 / ny * s], [x1 / nx * s, y1 / ny * s]]], dtype=torch.float32)
    return Sample(frames, targets, box, kind, item, slices)


# ----------------------------------------------------------------------------- the training forward
def image_features(model: Any, frames: torch.Tensor, frozen_encoder: bool) -> dict[str, Any]:
    """`model.forward_image`, with the Hiera trunk + FPN run without gradients when it is frozen."""
    if not frozen_encoder:
        return model.forward_image(frames)
    with torch.no_grad():
        out = model.image_encoder(frames)
    if model.use_high_res_features_in_sam:  # these two convs belong to the (trainable) mask decoder
        out["backbone_fpn"][0] = model.sam_mask_decoder.conv_s0(out["backbone_fpn"][0])
        out["backbone_fpn"][1] = model.sam_mask_decoder.conv_s1(out["backbone_fpn"][1])
    return out


def frame_loss(mask_logits: torch.Tensor, ious: torch.Tensor, object_logit: torch.Tensor,
               target: torch.Tensor) -> torch.Tensor:
    """Dice + BCE of the best of K masks, IoU-head MSE and object-score BCE (object score only if the ROI is absent).

    mask_logits (1, K, S, S), ious (1, K), object_logit (1, 1), target (1, 1, S, S) of 0/1.
    """
    present = target.sum() > 0
    object_loss = F.binary_cross_entropy_with_logits(object_logit.float().reshape(-1),
                                                     present.float().reshape(-1))
    if not bool(present):
        return object_loss
    logits = mask_logits.float().clamp(-LOGIT_CLAMP, LOGIT_CLAMP)
    t = target.float().expand_as(logits)
    p = torch.sigmoid(logits)
    dice = 1.0 - (2.0 * (p * t).sum((-1, -2)) + 1.0) / (p.sum((-1, -2)) + t.sum((-1, -2)) + 1.0)
    bce = F.binary_cross_entropy_with_logits(logits, t, reduction="none").mean((-1, -2))
    combined = dice + bce  # (1, K)
    best = int(combined.detach().argmin(dim=1)[0])
    with torch.no_grad():
        hard = logits > 0
        truth = t > 0.5
        real_iou = (hard & truth).sum((-1, -2)).float() / (hard | truth).sum((-1, -2)).clamp(min=1).float()
    iou_loss = F.mse_loss(ious.float(), real_iou)
    return combined[0, best] + iou_loss + object_loss


def sample_loss(model: Any, sample: Sample, frozen_encoder: bool) -> torch.Tensor:
    """Mean frame loss of one sample, through the same model calls SAM2's predictors make."""
    device = model.device
    frames = sample.frames.to(device)
    targets = sample.targets.to(device)
    backbone = image_features(model, frames, frozen_encoder)
    _, feats, pos, sizes = model._prepare_backbone_features(backbone)
    n = frames.shape[0]
    output_dict: dict[str, dict[int, Any]] = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
    losses = []
    for t in range(n):
        cur_feats = [f[:, t:t + 1] for f in feats]
        cur_pos = [p[:, t:t + 1] for p in pos]
        points = mask_in = None
        if t == 0 and sample.box is not None:
            points = {"point_coords": sample.box.to(device),
                      "point_labels": torch.tensor([[2, 3]], dtype=torch.int32, device=device)}
        elif t == 0:
            mask_in = targets[0:1]  # the key slice's accepted mask, as add_new_mask gives it
        current, sam_out, _, _ = model._track_step(t, t == 0, cur_feats, cur_pos, sizes, points, mask_in,
                                                   output_dict, n, False, None)
        _, high_multi, ious, low, high, obj_ptr, object_logit = sam_out
        current.update(pred_masks=low, pred_masks_high_res=high, obj_ptr=obj_ptr)
        if n > 1:  # the memory of this frame, for the frames after it (training: sigmoid, never binarised)
            model._encode_memory_in_output(cur_feats, sizes, points, True, high, object_logit, current)
        output_dict["cond_frame_outputs" if t == 0 else "non_cond_frame_outputs"][t] = current
        if mask_in is None:  # a mask given as input comes straight back out: nothing to learn there
            losses.append(frame_loss(high_multi, ious, object_logit, targets[t:t + 1]))
    return torch.stack(losses).mean()


def lr_factor(step: int, steps: int, warmup_fraction: float) -> float:
    """Linear warm-up over the first `warmup_fraction` of the steps, then cosine decay towards 0."""
    warmup = max(1, int(round(warmup_fraction * steps)))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def step_seed(seed: int, step: int, micro: int) -> int:
    """The seed of one sample: a function of (seed, step, micro-batch) only, so a resumed run draws the same."""
    digest = hashlib.sha256(f"{seed}:{step}:{micro}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def freeze(model: Any, settings: FinetuneSettings) -> list[torch.nn.Parameter]:
    """Mark frozen parts; returns the trainable parameters in the model's own (stable) order."""
    model.requires_grad_(True)
    if settings.freeze_image_encoder:
        model.image_encoder.requires_grad_(False)
    if settings.freeze_prompt_encoder:
        model.sam_prompt_encoder.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def autocast(device: torch.device):  # type: ignore[no-untyped-def]
    """bf16 on CUDA (as the backend runs there), plain float32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def build_model(settings: FinetuneSettings) -> LoadedModel:
    """The model exactly as the SAM2 backend builds it (`load_model`), from `base` or seeded random weights."""
    if settings.base is None and not settings.random_init:
        raise FinetuneError("give a base checkpoint (--base CKPT, e.g. MedSAM2 or SAM2.1 tiny weights on this node) "
                            "or --random-init (tests and benchmarks only)")
    if settings.base is not None and settings.random_init:
        raise FinetuneError("--base and --random-init exclude each other")
    return load_model(settings.model_cfg, settings.base, settings.image_size, settings.device, settings.cpu_threads,
                      seed=settings.seed, cache=False)


# ----------------------------------------------------------------------------- files
def state_path(out: Path) -> Path:
    return Path(f"{out}.state.pt")


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def cpu_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}


def data_fingerprint(items: list[TrainItem]) -> str:
    """What the run trains on (files, labels, patients): a resumed run must see the same."""
    text = "\n".join(f"{i.path.name}|{i.label}|{i.roi}|{i.patient}" for i in items)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _check_resumable(state: dict[str, Any], settings: FinetuneSettings, items: list[TrainItem], path: Path,
                     base_sha256: str | None) -> None:
    if state.get("format") != STATE_FORMAT:
        raise FinetuneError(f"{path} is not an rtprop fine-tuning state ({state.get('format')!r})")
    saved = state.get("settings", {})
    for key, value in settings.identity().items():
        if saved.get(key) != value:
            raise FinetuneError(f"{path} holds a run with {key}={saved.get(key)!r}, this one has {value!r}: resume "
                                f"with the same options, or give another --out")
    if state.get("base_sha256") != base_sha256:
        raise FinetuneError(f"{path} started from base checkpoint sha256 {str(state.get('base_sha256'))[:12]}..., "
                            f"this run's --base has {str(base_sha256)[:12]}...: give another --out")
    if state.get("data") != data_fingerprint(items):
        raise FinetuneError(f"{path} was trained on other data than this run's {len(items)} ROIs: give another --out")


# ----------------------------------------------------------------------------- the loop
def train(items: list[TrainItem], out: Path, settings: FinetuneSettings,
          propagation: PropagationConfig | None = None, progress: bool = True,
          on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Fine-tune on `items` for `settings.steps` optimizer steps; write `out` (and `out.state.pt` on the way)."""
    if not items:
        raise FinetuneError("no training ROIs: nothing to fine-tune on")
    if settings.steps < 1 or settings.accumulate < 1 or settings.clip_frames < 1:
        raise FinetuneError("--steps, --accumulate and --clip-frames must be at least 1")
    out = Path(out)
    items = sorted(items, key=lambda i: (str(i.path), i.label))
    started = time.perf_counter()
    loaded = build_model(settings)
    model, device = loaded.model, loaded.device
    base_sha = loaded.checkpoint_sha256
    params = freeze(model, settings)
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, settings.steps, settings.warmup_fraction))
    step, curve, resumed = 0, [], []
    saved = state_path(out)
    if saved.is_file():
        state = torch.load(saved, map_location="cpu", weights_only=True)
        _check_resumable(state, settings, items, saved, base_sha)
        model.load_state_dict(state["model"], strict=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, curve, resumed = int(state["step"]), list(state["curve"]), list(state.get("resumed_from", []))
        if step < settings.steps:
            resumed.append(step)
        LOG.info("resuming %s at step %d of %d", out, step, settings.steps)
    started_at = step
    cache = VolumeCache(propagation or PropagationConfig(), settings.cache_volumes)

    def save(at: int) -> None:
        _atomic_save({"format": STATE_FORMAT, "step": at, "model": cpu_state_dict(model),
                      "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "curve": curve,
                      "settings": settings.identity(), "data": data_fingerprint(items), "base_sha256": base_sha,
                      "resumed_from": resumed}, saved)

    bar = None
    if progress and step < settings.steps:
        from tqdm import tqdm

        bar = tqdm(total=settings.steps, initial=step, desc="rtprop finetune", unit="step")
    model.train()
    if settings.freeze_image_encoder:
        model.image_encoder.eval()
    while step < settings.steps:
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(settings.accumulate):
            seed = step_seed(settings.seed, step, micro)
            torch.manual_seed(seed)  # dropout in memory attention: a function of the step, not of history
            sample = draw_sample(items, cache, settings, np.random.default_rng(seed))
            with autocast(device):
                loss = sample_loss(model, sample, settings.freeze_image_encoder) / settings.accumulate
            loss.backward()
            total += float(loss.detach())
        if settings.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        step += 1
        curve.append({"step": step, "loss": round(total, 6), "lr": lr})
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"loss={total:.4f} lr={lr:.2e}")
        if step % max(1, settings.save_every) == 0 or step == settings.steps:
            save(step)
        if on_step is not None:
            on_step(step, total)
    if bar is not None:
        bar.close()
    model.eval()
    finished_before = started_at >= settings.steps
    if not (finished_before and out.is_file()):  # a finished run started again keeps its file (and its sha256)
        _atomic_save({"model": cpu_state_dict(model)}, out)
    digest = sha256_of(out)
    loaded = LoadedModel(model, device, loaded.image_size, loaded.config_name, out, digest)
    return TrainResult(loaded, out, digest, base_sha, curve, step, resumed, time.perf_counter() - started, str(device))


def fixed_loss(model: Any, items: list[TrainItem], settings: FinetuneSettings, propagation: PropagationConfig,
               samples: int = 8, seed: int = 12345) -> float:
    """Mean loss of the same `samples` samples (drawn with `seed`), in eval mode: a before/after comparison."""
    cache = VolumeCache(propagation, settings.cache_volumes)
    was_training = model.training
    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(samples):
            sample = draw_sample(sorted(items, key=lambda it: (str(it.path), it.label)), cache, settings,
                                 np.random.default_rng([seed, i]))
            with autocast(model.device):
                total += float(sample_loss(model, sample, settings.freeze_image_encoder))
    model.train(was_training)
    return total / samples
