"""A job's computation: read the series and prompt RTSTRUCT, propagate, write ONE RTSTRUCT, check the file.

Pure file work, no database: it runs in a child process (`run_child`, pipeline.isolate_jobs) so a
hung or crashed propagation is killed after pipeline.job_timeout_s while the worker keeps its
heartbeat going. The child dies with its worker (PR_SET_PDEATHSIG). What went wrong comes back as
a kind the worker acts on (`classify`): the input's fault, a transient fault, or ours.
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import signal
import threading
import time
import traceback
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from config.errors import TransientError, UserError
from config.schema import Config
from converters.files import write_atomic
from db.engine import is_disk_full

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # the CLI and every child process log alike


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


def classify(exc: BaseException) -> str:
    """"input" (the user's to fix), "transient" (retry later), "held" (empty, or the file check failed) or "internal" (ours)."""
    if isinstance(exc, HeldError):
        return "held"
    if isinstance(exc, UserError):
        return "input"
    if isinstance(exc, TransientError) or is_disk_full(exc):
        return "transient"
    if "database is locked" in str(exc) or (isinstance(exc, OSError) and exc.errno in (5, 12, 110, 111)):
        return "transient"  # EIO, ENOMEM, ETIMEDOUT, ECONNREFUSED (a share that went away)
    return "internal"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def versions() -> dict[str, str]:
    """Versions of the software that made a result (recorded per job)."""
    out = {}
    for dist in ("rtprop", "sam2", "torch", "numpy", "pydicom", "SimpleITK"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = ""
    return out


def compute(task: dict[str, Any]) -> dict[str, Any]:
    """Read the series and prompt RTSTRUCT, propagate every prompt, write one RTSTRUCT, check the file.

    Returns a JSON-able summary.
    """
    from converters.rtstruct_read import read_rtstruct
    from converters.rtstruct_write import RoiMask, write_rtstruct
    from converters.series import read_series
    from converters.tps import output_style
    from models.propagate import propagate
    from pipeline.model_routing import check_loaded, verified_settings
    from pipeline.prompt_rois import PromptSpec, prompt_objects
    from pipeline.file_check import check_file

    config: Config = task["config"]
    timings: dict[str, float] = {}
    t = time.perf_counter()
    volume = read_series(task["series_folder"], task["series_uid"])
    structure_set = read_rtstruct(task["rtstruct_path"], volume)
    timings["read_s"] = time.perf_counter() - t

    rois, masks, per_structure, review = [], [], [], []  # review: what the web review page shows per structure
    backend, checkpoint = "", ""
    t = time.perf_counter()
    for raw in task["prompts"]:
        spec = PromptSpec.from_json(raw)
        prompts = prompt_objects(spec, structure_set)
        t1 = time.perf_counter()
        routed = task["models"][spec.structure]  # the active model for this ROI name and modality (task_for)
        result = propagate(volume.array, volume.geometry.spacing_zyx, prompts, volume.modality,
                           verified_settings(routed))
        check_loaded(routed, result.checkpoint_sha256)
        if not result.mask.any():
            raise HeldError(f"propagation of {spec.structure!r} ({spec.describe()}) gave an empty mask: "
                                 "nothing to send")
        backend, checkpoint = result.backend, result.checkpoint_sha256 or checkpoint
        style = output_style(spec.structure, config.rtstruct, implausible=bool(result.warnings))
        # ROI Description is 64 characters (LO): a flagged result leads with the warning a TPS shows
        description = (f"CHECK: {'; '.join(result.warnings)}" if result.warnings
                       else f"rtprop {result.backend} from {spec.describe()}")
        rois.append(RoiMask(style["name"], result.mask, color=style["color"],
                            interpreted_type=style["interpreted_type"], description=description))
        masks.append(result.mask)
        slices = result.mask.any(axis=(1, 2)).nonzero()[0]
        confidence = round(float(result.structure_confidence), 3)
        per_structure.append({"structure": spec.structure, "prompt": spec.describe(), "warnings": result.warnings,
                              "confidence": confidence,
                              **routed.describe(),
                              "voxels": int(result.mask.sum()),
                              "slices": [int(slices[0]), int(slices[-1])],
                              "seconds": round(time.perf_counter() - t1, 3)})
        review.append({"structure": spec.structure, "roi": style["name"], "slice": spec.slice, "slices": spec.slices,
                       "warnings": result.warnings, "structure_confidence": confidence,
                       "confidence": [round(float(c), 3) for c in result.confidence]})
    timings["propagate_s"] = time.perf_counter() - t

    t = time.perf_counter()
    out_dir = Path(task["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    path = write_rtstruct(volume, rois, out_dir, config.rtstruct,
                          series_description=f"rtprop job {task['job_id']}", uid_seed=task.get("uid_seed"))
    timings["write_s"] = time.perf_counter() - t
    write_atomic(out_dir / "review.json", json.dumps({"rtstruct": path.name, "structures": review}).encode())
    t = time.perf_counter()
    check = check_file(path, volume, masks, config.pipeline.file_check_min_dice)
    timings["file_check_s"] = time.perf_counter() - t
    return {"path": str(path), "sha256": sha256_file(path), "backend": backend, "checkpoint_sha256": checkpoint or "",
            "model": ",".join(dict.fromkeys(s["model"] for s in per_structure)),
            "timings_s": {k: round(v, 3) for k, v in timings.items()}, "structures": per_structure,
            "file_check": {"ok": check.ok, "dice": check.dice, "min_dice": check.min_dice, "problems": check.problems}}


def outcome(task: dict[str, Any]) -> dict[str, Any]:
    """`compute(task)` as a message: {"ok": summary} or {"error", "kind", "traceback"}; never raises."""
    try:
        return {"ok": compute(task)}
    except Exception as exc:  # noqa: BLE001 - everything goes back to the worker, which decides
        return {"error": f"{type(exc).__name__}: {exc}", "kind": classify(exc),
                "traceback": traceback.format_exc()[-4000:]}


def _child_main(conn, task: dict[str, Any]) -> None:  # type: ignore[no-untyped-def]
    """Child entry: die with the parent, compute, send back the outcome."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: the worker's timeout still bounds the child
        pass
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT)
    try:
        conn.send(outcome(task))
    finally:
        conn.close()


def run_child(task: dict[str, Any], timeout_s: float, tick_s: float, tick: Callable[[], bool],
              stop: threading.Event | None = None) -> dict[str, Any]:
    """Run `compute(task)` in a spawned child; call `tick()` every `tick_s` (False = abandon)."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_main, args=(child, task), name=f"rtprop-job-{task['job_id']}", daemon=True)
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
