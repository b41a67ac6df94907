"""A job's computation: read the series and prompt RTSTRUCT, propagate, write ONE RTSTRUCT, check the file.

Pure file work, no database: it runs in a child process (`ComputeChild`, pipeline.isolate_jobs) so a
hung or crashed propagation is killed after pipeline.job_timeout_s while the worker keeps its
heartbeat going. The child is warm: a worker starts one ahead of its first job (its imports done
before a job arrives) and jobs reuse it one after another (a loaded model stays loaded: `CHILDREN`);
a child whose job is lost (killed, crashed, timed out, claim taken over) is killed and replaced at once.
The child dies with its worker (PR_SET_PDEATHSIG). What went wrong comes back as a kind the worker
acts on (`classify`): the input's fault, a transient fault, or ours.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from importlib import metadata

from config.errors import TransientError, UserError
from config.schema import Config
from pipeline.compute_types import (ComputeFailure, ComputeOutcome, ComputeResult, ComputeTask, FailureKind,
                                    StructureResult)

from pipeline.logline import log_to_stderr


class HeldError(RuntimeError):
    """The result cannot leave the node (empty, or the RTSTRUCT does not match its masks): held."""


class JobLost(RuntimeError):
    """The computation did not finish: child killed or crashed, timeout, or the claim was taken over."""

    def __init__(self, reason: str, *, timeout: bool = False, claim_lost: bool = False,
                 handed_back: bool = False) -> None:
        super().__init__(reason)
        self.timeout = timeout
        self.claim_lost = claim_lost
        self.handed_back = handed_back


def classify(exc: BaseException) -> FailureKind:
    """"input" (the user's to fix), "transient" (retry later), "held" (file check) or "internal" (ours)."""
    if isinstance(exc, HeldError):
        return "held"
    if isinstance(exc, UserError):
        return "input"
    from db.engine import is_disk_full  # here, not at the top: a compute child never loads SQLAlchemy to start

    if isinstance(exc, TransientError) or is_disk_full(exc):
        return "transient"
    if "database is locked" in str(exc) or (isinstance(exc, OSError) and exc.errno in (5, 12, 110, 111)):
        return "transient"  # EIO, ENOMEM, ETIMEDOUT, ECONNREFUSED (a share that went away)
    return "internal"


def versions() -> dict[str, str]:
    """Versions of the software that made a result (recorded per job)."""
    out = {}
    from models import backends

    for dist in ("rtprop", *backends.packages(), "numpy", "pydicom", "SimpleITK"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = ""
    return out


def compute(task: ComputeTask) -> ComputeResult:
    """Read the series and prompt RTSTRUCT, propagate every prompt with the model routed to its structure,
    write one RTSTRUCT (pipeline/write_result.py: TPS profile, review side file, file check)."""
    from converters.rtstruct_read import read_rtstruct
    from converters.series import read_series
    from models.propagate import propagate
    from pipeline.model_routing import check_loaded, verified_settings
    from pipeline.prompt_rois import prompt_objects
    from pipeline.write_result import Structure, write_result

    config = task.config
    timings: dict[str, float] = {}
    t = time.perf_counter()
    volume = read_series(task.series_folder, task.series_uid)
    structure_set = read_rtstruct(task.rtstruct_path, volume)
    timings["read_s"] = time.perf_counter() - t

    structures, ran = [], []
    t = time.perf_counter()
    for spec in task.prompts:
        prompts = prompt_objects(spec, structure_set)
        t1 = time.perf_counter()
        routed = task.model_for(spec.structure)
        result = propagate(volume.array, volume.geometry.spacing_zyx, prompts, volume.modality,
                           verified_settings(routed))
        check_loaded(routed, result.checkpoint_sha256)
        if not result.mask.any():
            raise HeldError(f"propagation of {spec.structure!r} ({spec.describe()}) gave an empty mask: "
                            "nothing to send")
        structures.append(Structure(spec.structure, result.mask, spec.describe(), result.backend,
                                    tuple(result.warnings), tuple(float(c) for c in result.confidence), spec.slice,
                                    tuple(spec.slices), float(result.structure_confidence)))
        ran.append((routed, result.backend, result.checkpoint_sha256 or "", round(time.perf_counter() - t1, 3)))
    timings["propagate_s"] = time.perf_counter() - t

    written = write_result(volume, structures, task.out_dir, config, series_description=f"rtprop job {task.job_id}",
                           uid_seed=task.uid_seed)
    timings.update(written.timings_s)
    per_structure = []
    for s, roi, (routed, backend, sha, seconds) in zip(structures, written.rois, ran):
        slices = s.mask.any(axis=(1, 2)).nonzero()[0]
        per_structure.append(StructureResult(s.name, roi, s.prompt, routed.name, backend, sha, s.warnings,
                                             int(s.mask.sum()), (int(slices[0]), int(slices[-1])), seconds,
                                             round(float(s.structure_confidence or 0.0), 3)))
    return ComputeResult(written.path, written.sha256, written.sop_instance_uid, ran[-1][1] if ran else "",
                         next((r[2] for r in reversed(ran) if r[2]), ""),
                         ",".join(dict.fromkeys(s.model for s in per_structure)),
                         {k: round(v, 3) for k, v in timings.items()}, tuple(per_structure), written.check)


def outcome(task: ComputeTask) -> ComputeOutcome:
    """`compute(task)` as what goes back to the worker: a ComputeResult, or a ComputeFailure; never raises."""
    try:
        return compute(task)
    except Exception as exc:  # noqa: BLE001 - everything goes back to the worker, which decides
        return ComputeFailure(f"{type(exc).__name__}: {exc}", classify(exc), traceback.format_exc()[-4000:])


def _die_with_parent() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: the worker's timeout still bounds the child
        pass


def warm_up(config: Config | None) -> None:
    """Import what a job needs before one arrives: the readers, the writer and the file check, and the backend
    the configuration runs by default (the weight-free one imports no torch; a weights backend imports its
    libraries here and loads its model at its first job, kept for the next ones)."""
    import converters.rtstruct_read  # noqa: F401
    import converters.series  # noqa: F401
    import pipeline.model_routing  # noqa: F401
    import pipeline.write_result  # noqa: F401
    from models import backends

    backends.weight_free().propagate()
    if config is not None:
        try:
            backends.choose(config.propagation).propagate()
        except Exception as exc:  # noqa: BLE001 - the job that needs it reports it (compute -> outcome)
            logging.getLogger("rtprop.pipeline.compute").warning("could not import the configured backend "
                                                                 "ahead: %s", exc)


def _serve(conn, config: Config | None) -> None:  # type: ignore[no-untyped-def]
    """Child entry: die with the parent, import ahead, then compute each task sent and send back its outcome
    until the parent sends None or goes away."""
    _die_with_parent()
    log_to_stderr(logging.WARNING)
    warm_up(config)
    served = 0
    try:
        while True:
            try:
                task = conn.recv()
            except EOFError:
                return
            if task is None:
                return
            served += 1
            result = outcome(task)
            if isinstance(result, ComputeResult):
                result = replace(result, pid=os.getpid(), job_in_process=served)
            conn.send(result)
    finally:
        conn.close()


class ComputeChild:
    """One compute process: spawned ahead of the job it will run, reused job after job, killed and replaced when
    a job in it is lost. It dies with the thread that spawned it (PR_SET_PDEATHSIG follows the parent thread):
    start it from a thread that lives as long as the worker (a worker loop, the job engine's thread pool)."""

    def __init__(self, config: Config | None = None, name: str = "rtprop-compute") -> None:
        self.config = config  # what `warm_up` imports ahead (each task carries its own configuration)
        self.name = name
        self._proc: mp.process.BaseProcess | None = None
        self._conn = None  # type: ignore[var-annotated]

    @property
    def pid(self) -> int | None:
        """The live child's pid (None when there is none)."""
        return self._proc.pid if self._proc is not None and self._proc.is_alive() else None

    def start(self) -> "ComputeChild":
        """Spawn the child unless a live one is waiting; returns at once (it imports in the background)."""
        if self._proc is not None and self._proc.is_alive():
            return self
        self.kill()
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe(duplex=True)
        proc = ctx.Process(target=_serve, args=(child, self.config), name=self.name, daemon=True)
        proc.start()
        child.close()
        self._proc, self._conn = proc, parent
        return self

    def kill(self) -> None:
        """Kill the child (if any) and wait for it."""
        proc, conn, self._proc, self._conn = self._proc, self._conn, None, None
        if proc is not None:
            if proc.is_alive():
                proc.kill()
            proc.join(10)
        if conn is not None:
            conn.close()

    def close(self, timeout_s: float = 5) -> None:
        """Ask an idle child to exit (killed if it does not)."""
        if self._proc is not None and self._proc.is_alive():
            try:
                self._conn.send(None)
                self._proc.join(timeout_s)
            except OSError:
                pass
        self.kill()

    def run(self, task: ComputeTask, timeout_s: float, tick_s: float, tick: Callable[[], bool],
            stop: threading.Event | None = None) -> ComputeOutcome:
        """`compute(task)` in the child; call `tick()` every `tick_s` (False = abandon). A lost job (JobLost)
        kills the child; a replacement is started at once unless the worker is stopping."""
        self._hand_over(task)
        try:
            return self._wait(timeout_s, tick_s, tick, stop)
        except JobLost as exc:
            self.kill()
            if not exc.handed_back:
                self.start()  # the replacement imports while the worker records the lost job
            raise
        except BaseException:
            self.kill()
            raise

    def _hand_over(self, task: ComputeTask) -> None:
        """Send the task to a live child; one that died while idle (the pipe broke) is replaced once."""
        for attempt in (1, 2):
            self.start()
            try:
                self._conn.send(task)
                return
            except OSError as exc:
                self.kill()
                if attempt == 2:
                    raise JobLost(f"no job process to hand the job to ({exc})") from exc

    def _wait(self, timeout_s: float, tick_s: float, tick: Callable[[], bool],
              stop: threading.Event | None) -> ComputeOutcome:
        proc, conn = self._proc, self._conn
        started = time.monotonic()
        while True:
            try:
                if conn.poll(tick_s):
                    return conn.recv()
            except (EOFError, OSError):  # its end closed: EOF, or a reset when it died with bytes unread
                proc.join(5)
                raise JobLost(f"job process exited with code {proc.exitcode} without a result") from None
            if not proc.is_alive() and not conn.poll(0):
                raise JobLost(f"job process died (exit code {proc.exitcode}, e.g. killed for memory)")
            if time.monotonic() - started > timeout_s:
                raise JobLost(f"job exceeded pipeline.job_timeout_s={timeout_s:g} s: killed", timeout=True)
            if not tick():
                raise JobLost("claim lost (recovered by another worker): abandoned", claim_lost=True)
            if stop is not None and stop.is_set():
                raise JobLost("worker stopping: job handed back", handed_back=True)


class ChildPool:
    """This process's idle compute children. A job takes one (a new one when none is idle) and gives it back
    after, so there are as many children as jobs ever ran at once, whatever threads ran them (a worker loop,
    the job engine's thread pool, a command's main thread)."""

    def __init__(self) -> None:
        self._idle: list[ComputeChild] = []
        self._lock = threading.Lock()

    def take(self, config: Config | None = None) -> ComputeChild:
        """The most recently used idle child (the warmest), or a new one not yet started."""
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return ComputeChild(config)

    def give_back(self, child: ComputeChild) -> None:
        with self._lock:
            self._idle.append(child)

    def close(self) -> None:
        """Close every idle child (a worker loop that ends)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for child in idle:
            child.close()


CHILDREN = ChildPool()
