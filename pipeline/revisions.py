"""A reviewer's corrections to a job's result, kept as numbered revisions (table `revisions`).

Revision 0 is the job's own result (`jobs.result_path`, its per-slice confidence in `review.json`
beside it). Each correction on one ROI, and each undo, makes the job's next revision: a row saying
who, when and what, the ROI's corrections then in force, the ROI's mask (a compressed NPZ of its
bounding box with the per-slice confidence, in `revisions/` beside the job's result) and an
RTSTRUCT holding every ROI as it then stands, file-checked like every result before the row exists.
An ROI's state is the newest row naming it (none: revision 0). Undo makes a new revision restoring
the state before, so numbers only grow and a compare-and-set on them is safe.

The correction itself is `models.corrections.correct` (the structure's prompts from the job, the
corrections in force, and the result before the newest one, so that only the newest is applied: a
revision's NPZ keeps the engine's state with the mask; the job's own result, read back from its
RTSTRUCT, is stamped as its prompts' result by `models.corrections.as_result_of`). It runs outside
the write lock, on the revision the reviewer saw; the row goes in only if that is still the job's
newest revision (one write transaction), else `RevisionConflict` names the newer one and nothing is
recorded.

Corrections are kept as the API takes them, in voxel indices (`slice` is z, `x` the column, `y` the row):
    {"kind": "point", "slice": z, "x": x, "y": y, "positive": true | false}
    {"kind": "box", "slice": z, "x0": x0, "y0": y0, "x1": x1, "y1": y1}      inclusive corners
    {"kind": "outline", "slice": z, "points": [[x, y], ...]}               a closed polygon
    {"kind": "extent", "first": z0, "last": z1}                             where the structure ends
"""
from __future__ import annotations

import io
import json
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from config.errors import UserError
from config.schema import Config
from converters.files import write_atomic
from converters.geometry import Volume
from db.engine import transaction
from db.schema import Job, Review, Revision, utcnow
from pipeline import jobs as J

KINDS = ("point", "box", "outline", "extent")
# what of the engine's details a revision's mask keeps, so that the next correction applies only itself
RESUMED_FROM = ("correction_state", "corrections_applied")
FOLDER = "revisions"
MAX_OUTLINE_POINTS = 20000


class CorrectionError(UserError):
    """A correction that cannot be used: the message names the field or the value at fault (HTTP 400)."""


class RevisionError(UserError):
    """The job or ROI cannot take a correction or undo now (not awaiting review, decided, nothing to undo)."""


class RevisionConflict(RevisionError):
    """Someone else made a newer revision first: nothing was recorded; `current` is the job's revision now."""

    def __init__(self, message: str, current: int) -> None:
        super().__init__(message)
        self.current = current


class Memo(Protocol):
    """A cache: `get(key, load)` returns the value kept for `key`, or `load()`'s (web.overlay.LRU is one)."""

    def get(self, key: Any, load: Callable[[], Any]) -> Any: ...


class _Once:
    """A memo for one call (nothing kept between calls)."""

    def __init__(self) -> None:
        self._items: dict[Any, Any] = {}
        self._lock = threading.Lock()

    def get(self, key: Any, load: Callable[[], Any]) -> Any:
        with self._lock:
            if key not in self._items:
                self._items[key] = load()
            return self._items[key]


# ---------------------------------------------------------------- masks
@dataclass(frozen=True)
class RoiMask:
    """One ROI's mask at one revision, kept as its bounding box (a 500-slice mask is 130 MB in full)."""

    shape: tuple[int, int, int]
    offset: tuple[int, int, int]
    box: np.ndarray  # bool, the mask inside its bounding box
    confidence: np.ndarray  # (z,) per slice, 0 where the structure does not reach
    # the engine's details a next correction resumes from (models.corrections: its correction_state and the
    # corrections applied), {} if none: the next correction is then computed in full
    engine: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, mask: np.ndarray, confidence: np.ndarray, engine: Mapping[str, Any] | None = None) -> "RoiMask":
        mask = np.asarray(mask, dtype=bool)
        conf = np.asarray(confidence, dtype=np.float32)
        engine = dict(engine or {})
        if not mask.any():
            return cls(tuple(mask.shape), (0, 0, 0), np.zeros((0, 0, 0), bool), conf, engine)
        on_z = mask.any(axis=(1, 2))  # the slices first: the rows and columns are then looked for on those only
        z0, z1 = int(np.flatnonzero(on_z)[0]), int(np.flatnonzero(on_z)[-1]) + 1
        rows, cols = np.flatnonzero(mask[z0:z1].any(axis=(0, 2))), np.flatnonzero(mask[z0:z1].any(axis=(0, 1)))
        lo, hi = [z0, int(rows[0]), int(cols[0])], [z1, int(rows[-1]) + 1, int(cols[-1]) + 1]
        return cls(tuple(mask.shape), tuple(lo), mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].copy(), conf, engine)

    def full(self) -> np.ndarray:
        out = np.zeros(self.shape, dtype=bool)
        z, y, x = self.offset
        dz, dy, dx = self.box.shape
        out[z:z + dz, y:y + dy, x:x + dx] = self.box
        return out

    @property
    def slices(self) -> tuple[int, int] | None:
        """First and last slice the structure is on (None: empty)."""
        nz = self.box.shape[0]
        if not nz:
            return None
        on = np.flatnonzero(self.box.any(axis=(1, 2)))
        return int(self.offset[0] + on[0]), int(self.offset[0] + on[-1])

    @property
    def mean_confidence(self) -> float:
        """Mean per-slice confidence over the slices the structure is on (0 when empty)."""
        if not self.box.size:
            return 0.0
        on = self.offset[0] + np.flatnonzero(self.box.any(axis=(1, 2)))
        return float(np.mean(self.confidence[on]))

    def plane(self, axis: int, index: int) -> np.ndarray:
        """The mask on one plane through the volume: axis 2 = sagittal at column `index` -> (z, y), axis 1 =
        coronal at row `index` -> (z, x)."""
        size = [s for a, s in enumerate(self.shape) if a != axis]
        out = np.zeros(size, dtype=bool)
        k = index - self.offset[axis]
        if self.box.size and 0 <= k < self.box.shape[axis]:
            cut = np.take(self.box, k, axis=axis)
            o = [off for a, off in enumerate(self.offset) if a != axis]
            out[o[0]:o[0] + cut.shape[0], o[1]:o[1] + cut.shape[1]] = cut
        return out

    def to_npz(self) -> bytes:
        buf = io.BytesIO()
        np.savez_compressed(buf, shape=np.array(self.shape), offset=np.array(self.offset), box=self.box,
                            confidence=self.confidence, engine=np.array(json.dumps(dict(self.engine))))
        return buf.getvalue()

    @classmethod
    def from_npz(cls, path: str | Path) -> "RoiMask":
        with np.load(path) as data:
            engine = json.loads(str(data["engine"])) if "engine" in data.files else {}
            return cls(tuple(int(v) for v in data["shape"]), tuple(int(v) for v in data["offset"]),
                       data["box"].astype(bool), data["confidence"].astype(np.float32), engine)


# ---------------------------------------------------------------- the state of a job's result
@dataclass(frozen=True)
class RoiState:
    """One ROI as it stands at a revision: which revision made it, with what corrections and mask."""

    name: str  # the ROI's name in the RTSTRUCT (the API's "roi")
    structure: str  # the prompt's structure in jobs.prompts
    number: int  # the revision that made this state (0: the job's own result)
    corrections: tuple[dict[str, Any], ...] = ()
    mask_path: str = ""  # NPZ ('' = the job's own result)
    previous: int = -1  # the revision an undo goes back to (-1: nothing to undo)
    warnings: tuple[str, ...] = ()
    user: str = ""


@dataclass(frozen=True)
class JobRevision:
    """A job's result at its newest revision: its number, RTSTRUCT and every ROI's state."""

    job_id: int
    number: int
    rtstruct: Path
    rois: tuple[RoiState, ...]
    user: str = ""  # who made it ('' for revision 0)
    at: datetime | None = None

    def roi(self, name: Any) -> RoiState:
        for state in self.rois:
            if state.name == name:
                return state
        raise CorrectionError(f"roi {name!r}: not an ROI of job {self.job_id}'s result (ROIs: "
                              f"{', '.join(s.name for s in self.rois)})")

    @property
    def corrections(self) -> int:
        """Corrections in force over every ROI (undone ones are not counted)."""
        return sum(len(s.corrections) for s in self.rois)


def result_rois(path: str | Path) -> list[str]:
    """ROI names of a result RTSTRUCT, in file order."""
    from pydicom import dcmread

    ds = dcmread(path, stop_before_pixels=True, specific_tags=["StructureSetROISequence"])
    return [str(item.ROIName) for item in ds.get("StructureSetROISequence", [])]


def side_file(job: Job) -> dict[str, Any]:
    """The job's review.json (pipeline/write_result.py: per structure its ROI, prompt slices, warnings,
    structure confidence, confidence per slice), or {} when it has none."""
    if not job.result_path:
        return {}
    path = Path(job.result_path).parent / "review.json"
    try:
        return _read_side_file(str(path), path.stat().st_mtime_ns)
    except (OSError, ValueError):
        return {}


@lru_cache(maxsize=1024)
def _read_side_file(path: str, mtime_ns: int) -> dict[str, Any]:
    """review.json parsed once per version (the job list re-reads every job's every few seconds)."""
    return json.loads(Path(path).read_text())


def current(session: Session, job: Job) -> JobRevision:
    """The job's newest revision (0: its own result) with every ROI's state, in the RTSTRUCT's ROI order."""
    if not job.result_path:
        raise RevisionError(f"job {job.id} has no result")
    rows = history(session, job.id)
    states = []
    for base in _base_states(job):
        row = next((r for r in reversed(rows) if r.roi == base.name), None)
        states.append(base if row is None else _state(base, row))
    last = rows[-1] if rows else None
    return JobRevision(job.id, last.number if last else 0, Path(last.rtstruct_path if last else job.result_path),
                       tuple(states), last.user if last else "", last.at if last else None)


def _base_states(job: Job) -> list[RoiState]:
    """Every ROI as the job's own result has it (revision 0), in the RTSTRUCT's ROI order."""
    structures = [str(p.get("structure", "")) for p in job.prompts or []]  # compute writes one ROI per prompt
    side = side_file(job).get("structures", [])
    return [RoiState(name, structures[i] if i < len(structures) else name, 0,
                     warnings=tuple(side[i].get("warnings", [])) if i < len(side) else ())
            for i, name in enumerate(result_rois(job.result_path))]


def _state(base: RoiState, row: Revision) -> RoiState:
    return replace(base, number=row.number, corrections=tuple(row.corrections or ()), mask_path=row.mask_path,
                   previous=row.previous, warnings=tuple((row.summary or {}).get("warnings", [])), user=row.user)


def history(session: Session, job_id: int) -> list[Revision]:
    """Every revision row of a job, oldest first."""
    return list(session.execute(select(Revision).where(Revision.job_id == job_id).order_by(Revision.number)).scalars())


def newest_number(session: Session, job_id: int) -> int:
    return int(session.execute(select(func.max(Revision.number)).where(Revision.job_id == job_id)).scalar() or 0)


def result_path(session: Session, job: Job) -> Path:
    """The RTSTRUCT of the job's newest revision: what an accept sends."""
    return current(session, job).rtstruct


# ---------------------------------------------------------------- corrections in, checked
def _int(body: Mapping[str, Any], key: str, what: str) -> int:
    if key not in body:
        raise CorrectionError(f"{key} is missing: {what}")
    value = body[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise CorrectionError(f"{key} must be an integer ({what}), got {json.dumps(value)}")
    return value


def _in(value: int, key: str, size: int, what: str) -> None:
    if not 0 <= value < size:
        raise CorrectionError(f"{key} = {value} is outside the image: {what} are 0..{size - 1}")


def parse_correction(body: Mapping[str, Any], shape_zyx: tuple[int, int, int]) -> dict[str, Any]:
    """The correction in `body` (API form, see the module docstring), checked against the image; normalised.

    Raises CorrectionError naming the key and value at fault.
    """
    nz, ny, nx = shape_zyx
    kind = body.get("kind")
    if kind not in KINDS:
        raise CorrectionError(f"kind {json.dumps(kind)}: expected one of {', '.join(KINDS)}")
    if kind == "extent":
        first = _int(body, "first", "the first slice the structure is on")
        last = _int(body, "last", "the last slice the structure is on")
        _in(first, "first", nz, "slices")
        _in(last, "last", nz, "slices")
        if last < first:
            raise CorrectionError(f"extent first = {first} > last = {last}: the first slice must not come after "
                                  "the last")
        return {"kind": kind, "first": first, "last": last}
    z = _int(body, "slice", "the slice index z, from 0")
    _in(z, "slice", nz, "slices")
    if kind == "point":
        x, y = _int(body, "x", "the column"), _int(body, "y", "the row")
        _in(x, "x", nx, "columns")
        _in(y, "y", ny, "rows")
        positive = body.get("positive", True)
        if not isinstance(positive, bool):
            raise CorrectionError(f"positive must be true or false, got {json.dumps(positive)}")
        return {"kind": kind, "slice": z, "x": x, "y": y, "positive": positive}
    if kind == "box":
        corners = {k: _int(body, k, "a corner (inclusive voxel index)") for k in ("x0", "y0", "x1", "y1")}
        for k in ("x0", "x1"):
            _in(corners[k], k, nx, "columns")
        for k in ("y0", "y1"):
            _in(corners[k], k, ny, "rows")
        if corners["x1"] < corners["x0"] or corners["y1"] < corners["y0"]:
            raise CorrectionError(f"box (x0, y0, x1, y1) = ({corners['x0']}, {corners['y0']}, {corners['x1']}, "
                                  f"{corners['y1']}) is inverted: x1 must be >= x0 and y1 >= y0")
        return {"kind": kind, "slice": z, **corners}
    points = body.get("points")
    if not isinstance(points, list) or len(points) < 3:
        raise CorrectionError("points must be a list of at least 3 [x, y] pairs (a closed polygon), got "
                              f"{json.dumps(points)[:80]}")
    if len(points) > MAX_OUTLINE_POINTS:
        raise CorrectionError(f"points: {len(points)} points, at most {MAX_OUTLINE_POINTS}")
    out = []
    for i, p in enumerate(points):
        if not (isinstance(p, list) and len(p) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                           and np.isfinite(v) for v in p)):
            raise CorrectionError(f"points[{i}] = {json.dumps(p)[:40]}: expected [x, y] (column, row)")
        if not (-0.5 <= p[0] <= nx - 0.5 and -0.5 <= p[1] <= ny - 0.5):
            raise CorrectionError(f"points[{i}] = [{p[0]}, {p[1]}] is outside the {nx} x {ny} image")
        out.append([round(float(p[0]), 2), round(float(p[1]), 2)])
    if not _outline_mask(out, (ny, nx)).any():
        raise CorrectionError(f"outline on slice {z} encloses no pixel centre")
    return {"kind": kind, "slice": z, "points": out}


def _outline_mask(points: Sequence[Sequence[float]], shape_yx: tuple[int, int]) -> np.ndarray:
    from converters.contours import polygon_to_mask

    return polygon_to_mask(np.asarray(points, dtype=float), shape_yx)


def to_correction(item: Mapping[str, Any], shape_yx: tuple[int, int]):  # type: ignore[no-untyped-def]
    """The `models` object of a stored correction (a prompt on its slice, or an Extent)."""
    from models.corrections import Extent
    from models.prompts import BoxPrompt, MaskPrompt, PointPrompt

    kind = item["kind"]
    if kind == "extent":
        return Extent(int(item["first"]), int(item["last"]))
    z = int(item["slice"])
    if kind == "point":
        return PointPrompt(z, ((int(item["x"]), int(item["y"]), bool(item["positive"])),))
    if kind == "box":
        return BoxPrompt(z, int(item["x0"]), int(item["y0"]), int(item["x1"]), int(item["y1"]))
    return MaskPrompt(z, _outline_mask(item["points"], shape_yx))


SHAPES = ("box", "outline")


def in_force(corrections: Sequence[Mapping[str, Any]], item: Mapping[str, Any]) -> tuple[dict[str, Any], ...]:
    """The corrections in force once `item` is added: a box or outline replaces the box or outline drawn
    before on its slice, an extent the extent before (the engine takes one of each), a click the click
    before on the same voxel (the reviewer changed their mind); other clicks add up."""
    def replaced(c: Mapping[str, Any]) -> bool:
        if item["kind"] == "extent":
            return c["kind"] == "extent"
        if item["kind"] == "point":
            return c["kind"] == "point" and (c["slice"], c["x"], c["y"]) == (item["slice"], item["x"], item["y"])
        return item["kind"] in SHAPES and c["kind"] in SHAPES and c["slice"] == item["slice"]

    return (*(dict(c) for c in corrections if not replaced(c)), dict(item))


def without_redrawn(prompts: Sequence[Any], corrections: Sequence[Mapping[str, Any]]) -> list[Any]:
    """The planner's prompts less the box or outline on a slice the reviewer drew a box or outline on
    (the reviewer's drawing replaces it there; the planner's clicks stay)."""
    from models.prompts import PointPrompt

    redrawn = {c["slice"] for c in corrections if c["kind"] in SHAPES}
    return [p for p in prompts if isinstance(p, PointPrompt) or p.slice_index not in redrawn]


def describe(item: Mapping[str, Any]) -> str:
    """One line for the page and the audit: "positive click at (x 96, y 102) on slice 27"."""
    kind = item.get("kind")
    if kind == "point":
        sign = "positive" if item.get("positive", True) else "negative"
        return f"{sign} click at (x {item['x']}, y {item['y']}) on slice {item['slice']}"
    if kind == "box":
        return f"box ({item['x0']}, {item['y0']})-({item['x1']}, {item['y1']}) on slice {item['slice']}"
    if kind == "outline":
        return f"outline of {len(item['points'])} points on slice {item['slice']}"
    if kind == "extent":
        return f"extent: slices {item['first']}-{item['last']}"
    return str(kind)


# ---------------------------------------------------------------- making a revision
@dataclass(frozen=True)
class Made:
    """What a correction or undo made: the new revision and the corrected ROI's summary."""

    revision: int
    roi: str
    slices: tuple[int, int] | None
    confidence: float
    timings_s: dict[str, float] = field(default_factory=dict)


@dataclass
class _Base:
    """Revision 0 read on the series: per ROI its mask, colour and RTROIInterpretedType."""

    masks: list[RoiMask]
    colours: list[tuple[int, int, int] | None]
    types: list[str]


def _base(job: Job, volume: Volume, memo: Memo) -> _Base:
    def load() -> _Base:
        from converters.rtstruct_read import read_rtstruct

        rois = read_rtstruct(job.result_path, volume).rois
        side = side_file(job).get("structures", [])
        masks = []
        for i, roi in enumerate(rois):
            conf = side[i].get("confidence", []) if i < len(side) else []
            on = roi.mask.any(axis=(1, 2))
            confidence = np.asarray(conf, np.float32) if len(conf) == len(on) else on.astype(np.float32)
            masks.append(RoiMask.of(roi.mask, confidence))
        return _Base(masks, [r.color for r in rois], [r.interpreted_type for r in rois])

    return memo.get(("revision-base", job.id, job.result_path), load)


def roi_mask(job: Job, state: RoiState, index: int, volume: Volume | None, memo: Memo) -> RoiMask:
    """The mask of ROI number `index + 1` in `state`: its NPZ, or the job's own result read on the series
    (`volume`, needed only then)."""
    if not state.mask_path:
        if volume is None:
            raise ValueError(f"job {job.id}: the series is needed to read ROI {state.name!r} of its result")
        return _base(job, volume, memo).masks[index]
    return memo.get(("revision-mask", state.mask_path), lambda: RoiMask.from_npz(state.mask_path))


def roi_confidence(job: Job, state: RoiState, index: int, n_slices: int, memo: Memo) -> np.ndarray:
    """Per-slice confidence of ROI number `index + 1` in `state`, without reading the series: its NPZ's, or
    for the job's own result its review.json's (none recorded: zeros)."""
    if state.mask_path:
        return roi_mask(job, state, index, None, memo).confidence
    side = side_file(job).get("structures", [])
    conf = side[index].get("confidence", []) if index < len(side) else []
    return np.asarray(conf, np.float32) if len(conf) == n_slices else np.zeros(n_slices, np.float32)


def load_volume(factory: sessionmaker[Session], job: Job) -> Volume:
    """The job's image series, read from the archive."""
    from converters.series import read_series
    from pipeline.discovery import series_folder

    with factory() as session:
        folder = series_folder(session, job.series_instance_uid)
    return read_series(folder, job.series_instance_uid)


def _open_job(session: Session, job_id: int, roi: str | None = None) -> Job:
    """The job, refreshed, if it is open to corrections (awaiting review, `roi` not decided yet)."""
    job = session.get(Job, job_id)
    if job is None:
        raise RevisionError(f"no job {job_id}")
    session.refresh(job)
    if job.state != "awaiting_review":
        raise RevisionError(f"job {job_id} is {job.state}, not awaiting_review: its result can no longer be corrected")
    if roi is not None:
        decided = session.execute(select(Review).where(Review.job_id == job_id, Review.roi == roi)
                                  .order_by(Review.id).limit(1)).scalar()
        if decided is not None:
            raise RevisionError(f"job {job_id}: ROI {roi!r} was already {decided.decision}ed by {decided.user}: "
                                "a decision is final")
    return job


def _begin(factory: sessionmaker[Session], job_id: int, roi: str,
           based_on: int | None) -> tuple[Job, JobRevision, RoiState, int]:
    """The job (open to corrections of `roi`), its newest revision (RevisionConflict if that is not
    `based_on`), the ROI's state there and its index in the RTSTRUCT."""
    with factory() as session:
        job = _open_job(session, job_id, roi)
        revision = current(session, job)
    if based_on is not None and based_on != revision.number:
        raise RevisionConflict(f"job {job_id} is at revision {revision.number}, not {based_on}: someone else "
                               f"changed it; look at revision {revision.number} and correct again", revision.number)
    state = revision.roi(roi)
    return job, revision, state, revision.rois.index(state)


def add_correction(factory: sessionmaker[Session], config: Config, job_id: int, user: str, roi: str,
                   correction: Mapping[str, Any], *, volume: Volume | None = None, based_on: int | None = None,
                   memo: Memo | None = None) -> Made:
    """Correct ROI `roi` of job `job_id` by `correction` (API form, checked by `parse_correction`): the
    structure is propagated again from the job's prompts plus its corrections, and the next revision made.

    `based_on`: the revision the reviewer saw (RevisionConflict if it is no longer the newest). Raises
    CorrectionError for a correction that cannot be used, RevisionError when the job or ROI is closed.
    """
    from models.corrections import as_result_of, correct
    from models.prompts import PromptError
    from models.result import PropagationResult
    from pipeline.model_routing import check_loaded, settings_for, verified_settings
    from pipeline.prompt_rois import PromptSpec, prompt_objects

    memo = memo or _Once()
    t0 = time.perf_counter()
    job, revision, state, index = _begin(factory, job_id, roi, based_on)
    volume = volume if volume is not None else load_volume(factory, job)
    item = parse_correction(correction, volume.array.shape)
    corrections = in_force(state.corrections, item)
    reused = _same_correction_made(factory, job_id, roi, corrections, state.mask_path)
    timings: dict[str, float] = {"read_s": time.perf_counter() - t0}
    mask_path: str | None = None  # None: a new mask, written with the revision
    if reused is not None:  # a redo after an undo: the engine would compute the same mask again
        mask_path = reused.mask_path
        new_mask = roi_mask(job, replace(state, mask_path=mask_path), index, volume, memo)
        summary = dict(reused.summary or {}, reused=reused.number)
    else:
        t = time.perf_counter()
        before = roi_mask(job, state, index, volume, memo)
        spec = next((PromptSpec.from_json(p) for p in job.prompts or [] if p.get("structure") == state.structure), None)
        if spec is None:
            raise RevisionError(f"job {job_id}: no prompt for structure {state.structure!r} of ROI {roi!r}")
        structure_set = _prompt_structure_set(factory, job, volume, memo) if any(
            p["kind"] == "mask" for p in spec.parts) else None
        routed = settings_for(factory, config, state.structure, volume.modality)
        settings, planner = verified_settings(routed), prompt_objects(spec, structure_set)
        previous = PropagationResult(before.full(), before.confidence.copy(), job.backend or routed.backend,
                                     details=dict(before.engine))
        if not state.mask_path:  # the job's own result, as sent and shown: the first correction changes that
            previous = as_result_of(previous, volume.array, volume.geometry.spacing_zyx, planner, volume.modality,
                                    settings)
        shape_yx = volume.array.shape[1:]
        timings["prepare_s"] = time.perf_counter() - t
        t = time.perf_counter()
        try:
            result = correct(volume.array, volume.geometry.spacing_zyx, without_redrawn(planner, corrections),
                             [to_correction(c, shape_yx) for c in corrections], volume.modality, settings, previous)
        except PromptError as exc:
            raise CorrectionError(f"{describe(item)}: {exc}") from exc
        check_loaded(routed, result.checkpoint_sha256)
        timings["correct_s"] = time.perf_counter() - t
        if not result.mask.any():
            raise CorrectionError(f"{describe(item)} leaves ROI {roi!r} with no contour: nothing could be sent; "
                                  "reject the ROI instead")
        new_mask = RoiMask.of(result.mask, result.confidence,
                              {k: result.details[k] for k in RESUMED_FROM if k in result.details})
        summary = {"warnings": list(result.warnings), "backend": result.backend, "prompt": spec.describe(),
                   "incremental": bool(result.details.get("incremental"))}
    summary.update(slices=list(new_mask.slices or ()), confidence=round(new_mask.mean_confidence, 3),
                   description=describe(item))
    new_state = replace(state, corrections=corrections, previous=state.number,
                        warnings=tuple(summary.get("warnings", ())))
    return _commit(factory, config, job, revision, index, new_state, new_mask, volume, memo, user, timings, summary,
                   action="correction", correction=item, mask_path=mask_path)


def undo(factory: sessionmaker[Session], config: Config, job_id: int, user: str, roi: str, *,
         volume: Volume | None = None, based_on: int | None = None, memo: Memo | None = None) -> Made:
    """Take back the newest correction in force on ROI `roi`: the next revision restores the ROI's state
    before it (nothing is computed again). RevisionError when there is nothing to undo."""
    memo = memo or _Once()
    t0 = time.perf_counter()
    job, revision, state, index = _begin(factory, job_id, roi, based_on)
    if state.previous < 0:
        raise RevisionError(f"job {job_id}: ROI {roi!r} has no correction to undo")
    with factory() as session:
        row = session.execute(select(Revision).where(Revision.job_id == job_id,
                                                     Revision.number == state.previous)).scalar()
    base = _base_states(job)[index]
    target = base if row is None else _state(base, row)
    volume = volume if volume is not None else load_volume(factory, job)
    mask = roi_mask(job, target, index, volume, memo)
    timings = {"read_s": time.perf_counter() - t0}
    summary = {"warnings": list(target.warnings), "slices": list(mask.slices or ()),
               "confidence": round(mask.mean_confidence, 3),
               "description": f"undo: back to revision {state.previous}"}
    if row is not None:
        summary.update({k: v for k, v in (row.summary or {}).items() if k in ("backend", "prompt")})
    return _commit(factory, config, job, revision, index, target, mask, volume, memo, user, timings, summary,
                   action="undo", correction={"undo": state.number}, mask_path=target.mask_path,
                   restores=state.previous)


def _same_correction_made(factory: sessionmaker[Session], job_id: int, roi: str, corrections: tuple,
                          before_mask_path: str) -> Revision | None:
    """An earlier correction revision of this ROI made from the same state with the same corrections
    (its mask can be reused: the engine is given exactly the same input)."""
    with factory() as session:
        rows = session.execute(select(Revision).where(Revision.job_id == job_id, Revision.roi == roi,
                                                      Revision.action == "correction")).scalars().all()
        by_number = {r.number: r for r in session.execute(select(Revision).where(
            Revision.job_id == job_id)).scalars()}
    for row in reversed(rows):
        if list(row.corrections or []) != [dict(c) for c in corrections]:
            continue
        earlier = by_number.get(row.previous)
        if (earlier.mask_path if earlier is not None else "") == before_mask_path:
            return row
    return None


def _prompt_structure_set(factory: sessionmaker[Session], job: Job, volume: Volume,
                          memo: Memo):  # type: ignore[no-untyped-def]
    """The job's prompt RTSTRUCT read on the series (outline prompts are taken from it)."""
    from converters.rtstruct_read import read_rtstruct
    from pipeline.discovery import rtstruct_path

    def load():  # type: ignore[no-untyped-def]
        with factory() as session:
            path = rtstruct_path(session, job.rtstruct_sop_instance_uid)
        return read_rtstruct(path, volume)

    return memo.get(("revision-prompt", job.id), load)


def _roi_for_rtstruct(job: Job, state: RoiState, mask: np.ndarray, colour, itype: str,  # type: ignore[no-untyped-def]
                      backend: str, prompt: str):
    from converters.rtstruct_write import RoiMask as WrittenRoi
    from pipeline.write_result import roi_description

    n = len(state.corrections)
    how = f"rtprop {backend or job.backend}" + (f", {n} reviewer correction{'s' * (n != 1)}" if n else "")
    return WrittenRoi(state.name, mask, color=colour, interpreted_type=itype,
                      description=roi_description(backend or job.backend, prompt, list(state.warnings)),
                      generation_algorithm="SEMIAUTOMATIC" if n else "AUTOMATIC", generation_description=how)


def _commit(factory: sessionmaker[Session], config: Config, job: Job, revision: JobRevision, index: int,
            new_state: RoiState, new_mask: RoiMask, volume: Volume, memo: Memo, user: str,
            timings: dict[str, float], summary: dict[str, Any], *, action: str, correction: dict[str, Any],
            mask_path: str | None, restores: int | None = None) -> Made:
    """Write the next revision's files (NPZ unless `mask_path` names the mask already kept, '' = the job's
    result; RTSTRUCT), file check them, and record the row if the job is still at `revision`
    (compare-and-set); the files of a refused revision are removed."""
    from converters.rtstruct_write import write_rtstruct
    from pipeline.compute import HeldError
    from pipeline.prompt_rois import PromptSpec
    from pipeline.runner import uid_seed
    from pipeline.file_check import check_file
    from pipeline.write_result import sha256_file

    t = time.perf_counter()
    number = revision.number + 1
    folder = Path(job.result_path).parent / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"r{number:04d}-{secrets.token_hex(3)}"  # racing reviewers never write the same file
    made: list[Path] = []
    try:
        if mask_path is None:
            mask_path = str(write_atomic(folder / f"{stem}-roi{index + 1}.npz", new_mask.to_npz()))
            made.append(Path(mask_path))
            memo.get(("revision-mask", mask_path), lambda: new_mask)
        states = list(revision.rois)
        states[index] = replace(new_state, mask_path=mask_path)
        base = _base(job, volume, memo)
        masks = [new_mask.full() if i == index else roi_mask(job, s, i, volume, memo).full()
                 for i, s in enumerate(states)]
        prompts = {p.get("structure"): p for p in job.prompts or []}
        rois = []
        for i, (s, m) in enumerate(zip(states, masks)):
            prompt = PromptSpec.from_json(prompts[s.structure]).describe() if s.structure in prompts else ""
            backend = str(summary.get("backend", "")) if i == index else ""
            rois.append(_roi_for_rtstruct(job, s, m, base.colours[i], base.types[i], backend, prompt))
        total = sum(len(s.corrections) for s in states)
        users = sorted({s.user for s in states if s.user and s.corrections} | ({user} if total else set()))
        path = write_rtstruct(volume, rois, folder / f"{stem}.dcm", config.rtstruct,
                              series_description=f"rtprop job {job.id} revision {number}",
                              uid_seed=f"{uid_seed(job)}:revision:{number}",
                              structure_set_description=(
                                  f"rtprop job {job.id}, revision {number}: {total} reviewer correction"
                                  f"{'s' * (total != 1)}" + (f" by {', '.join(users)}" if users else "")))
        made.append(path)
        timings["write_s"] = time.perf_counter() - t
        t = time.perf_counter()
        check = check_file(path, volume, masks, config.pipeline.file_check_min_dice)
        timings["file_check_s"] = time.perf_counter() - t
        if not check.ok:
            raise HeldError(f"job {job.id} revision {number}: the RTSTRUCT failed its file check: "
                                 + "; ".join(check.problems))
        summary["file_check_dice"] = check.min_dice
        summary["corrections"] = len(new_state.corrections)
        t = time.perf_counter()
        with transaction(factory) as session:
            row = _open_job(session, job.id, new_state.name)
            newest = newest_number(session, job.id)
            if newest != revision.number:
                raise RevisionConflict(f"job {job.id} is at revision {newest}, not {revision.number}: someone else "
                                       f"changed it meanwhile; nothing recorded; look at revision {newest} and "
                                       "correct again", newest)
            summary["seconds"] = {k: round(v, 3) for k, v in timings.items()}
            session.add(Revision(job_id=job.id, number=number, roi=new_state.name, action=action,
                                 correction=correction, corrections=list(new_state.corrections),
                                 previous=new_state.previous, restores=restores, mask_path=mask_path,
                                 rtstruct_path=str(path), rtstruct_sha256=sha256_file(path), summary=summary,
                                 user=user, at=utcnow()))
            J.audit_job(session, row, f"job.{action}", user=user, roi=new_state.name, revision=number,
                        correction=correction, corrections=len(new_state.corrections),
                        slices=summary.get("slices"), confidence=summary.get("confidence"),
                        rtstruct=path.name, seconds=summary["seconds"])
        timings["record_s"] = time.perf_counter() - t
    except BaseException:
        for p in made:
            p.unlink(missing_ok=True)
        raise
    return Made(number, new_state.name, new_mask.slices, round(new_mask.mean_confidence, 3),
                {k: round(v, 3) for k, v in timings.items()})


def audit_refused(factory: sessionmaker[Session], job_id: int, user: str, event: str, reason: str,
                  **details: Any) -> None:
    """Audit a refused correction, undo or review call with the person's name (the job may not exist)."""
    from db.audit import record

    with transaction(factory) as session:
        job = session.get(Job, job_id)
        if job is None:
            record(session, event, component="web", user=user, job=job_id, reason=reason[:500], **details)
        else:
            J.audit_job(session, job, event, user=user, reason=reason[:500], **details)
