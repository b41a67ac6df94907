"""Helpers for the distributed-mode tests and benches: rtprop processes sharing one PostgreSQL database and
one storage root, as docs/scaling.md lays them out (receivers `rtprop serve --workers 0`, `rtprop worker`s)."""
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from node_helpers import REPO, VENV_BIN, NodeProcess, wait_for, write_config

BASE = {"node": {"series_quiet_period_s": 0.5, "poll_interval_s": 0.2, "send_backoff_s": 0.5,
                 "send_backoff_max_s": 2.0, "send_timeout_s": 5.0, "max_associations": 32},
        "pipeline": {"poll_interval_s": 0.3, "heartbeat_interval_s": 1.0, "heartbeat_timeout_s": 6.0,
                     "job_max_attempts": 5},
        "propagation": {"backend": "classic"},
        "storage": {"fsync": False, "min_free_mb": 100},
        "web": {"heartbeat_interval_s": 1.0}}


def cluster_config(path: Path, url: str, *, tps_port: int | None = None, **extra: dict) -> Path:
    """The one configuration file every process of the cluster reads (database, routes, timings)."""
    sections = {k: dict(v) for k, v in BASE.items()}
    sections["database"] = {"url": url}
    if tps_port is not None:
        sections["node"].update(destinations={"tps": {"ae_title": "TPS", "host": "127.0.0.1", "port": tps_port}},
                                default_destination="tps")
    for section, values in extra.items():
        sections.setdefault(section, {}).update(values)
    return write_config(path, **sections)


class Receiver(NodeProcess):
    """`rtprop serve --workers 0` on the shared storage and database (receive and complete only)."""

    def __init__(self, root: Path, config_path: Path, storage: Path, port: int, *, workers: int = 0) -> None:
        super().__init__(root, port=port)
        self.config_path = config_path
        self.storage = storage
        self.args = ["--config", str(config_path), "--storage", str(storage), "--port", str(port),
                     "--ae-title", "RTPROP", "--workers", str(workers)]

    def start(self, timeout_s: float = 60) -> "Receiver":
        """Started when its own ready line is logged (with a shared port, another receiver may answer C-ECHO)."""
        super().start(timeout_s)
        wait_for(lambda: "rtprop node ready" in self.log(), timeout_s, 0.1, what="the receiver's ready line")
        return self


class WorkerProcess:
    """`rtprop worker` on the shared storage and database, in a subprocess."""

    def __init__(self, root: Path, config_path: Path, storage: Path, name: str, *extra: str) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.log_path = root / f"worker-{name}.log"
        self.cmd = [str(VENV_BIN / "rtprop"), "worker", "--config", str(config_path), "--storage", str(storage),
                    *extra]
        self.proc: subprocess.Popen | None = None

    def start(self) -> "WorkerProcess":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO),
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        wait_for(lambda: "rtprop worker ready" in self.log() or self.proc.poll() is not None, 60, 0.2,
                 what="the worker to start")
        if self.proc.poll() is not None:
            raise RuntimeError(f"worker exited ({self.proc.returncode}): {self.log()[-3000:]}")
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else -1

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout_s: float = 60) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
