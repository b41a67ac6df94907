"""A job's computation: read the series and prompt RTSTRUCT, propagate, write ONE RTSTRUCT, check the file.

Pure file work, no database: it runs in a child process (`run_child`, pipeline.isolate_jobs) so a
hung or crashed propagation is killed after pipeline.job_timeout_s while the worker keeps its
heartbeat going. The child dies with its worker (PR_SET_PDEATHSIG). What went wrong comes back as
a kind the worker acts on (`classify`): the input's fault, a transient fault, or ours.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import signal
import threading
import time
import traceback
from collections.abc import Callable
from importlib import metadata

from config.errors import TransientError, UserError
from db.engine import is_disk_full
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


def _child_main(conn, task: ComputeTask) -> None:  # type: ignore[no-untyped-def]
    """Child entry: die with the parent, compute, send back the outcome."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: the worker's timeout still bounds the child
        pass
    log_to_stderr(logging.WARNING)
    try:
        conn.send(outcome(task))
    finally:
        conn.close()


def run_child(task: ComputeTask, timeout_s: float, tick_s: float, tick: Callable[[], bool],
              stop: threading.Event | None = None) -> ComputeOutcome:
    """Run `compute(task)` in a spawned child; call `tick()` every `tick_s` (False = abandon)."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_main, args=(child, task), name=f"rtprop-job-{task.job_id}", daemon=True)
    proc.start()
    child.close()
    started = time.monotonic()
    try:
        while True:
            if parent.poll(tick_s):
                try:
                    message = parent.recv()
                except EOFError:
                    proc.join(5)
                    raise JobLost(f"job process exited with code {proc.exitcode} without a result") from None
                proc.join(30)
                return message
            if not proc.is_alive() and not parent.poll(0):
                raise JobLost(f"job process died (exit code {proc.exitcode}, e.g. killed for memory)")
            if time.monotonic() - started > timeout_s:
                raise JobLost(f"job exceeded pipeline.job_timeout_s={timeout_s:g} s: killed", timeout=True)
            if not tick():
                raise JobLost("claim lost (recovered by another worker): abandoned", claim_lost=True)
            if stop is not None and stop.is_set():
                raise JobLost("worker stopping: job handed back", handed_back=True)
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(10)
        parent.close()
