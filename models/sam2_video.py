"""SAM2's video predictor fed from memory, with a bounded memory bank.

sam2's `init_state` only reads JPEG folders or MP4 files and preloads every frame at model
resolution (3 x 1024 x 1024 float32 = 12 MB a frame). Like MedSAM2's NPZ predictor we build the same
inference-state dict ourselves, but with a lazy frame source: a frame is made into the model input
when the model first asks for it, and only the last few are kept. That input is exactly what
sam2's own loader makes of the slice saved as a lossless 8-bit image (`to_model_input`; held to it
by tests/test_sam2_parity.py). `trim_memory` drops the per-frame outputs that SAM2 can no longer
attend to (it only reads the last `num_maskmem` memories and `max_obj_ptrs_in_encoder` object
pointers), so the state stays the same size however long the sequence (facebookresearch/sam2 #196,
#264).
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Collection
from typing import Any

import numpy as np

# sam2 wraps propagate_in_video in a tqdm bar: one progress line per direction per job in a
# service log. Silence it for the whole process (we report progress through details/CSV).
import sam2.sam2_video_predictor as _svp
import torch
from PIL import Image

_svp.tqdm = lambda iterable, *args, **kwargs: iterable

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _value_table() -> np.ndarray:
    """(3, 256) float32: an 8-bit grey level -> its model input per channel, by sam2's own arithmetic.

    sam2's frame loader (utils/misc.py `_load_img_as_tensor` + `load_video_frames_from_jpg_images`)
    divides the uint8 image by 255.0 in float64, stores it in a float32 tensor, then subtracts the
    float32 ImageNet mean and divides by the float32 std in place. The same operations on the 256
    possible values give the same float32 numbers, so a table lookup is exact.
    """
    levels = torch.zeros(256, dtype=torch.float32)
    levels[:] = torch.from_numpy(np.arange(256) / 255.0)  # float64 -> float32 as `images[n] = img` does
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32)[:, None]
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32)[:, None]
    table = levels[None].repeat(3, 1)
    table -= mean
    table /= std
    return table.numpy()


_VALUES = _value_table()


def to_uint8(frame01: np.ndarray) -> np.ndarray:
    """A frame in [0, 1] -> 8-bit grey, truncated as MedSAM2's CT/MR scripts do (`np.uint8(x * 255)`)."""
    return (np.clip(np.asarray(frame01, dtype=np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)


def to_model_input(frame01: np.ndarray, image_size: int) -> torch.Tensor:
    """A (H, W) frame in [0, 1] -> (3, S, S) float32, exactly what sam2's `init_state` makes of it as an image file.

    8-bit grey (`to_uint8`), resized by PIL's `resize((S, S))` with its default filter (bicubic), as
    sam2's loader does after `convert("RGB")` (the three channels of a grey image resize alike), then
    /255 and ImageNet mean/std in float32 on the CPU (`_value_table`). A slice already S x S is not
    resampled (PIL returns a copy).
    """
    grey = to_uint8(frame01)
    if grey.shape != (image_size, image_size):
        grey = np.asarray(Image.fromarray(grey).resize((image_size, image_size)))
    return torch.from_numpy(_VALUES[:, grey])


class LazyFrames:
    """`inference_state["images"]`: len() and [i] like sam2's preloaded tensor, computed on demand.

    `get_frame(i)` returns frame i as a (H, W) float array in [0, 1]; at most `keep` model inputs are cached.
    """

    def __init__(self, get_frame: Callable[[int], np.ndarray], num_frames: int, image_size: int, keep: int = 2):
        self._get_frame = get_frame
        self._num_frames = int(num_frames)
        self._image_size = int(image_size)
        self._keep = keep
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self.encoded = 0  # frames preprocessed so far (a count, not a list: cine runs are long)

    def __len__(self) -> int:
        return self._num_frames

    def __getitem__(self, index: int) -> torch.Tensor:
        index = int(index)
        if not 0 <= index < self._num_frames:
            raise IndexError(index)
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        self.encoded += 1
        tensor = to_model_input(self._get_frame(index), self._image_size)
        self._cache[index] = tensor
        while len(self._cache) > self._keep:
            self._cache.popitem(last=False)
        return tensor


def init_state_in_memory(predictor: Any, frames: LazyFrames, height: int, width: int,
                         offload_state_to_cpu: bool = True) -> dict[str, Any]:
    """The inference state of `SAM2VideoPredictor.init_state`, but for frames we already hold.

    Same keys as sam2 1.x's init_state (checked by the tests against a real predictor); frames are
    lazy, the per-frame outputs live on the CPU (`offload_state_to_cpu`) and the first frame is not
    pre-encoded (sam2 warms frame 0 up; our prompt is rarely on frame 0).
    """
    device = predictor.device
    state: dict[str, Any] = {
        "images": frames,
        "num_frames": len(frames),
        "offload_video_to_cpu": True,
        "offload_state_to_cpu": offload_state_to_cpu,
        "video_height": int(height),
        "video_width": int(width),
        "device": device,
        "storage_device": torch.device("cpu") if offload_state_to_cpu else device,
        "point_inputs_per_obj": {},
        "mask_inputs_per_obj": {},
        "cached_features": {},
        "constants": {},
        "obj_id_to_idx": OrderedDict(),
        "obj_idx_to_id": OrderedDict(),
        "obj_ids": [],
        "output_dict_per_obj": {},
        "temp_output_dict_per_obj": {},
        "frames_tracked_per_obj": {},
    }
    return state


def memory_window(predictor: Any) -> int:
    """How many frames back SAM2 can still read: its mask memories and its object pointers."""
    stride = int(getattr(predictor, "memory_temporal_stride_for_eval", 1))
    return max(int(predictor.num_maskmem) * stride, int(getattr(predictor, "max_obj_ptrs_in_encoder", 16))) + 1


def trim_memory(state: dict[str, Any], current_frame: int, reverse: bool, window: int,
                keep: Collection[int] = ()) -> int:
    """Drop non-conditioning outputs more than `window` frames behind `current_frame`; return how many.

    Conditioning frames (the prompts) and the frames in `keep` (a later pass or a correction reads
    them) are always kept. Also trims the per-frame tracking metadata (which sam2 reads only when
    clicks are added on a frame already tracked).
    """
    dropped = 0
    for obj_output in state["output_dict_per_obj"].values():
        non_cond = obj_output["non_cond_frame_outputs"]
        stale = [t for t in non_cond if t not in keep
                 and (t < current_frame - window if not reverse else t > current_frame + window)]
        for t in stale:
            del non_cond[t]
        dropped += len(stale)
    for tracked in state["frames_tracked_per_obj"].values():
        stale = [t for t in tracked if abs(t - current_frame) > window and t not in keep]
        for t in stale:
            del tracked[t]
    return dropped


def state_frame_count(state: dict[str, Any]) -> int:
    """Per-frame outputs held in the state (for the memory-boundedness checks)."""
    return sum(len(o["non_cond_frame_outputs"]) + len(o["cond_frame_outputs"])
               for o in state["output_dict_per_obj"].values())
