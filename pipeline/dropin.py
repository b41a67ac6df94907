"""Folder drop-in: DICOM files, or one folder per case, dropped in the inbox are taken in like
instances received over the network, once they are stable.

- An inbox entry (a file, or a folder with everything below it) is stable when its file count,
  total size and newest modification time have not changed for `dropin.stable_s`. watchdog
  events only wake the scanner early; the decision is always made from what is on disk, so a
  restart (or a missed event) loses nothing.
- Every file of a stable entry is first checked as DICOM (`dicom_node.storage.parse_identifiers`,
  the node's own check). Any unusable file -> the whole entry is MOVED to `dropin.quarantine`
  with `<entry>.reason.json` naming each file and why; nothing of it enters the archive.
- Otherwise every file goes through the node's `Store.ingest` (the same archive write + DB rows +
  audit as a C-STORE, source "dropin", calling AE `dropin.calling_ae`) and the entry is MOVED to
  `dropin.done`. A stable case holds all its files, so its series are completed at once (no quiet
  period). Each prompt RTSTRUCT gets its job right away, with the case name on the job
  (`dropin_case`), which names the output `<case>__RS_<uid>.dcm` in `dropin.outbox` (written by
  the worker); `dropin.rtstruct` is audited.
- Inputs are never deleted, whatever happens (peers such as STARDUST delete them even on error).
"""
from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.uid import RTStructureSetStorage
from sqlalchemy.orm import Session, sessionmaker

from config.schema import Config
from db.audit import record
from db.engine import transaction
from db.receipts import new_id
from db.schema import utcnow

LOG = logging.getLogger("rtprop.pipeline.dropin")
IGNORED_NAMES = {".DS_Store", "Thumbs.db", "desktop.ini"}


@dataclass
class DropinPaths:
    inbox: Path
    done: Path
    quarantine: Path
    outbox: Path

    @classmethod
    def from_config(cls, config: Config) -> "DropinPaths":
        d = config.dropin  # absolute under storage.root (config.load.resolve_storage)
        paths = cls(d.inbox, d.done, d.quarantine, d.outbox)
        for p in (paths.inbox, paths.done, paths.quarantine, paths.outbox):
            p.mkdir(parents=True, exist_ok=True)
        return paths


@dataclass
class CaseOutcome:
    name: str
    ok: bool
    moved_to: Path
    files: int = 0
    problems: list[str] = field(default_factory=list)
    rtstructs: list[str] = field(default_factory=list)


def _files(entry: Path) -> list[Path]:
    if entry.is_file():
        return [entry]
    return sorted(p for p in entry.rglob("*") if p.is_file() and not p.name.startswith(".")
                  and p.name not in IGNORED_NAMES)


def signature(entry: Path) -> tuple[int, int, float]:
    """(file count, total bytes, newest mtime) of an inbox entry: unchanged for stable_s = stable."""
    count, size, newest = 0, 0, 0.0
    paths = [entry] if entry.is_file() else [p for p in entry.rglob("*") if p.is_file()]
    for p in paths:
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        count, size, newest = count + 1, size + st.st_size, max(newest, st.st_mtime)
    return count, size, newest


def _stamp() -> str:
    return utcnow().strftime("%Y%m%dT%H%M%S%fZ")


def _move(entry: Path, folder: Path) -> Path:
    """Move an entry into `folder` under a unique, time-stamped name (never overwrite, never delete)."""
    target = folder / f"{_stamp()}-{entry.name}"
    shutil.move(str(entry), str(target))
    return target


class DropIn:
    """The inbox watcher: scan, wait for stability, take in, move. `scan()` is one pass."""

    def __init__(self, factory: sessionmaker[Session], config: Config) -> None:
        from dicom_node.completion import CompletionChecker
        from dicom_node.storage import Store
        from pipeline.discovery import jobs_on_completion

        self.factory = factory
        self.config = config
        self.paths = DropinPaths.from_config(config)
        self.store = Store(config.storage, factory, fsync=config.storage.fsync)
        self.store.recover_receipts()  # a case cut by a crash of an earlier watcher
        self.completion = CompletionChecker(factory, config, jobs_on_completion(config))
        self.seen: dict[str, tuple[tuple[int, int, float], float]] = {}  # name -> (signature, since)
        self.wake = threading.Event()

    def scan(self, now: float | None = None) -> list[CaseOutcome]:
        """Take in every inbox entry that has been stable for dropin.stable_s; returns what was done."""
        now = time.monotonic() if now is None else now
        outcomes = []
        present = set()
        for entry in sorted(self.paths.inbox.iterdir()):
            if entry.name.startswith(".") or entry.name in IGNORED_NAMES:
                continue
            present.add(entry.name)
            sig = signature(entry)
            previous = self.seen.get(entry.name)
            if previous is None or previous[0] != sig:
                self.seen[entry.name] = (sig, now)
                if self.config.dropin.stable_s > 0 or sig[0] == 0:
                    continue
            elif now - previous[1] < self.config.dropin.stable_s or sig[0] == 0:
                continue
            outcomes.append(self.take(entry))
            self.seen.pop(entry.name, None)
        for gone in set(self.seen) - present:
            self.seen.pop(gone, None)
        return outcomes

    def take(self, entry: Path) -> CaseOutcome:
        """Check, ingest and move one stable entry. Never deletes it; never raises for bad input."""
        from db.audit import site_key
        from dicom_node.storage import IngestError, Received, parse_identifiers

        name = entry.name
        files = _files(entry)
        received = Received(calling_ae=self.config.dropin.calling_ae, peer_address=f"dropin:{name}"[:64],
                            source="dropin", receipt=new_id())
        problems: list[str] = []
        payloads: list[tuple[Path, bytes, Any]] = []
        for path in files:
            try:
                raw = path.read_bytes()
                parsed = parse_identifiers(raw, received, site_key(self.factory))
                payloads.append((path, raw, parsed))
            except IngestError as exc:
                problems.append(f"{path.relative_to(entry.parent)}: 0x{exc.status:04X} {exc.reason}")
            except OSError as exc:
                problems.append(f"{path.relative_to(entry.parent)}: unreadable ({exc})")
        if not files:
            problems.append("no files")
        if problems:
            return self._quarantine(entry, problems, len(files))
        rtstructs, series = [], set()
        try:
            for path, raw, parsed in payloads:
                result = self.store.ingest(raw, received)
                if result.status != 0x0000:
                    problems.append(f"{path.relative_to(entry.parent)}: 0x{result.status:04X} {result.reason}")
                    continue
                series.add(parsed.series_instance_uid)
                if parsed.sop_class_uid == RTStructureSetStorage:
                    rtstructs.append(parsed.sop_instance_uid)
                    self._job_for(parsed, name)
        finally:
            self.store.close_receipt(received.receipt, "done")  # the case's instances, audited once
        if problems:
            return self._quarantine(entry, problems, len(files))
        self.completion.notify_release(series, rule="dropin")
        self.completion.check()
        moved = _move(entry, self.paths.done)
        with transaction(self.factory) as session:
            record(session, "dropin.done", component="dropin", calling_ae=received.calling_ae, case=name,
                   files=len(files), rtstructs=rtstructs, moved_to=str(moved))
        LOG.info("drop-in %s: %d file(s) taken in, moved to %s", name, len(files), moved)
        return CaseOutcome(name, True, moved, len(files), [], rtstructs)

    def _job_for(self, parsed: Any, case: str) -> None:
        """The prompt RTSTRUCT's job, created now with the case it came in (names the output)."""
        from dicom_node.routing import route_for_job
        from pipeline.jobs import create_job

        ae = self.config.dropin.calling_ae
        with transaction(self.factory) as session:
            record(session, "dropin.rtstruct", component="dropin", sop_instance_uid=parsed.sop_instance_uid,
                   study_instance_uid=parsed.study_instance_uid, series_instance_uid=parsed.series_instance_uid,
                   calling_ae=ae, patient_id_hash=parsed.patient_id_hash, case=case)
            create_job(session, rtstruct_uid=parsed.sop_instance_uid, study_uid=parsed.study_instance_uid,
                       calling_ae=ae, route=route_for_job(self.config, ae, dropin=True),
                       patient_id_hash=parsed.patient_id_hash,
                       dropin_case=case)

    def take_all(self, timeout_s: float = 600.0) -> list[CaseOutcome]:
        """Take in every inbox entry, waiting until each has been stable for dropin.stable_s (`--once`)."""
        deadline = time.monotonic() + timeout_s
        outcomes = self.scan()
        while self.pending() and time.monotonic() < deadline:
            time.sleep(min(0.5, max(0.05, self.config.dropin.stable_s / 4)))
            outcomes += self.scan()
        if self.pending():
            LOG.warning("drop-in: %s still changing after %.0f s: left in the inbox", sorted(self.pending()),
                        timeout_s)
        return outcomes

    def pending(self) -> set[str]:
        """Inbox entries not taken in yet."""
        return {e.name for e in self.paths.inbox.iterdir()
                if not e.name.startswith(".") and e.name not in IGNORED_NAMES and signature(e)[0] > 0}

    def _quarantine(self, entry: Path, problems: list[str], count: int) -> CaseOutcome:
        moved = _move(entry, self.paths.quarantine)
        reason = {"case": entry.name, "moved_from": str(entry), "moved_to": str(moved), "files": count,
                  "problems": problems, "at": _stamp(),
                  "note": "nothing of this case entered the archive unless listed as ingested; inputs are never deleted"}
        (moved.parent / f"{moved.name}.reason.json").write_text(json.dumps(reason, indent=1))
        with transaction(self.factory) as session:
            record(session, "dropin.quarantined", component="dropin", calling_ae=self.config.dropin.calling_ae,
                   case=entry.name, problems=problems[:20], moved_to=str(moved))
        LOG.warning("drop-in %s quarantined: %s", entry.name, "; ".join(problems[:3]))
        return CaseOutcome(entry.name, False, moved, count, problems)

    def run(self, stop: threading.Event) -> None:
        """Watch the inbox (watchdog wakes the scan; a poll every dropin.poll_interval_s is the fallback)."""
        observer = None
        try:
            from watchdog.events import FileSystemEventHandler
            from watchdog.observers import Observer

            wake = self.wake

            class _Wake(FileSystemEventHandler):
                def on_any_event(self, event) -> None:  # type: ignore[no-untyped-def]
                    wake.set()

            observer = Observer()
            observer.schedule(_Wake(), str(self.paths.inbox), recursive=True)
            observer.start()
        except Exception as exc:  # noqa: BLE001 - inotify limits etc.: polling still works
            LOG.warning("watchdog unavailable (%s): polling the inbox every %.1f s", exc,
                        self.config.dropin.poll_interval_s)
            observer = None
        LOG.info("drop-in watching %s", self.paths.inbox)
        try:
            while not stop.is_set():
                try:
                    self.scan()
                except Exception:
                    LOG.exception("drop-in scan failed; retrying")
                interval = self.config.dropin.poll_interval_s
                if self.seen:  # something is settling: look again when it may be stable
                    interval = min(interval, max(0.2, self.config.dropin.stable_s / 2))
                self.wake.wait(interval)
                self.wake.clear()
        finally:
            if observer is not None:
                observer.stop()
                observer.join(5)


def start_dropin(factory: sessionmaker[Session], config: Config, stop: threading.Event) -> threading.Thread:
    watcher = DropIn(factory, config)
    t = threading.Thread(target=watcher.run, args=(stop,), name="rtprop-dropin", daemon=True)
    t.start()
    return t

