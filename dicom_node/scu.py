"""Sending results back: a durable outbound queue in the `sends` table, delivered by C-STORE.

States: pending -> sending -> sent | dead-letter (and sending -> pending on a retryable failure).

* A row is claimed atomically (UPDATE ... WHERE state='pending', in a write-locked transaction)
  before any byte goes out: two senders can never send the same row.
* Statuses are read by their category (pynetdicom.status.code_to_category, PS3.7 C): Success
  (0x0000) -> `sent`. Warning (0x0107, 0x0116, 0xB000, 0xB006, 0xB007, any other 0xBxxx ...) means
  the peer STORED it (perhaps coerced or with elements discarded): the send is done, `sent`, with
  outcome "sent with warning 0x....", never retried (re-sending would duplicate it at the TPS).
  Failures, refusals, aborts, timeouts and no response -> retry with exponential backoff;
  dead-letter after node.send_max_attempts, or at once when retrying cannot help (the file is gone).
* Restart: a row left `sending` by a process that is gone has an unknown outcome (the peer may
  have stored it and we died before writing `sent`). We re-send it: the same file, the same SOP
  Instance UID, which a conforming receiver stores once (DCMTK storescp and Orthanc overwrite by
  SOP Instance UID). We never mark it `sent` without a 0x0000 in hand.
* One row per job and destination (unique index, migration 0004): queuing a job's result twice
  returns the row already there.
* Distributed mode (PostgreSQL): every move to `pending` also enqueues a `rtprop.send` task for the
  job engine in the same transaction (db/queue.py), scheduled at the row's next attempt; the task
  (`deliver_one`) claims that one row and sends it. On SQLite the `Sender` loop polls for due rows.
Every state change is audited: send.queued, send.attempt, send.sent, send.failed,
send.dead_letter, send.recovered.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import psutil
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.status import code_to_category
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from config.errors import UserError
from config.schema import Config, Destination
from db import queue
from db.audit import hash_patient_id, record, site_key
from db.engine import transaction
from db.schema import Send, utcnow
from dicom_node.tls import client_context

LOG = logging.getLogger("rtprop.node.scu")



class SendError(UserError):
    """A send could not be queued (file unreadable, no SOP Instance UID); the message names the file."""


@dataclass(frozen=True)
class Attempt:
    """What one C-STORE attempt came to: the peer's status (None: no answer) and why it failed.

    `permanent`: retrying cannot help (the file is gone or changed): dead-letter at once.
    """

    status: int | None
    error: str = ""
    permanent: bool = False

    @property
    def category(self) -> str:
        return code_to_category(self.status) if self.status is not None else "No response"

    @property
    def stored(self) -> bool:
        """The peer has it: success, or a warning (stored, perhaps coerced)."""
        return self.category in ("Success", "Warning")

    def describe(self) -> str:
        if self.status is None:
            return f"failed: {self.error}"
        text = f"0x{self.status:04X}" + (f" {self.error}" if self.error else "")
        return {"Success": "sent", "Warning": f"sent with warning {text}"}.get(self.category, f"failed {text}")


@dataclass
class Outcome:
    send_id: int
    state: str        # sent | pending (retry later) | dead-letter
    status: int | None
    error: str = ""


def worker_id() -> str:
    """host:pid:process-start-time: unique per process, so a dead owner can be told from a live one."""
    proc = psutil.Process()
    return f"{socket.gethostname()}:{os.getpid()}:{int(proc.create_time())}"


def process_name(kind: str) -> str:
    """The heartbeat name of this process' `kind` (node, worker, web): worker_id#kind."""
    return f"{worker_id()}#{kind}"


def owner_alive(claimed_by: str) -> bool:
    """Is the process named by `claimed_by` (see worker_id) still running on this host?"""
    try:
        host, pid, started = claimed_by.rsplit(":", 2)
        if host != socket.gethostname():
            return True  # another host: we cannot tell, so we do not steal its work
        proc = psutil.Process(int(pid))
        return int(proc.create_time()) == int(started) and proc.status() != psutil.STATUS_ZOMBIE
    except (ValueError, psutil.Error):
        return False


def enqueue(session: Session, path: Path | str, destination: Destination, job_id: int | None = None,
            patient_id_hash: str = "", again: bool = False) -> Send:
    """Queue `path` for C-STORE to `destination` inside the caller's transaction; returns the row.

    The file must stay where it is until the row is `sent` (results live under storage.outbox).
    `again`: a person re-sends it: the job's row for that destination, sent or dead-lettered, goes back
    to `pending` with its attempts counted from 0 (its earlier outcomes stay in the audit).
    """
    path = Path(path).resolve()
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID", "SOPClassUID",
                                                                    "StudyInstanceUID", "SeriesInstanceUID",
                                                                    "PatientID"])
        sop_uid, sop_class = str(ds.SOPInstanceUID), str(ds.SOPClassUID)
        patient_id_hash = patient_id_hash or hash_patient_id(str(ds.get("PatientID", "") or ""), site_key(session))
    except Exception as exc:
        raise SendError(f"cannot queue {path}: not a readable DICOM file with SOP UIDs ({exc})") from exc
    # a job's result: once per destination (unique index); a file without a job: not twice in the queue at once
    same = Send.job_id == job_id if job_id is not None else (
        (Send.sop_instance_uid == sop_uid) & Send.job_id.is_(None) & Send.state.in_(("pending", "sending")))
    existing = session.execute(select(Send).where(
        same, Send.destination_ae == destination.ae_title, Send.destination_host == destination.host,
        Send.destination_port == destination.port).limit(1)).scalar()
    if existing is not None and again and existing.state in ("sent", "dead-letter"):
        previous = existing.outcome or existing.state
        existing.state, existing.attempts, existing.claimed_by = "pending", 0, ""
        existing.next_attempt_at, existing.last_error, existing.sent_at = utcnow(), "", None
        existing.path = str(path)
        session.flush()
        record(session, "send.queued", component="dicom_node", job_id=job_id, sop_instance_uid=sop_uid,
               calling_ae=destination.ae_title, patient_id_hash=existing.patient_id_hash, send_id=existing.id,
               destination=f"{destination.ae_title}@{destination.host}:{destination.port}", path=str(path),
               again=True, previous_outcome=previous)
        _defer(session, existing)
        return existing
    if existing is not None:  # this result is queued for that destination already: once is enough
        LOG.info("%s already queued for %s (send %s)", f"job {job_id}: result" if job_id else sop_uid,
                 destination.ae_title, existing.id)
        return existing
    row = Send(path=str(path), sop_instance_uid=sop_uid, sop_class_uid=sop_class, job_id=job_id,
               destination_ae=destination.ae_title, destination_host=destination.host,
               destination_port=destination.port, state="pending", attempts=0, next_attempt_at=utcnow(),
               patient_id_hash=patient_id_hash)
    session.add(row)
    session.flush()
    record(session, "send.queued", component="dicom_node", job_id=job_id, sop_instance_uid=sop_uid,
           study_instance_uid=str(ds.get("StudyInstanceUID", "")), series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
           calling_ae=destination.ae_title, patient_id_hash=patient_id_hash, send_id=row.id, destination=f"{destination.ae_title}@{destination.host}:{destination.port}",
           path=str(path))
    _defer(session, row)
    return row


def _defer(session: Session, row: Send) -> None:
    """The engine's message for a row that is now pending (distributed mode; nothing on SQLite)."""
    queue.defer(session, queue.TASK_SEND, "sends", {"send_id": row.id}, scheduled_at=row.next_attempt_at)


def recover_stale(factory: sessionmaker[Session], me: str | None = None,
                  alive: Callable[[str], bool] | None = None) -> list[int]:
    """Rows left `sending` by a dead process -> `pending` now (re-send, see module doc). Returns their ids.

    `alive(claimed_by)`: is that process still there (default `owner_alive`: this host's processes only).
    """
    me = me or worker_id()
    alive = alive or owner_alive
    recovered: list[int] = []
    with factory() as session:  # a read first: most passes find nothing, and take no write lock
        owners = session.execute(select(Send.claimed_by).where(Send.state == "sending")).scalars().all()
    if all(owner == me or alive(owner) for owner in owners):
        return recovered
    with transaction(factory) as session:
        rows = session.execute(select(Send).where(Send.state == "sending")).scalars().all()
        for row in rows:
            if row.claimed_by == me or alive(row.claimed_by):
                continue
            row.state = "pending"
            row.next_attempt_at = utcnow()
            session.flush()
            _defer(session, row)
            previous, row.claimed_by = row.claimed_by, ""
            record(session, "send.recovered", component="dicom_node", job_id=row.job_id,
                   sop_instance_uid=row.sop_instance_uid, calling_ae=row.destination_ae, send_id=row.id,
                   previous_owner=previous, attempts=row.attempts,
                   decision="outcome unknown (sender died mid-send): re-send the same SOP Instance UID, "
                            "idempotent at a conforming receiver")
            recovered.append(row.id)
    if recovered:
        LOG.warning("recovered %d send(s) left 'sending' by a dead process: %s", len(recovered), recovered)
    return recovered


def _backoff_s(config: Config, attempts: int) -> float:
    node = config.node
    return min(node.send_backoff_max_s, node.send_backoff_s * (2 ** max(0, attempts - 1)))


def _claim_next(factory: sessionmaker[Session], me: str, dest: tuple[str, str, int], now: datetime,
                send_id: int | None = None) -> Send | None:
    """Atomically take the oldest due pending row for `dest` (or row `send_id` if due): pending -> sending,
    attempts+1, audited."""
    ae, host, port = dest
    with transaction(factory) as session:
        due = [Send.state == "pending", Send.next_attempt_at <= now]
        where = [*due, Send.id == send_id] if send_id is not None else [
            *due, Send.destination_ae == ae, Send.destination_host == host, Send.destination_port == port]
        row = session.execute(select(Send).where(*where).order_by(Send.id).limit(1)).scalar()
        if row is None:
            return None
        done = session.execute(update(Send).where(Send.id == row.id, Send.state == "pending").values(
            state="sending", claimed_by=me, attempts=Send.attempts + 1, next_attempt_at=utcnow())).rowcount
        if not done:
            return None
        session.refresh(row)
        record(session, "send.attempt", component="dicom_node", job_id=row.job_id, sop_instance_uid=row.sop_instance_uid,
               calling_ae=ae, send_id=row.id, attempt=row.attempts, destination=f"{ae}@{host}:{port}", worker=me)
        session.expunge(row)
        return row


def _finish(factory: sessionmaker[Session], config: Config, row: Send, me: str, attempt: Attempt) -> Outcome:
    """Record the result of one attempt: sent (the peer stored it), dead-letter, or pending with backoff."""
    now = utcnow()
    dest = f"{row.destination_ae}@{row.destination_host}:{row.destination_port}"
    status = attempt.status
    status_txt = f"0x{status:04X}" if status is not None else "none"
    with transaction(factory) as session:
        current = session.get(Send, row.id)
        if current is None or current.state != "sending" or current.claimed_by != me:
            LOG.error("send %s no longer claimed by us; leaving it", row.id)
            return Outcome(row.id, current.state if current else "missing", status, "lost claim")
        current.last_status = status
        current.outcome = attempt.describe()[:2000]
        common = dict(component="dicom_node", job_id=row.job_id, sop_instance_uid=row.sop_instance_uid,
                      calling_ae=row.destination_ae, patient_id_hash=row.patient_id_hash, send_id=row.id,
                      attempt=current.attempts, destination=dest, status=status_txt, category=attempt.category)
        if attempt.stored:
            current.state, current.sent_at, current.last_error, current.claimed_by = "sent", now, "", ""
            record(session, "send.sent", **common, outcome=current.outcome)
            log = LOG.info if attempt.category == "Success" else LOG.warning
            log("send %s: %s delivered to %s (%s)", row.id, row.sop_instance_uid, dest, current.outcome)
            return Outcome(row.id, "sent", status)
        error = attempt.error or current.outcome
        current.last_error = error[:2000]
        if attempt.permanent or current.attempts >= config.node.send_max_attempts:
            current.state = "dead-letter"
            record(session, "send.failed", **common, error=error)
            record(session, "send.dead_letter", **common, error=error,
                   reason="retrying cannot help" if attempt.permanent else f"{current.attempts} attempts")
            LOG.error("send %s dead-lettered after %d attempt(s): %s", row.id, current.attempts, error)
            return Outcome(row.id, "dead-letter", status, error)
        delay = _backoff_s(config, current.attempts)
        current.state, current.claimed_by = "pending", ""
        current.next_attempt_at = now + timedelta(seconds=delay)
        session.flush()
        _defer(session, current)
        record(session, "send.failed", **common, error=error, retry_in_s=delay)
        LOG.warning("send %s attempt %d to %s failed (%s, %s); retry in %.1f s", row.id, current.attempts, dest,
                    status_txt, error, delay)
        return Outcome(row.id, "pending", status, error)


def _due_destinations(factory: sessionmaker[Session], now: datetime) -> list[tuple[str, str, int]]:
    with factory() as session:
        rows = session.execute(select(Send.destination_ae, Send.destination_host, Send.destination_port).where(
            Send.state == "pending", Send.next_attempt_at <= now).distinct()).all()
    return [tuple(r) for r in rows]  # type: ignore[misc]


def _sop_classes(factory: sessionmaker[Session], dest: tuple[str, str, int]) -> list[str]:
    ae, host, port = dest
    with factory() as session:
        return sorted(set(session.execute(select(Send.sop_class_uid).where(
            Send.state == "pending", Send.destination_ae == ae, Send.destination_host == host,
            Send.destination_port == port)).scalars()))


def deliver_due(factory: sessionmaker[Session], config: Config, *, me: str | None = None,
                now: datetime | None = None, stop: threading.Event | None = None) -> list[Outcome]:
    """Send every due pending row, one association per destination. Returns what happened."""
    me = me or worker_id()
    now = now or utcnow()
    outcomes: list[Outcome] = []
    for dest in _due_destinations(factory, now):
        if stop is not None and stop.is_set():
            break
        outcomes.extend(_deliver_to(factory, config, me, dest, now, stop))
    return outcomes


def _deliver_to(factory: sessionmaker[Session], config: Config, me: str, dest: tuple[str, str, int],
                now: datetime, stop: threading.Event | None) -> list[Outcome]:
    ae_title, host, port = dest
    node = config.node
    ae = AE(ae_title=node.ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = node.send_timeout_s
    ae.connection_timeout = node.send_timeout_s
    for sop_class in _sop_classes(factory, dest):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    if not ae.requested_contexts:
        return []
    tls = client_context(node.tls)
    outcomes: list[Outcome] = []
    try:
        assoc = ae.associate(host, port, ae_title=ae_title,
                             tls_args=(tls, host) if tls is not None else None)
    except Exception as exc:  # e.g. TLS handshake errors surface as exceptions
        assoc, assoc_error = None, f"association failed: {type(exc).__name__}: {exc}"
    else:
        assoc_error = "" if assoc.is_established else (
            "association rejected" if assoc.is_rejected else "association aborted or peer unreachable")
    if assoc is None or not assoc.is_established:
        # the claim + failed attempt is recorded for every due row, so retries and backoff are visible
        while (row := _claim_next(factory, me, dest, now)) is not None:
            outcomes.append(_finish(factory, config, row, me, Attempt(None, assoc_error)))
        return outcomes
    try:
        while (stop is None or not stop.is_set()) and assoc.is_established:
            row = _claim_next(factory, me, dest, now)
            if row is None:
                break
            outcomes.append(_send_one(factory, config, me, assoc, row))
    finally:
        if assoc.is_established:
            assoc.release()
    return outcomes


def deliver_one(factory: sessionmaker[Session], config: Config, send_id: int, *, me: str | None = None) -> Outcome | None:
    """The engine's `rtprop.send` task: send row `send_id` if it is pending and due, in an association of
    its own. None: nothing to do (sent already, claimed by a live sender, or not due yet: its own
    message comes then)."""
    me = me or worker_id()
    with factory() as session:
        row = session.get(Send, send_id)
        if row is None:
            return None
        dest = (row.destination_ae, row.destination_host, row.destination_port)
    now = utcnow()
    row = _claim_next(factory, me, dest, now, send_id)
    if row is None:
        return None
    ae = AE(ae_title=config.node.ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = config.node.send_timeout_s
    ae.connection_timeout = config.node.send_timeout_s
    ae.add_requested_context(row.sop_class_uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    tls = client_context(config.node.tls)
    try:
        assoc = ae.associate(row.destination_host, row.destination_port, ae_title=row.destination_ae,
                             tls_args=(tls, row.destination_host) if tls is not None else None)
    except Exception as exc:  # noqa: BLE001 - e.g. TLS handshake errors
        return _finish(factory, config, row, me, Attempt(None, f"association failed: {type(exc).__name__}: {exc}"))
    if not assoc.is_established:
        why = "association rejected" if assoc.is_rejected else "association aborted or peer unreachable"
        return _finish(factory, config, row, me, Attempt(None, why))
    try:
        return _send_one(factory, config, me, assoc, row)
    finally:
        if assoc.is_established:
            assoc.release()


def _send_one(factory: sessionmaker[Session], config: Config, me: str, assoc, row: Send) -> Outcome:  # type: ignore[no-untyped-def]
    return _finish(factory, config, row, me, _store(assoc, row))


def _store(assoc, row: Send) -> Attempt:  # type: ignore[no-untyped-def]
    """One C-STORE of the row's file on an established association."""
    path = Path(row.path)
    try:
        ds = dcmread(path)
    except FileNotFoundError:
        return Attempt(None, f"file missing: {path}", permanent=True)
    except Exception as exc:
        return Attempt(None, f"file unreadable: {path}: {exc}", permanent=True)
    if str(ds.get("SOPInstanceUID", "")) != row.sop_instance_uid:
        return Attempt(None, f"{path} now holds SOP Instance UID {ds.get('SOPInstanceUID')}, queued as "
                             f"{row.sop_instance_uid}", permanent=True)
    try:
        rsp = assoc.send_c_store(ds)
    except ValueError as exc:  # no accepted presentation context for this SOP class / syntax
        return Attempt(None, f"no accepted presentation context: {exc}")
    except Exception as exc:
        return Attempt(None, f"C-STORE failed: {type(exc).__name__}: {exc}")
    if rsp is None or "Status" not in rsp:
        # no response (timeout/abort): the peer may or may not have it -> retry the same SOP UID
        return Attempt(None, "no C-STORE response (timeout, abort or invalid response)")
    comment = str(rsp.get("ErrorComment", "") or "").strip()
    return Attempt(int(rsp.Status), comment)


_SENDERS: "weakref.WeakSet[Sender]" = weakref.WeakSet()


def wake_senders() -> None:
    """A send was just committed in this process: its sender loops look now, not at their next poll."""
    for sender in list(_SENDERS):
        sender.wake.set()


class Sender:
    """The sender loop of serve_forever: recover stale claims once, then deliver due rows (at once when
    `wake_senders` is called, else every node.poll_interval_s)."""

    def __init__(self, factory: sessionmaker[Session], config: Config) -> None:
        self.factory = factory
        self.config = config
        self.me = worker_id()
        self.wake = threading.Event()
        _SENDERS.add(self)

    def run(self, stop: threading.Event) -> None:
        try:
            recover_stale(self.factory, self.me)
        except Exception:
            LOG.exception("recovery of stale sends failed")
        while not stop.is_set():
            try:
                deliver_due(self.factory, self.config, me=self.me, stop=stop)
            except Exception:
                LOG.exception("sender pass failed; retrying")
            self.wake.wait(self.config.node.poll_interval_s)
            self.wake.clear()
