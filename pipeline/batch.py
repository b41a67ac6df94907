"""Nightly batch re-contouring: re-propagate archived ROIs with the current model and report drift.

For every archived RTSTRUCT received in [since, until) whose image series is complete, each ROI
contoured on more than one slice and matching the ROI regex (TG-263 names, case-insensitive full
match) is re-propagated from its middle slice by `pipeline.recontour.recontour` (the same steps
as `rtprop recontour`). Outputs under OUT/<run>/: one RTSTRUCT per ROI (not sent unless asked),
drift.csv (Dice, HD95, MSD, volume ratio per ROI) and montage.png of the worst ROIs. Progress in
the terminal (tqdm); every run and ROI is audited (batch.started, batch.roi, batch.finished).
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pydicom
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from config.schema import Config
from db.audit import record
from db.engine import transaction
from db.schema import Instance

LOG = logging.getLogger("rtprop.pipeline.batch")
RTSTRUCT_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"


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


def _parse_when(text: str | None) -> datetime | None:
    if not text:
        return None
    value = datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def select_items(factory: sessionmaker[Session], config: Config, *, since: datetime | None, until: datetime | None,
                 roi_regex: str, include_own: bool = False) -> list[BatchItem]:
    """Archived RTSTRUCTs (not our own results, unless `include_own`) with a complete image series and ROIs to re-contour."""
    from pipeline.discovery import OWN_MANUFACTURER, match_series, series_folder

    regex = re.compile(roi_regex, re.IGNORECASE)
    items = []
    with factory() as session:
        stmt = select(Instance).where(Instance.sop_class_uid == RTSTRUCT_CLASS).order_by(Instance.id)
        if since is not None:
            stmt = stmt.where(Instance.received_at >= since)
        if until is not None:
            stmt = stmt.where(Instance.received_at < until)
        for inst in session.execute(stmt).scalars().all():
            try:
                ds = pydicom.dcmread(inst.path, stop_before_pixels=True, force=True)
            except Exception as exc:  # noqa: BLE001
                LOG.warning("batch: cannot read %s: %s", inst.path, exc)
                continue
            if not include_own and str(ds.get("Manufacturer", "")).strip().lower() == OWN_MANUFACTURER:
                continue
            names = [str(r.get("ROIName", "")) for r in ds.get("StructureSetROISequence", [])]
            contoured = _contoured_roi_numbers(ds)
            numbers = [int(r.ROINumber) for r in ds.get("StructureSetROISequence", [])]
            rois = [n for n, num in zip(names, numbers) if num in contoured and regex.fullmatch(n.strip())]
            if not rois:
                continue
            match = match_series(session, ds, inst.study_instance_uid, arrived_at=inst.received_at)
            if match.series is None or match.series.state != "complete":
                LOG.info("batch: RTSTRUCT %s skipped: %s", inst.sop_instance_uid,
                         match.reason or f"series {match.series.series_instance_uid} is {match.series.state}")
                continue
            items.append(BatchItem(Path(inst.path), inst.sop_instance_uid,
                                   series_folder(session, match.series.series_instance_uid),
                                   match.series.series_instance_uid, inst.study_instance_uid, inst.calling_ae,
                                   match.series.modality, rois))
    return items


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


def run_batch(factory: sessionmaker[Session], config: Config, *, since: str | None = None, until: str | None = None,
              roi_regex: str | None = None, send: bool | None = None, out: Path | None = None,
              progress: bool = True, trigger: str = "cli") -> dict[str, Any]:
    """Run one batch; returns the summary (also audited). See the module doc."""
    from pipeline.model_routing import check_loaded, settings_for, verified_settings
    from pipeline.recontour import recontour
    from pipeline.report import write_csv

    roi_regex = roi_regex or config.batch.roi_regex
    send = config.batch.send_results if send is None else send
    started = datetime.now(timezone.utc)
    out_root = Path(out) if out is not None else config.batch.out
    run_dir = out_root / started.strftime("%Y%m%dT%H%M%SZ")
    run_dir.mkdir(parents=True, exist_ok=True)
    items = select_items(factory, config, since=_parse_when(since), until=_parse_when(until), roi_regex=roi_regex)
    total = sum(len(i.rois) for i in items)
    with transaction(factory) as session:
        record(session, "batch.started", component="batch", trigger=trigger, since=since, until=until,
               roi_regex=roi_regex, send=send, rtstructs=len(items), rois=total, out=str(run_dir),
               local_date=datetime.now().strftime("%Y-%m-%d"))
    rows: list[dict[str, Any]] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="rtprop batch", unit="roi")
    for item in items:
        for roi in item.rois:
            safe = re.sub(r"[^A-Za-z0-9_.+-]", "_", roi)
            roi_dir = run_dir / item.series_uid / f"{item.rtstruct_uid[-12:]}-{safe}"
            t0 = time.perf_counter()
            row: dict[str, Any] = {"study_instance_uid": item.study_uid, "series_instance_uid": item.series_uid,
                                   "modality": item.modality, "rtstruct_sop_instance_uid": item.rtstruct_uid,
                                   "roi": roi, "sent": False,
                                   "series_folder": item.series_folder, "rtstruct_path": item.rtstruct_path}
            try:
                routed = settings_for(factory, config, roi, item.modality)  # the active model for this ROI
                row["model"] = routed.name
                summary = recontour(item.series_folder, item.rtstruct_path, roi, config.batch.prompt_kind, roi_dir,
                                    config.model_copy(update={"propagation": verified_settings(routed)}))
                check_loaded(routed, summary["checkpoint_sha256"])
                m = summary["metrics"]
                row.update(key_slice=summary["key_slice"], backend=summary["backend"], dice=m["dice"],
                           hd95_mm=m["hd95_mm"], msd_mm=m["msd_mm"], volume_ratio=m["volume_ratio"],
                           gt_volume_ml=m["gt_volume_ml"], pred_volume_ml=m["pred_volume_ml"],
                           new_rtstruct=summary["rtstruct"])
                if send:
                    row["sent"] = _queue_send(factory, config, item, Path(summary["rtstruct"]))
            except Exception as exc:  # noqa: BLE001 - one bad ROI never stops the night's run
                LOG.warning("batch: %s / %s failed: %s", item.rtstruct_uid, roi, exc)
                row["error"] = f"{type(exc).__name__}: {exc}"
            row["seconds"] = round(time.perf_counter() - t0, 3)
            rows.append(row)
            with transaction(factory) as session:
                record(session, "batch.roi", component="batch", study_instance_uid=item.study_uid,
                       series_instance_uid=item.series_uid, sop_instance_uid=item.rtstruct_uid,
                       calling_ae=item.calling_ae, roi=roi, model=row.get("model", ""), dice=row.get("dice"),
                       hd95_mm=row.get("hd95_mm"),
                       volume_ratio=row.get("volume_ratio"), error=row.get("error", ""), queued_send=row["sent"])
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"{roi} dice={row.get('dice', float('nan')):.3f}")
    if bar is not None:
        bar.close()
    csv_path = run_dir / "drift.csv"
    write_csv(rows, csv_path)
    montage_path = make_montage(rows, config, run_dir / "montage.png") if any("dice" in r for r in rows) else None
    summary = {"out": str(run_dir), "csv": str(csv_path), "montage": str(montage_path) if montage_path else None,
               "rois": len(rows), "errors": sum(1 for r in rows if r.get("error")),
               "dice": {f"{r['modality']}:{r['roi']}": round(r["dice"], 4) for r in rows if "dice" in r}}
    with transaction(factory) as session:
        record(session, "batch.finished", component="batch", trigger=trigger, out=str(run_dir), rois=len(rows),
               errors=summary["errors"], csv=str(csv_path))
    return summary


def _queue_send(factory: sessionmaker[Session], config: Config, item: BatchItem, path: Path) -> bool:
    """--send: queue the new RTSTRUCT to the route of the calling AE the archived case came from."""
    from dicom_node.routing import RoutingError, resolve_destination
    from dicom_node.scu import enqueue

    try:
        route = resolve_destination(config, item.calling_ae)
    except RoutingError as exc:
        LOG.warning("batch: not sent: %s", exc)
        return False
    if route.dry_run or route.destination is None:
        return False
    with transaction(factory) as session:
        enqueue(session, path, route.destination)
    return True


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
        cases.append(MontageCase(f"{r['modality']} {r['roi']}\nDice {r['dice']:.3f}  HD95 {r['hd95_mm']:.1f} mm\n"
                                 f"vol ratio {r['volume_ratio']:.2f}", volume.array, original, new, r["modality"],
                                 r.get("key_slice")))
    return montage(cases, path)

