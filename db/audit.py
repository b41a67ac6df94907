"""The audit log: append-only rows, each carrying the hash of the previous one (tamper-evident).

Rows carry UIDs, AE titles and an unsalted SHA-256 of the Patient ID, never patient names.
"""
from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable, TextIO

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.schema import AuditEntry

GENESIS = "0" * 64
CHAINED_FIELDS = ("at", "event", "component", "job_id", "study_instance_uid", "series_instance_uid",
                  "sop_instance_uid", "calling_ae", "patient_id_hash", "details", "prev_hash")


def hash_patient_id(patient_id: str | None) -> str:
    """Stable pseudonym for queries by patient without storing the ID itself."""
    if not patient_id:
        return ""
    return hashlib.sha256(patient_id.strip().encode("utf-8")).hexdigest()


def _row_hash(values: dict[str, Any]) -> str:
    canonical = json.dumps([values[f] for f in CHAINED_FIELDS], separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def new_row(prev_hash: str, event: str, *, component: str = "", job_id: int | None = None,
            study_instance_uid: str = "", series_instance_uid: str = "", sop_instance_uid: str = "",
            calling_ae: str = "", patient_id_hash: str = "", details: dict[str, Any] | None = None) -> dict[str, Any]:
    """The column values of the next audit row after `prev_hash`, its own `hash` included."""
    values: dict[str, Any] = {
        "at": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
        "event": event,
        "component": component,
        "job_id": job_id,
        "study_instance_uid": study_instance_uid or "",
        "series_instance_uid": series_instance_uid or "",
        "sop_instance_uid": sop_instance_uid or "",
        "calling_ae": calling_ae or "",
        "patient_id_hash": patient_id_hash or "",
        "details": json.dumps(details or {}, sort_keys=True, separators=(",", ":"), default=str),
        "prev_hash": prev_hash or GENESIS,
    }
    values["hash"] = _row_hash(values)
    return values


def record(session: Session, event: str, *, component: str = "", job_id: int | None = None,
           study_instance_uid: str = "", series_instance_uid: str = "", sop_instance_uid: str = "",
           calling_ae: str = "", patient_id_hash: str = "", **details: Any) -> AuditEntry:
    """Append one audit row inside the caller's (write-locked) transaction."""
    last = session.execute(select(AuditEntry.hash).order_by(AuditEntry.id.desc()).limit(1)).scalar()
    entry = AuditEntry(**new_row(last or GENESIS, event, component=component, job_id=job_id,
                                 study_instance_uid=study_instance_uid, series_instance_uid=series_instance_uid,
                                 sop_instance_uid=sop_instance_uid, calling_ae=calling_ae,
                                 patient_id_hash=patient_id_hash, details=details))
    session.add(entry)
    session.flush()
    return entry


@dataclass
class ChainProblem:
    row_id: int
    reason: str


def verify(session: Session) -> tuple[int, list[ChainProblem]]:
    """Walk the chain in id order; return (rows checked, problems). Any edit, insert or delete shows."""
    problems: list[ChainProblem] = []
    prev = GENESIS
    count = 0
    for entry in session.execute(select(AuditEntry).order_by(AuditEntry.id)).scalars():
        count += 1
        values = {f: getattr(entry, f) for f in CHAINED_FIELDS}
        if entry.prev_hash != prev:
            problems.append(ChainProblem(entry.id, "prev_hash does not match the previous row (row removed or inserted)"))
        if _row_hash(values) != entry.hash:
            problems.append(ChainProblem(entry.id, "content does not match its hash (row altered)"))
        prev = entry.hash
    return count, problems


def query(session: Session, *, since: str | None = None, until: str | None = None, event: str | None = None,
          job_id: int | None = None, study_instance_uid: str | None = None, calling_ae: str | None = None,
          patient_id: str | None = None) -> list[AuditEntry]:
    """Rows matching every given filter, oldest first. `since`/`until` are ISO dates or datetimes (UTC)."""
    stmt = select(AuditEntry).order_by(AuditEntry.id)
    if since:
        stmt = stmt.where(AuditEntry.at >= since)
    if until:
        stmt = stmt.where(AuditEntry.at < until)
    if event:
        stmt = stmt.where(AuditEntry.event == event)
    if job_id is not None:
        stmt = stmt.where(AuditEntry.job_id == job_id)
    if study_instance_uid:
        stmt = stmt.where(AuditEntry.study_instance_uid == study_instance_uid)
    if calling_ae:
        stmt = stmt.where(AuditEntry.calling_ae == calling_ae)
    if patient_id:
        stmt = stmt.where(AuditEntry.patient_id_hash == hash_patient_id(patient_id))
    return list(session.execute(stmt).scalars())


def write_csv(entries: Iterable[AuditEntry], out: TextIO) -> int:
    """Export rows as CSV (all chained fields plus id and hash); returns the number written."""
    fields = ("id",) + CHAINED_FIELDS + ("hash",)
    writer = csv.writer(out)
    writer.writerow(fields)
    n = 0
    for entry in entries:
        writer.writerow([getattr(entry, f) if getattr(entry, f) is not None else "" for f in fields])
        n += 1
    return n
