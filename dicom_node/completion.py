"""Series completion: there is no DICOM "series done" signal, so we decide from the DB.

A series in state `receiving` becomes
  * `complete` when the series reader would take it (the same header checks and the one contiguity
    rule, converters/contiguity.py via `converters.series.check_series_files`, so nothing is accepted
    here and refused later) AND one of these rules says no more images are coming (`RULES`, kept in
    `series.completed_by` and the audit, and shown on the job):
      - "prompt": a prompt RTSTRUCT in the archive lists exactly the series' images: its
        RTReferencedSeriesSequence -> ContourImageSequence names every image there, no image there is
        unlisted, and it lists images without contours (a TPS export listing the whole series, not only
        its contoured slices: converters/rtstruct_read.py `ImageListing.whole_series`). At once,
        whichever came first, the images or the prompt;
      - "release": its association was released and node.complete_on_release is set;
      - "dropin": it came in a stable drop-in case;
      - "quiet": no instance for node.series_quiet_period_s;
    RTSTRUCT-only series complete at once ("rtstruct"): each structure set is one instance and one job.
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

from pydicom import dcmread
from pydicom.uid import RTStructureSetStorage
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from config.schema import Config
from converters.contiguity import Contiguity
from converters.rtstruct_read import ImageListing, image_listings
from converters.rtstruct_write import MANUFACTURER
from converters.series import check_series_files
from db.audit import record
from db.engine import log_fault, transaction
from db.schema import Instance, Job, Series, aware, utcnow

LOG = logging.getLogger("rtprop.node.completion")
RULES = {  # series.completed_by -> what it means (the audit, the job's timeline, docs/conformance.md)
    "prompt": "the prompt RTSTRUCT lists every image of the series, and all are here",
    "release": "its association was released (node.complete_on_release)",
    "dropin": "it came in a stable drop-in case",
    "quiet": "no new image for node.series_quiet_period_s",
    "rtstruct": "an RT Structure Set series completes at once",
}


def listings_of(path: str) -> dict[str, ImageListing]:
    """The image listings of the RTSTRUCT file at `path` ({} for rtprop's own results: never a prompt)."""
    ds = dcmread(path, stop_before_pixels=True, force=True)
    if str(ds.get("Manufacturer", "")).strip().lower() == MANUFACTURER.lower():
        return {}
    return image_listings(ds)


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
        self._rules: dict[str, str] = {}  # series uid -> "release" | "dropin", from notify_release
        self._listings: dict[str, dict[str, ImageListing]] = {}  # prompt SOP UID -> its listings (files never change)

    def notify_release(self, series_uids: set[str], rule: str = "release") -> None:
        """These series have all their instances (association released with complete_on_release, or a
        stable drop-in case, `rule` "dropin"): check them without waiting for the quiet period."""
        with self._lock:
            self._released |= set(series_uids)
            self._rules.update(dict.fromkeys(series_uids, rule))
        self._wake.set()

    def look_now(self) -> None:
        """An association that stored instances ended: check at once rather than at the next poll (a prompt's
        listing may now be whole; the quiet period still runs from the last instance)."""
        self._wake.set()

    def _whole_listings(self) -> dict[str, list[tuple[str, ImageListing]]]:
        """Series uid -> (prompt SOP UID, listing) of every prompt not yet decided by its job whose listing
        names the whole series."""
        decided = select(Job.rtstruct_sop_instance_uid).where(Job.kind == "prompt", Job.state != "received")
        with self.factory() as session:
            prompts = session.execute(select(Instance.sop_instance_uid, Instance.path).where(
                Instance.sop_class_uid == RTStructureSetStorage, Instance.sop_instance_uid.not_in(decided))).all()
        out: dict[str, list[tuple[str, ImageListing]]] = {}
        self._listings = {uid: self._listings[uid] for uid, _ in prompts if uid in self._listings}  # decided: gone
        for uid, path in prompts:
            if uid not in self._listings:
                try:
                    self._listings[uid] = listings_of(path)
                except Exception as exc:  # noqa: BLE001 - its job says why; the quiet period still applies
                    LOG.warning("cannot read the image listing of RTSTRUCT %s: %s", uid, exc)
                    self._listings[uid] = {}
            for series_uid, listing in self._listings[uid].items():
                if listing.whole_series:
                    out.setdefault(series_uid, []).append((uid, listing))
        return out

    def _listed_whole(self, s: Series, listings: list[tuple[str, ImageListing]]) -> str:
        """The prompt whose listing names exactly the series' images now in the archive, or ''."""
        with self.factory() as session:
            here = set(session.execute(select(Instance.sop_instance_uid).where(
                Instance.series_instance_uid == s.series_instance_uid)).scalars())
        return next((uid for uid, listing in listings if listing.listed == here), "")

    def check(self, now: datetime | None = None) -> dict[str, str]:
        """One pass; returns {series_uid: new state} for series that changed."""
        now = now or utcnow()
        node = self.config.node
        with self._lock:
            released, self._released = self._released, set()
            rules = {uid: self._rules.pop(uid) for uid in released if uid in self._rules}
        with self.factory() as session:
            rows = session.execute(select(Series).where(Series.state == "receiving")).scalars().all()
        listed = self._whole_listings() if any(s.modality != "RTSTRUCT" for s in rows) else {}
        changed: dict[str, str] = {}
        for s in rows:
            last = aware(s.last_received_at) or now
            quiet_s = (now - last).total_seconds()
            rule, prompt = "", ""
            if s.modality == "RTSTRUCT":
                rule = "rtstruct"
            elif s.series_instance_uid in listed and (prompt := self._listed_whole(s, listed[s.series_instance_uid])):
                rule = "prompt"
            elif s.series_instance_uid in released:
                rule = rules.get(s.series_instance_uid, "release")
            elif quiet_s >= node.series_quiet_period_s:
                rule = "quiet"
            else:
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
                if self._close(s, "complete", result, now, rule, prompt):
                    changed[s.series_instance_uid] = "complete"
            elif result.final or quiet_s >= node.series_gap_timeout_s:
                if self._close(s, "failed", result, now, rule, prompt):
                    changed[s.series_instance_uid] = "failed"
            elif rule != "prompt" or quiet_s >= node.series_quiet_period_s:  # a listing is re-checked each pass
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

    def _close(self, s: Series, state: str, result: Contiguity, now: datetime, rule: str, prompt: str = "") -> bool:
        """receiving -> state, only if nothing arrived since we looked (compare-and-set on the count: an
        instance being recorded holds the series row, db/instances.py, so this waits for it and then fails)."""
        with transaction(self.factory) as session:
            done = session.execute(update(Series).where(
                Series.id == s.id, Series.state == "receiving", Series.instance_count == s.instance_count,
            ).values(state=state, completed_at=now, reason=result.reason,
                     completed_by=rule if state == "complete" else "")).rowcount
            if not done:
                return False
            if state == "complete" and self.on_complete is not None:
                self.on_complete(session, s)
            event = "series.complete" if state == "complete" else "series.incomplete"
            record(session, event, component="dicom_node", study_instance_uid=s.study_instance_uid,
                   series_instance_uid=s.series_instance_uid, calling_ae=s.calling_ae,
                   patient_id_hash=s.patient_id_hash, modality=s.modality,
                   instance_count=s.instance_count, slices=result.slices, spacing_mm=result.spacing_mm,
                   missing_positions_mm=result.missing_mm, reason=result.reason,
                   **({"completed_by": rule, "rule": RULES[rule], **({"prompt": prompt} if prompt else {})}
                      if state == "complete" else {}))
        self._cache = {k: v for k, v in self._cache.items() if k[0] != s.series_instance_uid}
        log = LOG.info if state == "complete" else LOG.warning
        log("series %s %s (%d instances, %s): %s", s.series_instance_uid, state, s.instance_count, rule, result.reason)
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
