"""Workers: claim a queued job, propagate its prompts, write ONE RTSTRUCT, self-check it, hand it on.

A worker loop (`Worker.run`) does, every `pipeline.poll_interval_s`:
  1. discovery (`pipeline.discovery.discover`): new prompt RTSTRUCTs -> jobs, received -> queued;
  2. recovery: jobs left `running` by a dead worker -> queued (or dead-letter), see `pipeline.jobs`;
  3. reconciliation: `sending` jobs follow their row in `sends` (sent / dead-letter);
  4. claim the oldest queued job and run it.
The computation runs in a child process (pipeline.isolate_jobs) so that a hung or crashed
propagation is killed after pipeline.job_timeout_s and the job retried, while the worker keeps
its heartbeat going. The child dies with its worker (PR_SET_PDEATHSIG), so a killed worker leaves
nothing running; its job is recovered by the next worker and the result is queued for sending
once, by whichever attempt finishes (the `sends` row is written in the same transaction as
validated -> sending).
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import shutil
import signal
import threading
import time
import traceback
from importlib import metadata
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from config.schema import Config
from db.audit import query as audit_query
from db.engine import transaction
from db.schema import Instance, Job, Send
from pipeline import jobs as J
from pipeline.discovery import (PromptSpec, discover, output_style, prompt_object, rtstruct_path,
                                series_folder)

LOG = logging.getLogger("rtprop.pipeline.worker")
INPUT_ERRORS = ("ConversionError", "SeriesError", "SeriesIncompleteError", "RTStructError", "PromptError",
                "DiscoveryError", "SelfCheckError")


# --------------------------------------------------------------------------- helpers
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


def worker_identity(index: int = 0) -> str:
    from dicom_node.scu import worker_id

    return f"{worker_id()}#w{index}"


def owner_alive(claimed_by: str) -> bool:
    from dicom_node.scu import owner_alive as process_alive

    return process_alive(claimed_by.split("#", 1)[0])


# --------------------------------------------------------------------------- the computation
class SelfCheckError(RuntimeError):
    """The written RTSTRUCT does not match the masks or the series (the job is quarantined)."""


def compute(task: dict[str, Any]) -> dict[str, Any]:
    """Read the series and prompt RTSTRUCT, propagate every prompt, write one RTSTRUCT, self-check it.

    Pure file work (no database): runs in the child process. Returns a JSON-able summary.
    """
    from converters.rtstruct_read import read_rtstruct
    from converters.rtstruct_write import RoiMask, write_rtstruct
    from converters.series import read_series
    from models.propagate import propagate
    from pipeline.model_routing import check_loaded, verified_settings
    from pipeline.selfcheck import self_check

    config: Config = task["config"]
    timings: dict[str, float] = {}
    t = time.perf_counter()
    volume = read_series(task["series_folder"], task["series_uid"])
    structure_set = read_rtstruct(task["rtstruct_path"], volume)
    timings["read_s"] = time.perf_counter() - t

    rois, masks, per_structure = [], [], []
    backend, checkpoint = "", ""
    t = time.perf_counter()
    for raw in task["prompts"]:
        spec = PromptSpec.from_json(raw)
        prompt = prompt_object(spec, structure_set)
        t1 = time.perf_counter()
        routed = task["models"][spec.structure]  # the active model for this ROI name and modality (task_for)
        result = propagate(volume.array, volume.geometry.spacing_zyx, prompt, volume.modality,
                           verified_settings(routed))
        check_loaded(routed, result.checkpoint_sha256)
        if not result.mask.any():
            raise SelfCheckError(f"propagation of {spec.structure!r} ({spec.kind} on slice {spec.slice}) gave an "
                                 "empty mask: nothing to send")
        backend, checkpoint = result.backend, result.checkpoint_sha256 or checkpoint
        style = output_style(spec.structure, config.rtstruct)
        rois.append(RoiMask(style["name"], result.mask, color=style["color"],
                            interpreted_type=style["interpreted_type"],
                            description=f"rtprop {result.backend} from {spec.kind} on slice {spec.slice}"))
        masks.append(result.mask)
        slices = result.mask.any(axis=(1, 2)).nonzero()[0]
        per_structure.append({"structure": spec.structure, "kind": spec.kind, **routed.describe(),
                              "voxels": int(result.mask.sum()),
                              "slices": [int(slices[0]), int(slices[-1])],
                              "seconds": round(time.perf_counter() - t1, 3)})
    timings["propagate_s"] = time.perf_counter() - t

    t = time.perf_counter()
    out_dir = Path(task["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    path = write_rtstruct(volume, rois, out_dir, config.rtstruct,
                          series_description=f"rtprop job {task['job_id']}")
    timings["write_s"] = time.perf_counter() - t
    t = time.perf_counter()
    check = self_check(path, volume, masks, config.pipeline.self_check_min_dice)
    timings["self_check_s"] = time.perf_counter() - t
    return {"path": str(path), "sha256": sha256_file(path), "backend": backend, "checkpoint_sha256": checkpoint or "",
            "model": ",".join(dict.fromkeys(s["model"] for s in per_structure)),
            "timings_s": {k: round(v, 3) for k, v in timings.items()}, "structures": per_structure,
            "self_check": {"ok": check.ok, "dice": check.dice, "min_dice": check.min_dice, "problems": check.problems}}


def _child_main(conn, task: dict[str, Any]) -> None:  # type: ignore[no-untyped-def]
    """Child entry: die with the parent, compute, send back {"ok": summary} or {"error": ...}."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: the worker's timeout still bounds the child
        pass
    logging.basicConfig(level=logging.WARNING)
    try:
        conn.send({"ok": compute(task)})
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent, which decides
        conn.send({"error": f"{type(exc).__name__}: {exc}", "type": type(exc).__name__,
                   "traceback": traceback.format_exc()[-4000:]})
    finally:
        conn.close()


class JobLost(RuntimeError):
    """The computation did not finish: child killed or crashed, timeout, or the claim was taken over."""

    def __init__(self, reason: str, *, timeout: bool = False, claim_lost: bool = False,
                 handed_back: bool = False) -> None:
        super().__init__(reason)
        self.timeout = timeout
        self.claim_lost = claim_lost
        self.handed_back = handed_back


def run_child(task: dict[str, Any], timeout_s: float, tick_s: float, tick, stop: threading.Event | None = None) -> dict:  # type: ignore[no-untyped-def]
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


# --------------------------------------------------------------------------- the worker
class Worker:
    """One worker: discovery/recovery/reconciliation (index 0) and job execution. Restart-safe."""

    def __init__(self, factory: sessionmaker[Session], config: Config, index: int = 0) -> None:
        self.factory = factory
        self.config = config
        self.index = index
        self.me = worker_identity(index)
        self.stop: threading.Event | None = None  # set by run(): a clean stop hands the running job back

    # ---------------------------------------------------------------- passes
    def housekeeping(self) -> None:
        """Discovery, recovery and reconciliation: all idempotent, safe in several processes at once."""
        p = self.config.pipeline
        J.recover_stale(self.factory, heartbeat_timeout_s=p.heartbeat_timeout_s, max_attempts=p.job_max_attempts,
                        owner_alive=owner_alive)
        discover(self.factory, self.config)
        self.reconcile_sends()
        self.report_dropin_failures()

    def run_once(self) -> int | None:
        """Claim and run one queued job; returns its id, or None when the queue is empty."""
        job = J.claim_next(self.factory, self.me)
        if job is None:
            return None
        LOG.info("worker %s claimed job %s (attempt %d)", self.me, job.id, job.attempts)
        self.process(job)
        return job.id

    def run(self, stop: threading.Event) -> None:
        """Loop until `stop` is set; every error is logged and the loop goes on."""
        self.stop = stop
        while not stop.is_set():
            busy = False
            try:
                if self.index == 0:
                    self.housekeeping()
                busy = self.run_once() is not None
            except Exception:
                LOG.exception("worker %s pass failed; retrying", self.me)
            if not busy:
                stop.wait(self.config.pipeline.poll_interval_s)

    def drain(self, timeout_s: float = 600) -> None:
        """Run until no job is received, queued or running (tests, `rtprop worker --once`)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.housekeeping()
            if self.run_once() is not None:
                continue
            with self.factory() as session:
                pending = session.execute(select(Job.id).where(Job.state.in_(("received", "queued", "running")))
                                          .limit(1)).scalar()
            if pending is None:
                self.housekeeping()
                return
            time.sleep(self.config.pipeline.poll_interval_s)
        raise TimeoutError(f"jobs still pending after {timeout_s:.0f} s")

    # ---------------------------------------------------------------- one job
    def task_for(self, job: Job) -> dict[str, Any]:
        from db.schema import Series
        from pipeline.model_routing import settings_for

        with self.factory() as session:
            folder = series_folder(session, job.series_instance_uid)
            rs_path = rtstruct_path(session, job.rtstruct_sop_instance_uid)
            modality = session.execute(select(Series.modality).where(
                Series.series_instance_uid == job.series_instance_uid)).scalar() or ""
        out_dir = (Path(self.config.storage.outbox) / (job.study_instance_uid or "unknown-study")
                   / f"job{job.id}" / f"attempt{job.attempts}")
        models = {p["structure"]: settings_for(self.factory, self.config, p["structure"], modality)
                  for p in job.prompts or []}
        return {"job_id": job.id, "series_folder": str(folder), "series_uid": job.series_instance_uid,
                "rtstruct_path": str(rs_path), "prompts": job.prompts or [], "out_dir": str(out_dir),
                "config": self.config, "models": models}

    def process(self, job: Job) -> str:
        """Run a claimed job to its next resting state; returns that state."""
        p = self.config.pipeline
        started = time.perf_counter()
        try:
            task = self.task_for(job)
        except Exception as exc:  # noqa: BLE001
            return self._finish_failed(job, f"{type(exc).__name__}: {exc}")
        last_beat = [time.monotonic()]

        def tick() -> bool:
            if time.monotonic() - last_beat[0] < p.heartbeat_interval_s:
                return True
            last_beat[0] = time.monotonic()
            return J.heartbeat(self.factory, job.id, self.me)

        try:
            if p.isolate_jobs:
                message = run_child(task, p.job_timeout_s, min(1.0, p.heartbeat_interval_s), tick, self.stop)
            else:
                try:
                    message = {"ok": compute(task)}
                except Exception as exc:  # noqa: BLE001
                    message = {"error": f"{type(exc).__name__}: {exc}", "type": type(exc).__name__}
        except JobLost as exc:
            return self._finish_lost(job, str(exc), exc)
        if "error" in message:
            LOG.warning("job %s: %s", job.id, message["error"])
            if message.get("traceback") and message.get("type") not in INPUT_ERRORS:
                LOG.warning("job %s traceback:\n%s", job.id, message["traceback"])
            event = "job.quarantined" if message.get("type") == "SelfCheckError" else "job.failed"
            return self._finish_failed(job, message["error"], event=event)
        return self._finish_ok(job, message["ok"], time.perf_counter() - started)

    def _finish_lost(self, job: Job, reason: str, exc: JobLost) -> str:
        if exc.claim_lost:
            LOG.warning("job %s: %s", job.id, reason)
            return "abandoned"
        with transaction(self.factory) as session:
            row = session.get(Job, job.id)
            if exc.handed_back:  # a clean stop is not the job's fault: the attempt is not counted
                J.transition(session, row, "queued", event="job.handed_back", expect_owner=self.me, claimed_by="",
                             attempts=max(0, row.attempts - 1))
                return "queued"
            target = "dead-letter" if row.attempts >= self.config.pipeline.job_max_attempts else "queued"
            event = "job.timeout" if exc.timeout else ("job.dead_letter" if target == "dead-letter" else "job.recovered")
            J.transition(session, row, target, event=event, expect_owner=self.me, claimed_by="",
                         error=f"attempt {row.attempts}: {reason}")
        return target

    def _finish_failed(self, job: Job, reason: str, *, event: str = "job.failed", **fields: Any) -> str:
        with transaction(self.factory) as session:
            row = session.get(Job, job.id)
            J.transition(session, row, "failed", event=event, expect_owner=self.me, error=reason[:4000], **fields)
        return "failed"

    def _finish_ok(self, job: Job, result: dict[str, Any], seconds: float) -> str:
        check = result["self_check"]
        timings = {**result["timings_s"], "total_s": round(seconds, 3)}
        common = dict(backend=result["backend"][:16], checkpoint_sha256=result["checkpoint_sha256"],
                      versions={**versions(), "model": result["model"]}, timings_s=timings,
                      self_check_dice=check["min_dice"])
        with transaction(self.factory) as session:
            row = session.get(Job, job.id)
            J.audit_job(session, row, "job.propagated", backend=result["backend"], model=result["model"],
                        structures=result["structures"], checkpoint_sha256=result["checkpoint_sha256"],
                        timings_s=timings)
        if not check["ok"]:
            held = self.quarantine_result(job, Path(result["path"]), check["problems"])
            return self._finish_failed(job, "self-check failed: " + "; ".join(check["problems"])[:3000],
                                       event="job.quarantined", result_path=str(held),
                                       result_sha256=result["sha256"], **common)
        with transaction(self.factory) as session:
            row = session.get(Job, job.id)
            J.transition(session, row, "validated", expect_owner=self.me, result_path=result["path"],
                         result_sha256=result["sha256"], **common)
            J.audit_job(session, row, "job.self_check", dice=check["dice"], ok=True)
            return self.deliver(session, row, Path(result["path"]))

    def quarantine_result(self, job: Job, path: Path, problems: list[str]) -> Path:
        """Hold a result that failed its self-check: moved out of the outbox, with the reasons beside it."""
        folder = Path(self.config.storage.quarantine) / "jobs" / f"job{job.id}-attempt{job.attempts}"
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / path.name
        shutil.move(str(path), target)
        (folder / f"{path.name}.reason.json").write_text(json.dumps(
            {"job_id": job.id, "reason": "self-check failed", "problems": problems,
             "series_instance_uid": job.series_instance_uid, "rtstruct_sop_instance_uid": job.rtstruct_sop_instance_uid},
            indent=1))
        return target

    # ---------------------------------------------------------------- delivery
    def is_dropin(self, session: Session, job: Job) -> bool:
        source = session.execute(select(Instance.source).where(
            Instance.sop_instance_uid == job.rtstruct_sop_instance_uid)).scalar()
        return source == "dropin"

    def deliver(self, session: Session, job: Job, path: Path) -> str:
        """validated -> sending (C-STORE queued), -> sent (drop-in outbox), or stays validated (dry run)."""
        from dicom_node.routing import RoutingError, resolve_destination
        from dicom_node.scu import enqueue

        if job.dry_run:
            J.audit_job(session, job, "job.dry_run", result_path=str(path), decision="shadow mode: not sent")
            return "validated"
        if self.is_dropin(session, job):
            target = self.dropin_output(session, job, path)
            J.transition(session, job, "sent", details={"delivered_to": str(target), "via": "dropin-outbox"})
            return "sent"
        try:
            route = resolve_destination(self.config, job.calling_ae)
        except RoutingError as exc:
            J.transition(session, job, "failed", error=f"no destination: {exc}; result kept at {path}")
            return "failed"
        if route.dry_run or route.destination is None:
            J.audit_job(session, job, "job.dry_run", result_path=str(path), route=route.name,
                        decision="route dry_run: not sent")
            return "validated"
        send = enqueue(session, path, route.destination, job_id=job.id)
        J.transition(session, job, "sending", details={
            "send_id": send.id, "destination": f"{route.destination.ae_title}@{route.destination.host}:"
                                              f"{route.destination.port}"})
        return "sending"

    def dropin_output(self, session: Session, job: Job, path: Path) -> Path:
        outbox = self.config.dropin.outbox
        outbox.mkdir(parents=True, exist_ok=True)
        target = outbox / f"{dropin_case(session, job) or job.study_instance_uid}__{path.name}"
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.copyfile(path, tmp)
        os.replace(tmp, target)
        return target

    def reconcile_sends(self) -> None:
        """`sending` jobs follow their send rows: sent on 0x0000, dead-letter when the sender gave up."""
        with self.factory() as session:
            ids = session.execute(select(Job.id).where(Job.state == "sending")).scalars().all()
        for job_id in ids:
            with transaction(self.factory) as session:
                job = session.get(Job, job_id)
                if job.state != "sending":
                    continue
                sends = session.execute(select(Send).where(Send.job_id == job_id)).scalars().all()
                if any(s.state == "sent" for s in sends):
                    done = next(s for s in sends if s.state == "sent")
                    J.transition(session, job, "sent", details={"send_id": done.id, "status": done.last_status,
                                                                "destination_ae": done.destination_ae})
                elif sends and all(s.state == "dead-letter" for s in sends):
                    J.transition(session, job, "dead-letter", error=f"send dead-lettered: {sends[-1].last_error}")

    def report_dropin_failures(self) -> None:
        """A dropped case whose job failed gets <case>.failed.json in the drop-in outbox (once)."""
        outbox = self.config.dropin.outbox
        with self.factory() as session:
            rows = session.execute(select(Job).join(Instance, Instance.sop_instance_uid == Job.rtstruct_sop_instance_uid)
                                   .where(Instance.source == "dropin", Job.state.in_(("failed", "dead-letter")))
                                   ).scalars().all()
            for job in rows:
                marker = outbox / f"{dropin_case(session, job) or job.study_instance_uid}.job{job.id}.failed.json"
                if marker.exists():
                    continue
                outbox.mkdir(parents=True, exist_ok=True)
                marker.write_text(json.dumps({"job_id": job.id, "state": job.state, "error": job.error,
                                              "rtstruct_sop_instance_uid": job.rtstruct_sop_instance_uid}, indent=1))


def dropin_case(session: Session, job: Job) -> str:
    """The name of the dropped case the prompt RTSTRUCT came in (audit `dropin.rtstruct`)."""
    rows = audit_query(session, event="dropin.rtstruct")
    for row in reversed(rows):
        if row.sop_instance_uid == job.rtstruct_sop_instance_uid:
            return str(json.loads(row.details).get("case", ""))
    return ""


def start_workers(factory: sessionmaker[Session], config: Config, stop: threading.Event,
                  count: int | None = None) -> list[threading.Thread]:
    """`count` worker threads (each runs its jobs in child processes); index 0 also does housekeeping."""
    threads = []
    for i in range(config.pipeline.workers if count is None else count):
        w = Worker(factory, config, i)
        t = threading.Thread(target=w.run, args=(stop,), name=f"rtprop-worker-{i}", daemon=True)
        t.start()
        threads.append(t)
    return threads
