"""Cine-MR input and output: 2D+t sequences, streamed so memory stays flat however long they are.

Inputs
- TrackRAD2025 case folder (layout of LMUK-RADONC-PHYS-RES/trackrad2025 `dataset/example/Z_001`):
  `images/<case>_frames.mha`, `targets/<case>_first_label.mha` (optionally `targets/<case>_labels.mha`,
  all-frame references), `frame-rate.json`, `b-field-strength.json`, `scanned-region.json`.
  The frames are stacked with **time as the fastest (ITK x) axis**: SimpleITK's array is
  (rows, cols, t) and frame t is `array[..., t]`; the frame's row/column spacings are the ITK z/y spacings.
  Because time varies fastest on disk, one frame is spread over the whole file: we decompress the
  MetaImage data once, in blocks, into a frame-major temporary file and read frames from it with
  pread (nothing is held per frame in RAM). TrackRAD sequences reach 20,000 frames.
- A DICOM MR series of one slice position over time: files grouped by (ImagePositionPatient,
  ImageOrientationPatient); more than one position is an error naming them; frames ordered by
  acquisition time when every file has one, else by InstanceNumber; read one file per frame.

Output (`CineLabelWriter`): `<out>/targets/<case>_labels.mha` in the input's layout (uint8, time
fastest, the input's header geometry), written from a frame-major temporary file at the end, plus
`<out>/<case>_tracking.csv` (one row per frame, streamed: centroid in mm and area in mm²).
"""
from __future__ import annotations

import csv
import json
import os
import re
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from converters.errors import ConversionError
from converters.files import atomic_path

MET_TYPES = {
    "MET_UCHAR": np.uint8, "MET_CHAR": np.int8, "MET_USHORT": np.uint16, "MET_SHORT": np.int16,
    "MET_UINT": np.uint32, "MET_INT": np.int32, "MET_FLOAT": np.float32, "MET_DOUBLE": np.float64,
    "MET_ULONG_LONG": np.uint64, "MET_LONG_LONG": np.int64,
}
BLOCK_BYTES = 8 << 20  # how much of the pixel-major stream is transposed at a time


class CineError(ConversionError):
    """A cine input that cannot be read as one 2D+t sequence; the message names the file."""


# ----------------------------------------------------------------------------- MetaImage
@dataclass
class MetaHeader:
    path: Path
    fields: dict[str, str]  # in file order, as written
    data_offset: int  # byte offset of the pixel data in `data_file`
    data_file: Path

    @property
    def dims(self) -> tuple[int, ...]:
        return tuple(int(v) for v in self.fields["DimSize"].split())

    @property
    def spacing(self) -> tuple[float, ...]:
        raw = self.fields.get("ElementSpacing") or self.fields.get("ElementSize") or " ".join(["1"] * len(self.dims))
        return tuple(float(v) for v in raw.split())

    @property
    def dtype(self) -> np.dtype:
        kind = self.fields.get("ElementType", "")
        if kind not in MET_TYPES:
            raise CineError(f"{self.path.name}: ElementType {kind!r} is not supported")
        big = self.fields.get("BinaryDataByteOrderMSB", self.fields.get("ElementByteOrderMSB", "False"))
        return np.dtype(MET_TYPES[kind]).newbyteorder(">" if big.lower() == "true" else "<")

    @property
    def compressed(self) -> bool:
        return self.fields.get("CompressedData", "False").lower() == "true"


def read_meta_header(path: str | Path) -> MetaHeader:
    """Parse a MetaImage (.mha/.mhd) header; the pixel data is not read."""
    path = Path(path)
    if not path.is_file():
        raise CineError(f"{path.name} not found in {path.parent}")
    fields: dict[str, str] = {}
    with open(path, "rb") as handle:
        while True:
            line = handle.readline(4096)
            if not line:
                raise CineError(f"{path}: no ElementDataFile line: not a MetaImage header")
            text = line.decode("latin-1").strip()
            if "=" not in text:
                continue
            key, value = (part.strip() for part in text.split("=", 1))
            fields[key] = value
            if key == "ElementDataFile":
                offset = handle.tell()
                break
    if int(fields.get("ElementNumberOfChannels", "1")) != 1:
        raise CineError(f"{path.name}: multi-channel images are not cine frames")
    target = fields["ElementDataFile"]
    if target == "LOCAL":
        data_file = path
    elif target.upper().startswith("LIST") or "%" in target:
        raise CineError(f"{path.name}: ElementDataFile {target!r} (file lists) is not supported")
    else:
        data_file, offset = path.parent / target, 0
        if not data_file.is_file():
            raise CineError(f"{path.name}: its pixel data file {target} is missing from {path.parent}")
    header = MetaHeader(path, fields, offset, data_file)
    if len(header.dims) != 3:
        raise CineError(f"{path.name}: expected a 3D (x=t, y, z) stack, got DimSize {fields.get('DimSize')}")
    header.dtype  # noqa: B018  (validates the element type early)
    return header


def _iter_raw_blocks(header: MetaHeader, block_bytes: int) -> Iterator[bytes]:
    """The pixel data, decompressed if need be, in chunks of about `block_bytes`."""
    total = int(np.prod(header.dims)) * header.dtype.itemsize
    with open(header.data_file, "rb") as handle:
        handle.seek(header.data_offset)
        if not header.compressed:
            remaining = total
            while remaining > 0:
                chunk = handle.read(min(block_bytes, remaining))
                if not chunk:
                    raise CineError(f"{header.path.name}: pixel data ends early (truncated file)")
                remaining -= len(chunk)
                yield chunk
            return
        inflater = zlib.decompressobj()
        produced = 0
        while produced < total:
            data = handle.read(1 << 20)
            if not data:
                raise CineError(f"{header.path.name}: compressed pixel data ends early (truncated file)")
            try:
                while True:  # drain: output may be pending even when all input is consumed
                    chunk = inflater.decompress(data, block_bytes)
                    if chunk:
                        produced += len(chunk)
                        yield chunk
                    data = inflater.unconsumed_tail
                    if not data and len(chunk) < block_bytes:
                        break
            except zlib.error as exc:
                raise CineError(f"{header.path.name}: corrupt compressed pixel data ({exc})") from None


# ----------------------------------------------------------------------------- sources
@dataclass
class CineSource:
    """A 2D+t sequence read one frame at a time. Frames are (rows, cols) float32."""

    name: str
    n_frames: int
    shape: tuple[int, int]  # (rows, cols) of a frame
    spacing_mm: tuple[float, float]  # (between rows, between columns)
    frame_rate_hz: float | None
    geometry: dict[str, Any] = field(default_factory=dict)  # what the label writer copies

    def frame(self, t: int) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def frames(self) -> Iterator[np.ndarray]:
        for t in range(self.n_frames):
            yield self.frame(t)

    def close(self) -> None:
        pass

    def __enter__(self) -> CineSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MhaCine(CineSource):
    """A TrackRAD-layout .mha stack (time = ITK x axis), transposed once into a frame-major temp file."""

    def __init__(self, path: str | Path, frame_rate_hz: float | None = None, name: str | None = None,
                 tmp_dir: str | Path | None = None):
        header = read_meta_header(path)
        n_t, n_c, n_r = header.dims  # ITK (x, y, z) = (t, cols, rows): numpy (rows, cols, t)
        sp = header.spacing
        super().__init__(name or Path(path).stem, n_t, (n_r, n_c), (sp[2], sp[1]), frame_rate_hz,
                         geometry={"meta_fields": dict(header.fields)})
        self._dtype = header.dtype
        self._frame_bytes = n_r * n_c * self._dtype.itemsize
        self._tmp = tempfile.TemporaryFile(dir=tmp_dir)
        self._fd = self._tmp.fileno()
        self._transpose_into_temp(header)

    def _transpose_into_temp(self, header: MetaHeader) -> None:
        itemsize, n_t = self._dtype.itemsize, self.n_frames
        row_bytes = n_t * itemsize  # one pixel's whole time course
        pixels_per_block = max(1, BLOCK_BYTES // row_bytes)
        pending = b""
        pixel = 0
        for chunk in _iter_raw_blocks(header, pixels_per_block * row_bytes):
            pending += chunk
            usable = (len(pending) // row_bytes) * row_bytes
            if not usable:
                continue
            block = np.frombuffer(pending[:usable], dtype=self._dtype).reshape(-1, n_t)  # (pixels, t)
            frame_major = np.ascontiguousarray(block.T)  # (t, pixels)
            offset = pixel * itemsize
            for t in range(n_t):
                os.pwrite(self._fd, memoryview(frame_major[t]), t * self._frame_bytes + offset)
            pixel += block.shape[0]
            pending = pending[usable:]
        if pixel != self.shape[0] * self.shape[1]:
            raise CineError(f"{header.path.name}: pixel data holds {pixel} pixel time courses, "
                            f"DimSize says {self.shape[0] * self.shape[1]}")

    def frame(self, t: int) -> np.ndarray:
        if not 0 <= t < self.n_frames:
            raise IndexError(f"frame {t} of {self.n_frames}")
        raw = os.pread(self._fd, self._frame_bytes, t * self._frame_bytes)
        return np.frombuffer(raw, dtype=self._dtype).reshape(self.shape).astype(np.float32)

    def close(self) -> None:
        self._tmp.close()


class DicomCine(CineSource):
    """A DICOM series of one slice position over time; frames are read from their files on demand."""

    def __init__(self, folder: str | Path, name: str | None = None):
        import pydicom

        folder = Path(folder)
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        groups: dict[tuple, list[tuple[Any, Path]]] = {}
        for path in files:
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except Exception:
                continue  # not DICOM (README, DICOMDIR companions...)
            if "PixelData" not in ds and not hasattr(ds, "Rows"):
                continue
            if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
                raise CineError(f"{path.name} in {folder}: no ImagePositionPatient/ImageOrientationPatient")
            key = (tuple(round(float(v), 2) for v in ds.ImagePositionPatient),
                   tuple(round(float(v), 4) for v in ds.ImageOrientationPatient), int(ds.Rows), int(ds.Columns))
            groups.setdefault(key, []).append((ds, path))
        if not groups:
            raise CineError(f"no DICOM images in {folder}")
        if len(groups) > 1:
            where = "; ".join(f"{k[0]} ({len(v)} files)" for k, v in groups.items())
            raise CineError(f"{folder} holds images at {len(groups)} slice positions ({where}): a cine series "
                            "is one position over time")
        (position, orientation, rows, cols), items = next(iter(groups.items()))
        times = [_acquisition_seconds(ds) for ds, _ in items]
        if all(t is not None for t in times) and len(set(times)) == len(times):
            order = np.argsort(times, kind="stable")
        else:
            order = np.argsort([int(getattr(ds, "InstanceNumber", 0) or 0) for ds, _ in items], kind="stable")
            times = [None] * len(items)
        self._files = [items[i][1] for i in order]
        seconds = [times[i] for i in order]
        rate = None
        if len(seconds) > 1 and all(s is not None for s in seconds):
            step = float(np.median(np.diff(seconds)))
            rate = 1.0 / step if step > 0 else None
        first = items[order[0]][0]
        spacing = tuple(float(v) for v in getattr(first, "PixelSpacing", (1.0, 1.0)))
        super().__init__(name or str(getattr(first, "SeriesInstanceUID", folder.name)), len(self._files),
                         (rows, cols), (spacing[0], spacing[1]), rate,
                         geometry={"position": position, "orientation": orientation,
                                   "series_uid": str(getattr(first, "SeriesInstanceUID", ""))})

    def frame(self, t: int) -> np.ndarray:
        import pydicom

        ds = pydicom.dcmread(self._files[t])
        pixels = ds.pixel_array.astype(np.float32)
        return pixels * float(getattr(ds, "RescaleSlope", 1) or 1) + float(getattr(ds, "RescaleIntercept", 0) or 0)


def _acquisition_seconds(ds: Any) -> float | None:
    """Seconds since midnight (plus the date's day count) of AcquisitionDateTime / AcquisitionTime / ContentTime."""
    text = str(getattr(ds, "AcquisitionDateTime", "") or "")
    date, clock = (text[:8], text[8:]) if text else (str(getattr(ds, "AcquisitionDate", "") or ""),
                                                      str(getattr(ds, "AcquisitionTime", "") or
                                                          getattr(ds, "ContentTime", "") or ""))
    match = re.match(r"^(\d{2})(\d{2})?(\d{2})?(\.\d+)?", clock)
    if not match:
        return None
    h, m, s, frac = match.groups()
    seconds = int(h) * 3600 + int(m or 0) * 60 + int(s or 0) + float(frac or 0)
    if len(date) == 8 and date.isdigit():
        seconds += np.datetime64(f"{date[:4]}-{date[4:6]}-{date[6:]}", "D").astype(int) * 86400
    return float(seconds)


# ----------------------------------------------------------------------------- TrackRAD case
@dataclass
class TrackRadCase:
    case: str
    folder: Path
    source: MhaCine
    first_label: np.ndarray  # (rows, cols) bool
    labels_path: Path | None  # all-frame references if present (targets/<case>_labels.mha)
    frame_rate_hz: float | None


def _json_number(path: Path) -> float | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
        return float(value)
    except (ValueError, TypeError):
        return None


def open_trackrad_case(folder: str | Path, tmp_dir: str | Path | None = None) -> TrackRadCase:
    """Open a TrackRAD2025 case folder (see module docstring); errors name the missing file."""
    folder = Path(folder)
    case = folder.name
    frames_path = folder / "images" / f"{case}_frames.mha"
    label_path = folder / "targets" / f"{case}_first_label.mha"
    for required in (frames_path, label_path):
        if not required.is_file():
            raise CineError(f"TrackRAD case {case}: {required.relative_to(folder)} not found in {folder}")
    rate = _json_number(folder / "frame-rate.json")
    source = MhaCine(frames_path, frame_rate_hz=rate, name=case, tmp_dir=tmp_dir)
    first = read_stack_frames(label_path)
    if first.shape[0] < 1 or first.shape[1:] != source.shape:
        source.close()
        raise CineError(f"{label_path.name}: first label {first.shape[1:]} does not match frames {source.shape}")
    labels = folder / "targets" / f"{case}_labels.mha"
    return TrackRadCase(case, folder, source, first[0] > 0, labels if labels.is_file() else None, rate)


def read_stack_frames(path: str | Path) -> np.ndarray:
    """A (small) TrackRAD-layout stack as (t, rows, cols), e.g. a first label or reference labels."""
    import SimpleITK as sitk

    array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))  # (rows, cols, t)
    if array.ndim == 2:
        array = array[..., None]
    return np.moveaxis(array, -1, 0)


# ----------------------------------------------------------------------------- output
CSV_COLUMNS = ("frame", "time_s", "centroid_row_mm", "centroid_col_mm", "area_mm2", "confidence", "latency_ms")


class CineLabelWriter:
    """Per-frame masks and measurements in, `targets/<case>_labels.mha` + `<case>_tracking.csv` out.

    Frames go to a frame-major temporary file (one byte a pixel) as they come; `close()` writes the
    stack in TrackRAD's layout. Centroids are in mm from the centre of the frame's first pixel
    (row 0, column 0), along rows and columns; area in mm².
    """

    def __init__(self, out_dir: str | Path, source: CineSource, case: str | None = None):
        self.out_dir = Path(out_dir)
        self.case = case or source.name
        self.source = source
        (self.out_dir / "targets").mkdir(parents=True, exist_ok=True)
        self.labels_path = self.out_dir / "targets" / f"{self.case}_labels.mha"
        self.csv_path = self.out_dir / f"{self.case}_tracking.csv"
        self._csv_handle = open(self.csv_path, "w", newline="")
        self._csv = csv.writer(self._csv_handle)
        self._csv.writerow(CSV_COLUMNS)
        self._tmp = tempfile.TemporaryFile(dir=self.out_dir)
        self._n = 0
        self._pixel_area = source.spacing_mm[0] * source.spacing_mm[1]

    def add(self, mask: np.ndarray, confidence: float = 1.0, latency_ms: float = float("nan")) -> dict[str, float]:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != tuple(self.source.shape):
            raise ValueError(f"frame {self._n}: mask {mask.shape} does not match frames {self.source.shape}")
        os.pwrite(self._tmp.fileno(), mask.astype(np.uint8).tobytes(), self._n * mask.size)
        rows, cols = np.nonzero(mask)
        area = rows.size * self._pixel_area
        cr = float(rows.mean()) * self.source.spacing_mm[0] if rows.size else float("nan")
        cc = float(cols.mean()) * self.source.spacing_mm[1] if rows.size else float("nan")
        rate = self.source.frame_rate_hz
        row = {"frame": self._n, "time_s": self._n / rate if rate else float("nan"), "centroid_row_mm": cr,
               "centroid_col_mm": cc, "area_mm2": area, "confidence": float(confidence), "latency_ms": latency_ms}
        self._csv.writerow([row["frame"], f"{row['time_s']:.4f}", f"{cr:.3f}", f"{cc:.3f}", f"{area:.2f}",
                            f"{confidence:.4f}", f"{latency_ms:.2f}"])
        self._n += 1
        return row

    def _header(self, data_size: int) -> bytes:
        n_r, n_c = self.source.shape
        meta = dict(self.source.geometry.get("meta_fields", {}))
        if meta:
            offset = meta.get("Offset", "0 0 0")
            matrix = meta.get("TransformMatrix", "1 0 0 0 1 0 0 0 1")
            spacing = meta.get("ElementSpacing", f"1 {self.source.spacing_mm[1]} {self.source.spacing_mm[0]}")
            orientation = meta.get("AnatomicalOrientation", "RAI")
        else:
            pos = self.source.geometry.get("position", (0.0, 0.0, 0.0))
            offset, matrix, orientation = " ".join(str(v) for v in pos), "1 0 0 0 1 0 0 0 1", "RAI"
            rate = self.source.frame_rate_hz
            spacing = f"{1.0 / rate if rate else 1.0} {self.source.spacing_mm[1]} {self.source.spacing_mm[0]}"
        lines = ["ObjectType = Image", "NDims = 3", "BinaryData = True", "BinaryDataByteOrderMSB = False",
                 "CompressedData = True", f"CompressedDataSize = {data_size}", f"TransformMatrix = {matrix}",
                 f"Offset = {offset}", "CenterOfRotation = 0 0 0", f"AnatomicalOrientation = {orientation}",
                 f"ElementSpacing = {spacing}", f"DimSize = {self._n} {n_c} {n_r}", "ElementType = MET_UCHAR",
                 "ElementDataFile = LOCAL"]
        return ("\n".join(lines) + "\n").encode("ascii")

    def close(self) -> Path:
        """Write the labels .mha (time fastest, as the input) and close the CSV; return the .mha path."""
        self._csv_handle.close()
        n_px = self.source.shape[0] * self.source.shape[1]
        fd = self._tmp.fileno()
        pixels_per_block = max(1, BLOCK_BYTES // max(self._n, 1))
        deflater = zlib.compressobj(6)
        with tempfile.TemporaryFile(dir=self.out_dir) as packed:
            for p0 in range(0, n_px, pixels_per_block):
                p1 = min(p0 + pixels_per_block, n_px)
                block = np.empty((self._n, p1 - p0), dtype=np.uint8)
                for t in range(self._n):
                    block[t] = np.frombuffer(os.pread(fd, p1 - p0, t * n_px + p0), dtype=np.uint8)
                packed.write(deflater.compress(np.ascontiguousarray(block.T).tobytes()))
            packed.write(deflater.flush())
            size = packed.tell()
            packed.seek(0)
            with atomic_path(self.labels_path) as tmp_out, open(tmp_out, "wb") as out:
                out.write(self._header(size))
                while chunk := packed.read(1 << 20):
                    out.write(chunk)
        self._tmp.close()
        return self.labels_path

    def __enter__(self) -> CineLabelWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._csv_handle.closed:
            self.close()


def read_first_mask(path: str | Path) -> np.ndarray:
    """A first-frame mask from .mha/.nii(.gz)/.nrrd (2D, or a one-frame TrackRAD stack), .npy or .npz."""
    path = Path(path)
    if not path.is_file():
        raise CineError(f"first-frame mask {path.name} not found in {path.parent}")
    if path.suffix == ".npy":
        return np.load(path).astype(bool)
    if path.suffix == ".npz":
        with np.load(path) as data:
            return data[data.files[0]].astype(bool)
    frames = read_stack_frames(path)
    return np.squeeze(frames[0] if frames.shape[0] == 1 else frames) > 0
