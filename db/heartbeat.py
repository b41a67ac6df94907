"""Process heartbeats (table `heartbeats`): each node, worker and web process refreshes its row.

`/health` and the dashboard read them: "a worker heartbeat younger than N s", workers alive.
A beat is one small write-locked UPDATE (or INSERT the first time). A process that stops cleanly
marks its row stopped (`details.stopped_at`): from then on it is not counted, nor shown, as running.
"""
from __future__ import annotations

import logging
import threading
from datetime import datetime
from typing import Any, Callable

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.engine import log_fault, transaction
from db.schema import Heartbeat, aware, utcnow

LOG = logging.getLogger("rtprop.db.heartbeat")
STOPPED = "stopped_at"  # in a row's details: the process stopped cleanly at this time


def beat(factory: sessionmaker[Session], process: str, kind: str, details: dict[str, Any] | None = None) -> None:
    """Insert or refresh the heartbeat row of `process`."""
    with transaction(factory) as session:
        row = session.execute(select(Heartbeat).where(Heartbeat.process == process)).scalar()
        if row is None:
            session.add(Heartbeat(process=process, kind=kind, details=details or {}, started_at=utcnow(),
                                  beat_at=utcnow()))
        else:
            row.beat_at, row.kind = utcnow(), kind
            if details is not None:
                row.details = details


def mark_stopped(factory: sessionmaker[Session], process: str) -> None:
    """`process` stopped cleanly: its row says so at once (not only when its heartbeat has aged)."""
    with transaction(factory) as session:
        row = session.execute(select(Heartbeat).where(Heartbeat.process == process)).scalar()
        if row is not None:
            row.details = {**(row.details or {}), STOPPED: utcnow().isoformat(timespec="seconds")}


def start_heartbeat(factory: sessionmaker[Session], process: str, kind: str, stop: threading.Event, *,
                    interval_s: float, details: dict[str, Any] | Callable[[], dict[str, Any]] | None = None,
                    alive: Callable[[], bool] | None = None) -> threading.Thread:
    """A daemon thread beating every `interval_s` while `alive()` (e.g. the worker threads) holds; `details`
    may be a function, called at each beat (the node's counts of refused connections). When `stop` is set it
    marks the row stopped and ends (join it so the mark is written before the process exits)."""
    def run() -> None:
        while not stop.is_set():
            if alive is None or alive():
                try:
                    beat(factory, process, kind, details() if callable(details) else details)
                except Exception as exc:  # noqa: BLE001 - a busy database must not kill the process
                    log_fault(LOG, f"heartbeat of {process}", exc)
            stop.wait(interval_s)
        try:
            mark_stopped(factory, process)
        except Exception as exc:  # noqa: BLE001 - the row then ages out as a killed process's does
            log_fault(LOG, f"stop mark of {process}", exc)

    thread = threading.Thread(target=run, name=f"rtprop-heartbeat-{kind}", daemon=True)
    thread.start()
    return thread


def latest(session: Session, kind: str) -> list[tuple[Heartbeat, float]]:
    """Rows of `kind` of processes not stopped cleanly, with their age in seconds, youngest first."""
    now = utcnow()
    rows = session.execute(select(Heartbeat).where(Heartbeat.kind == kind).order_by(Heartbeat.beat_at.desc())
                           ).scalars().all()
    return [(row, (now - aware(row.beat_at)).total_seconds()) for row in rows if STOPPED not in (row.details or {})]


def age_s(when: datetime | None) -> float | None:
    return None if when is None else (utcnow() - aware(when)).total_seconds()
