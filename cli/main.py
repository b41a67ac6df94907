"""`rtprop`: one command line over the converters, the propagators, the node and the pipeline.

Every subcommand is a thin shell over library functions. Errors a user can fix (`UserError`,
config/errors.py) print one clear line and exit 2; anything unexpected exits 1 (set RTPROP_DEBUG=1
for the traceback). Long-running commands (serve, worker, dropin) log one line per job state change
at INFO without -v.
"""
from __future__ import annotations

import dataclasses
import getpass
import json
import logging
import os
import signal
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from cli.loader import load, open_node
from cli.params import ISO_DATE, REGEX, config_option, emit, storage_option
from config.errors import UserError
from config.schema import Config
from models import backends
from pipeline.jobs import STATES
from pipeline.logline import log_to_stderr

log = logging.getLogger("rtprop")


# ---------------------------------------------------------------- shared option handling
def _service_logging() -> None:
    """serve / worker / dropin: job state changes at INFO unless -v/-vv asked for more already."""
    rtprop = logging.getLogger("rtprop")
    if rtprop.getEffectiveLevel() > logging.INFO:
        rtprop.setLevel(logging.INFO)


def run_until_signal(stop: threading.Event, threads: list[threading.Thread], join_s: float = 10.0) -> None:
    """Wait for SIGTERM/SIGINT (or `stop`), then stop and join `threads`: the loop every service command shares."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
    for t in threads:
        t.join(timeout=join_s)


backend_option = click.option("--backend", type=click.Choice([backends.AUTO, *backends.names()]),
                              help="Propagator (default: propagation.backend; auto = the one that takes weights if a "
                              "checkpoint is set, else the weight-free one).")
checkpoint_option = click.option("--checkpoint", type=click.Path(path_type=Path),
                                 help="SAM2 checkpoint file on this node (never downloaded).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.version_option(package_name="rtprop")
def cli(verbose: int) -> None:
    """rtprop: propagate a prompt drawn on a few slices through a CT/MR volume and return an RTSTRUCT."""
    log_to_stderr(logging.WARNING)
    if verbose:
        logging.getLogger("rtprop").setLevel(logging.INFO if verbose == 1 else logging.DEBUG)


# ---------------------------------------------------------------- propagate
@cli.command()
@click.argument("volume", type=click.Path(exists=True, path_type=Path))
@click.option("--box", "boxes", multiple=True,
              help="Z,X0,Y0,X1,Y1: a rectangle on slice Z (X along columns, Y along rows); repeat for other slices.")
@click.option("--point", "points", multiple=True,
              help="Z,X,Y[,+|-]: a click on slice Z (+ structure, - not the structure); repeat, any slices.")
@click.option("--mask", "mask_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A binary mask on VOLUME's grid: every slice it is drawn on is a prompt (or only --slice Z).")
@click.option("--slice", "slice_index", type=int, help="Use only this slice of --mask (needed for a 2D mask).")
@click.option("--series-uid", help="SeriesInstanceUID to read when VOLUME is a DICOM folder holding several series.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Output mask on VOLUME's grid: .nii.gz, .mha or .npz (its folder must exist).")
@backend_option
@checkpoint_option
@config_option
def propagate(volume: Path, boxes: tuple[str, ...], points: tuple[str, ...], mask_file: Path | None,
              slice_index: int | None, series_uid: str | None, out: Path, backend: str | None,
              checkpoint: Path | None, config_path: Path | None) -> None:
    """Propagate prompts drawn on one or more slices of VOLUME through the whole volume.

    Indices are voxel indices in (z, y, x) array order. Prompts on several slices (e.g. the first,
    middle and last slice of the target) are all honoured; clicks add to a box or outline on their slice.
    """
    from converters.volume_io import read_mask, read_volume, write_mask
    from models.propagate import propagate as run
    from pipeline.prompts import prompts_from_args

    if not out.parent.is_dir():
        raise UserError(f"--out {out}: the folder {out.parent} does not exist")
    config = load(config_path, **{"propagation.backend": backend, "propagation.checkpoint": checkpoint})
    started = time.perf_counter()
    vol = read_volume(volume, series_uid)
    mask = _binary_mask(read_mask(mask_file, vol.geometry), mask_file) if mask_file is not None else None
    prompts = prompts_from_args(boxes, points, mask, slice_index, vol.array.shape)
    result = run(vol.array, vol.geometry.spacing_zyx, prompts, vol.modality, config.propagation)
    write_mask(out, result.mask, vol.geometry)
    emit(_mask_summary(result, vol, out, time.perf_counter() - started))


def _binary_mask(mask: Any, path: Path) -> Any:
    """`--mask`: 0 and one label only (a label map or an image is refused, not guessed)."""
    import numpy as np

    mask = np.asarray(mask)
    values = np.unique(mask)
    if values.size > 2 or (values.size == 2 and values.min() != 0):
        raise UserError(f"--mask {path}: holds {values.size} different values, not a binary mask (0 and one label)")
    return mask > 0


def _mask_summary(result, vol, out: Path, seconds: float) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    slices = [int(z) for z in result.mask.any(axis=(1, 2)).nonzero()[0]]
    dz, dy, dx = vol.geometry.spacing_zyx
    return {
        "out": str(out),
        "backend": result.backend,
        "modality": vol.modality or "unknown",
        "checkpoint_sha256": result.checkpoint_sha256,
        "slices": [slices[0], slices[-1]] if slices else [],
        "voxels": int(result.mask.sum()),
        "volume_ml": round(float(result.mask.sum()) * abs(dz * dy * dx) / 1000.0, 3),
        "confidence": round(float(result.structure_confidence), 3),
        "warnings": list(result.warnings),
        "seconds": round(seconds, 3),
    }


# ---------------------------------------------------------------- recontour / demo
@cli.command()
@click.argument("series_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("rtstruct", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--roi", required=True, help="Name of the contoured ROI to re-propagate (case-insensitive).")
@click.option("--prompt", "prompt_kind", type=click.Choice(["box", "point", "mask"]), default="box", show_default=True,
              help="What to take from the ROI's middle slice: its bounding box, one click, or its outline.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the new RTSTRUCT and metrics.json.")
@backend_option
@checkpoint_option
@config_option
def recontour(series_dir: Path, rtstruct: Path, roi: str, prompt_kind: str, out_dir: Path,
              backend: str | None, checkpoint: Path | None, config_path: Path | None) -> None:
    """Re-propagate ROI from its middle slice; write a new RTSTRUCT and metrics in OUT."""
    from pipeline.recontour import recontour as run

    config = load(config_path, **{"propagation.backend": backend, "propagation.checkpoint": checkpoint})
    emit(run(series_dir, rtstruct, roi, prompt_kind, out_dir, config))


DEMO_CASE = Path(__file__).resolve().parents[1] / "demo" / "sts-001-ct"


@cli.command()
@click.option("--out", "out_dir", default=Path("demo-out"), show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="Folder for the demo's RTSTRUCT and metrics.")
@backend_option
@config_option
def demo(out_dir: Path, backend: str | None, config_path: Path | None) -> None:
    """Run the main job on the bundled real CT: GTV box prompt in, RTSTRUCT out, Dice printed."""
    from pipeline.recontour import recontour as run

    if not DEMO_CASE.is_dir():
        raise UserError(f"bundled demo case not found at {DEMO_CASE}")
    config = load(config_path, **{"propagation.backend": backend})
    summary = run(DEMO_CASE / "image", DEMO_CASE / "rtstruct" / "RS.dcm", "GTV_Mass_CT", "box", out_dir, config)
    emit(summary)
    click.echo(f"demo: wrote {summary['rtstruct']} ({summary['backend']}); "
               f"Dice against the reference GTV = {summary['metrics']['dice']:.3f}", err=True)


# ---------------------------------------------------------------- evaluate
@cli.command()
@click.argument("pred", type=click.Path(exists=True, path_type=Path))
@click.argument("gt", type=click.Path(exists=True, path_type=Path))
@click.option("--series", "series_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The image series, needed when PRED or GT is an RTSTRUCT.")
@click.option("--roi", help="ROI name in GT (and in PRED unless --pred-roi) when they are RTSTRUCTs.")
@click.option("--pred-roi", help="ROI name in PRED when it differs from --roi.")
def evaluate(pred: Path, gt: Path, series_dir: Path | None, roi: str | None, pred_roi: str | None) -> None:
    """Compare two masks or RTSTRUCT ROIs: Dice, HD95, MSD, NSD@2mm, COM distance, volume ratio."""
    from pipeline.evaluate import evaluate_files

    emit(evaluate_files(pred, gt, series_dir=series_dir, roi=roi, pred_roi=pred_roi))


# ---------------------------------------------------------------- convert
@cli.command()
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.argument("dest", type=click.Path(path_type=Path))
@click.option("--series", "series_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Image series for RTSTRUCT -> masks or masks -> RTSTRUCT.")
@click.option("--roi-name", default=None, help="ROI name when writing an RTSTRUCT from a mask file.")
@click.option("--normalise/--raw", default=False, help="NPZ: store windowed/normalised [0,1] intensities.")
@config_option
def convert(source: Path, dest: Path, series_dir: Path | None, roi_name: str | None, normalise: bool,
            config_path: Path | None) -> None:
    """Convert between DICOM series, NPZ/NIfTI/MHA volumes, masks and RTSTRUCT.

    \b
    SERIES_DIR|.nii|.mha|.npz  -> .npz|.nii.gz|.mha        volume
    RTSTRUCT --series DIR      -> .npz|.nii.gz|.mha|DIR/   masks (label map, or one file per ROI)
    MASK --series DIR          -> .dcm                      RTSTRUCT
    """
    from pipeline.convert import convert_any

    config = load(config_path)
    emit(convert_any(source, dest, series_dir=series_dir, roi_name=roi_name, normalise=normalise,
                      config=config))


# ---------------------------------------------------------------- track
@cli.command()
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for targets/<case>_labels.mha and <case>_tracking.csv.")
@click.option("--first-label", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="First-frame mask (default: SOURCE/targets/*_first_label.mha).")
@backend_option
@checkpoint_option
@config_option
def track(source: Path, out_dir: Path, first_label: Path | None, backend: str | None, checkpoint: Path | None,
          config_path: Path | None) -> None:
    """Track a first-frame mask through a cine-MR sequence (TrackRAD2025 layout or DICOM time series)."""
    from pipeline.track import track_case

    config = load(config_path, **{"propagation.backend": backend, "propagation.checkpoint": checkpoint})
    summary = track_case(source, out_dir, first_label=first_label, settings=config.propagation)
    emit(dataclasses.asdict(summary))


# ---------------------------------------------------------------- the node and its services
@cli.command()
@config_option
@storage_option
@click.option("--port", type=int, help="DICOM port to listen on.")
@click.option("--ae-title", help="The node's AE title.")
@click.option("--allow-ae", "allow_aes", multiple=True, help="Calling AE allowed to associate (repeatable).")
@click.option("--destination", help="AE@HOST:PORT where the result of every job this node receives goes "
              "(replaces the file's routes; kept on each job, so `rtprop worker`s need no routes).")
@click.option("--workers", type=click.IntRange(min=0),
              help="Jobs run at once in this process (default: pipeline.workers; 0 = receive and complete only, "
              "run `rtprop worker` apart).")
@click.option("--dropin/--no-dropin", "dropin_on", default=None,
              help="Watch the drop-in inbox (default: dropin.enabled).")
@click.option("--scheduler/--no-scheduler", "scheduler_on", default=None,
              help="Run the nightly batch in its window (default: batch.enabled).")
@click.option("--http-port", type=click.IntRange(1, 65535),
              help="Serve the web app on this port in the same process (default: web.port; none if unset).")
def serve(config_path: Path | None, storage: Path | None, port: int | None, ae_title: str | None,
          allow_aes: tuple[str, ...], destination: str | None, workers: int | None, dropin_on: bool | None,
          scheduler_on: bool | None, http_port: int | None) -> None:
    """Run the node: Storage SCP, series completion, outbound queue, workers, drop-in watcher, nightly batch."""
    from dicom_node.routing import with_destination
    from dicom_node.service import check_port, serve_forever
    from pipeline.delivery import prompt_again_handler
    from pipeline.discovery import jobs_on_completion
    from pipeline.dropin import start_dropin
    from pipeline.scheduler import start_scheduler

    _service_logging()
    overrides: dict[str, Any] = {"node.port": port, "node.ae_title": ae_title,
                                 "node.allowed_calling_aes": list(allow_aes) or None, "web.port": http_port}
    config = load(config_path, storage, **overrides)
    if destination:
        config = with_destination(config, destination)
        log.info("--destination %s: the result of every job this node receives goes there (the configuration "
                 "file's routes are not used)", destination)
    stop = threading.Event()
    factory = open_node(config, create=True)
    check_port(config)  # ports in use are start-up errors naming them, before any worker starts
    if config.web.port:
        from web.server import listen_socket

        listen_socket(config).close()
    threads = start_job_workers(factory, config, stop, workers)
    if config.dropin.enabled if dropin_on is None else dropin_on:
        threads.append(start_dropin(factory, config, stop))
    if config.batch.enabled if scheduler_on is None else scheduler_on:
        config.batch.enabled = True
        threads.append(start_scheduler(factory, config, stop))
    threads += start_web_and_heartbeats(factory, config, stop, threads)
    try:
        # returns on SIGTERM/SIGINT, having set `stop`; the jobs of completed series get this node's routes
        serve_forever(config, stop, on_series_complete=jobs_on_completion(config),
                      on_duplicate=prompt_again_handler(factory, config))
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=config.pipeline.job_timeout_s if t.name.startswith("rtprop-worker") else 10)


def start_job_workers(factory, config: Config, stop: threading.Event, count: int | None = None,  # type: ignore[no-untyped-def]
                      queues: tuple[str, ...] = ()) -> list[threading.Thread]:
    """The job workers of a process: SQLite, `count` polling threads (pipeline/worker.py); PostgreSQL, one
    job-engine worker running `count` jobs at once on `queues` (all by default) plus housekeeping
    (pipeline/tasks.py). No thread when `count` is 0."""
    count = config.pipeline.workers if count is None else count
    if count == 0:
        return []
    if not config.database.url:
        from pipeline.worker import start_workers

        return start_workers(factory, config, stop, count)
    from pipeline.tasks import run_engine_worker, start_housekeeping, worker_queues

    chosen = worker_queues(queues)
    engine = threading.Thread(target=run_engine_worker, args=(factory, config, stop),
                              kwargs={"queues": chosen, "concurrency": count}, name="rtprop-worker-engine",
                              daemon=True)
    engine.start()
    return [engine, start_housekeeping(factory, config, stop)]


@cli.command()
@config_option
@storage_option
@click.option("--workers", type=click.IntRange(min=1), help="Jobs run at once (default: pipeline.workers); "
              "the same as --concurrency.")
@click.option("--concurrency", type=click.IntRange(min=1), help="Jobs run at once (default: pipeline.workers; "
              "jobs of the gpu queue run one at a time, beside the others).")
@click.option("--queues", "queues", multiple=True, help="Distributed mode: the job engine's queues to take work "
              "from, repeatable or comma-separated: cpu, gpu, sends, batch (default: all).")
@click.option("--once", is_flag=True, help="Run every job that can run now, then exit (else run until SIGTERM); "
              "jobs still waiting for their images are counted as received. SQLite mode only.")
def worker(config_path: Path | None, storage: Path | None, workers: int | None, concurrency: int | None,
           queues: tuple[str, ...], once: bool) -> None:
    """Run job workers alone (more cores or machines on one storage): discover, claim, propagate, hand on.

    With database.url (PostgreSQL) this is a worker of the job engine on any machine that reaches the
    database and the archive (docs/scaling.md); SIGTERM drains it: running jobs finish, no new one starts.
    """
    from pipeline.worker import Worker

    _service_logging()
    config = load(config_path, storage)
    chosen = tuple(q.strip() for spec in queues for q in spec.split(",") if q.strip())
    if chosen and not config.database.url:
        raise UserError("--queues: queues are the job engine's, in the distributed mode (set database.url to a "
                        "PostgreSQL database); the SQLite mode runs every job in one loop")
    if once and config.database.url:
        raise UserError("--once is for the SQLite mode; in the distributed mode a worker runs until SIGTERM "
                        "(which drains it)")
    factory = open_node(config)
    if once:
        Worker(factory, config).drain()
        emit(_job_counts(factory))
        return
    stop = threading.Event()
    threads = start_job_workers(factory, config, stop, concurrency or workers, chosen)
    threads += start_web_and_heartbeats(factory, config, stop, threads, node=False)
    mode = f"queues {','.join(chosen) or 'all'}, database {config.database.url.split('@')[-1]}" \
        if config.database.url else f"storage {config.storage.root}"
    click.echo(f"rtprop worker ready ({concurrency or workers or config.pipeline.workers} at a time, {mode})",
               err=True)
    run_until_signal(stop, threads, config.pipeline.job_timeout_s)


def _job_counts(factory) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    from pipeline.jobs import counts

    with factory() as session:
        return {"jobs": counts(session)}


@cli.command()
@config_option
@storage_option
@click.option("--once", is_flag=True, help="Take in every entry of the inbox (waiting until each is stable for "
              "dropin.stable_s), then exit.")
def dropin(config_path: Path | None, storage: Path | None, once: bool) -> None:
    """Watch the drop-in inbox (and close series) without the DICOM listener; `rtprop worker` runs the jobs."""
    from pipeline.dropin import DropIn

    _service_logging()
    config = load(config_path, storage)
    # a receiving process like `serve`: it may start a node where the drop-in inbox is (never at a mistyped path)
    factory = open_node(config, create=Path(config.dropin.inbox).is_dir())
    watcher = DropIn(factory, config)
    if once:
        outcomes = watcher.take_all()
        emit({"taken": [o.name for o in outcomes if o.ok], "quarantined": [o.name for o in outcomes if not o.ok],
               "left_in_inbox": sorted(watcher.pending())})
        return
    stop = threading.Event()
    threads = [threading.Thread(target=watcher.run, args=(stop,), daemon=True),
               threading.Thread(target=watcher.completion.run, args=(stop, config.node.poll_interval_s), daemon=True)]
    for t in threads:
        t.start()
    click.echo(f"rtprop dropin watching {watcher.paths.inbox}", err=True)
    run_until_signal(stop, threads)


@cli.command()
@config_option
@storage_option
@click.option("--since", type=ISO_DATE, help="Only RTSTRUCTs received from this ISO 8601 date or date-time "
              "(e.g. 2026-11-30; UTC unless an offset is given).")
@click.option("--until", type=ISO_DATE, help="... and before this ISO 8601 date or date-time.")
@click.option("--roi-regex", type=REGEX, help="ROIs to re-contour: case-insensitive full match (default: "
              "batch.roi_regex).")
@click.option("--send/--no-send", default=None, help="Queue the new RTSTRUCTs to the case's destination "
              "(default: batch.send_results; delivered by `rtprop serve`).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Report folder (default: batch.out under the storage root); each run in a time-stamped subfolder.")
@click.option("--no-progress", is_flag=True, help="No progress bar (cron, logs).")
@click.option("--distributed", is_flag=True, help="Put one item per study on the job engine's low-priority batch "
              "queue and return (needs database.url); workers write the report in the run folder.")
def batch(config_path: Path | None, storage: Path | None, since: datetime | None, until: datetime | None,
          roi_regex: str | None, send: bool | None, out_dir: Path | None, no_progress: bool,
          distributed: bool) -> None:
    """Re-contour archived ROIs from their middle slice with the current model; write a drift report."""
    from pipeline.batch import queue_batch, run_batch

    config = load(config_path, storage)
    if distributed and not config.database.url:
        raise UserError("--distributed needs database.url (a PostgreSQL database shared with `rtprop worker`s)")
    factory = open_node(config)
    if distributed:
        emit(queue_batch(factory, config, since=since, until=until, roi_regex=roi_regex, send=send, out=out_dir))
        return
    emit(run_batch(factory, config, since=since, until=until, roi_regex=roi_regex, send=send, out=out_dir,
                    progress=not no_progress))


# ---------------------------------------------------------------- jobs
@cli.group()
def jobs() -> None:
    """List, show and retry jobs."""


@jobs.command("list")
@config_option
@storage_option
@click.option("--state", type=click.Choice(STATES), help="Only jobs in this state.")
def jobs_list(config_path: Path | None, storage: Path | None, state: str | None) -> None:
    """One JSON line per job: id, state, calling AE, when, what it waits for or why it failed."""
    from sqlalchemy import select

    from db.schema import Job

    factory = open_node(load(config_path, storage))
    with factory() as session:
        stmt = select(Job).order_by(Job.id)
        if state:
            stmt = stmt.where(Job.state == state)
        for job in session.execute(stmt).scalars():
            emit({"id": job.id, "state": job.state, "calling_ae": job.calling_ae, "created_at": job.created_at,
                   "updated_at": job.updated_at, "study_instance_uid": job.study_instance_uid,
                   "waiting_for": job.waiting_for, "error": job.error[:300], "attempts": job.attempts})


@jobs.command("show")
@click.argument("job_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="One JSON line (for scripts; the default when stdout is not a "
              "terminal); on a terminal the same, indented.")
@config_option
@storage_option
def jobs_show(job_id: int, as_json: bool, config_path: Path | None, storage: Path | None) -> None:
    """Everything about one job: its row, where its result goes, its sends (every attempt's outcome) and its
    audit timeline."""
    from sqlalchemy import select

    from db.audit import query
    from db.schema import Job, Send
    from pipeline.delivery import destination_text

    config = load(config_path, storage)
    factory = open_node(config)
    with factory() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise UserError(f"no job {job_id}")
        row = {c.name: getattr(job, c.name) for c in Job.__table__.columns}
        row["destination"] = destination_text(config, job)
        sends = [{c.name: getattr(s, c.name) for c in Send.__table__.columns}
                 for s in session.execute(select(Send).where(Send.job_id == job_id)).scalars()]
        timeline = [{"at": e.at, "event": e.event, "details": json.loads(e.details)}
                    for e in query(session, job_id=job_id)]
    shown = {"job": row, "sends": sends, "audit": timeline}
    if as_json or not sys.stdout.isatty():
        emit(shown)
    else:
        click.echo(json.dumps(shown, sort_keys=True, default=str, indent=2))


@jobs.command("retry")
@click.argument("job_id", type=int)
@click.option("--reason", default="", help="Why (written to the audit with your user name).")
@config_option
@storage_option
def jobs_retry(job_id: int, reason: str, config_path: Path | None, storage: Path | None) -> None:
    """Run a failed or dead-lettered job again (audited with the user's name)."""
    from pipeline.actions import retry

    factory = open_node(load(config_path, storage))
    done = retry(factory, job_id, getpass.getuser(), reason)
    emit({"id": done.job_id, "state": done.state, "retried_by": getpass.getuser()})


# ---------------------------------------------------------------- audit
@cli.group()
def audit() -> None:
    """Check, query and export the hash-chained audit log."""


@audit.command("verify")
@config_option
@storage_option
def audit_verify(config_path: Path | None, storage: Path | None) -> None:
    """Walk the chain and compare its end with the head anchor, and check every instance row against the
    receipt that recorded it; exit 3 naming the rows if any row was altered, removed or inserted."""
    from db import audit as audit_log
    from db.receipts import verify_all

    factory = open_node(load(config_path, storage))
    with factory() as session:  # a read: the anchor is read before the walk's snapshot, writers go on meanwhile
        count, problems, proof = verify_all(session)
    head = audit_log.head_of(factory)
    emit({"rows": count, "ok": not problems, "problems": [p.__dict__ for p in problems],
          "head": dataclasses.asdict(head) if head else None, "instances": proof.instances,
          "instances_pending": proof.pending_instances, "receipts_open": proof.pending_receipts})
    if problems:
        sys.exit(3)


@audit.command("head")
@config_option
@storage_option
def audit_head(config_path: Path | None, storage: Path | None) -> None:
    """Print the chain's head (last row id and hash) on one line: send it to an external witness (syslog)."""
    from db import audit as audit_log
    from db.schema import utcnow

    head = audit_log.head_of(open_node(load(config_path, storage)))
    emit({"at": utcnow().isoformat(timespec="seconds"),
           **(dataclasses.asdict(head) if head else {"row_id": 0, "hash": audit_log.GENESIS})})


@audit.command("export")
@config_option
@storage_option
@click.option("--since", type=ISO_DATE, help="ISO 8601 date or date-time, inclusive (UTC unless an offset is given).")
@click.option("--until", type=ISO_DATE, help="ISO 8601 date or date-time, exclusive.")
@click.option("--event", help="Only this event, e.g. job.sent.")
@click.option("--job", "job_id", type=int, help="Only this job.")
@click.option("--study", "study_uid", help="Only this StudyInstanceUID.")
@click.option("--ae", "calling_ae", help="Only this AE title.")
@click.option("--patient-id", help="Every row of this patient (receive, jobs, sends), matched by its hash; the ID "
              "itself is never stored.")
@click.option("--csv", "as_csv", is_flag=True, help="CSV instead of JSON lines.")
def audit_export(config_path: Path | None, storage: Path | None, since: datetime | None, until: datetime | None,
                 event: str | None, job_id: int | None, study_uid: str | None, calling_ae: str | None,
                 patient_id: str | None, as_csv: bool) -> None:
    """Print audit rows matching the filters (JSON lines, or CSV with --csv)."""
    from db import audit as audit_log

    factory = open_node(load(config_path, storage))
    with factory() as session:
        rows = audit_log.query(session, since=since, until=until, event=event, job_id=job_id,
                               study_instance_uid=study_uid, calling_ae=calling_ae, patient_id=patient_id)
        if as_csv:
            audit_log.write_csv(rows, sys.stdout)
            return
        for row in rows:
            click.echo(json.dumps({c: getattr(row, c) for c in ("id",) + audit_log.CHAINED_FIELDS + ("hash",)}))


# ---------------------------------------------------------------- web app (cli/web_app.py)
from cli.web_app import start_web_and_heartbeats, users as _users, web as _web  # noqa: E402 - after `cli`

cli.add_command(_web)
cli.add_command(_users)

from cli.model_lifecycle import finetune, models  # noqa: E402  (fine-tuning and the model registry)

cli.add_command(finetune)
cli.add_command(models)


# ---------------------------------------------------------------- entry point
def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors -> one line + exit 2; the unexpected -> exit 1."""
    try:
        cli.main(args=argv, prog_name="rtprop", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("rtprop: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (UserError, FileNotFoundError, PermissionError, NotADirectoryError) as exc:
        click.echo(f"rtprop: error: {exc}", err=True)
        sys.exit(2)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: no crash trace for users
        if os.environ.get("RTPROP_DEBUG"):
            raise
        click.echo(f"rtprop: internal error: {type(exc).__name__}: {exc} (RTPROP_DEBUG=1 shows the traceback)",
                   err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
