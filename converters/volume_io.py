"""Volumes and masks on disk: DICOM folder, NIfTI (.nii/.nii.gz), MetaImage (.mha) and NPZ.

NPZ layout (MedSAM2/CVPR25-compatible keys, plus the geometry and DICOM identities we need to go
back to DICOM); saved without pickled objects, so `np.load(path, allow_pickle=False)` reads it:
- `imgs`: (z, y, x) image. Raw values (HU for CT) as float32, or (`normalised=`) uint8 0-255 after
  the CT window (level/width, default 40/400) or MR 0.5-99.5 percentiles, as MedSAM2's
  pre-processing stores it.
- `gts`: optional (z, y, x) uint8/uint16 label map on the same grid.
- `spacing`: (x, y, z) mm, SimpleITK GetSpacing order, as MedSAM2's npz files have it.
- `origin`: (x, y, z) mm of voxel (0, 0, 0); `direction`: 9 values, SimpleITK row-major.
- `modality`, `intensity` ("raw" or "normalised_uint8"), `series_instance_uid`,
  `study_instance_uid`, `frame_of_reference_uid` (0-d unicode arrays) and `sop_instance_uids`
  (one per slice; unicode array).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from converters.errors import ConversionError
from converters.files import atomic_path
from converters.geometry import Geometry, Volume

log = logging.getLogger(__name__)

SITK_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd")
MASK_SUFFIXES = (".nii.gz", ".mha", ".npz", ".nii")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in (".nii.gz",) + SITK_SUFFIXES + (".npz",):
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def _atomic_target(path: Path, write) -> Path:
    """Run write(tmp_path) then rename onto `path` (converters/files.py; the temporary keeps the suffix)."""
    with atomic_path(path) as tmp:
        write(tmp)
    return path


# ------------------------------------------------------------------ SimpleITK bridge
def geometry_to_sitk(image: sitk.Image, geometry: Geometry) -> sitk.Image:
    image.SetOrigin(tuple(float(v) for v in geometry.origin_mm))
    image.SetSpacing(tuple(float(v) for v in geometry.spacing_mm))
    image.SetDirection(tuple(float(v) for v in geometry.direction))
    return image


def volume_to_sitk(volume: Volume) -> sitk.Image:
    """The volume as a SimpleITK image with its origin, spacing and direction."""
    return geometry_to_sitk(sitk.GetImageFromArray(np.ascontiguousarray(volume.array)), volume.geometry)


def sitk_geometry(image: sitk.Image) -> Geometry:
    size = image.GetSize()
    if image.GetDimension() != 3:
        raise ConversionError(f"expected a 3D image, got {image.GetDimension()}D of size {size}")
    return Geometry(origin_mm=tuple(image.GetOrigin()), spacing_mm=tuple(image.GetSpacing()),
                    direction=tuple(image.GetDirection()), shape_zyx=(size[2], size[1], size[0]))


def reference_image(geometry: Geometry, pixel_id: int = sitk.sitkUInt8) -> sitk.Image:
    """An empty image on `geometry`'s grid (e.g. the reference for `sitk.Resample`)."""
    z, y, x = geometry.shape_zyx
    return geometry_to_sitk(sitk.Image([int(x), int(y), int(z)], pixel_id), geometry)


def resample_to(image: sitk.Image, geometry: Geometry, nearest: bool = True, default: float = 0.0) -> np.ndarray:
    """`image` resampled onto `geometry`'s grid through physical coordinates; (z, y, x) array."""
    interp = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    out = sitk.Resample(image, reference_image(geometry, image.GetPixelID()), sitk.Transform(), interp,
                        default, image.GetPixelID())
    return sitk.GetArrayFromImage(out)


# ------------------------------------------------------------------ NPZ
def _str(value: str) -> np.ndarray:
    return np.asarray(str(value), dtype=np.str_)


def write_npz(path: str | Path, volume: Volume, gts: np.ndarray | None = None, *,
              normalised: np.ndarray | None = None) -> Path:
    """Write `volume` (and an optional label map `gts` on its grid) as a MedSAM2-style NPZ (see module doc).

    `normalised`: the volume's intensities already mapped to [0, 1] (models/preprocess.py), stored as
    uint8 0-255 instead of the raw values.
    """
    path = Path(path)
    if gts is not None and np.asarray(gts).shape != volume.array.shape:
        raise ConversionError(f"{path}: gts shape {np.asarray(gts).shape} differs from imgs {volume.array.shape}")
    if normalised is not None:
        if np.shape(normalised) != volume.array.shape:
            raise ConversionError(f"{path}: normalised shape {np.shape(normalised)} differs from imgs "
                                  f"{volume.array.shape}")
        imgs = np.round(np.clip(normalised, 0.0, 1.0) * 255.0).astype(np.uint8)
        intensity = "normalised_uint8"
    else:
        imgs = np.asarray(volume.array, dtype=np.float32)
        intensity = "raw"
    arrays = {
        "imgs": imgs,
        "spacing": np.asarray(volume.geometry.spacing_mm, dtype=np.float64),
        "origin": np.asarray(volume.geometry.origin_mm, dtype=np.float64),
        "direction": np.asarray(volume.geometry.direction, dtype=np.float64),
        "modality": _str(volume.modality),
        "intensity": _str(intensity),
        "series_instance_uid": _str(volume.series_instance_uid),
        "study_instance_uid": _str(volume.study_instance_uid),
        "frame_of_reference_uid": _str(volume.frame_of_reference_uid),
        "sop_instance_uids": np.asarray(list(volume.sop_instance_uids), dtype=np.str_),
    }
    if gts is not None:
        gts = np.asarray(gts)
        arrays["gts"] = gts.astype(np.uint8 if gts.max(initial=0) < 256 else np.uint16)
    return _atomic_target(path, lambda tmp: np.savez_compressed(tmp, **arrays))


def read_npz(path: str | Path) -> Volume:
    """An NPZ written by `write_npz`/`write_mask` or MedSAM2 (`imgs`, else `gts`; `spacing` x,y,z; geometry optional)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = set(data.files)
            # a mask file (write_mask) has only `gts`: read it as the volume so masks load like images
            image_key = next((k for k in ("imgs", "gts", "mask") if k in keys), None)
            if image_key is None:
                raise ConversionError(f"{path}: no 'imgs' (or 'gts') array (keys: {', '.join(sorted(keys))})")
            imgs = data[image_key]
            if imgs.ndim != 3:
                raise ConversionError(f"{path}: 'imgs' has shape {imgs.shape}, expected (z, y, x)")
            spacing = tuple(float(v) for v in data["spacing"]) if "spacing" in keys else (1.0, 1.0, 1.0)
            origin = tuple(float(v) for v in data["origin"]) if "origin" in keys else (0.0, 0.0, 0.0)
            direction = (tuple(float(v) for v in data["direction"]) if "direction" in keys
                         else (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))

            def text(key: str) -> str:
                return str(data[key]) if key in keys else ""

            uids = [str(u) for u in data["sop_instance_uids"]] if "sop_instance_uids" in keys else []
            modality, intensity = text("modality"), text("intensity")
            series, study, frame = text("series_instance_uid"), text("study_instance_uid"), text("frame_of_reference_uid")
    except ConversionError:
        raise
    except Exception as exc:  # noqa: BLE001 - zip/pickle/format errors
        raise ConversionError(f"{path}: unreadable NPZ ({type(exc).__name__}: {exc})") from exc
    if len(spacing) != 3 or len(origin) != 3 or len(direction) != 9:
        raise ConversionError(f"{path}: spacing/origin/direction must have 3/3/9 values")
    if "spacing" not in keys:
        log.warning("%s has no 'spacing': assuming 1 mm", path)
    if intensity == "normalised_uint8":
        log.info("%s holds normalised intensities (0-255), not raw values", path)
    geometry = Geometry(origin_mm=origin, spacing_mm=spacing, direction=direction, shape_zyx=tuple(imgs.shape))
    return Volume(array=imgs, geometry=geometry, modality=modality, series_instance_uid=series,
                  study_instance_uid=study, frame_of_reference_uid=frame, sop_instance_uids=uids)


def infer_modality(image: np.ndarray) -> str:
    """"CT" when the intensities can only be Hounsfield units, else "" (unknown: treated like MR).

    For volumes that carry no Modality (NIfTI, MHA): air or lung (0.1th percentile <= -500), or fat
    well below zero together with tissue above it (1st percentile <= -50, 99th >= 50), which raw MR
    magnitudes (>= 0) and z-scored MR (|values| of a few units) never show.
    """
    image = np.asarray(image)
    sample = image[tuple(slice(None, None, max(1, n // 64)) for n in image.shape)]  # <= ~64 per axis
    if sample.size == 0:
        return ""
    p01, p1, p99 = np.percentile(sample.astype(np.float32), [0.1, 1.0, 99.0])
    return "CT" if p01 <= -500.0 or (p1 <= -50.0 and p99 >= 50.0) else ""


# ------------------------------------------------------------------ dispatchers
def read_volume(path: str | Path, series_instance_uid: str | None = None) -> Volume:
    """A DICOM series folder, .nii/.nii.gz/.mha/.mhd/.nrrd or .npz file as a `Volume`.

    `series_instance_uid` picks one series of a DICOM folder that holds several.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir():
        from converters.series import read_series

        return read_series(path, series_instance_uid)
    suffix = _suffix(path)
    if suffix == ".npz":
        return read_npz(path)
    if suffix in SITK_SUFFIXES:
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as exc:
            raise ConversionError(f"{path}: unreadable image ({str(exc).strip().splitlines()[-1]})") from exc
        if image.GetNumberOfComponentsPerPixel() != 1:
            raise ConversionError(f"{path}: {image.GetNumberOfComponentsPerPixel()}-component image; expected scalar")
        array = sitk.GetArrayFromImage(image)
        # these formats carry no Modality: Hounsfield units say CT, anything else stays unknown (MR-like)
        return Volume(array=array, geometry=sitk_geometry(image), modality=infer_modality(array))
    raise ConversionError(f"{path}: unknown volume format {suffix or '(no suffix)'}; "
                          "use a DICOM folder, .nii, .nii.gz, .mha or .npz")


def write_volume(path: str | Path, volume: Volume, **npz_options) -> Path:
    """Write `volume` as .npz (see `write_npz`) or .nii/.nii.gz/.mha (SimpleITK), atomically."""
    path = Path(path)
    suffix = _suffix(path)
    if suffix == ".npz":
        return write_npz(path, volume, **npz_options)
    if suffix in SITK_SUFFIXES:
        image = volume_to_sitk(volume)
        return _atomic_target(path, lambda tmp: sitk.WriteImage(image, str(tmp), True))
    raise ConversionError(f"{path}: cannot write volume format {suffix or '(no suffix)'}")


def write_mask(path: str | Path, mask: np.ndarray, geometry: Geometry) -> Path:
    """Write a (z, y, x) mask or label map on `geometry`'s grid to .nii.gz/.nii/.mha/.npz (uint8, atomic)."""
    path = Path(path)
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ConversionError(f"{path}: mask must be 3D (z, y, x), got shape {mask.shape}")
    if geometry.shape_zyx != (0, 0, 0) and tuple(geometry.shape_zyx) != mask.shape:
        raise ConversionError(f"{path}: mask shape {mask.shape} differs from the grid {tuple(geometry.shape_zyx)}")
    labels = mask.astype(np.uint8) if mask.dtype == bool or mask.max(initial=0) < 256 else mask.astype(np.uint16)
    suffix = _suffix(path)
    if suffix == ".npz":
        arrays = {"gts": labels, "spacing": np.asarray(geometry.spacing_mm, float),
                  "origin": np.asarray(geometry.origin_mm, float), "direction": np.asarray(geometry.direction, float)}
        return _atomic_target(path, lambda tmp: np.savez_compressed(tmp, **arrays))
    if suffix in (".nii.gz", ".nii", ".mha"):
        image = geometry_to_sitk(sitk.GetImageFromArray(labels), geometry)
        return _atomic_target(path, lambda tmp: sitk.WriteImage(image, str(tmp), True))
    raise ConversionError(f"{path}: cannot write a mask as {suffix or '(no suffix)'}; use .nii.gz, .mha or .npz")


def same_grid(a: Geometry, b: Geometry, tol_mm: float = 1e-3) -> bool:
    """Do two geometries put every voxel at the same place (shape, origin, spacing, direction)?"""
    return (tuple(a.shape_zyx) == tuple(b.shape_zyx) and np.allclose(a.origin_mm, b.origin_mm, atol=tol_mm)
            and np.allclose(a.spacing_mm, b.spacing_mm, atol=1e-4) and np.allclose(a.direction, b.direction, atol=1e-4))


def read_mask(path: str | Path, geometry: Geometry | None = None) -> np.ndarray:
    """A mask/label map (z, y, x) from .nii/.nii.gz/.mha (SimpleITK) or .npz (`gts`, else `mask`, else `imgs`).

    Values as stored (labels kept). With `geometry` (the series the mask belongs on), a file that
    carries its own geometry is put on that grid through patient coordinates when the two differ: a
    NIfTI written with the y axis flipped has the same shape but the mirror image as its raw array.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if _suffix(path) == ".npz":
        try:
            with np.load(path, allow_pickle=False) as data:
                key = next((k for k in ("gts", "mask", "imgs") if k in data.files), None)
                if key is None:
                    raise ConversionError(f"{path}: no 'gts' or 'mask' array (keys: {', '.join(data.files)})")
                array = data[key]
                own = None
                if {"origin", "spacing", "direction"} <= set(data.files) and array.ndim == 3:
                    own = Geometry(tuple(data["origin"]), tuple(data["spacing"]), tuple(data["direction"]),
                                   tuple(array.shape))
        except ConversionError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise ConversionError(f"{path}: unreadable NPZ ({type(exc).__name__}: {exc})") from exc
        if geometry is None or own is None or same_grid(own, geometry):
            return array
        image = geometry_to_sitk(sitk.GetImageFromArray(array), own)
    else:
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as exc:
            raise ConversionError(f"{path}: unreadable image ({str(exc).strip().splitlines()[-1]})") from exc
        if geometry is None or image.GetDimension() != 3 or same_grid(sitk_geometry(image), geometry):
            return sitk.GetArrayFromImage(image)
    out = resample_to(image, geometry)
    if np.asarray(sitk.GetArrayFromImage(image)).any() and not out.any():
        raise ConversionError(f"{path}: its contents lie outside the series' volume (no overlap in patient "
                              "coordinates): not a mask of this series")
    log.info("%s: not on the series' grid; resampled through patient coordinates (nearest)", path.name)
    return out
