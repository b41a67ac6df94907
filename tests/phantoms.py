"""Synthetic DICOM series with known geometry, for tests that need ground truth.

`write_series(folder, array_zyx, spacing, origin, iop=...)` writes one single-frame file per slice
(uncompressed, Explicit VR Little Endian) and returns the file paths in array order.

Geometry (independent of `converters.geometry`, so tests can check the readers against it):
- `spacing` is (x, y, z) mm = (along a row i.e. column spacing, along a column i.e. row spacing,
  between slices), the order of `Geometry.spacing_mm`.
- `origin` is the patient position (LPS mm) of voxel (slice 0, row 0, column 0).
- voxel (k, r, c) of `array_zyx` lies at origin + c*sx*row_dir + r*sy*col_dir + k*sz*step_dir,
  where row_dir, col_dir = iop[:3], iop[3:] and step_dir = slice_step_sign * cross(row_dir, col_dir).
  `slice_step_sign=-1` writes a stack whose positions decrease along the normal (e.g. feet-first
  acquisitions exported in table order): a reader must then return the array reversed along z.
"""
from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from scipy import ndimage
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

from converters.cine import CineError, CineSource



def rotation_iop(angle_z_deg: float = 0.0, angle_x_deg: float = 0.0) -> tuple[float, ...]:
    """ImageOrientationPatient of axial rows/columns rotated by angle_x about x, then angle_z about z."""
    az, ax = np.deg2rad(angle_z_deg), np.deg2rad(angle_x_deg)
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    r = rz @ rx
    return tuple(float(v) for v in np.concatenate([r[:, 0], r[:, 1]]))


def voxel_to_patient(index_krc: np.ndarray, spacing: Sequence[float], origin: Sequence[float],
                     iop: Sequence[float] = (1, 0, 0, 0, 1, 0), slice_step_sign: int = 1) -> np.ndarray:
    """Patient mm of voxel indices (..., 3) given as (slice, row, column) of the array written."""
    row_dir, col_dir = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    step_dir = slice_step_sign * np.cross(row_dir, col_dir)
    idx = np.asarray(index_krc, dtype=float)
    return (np.asarray(origin, float) + idx[..., 2:3] * spacing[0] * row_dir
            + idx[..., 1:2] * spacing[1] * col_dir + idx[..., 0:1] * spacing[2] * step_dir)


def write_series(folder: str | Path, array_zyx: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 2.0),
                 origin: Sequence[float] = (0.0, 0.0, 0.0), iop: Sequence[float] = (1, 0, 0, 0, 1, 0),
                 modality: str = "CT", *, slice_step_sign: int = 1,
                 series_instance_uid: str | None = None, study_instance_uid: str | None = None,
                 frame_of_reference_uid: str | None = None, rescale_slope: float = 1.0,
                 rescale_intercept: float | None = None, patient_name: str = "PHANTOM^TEST",
                 patient_id: str = "PHANTOM001", shuffle_names: bool = True, seed: int = 0,
                 extra: dict | None = None) -> list[Path]:
    """Write `array_zyx` (values in HU for CT) as a DICOM series in `folder`; return files in array order.

    File names and InstanceNumbers are shuffled (unless `shuffle_names=False`) so that readers
    cannot rely on them. Stored values are int16 = round((value - intercept) / slope).
    `extra` sets additional top-level attributes by keyword on every slice.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    array_zyx = np.asarray(array_zyx)
    if array_zyx.ndim != 3:
        raise ValueError(f"array_zyx must be 3D, got shape {array_zyx.shape}")
    nz, ny, nx = array_zyx.shape
    modality = modality.upper()
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    if rescale_intercept is None:
        rescale_intercept = -1024.0 if modality == "CT" else 0.0
    series_uid = series_instance_uid or generate_uid()
    study_uid = study_instance_uid or generate_uid()
    for_uid = frame_of_reference_uid or generate_uid()
    rng = np.random.default_rng(seed)
    names = rng.permutation(nz) if shuffle_names else np.arange(nz)
    numbers = rng.permutation(nz) + 1 if shuffle_names else np.arange(nz) + 1
    now = dt.datetime(2024, 5, 17, 10, 30, 0)
    files = []
    for k in range(nz):
        position = voxel_to_patient(np.array([k, 0, 0]), spacing, origin, iop, slice_step_sign)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.AccessionNumber = "ACC123"
        ds.Modality = modality
        ds.Manufacturer = "rtprop phantoms"
        ds.ReferringPhysicianName = "REFERRER^DR"
        ds.StudyDescription = "phantom study"
        ds.SeriesDescription = "phantom series"
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "STUDY1"
        ds.SeriesNumber = 3
        ds.InstanceNumber = int(numbers[k])
        ds.PatientPosition = "FFS" if slice_step_sign < 0 else "HFS"
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in iop]
        ds.SliceThickness = f"{spacing[2]:g}"
        ds.PixelSpacing = [f"{spacing[1]:g}", f"{spacing[0]:g}"]  # DICOM order: row spacing, column spacing
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = ny, nx
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept = f"{rescale_intercept:g}"
        ds.RescaleSlope = f"{rescale_slope:g}"
        if modality == "CT":
            ds.RescaleType = "HU"
            ds.KVP = "120"
        else:
            ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "SE", "NONE", ""
            ds.MRAcquisitionType = "2D"
            ds.EchoTime, ds.RepetitionTime, ds.EchoTrainLength = "10", "500", 1
            ds.MagneticFieldStrength = "1.5"
        for key, value in (extra or {}).items():
            setattr(ds, key, value)
        stored = np.round((array_zyx[k].astype(np.float64) - rescale_intercept) / rescale_slope)
        ds.PixelData = np.clip(stored, -32768, 32767).astype("<i2").tobytes()
        path = folder / f"IMG{int(names[k]):04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def ball(shape_zyx: tuple[int, int, int], centre_zyx: Sequence[float], radius_vox: Sequence[float]) -> np.ndarray:
    """Boolean ellipsoid in index space."""
    z, y, x = np.ogrid[:shape_zyx[0], :shape_zyx[1], :shape_zyx[2]]
    cz, cy, cx = centre_zyx
    rz, ry, rx = radius_vox
    return ((z - cz) / rz) ** 2 + ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0


def l_shape(shape_zyx: tuple[int, int, int], z_range: tuple[int, int] = (2, 5)) -> np.ndarray:
    """An asymmetric L (long arm along +x at the top rows, short arm down +y on the left): mirrors show."""
    mask = np.zeros(shape_zyx, dtype=bool)
    z0, z1 = z_range
    mask[z0:z1, 4:8, 6:26] = True  # horizontal bar, rows 4-7, columns 6-25
    mask[z0:z1, 8:16, 6:10] = True  # vertical bar going down from its left end
    return mask


class SyntheticCine(CineSource):
    """A respiratory-motion phantom generated frame by frame (nothing stored): tests and benchmarks.

    A static body outline with textured fat/muscle, an organ (liver-like) and a textured elliptical
    tumour inside it moving together: rows (superior-inferior) by `amplitude_mm` * sin(2 pi f t),
    columns by 0.3 of that; Rician-like noise. `truth(t)` is the tumour mask of frame t.
    """

    def __init__(self, n_frames: int = 80, shape: tuple[int, int] = (160, 160), spacing_mm: float = 1.5,
                 frame_rate_hz: float = 4.0, period_s: float = 4.0, amplitude_mm: float = 15.0,
                 tumour_radii_mm: tuple[float, float] = (14.0, 10.0), noise: float = 0.04, seed: int = 0):
        super().__init__("synthetic", n_frames, shape, (spacing_mm, spacing_mm), frame_rate_hz)
        rng = np.random.default_rng(seed)
        ny, nx = shape
        self.period_s, self.amplitude_mm, self.noise, self.seed = period_s, amplitude_mm, noise, seed
        self._yy, self._xx = np.mgrid[0:ny, 0:nx].astype(np.float32) * spacing_mm
        self._cy, self._cx = ny * spacing_mm / 2, nx * spacing_mm / 2
        self._radii = tumour_radii_mm
        def texture(sigma: float, scale: float) -> np.ndarray:
            return (ndimage.gaussian_filter(rng.normal(size=shape), sigma) * scale).astype(np.float32)

        # Organ and tumour textures move with them (padded, shifted by the sub-pixel motion each
        # frame); the body's texture is fixed.
        pad = int(np.ceil(2 * amplitude_mm / spacing_mm)) + 4
        self._pad = pad
        big = (ny + 2 * pad, nx + 2 * pad)
        self._organ_texture = (ndimage.gaussian_filter(rng.normal(size=big), 2.0) * 0.6).astype(np.float32)
        self._tumour_texture = (ndimage.gaussian_filter(rng.normal(size=big), 1.2) * 0.8).astype(np.float32)
        body = ((self._yy - self._cy) / (0.45 * ny * spacing_mm)) ** 2 + ((self._xx - self._cx) / (0.47 * nx * spacing_mm)) ** 2 < 1
        self._static = np.where(body, 0.35 + texture(1.5, 0.05), 0.02).astype(np.float32)
        self._body = body

    def offset_mm(self, t: int) -> tuple[float, float]:
        phase = 2 * np.pi * t / (self.frame_rate_hz * self.period_s)
        return self.amplitude_mm * np.sin(phase), 0.3 * self.amplitude_mm * np.sin(phase)

    def _tumour(self, dy: float, dx: float) -> np.ndarray:
        ry, rx = self._radii
        return ((self._yy - self._cy - dy) / ry) ** 2 + ((self._xx - self._cx + 8 - dx) / rx) ** 2 <= 1

    def truth(self, t: int) -> np.ndarray:
        return self._tumour(*self.offset_mm(t))

    def frame(self, t: int) -> np.ndarray:
        dy, dx = self.offset_mm(t)
        sp = self.spacing_mm[0]
        organ = (((self._yy - self._cy + 25 - dy) / 55) ** 2 + ((self._xx - self._cx - dx) / 60) ** 2 <= 1) & self._body
        tumour = self._tumour(dy, dx)
        # The moving textures: shift the padded texture by the (sub-pixel) motion.
        shift = (-dy / sp, -dx / sp)
        organ_tex = ndimage.shift(self._organ_texture, shift, order=1, mode="nearest")[self._pad:-self._pad, self._pad:-self._pad]
        tumour_tex = ndimage.shift(self._tumour_texture, shift, order=1, mode="nearest")[self._pad:-self._pad, self._pad:-self._pad]
        image = self._static.copy()
        image[organ] = 0.55 + 0.1 * organ_tex[organ]
        image[tumour] = 0.8 + 0.1 * tumour_tex[tumour]
        rng = np.random.default_rng(self.seed * 100003 + t)
        image = np.abs(image + rng.normal(0, self.noise, image.shape) + 1j * rng.normal(0, self.noise, image.shape))
        return (image * 1000).astype(np.float32)


class ArrayCine(CineSource):
    """An in-memory (t, rows, cols) array as a cine source (tests, small inputs)."""

    def __init__(self, frames: np.ndarray, spacing_mm: tuple[float, float] = (1.0, 1.0),
                 frame_rate_hz: float | None = None, name: str = "cine"):
        frames = np.asarray(frames)
        if frames.ndim != 3:
            raise CineError(f"{name}: frames must be (t, rows, cols), got shape {frames.shape}")
        super().__init__(name, frames.shape[0], frames.shape[1:], tuple(spacing_mm), frame_rate_hz)
        self._frames = frames

    def frame(self, t: int) -> np.ndarray:
        return np.asarray(self._frames[t], dtype=np.float32)


def affine_motion_cine(n_frames: int = 24, shape: tuple[int, int] = (128, 128), spacing_mm: float = 1.5,
                       period_frames: int = 16, rotation_deg: float = 20.0, stretch: float = 0.15,
                       shift_mm: float = 8.0, noise: float = 0.04, seed: int = 0) -> tuple[ArrayCine, np.ndarray]:
    """A tumour that rotates and changes shape as it moves: (cine, truth masks (t, rows, cols)).

    An elongated tumour (ellipse of 16 x 7 mm semi-axes with a 5 mm lobe, so its rotation is
    visible) in textured tissue; the whole neighbourhood moves by a known affine per frame about the
    image centre: rotation rotation_deg * s, rows x (1 + stretch * s), columns x (1 - stretch * s / 2),
    then shifted by shift_mm * s (rows) and 0.3 of it (columns), s = sin(2 pi t / period_frames).
    Truth is the analytic shape mapped back through the affine, so no tracker output is involved.
    """
    rng = np.random.default_rng(seed)
    pad = 32
    tissue = ndimage.gaussian_filter(rng.normal(size=(shape[0] + 2 * pad, shape[1] + 2 * pad)), 2.0) * 0.08
    inner = ndimage.gaussian_filter(rng.normal(size=tissue.shape), 1.2) * 0.1
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(float) * spacing_mm
    cy, cx = (shape[0] - 1) / 2 * spacing_mm, (shape[1] - 1) / 2 * spacing_mm
    frames, truths = [], []
    for t in range(n_frames):
        s = np.sin(2 * np.pi * t / period_frames)
        angle = np.deg2rad(rotation_deg * s)
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        inverse = np.linalg.inv(rotation @ np.diag([1 + stretch * s, 1 - 0.5 * stretch * s]))  # (row, col) mm
        ry, rx = yy - cy - shift_mm * s, xx - cx - 0.3 * shift_mm * s
        qy, qx = inverse[0, 0] * ry + inverse[0, 1] * rx, inverse[1, 0] * ry + inverse[1, 1] * rx  # frame-0 mm
        tumour = ((qy / 16.0) ** 2 + (qx / 7.0) ** 2 <= 1) | ((qy - 6.0) ** 2 + (qx - 8.0) ** 2 <= 5.0 ** 2)
        where = np.array([(qy + cy) / spacing_mm + pad, (qx + cx) / spacing_mm + pad])
        image = np.where(tumour, 0.75 + ndimage.map_coordinates(inner, where, order=1, mode="reflect"),
                         0.4 + ndimage.map_coordinates(tissue, where, order=1, mode="reflect"))
        frame_rng = np.random.default_rng(seed * 1009 + t)
        image = np.abs(image + frame_rng.normal(0, noise, shape) + 1j * frame_rng.normal(0, noise, shape))
        frames.append((1000 * image).astype(np.float32))
        truths.append(tumour)
    return ArrayCine(np.stack(frames), (spacing_mm, spacing_mm), 4.0, name="affine"), np.stack(truths)


def best_translation_dice(first: np.ndarray, truth: np.ndarray, search_px: int = 3) -> float:
    """The best Dice any whole-pixel shift of `first` reaches on `truth` (around the centroids' offset)."""
    offset = np.round(np.array(ndimage.center_of_mass(truth)) - ndimage.center_of_mass(first)).astype(int)
    best = 0.0
    for dy in range(-search_px, search_px + 1):
        for dx in range(-search_px, search_px + 1):
            shifted = ndimage.shift(first, offset + (dy, dx), order=0)
            best = max(best, 2.0 * (shifted & truth).sum() / (shifted.sum() + truth.sum()))
    return float(best)


# --------------------------------------------------------------------------- propagator phantoms
def phantom(mask: np.ndarray, inside_hu: float = 60.0, outside_hu: float = -80.0, noise_hu: float = 15.0,
            seed: int = 0) -> np.ndarray:
    """Soft tissue (60 HU) in fat (-80 HU) with Gaussian noise: a CT-like contrast of ~9 sigma."""
    rng = np.random.default_rng(seed)
    image = np.where(mask, inside_hu, outside_hu).astype(np.float32)
    return image + rng.normal(0.0, noise_hu, mask.shape).astype(np.float32)


def ellipsoid(shape=(40, 96, 96), centre=(20, 48, 48), radii_mm=(33.0, 25.0, 18.0), spacing=(2.5, 1.0, 1.0)):
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    return sum(((g - c * s) / r) ** 2 for g, c, r, s in zip(grids, centre, radii_mm, spacing)) <= 1.0


def extent(mask):
    z = np.flatnonzero(mask.any(axis=(1, 2)))
    return int(z[0]), int(z[-1])


def mr_tumour(pixel_mm: float, size: int, texture: float = 30.0, seed: int = 0,
              n_slices: int = 9) -> tuple[np.ndarray, np.ndarray]:
    """T1-like thigh on 3 mm slices: fat (800) around muscle (380) and a 60 x 44 mm tumour (500, texture of
    SD `texture` with a ~1.5 mm grain) holding a dark necrotic core (200, 22 x 16 mm, off-centre);
    noise SD 20 per pixel. Returns (image zyx, tumour mask zyx, core included)."""
    rng = np.random.default_rng(seed)
    c = (size - 1) / 2.0
    z, y, x = np.meshgrid((np.arange(n_slices) - (n_slices - 1) / 2) * 3.0, (np.arange(size) - c) * pixel_mm,
                          (np.arange(size) - c) * pixel_mm, indexing="ij")
    tumour = (z / 40.0) ** 2 + (y / 22.0) ** 2 + ((x - 10) / 30.0) ** 2 <= 1
    core = tumour & ((z / 20.0) ** 2 + ((y - 8) / 8.0) ** 2 + ((x + 8) / 11.0) ** 2 <= 1)
    image = np.zeros(z.shape, np.float32)
    image[(y / 90.0) ** 2 + (x / 95.0) ** 2 <= 1] = 800.0
    image[(y / 75.0) ** 2 + (x / 80.0) ** 2 <= 1] = 380.0
    grain = np.stack([ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), 1.5 / pixel_mm) for _ in range(n_slices)])
    grain /= grain.std()
    image[tumour] = 500.0 + texture * grain[tumour]
    image[core] = 200.0 + 0.5 * texture * grain[core]
    image += rng.normal(0, 20.0, image.shape).astype(np.float32)
    return np.clip(image, 0, None), tumour


def deepest_click(mask2d: np.ndarray, spacing_yx: tuple[float, float]) -> tuple[int, int]:
    depth = ndimage.distance_transform_edt(np.pad(mask2d, 1), sampling=spacing_yx)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return int(x), int(y)


def rimmed_tumour(pixel_mm: float, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One MR slice: a 60 x 50 mm tumour (420) in muscle of the same intensity, set apart only by a 2 mm
    darker rim (340) broken in four places, fat (800) around; noise SD 20 per pixel.
    Returns (image zyx with one slice, tumour mask zyx)."""
    rng = np.random.default_rng(seed)
    c = (size - 1) / 2.0
    y, x = np.meshgrid((np.arange(size) - c) * pixel_mm, (np.arange(size) - c) * pixel_mm, indexing="ij")
    r = np.hypot(y, x / 1.2)
    image = np.zeros((size, size), np.float32)
    image[(y / 90.0) ** 2 + (x / 95.0) ** 2 <= 1] = 800.0
    image[(y / 75.0) ** 2 + (x / 80.0) ** 2 <= 1] = 420.0
    tumour = r <= 30.0
    image[(r > 30.0) & (r <= 32.0) & (np.cos(4 * np.arctan2(y, x)) <= 0.8)] = 340.0
    image += rng.normal(0, 20.0, image.shape).astype(np.float32)
    return np.clip(image, 0, None)[None], tumour[None]


# --------------------------------------------------------------------------- key-slice phantoms (box stability)
def _slab(profile2d, n_slices: int, dz_mm: float, half_length_mm: float):
    """Stack a 2D shape function f(scale) -> mask into n_slices, its size shrinking as an ellipsoid's towards
    +-half_length_mm (the structure ends inside the volume)."""
    zs = (np.arange(n_slices) - (n_slices - 1) / 2) * dz_mm
    return np.stack([profile2d(np.sqrt(max(0.0, 1.0 - (z / half_length_mm) ** 2))) for z in zs])


def lung_tumour(seed: int = 0, size: int = 160, pixel_mm: float = 0.98, walls: tuple = ((5.6, 4.5), (7.74, 14.7)),
                radii_mm: tuple[float, float] = (23.3, 22.9), lobes: float = 0.29, n_slices: int = 1,
                dz_mm: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """CT of a lobulated soft-tissue lung tumour (34 HU with texture, a 3 mm -400 HU ground-glass margin) in the
    corner where the lung (-870 HU, with vessels) meets the chest wall and the mediastinum (54 HU): the lung is
    the side of each wall line (normal angle in radians, distance in mm from the tumour's centre) facing the
    centre, and the tumour spans the walls. Aerated lung fills its box's corners on the lung side; on the other
    side nothing but shape separates it from the wall. The NSCLC case where a box one pixel wider gave the lung.
    Returns (image zyx in HU, tumour mask zyx, margin included)."""
    rng = np.random.default_rng(seed)
    c = (size - 1) / 2.0
    y, x = np.meshgrid((np.arange(size) - c) * pixel_mm, (np.arange(size) - c) * pixel_mm, indexing="ij")
    lung = np.ones((size, size), dtype=bool)
    for angle, distance in walls:
        lung &= (np.cos(angle) * x + np.sin(angle) * y) < distance
    theta = np.arctan2(y, x)
    lobed = 1 + lobes * np.sin(3 * theta) + 0.5 * lobes * np.sin(7 * theta)

    def shape(scale: float) -> np.ndarray:
        core = (y / (radii_mm[0] * scale * lobed + 1e-6)) ** 2 + (x / (radii_mm[1] * scale * lobed + 1e-6)) ** 2 <= 1
        return core | (ndimage.binary_dilation(core, iterations=3) & lung) if core.any() else core

    tumour = _slab(shape, n_slices, dz_mm, (n_slices // 2 + 1) * dz_mm)
    vessels = ndimage.gaussian_filter(rng.normal(size=(size, size)), 1.5)
    texture = ndimage.gaussian_filter(rng.normal(size=(size, size)), 2.0)
    texture /= texture.std()
    image = np.where(lung, -870.0, 54.0)
    image[lung & (vessels > 2.2 * vessels.std())] = -100.0
    image = image[None].repeat(n_slices, axis=0)
    image[tumour & lung[None]] = -400.0  # the ground-glass margin, where the tumour meets lung
    for z, t in enumerate(tumour):
        solid = (ndimage.binary_erosion(t, iterations=3) if t.any() else t) | (t & ~lung)
        image[z][solid] = 34.0 + 20.0 * texture[solid]
    image = ndimage.gaussian_filter(image, (0, 0.7, 0.7)) + rng.normal(0, 15.0, image.shape)
    return image.astype(np.float32), tumour


def dark_lesion(seed: int = 0, size: int = 128, n_slices: int = 9) -> tuple[np.ndarray, np.ndarray]:
    """T1-like MR: a dark lesion (300) in brighter tissue (650) that fat (950) borders on two sides of its
    box; noise SD 40. The structure is darker than everything around it. Returns (image zyx, mask zyx)."""
    rng = np.random.default_rng(seed)
    c = (size - 1) / 2.0
    y, x = np.meshgrid(np.arange(size) - c, np.arange(size) - c, indexing="ij")
    tissue = (y / 55.0) ** 2 + (x / 50.0) ** 2 <= 1
    lesion = _slab(lambda s: (y / (16.0 * s + 1e-6)) ** 2 + ((x - 28) / (13.0 * s + 1e-6)) ** 2 <= 1, n_slices, 3.0, 15.0)
    image = np.where(tissue, 650.0, 950.0)[None].repeat(n_slices, axis=0)
    image[lesion] = 300.0
    image += rng.normal(0, 40.0, image.shape)
    return np.clip(image, 0, None).astype(np.float32), lesion


def rimmed_lesion(seed: int = 0, size: int = 128, n_slices: int = 9) -> tuple[np.ndarray, np.ndarray]:
    """CT of a ring-enhancing lesion in muscle (55 HU): a 3 mm rim (160 HU) around a necrotic core (15 HU),
    34 x 28 mm, on 1 mm pixels; noise SD 12. The structure is rim and core. Returns (image zyx, mask zyx)."""
    rng = np.random.default_rng(seed)
    c = (size - 1) / 2.0
    y, x = np.meshgrid(np.arange(size) - c, np.arange(size) - c, indexing="ij")
    lesion = _slab(lambda s: (y / (14.0 * s + 1e-6)) ** 2 + (x / (17.0 * s + 1e-6)) ** 2 <= 1, n_slices, 3.0, 15.0)
    core = np.stack([ndimage.binary_erosion(m, iterations=3) for m in lesion])
    image = np.full(lesion.shape, 55.0)
    image[lesion] = 160.0
    image[core] = 15.0
    image = ndimage.gaussian_filter(image, (0, 0.6, 0.6)) + rng.normal(0, 12.0, image.shape)
    return image.astype(np.float32), lesion


def one_pixel_boxes(box):
    """The box and each of its edges moved out and in by one pixel, then all four out and in by two: what a
    planner's box may be for the same structure."""
    from models.prompts import BoxPrompt

    out = [box]
    for i in range(4):
        for step in (-1, 1):
            d = [0, 0, 0, 0]
            d[i] = step
            out.append(BoxPrompt(box.slice_index, box.x0 + d[0], box.y0 + d[1], box.x1 + d[2], box.y1 + d[3]))
    out += [BoxPrompt(box.slice_index, box.x0 - s, box.y0 - s, box.x1 + s, box.y1 + s) for s in (2, -2)]
    return out


def lung_crescent(seed: int = 0, size: int = 96, pixel_mm: float = 2.0, n_slices: int = 7, dz_mm: float = 3.0,
                  radius_mm: float = 40.0, lung_mm: float = 6.0) -> tuple[np.ndarray, np.ndarray]:
    """CT of a lung base: a crescent of aerated lung (-820 HU, `lung_mm` thick) over the dome of a liver (58 HU,
    `radius_mm`) that runs on below it, inside a chest wall of soft tissue (40 HU); noise SD 15. The tight box
    of the crescent holds the dome: what covers the box's centre (the liver) is not what the box was drawn
    around. The right lower lobe of totalseg-ct that flipped to the liver when its box moved by 2 px. Returns
    (image zyx in HU, lung mask zyx)."""
    rng = np.random.default_rng(seed)
    y, x = np.meshgrid(np.arange(size) * pixel_mm, (np.arange(size) - (size - 1) / 2.0) * pixel_mm, indexing="ij")
    cy = 0.55 * size * pixel_mm  # the dome's centre: the liver fills the image's lower half
    r = np.hypot(y - cy, x)
    upper = (y - cy) < -0.35 * radius_mm  # the crescent wraps the top of the dome
    liver = r <= radius_mm

    def crescent(scale: float) -> np.ndarray:
        return (r > radius_mm) & (r <= radius_mm + lung_mm * scale) & upper if scale > 0 else np.zeros_like(r, bool)

    lung = _slab(crescent, n_slices, dz_mm, (n_slices // 2 + 1) * dz_mm)
    image = np.where(liver, 58.0, 40.0)[None].repeat(n_slices, axis=0)
    image[lung] = -820.0
    image = ndimage.gaussian_filter(image, (0, 0.7, 0.7)) + rng.normal(0, 15.0, image.shape)
    return image.astype(np.float32), lung
