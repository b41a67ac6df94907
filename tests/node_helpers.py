"""Helpers for tests and benches that drive the node with real DICOM peers over loopback.

Reusable by the end-to-end pipeline test: start the node the way a clinic does (`rtprop serve`),
a DCMTK storescp playing the TPS,
DCMTK storescu/echoscu as the sending TPS, and synthetic CT series.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import yaml
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], Any], timeout_s: float, interval_s: float = 0.1, what: str = "condition") -> Any:
    """Poll `predicate` until truthy (returned) or raise TimeoutError after `timeout_s` (bounded loop)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


# ----------------------------------------------------------------------------- synthetic data
def make_ct_slice(study_uid: str, series_uid: str, index: int, *, rows: int = 16, cols: int = 16,
                  spacing_mm: float = 2.5, frame_uid: str | None = None, sop_uid: str | None = None,
                  patient_id: str = "SYN001") -> Dataset:
    """One synthetic axial CT slice (CT Image Storage, int16 pixels) with all identifying attributes."""
    ds = Dataset()
    sop_uid = sop_uid or generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_uid or generate_uid(entropy_srcs=[series_uid, "frame"])
    ds.PatientName = "Synthetic^Phantom"
    ds.PatientID = patient_id
    ds.Modality = "CT"
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", ""
    ds.ReferringPhysicianName, ds.PatientBirthDate, ds.PatientSex = "", "", "O"
    ds.SeriesNumber, ds.InstanceNumber = 1, index + 1
    ds.ImagePositionPatient = [0.0, 0.0, round(index * spacing_mm, 3)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [1.0, 1.0]
    ds.SliceThickness = spacing_mm
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    rng = np.random.default_rng(index)
    ds.PixelData = rng.integers(0, 2000, size=(rows, cols), dtype=np.int16).tobytes()
    return ds


def make_ct_series(outdir: Path, count: int, *, rows: int = 16, cols: int = 16, spacing_mm: float = 2.5,
                   skip: tuple[int, ...] = (), study_uid: str | None = None, series_uid: str | None = None,
                   prefix: str = "ct") -> list[Path]:
    """Write `count` slices (minus the indices in `skip`) of one series; returns the file paths."""
    outdir.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    paths = []
    for i in range(count):
        if i in skip:
            continue
        ds = make_ct_slice(study_uid, series_uid, i, rows=rows, cols=cols, spacing_mm=spacing_mm)
        path = outdir / f"{prefix}{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------- DCMTK peers
def echoscu(port: int, *, calling_ae: str = "SCU", called_ae: str = "RTPROP", timeout_s: float = 10) -> bool:
    r = subprocess.run(["echoscu", "-to", "5", "-aet", calling_ae, "-aec", called_ae, "127.0.0.1", str(port)],
                       capture_output=True, text=True, timeout=timeout_s, env=ENV)
    return r.returncode == 0


def storescu(port: int, files: list[Path] | list[str], *, calling_ae: str = "TPS", called_ae: str = "RTPROP",
             extra: list[str] = (), timeout_s: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Send `files` with DCMTK storescu (TCP_NODELAY=1) in one association."""
    cmd = ["storescu", "-aet", calling_ae, "-aec", called_ae, *extra, "127.0.0.1", str(port), *map(str, files)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=ENV)
    if check and r.returncode != 0:
        raise AssertionError(f"storescu failed ({r.returncode}): {r.stderr[-2000:]}")
    return r


class StoreSCP:
    """DCMTK storescp playing the TPS: files land in `outdir`, one per SOP Instance UID (overwrite)."""

    def __init__(self, workdir: Path, *, port: int | None = None, ae_title: str = "TPS",
                 extra: list[str] = ()) -> None:
        self.port = port or free_port()
        self.ae_title = ae_title
        self.outdir = workdir / "storescp-out"
        self.outdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / f"storescp-{self.port}.log"
        self.extra = list(extra)
        self.proc: subprocess.Popen | None = None

    def start(self) -> "StoreSCP":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(["storescp", "-v", "-aet", self.ae_title, "-od", str(self.outdir),
                                      *self.extra, str(self.port)], stdout=log, stderr=subprocess.STDOUT, env=ENV)
        wait_for(lambda: port_open(self.port) or self.proc.poll() is not None, 10, what="storescp to listen")
        if self.proc.poll() is not None:
            raise RuntimeError(f"storescp exited: {self.log_path.read_text()[-2000:]}")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def files(self) -> list[Path]:
        return sorted(p for p in self.outdir.iterdir() if p.is_file())

    def stores_received(self) -> int:
        """C-STORE requests storescp logged (counts re-sends that overwrote the same file)."""
        return self.log_path.read_text(errors="replace").count("Received Store Request") if self.log_path.exists() else 0

    def __enter__(self) -> "StoreSCP":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ----------------------------------------------------------------------------- a hostile machine
ATTACKER = "127.0.0.2"  # another machine on loopback (Linux routes all of 127/8 to lo)
FIRST_BYTES = bytes([0x01, 0x00, 0x00, 0x00, 0x01, 0x00])  # an A-ASSOCIATE-RQ header promising 256 bytes


class HalfOpen:
    """`count` connections from ATTACKER, each sent the first 6 bytes of an A-ASSOCIATE-RQ, then one byte every
    `every_s`; a connection the node closes is opened again, so `count` stay open for as long as this runs."""

    def __init__(self, port: int, count: int = 12, every_s: float = 2.0) -> None:
        self.port, self.count, self.every_s = port, count, every_s
        self.stop = threading.Event()
        self.opened = 0
        self.thread = threading.Thread(target=self.run, daemon=True)

    def open(self) -> socket.socket | None:
        s = socket.socket()
        s.bind((ATTACKER, 0))
        try:
            s.connect(("127.0.0.1", self.port))
            s.sendall(FIRST_BYTES)
            self.opened += 1
            return s
        except OSError:
            s.close()
            return None

    def run(self) -> None:
        socks: list[socket.socket] = []
        while not self.stop.is_set():
            alive = []
            for s in socks:
                try:
                    s.send(b"\x00")
                    alive.append(s)
                except OSError:
                    s.close()
            socks = alive + [s for s in (self.open() for _ in range(self.count - len(alive))) if s is not None]
            self.stop.wait(self.every_s)
        for s in socks:
            s.close()

    def __enter__(self) -> "HalfOpen":
        self.thread.start()
        wait_for(lambda: self.opened >= self.count, 10, what="the half-open connections")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)


# ----------------------------------------------------------------------------- the node
def write_config(path: Path, **sections: dict) -> Path:
    """A YAML config from nested dicts, e.g. write_config(p, node={"series_quiet_period_s": 1})."""
    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


def node_command() -> list[str]:
    """`rtprop serve`: the node started the way a clinic starts it."""
    return [str(VENV_BIN / "rtprop"), "serve"]


class NodeProcess:
    """The node in a subprocess, on a free port, storage under `root`. Always stopped by the caller."""

    def __init__(self, root: Path, *, port: int | None = None, config: dict | None = None,
                 ae_title: str = "RTPROP", allow: list[str] = (), destination: str | None = None) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.ae_title = ae_title
        self.storage = root / "storage"
        self.config_path = write_config(root / "node.yaml", **(config or {}))
        self.args = ["--config", str(self.config_path), "--storage", str(self.storage), "--port", str(self.port),
                     "--ae-title", ae_title]
        for ae in allow:
            self.args += ["--allow-ae", ae]
        if destination:
            self.args += ["--destination", destination]
        self.log_path = root / "node.log"
        self.proc: subprocess.Popen | None = None

    @property
    def db_path(self) -> Path:
        return self.storage / "rtprop.sqlite"

    def start(self, timeout_s: float = 60) -> "NodeProcess":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([*node_command(), *self.args], stdout=log, stderr=subprocess.STDOUT,
                                     cwd=str(REPO), env={**os.environ, "PYTHONUNBUFFERED": "1"})
        wait_for(lambda: self.proc.poll() is not None or (port_open(self.port) and echoscu(self.port,
                 called_ae=self.ae_title, calling_ae=self._echo_ae())), timeout_s, 0.2, what="the node to answer C-ECHO")
        if self.proc.poll() is not None:
            raise RuntimeError(f"node exited ({self.proc.returncode}): {self.log_path.read_text()[-3000:]}")
        return self

    def _echo_ae(self) -> str:
        allow = [self.args[i + 1] for i, a in enumerate(self.args) if a == "--allow-ae"]
        return allow[0] if allow else "SCU"

    def stop(self, timeout_s: float = 30) -> int | None:
        """SIGTERM and wait (the clean path); SIGKILL only if it hangs."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        rc, self.proc = self.proc.returncode, None
        return rc

    def kill(self) -> None:
        """SIGKILL: the crash test."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=30) as con:
            return con.execute(sql, args).fetchall()

    def __enter__(self) -> "NodeProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def running_node(root: Path, **kw: Any) -> Iterator[NodeProcess]:
    node = NodeProcess(root, **kw)
    node.start()
    try:
        yield node
    finally:
        node.stop()


def enqueue_file(db_path: Path, path: Path, ae_title: str, host: str, port: int, job_id: int | None = None) -> int:
    """Queue `path` for sending through the node's DB (what the pipeline does); returns the send id."""
    from config.schema import Destination
    from db.engine import open_database, transaction
    from dicom_node.scu import enqueue

    factory = open_database(db_path)
    with transaction(factory) as session:
        row = enqueue(session, path, Destination(ae_title=ae_title, host=host, port=port), job_id=job_id)
        send_id = row.id
    factory.kw["bind"].dispose()
    return send_id


@contextmanager
def small_disk(path: Path, size_mb: int = 64) -> Iterator[Path]:
    """A real, small file system (tmpfs) at `path`, to be filled for real; the test is skipped where mounting is
    not allowed (not root)."""
    import pytest

    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small file system needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill_disk(folder: Path) -> Path:
    """Write zeros under `folder` until the file system says ENOSPC; returns the folder of filler files
    (remove it to free the space)."""
    fill = folder / "fill"
    fill.mkdir(exist_ok=True)
    for n, size in enumerate((1 << 20, 4096, 512)):  # big blocks, then the last crumbs
        try:
            with open(fill / f"filler{n}.bin", "wb") as fh:
                while True:
                    fh.write(b"\0" * size)
                    fh.flush()
        except OSError:
            pass
    return fill
