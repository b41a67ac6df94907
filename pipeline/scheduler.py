"""Runs the nightly batch inside `rtprop serve` when `batch.enabled`: once per local day, inside the window
batch.window_start..batch.window_end (local time, "HH:MM"; a window may cross midnight, e.g. 22:00-04:00).

Whether tonight's run happened is read from the audit log (a `batch.scheduled` row with this
window's date, written before the run starts), so a restart inside the window does not run it twice and a
node that was down for the whole window simply runs the next night. A run that outlasts the
window is not cut short. Without `rtprop serve`, use cron instead (docs/pipeline.md):
    30 1 * * *  rtprop batch --storage /srv/rtprop --since "$(date -d yesterday +\\%F)"
"""
from __future__ import annotations

import json
import logging
import threading
from datetime import date, datetime, time as dtime, timedelta

from sqlalchemy.orm import Session, sessionmaker

from config.schema import BatchConfig, Config
from db.audit import query

LOG = logging.getLogger("rtprop.pipeline.scheduler")


def _hhmm(text: str) -> dtime:
    hours, minutes = text.strip().split(":")
    return dtime(int(hours), int(minutes))


def window_date(now: datetime, batch: BatchConfig) -> date | None:
    """The night (date the window opened) if local time `now` is inside the window, else None."""
    start, end = _hhmm(batch.window_start), _hhmm(batch.window_end)
    t = now.time()
    if start <= end:
        return now.date() if start <= t < end else None
    if t >= start:  # window crosses midnight
        return now.date()
    if t < end:
        return now.date() - timedelta(days=1)
    return None


def already_ran(factory: sessionmaker[Session], night: date) -> bool:
    with factory() as session:
        for row in query(session, event="batch.scheduled",
                         since=datetime.combine(night, dtime(0, 0)) - timedelta(days=1)):
            details = json.loads(row.details)
            if details.get("window_date") == night.isoformat():
                return True
    return False


def due(factory: sessionmaker[Session], config: Config, now: datetime | None = None) -> date | None:
    """The night to run now, or None (not enabled, outside the window, or done)."""
    if not config.batch.enabled:
        return None
    night = window_date(now or datetime.now(), config.batch)
    if night is None or already_ran(factory, night):
        return None
    return night


class Scheduler:
    def __init__(self, factory: sessionmaker[Session], config: Config, check_every_s: float = 60.0) -> None:
        self.factory = factory
        self.config = config
        self.check_every_s = check_every_s

    def run_if_due(self, now: datetime | None = None) -> dict | None:
        from db.audit import record
        from db.engine import transaction
        from pipeline.batch import run_batch

        night = due(self.factory, self.config, now)
        if night is None:
            return None
        now = now or datetime.now()
        since = (now - timedelta(days=self.config.batch.lookback_days)).astimezone()
        LOG.info("nightly batch for %s starting (since %s)", night, since)
        with transaction(self.factory) as session:  # marks the night taken before the long run
            record(session, "batch.scheduled", component="scheduler", window_date=night.isoformat())
        return run_batch(self.factory, self.config, since=since, progress=False, trigger="schedule")

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.run_if_due()
            except Exception:
                LOG.exception("scheduled batch failed")
            stop.wait(self.check_every_s)


def start_scheduler(factory: sessionmaker[Session], config: Config, stop: threading.Event) -> threading.Thread:
    t = threading.Thread(target=Scheduler(factory, config).run, args=(stop,), name="rtprop-scheduler", daemon=True)
    t.start()
    return t
