"""The model registry (table `models`) and the promotion gate: no model contours until it has proved itself.

- add: the checkpoint is copied to `<storage>/<models.folder>/<sha256>.pt` (its card beside it) and
  verified after the copy; the row keeps the sha256, and every later use checks the file against it
  (pipeline/model_routing.py). Adding the same weights again returns the existing model.
- evaluate: the card's validation patients' archived ROIs (its ROI regex) are re-contoured from
  their middle slice exactly as the nightly batch does (`pipeline.recontour.recontour`, prompt
  `batch.prompt_kind`), once with the candidate and once with the model active for that ROI and
  modality now; Dice and HD95 per ROI against the approved contours. Stored on the row.
- activate (gate): on the evaluated ROIs in the activation's scope, refused when the candidate's
  mean Dice is lower than the active models' by more than `models.gate_mean_dice_margin`, or any
  ROI name's mean Dice by more than `models.gate_roi_dice_margin` (the refusal names them), or
  when nothing was evaluated. `force` with a reason overrides. The built-in `classic` row is a
  model like the others, and the default, so the first SAM2 model has to beat it.
- retire: never used again (deactivated; its file stays for the record).
Every change is audited with the OS user (model.registered, model.evaluated, model.activated,
model.activation_refused, model.retired).
"""
from __future__ import annotations

import getpass
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from config.errors import UserError
from config.schema import Config
from db.audit import record
from db.engine import transaction
from db.schema import Model, aware, utcnow
from models import backends
from models.sam2_loader import CheckpointError, sha256_of
from pipeline.model_routing import (CheckpointChangedError, builtin_name, check_loaded, default_model, model_settings,
                                    settings_for, verified_settings)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")


class RegistryError(UserError):
    """A registry request that cannot be done (unknown model, bad name, no validation data); says why."""


class PromotionRefusedError(RegistryError):
    """The gate refused to activate a model: its validation result is worse than the active model's."""


def current_user() -> str:
    return getpass.getuser()


def models_folder(config: Config) -> Path:
    folder = config.models.folder
    return folder if folder.is_absolute() else config.storage.root / folder


def get_model(session: Session, name: str) -> Model:
    row = session.execute(select(Model).where(Model.name == name)).scalar()
    if row is None:
        names = session.execute(select(Model.name).order_by(Model.id)).scalars().all()
        raise RegistryError(f"no model named {name!r} (registered: {', '.join(names)})")
    return row


def _audit(session: Session, event: str, row: Model, **details: Any) -> None:
    record(session, event, component="registry", user=current_user(), model=row.name, backend=row.backend,
           checkpoint_sha256=row.sha256, **details)


# ----------------------------------------------------------------------------- add / list / retire
def add_model(factory: sessionmaker[Session], config: Config, checkpoint: Path, *, card_path: Path | None = None,
              name: str | None = None, model_cfg: str | None = None, image_size: int | None = None,
              backend: str | None = None) -> tuple[Model, bool]:
    """Register `checkpoint` (copied under the storage with its sha256) for `backend` (default: the one
    that takes weights, models/backends.py); returns (row, created). A file that does not load as that
    backend's model with the architecture and input size it is registered with is refused."""
    spec = backends.get(backend, key="--backend") if backend else backends.weighted()
    if not spec.needs_weights:
        raise RegistryError(f"backend {spec.name!r} runs without weights: there is no checkpoint to register")
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise RegistryError(f"checkpoint {checkpoint.name} not found in {checkpoint.parent}")
    if card_path is None and Path(f"{checkpoint}.card.json").is_file():
        card_path = Path(f"{checkpoint}.card.json")
    card = None
    if card_path is not None:
        try:
            card = json.loads(Path(card_path).read_text())
        except (OSError, ValueError) as exc:
            raise RegistryError(f"model card {card_path} cannot be read as JSON: {exc}") from None
    digest = sha256_of(checkpoint)
    if card and card.get("checkpoint_sha256") not in (None, digest):
        raise RegistryError(f"model card {card_path} is for checkpoint sha256 {card['checkpoint_sha256'][:12]}..., "
                            f"{checkpoint.name} has {digest[:12]}...: not its card")
    with factory() as session:
        existing = session.execute(select(Model).where(Model.sha256 == digest)).scalar()
        if existing is not None:
            return existing, False
    name = name or f"{(card or {}).get('name') or checkpoint.stem}-{digest[:8]}"
    if not NAME_RE.match(name) or name == builtin_name():
        raise RegistryError(f"model name {name!r}: letters, digits and _.+- only, at most 64, not {builtin_name()!r}")
    cfg = model_cfg or (card or {}).get("model_cfg") or config.propagation.sam2.model_cfg
    size = int(image_size or (card or {}).get("image_size") or config.propagation.sam2.image_size)
    try:
        spec.check_weights(checkpoint, spec.with_weights(config.propagation, checkpoint, cfg, size))
    except CheckpointError as exc:
        raise RegistryError(f"{checkpoint.name} in {checkpoint.parent} cannot be loaded as a {spec.name} model "
                            f"({cfg} at {size} px): {exc}; not registered") from None
    with factory() as session:
        if session.execute(select(Model.id).where(Model.name == name)).scalar() is not None:
            raise RegistryError(f"a model named {name!r} is already registered: give another --name")
    folder = models_folder(config)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{digest}.pt"
    tmp = folder / f".{digest}.pt.tmp-{os.getpid()}"
    shutil.copyfile(checkpoint, tmp)
    if sha256_of(tmp) != digest:
        tmp.unlink(missing_ok=True)
        raise RegistryError(f"copy of {checkpoint} to {folder} does not match the original: not registered")
    os.replace(tmp, target)
    if card is not None:
        (folder / f"{digest}.card.json").write_text(json.dumps(card, indent=1, sort_keys=True))
    with transaction(factory) as session:
        if session.execute(select(Model.id).where(Model.name == name)).scalar() is not None:
            raise RegistryError(f"a model named {name!r} is already registered: give another --name")
        stored = target.relative_to(config.storage.root) if target.is_relative_to(config.storage.root) else target
        row = Model(name=name, backend=spec.name, path=str(stored), sha256=digest, model_cfg=cfg, image_size=int(size),
                    card=card, state="registered", roi_regex="", modality="", added_by=current_user(),
                    added_at=utcnow(), activated_by="")
        session.add(row)
        session.flush()
        _audit(session, "model.registered", row, source=str(checkpoint), path=str(target),
               card=str(card_path) if card_path else None, model_cfg=cfg, image_size=int(size),
               validation_patients=len((card or {}).get("validation_patients") or []))
        return row, True


def list_models(factory: sessionmaker[Session], config: Config) -> list[dict[str, Any]]:
    """Every model with its state, scope and last evaluation; the default (no active row) is marked."""
    default = default_model(config)
    out = []
    with factory() as session:
        for row in session.execute(select(Model).order_by(Model.id)).scalars():
            ev = row.evaluation or {}
            out.append({"name": row.name, "backend": row.backend, "sha256": row.sha256, "state": row.state,
                        "for_roi": row.roi_regex or ("*" if row.state == "active" else ""),
                        "modality": row.modality or ("*" if row.state == "active" else ""),
                        "default": row.name == default.name, "image_size": row.image_size,
                        "added_by": row.added_by, "added_at": aware(row.added_at),
                        "activated_by": row.activated_by, "activated_at": aware(row.activated_at),
                        "validation_dice": (ev.get("candidate") or {}).get("mean_dice"),
                        "active_dice": (ev.get("active") or {}).get("mean_dice")})
    return out


def retire_model(factory: sessionmaker[Session], name: str, reason: str = "") -> dict[str, Any]:
    with transaction(factory) as session:
        row = get_model(session, name)
        if row.name == builtin_name():
            raise RegistryError(f"the built-in {row.name} model cannot be retired (it is the weight-free fallback)")
        previous = row.state
        row.state = "retired"
        _audit(session, "model.retired", row, previous_state=previous, reason=reason)
        return {"model": row.name, "state": "retired", "previous_state": previous}


# ----------------------------------------------------------------------------- evaluate
def evaluate_model(factory: sessionmaker[Session], config: Config, name: str, *, out: Path | None = None,
                   progress: bool = True) -> dict[str, Any]:
    """Re-contour the card's validation patients' ROIs with the candidate and the active model; store and return."""
    from model_lifecycle.finetune import archived_rois, safe_name, summarise_scores
    from pipeline.recontour import recontour

    with factory() as session:
        row = get_model(session, name)
        if row.state == "retired":
            raise RegistryError(f"model {name!r} is retired")
        candidate = model_settings(row, config)
        card = row.card or {}
    patients = card.get("validation_patients") or []
    if not patients:
        raise RegistryError(f"model {name!r} has no model card with validation_patients: the gate needs held-out "
                            "patients (register it with --card CKPT.card.json from rtprop finetune)")
    roi_regex = card.get("roi_regex") or config.batch.roi_regex
    rois = archived_rois(factory, config, roi_regex, patients=set(patients))
    if not rois:
        raise RegistryError(f"none of the {len(patients)} validation patients of {name!r} has an archived ROI "
                            f"matching {roi_regex!r} in {config.storage.root}")
    run_dir = Path(out) if out else (models_folder(config) / "evaluations" / name
                                     / datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ"))
    from tqdm import tqdm

    bar = tqdm(total=len(rois), desc=f"rtprop models evaluate {name}", unit="roi", disable=not progress)
    rows = []
    for a in rois:
        active = settings_for(factory, config, a.roi, a.modality)
        row_out: dict[str, Any] = {"patient": a.patient, "series_instance_uid": a.series_instance_uid,
                                   "modality": a.modality, "roi": a.roi, "rtstruct_sop_instance_uid":
                                   a.rtstruct_sop_instance_uid, "active_model": active.name,
                                   "active_sha256": active.sha256}
        results: dict[str, dict[str, Any]] = {}
        for role, routed in (("candidate", candidate), ("active", active)):
            if role == "active" and routed.name == candidate.name:
                results["active"] = results["candidate"]
                continue
            folder = run_dir / role / a.series_instance_uid / safe_name(a.roi)
            try:
                summary = recontour(a.series_folder, a.rtstruct_path, a.roi, config.batch.prompt_kind, folder,
                                    config.model_copy(update={"propagation": verified_settings(routed)}))
                check_loaded(routed, summary["checkpoint_sha256"])
                m = summary["metrics"]
                results[role] = {"dice": round(float(m["dice"]), 4), "hd95_mm": round(float(m["hd95_mm"]), 2)}
            except Exception as exc:  # noqa: BLE001 - an ROI the model cannot contour scores 0, with the reason
                if role == "candidate" and isinstance(exc, CheckpointChangedError):
                    raise
                results[role] = {"dice": 0.0, "hd95_mm": None, "error": f"{type(exc).__name__}: {exc}"}
        row_out["candidate"], row_out["active"] = results["candidate"], results["active"]
        rows.append(row_out)
        bar.update(1)
        bar.set_postfix_str(f"{a.roi} {results['candidate']['dice']:.3f} vs {results['active']['dice']:.3f}")
    bar.close()
    evaluation = {
        "model": name, "sha256": candidate.sha256, "roi_regex": roi_regex, "prompt": config.batch.prompt_kind,
        "patients": len({r["patient"] for r in rows}), "out": str(run_dir),
        "at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "items": rows,
        "candidate": _scores(rows, "candidate", summarise_scores), "active": _scores(rows, "active", summarise_scores),
    }
    with transaction(factory) as session:
        row = get_model(session, name)
        row.evaluation = json.loads(json.dumps(evaluation, default=str))
        row.evaluated_at = utcnow()
        _audit(session, "model.evaluated", row, rois=len(rows), patients=evaluation["patients"],
               mean_dice=evaluation["candidate"]["mean_dice"], active_mean_dice=evaluation["active"]["mean_dice"],
               active_models=sorted({r["active_model"] for r in rows}), out=str(run_dir))
    return evaluation


def _scores(rows: list[dict[str, Any]], role: str, summarise) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    flat = [{"roi": r["roi"], **r[role]} for r in rows]
    summary = summarise(flat)
    summary.pop("items")
    return summary


# ----------------------------------------------------------------------------- the gate
@dataclass
class GateDecision:
    passed: bool
    reasons: list[str]
    worse_rois: list[str]
    candidate_mean_dice: float | None
    active_mean_dice: float | None
    per_roi: dict[str, dict[str, float]] = field(default_factory=dict)
    rois_compared: int = 0


def in_scope(item: dict[str, Any], roi_regex: str, modality: str) -> bool:
    if modality and item["modality"].upper() != modality.upper():
        return False
    return not roi_regex or re.fullmatch(roi_regex, item["roi"].strip(), re.IGNORECASE) is not None


def gate(evaluation: dict[str, Any], config: Config, roi_regex: str = "", modality: str = "") -> GateDecision:
    """Compare candidate and active on the evaluated ROIs in scope (pure function of the stored evaluation)."""
    items = [i for i in evaluation.get("items", []) if in_scope(i, roi_regex, modality)]
    if not items:
        return GateDecision(False, [f"no evaluated validation ROI in scope (roi {roi_regex or '*'}, modality "
                                    f"{modality or '*'}): nothing shows the model is not worse"], [], None, None)
    by_roi: dict[str, dict[str, list[float]]] = {}
    for i in items:
        d = by_roi.setdefault(i["roi"], {"candidate": [], "active": []})
        d["candidate"].append(float(i["candidate"]["dice"]))
        d["active"].append(float(i["active"]["dice"]))
    mean_c = sum(float(i["candidate"]["dice"]) for i in items) / len(items)
    mean_a = sum(float(i["active"]["dice"]) for i in items) / len(items)
    reasons, worse, per_roi = [], [], {}
    margin_mean, margin_roi = config.models.gate_mean_dice_margin, config.models.gate_roi_dice_margin
    if mean_c < mean_a - margin_mean:
        reasons.append(f"mean Dice {mean_c:.3f} is lower than the active model's {mean_a:.3f} by more than "
                       f"models.gate_mean_dice_margin={margin_mean:g}")
    for roi, d in sorted(by_roi.items()):
        c, a = sum(d["candidate"]) / len(d["candidate"]), sum(d["active"]) / len(d["active"])
        per_roi[roi] = {"n": len(d["candidate"]), "candidate_dice": round(c, 4), "active_dice": round(a, 4),
                        "delta": round(c - a, 4)}
        if c < a - margin_roi:
            worse.append(roi)
    if worse:
        reasons.append("worse on ROI(s) " + ", ".join(f"{r} ({per_roi[r]['candidate_dice']:.3f} vs "
                                                     f"{per_roi[r]['active_dice']:.3f})" for r in worse)
                       + f": lower by more than models.gate_roi_dice_margin={margin_roi:g}")
    return GateDecision(not reasons, reasons, worse, round(mean_c, 4), round(mean_a, 4), per_roi, len(items))


def evaluation_is_current(factory: sessionmaker[Session], config: Config, evaluation: dict[str, Any] | None,
                          sha256: str) -> bool:
    """A stored evaluation still holds if it was of these weights against the models active now for its ROIs."""
    if not evaluation or evaluation.get("sha256") != sha256 or not evaluation.get("items"):
        return False
    for item in evaluation["items"]:
        now = settings_for(factory, config, item["roi"], item["modality"])
        if (now.name, now.sha256) != (item["active_model"], item["active_sha256"]):
            return False
    return True


def activate_model(factory: sessionmaker[Session], config: Config, name: str, *, roi_regex: str = "",
                   modality: str = "", force: bool = False, reason: str = "",
                   progress: bool = True) -> dict[str, Any]:
    """Activate `name` for (roi_regex, modality) if the gate passes (or `force` with a reason); audited either way."""
    modality = (modality or "").upper()
    if roi_regex:
        try:
            re.compile(roi_regex)
        except re.error as exc:
            raise RegistryError(f"--for-roi {roi_regex!r} is not a valid regular expression: {exc}") from None
    if force and not reason.strip():
        raise RegistryError("--force needs --reason TEXT (it is written to the audit log)")
    with factory() as session:
        row = get_model(session, name)
        if row.state == "retired":
            raise RegistryError(f"model {name!r} is retired and cannot be activated")
        routed = model_settings(row, config)
        stored = row.evaluation
    verified_settings(routed)  # a changed file is refused before anything else
    evaluation = stored
    decision: GateDecision
    try:
        if not evaluation_is_current(factory, config, stored, routed.sha256):
            evaluation = evaluate_model(factory, config, name, progress=progress)
        decision = gate(evaluation, config, roi_regex, modality)
    except RegistryError as exc:
        if not force:
            _refuse(factory, name, roi_regex, modality, [str(exc)], [])
            raise PromotionRefusedError(f"model {name!r} not activated: {exc}") from None
        decision = GateDecision(False, [str(exc)], [], None, None)
    if not decision.passed and not force:
        _refuse(factory, name, roi_regex, modality, decision.reasons, decision.worse_rois, decision)
        raise PromotionRefusedError(f"model {name!r} not activated for ROI {roi_regex or '*'} / modality "
                                    f"{modality or '*'}: " + "; ".join(decision.reasons)
                                    + " (override with --force --reason TEXT)")
    with transaction(factory) as session:
        row = get_model(session, name)
        replaced = []
        for other in session.execute(select(Model).where(Model.state == "active", Model.id != row.id,
                                                         Model.roi_regex == roi_regex,
                                                         Model.modality == modality)).scalars():
            other.state = "registered"
            replaced.append(other.name)
        row.state, row.roi_regex, row.modality = "active", roi_regex, modality
        row.activated_by, row.activated_at = current_user(), utcnow()
        _audit(session, "model.activated", row, for_roi=roi_regex, modality=modality, forced=force and not
               decision.passed, reason=reason, gate_passed=decision.passed, gate_reasons=decision.reasons,
               worse_rois=decision.worse_rois, mean_dice=decision.candidate_mean_dice,
               active_mean_dice=decision.active_mean_dice, replaced=replaced)
    return {"model": name, "state": "active", "for_roi": roi_regex or "*", "modality": modality or "*",
            "gate_passed": decision.passed, "forced": force and not decision.passed, "reasons": decision.reasons,
            "worse_rois": decision.worse_rois, "mean_dice": decision.candidate_mean_dice,
            "active_mean_dice": decision.active_mean_dice, "per_roi": decision.per_roi, "replaced": replaced}


def _refuse(factory: sessionmaker[Session], name: str, roi_regex: str, modality: str, reasons: list[str],
            worse: list[str], decision: GateDecision | None = None) -> None:
    with transaction(factory) as session:
        row = get_model(session, name)
        _audit(session, "model.activation_refused", row, for_roi=roi_regex, modality=modality, reasons=reasons,
               worse_rois=worse, mean_dice=decision.candidate_mean_dice if decision else None,
               active_mean_dice=decision.active_mean_dice if decision else None)
