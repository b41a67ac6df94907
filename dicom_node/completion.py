"""Series completion: there is no DICOM "series done" signal, so we decide from the DB.

A series in state `receiving` becomes
  * `complete` when it has been quiet for node.series_quiet_period_s (or its association was
    released and node.complete_on_release) AND its slices are contiguous: positions along the
    slice normal evenly spaced with no gap. RTSTRUCT-only series (and series without positions)
    complete at once.
  * `failed` when a gap is still there node.series_gap_timeout_s after the last instance
    (audit `series.incomplete` lists the missing positions).
State lives in the `series` table; the checker is a loop over the DB, so after a restart it simply
picks up every series still `receiving`.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
from pydicom import dcmread
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from config.schema import Config
from db.audit import record
from db.engine import transaction
from db.schema import Instance, Series
from dicom_node.storage import RTSTRUCT_CLASS

LOG = logging.getLogger("rtprop.node.completion")


class SeriesIncompleteError(Exception):
    """A series has a gap in its slice positions; `missing_mm` names the positions along the normal."""

    def __init__(self, series_uid: str, missing_mm: list[float], reason: str) -> None:
        super().__init__(f"series {series_uid}: {reason}")
        self.series_uid = series_uid
        self.missing_mm = missing_mm
        self.reason = reason


@dataclass
class Contiguity:
    ok: bool
    reason: str = ""
    slices: int = 0
    spacing_mm: float | None = None
    missing_mm: list[float] = field(default_factory=list)


def _aware(dt: datetime | None) -> datetime | None:
    if dt is None:
        return None
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


def check_contiguity(paths: list[str], *, rel_tol: float = 0.1, abs_tol_mm: float = 0.05) -> Contiguity:
    """Are the images at `paths` evenly spaced along their slice normal, with no missing slice?

    Tolerance per step: |step - spacing| <= max(abs_tol_mm, rel_tol * spacing), spacing = median step.
    A step of ~k x spacing (k >= 2) means k-1 missing slices at the positions in between.
    """
    positions: list[float] = []
    normal = None
    no_position = 0
    for path in paths:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=["ImagePositionPatient", "ImageOrientationPatient",
                                                                    "SOPClassUID"])
        ipp, iop = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
        if ipp is None or iop is None or len(ipp) != 3 or len(iop) != 6:
            no_position += 1
            continue
        if normal is None:
            row, col = np.array(iop[:3], float), np.array(iop[3:], float)
            normal = np.cross(row, col)
        positions.append(float(np.dot(normal, np.array(ipp, float))))
    if not positions:
        return Contiguity(True, "no image positions (non-image series)", slices=0)
    unique = np.unique(np.round(np.array(positions), 3))
    if len(unique) < 2:
        return Contiguity(True, "single slice position", slices=len(positions))
    steps = np.diff(unique)
    spacing = float(np.median(steps))
    tol = max(abs_tol_mm, rel_tol * spacing)
    missing: list[float] = []
    uneven: list[float] = []
    for start, step in zip(unique[:-1], steps):
        if abs(step - spacing) <= tol:
            continue
        k = int(round(step / spacing))
        if k >= 2 and abs(step - k * spacing) <= tol * k:
            missing.extend(round(float(start + j * spacing), 2) for j in range(1, k))
        else:
            uneven.append(round(float(step), 3))
    if missing or uneven:
        reason = []
        if missing:
            reason.append(f"{len(missing)} missing slice position(s) at {missing[:20]} mm")
        if uneven:
            reason.append(f"uneven steps {uneven[:10]} mm (spacing {spacing:.3f} mm)")
        return Contiguity(False, "; ".join(reason), slices=len(unique), spacing_mm=spacing, missing_mm=missing)
    note = f"{len(unique)} positions, spacing {spacing:.3f} mm"
    if no_position:
        note += f", {no_position} instance(s) without position"
    return Contiguity(True, note, slices=len(unique), spacing_mm=spacing)


class CompletionChecker:
    """Looks at every `receiving` series and closes those that are done. Safe to run after a restart."""

    def __init__(self, factory: sessionmaker[Session], config: Config) -> None:
        self.factory = factory
        self.config = config
        self._released: set[str] = set()
        self._lock = threading.Lock()
        # (series uid, instance_count) -> contiguity, so a waiting series is not re-read every pass
        self._cache: dict[tuple[str, int], Contiguity] = {}
        self._waiting_audited: set[tuple[str, int]] = set()
        self._wake = threading.Event()

    def notify_release(self, series_uids: set[str]) -> None:
        """Association released (complete_on_release): check these series without waiting."""
        with self._lock:
            self._released |= set(series_uids)
        self._wake.set()

    def check(self, now: datetime | None = None) -> dict[str, str]:
        """One pass; returns {series_uid: new state} for series that changed."""
        now = now or datetime.now(timezone.utc)
        node = self.config.node
        with self._lock:
            released, self._released = self._released, set()
        with self.factory() as session:
            rows = session.execute(select(Series).where(Series.state == "receiving")).scalars().all()
        changed: dict[str, str] = {}
        for s in rows:
            last = _aware(s.last_received_at) or now
            quiet_s = (now - last).total_seconds()
            if not (quiet_s >= node.series_quiet_period_s or s.series_instance_uid in released):
                continue
            with self.factory() as session:
                inst = session.execute(select(Instance.path, Instance.sop_class_uid).where(
                    Instance.series_instance_uid == s.series_instance_uid)).all()
            if inst and all(i.sop_class_uid == RTSTRUCT_CLASS for i in inst):
                result = Contiguity(True, "RT Structure Set series", slices=0)
            else:
                key = (s.series_instance_uid, s.instance_count)
                result = self._cache.get(key)
                if result is None:
                    try:
                        result = check_contiguity([i.path for i in inst])
                    except Exception as exc:  # an unreadable archived file: keep waiting, say why
                        result = Contiguity(False, f"cannot read slice positions: {exc}")
                    self._cache[key] = result
            if result.ok:
                if self._close(s, "complete", result, now):
                    changed[s.series_instance_uid] = "complete"
            elif quiet_s >= node.series_gap_timeout_s:
                if self._close(s, "failed", result, now):
                    changed[s.series_instance_uid] = "failed"
            else:
                self._audit_waiting(s, result)
        return changed

    def _audit_waiting(self, s: Series, result: Contiguity) -> None:
        key = (s.series_instance_uid, s.instance_count)
        if key in self._waiting_audited:
            return
        self._waiting_audited.add(key)
        with transaction(self.factory) as session:
            record(session, "series.waiting", component="dicom_node", study_instance_uid=s.study_instance_uid,
                   series_instance_uid=s.series_instance_uid, calling_ae=s.calling_ae, reason=result.reason,
                   missing_positions_mm=result.missing_mm, instance_count=s.instance_count)
        LOG.info("series %s not contiguous yet: %s", s.series_instance_uid, result.reason)

    def _close(self, s: Series, state: str, result: Contiguity, now: datetime) -> bool:
        """receiving -> state, only if nothing arrived since we looked (compare-and-set on the count)."""
        with transaction(self.factory) as session:
            done = session.execute(update(Series).where(
                Series.id == s.id, Series.state == "receiving", Series.instance_count == s.instance_count,
            ).values(state=state, completed_at=now, reason=result.reason)).rowcount
            if not done:
                return False
            event = "series.complete" if state == "complete" else "series.incomplete"
            record(session, event, component="dicom_node", study_instance_uid=s.study_instance_uid,
                   series_instance_uid=s.series_instance_uid, calling_ae=s.calling_ae, modality=s.modality,
                   instance_count=s.instance_count, slices=result.slices, spacing_mm=result.spacing_mm,
                   missing_positions_mm=result.missing_mm, reason=result.reason)
        self._cache = {k: v for k, v in self._cache.items() if k[0] != s.series_instance_uid}
        log = LOG.info if state == "complete" else LOG.warning
        log("series %s %s (%d instances): %s", s.series_instance_uid, state, s.instance_count, result.reason)
        return True

    def run(self, stop: threading.Event, interval_s: float = 1.0) -> None:
        """Loop until `stop` is set; errors are logged and the loop goes on."""
        while not stop.is_set():
            try:
                self.check()
            except Exception:
                LOG.exception("completion check failed; retrying")
            self._wake.wait(interval_s)
            self._wake.clear()
