"""Series completion: there is no DICOM "series done" signal, so we decide from the DB.

A series in state `receiving` becomes
  * `complete` when it has been quiet for node.series_quiet_period_s (or its association was
    released and node.complete_on_release, or it came in by the drop-in) AND the series reader
    would take it: the same header checks and the one contiguity rule (converters/contiguity.py,
    via `converters.series.check_series_files`), so nothing is accepted here and refused later.
    RTSTRUCT-only series complete at once.
  * `failed` at once when no arrival can fix it (gantry tilt, mixed orientations or grids), or when
    a gap is still there node.series_gap_timeout_s after the last instance (audit `series.incomplete`
    names the missing positions).
State lives in the `series` table; the checker is a loop over the DB, so after a restart it simply
picks up every series still `receiving`.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any

from pydicom.uid import RTStructureSetStorage
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from config.schema import Config
from converters.contiguity import Contiguity
from converters.series import check_series_files
from db.audit import record
from db.engine import log_fault, transaction
from db.schema import Instance, Series, aware, utcnow

LOG = logging.getLogger("rtprop.node.completion")


class CompletionChecker:
    """Looks at every `receiving` series and closes those that are done. Safe to run after a restart."""

    def __init__(self, factory: sessionmaker[Session], config: Config,
                 on_complete: Callable[[Session, Series], Any] | None = None) -> None:
        self.factory = factory
        self.config = config
        # called in the transaction that completes a series: the receiving node creates its jobs there
        # (pipeline/discovery.py `jobs_on_completion`), so no other process sees the series without them
        self.on_complete = on_complete
        self._released: set[str] = set()
        self._lock = threading.Lock()
        # (series uid, instance_count) -> contiguity, so a waiting series is not re-read every pass
        self._cache: dict[tuple[str, int], Contiguity] = {}
        self._waiting_audited: set[tuple[str, int]] = set()
        self._wake = threading.Event()

    def notify_release(self, series_uids: set[str]) -> None:
        """These series have all their instances (association released with complete_on_release, or a
        stable drop-in case): check them without waiting for the quiet period."""
        with self._lock:
            self._released |= set(series_uids)
        self._wake.set()

    def check(self, now: datetime | None = None) -> dict[str, str]:
        """One pass; returns {series_uid: new state} for series that changed."""
        now = now or utcnow()
        node = self.config.node
        with self._lock:
            released, self._released = self._released, set()
        with self.factory() as session:
            rows = session.execute(select(Series).where(Series.state == "receiving")).scalars().all()
        changed: dict[str, str] = {}
        for s in rows:
            last = aware(s.last_received_at) or now
            quiet_s = (now - last).total_seconds()
            if not (quiet_s >= node.series_quiet_period_s or s.series_instance_uid in released):
                continue
            with self.factory() as session:
                inst = session.execute(select(Instance.path, Instance.sop_class_uid).where(
                    Instance.series_instance_uid == s.series_instance_uid)).all()
            if inst and all(i.sop_class_uid == RTStructureSetStorage for i in inst):
                result = Contiguity(True, "RT Structure Set series", slices=0)
            else:
                key = (s.series_instance_uid, s.instance_count)
                result = self._cache.get(key)
                if result is None:
                    try:
                        result = check_series_files([i.path for i in inst])
                    except Exception as exc:  # an unreadable archived file: keep waiting, say why
                        result = Contiguity(False, f"cannot read slice positions: {exc}")
                    self._cache[key] = result
            if result.ok:
                if self._close(s, "complete", result, now):
                    changed[s.series_instance_uid] = "complete"
            elif result.final or quiet_s >= node.series_gap_timeout_s:
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
                   series_instance_uid=s.series_instance_uid, calling_ae=s.calling_ae,
                   patient_id_hash=s.patient_id_hash, reason=result.reason,
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
            if state == "complete" and self.on_complete is not None:
                self.on_complete(session, s)
            event = "series.complete" if state == "complete" else "series.incomplete"
            record(session, event, component="dicom_node", study_instance_uid=s.study_instance_uid,
                   series_instance_uid=s.series_instance_uid, calling_ae=s.calling_ae,
                   patient_id_hash=s.patient_id_hash, modality=s.modality,
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
            except Exception as exc:  # noqa: BLE001 - e.g. the database is down: the next pass retries
                log_fault(LOG, "completion check", exc)
            self._wake.wait(interval_s)
            self._wake.clear()
