"""Build a SAM2 model from the `sam2` package's own configs and load a checkpoint strictly.

- Configs: any yaml shipped inside the sam2 package (SAM2 and SAM2.1 tiny/small/base+/large, e.g.
  `configs/sam2.1/sam2.1_hiera_t.yaml`), a short alias (`tiny`, `small`, `base_plus`, `large`,
  `sam2_tiny`...), MedSAM2's `sam2.1_hiera_t512` (the tiny config at 512 px, built here by hydra
  overrides since the package ships no such yaml), or a path to a yaml file of the same schema.
- The input size is always `settings.sam2.image_size`: the model's `image_size` and the memory
  attention's RoPE `feat_sizes` (image_size / 16) are overridden to match, as MedSAM2's 512 config does.
- Checkpoint layouts accepted: a plain state dict; Meta's `{"model": sd}` (also TrackRAD2025's
  `SAM2.1_b+_finetune.pt`); `{"model_state_dict": sd}` / `{"state_dict": sd}` with keys prefixed
  `sam2_model.`, `model.` or `module.` (STARDUST, Lightning, DDP). Loading is strict: any
  missing/unexpected key or shape mismatch is a CheckpointError naming some of them.
- Nothing is downloaded: a missing file is a CheckpointError naming the file and its folder.
- Files are read with `torch.load(weights_only=True)`: no pickled code from a checkpoint runs.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models.checkpoint_file import CheckpointError, sha256_of  # noqa: F401 - defined without torch, used from here
from models.device import choose_device

VIDEO_PREDICTOR_TARGET = "sam2.sam2_video_predictor.SAM2VideoPredictor"

CONFIG_ALIASES: dict[str, str] = {
    "tiny": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "small": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "base_plus": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "base+": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "large": "configs/sam2.1/sam2.1_hiera_l.yaml",
    "sam2_tiny": "configs/sam2/sam2_hiera_t.yaml",
    "sam2_small": "configs/sam2/sam2_hiera_s.yaml",
    "sam2_base_plus": "configs/sam2/sam2_hiera_b+.yaml",
    "sam2_large": "configs/sam2/sam2_hiera_l.yaml",
    # MedSAM2 (bowang-lab): the SAM2.1 tiny architecture trained at 512 px.
    "sam2.1_hiera_t512": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "medsam2": "configs/sam2.1/sam2.1_hiera_t.yaml",
}
# Prefixes that training frameworks put in front of the SAM2Base keys (stripped only if every key has it).
KEY_PREFIXES = ("sam2_model.", "module.", "model.")
STATE_DICT_KEYS = ("model", "model_state_dict", "state_dict", "module")


@dataclass
class LoadedModel:
    model: Any  # sam2.sam2_video_predictor.SAM2VideoPredictor (a SAM2Base: also serves the image predictor)
    device: torch.device
    image_size: int
    config_name: str
    checkpoint: Path | None
    checkpoint_sha256: str | None


def image_size_overrides(image_size: int) -> list[str]:
    """Hydra overrides for a model input of `image_size` px (stride-16 features for memory attention RoPE)."""
    if image_size % 64:
        raise CheckpointError(f"propagation.sam2.image_size {image_size} must be a multiple of 64 "
                              f"(the Hiera backbone's stride 32 and the mask decoder's 4x upsampling)")
    feat = image_size // 16
    return [
        f"++model.image_size={image_size}",
        f"++model.memory_attention.layer.self_attention.feat_sizes=[{feat},{feat}]",
        f"++model.memory_attention.layer.cross_attention.feat_sizes=[{feat},{feat}]",
    ]


def predictor_overrides() -> list[str]:
    """What sam2's build_sam2_video_predictor sets, with two differences.

    Hole filling off (fill_hole_area=0): sam2's needs its CUDA `_C` op and is skipped without it;
    rtprop fills holes itself (`propagation.sam2.fill_holes`). A frame that gets correction clicks
    after it was tracked becomes a conditioning frame (add_all_frames_to_correct_as_cond, as in
    Meta's own training/VOS configs): with sam2's default the next propagate_in_video recomputes that
    frame and the correction is lost (facebookresearch/sam2 #719, #731). Prompts on frames not yet
    tracked are conditioning frames either way, so nothing else changes.
    """
    return [
        f"++model._target_={VIDEO_PREDICTOR_TARGET}",
        "++model.sam_mask_decoder_extra_args.dynamic_multimask_via_stability=true",
        "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta=0.05",
        "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh=0.98",
        "++model.binarize_mask_from_pts_for_mem_enc=true",
        "++model.fill_hole_area=0",
        "++model.add_all_frames_to_correct_as_cond=true",
    ]


def resolve_config(config_name: str) -> tuple[str, Path | None]:
    """(hydra config name inside the sam2 package, or None) / (path of a yaml file outside it)."""
    name = CONFIG_ALIASES.get(config_name, config_name)
    as_path = Path(name).expanduser()
    if as_path.suffix in (".yaml", ".yml") and as_path.is_file() and as_path.is_absolute():
        return "", as_path
    import sam2

    package_dir = Path(sam2.__file__).parent
    candidate = name if name.endswith((".yaml", ".yml")) else name + ".yaml"
    if (package_dir / candidate).is_file():
        return candidate, None
    if as_path.is_file():
        return "", as_path.resolve()
    shipped = sorted(str(p.relative_to(package_dir)) for p in package_dir.glob("configs/**/*.yaml"))
    raise CheckpointError(f"model config {config_name!r} (propagation.sam2.model_cfg) is neither a yaml "
                          f"shipped in {package_dir} nor an existing file; shipped: {', '.join(shipped)}")


def compose_config(config_name: str, overrides: list[str]) -> Any:
    from omegaconf import OmegaConf

    hydra_name, file_path = resolve_config(config_name)
    if file_path is None:
        import sam2  # noqa: F401  (initialises hydra's config module search path)
        from hydra import compose

        cfg = compose(config_name=hydra_name, overrides=overrides)
    else:
        cfg = OmegaConf.load(file_path)
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([o.lstrip("+") for o in overrides]))
    OmegaConf.resolve(cfg)
    if "model" not in cfg:
        raise CheckpointError(f"model config {config_name!r} has no 'model' section")
    return cfg


def extract_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The SAM2Base state dict inside a checkpoint object, whatever wrapper its trainer used."""
    for _ in range(3):  # e.g. {"model": {"state_dict": ...}} at most a couple of levels deep
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        if isinstance(obj, dict):
            inner = next((obj[k] for k in STATE_DICT_KEYS if k in obj and isinstance(obj[k], dict)), None)
            if inner is not None:
                obj = inner
                continue
        raise CheckpointError(f"checkpoint {path.name} in {path.parent} holds no state dict (top-level keys: "
                              f"{sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__}); expected a "
                              f"state dict, {{'model': sd}} or {{'model_state_dict': sd}}")
    state = dict(obj)
    for prefix in KEY_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_checkpoint_into(model: torch.nn.Module, path: Path, config_name: str) -> str:
    """Strictly load `path` into `model`; return the file's sha256. Errors name file, folder and keys."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path.name} not found in folder {path.parent}: put the file there "
                              f"or set propagation.checkpoint to where it is (rtprop never downloads weights)")
    digest = sha256_of(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt zip, pickled classes, truncated download...
        raise CheckpointError(f"checkpoint {path.name} in {path.parent} cannot be read as torch weights "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    state = extract_state_dict(obj, path)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if wrong_shape:
            k = wrong_shape[0]
            parts.append(f"{len(wrong_shape)} with other shapes (e.g. {k}: file {tuple(state[k].shape)}, "
                         f"model {tuple(expected[k].shape)})")
        raise CheckpointError(f"checkpoint {path.name} in {path.parent} does not fit model config {config_name!r}: "
                              f"{'; '.join(parts)}. Is propagation.sam2.model_cfg the architecture "
                              f"(tiny/small/base+/large, SAM2 or SAM2.1) these weights were trained with?")
    model.load_state_dict(state, strict=True)
    return digest


_CACHE: dict[tuple, LoadedModel] = {}
_CACHE_LOCK = threading.Lock()


def load_model(config_name: str, checkpoint: Path | str | None, image_size: int, device: str = "auto",
               cpu_threads: int = 2, seed: int | None = None, cache: bool = True) -> LoadedModel:
    """Build SAM2 (the video predictor class; it also backs the image predictor) and load `checkpoint`.

    `checkpoint=None` leaves random weights (tests and benchmarks only). `seed` seeds torch before
    the random initialisation so such runs are repeatable. The last model built is cached.
    """
    torch_device = choose_device(device, cpu_threads)
    ckpt = Path(checkpoint).expanduser() if checkpoint is not None else None
    key = (config_name, str(ckpt), ckpt.stat().st_mtime_ns if ckpt and ckpt.is_file() else None,
           image_size, str(torch_device), seed)
    with _CACHE_LOCK:
        if cache and key in _CACHE:
            return _CACHE[key]
    if ckpt is not None and not ckpt.is_file():  # fail before the (slow) build
        load_checkpoint_into(torch.nn.Module(), ckpt, config_name)
    from hydra.utils import instantiate

    cfg = compose_config(config_name, predictor_overrides() + image_size_overrides(image_size))
    if seed is not None:
        torch.manual_seed(seed)
    try:
        model = instantiate(cfg.model, _recursive_=True)
    except Exception as exc:
        raise CheckpointError(f"model config {config_name!r} cannot be instantiated: {exc}") from None
    digest = load_checkpoint_into(model, ckpt, config_name) if ckpt is not None else None
    model = model.to(torch_device).eval()
    loaded = LoadedModel(model, torch_device, image_size, config_name, ckpt, digest)
    if cache:
        with _CACHE_LOCK:
            _CACHE.clear()  # one model resident at a time: a node has one configured model
            _CACHE[key] = loaded
    return loaded
