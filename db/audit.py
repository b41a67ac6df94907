"""The audit log: append-only rows, each carrying the hash of the previous one (tamper-evident).

Rows carry UIDs, AE titles and a pseudonym of the Patient ID, never patient names. The pseudonym is
a keyed hash (HMAC-SHA256) with the site's secret key, a file outside the database
(`storage.pseudonym_key_file`, mode 0600, made on first start; `open_site_key`): without the key a
7-digit MRN cannot be found by trying every number, as it could from the unsalted SHA-256 that rows
written before revision 0007_web_sessions carry. Those rows keep it (rewriting them would break the chain);
`query` by Patient ID finds both kinds. Losing the key loses nothing recorded, but new rows of a
patient could no longer be matched with older ones: a database whose key file is missing or
different is refused at start, naming the file.

The chain's head (id and hash of the last row) is also kept OUTSIDE the table, in the head anchor
file beside the database (`<db>.audit-head`, rewritten in place and fsynced after every commit that
appended rows). Rows deleted from the end leave the chain itself consistent; `verify` catches that
by comparing with the anchor. An anchor is only as safe as the disk it is on: docs/conformance.md
says how to send the head to an external witness (syslog) with `rtprop audit head`.
"""
from __future__ import annotations

import csv
import fcntl
import hashlib
import hmac
import json
import logging
import os
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, TextIO

from sqlalchemy import event, insert, select
from sqlalchemy.orm import Session, sessionmaker

from config.errors import UserError
from db.schema import AuditEntry, SiteSetting, utcnow

LOG = logging.getLogger("rtprop.db.audit")
HEAD_BYTES = 256  # the anchor is one fixed-size record, overwritten in place (no new blocks on a full disk)
TAIL_KEY = "audit_tail"  # session.info: (id, hash) of the last row this transaction appended
LOCKED_KEY = "write_locked"  # session.info: True in a transaction holding the write lock (db/engine.py)

GENESIS = "0" * 64
CHAINED_FIELDS = ("at", "event", "component", "job_id", "study_instance_uid", "series_instance_uid",
                  "sop_instance_uid", "calling_ae", "patient_id_hash", "details", "prev_hash")


KEY_SETTING = "pseudonym_key_sha256"  # site_settings: the SHA-256 of the key (the key stays outside)


class SiteKeyError(UserError):
    """The site's pseudonym key file is missing or is not the one this database was used with."""


def pseudonym(key: bytes, text: str) -> str:
    """HMAC-SHA256 of `text` with the site's key, hex: the same text gives the same pseudonym on this site only."""
    return hmac.new(key, text.encode("utf-8"), hashlib.sha256).hexdigest()


def hash_patient_id(patient_id: str | None, key: bytes) -> str:
    """Stable pseudonym of a Patient ID (keyed with the site's key) for queries by patient; "" for no ID."""
    if not patient_id:
        return ""
    return pseudonym(key, patient_id.strip())


def legacy_patient_hash(patient_id: str) -> str:
    """The unsalted SHA-256 that rows written before revision 0007_web_sessions carry instead of the pseudonym."""
    return hashlib.sha256(patient_id.strip().encode("utf-8")).hexdigest()


def site_key(holder: Session | sessionmaker[Session]) -> bytes:
    """The pseudonym key of the database a session or session factory opens (set by `open_site_key`)."""
    info = holder.info if isinstance(holder, Session) else holder.kw["info"]
    return info["pseudonym_key"]


def open_site_key(session: Session, path: Path) -> bytes:
    """The site's key from `path` (inside the caller's write transaction), made (32 random bytes, mode 0600)
    when neither it nor a record of it exists; `SiteKeyError` when the database knows a key and the file is
    missing or holds another."""
    path = Path(path)
    known = session.get(SiteSetting, KEY_SETTING)
    if path.exists():
        key = path.read_bytes()
        if known is not None and hashlib.sha256(key).hexdigest() != known.value:
            raise SiteKeyError(f"pseudonym key {path} is not the key this database was used with: restore the "
                               "right file (storage.pseudonym_key_file) from the backup")
    elif known is not None:
        raise SiteKeyError(f"pseudonym key {path} is missing, and this database has used one: restore it from the "
                           "backup (storage.pseudonym_key_file); a new key would make every patient's earlier "
                           "rows unfindable by Patient ID")
    else:
        key = secrets.token_bytes(32)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key)
            fh.flush()
            os.fsync(fh.fileno())
    if known is None:
        session.add(SiteSetting(name=KEY_SETTING, value=hashlib.sha256(key).hexdigest()))
    if path.stat().st_mode & 0o077:
        LOG.warning("%s is readable by others: chmod 600 it", path)
    return key


def _row_hash(values: dict[str, Any]) -> str:
    canonical = json.dumps([values[f] for f in CHAINED_FIELDS], separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def new_row(prev_hash: str, event: str, *, component: str = "", job_id: int | None = None,
            study_instance_uid: str = "", series_instance_uid: str = "", sop_instance_uid: str = "",
            calling_ae: str = "", patient_id_hash: str = "", details: dict[str, Any] | None = None) -> dict[str, Any]:
    """The column values of the next audit row after `prev_hash`, its own `hash` included."""
    values: dict[str, Any] = {
        "at": utcnow().isoformat(timespec="microseconds"),
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
           calling_ae: str = "", patient_id_hash: str = "", **details: Any) -> int:
    """Append one audit row inside the caller's (write-locked) transaction; returns its id.

    One Core INSERT on the session's connection (the ORM unit of work cost ~3 ms per row on the
    receive path); `tests/test_audit.py` holds it against rows made through the ORM.
    """
    if not session.info.get(LOCKED_KEY):  # two unlocked appenders would both read the same last row: a forked chain
        raise RuntimeError(f"audit row {event!r} outside the write lock (a transaction opened with lock=False)")
    if session.new or session.dirty or session.deleted:
        session.flush()
    connection = session.connection()
    last = connection.execute(select(AuditEntry.hash).order_by(AuditEntry.id.desc()).limit(1)).scalar()
    values = new_row(last or GENESIS, event, component=component, job_id=job_id,
                     study_instance_uid=study_instance_uid, series_instance_uid=series_instance_uid,
                     sop_instance_uid=sop_instance_uid, calling_ae=calling_ae, patient_id_hash=patient_id_hash,
                     details=details)
    row_id = int(connection.execute(insert(AuditEntry.__table__).values(**values)).inserted_primary_key[0])
    session.info[TAIL_KEY] = (row_id, values["hash"])
    return row_id


# --------------------------------------------------------------------------- the head anchor
@dataclass(frozen=True)
class Head:
    row_id: int
    hash: str


def read_head(path: Path) -> Head | None:
    """The anchor's (row id, hash), or None when there is no anchor file yet."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(raw.rstrip(b"\0 \n"))
        return Head(int(data["row_id"]), str(data["hash"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"audit head anchor {path} is unreadable: {exc}") from exc


def write_head(path: Path, head: Head, *, fsync: bool = True) -> None:
    """Move the anchor forward to `head` (never back: concurrent writers commit in any order)."""
    path = Path(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        current = os.pread(fd, HEAD_BYTES, 0).rstrip(b"\0 \n")
        if current:
            try:
                if int(json.loads(current)["row_id"]) >= head.row_id:
                    return
            except (ValueError, KeyError, TypeError):
                pass  # a damaged anchor is replaced by the true head
        record = json.dumps({"row_id": head.row_id, "hash": head.hash}).encode()
        os.pwrite(fd, record.ljust(HEAD_BYTES, b" ")[:HEAD_BYTES], 0)
        if fsync:
            os.fdatasync(fd)
    finally:
        os.close(fd)


def attach_head(factory: sessionmaker[Session]) -> None:
    """Keep the anchor at `factory.kw["info"]["audit_head"]` up to date after every commit."""
    path = Path(factory.kw["info"]["audit_head"])

    @event.listens_for(factory, "after_commit")
    def _after_commit(session: Session) -> None:
        tail = session.info.pop(TAIL_KEY, None)
        if tail is not None:
            try:
                write_head(path, Head(*tail))
            except OSError as exc:
                LOG.error("audit head anchor %s not updated: %s", path, exc)

    @event.listens_for(factory, "after_rollback")
    def _after_rollback(session: Session) -> None:
        session.info.pop(TAIL_KEY, None)


def anchor_upgraded(session: Session, upgraded_from: str | None) -> None:
    """A database made before anchors existed (an older revision, rows, no anchor) is anchored at its
    last row once, with an `audit.anchored` row saying so."""
    path = Path(session.info["audit_head"])
    if upgraded_from is None or upgraded_from >= "0002" or path.exists():
        return
    if session.execute(select(AuditEntry.id).limit(1)).scalar() is not None:
        record(session, "audit.anchored", component="db", previous_revision=upgraded_from, anchor=str(path),
               reason="head anchor created for a database made before anchors existed")


def head_of(factory: sessionmaker[Session]) -> Head | None:
    """The anchor of the database `factory` opens."""
    return read_head(Path(factory.kw["info"]["audit_head"]))


@dataclass
class ChainProblem:
    row_id: int
    reason: str


def verify(session: Session, head: Head | None | str = "anchor") -> tuple[int, list[ChainProblem]]:
    """Walk the chain in id order and compare its end with the head anchor; return (rows, problems).

    Any edit, insert or delete shows, at the end too. `head`: the anchor to compare with (default:
    the session's anchor file; None: skip the comparison).
    """
    if head != "anchor":
        return _walk(session, head)  # type: ignore[arg-type]
    path = session.info.get("audit_head")
    anchor = read_head(Path(path)) if path else None
    count, problems = _walk(session, anchor)
    if path and anchor is None and count:
        problems.insert(0, ChainProblem(0, f"audit head anchor {path} is missing: the end of the chain cannot be "
                                           "checked (restore it, or compare with the external witness)"))
    return count, problems


def _walk(session: Session, head: Head | None) -> tuple[int, list[ChainProblem]]:
    problems: list[ChainProblem] = []
    prev = GENESIS
    count = 0
    last_id = 0
    seen_head = head is None
    for entry in session.execute(select(AuditEntry).order_by(AuditEntry.id)).scalars():
        count += 1
        values = {f: getattr(entry, f) for f in CHAINED_FIELDS}
        if entry.prev_hash != prev:
            problems.append(ChainProblem(entry.id, "prev_hash does not match the previous row (row removed or inserted)"))
        if _row_hash(values) != entry.hash:
            problems.append(ChainProblem(entry.id, "content does not match its hash (row altered)"))
        if head is not None and entry.id == head.row_id:
            seen_head = True
            if entry.hash != head.hash:
                problems.append(ChainProblem(entry.id, "row does not match the head anchor's hash (row replaced)"))
        prev, last_id = entry.hash, entry.id
    if head is not None and not seen_head:
        where = "rows were deleted from the end" if last_id < head.row_id else "the anchored row was removed"
        problems.append(ChainProblem(head.row_id, f"the head anchor names row {head.row_id}, which is not in the "
                                                  f"chain (last row {last_id}): {where}"))
    return count, problems


def _at(when: datetime) -> str:
    """`when` as the audit's own time text (UTC ISO 8601), so rows compare as text in time order."""
    aware = when if when.tzinfo else when.replace(tzinfo=timezone.utc)
    return aware.astimezone(timezone.utc).isoformat(timespec="microseconds")


def query(session: Session, *, since: datetime | None = None, until: datetime | None = None, event: str | None = None,
          job_id: int | None = None, study_instance_uid: str | None = None, calling_ae: str | None = None,
          patient_id: str | None = None) -> list[AuditEntry]:
    """Rows matching every given filter, oldest first (`since` inclusive, `until` exclusive; naive = UTC)."""
    stmt = select(AuditEntry).order_by(AuditEntry.id)
    if since is not None:
        stmt = stmt.where(AuditEntry.at >= _at(since))
    if until is not None:
        stmt = stmt.where(AuditEntry.at < _at(until))
    if event:
        stmt = stmt.where(AuditEntry.event == event)
    if job_id is not None:
        stmt = stmt.where(AuditEntry.job_id == job_id)
    if study_instance_uid:
        stmt = stmt.where(AuditEntry.study_instance_uid == study_instance_uid)
    if calling_ae:
        stmt = stmt.where(AuditEntry.calling_ae == calling_ae)
    if patient_id:  # the pseudonym, or the unsalted hash of rows older than revision 0007_web_sessions
        stmt = stmt.where(AuditEntry.patient_id_hash.in_(
            (hash_patient_id(patient_id, site_key(session)), legacy_patient_hash(patient_id))))
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
