"""Nightly batch re-contouring: re-propagate archived ROIs with the current model and report drift.

For every archived RTSTRUCT received in [since, until) whose image series is complete, each ROI
contoured on more than one slice and matching the ROI regex (TG-263 names, case-insensitive full
match) is re-propagated from its middle slice by `pipeline.recontour.recontour` (the same steps
as `rtprop recontour`). Outputs under OUT/<run>/: one RTSTRUCT per ROI (not sent unless asked),
drift.csv (Dice, HD95, MSD, volume ratio per ROI) and montage.png of the worst ROIs. Progress in
the terminal (tqdm); every run and ROI is audited (batch.started, batch.roi, batch.finished).

Sent (`--send`, batch.send_results), each new RTSTRUCT becomes a job of kind `batch` handed to the
one exit of the node (pipeline/delivery.py `deliver`): review before send, the guard's hold, the
file check, the TPS profile, the dry run and the route decided when the job is created all apply
to it as to any job's result; with review.before_send it waits in the review queue.
"""
from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import RTStructureSetStorage
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from config.errors import UserError
from config.schema import Config
from converters.files import write_atomic
from db.audit import record
from db.engine import transaction
from db.schema import AuditEntry, Instance, utcnow
from dicom_node.routing import JobRoute, route_for_job

LOG = logging.getLogger("rtprop.pipeline.batch")


@dataclass
class BatchItem:
    rtstruct_path: Path
    rtstruct_uid: str
    series_folder: Path
    series_uid: str
    study_uid: str
    calling_ae: str
    modality: str
    rois: list[str]
    patient_id_hash: str = ""
    patient: str = ""  # how reports name the patient (batch.patient_label)


def select_items(factory: sessionmaker[Session], config: Config, *, since: datetime | None, until: datetime | None,
                 roi_regex: str, study: str | None = None,
                 include_own: bool = False) -> tuple[list[BatchItem], list[dict[str, Any]]]:
    """Archived RTSTRUCTs (not our own results, unless `include_own`) with a complete image series and
    ROIs to re-contour, and the ones that cannot be re-contoured (as drift.csv rows with the error: an
    RTSTRUCT whose series is ambiguous is reported, never guessed)."""
    from pipeline.discovery import is_own_result, match_series, series_folder

    try:
        regex = re.compile(roi_regex, re.IGNORECASE)
    except re.error as exc:
        raise UserError(f"ROI regex {roi_regex!r} (--roi-regex, batch.roi_regex) is not a valid regular "
                        f"expression: {exc}") from None
    items, skipped = [], []
    with factory() as session:
        stmt = select(Instance).where(Instance.sop_class_uid == RTStructureSetStorage).order_by(Instance.id)
        if since is not None:
            stmt = stmt.where(Instance.received_at >= since)
        if until is not None:
            stmt = stmt.where(Instance.received_at < until)
        if study is not None:
            stmt = stmt.where(Instance.study_instance_uid == study)
        for inst in session.execute(stmt).scalars().all():
            try:
                ds = pydicom.dcmread(inst.path, stop_before_pixels=True, force=True)
            except Exception as exc:  # noqa: BLE001
                LOG.warning("batch: cannot read %s: %s", inst.path, exc)
                continue
            if not include_own and is_own_result(ds):
                continue
            names = [str(r.get("ROIName", "")) for r in ds.get("StructureSetROISequence", [])]
            contoured = _contoured_roi_numbers(ds)
            numbers = [int(r.ROINumber) for r in ds.get("StructureSetROISequence", [])]
            rois = [n for n, num in zip(names, numbers) if num in contoured and regex.fullmatch(n.strip())]
            if not rois:
                continue
            match = match_series(session, ds, inst.study_instance_uid)
            if match.series is None or match.series.state != "complete":
                why = (f"series {match.series.series_instance_uid} is {match.series.state}" if match.series
                       else ("" if match.ambiguous else "no ") + match.reason)
                LOG.warning("batch: RTSTRUCT %s skipped: %s", inst.sop_instance_uid, why)
                skipped.extend({"patient": patient_label(config, ds, inst.patient_id_hash),
                                "study_instance_uid": inst.study_instance_uid, "series_instance_uid": "",
                                "modality": "", "rtstruct_sop_instance_uid": inst.sop_instance_uid, "roi": roi,
                                "sent": False, "error": f"not re-contoured: {why}"} for roi in rois)
                continue
            items.append(BatchItem(Path(inst.path), inst.sop_instance_uid,
                                   series_folder(session, match.series.series_instance_uid),
                                   match.series.series_instance_uid, inst.study_instance_uid, inst.calling_ae,
                                   match.series.modality, rois, inst.patient_id_hash,
                                   patient_label(config, ds, inst.patient_id_hash)))
    return items, skipped


def patient_label(config: Config, ds: pydicom.Dataset, patient_id_hash: str) -> str:
    """A case's patient as reports name it (batch.patient_label): the hashed ID's first 12 characters, or the
    Patient ID as the TPS shows it where the site allows it."""
    if config.batch.patient_label == "patient_id" and str(ds.get("PatientID", "")).strip():
        return str(ds.PatientID).strip()
    return (patient_id_hash or "unknown")[:12]


def case_key(row: dict[str, Any]) -> str:
    """One ROI of one case, for the run's summary: patient, study, modality and ROI (ROIs of two patients never
    share a key)."""
    return f"{row.get('patient', '')}/{row['study_instance_uid']}/{row['modality']}:{row['roi']}"


def _contoured_roi_numbers(ds: pydicom.Dataset) -> set[int]:
    """ROIs with area contours on more than one plane (single-slice ROIs are prompts, not contours)."""
    out = set()
    for rc in ds.get("ROIContourSequence", []):
        planes = set()
        for c in rc.get("ContourSequence", []):
            if str(c.get("ContourGeometricType", "")).upper() == "POINT":
                continue
            data = c.get("ContourData")
            if data is not None and len(data) >= 9:
                planes.add(tuple(round(float(v), 1) for v in data[:3])[2:])  # z of the first point
        if len(planes) > 1:
            out.add(int(rc.get("ReferencedROINumber", -1)))
    return out


def run_batch(factory: sessionmaker[Session], config: Config, *, since: datetime | None = None,
              until: datetime | None = None,
              roi_regex: str | None = None, send: bool | None = None, out: Path | None = None,
              progress: bool = True, trigger: str = "cli") -> dict[str, Any]:
    """Run one batch; returns the summary (also audited). See the module doc."""
    from pipeline.report import write_csv

    roi_regex = roi_regex or config.batch.roi_regex
    send = config.batch.send_results if send is None else send
    started = utcnow()
    out_root = Path(out) if out is not None else config.batch.out
    run_dir = out_root / started.strftime("%Y%m%dT%H%M%SZ")
    run_dir.mkdir(parents=True, exist_ok=True)
    since, until = (w.astimezone(timezone.utc) if w is not None and w.tzinfo else w for w in (since, until))
    items, skipped = select_items(factory, config, since=since, until=until, roi_regex=roi_regex)
    total = sum(len(i.rois) for i in items)
    with transaction(factory) as session:
        record(session, "batch.started", component="batch", trigger=trigger, since=since, until=until,
               roi_regex=roi_regex, send=send, rtstructs=len(items), rois=total, out=str(run_dir),
               local_date=datetime.now().strftime("%Y-%m-%d"))
    rows: list[dict[str, Any]] = list(skipped)
    with transaction(factory) as session:
        for row in skipped:
            record(session, "batch.skipped", component="batch", study_instance_uid=row["study_instance_uid"],
                   sop_instance_uid=row["rtstruct_sop_instance_uid"], roi=row["roi"], error=row["error"])
    from tqdm import tqdm

    bar = tqdm(total=total, desc="rtprop batch", unit="roi", disable=not progress)  # disabled: every call a no-op
    for item in items:
        for roi in item.rois:
            row = recontour_roi(factory, config, item, roi, run_dir, send)
            rows.append(row)
            bar.update(1)
            bar.set_postfix_str(f"{roi} dice={row.get('dice', float('nan')):.3f}")
    bar.close()
    csv_path = run_dir / "drift.csv"
    write_csv(rows, csv_path)
    montage_path = make_montage(rows, config, run_dir / "montage.png") if any("dice" in r for r in rows) else None
    summary = {"out": str(run_dir), "csv": str(csv_path), "montage": str(montage_path) if montage_path else None,
               "rois": len(rows), "errors": sum(1 for r in rows if r.get("error")),
               "dice": _dice_by_case(rows)}
    with transaction(factory) as session:
        record(session, "batch.finished", component="batch", trigger=trigger, out=str(run_dir), rois=len(rows),
               errors=summary["errors"], csv=str(csv_path))
    return summary


def _dice_by_case(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Dice per case key; an ROI name twice in one study (two structure sets) is told apart by its RTSTRUCT."""
    out: dict[str, float] = {}
    for r in rows:
        if "dice" in r:
            key = case_key(r)
            out[key if key not in out else f"{key} ({r['rtstruct_sop_instance_uid']})"] = round(r["dice"], 4)
    return out


def recontour_roi(factory: sessionmaker[Session], config: Config, item: BatchItem, roi: str, run_dir: Path,
                  send: bool, routes: dict[str, JobRoute] | None = None) -> dict[str, Any]:
    """Re-contour one ROI of one archived RTSTRUCT into `run_dir`; returns its drift.csv row (audited).

    The new RTSTRUCT's UIDs derive from the run, the RTSTRUCT and the ROI: an item run twice (the job
    engine delivers at least once) writes, and hands on, the same instance. `send`: the result becomes
    a job of kind `batch` handed to the one exit (`_hand_on`), routed by `routes` (calling AE -> route,
    decided when the run was queued) or else by `config`'s routes.
    """
    from pipeline.model_routing import check_loaded, settings_for, verified_settings
    from pipeline.recontour import recontour

    safe = re.sub(r"[^A-Za-z0-9_.+-]", "_", roi)
    roi_dir = run_dir / item.series_uid / f"{item.rtstruct_uid[-12:]}-{safe}"
    t0 = time.perf_counter()
    row: dict[str, Any] = {"patient": item.patient, "study_instance_uid": item.study_uid,
                           "series_instance_uid": item.series_uid,
                           "modality": item.modality, "rtstruct_sop_instance_uid": item.rtstruct_uid,
                           "roi": roi, "sent": False,
                           "series_folder": item.series_folder, "rtstruct_path": item.rtstruct_path}
    try:
        routed = settings_for(factory, config, roi, item.modality)  # the active model for this ROI
        row["model"] = routed.name
        summary = recontour(item.series_folder, item.rtstruct_path, roi, config.batch.prompt_kind, roi_dir,
                            config.model_copy(update={"propagation": verified_settings(routed)}),
                            uid_seed=f"rtprop-batch:{run_dir.name}:{item.rtstruct_uid}:{roi}")
        check_loaded(routed, summary["checkpoint_sha256"])
        m = summary["metrics"]
        row.update(key_slice=summary["key_slice"], backend=summary["backend"], dice=m["dice"],
                   hd95_mm=m["hd95_mm"], msd_mm=m["msd_mm"], volume_ratio=m["volume_ratio"],
                   gt_volume_ml=m["gt_volume_ml"], pred_volume_ml=m["pred_volume_ml"],
                   new_rtstruct=summary["rtstruct"])
        if send:
            route = (routes or {}).get(item.calling_ae) or route_for_job(config, item.calling_ae)
            row.update(_hand_on(factory, config, item, roi, summary, route))
    except Exception as exc:  # noqa: BLE001 - one bad ROI never stops the night's run
        LOG.warning("batch: %s / %s failed: %s", item.rtstruct_uid, roi, exc)
        row["error"] = f"{type(exc).__name__}: {exc}"
    row["seconds"] = round(time.perf_counter() - t0, 3)
    with transaction(factory) as session:
        record(session, "batch.roi", component="batch", study_instance_uid=item.study_uid,
               series_instance_uid=item.series_uid, sop_instance_uid=item.rtstruct_uid,
               calling_ae=item.calling_ae, roi=roi, dice=row.get("dice"), hd95_mm=row.get("hd95_mm"),
               volume_ratio=row.get("volume_ratio"), error=row.get("error", ""), queued_send=row["sent"],
               model=row.get("model", ""), job=row.get("job"), delivery=row.get("delivery", ""))
    return row


# --------------------------------------------------------------------------- distributed (PostgreSQL)
def queue_batch(factory: sessionmaker[Session], config: Config, *, since: datetime | None = None,
                until: datetime | None = None, roi_regex: str | None = None, send: bool | None = None,
                out: Path | None = None) -> dict[str, Any]:
    """`rtprop batch --distributed`: one item per study on the low-priority `batch` queue of the job
    engine; the workers write OUT/<run>/parts/<study>.json, and the one that finishes the last study
    writes drift.csv and the montage. Returns what was queued."""
    from db import queue

    roi_regex = roi_regex or config.batch.roi_regex
    send = config.batch.send_results if send is None else send
    started = utcnow()
    run_dir = (Path(out) if out is not None else config.batch.out) / started.strftime("%Y%m%dT%H%M%SZ")
    (run_dir / "parts").mkdir(parents=True, exist_ok=True)
    since, until = (w.astimezone(timezone.utc) if w is not None and w.tzinfo else w for w in (since, until))
    items, skipped = select_items(factory, config, since=since, until=until, roi_regex=roi_regex)
    studies = sorted({i.study_uid for i in items})
    # where each calling AE's results go, decided now by this node's routes: the workers need none of their own
    routes = {ae: route_for_job(config, ae).to_json() for ae in sorted({i.calling_ae for i in items})} if send else {}
    write_atomic(run_dir / "manifest.json", json.dumps({"studies": studies, "skipped": _plain(skipped),
                                                        "roi_regex": roi_regex}).encode())
    with transaction(factory) as session:
        if not queue.enabled(session):
            raise UserError("--distributed needs database.url (PostgreSQL): the job engine's queue lives there")
        for study in studies:
            queue.defer(session, queue.TASK_BATCH, "batch", {
                "run": str(run_dir), "study": study, "since": since.isoformat() if since else None,
                "until": until.isoformat() if until else None, "roi_regex": roi_regex, "send": send,
                "routes": routes})
        record(session, "batch.started", component="batch", trigger="cli-distributed", since=since, until=until,
               roi_regex=roi_regex, send=send, rtstructs=len(items), studies=len(studies),
               rois=sum(len(i.rois) for i in items), out=str(run_dir))
    if not studies:
        _finish_run(factory, config, run_dir)
    return {"out": str(run_dir), "queued_studies": len(studies), "rois": sum(len(i.rois) for i in items),
            "skipped": len(skipped)}


def run_study(factory: sessionmaker[Session], config: Config, run: str, study: str, *, since: str | None,
              until: str | None, roi_regex: str, send: bool, routes: dict[str, dict[str, Any]] | None = None) -> str:
    """The engine task of one study: re-contour its ROIs, write parts/<study>.json, finish the run if last.
    `routes`: calling AE -> route (JSON), decided by the node that queued the run."""
    run_dir = Path(run)
    part = run_dir / "parts" / f"{study}.json"
    if not part.exists():  # a message delivered twice does the work once
        when = [datetime.fromisoformat(w) if w else None for w in (since, until)]
        items, _ = select_items(factory, config, since=when[0], until=when[1], roi_regex=roi_regex, study=study)
        decided = {ae: JobRoute.from_json(r) for ae, r in (routes or {}).items()}
        rows = [recontour_roi(factory, config, item, roi, run_dir, send, decided) for item in items
                for roi in item.rois]
        write_atomic(part, json.dumps(_plain(rows)).encode())
    _finish_run(factory, config, run_dir)
    return "done"


def _plain(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: str(v) if isinstance(v, Path) else v for k, v in r.items()} for r in rows]


def _finish_run(factory: sessionmaker[Session], config: Config, run_dir: Path) -> None:
    """When every study of the run has its part: drift.csv, the montage, `batch.finished` (once)."""
    from pipeline.report import write_csv

    manifest = json.loads((run_dir / "manifest.json").read_text())
    parts = [run_dir / "parts" / f"{s}.json" for s in manifest["studies"]]
    if not all(p.exists() for p in parts):
        return
    rows = list(manifest["skipped"]) + [r for p in parts for r in json.loads(p.read_text())]
    with transaction(factory) as session:  # under the write lock: one worker writes the report
        done = session.execute(select(AuditEntry.details).where(AuditEntry.event == "batch.finished")
                               .order_by(AuditEntry.id.desc()).limit(50)).scalars()
        if any(json.loads(d).get("out") == str(run_dir) for d in done):
            return
        csv_path = run_dir / "drift.csv"
        write_csv(rows, csv_path)
        if any("dice" in r for r in rows):
            make_montage(rows, config, run_dir / "montage.png")
        record(session, "batch.finished", component="batch", trigger="cli-distributed", out=str(run_dir),
               rois=len(rows), errors=sum(1 for r in rows if r.get("error")), csv=str(csv_path))


def _hand_on(factory: sessionmaker[Session], config: Config, item: BatchItem, roi: str, summary: dict[str, Any],
             route: JobRoute) -> dict[str, Any]:
    """--send: the new RTSTRUCT as a job of kind `batch`, handed to the one exit (pipeline/delivery.py
    `deliver`): review before send, the guard's hold, the dry run, the route and the durable send apply to
    it as to any job's result. A result that failed its file check is never handed on. Returns the
    drift.csv fields: `sent` (queued for C-STORE or delivered), `job`, `delivery` (the job's state)."""
    from pipeline.delivery import deliver
    from pipeline.jobs import create_batch_job

    check = summary["file_check"]
    if not check["ok"]:
        return {"sent": False, "delivery": "not sent: file check failed: " + "; ".join(check["problems"])[:500]}
    prompt = {"structure": roi, "kind": config.batch.prompt_kind, "slice": summary["key_slice"], "sources": [roi],
              "mode": "batch"}
    with transaction(factory) as session:
        job, created = create_batch_job(
            session, rtstruct_uid=item.rtstruct_uid, result_uid=summary["sop_instance_uid"],
            result_path=summary["rtstruct"], result_sha256=summary["sha256"], study_uid=item.study_uid,
            series_uid=item.series_uid, calling_ae=item.calling_ae, patient_id_hash=item.patient_id_hash,
            prompts=[prompt], route=route, backend=summary["backend"][:16],
            checkpoint_sha256=summary["checkpoint_sha256"] or "", file_check_dice=check.get("min_dice"))
        state = deliver(session, config, job, Path(summary["rtstruct"]),
                        implausible=[f"{roi}: {w}" for w in summary["warnings"]]) if created else job.state
    return {"sent": state in ("sending", "sent"), "job": job.id, "delivery": state}


def make_montage(rows: list[dict[str, Any]], config: Config, path: Path) -> Path:
    """PNG of the `batch.montage_cases` ROIs with the lowest Dice (image, original, new contour)."""
    from converters.rtstruct_read import read_rtstruct
    from converters.series import read_series
    from pipeline.report import MontageCase, montage

    scored = sorted((r for r in rows if "dice" in r), key=lambda r: r["dice"])[: config.batch.montage_cases]
    cases = []
    volumes: dict[str, Any] = {}
    for r in scored:
        folder, original_path = r["series_folder"], r["rtstruct_path"]
        volume = volumes.get(r["series_instance_uid"]) or read_series(folder, r["series_instance_uid"])
        volumes[r["series_instance_uid"]] = volume
        original = read_rtstruct(original_path, volume).roi(r["roi"]).mask
        new = read_rtstruct(r["new_rtstruct"], volume).rois[0].mask
        cases.append(MontageCase(f"{r.get('patient', '')} {r['modality']} {r['roi']}\nstudy "
                                 f"...{r['study_instance_uid'][-12:]}\nDice {r['dice']:.3f}  HD95 "
                                 f"{r['hd95_mm']:.1f} mm  vol ratio {r['volume_ratio']:.2f}", volume.array, original,
                                 new, r["modality"], r.get("key_slice")))
    return montage(cases, path)

