"""`rtprop`: one command line over the converters, the propagators, the node and the pipeline.

Every subcommand is a thin shell over library functions. Errors a user can fix print one clear
line and exit 2; anything unexpected exits 1 (set RTPROP_DEBUG=1 for the traceback).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from config.load import ConfigError, load_config, resolve_storage
from config.schema import Config

log = logging.getLogger("rtprop")


# ---------------------------------------------------------------- shared option handling
def _config(config_path: Path | None, storage: Path | None = None, **overrides: Any) -> Config:
    tree: dict[str, Any] = {}
    if storage is not None:
        tree["storage"] = {"root": str(storage)}
    for dotted, value in overrides.items():
        if value is None or value == () or value == []:
            continue
        node = tree
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return resolve_storage(load_config(config_path, overrides=tree))


def _emit(summary: dict[str, Any]) -> None:
    click.echo(json.dumps(summary, sort_keys=True, default=str))


config_option = click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
                             help="YAML configuration file (see config/example.yaml).")
storage_option = click.option("--storage", type=click.Path(file_okay=False, path_type=Path),
                              help="Storage root: archive, quarantine and database live under it.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.version_option(package_name="rtprop")
def cli(verbose: int) -> None:
    """rtprop: propagate a one-slice prompt through a CT/MR volume and return an RTSTRUCT."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# ---------------------------------------------------------------- propagate
def parse_box(text: str) -> tuple[int, int, int, int, int]:
    """`Z,X0,Y0,X1,Y1` -> (z, x0, y0, x1, y1)."""
    parts = [p.strip() for p in text.split(",")]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError as exc:
        raise click.BadParameter(f"box {text!r}: indices must be integers") from exc
    if len(values) != 5:
        raise click.BadParameter(f"box {text!r}: expected Z,X0,Y0,X1,Y1")
    return values  # type: ignore[return-value]


def parse_point(text: str) -> tuple[int, int, int, bool]:
    """`Z,X,Y[,+|-]` -> (z, x, y, positive)."""
    parts = [p.strip() for p in text.split(",")]
    sign = True
    if len(parts) == 4:
        if parts[3] not in ("+", "-"):
            raise click.BadParameter(f"point {text!r}: the fourth field must be + or -")
        sign = parts[3] == "+"
        parts = parts[:3]
    if len(parts) != 3:
        raise click.BadParameter(f"point {text!r}: expected Z,X,Y or Z,X,Y,+|-")
    try:
        z, x, y = (int(p) for p in parts)
    except ValueError as exc:
        raise click.BadParameter(f"point {text!r}: indices must be integers") from exc
    return z, x, y, sign


def build_prompt(box: str | None, points: tuple[str, ...], mask_file: Path | None, slice_index: int | None,
                 shape_zyx: tuple[int, ...]):
    """The prompt the flags describe; exactly one of --box, --point, --mask."""
    from models.prompts import BoxPrompt, MaskPrompt, PointPrompt, PromptError

    given = sum(bool(x) for x in (box, points, mask_file))
    if given != 1:
        raise click.UsageError("give exactly one prompt: --box, --point (repeatable) or --mask with --slice")
    if box:
        z, x0, y0, x1, y1 = parse_box(box)
        return BoxPrompt(z, x0, y0, x1, y1)
    if points:
        parsed = [parse_point(p) for p in points]
        slices = {p[0] for p in parsed}
        if len(slices) != 1:
            raise PromptError(f"all points must be on one slice; got slices {sorted(slices)}")
        return PointPrompt(parsed[0][0], tuple((x, y, s) for _, x, y, s in parsed))
    if slice_index is None:
        raise click.UsageError("--mask needs --slice Z")
    from converters.volume_io import read_mask

    mask = read_mask(mask_file)
    if mask.ndim == 3:
        if mask.shape != tuple(shape_zyx):
            raise PromptError(f"mask {mask_file} has shape {mask.shape}, the volume {tuple(shape_zyx)}")
        if not 0 <= slice_index < mask.shape[0]:
            raise PromptError(f"--slice {slice_index} is outside the mask's 0..{mask.shape[0] - 1}")
        mask = mask[slice_index]
    return MaskPrompt(slice_index, mask.astype(bool))


@cli.command()
@click.argument("volume", type=click.Path(exists=True, path_type=Path))
@click.option("--box", help="Z,X0,Y0,X1,Y1: a rectangle on slice Z (X along columns, Y along rows).")
@click.option("--point", "points", multiple=True, help="Z,X,Y[,+|-]: a click on slice Z; repeat for more.")
@click.option("--mask", "mask_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A mask file on VOLUME's grid (or a 2D mask); its slice --slice is the prompt.")
@click.option("--slice", "slice_index", type=int, help="The slice of --mask to use.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Output mask on VOLUME's grid: .nii.gz, .mha or .npz.")
@click.option("--backend", type=click.Choice(["auto", "sam2", "classic"]), help="Default: config (auto).")
@click.option("--checkpoint", type=click.Path(path_type=Path), help="SAM2 checkpoint file (never downloaded).")
@config_option
def propagate(volume: Path, box: str | None, points: tuple[str, ...], mask_file: Path | None,
              slice_index: int | None, out: Path, backend: str | None, checkpoint: Path | None,
              config_path: Path | None) -> None:
    """Propagate a prompt on one slice of VOLUME through the whole volume."""
    from converters.volume_io import read_volume, write_mask
    from models.propagate import propagate as run

    config = _config(config_path, **{"propagation.backend": backend, "propagation.checkpoint": checkpoint})
    started = time.perf_counter()
    vol = read_volume(volume)
    prompt = build_prompt(box, points, mask_file, slice_index, vol.array.shape)
    result = run(vol.array, vol.geometry.spacing_zyx, prompt, vol.modality, config.propagation)
    write_mask(out, result.mask, vol.geometry)
    _emit(_mask_summary(result, vol, out, time.perf_counter() - started))


def _mask_summary(result, vol, out: Path, seconds: float) -> dict[str, Any]:
    slices = [int(z) for z in result.mask.any(axis=(1, 2)).nonzero()[0]]
    voxel_ml = float(abs(vol.geometry.spacing_mm[0] * vol.geometry.spacing_mm[1] * vol.geometry.spacing_mm[2])) / 1000.0
    return {
        "out": str(out),
        "backend": result.backend,
        "modality": vol.modality or "unknown",
        "checkpoint_sha256": result.checkpoint_sha256,
        "slices": [slices[0], slices[-1]] if slices else [],
        "voxels": int(result.mask.sum()),
        "volume_ml": round(float(result.mask.sum()) * voxel_ml, 3),
        "seconds": round(seconds, 3),
    }


# ---------------------------------------------------------------- recontour / demo
@cli.command()
@click.argument("series_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("rtstruct", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--roi", required=True, help="Name of the contoured ROI to re-propagate (case-insensitive).")
@click.option("--prompt", "prompt_kind", type=click.Choice(["box", "point", "mask"]), default="box", show_default=True)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--backend", type=click.Choice(["auto", "sam2", "classic"]))
@click.option("--checkpoint", type=click.Path(path_type=Path))
@config_option
def recontour(series_dir: Path, rtstruct: Path, roi: str, prompt_kind: str, out_dir: Path,
              backend: str | None, checkpoint: Path | None, config_path: Path | None) -> None:
    """Re-propagate ROI from its middle slice; write a new RTSTRUCT and metrics in OUT."""
    from pipeline.recontour import recontour as run

    config = _config(config_path, **{"propagation.backend": backend, "propagation.checkpoint": checkpoint})
    _emit(run(series_dir, rtstruct, roi, prompt_kind, out_dir, config))


DEMO_CASE = Path(__file__).resolve().parents[1] / "demo" / "sts-001-ct"


@cli.command()
@click.option("--out", "out_dir", default=Path("demo-out"), show_default=True,
              type=click.Path(file_okay=False, path_type=Path))
@click.option("--backend", type=click.Choice(["auto", "sam2", "classic"]))
@config_option
def demo(out_dir: Path, backend: str | None, config_path: Path | None) -> None:
    """Run the main job on the bundled real CT: GTV box prompt in, RTSTRUCT out, Dice printed."""
    from pipeline.recontour import recontour as run

    if not DEMO_CASE.is_dir():
        raise click.ClickException(f"bundled demo case not found at {DEMO_CASE}")
    config = _config(config_path, **{"propagation.backend": backend})
    summary = run(DEMO_CASE / "image", DEMO_CASE / "rtstruct" / "RS.dcm", "GTV_Mass_CT", "box", out_dir, config)
    _emit(summary)
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

    _emit(evaluate_files(pred, gt, series_dir=series_dir, roi=roi, pred_roi=pred_roi))


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

    config = _config(config_path)
    _emit(convert_any(source, dest, series_dir=series_dir, roi_name=roi_name, normalise=normalise,
                      config=config))


# ---------------------------------------------------------------- track
@cli.command()
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--first-label", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="First-frame mask (default: SOURCE/targets/*_first_label.mha).")
@click.option("--backend", type=click.Choice(["auto", "sam2", "classic"]))
@click.option("--checkpoint", type=click.Path(path_type=Path))
@config_option
def track(source: Path, out_dir: Path, first_label: Path | None, backend: str | None, checkpoint: Path | None,
          config_path: Path | None) -> None:
    """Track a first-frame mask through a cine-MR sequence (TrackRAD2025 layout or DICOM time series)."""
    from models.tracking import track_case

    config = _config(config_path, **{"propagation.backend": backend, "propagation.checkpoint": checkpoint})
    summary = track_case(source, out_dir, first_label=first_label, settings=config.propagation)
    _emit(dataclasses.asdict(summary))


# ---------------------------------------------------------------- serve
@cli.command()
@config_option
@storage_option
@click.option("--port", type=int, help="DICOM port to listen on.")
@click.option("--ae-title", help="The node's AE title.")
@click.option("--allow-ae", "allow_aes", multiple=True, help="Calling AE allowed to associate (repeatable).")
@click.option("--destination", help="AE@HOST:PORT where results go by default.")
@click.option("--workers", type=click.IntRange(min=0),
              help="Worker threads running jobs (default: pipeline.workers; 0 = node only, run `rtprop worker` apart).")
@click.option("--dropin/--no-dropin", "dropin_on", default=None,
              help="Watch the drop-in inbox (default: dropin.enabled).")
@click.option("--scheduler/--no-scheduler", "scheduler_on", default=None,
              help="Run the nightly batch in its window (default: batch.enabled).")
def serve(config_path: Path | None, storage: Path | None, port: int | None, ae_title: str | None,
          allow_aes: tuple[str, ...], destination: str | None, workers: int | None, dropin_on: bool | None,
          scheduler_on: bool | None) -> None:
    """Run the node: Storage SCP, series completion, outbound queue, workers, drop-in watcher, nightly batch."""
    import threading

    from db.engine import open_database
    from dicom_node.service import serve_forever
    from pipeline.dropin import start_dropin
    from pipeline.scheduler import start_scheduler
    from pipeline.worker import start_workers

    overrides: dict[str, Any] = {"node.port": port, "node.ae_title": ae_title,
                                 "node.allowed_calling_aes": list(allow_aes) or None}
    if destination:
        overrides["node.destinations"] = {"default": parse_destination(destination)}
        overrides["node.default_destination"] = "default"
    config = _config(config_path, storage, **overrides)
    stop = threading.Event()
    factory = open_database(config.storage.database)
    threads = start_workers(factory, config, stop, workers)
    if config.dropin.enabled if dropin_on is None else dropin_on:
        threads.append(start_dropin(factory, config, stop))
    if config.batch.enabled if scheduler_on is None else scheduler_on:
        config.batch.enabled = True
        threads.append(start_scheduler(factory, config, stop))
    try:
        serve_forever(config, stop)  # returns on SIGTERM/SIGINT, having set `stop`
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=config.pipeline.job_timeout_s if t.name.startswith("rtprop-worker") else 10)


@cli.command()
@config_option
@storage_option
@click.option("--workers", type=click.IntRange(min=1), help="Worker threads (default: pipeline.workers).")
@click.option("--once", is_flag=True, help="Run until no job is pending, then exit (else run until SIGTERM).")
def worker(config_path: Path | None, storage: Path | None, workers: int | None, once: bool) -> None:
    """Run job workers alone (more cores or machines on one storage): discover, claim, propagate, hand on."""
    import signal
    import threading

    from db.engine import open_database
    from pipeline.worker import Worker, start_workers

    config = _config(config_path, storage)
    factory = open_database(config.storage.database)
    if once:
        Worker(factory, config).drain()
        _emit(_job_counts(factory))
        return
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    threads = start_workers(factory, config, stop, workers)
    click.echo(f"rtprop worker ready ({len(threads)} worker(s), storage {config.storage.root})", err=True)
    while not stop.wait(0.5):
        pass
    for t in threads:
        t.join(timeout=config.pipeline.job_timeout_s)


def _job_counts(factory) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    from pipeline.jobs import counts

    with factory() as session:
        return {"jobs": counts(session)}


@cli.command()
@config_option
@storage_option
@click.option("--once", is_flag=True, help="Take in what is stable now, then exit.")
def dropin(config_path: Path | None, storage: Path | None, once: bool) -> None:
    """Watch the drop-in inbox (and close series) without the DICOM listener; `rtprop worker` runs the jobs."""
    import signal
    import threading

    from db.engine import open_database
    from dicom_node.completion import CompletionChecker
    from pipeline.dropin import DropIn

    config = _config(config_path, storage)
    factory = open_database(config.storage.database)
    watcher = DropIn(factory, config)
    checker = CompletionChecker(factory, config)
    if once:
        outcomes = watcher.scan(now=float("inf"))
        checker.check()
        _emit({"taken": [o.name for o in outcomes if o.ok], "quarantined": [o.name for o in outcomes if not o.ok]})
        return
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    threads = [threading.Thread(target=watcher.run, args=(stop,), daemon=True),
               threading.Thread(target=checker.run, args=(stop, config.node.poll_interval_s), daemon=True)]
    for t in threads:
        t.start()
    click.echo(f"rtprop dropin watching {watcher.paths.inbox}", err=True)
    while not stop.wait(0.5):
        pass
    for t in threads:
        t.join(timeout=10)


@cli.command()
@config_option
@storage_option
@click.option("--since", help="Only RTSTRUCTs received from this ISO date/time (UTC unless an offset is given).")
@click.option("--until", help="... and before this ISO date/time.")
@click.option("--roi-regex", help="ROIs to re-contour: case-insensitive full match (default: batch.roi_regex).")
@click.option("--send/--no-send", default=None, help="Queue the new RTSTRUCTs to the case's destination "
              "(default: batch.send_results; delivered by `rtprop serve`).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Report folder (default: batch.out under the storage root); each run in a time-stamped subfolder.")
@click.option("--no-progress", is_flag=True, help="No progress bar (cron, logs).")
def batch(config_path: Path | None, storage: Path | None, since: str | None, until: str | None,
          roi_regex: str | None, send: bool | None, out_dir: Path | None, no_progress: bool) -> None:
    """Re-contour archived ROIs from their middle slice with the current model; write a drift report."""
    from db.engine import open_database
    from pipeline.batch import run_batch

    config = _config(config_path, storage)
    if not config.storage.database.exists():
        raise click.ClickException(f"no database at {config.storage.database}")
    factory = open_database(config.storage.database)
    _emit(run_batch(factory, config, since=since, until=until, roi_regex=roi_regex, send=send, out=out_dir,
                    progress=not no_progress))


def parse_destination(text: str) -> dict[str, Any]:
    """`AE@HOST:PORT` -> {"ae_title", "host", "port"}."""
    try:
        ae, rest = text.split("@", 1)
        host, port = rest.rsplit(":", 1)
        return {"ae_title": ae, "host": host, "port": int(port)}
    except ValueError as exc:
        raise click.BadParameter(f"destination {text!r} must be AE@HOST:PORT") from exc


# ---------------------------------------------------------------- audit
@cli.group()
def audit() -> None:
    """Check, query and export the hash-chained audit log."""


def _audit_session(config_path: Path | None, storage: Path | None):
    from db.engine import open_database, transaction

    config = _config(config_path, storage)
    if not config.storage.database.exists():
        raise click.ClickException(f"no database at {config.storage.database}")
    return transaction(open_database(config.storage.database))


@audit.command("verify")
@config_option
@storage_option
def audit_verify(config_path: Path | None, storage: Path | None) -> None:
    """Walk the chain; exit 3 and name the rows if any row was altered, removed or inserted."""
    from db import audit as audit_log

    with _audit_session(config_path, storage) as session:
        count, problems = audit_log.verify(session)
    _emit({"rows": count, "ok": not problems, "problems": [p.__dict__ for p in problems]})
    if problems:
        sys.exit(3)


@audit.command("export")
@config_option
@storage_option
@click.option("--since", help="ISO date/time (UTC), inclusive.")
@click.option("--until", help="ISO date/time (UTC), exclusive.")
@click.option("--event")
@click.option("--job", "job_id", type=int)
@click.option("--study", "study_uid")
@click.option("--ae", "calling_ae")
@click.option("--patient-id", help="Matched by its hash; the ID itself is never stored.")
@click.option("--csv", "as_csv", is_flag=True, help="CSV instead of JSON lines.")
def audit_export(config_path: Path | None, storage: Path | None, since: str | None, until: str | None,
                 event: str | None, job_id: int | None, study_uid: str | None, calling_ae: str | None,
                 patient_id: str | None, as_csv: bool) -> None:
    """Print audit rows matching the filters (JSON lines, or CSV with --csv)."""
    from db import audit as audit_log

    with _audit_session(config_path, storage) as session:
        rows = audit_log.query(session, since=since, until=until, event=event, job_id=job_id,
                               study_instance_uid=study_uid, calling_ae=calling_ae, patient_id=patient_id)
        if as_csv:
            audit_log.write_csv(rows, sys.stdout)
            return
        for row in rows:
            click.echo(json.dumps({c: getattr(row, c) for c in ("id",) + audit_log.CHAINED_FIELDS + ("hash",)}))


from pipeline.cli_models import finetune, models  # noqa: E402  (fine-tuning and the model registry)

cli.add_command(finetune)
cli.add_command(models)


# ---------------------------------------------------------------- entry point
def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors -> one line + exit 2; the unexpected -> exit 1."""
    from converters.errors import ConversionError
    from models.prompts import PromptError

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
    except (ConfigError, ConversionError, PromptError, FileNotFoundError, PermissionError) as exc:
        click.echo(f"rtprop: error: {exc}", err=True)
        sys.exit(2)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: no crash trace for users
        if os.environ.get("RTPROP_DEBUG"):
            raise
        known = type(exc).__name__.endswith("Error") and type(exc).__module__.split(".")[0] in (
            "models", "converters", "pipeline", "dicom_node", "db", "config")
        click.echo(f"rtprop: {'error' if known else 'internal error'}: {type(exc).__name__}: {exc}", err=True)
        sys.exit(2 if known else 1)


if __name__ == "__main__":
    main()
