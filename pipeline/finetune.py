"""`rtprop finetune`: the clinic's approved contours from the archive -> NPZ -> a fine-tuned SAM2 + its model card.

1. Data (`--storage`): every archived RTSTRUCT (not rtprop's own, Manufacturer "rtprop", unless
   `include_own`) with a complete image series, as the nightly batch selects them
   (`pipeline.batch.select_items`); each ROI contoured on more than one slice whose name fully
   matches the regex. One (series, ROI) pair is one NPZ in the MedSAM2 layout
   (`converters.volume_io.write_npz`, intensities normalised to uint8 as MedSAM2 stores them, `gts`
   the ROI); a later RTSTRUCT of the same series and ROI replaces an earlier one. The NPZ and
   `dataset.json` (which file is which patient, series, ROI, sha256) go to
   `<storage>/finetune/<out stem>-<hash of out>/`, reused when the run is started again.
   Or `--data DIR`: NPZ files (with a `dataset.json`, or one patient per study).
2. Split by patient (hashed Patient IDs, `db.audit.hash_patient_id`): patients ordered by
   sha256("<seed>:<patient>"), the first `validation_fraction` of them (at least one when there
   are two or more) held out; no patient is ever on both sides.
3. Train (`models.finetune.train`), then propagate every validation ROI from its middle slice with
   the trained model (the backend's own `propagate`, the nightly batch's prompt) and score it
   (`pipeline.metrics`).
4. Write `OUT.card.json` + `OUT.card.md`; audit `model.trained` with the OS user.

Series sha256 = sha256 of the sorted SHA-256s of the series' archived instances (recorded when
each arrived), so the card pins the exact images trained on.
"""
from __future__ import annotations

import getpass
import hashlib
import json
import logging
import re
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from config.schema import Config
from db.schema import Instance
from models.finetune import FinetuneError, FinetuneSettings, TrainItem, TrainResult, VolumeCache, npz_items, train

LOG = logging.getLogger("rtprop.pipeline.finetune")
DATA_FORMAT = "rtprop-finetune-data/1"
CARD_FORMAT = "rtprop-model-card/1"


@dataclass
class DataEntry:
    """One NPZ of the training data and where it came from."""

    file: str  # name inside the data folder
    label: int
    roi: str
    patient: str  # hashed Patient ID
    series_instance_uid: str = ""
    study_instance_uid: str = ""
    modality: str = ""
    series_sha256: str = ""
    rtstruct_sop_instance_uid: str = ""
    rtstruct_sha256: str = ""
    npz_sha256: str = ""


# ----------------------------------------------------------------------------- the archive
def series_sha256(session: Session, series_uid: str) -> str:
    """sha256 over the sorted sha256 of every archived instance of the series (see module doc)."""
    digests = sorted(session.execute(select(Instance.sha256).where(Instance.series_instance_uid == series_uid))
                     .scalars().all())
    return hashlib.sha256("\n".join(digests).encode("ascii")).hexdigest()


@dataclass
class ArchivedRoi:
    """One approved, fully contoured ROI in the archive."""

    roi: str
    patient: str
    series_folder: Path
    series_instance_uid: str
    study_instance_uid: str
    modality: str
    series_sha256: str
    rtstruct_path: Path
    rtstruct_sop_instance_uid: str
    rtstruct_sha256: str


def archived_rois(factory: sessionmaker[Session], config: Config, roi_regex: str, *, since: datetime | None = None,
                  include_own: bool = False, patients: set[str] | None = None) -> list[ArchivedRoi]:
    """The nightly batch's selection, one entry per (series, ROI name) (the last RTSTRUCT received wins),
    optionally only the hashed `patients`."""
    from pipeline.batch import select_items

    items, _ = select_items(factory, config, since=since, until=None, roi_regex=roi_regex, include_own=include_own)
    chosen: dict[tuple[str, str], ArchivedRoi] = {}
    with factory() as session:
        for item in items:
            rs = session.execute(select(Instance).where(Instance.sop_instance_uid == item.rtstruct_uid)).scalar_one()
            if patients is not None and rs.patient_id_hash not in patients:
                continue
            digest = series_sha256(session, item.series_uid)
            for roi in item.rois:
                chosen[(item.series_uid, roi.lower())] = ArchivedRoi(
                    roi, rs.patient_id_hash, item.series_folder, item.series_uid, item.study_uid, item.modality,
                    digest, item.rtstruct_path, item.rtstruct_uid, rs.sha256)
    return list(chosen.values())


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", text)


def convert(rois: list[ArchivedRoi], folder: Path, config: Config, progress: bool = True) -> list[DataEntry]:
    """Each archived ROI as one NPZ (normalised uint8 image, `gts` = the ROI) in `folder`."""
    from converters.rtstruct_read import read_rtstruct
    from converters.series import read_series
    from converters.volume_io import write_npz
    from models.preprocess import normalise

    folder.mkdir(parents=True, exist_ok=True)
    p = config.propagation
    entries: list[DataEntry] = []
    volumes: dict[str, Any] = {}
    iterator = rois
    if progress:
        from tqdm import tqdm

        iterator = tqdm(rois, desc="rtprop finetune: archive -> npz", unit="roi")
    for a in iterator:
        if a.series_instance_uid not in volumes:
            volumes.clear()  # one series in memory at a time
            volume = read_series(a.series_folder, a.series_instance_uid)
            norm = normalise(volume.array, volume.modality, p.ct_window_level, p.ct_window_width,
                             tuple(p.mr_percentiles))
            volumes[a.series_instance_uid] = (volume, norm)
        volume, norm = volumes[a.series_instance_uid]
        mask = read_rtstruct(a.rtstruct_path, volume).roi(a.roi).mask
        name = f"{a.series_instance_uid}__{safe_name(a.roi)}.npz"
        path = write_npz(folder / name, volume, mask.astype(np.uint8), normalised=norm)
        entries.append(DataEntry(name, 1, a.roi, a.patient, a.series_instance_uid, a.study_instance_uid, a.modality,
                                 a.series_sha256, a.rtstruct_sop_instance_uid, a.rtstruct_sha256, file_sha256(path)))
    return entries


def file_sha256(path: Path) -> str:
    from models.sam2_loader import sha256_of

    return sha256_of(path)


def write_manifest(folder: Path, entries: list[DataEntry], source: dict[str, Any]) -> Path:
    path = folder / "dataset.json"
    path.write_text(json.dumps({"format": DATA_FORMAT, "source": source, "items": [asdict(e) for e in entries]},
                               indent=1, sort_keys=True))
    return path


def read_data_folder(folder: Path) -> tuple[list[DataEntry], dict[str, Any]]:
    """The entries of a data folder: its dataset.json, else every *.npz (one patient per study, ROIs `label<N>`)."""
    folder = Path(folder)
    manifest = folder / "dataset.json"
    if manifest.is_file():
        data = json.loads(manifest.read_text())
        if data.get("format") != DATA_FORMAT:
            raise FinetuneError(f"{manifest}: not an rtprop fine-tuning data manifest")
        entries = [DataEntry(**e) for e in data["items"]]
        for e in entries:
            if not (folder / e.file).is_file():
                raise FinetuneError(f"{manifest} lists {e.file}, which is not in {folder}")
        return entries, data.get("source", {})
    files = sorted(folder.glob("*.npz"))
    if not files:
        raise FinetuneError(f"no .npz files (and no dataset.json) in {folder}")
    from converters.volume_io import read_npz

    entries = []
    for path in files:
        volume = read_npz(path)
        digest = file_sha256(path)
        for item in npz_items(path):
            entries.append(DataEntry(path.name, item.label, item.roi, item.patient, volume.series_instance_uid,
                                     volume.study_instance_uid, volume.modality, digest, npz_sha256=digest))
    return entries, {"kind": "npz", "folder": str(folder)}


# ----------------------------------------------------------------------------- split
def split_patients(patients: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, validation) hashed patient IDs: seeded order, `fraction` held out (>= 1 of >= 2 patients)."""
    unique = sorted(set(patients), key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).hexdigest())
    if fraction <= 0 or len(unique) < 2:
        return sorted(unique), []
    n_val = min(len(unique) - 1, max(1, int(round(fraction * len(unique)))))
    return sorted(unique[n_val:]), sorted(unique[:n_val])


# ----------------------------------------------------------------------------- validation
def validate(result: TrainResult, entries: list[DataEntry], folder: Path, config: Config) -> dict[str, Any]:
    """Each validation ROI propagated by the trained model from its middle slice, scored against its contour."""
    from converters.volume_io import read_npz
    from models import sam2_backend
    from pipeline.metrics import evaluate_masks
    from pipeline.prompts import prompt_from_roi

    # the NPZ frames are already in [0, 1]: an identity CT window hands them to the model unchanged
    sam2 = config.propagation.sam2.model_copy(update={"model_cfg": result.loaded.config_name,
                                                      "image_size": result.loaded.image_size})
    settings = config.propagation.model_copy(update={"backend": "sam2", "sam2": sam2, "ct_window_level": 0.5,
                                                     "ct_window_width": 1.0})
    cache = VolumeCache(config.propagation, size=2)
    rows = []
    for e in entries:
        path = folder / e.file
        item = TrainItem(path, e.label, e.roi, e.patient)
        frames, mask = cache.frames(path), cache.mask(item)
        spacing = read_npz(path).geometry.spacing_zyx
        prompt = prompt_from_roi(mask, config.batch.prompt_kind)
        row: dict[str, Any] = {"patient": e.patient, "series_instance_uid": e.series_instance_uid,
                               "modality": e.modality, "roi": e.roi, "key_slice": prompt.slice_index}
        try:
            out = sam2_backend.propagate(frames, spacing, prompt, "CT", settings, loaded=result.loaded)
            m = evaluate_masks(out.mask, mask, spacing)
            row.update(dice=round(m["dice"], 4), hd95_mm=round(m["hd95_mm"], 2))
        except Exception as exc:  # noqa: BLE001 - an ROI the model cannot contour scores 0, with the reason
            row.update(dice=0.0, hd95_mm=None, error=f"{type(exc).__name__}: {exc}")
        rows.append(row)
    return summarise_scores(rows)


def summarise_scores(rows: list[dict[str, Any]], key: str = "dice") -> dict[str, Any]:
    """Per-ROI mean Dice / HD95 and the overall mean, over the rows that have a score."""
    per_roi: dict[str, dict[str, Any]] = {}
    for r in rows:
        if key not in r:
            continue
        d = per_roi.setdefault(r["roi"], {"n": 0, "dice": [], "hd95_mm": []})
        d["n"] += 1
        d["dice"].append(r["dice"])
        d["hd95_mm"].append(r.get("hd95_mm"))
    def mean(values: list[float | None], digits: int) -> float | None:
        kept = [v for v in values if v is not None]
        return round(float(np.mean(kept)), digits) if kept else None

    summary = {roi: {"n": d["n"], "dice": mean(d["dice"], 4), "hd95_mm": mean(d["hd95_mm"], 2)}
               for roi, d in sorted(per_roi.items())}
    scored = [r["dice"] for r in rows if key in r]
    return {"items": rows, "per_roi": summary, "mean_dice": round(float(np.mean(scored)), 4) if scored else None,
            "rois_scored": len(scored), "errors": sum(1 for r in rows if "error" in r)}


# ----------------------------------------------------------------------------- card
def card_markdown(card: dict[str, Any]) -> str:
    """The human-readable summary beside the JSON card."""
    h = card["hyperparameters"]
    lines = [f"# Model card: {card['checkpoint']}", "",
             f"- checkpoint sha256: `{card['checkpoint_sha256']}`",
             f"- trained by {card['trained_by']} at {card['created_at']} on {card['training']['device']}, "
             f"{card['training']['steps']} steps in {card['training']['seconds']:.0f} s"
             + (f" (resumed after step {', '.join(map(str, card['training']['resumed_from']))})"
                if card["training"]["resumed_from"] else ""),
             f"- base: {card['base_checkpoint'] or 'random weights (test/benchmark only)'}"
             + (f" (sha256 `{card['base_checkpoint_sha256']}`)" if card["base_checkpoint_sha256"] else ""),
             f"- architecture {h['model_cfg']} at {h['image_size']} px; mode {h['mode']}; lr {h['lr']}; "
             f"accumulate {h['accumulate']}; frozen: "
             + (", ".join(k for k in ("image encoder", "prompt encoder")
                          if h[f"freeze_{k.replace(' ', '_')}"]) or "nothing"),
             f"- data: {card['data'].get('kind')} {card['data'].get('storage') or card['data'].get('folder') or ''}, "
             f"ROI regex `{card['data'].get('roi_regex', '')}`",
             f"- patients: {len(card['train_patients'])} train, {len(card['validation_patients'])} validation "
             f"(split by patient, seed {card['split']['seed']})",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in card["versions"].items() if v), "",
             "| ROI | train | validation | validation Dice | HD95 (mm) |", "|---|---|---|---|---|"]
    per_roi = card["validation"]["per_roi"]
    for roi, counts in sorted(card["rois"].items()):
        v = per_roi.get(roi, {})
        lines.append(f"| {roi} | {counts['train']} | {counts['validation']} | {v.get('dice', '')} | "
                     f"{v.get('hd95_mm', '')} |")
    curve = card["training_curve"]
    mean = card["validation"]["mean_dice"]
    if curve:
        lines += ["", f"Training loss: {curve[0]['loss']:.4f} (step 1) -> {curve[-1]['loss']:.4f} "
                      f"(step {curve[-1]['step']}); "
                  + (f"validation mean Dice {mean:.3f} over {card['validation']['rois_scored']} ROIs."
                     if mean is not None else "NO validation patients: this model cannot pass the promotion gate.")]
    return "\n".join(lines) + "\n"


def make_card(result: TrainResult, settings: FinetuneSettings, entries: list[DataEntry], train_p: list[str],
              val_p: list[str], source: dict[str, Any], validation: dict[str, Any], split_seed: int,
              fraction: float, user: str) -> dict[str, Any]:
    from pipeline.compute import versions

    train_set = set(train_p)
    rois: dict[str, dict[str, int]] = {}
    for e in entries:
        side = "train" if e.patient in train_set else "validation"
        rois.setdefault(e.roi, {"train": 0, "validation": 0})[side] += 1
    series: dict[str, dict[str, Any]] = {}
    for e in entries:
        s = series.setdefault(e.series_instance_uid or e.file, {
            "series_instance_uid": e.series_instance_uid, "study_instance_uid": e.study_instance_uid,
            "modality": e.modality, "patient": e.patient, "series_sha256": e.series_sha256,
            "split": "train" if e.patient in train_set else "validation", "rois": [], "rtstructs": [], "npz": []})
        s["rois"].append(e.roi)
        s["npz"].append({"file": e.file, "sha256": e.npz_sha256})
        if e.rtstruct_sop_instance_uid and e.rtstruct_sop_instance_uid not in [r["sop_instance_uid"]
                                                                               for r in s["rtstructs"]]:
            s["rtstructs"].append({"sop_instance_uid": e.rtstruct_sop_instance_uid, "sha256": e.rtstruct_sha256})
    hyper = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()
             if k not in ("device", "cpu_threads", "cache_volumes", "save_every")}
    return {
        "format": CARD_FORMAT,
        "name": result.checkpoint.stem,
        "checkpoint": result.checkpoint.name,
        "checkpoint_sha256": result.checkpoint_sha256,
        "backend": "sam2",
        "model_cfg": settings.model_cfg,
        "image_size": settings.image_size,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "trained_by": user,
        "base_checkpoint": str(settings.base) if settings.base else None,
        "base_checkpoint_sha256": result.base_sha256,
        "random_init": settings.random_init,
        "roi_regex": source.get("roi_regex"),
        "data": source,
        "split": {"by": "patient", "seed": split_seed, "validation_fraction": fraction,
                  "order": "sha256('<seed>:<hashed patient id>')"},
        "train_patients": train_p,
        "validation_patients": val_p,
        "series": sorted(series.values(), key=lambda s: (s["split"], s["patient"], s["series_instance_uid"])),
        "rois": rois,
        "hyperparameters": hyper,
        "versions": versions(),
        "training": {"steps": result.steps, "seconds": round(result.seconds, 1), "device": result.device,
                     "resumed_from": result.resumed_from},
        "training_curve": result.curve,
        "validation": validation,
    }


def write_card(card: dict[str, Any], out: Path) -> tuple[Path, Path]:
    json_path, md_path = Path(f"{out}.card.json"), Path(f"{out}.card.md")
    json_path.write_text(json.dumps(card, indent=1, sort_keys=True, default=str))
    md_path.write_text(card_markdown(card))
    return json_path, md_path


# ----------------------------------------------------------------------------- the command
def work_folder(config: Config, out: Path) -> Path:
    """Where an archive run keeps its NPZ: under the storage root (patient images stay on the node)."""
    tag = hashlib.sha256(str(Path(out).resolve()).encode()).hexdigest()[:8]
    return config.storage.root / "finetune" / f"{Path(out).stem}-{tag}"


def run_finetune(config: Config, out: Path, settings: FinetuneSettings, *, data: Path | None = None,
                 roi_regex: str | None = None, since: datetime | None = None, include_own: bool = False,
                 validation_fraction: float = 0.2, progress: bool = True) -> dict[str, Any]:
    """Collect (or read) the data, split by patient, train, validate, write the card; returns a summary."""
    from db.audit import record
    from db.engine import open_database, transaction

    out = Path(out)
    factory = None
    if config.storage.database.exists():
        factory = open_database(config.storage.database, key_path=config.storage.pseudonym_key_file)
    if data is not None:
        folder = Path(data)
        entries, source = read_data_folder(folder)
    else:
        if factory is None:
            raise FinetuneError(f"no database at {config.storage.database}: give --storage DIR of a node, or --data")
        if not roi_regex:
            raise FinetuneError("--roi-regex is required with --storage (which ROIs to learn, e.g. 'GTV.*')")
        folder = work_folder(config, out)
        source = {"kind": "archive", "storage": str(config.storage.root), "roi_regex": roi_regex,
                  "since": since.isoformat() if since else None,
                  "include_own": include_own, "folder": str(folder)}
        if (folder / "dataset.json").is_file():  # a run started again: the same data as its first start
            entries, saved = read_data_folder(folder)
            if {k: saved.get(k) for k in source} != source:
                raise FinetuneError(f"{folder} holds the data of a run with other options ({saved}); give another "
                                    "--out or remove that folder")
            LOG.info("reusing the converted data in %s", folder)
        else:
            rois = archived_rois(factory, config, roi_regex, since=since, include_own=include_own)
            if not rois:
                raise FinetuneError(f"no archived, fully contoured ROI matches {roi_regex!r}"
                                    + (f" since {since.isoformat()}" if since else "") + f" in {config.storage.root}")
            entries = convert(rois, folder, config, progress)
            write_manifest(folder, entries, source)
    train_p, val_p = split_patients([e.patient for e in entries], validation_fraction, settings.seed)
    train_set = set(train_p)
    train_items = [TrainItem(folder / e.file, e.label, e.roi, e.patient) for e in entries if e.patient in train_set]
    val_entries = [e for e in entries if e.patient not in train_set]
    if not train_items:
        raise FinetuneError("no training ROIs left after the split")
    t0 = time.perf_counter()
    result = train(train_items, out, settings, config.propagation, progress=progress)
    validation = validate(result, val_entries, folder, config) if val_entries else summarise_scores([])
    user = getpass.getuser()
    card = make_card(result, settings, entries, train_p, val_p, source, validation, settings.seed,
                     validation_fraction, user)
    json_path, md_path = write_card(card, out)
    audited = False
    if factory is not None:
        with transaction(factory) as session:
            record(session, "model.trained", component="finetune", user=user, checkpoint=str(out),
                   checkpoint_sha256=result.checkpoint_sha256, base_sha256=result.base_sha256,
                   train_patients=len(train_p), validation_patients=len(val_p), rois=card["rois"],
                   steps=result.steps, validation_mean_dice=validation["mean_dice"], card=str(json_path))
        audited = True
    return {"checkpoint": str(out), "checkpoint_sha256": result.checkpoint_sha256, "card": str(json_path),
            "card_md": str(md_path), "data": str(folder), "train_patients": len(train_p),
            "validation_patients": len(val_p), "train_rois": len(train_items), "validation_rois": len(val_entries),
            "steps": result.steps, "resumed_from": result.resumed_from,
            "final_loss": result.curve[-1]["loss"] if result.curve else None,
            "validation_mean_dice": validation["mean_dice"], "seconds": round(time.perf_counter() - t0, 1),
            "audited": audited}
