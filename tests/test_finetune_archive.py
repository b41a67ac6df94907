"""Fine-tuning from the archive, the model registry and the promotion gate, over real DICOM.

The archive is filled the way a clinic fills it: DCMTK storescu sends the shared sts-001 CT and MR
T1 (each with its MIM GTV RTSTRUCT) to a running `rtprop serve`. sts-001 is one patient; to have
two for a patient split, a second copy is made here with another PatientID and new UIDs
(every UID mapped consistently, so the copy is an independent patient with the same images).

Then `rtprop finetune --storage` (random-init tiny model, 256 px, 2 steps: plumbing, not accuracy)
must split by patient and list the right series in its card; `rtprop models activate` must refuse
that random model against the active classic backend on the validation patient, naming the ROIs;
`--force --reason` must activate it with who and why in the audit; a job must then be routed to
it and record its name; and the checkpoint changed on disk after registration must be refused at load.
"""
from __future__ import annotations

import getpass
import hashlib
import json
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
import torch

from db.audit import hash_patient_id
from node_helpers import VENV_BIN, NodeProcess, storescu, wait_for
from pipeline_helpers import STS_CT, STS_MR, case_files, copy_as_new_patient

pytestmark = [pytest.mark.skipif(shutil.which("storescu") is None, reason="DCMTK not installed"), pytest.mark.sam2,
              pytest.mark.slow]
RTPROP = str(VENV_BIN / "rtprop")
COPY_ID = "STS_001_COPY"


def run(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    return subprocess.run([RTPROP, *args], capture_output=True, text=True, timeout=timeout)


def query(storage: Path, sql: str, args: tuple = ()) -> list[tuple]:
    with sqlite3.connect(storage / "rtprop.sqlite", timeout=30) as con:
        return con.execute(sql, args).fetchall()


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """Two patients (sts-001 and its copy), CT + MR + GTV RTSTRUCTs each, received by a running node."""
    work = tmp_path_factory.mktemp("archive")
    copies = copy_as_new_patient(case_files(STS_CT) + case_files(STS_MR), work / "copy", COPY_ID)
    copy_ct = [p for p in copies if p.parts[-3] == STS_CT.name]
    copy_mr = [p for p in copies if p.parts[-3] == STS_MR.name]
    node = NodeProcess(work / "node", config={"node": {"series_quiet_period_s": 1.0, "poll_interval_s": 0.2},
                                              "storage": {"fsync": False}})
    node.args += ["--workers", "0"]  # the archive only: no jobs run while we fill it
    with node:
        # CT and MR share one Frame of Reference: each RTSTRUCT arrives with its own series (as MIM sends them)
        for files in (case_files(STS_CT), case_files(STS_MR), copy_ct, copy_mr):
            storescu(node.port, files, calling_ae="MIM")
            time.sleep(1.5)
        wait_for(lambda: node.query("SELECT count(*) FROM series WHERE state='complete'")[0][0] == 8, 120, 0.5,
                 what="8 complete series")
    return node.storage


def test_copy_has_new_uids_for_everything_but_the_classes(tmp_path):
    files = copy_as_new_patient(case_files(STS_CT)[:2], tmp_path, "X")
    a, b = pydicom.dcmread(case_files(STS_CT)[0]), pydicom.dcmread(files[0])
    assert b.PatientID == "X" and b.SOPClassUID == a.SOPClassUID
    for key in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID"):
        assert getattr(a, key) != getattr(b, key), key
    assert pydicom.dcmread(files[1]).SeriesInstanceUID == b.SeriesInstanceUID  # consistent mapping


@pytest.fixture(scope="module")
def trained(archive, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("model") / "gtv-test.pt"
    r = run("finetune", "--storage", str(archive), "--roi-regex", "GTV.*", "--random-init", "--steps", "2",
            "--image-size", "256", "--mode", "image", "--freeze-image-encoder", "--device", "cpu", "--out", str(out),
            "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    return {"summary": json.loads(r.stdout.strip().splitlines()[-1]), "out": out,
            "card": json.loads(Path(f"{out}.card.json").read_text())}


def archived_sha256(files: list[str]) -> str:
    """Independent of the node's code: sha256 of each file's data set (after the preamble and file meta),
    sorted, then hashed."""
    digests = []
    for path in files:
        raw = Path(path).read_bytes()
        meta_length = pydicom.dcmread(path, stop_before_pixels=True).file_meta.FileMetaInformationGroupLength
        digests.append(hashlib.sha256(raw[132 + 12 + int(meta_length):]).hexdigest())
    return hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()


def test_finetune_from_the_archive_splits_by_patient_and_the_card_lists_the_right_series(archive, trained):
    card, summary = trained["card"], trained["summary"]
    key = (archive / "rtprop.sqlite.key").read_bytes()  # the site's pseudonym key (db/audit.py)
    patients = {hash_patient_id("STS_001", key), hash_patient_id(COPY_ID, key)}
    assert len(card["train_patients"]) == 1 and len(card["validation_patients"]) == 1
    assert set(card["train_patients"]) | set(card["validation_patients"]) == patients
    assert summary["train_rois"] == 2 and summary["validation_rois"] == 2 and summary["audited"]
    # the series of each patient, from the node's database (images only; RTSTRUCTs are listed apart)
    rows = query(archive, "SELECT DISTINCT series_instance_uid, modality, patient_id_hash FROM instances "
                          "WHERE modality IN ('CT', 'MR')")
    assert len(rows) == 4
    by_series = {s: (m, p) for s, m, p in rows}
    listed = {s["series_instance_uid"]: s for s in card["series"]}
    assert set(listed) == set(by_series)
    for uid, s in listed.items():
        modality, patient = by_series[uid]
        assert s["patient"] == patient and s["modality"] == modality
        assert s["split"] == ("train" if patient in card["train_patients"] else "validation")
        assert s["rois"] == [f"GTV_Mass_{'CT' if modality == 'CT' else 'MR_T1'}"]
        files = [f for (f,) in query(archive, "SELECT path FROM instances WHERE series_instance_uid=?", (uid,))]
        assert len(files) == 59 and s["series_sha256"] == archived_sha256(files)
        assert len(s["rtstructs"]) == 1
    assert card["rois"] == {"GTV_Mass_CT": {"train": 1, "validation": 1}, "GTV_Mass_MR_T1": {"train": 1, "validation": 1}}
    assert card["checkpoint_sha256"] == hashlib.sha256(trained["out"].read_bytes()).hexdigest()
    assert card["random_init"] and card["base_checkpoint_sha256"] is None
    assert {i["patient"] for i in card["validation"]["items"]} == set(card["validation_patients"])
    assert len(card["training_curve"]) == 2 and card["versions"]["torch"] == torch.__version__.split("+")[0]
    assert Path(f"{trained['out']}.card.md").read_text().startswith("# Model card")
    audit = query(archive, "SELECT details FROM audit WHERE event='model.trained'")
    assert len(audit) == 1 and json.loads(audit[0][0])["user"] == getpass.getuser()


@pytest.fixture(scope="module")
def registered(archive, trained) -> dict:
    r = run("models", "add", str(trained["out"]), "--storage", str(archive))
    assert r.returncode == 0, r.stderr[-3000:]
    name = r.stdout.strip().splitlines()[-1]
    refused = run("models", "activate", name, "--storage", str(archive), "--no-progress")
    forced = run("models", "activate", name, "--storage", str(archive), "--for-roi", "GTV.*", "--modality", "CT",
                 "--force", "--reason", "test of the override", "--no-progress")
    return {"name": name, "add": r, "refused": refused, "forced": forced}


def audit_rows(storage: Path, event: str) -> list[dict]:
    return [json.loads(d) for (d,) in query(storage, "SELECT details FROM audit WHERE event=? ORDER BY id", (event,))]


def test_models_add_copies_the_checkpoint_under_the_storage_with_its_sha256(archive, trained, registered):
    name, sha = registered["name"], trained["card"]["checkpoint_sha256"]
    assert name == f"gtv-test-{sha[:8]}"
    path, stored_sha, state = query(archive, "SELECT path, sha256, state FROM models WHERE name=?", (name,))[0]
    assert path == f"models/{sha}.pt" and stored_sha == sha  # under the storage root
    assert hashlib.sha256((archive / path).read_bytes()).hexdigest() == sha
    again = run("models", "add", str(trained["out"]), "--storage", str(archive))
    assert again.returncode == 0 and again.stdout.strip().splitlines()[-1] == name  # same weights: same model
    assert [r["model"] for r in audit_rows(archive, "model.registered")] == [name]


def test_activate_refuses_the_random_model_against_classic_naming_the_rois(archive, registered):
    r = registered["refused"]
    assert r.returncode == 2, r.stdout + r.stderr
    assert "not activated" in r.stderr and "GTV_Mass_CT" in r.stderr and "GTV_Mass_MR_T1" in r.stderr
    refusal = audit_rows(archive, "model.activation_refused")[0]
    assert refusal["user"] == getpass.getuser() and refusal["model"] == registered["name"]
    assert sorted(refusal["worse_rois"]) == ["GTV_Mass_CT", "GTV_Mass_MR_T1"]
    evaluated = audit_rows(archive, "model.evaluated")[0]
    assert evaluated["active_models"] == ["classic"] and evaluated["mean_dice"] < evaluated["active_mean_dice"]
    print("gate:", refusal["mean_dice"], "vs classic", refusal["active_mean_dice"])


def test_force_with_a_reason_activates_and_the_audit_shows_who_and_why(archive, registered):
    r = registered["forced"]
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["forced"] and not out["gate_passed"] and out["worse_rois"] == ["GTV_Mass_CT"]  # the CT scope only
    activated = audit_rows(archive, "model.activated")[-1]
    assert activated["user"] == getpass.getuser() and activated["reason"] == "test of the override"
    assert activated["forced"] and activated["for_roi"] == "GTV.*" and activated["modality"] == "CT"
    listing = run("models", "list", "--storage", str(archive), "--json")
    rows = {row["name"]: row for row in map(json.loads, listing.stdout.splitlines())}
    assert rows[registered["name"]]["state"] == "active" and rows["classic"]["default"]
    no_reason = run("models", "activate", registered["name"], "--storage", str(archive), "--force")
    assert no_reason.returncode == 2 and "--reason" in no_reason.stderr


def test_jobs_are_routed_to_the_active_model_and_a_changed_checkpoint_is_refused_at_load(archive, registered,
                                                                                        tmp_path):
    from config.load import load_config, resolve_storage
    from converters.contours import mask_to_polygons
    from converters.rtstruct_read import read_rtstruct
    from converters.series import read_series
    from db.engine import open_database
    from dicom_node.completion import CompletionChecker
    from dicom_node.storage import Received, Store
    from pipeline.model_routing import settings_for
    from pipeline.prompts import middle_slice
    from pipeline.worker import Worker
    from pipeline_helpers import make_prompt_rtstruct

    config = resolve_storage(load_config(None, overrides={
        "storage": {"root": str(archive), "fsync": False}, "node": {"series_quiet_period_s": 0},
        "pipeline": {"prompt_mode": "mask", "isolate_jobs": False, "dry_run_aes": ["PLAN"], "poll_interval_s": 0.1}}))
    factory = open_database(config.storage.database)
    name = registered["name"]
    assert settings_for(factory, config, "GTV", "CT").name == name
    assert settings_for(factory, config, "GTV", "MR").name == "classic"  # activated for CT only
    assert settings_for(factory, config, "Bladder", "CT").name == "classic"  # not a GTV

    ct_folder = Path(query(archive, "SELECT path FROM instances WHERE modality='CT' AND patient_id_hash=? LIMIT 1",
                           (hash_patient_id("STS_001", (archive / "rtprop.sqlite.key").read_bytes()),))[0][0]).parent
    volume = read_series(ct_folder)
    gtv = read_rtstruct(next((STS_CT / "rtstruct").iterdir()), volume).rois[0].mask
    z = middle_slice(gtv)
    outline = max(mask_to_polygons(gtv[z]), key=len)
    store = Store(config.storage, factory, fsync=False)

    def job_for(tag: str) -> tuple:
        prompt = make_prompt_rtstruct(volume, tmp_path / f"RS_{tag}.dcm", outlines=[("GTV", z, outline)])
        uid = pydicom.dcmread(prompt).SOPInstanceUID
        assert store.ingest(prompt.read_bytes(), Received(calling_ae="PLAN", source="import")).status == 0
        CompletionChecker(factory, config).check()
        worker = Worker(factory, config)

        def finished() -> tuple | None:
            # not drain(): the archived MIM RTSTRUCTs (CT and MR in one frame, no series referenced) stay
            # `received`, waiting pipeline.series_wait_s for a series; only this prompt's job matters here
            worker.housekeeping()
            worker.run_once()
            rows = query(archive, "SELECT state, backend, checkpoint_sha256, versions, error FROM jobs "
                                  "WHERE rtstruct_sop_instance_uid=?", (uid,))
            return rows[0] if rows and rows[0][0] in ("validated", "failed", "dead-letter") else None

        return wait_for(finished, 900, 0.2, what=f"the {tag} prompt job")

    state, backend, sha, versions, error = job_for("first")
    registered_sha, path = query(archive, "SELECT sha256, path FROM models WHERE name=?", (name,))[0]
    path = archive / path
    assert backend == "sam2" and sha == registered_sha, (state, error)
    assert json.loads(versions)["model"] == name
    propagated = [json.loads(d) for (d,) in query(archive, "SELECT details FROM audit WHERE event='job.propagated'")]
    assert propagated[-1]["model"] == name and propagated[-1]["structures"][0]["checkpoint_sha256"] == registered_sha

    # someone replaces the registered weights on disk (still a loadable checkpoint of the same architecture)
    weights = torch.load(path, weights_only=True)
    key = "sam_mask_decoder.iou_token.weight"
    weights["model"][key] = weights["model"][key] + 1.0
    torch.save(weights, path)
    state, backend, sha, versions, error = job_for("second")
    assert state == "failed" and "changed after registration" in error and name in error, error
    factory.kw["bind"].dispose()


def test_finetune_and_models_add_list_activate_on_postgresql(tmp_path, postgres):
    """Every command reaches the database every other process reads: with database.url, `finetune --storage`
    learns from the PostgreSQL archive and audits there, and `models add/list/activate` keep the registry the
    workers route by (they once opened only the SQLite file; issue 21, item 3)."""
    import yaml

    from config.load import load_config, resolve_storage
    from db.engine import open_configured
    from dicom_node.completion import CompletionChecker
    from dicom_node.storage import Received, Store

    url = postgres.create_database()
    storage = tmp_path / "storage"
    config_path = tmp_path / "pg.yaml"
    config_path.write_text(yaml.safe_dump({"database": {"url": url}, "storage": {"fsync": False},
                                           "node": {"series_quiet_period_s": 0}}))
    config = resolve_storage(load_config(config_path, overrides={"storage": {"root": str(storage)}}))
    factory = open_configured(config)
    store = Store(config.storage, factory, fsync=False)
    for path in case_files(STS_CT) + copy_as_new_patient(case_files(STS_CT), tmp_path / "copy", COPY_ID):
        assert store.ingest(Path(path).read_bytes(), Received(calling_ae="MIM", source="import")).status == 0
    CompletionChecker(factory, config).check()
    factory.kw["bind"].dispose()
    common = ("--config", str(config_path), "--storage", str(storage))
    out = tmp_path / "model" / "gtv-pg.pt"
    out.parent.mkdir()
    r = run("finetune", *common, "--roi-regex", "GTV.*", "--random-init", "--steps", "1", "--image-size", "256",
            "--mode", "image", "--freeze-image-encoder", "--device", "cpu", "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["train_rois"] == 1 and summary["validation_rois"] == 1 and summary["audited"]
    assert len(postgres.query(url, "SELECT id FROM audit WHERE event = 'model.trained'")) == 1
    assert not (storage / "rtprop.sqlite").exists()  # nothing went to a SQLite file beside the storage
    added = run("models", "add", str(out), *common)
    assert added.returncode == 0, added.stderr[-3000:]
    name = added.stdout.strip().splitlines()[-1]
    listed = {row["name"]: row for row in map(json.loads, run("models", "list", "--json", *common).stdout.splitlines())}
    assert set(listed) == {"classic", name} and listed[name]["state"] == "registered"
    activated = run("models", "activate", name, "--for-roi", "GTV.*", "--modality", "CT", "--force", "--reason",
                    "postgres test", "--no-progress", *common)
    assert activated.returncode == 0, activated.stderr[-3000:]
    assert postgres.query(url, "SELECT state, roi_regex, modality FROM models WHERE name = %s", (name,)) == \
        [("active", "GTV.*", "CT")]
    assert not (storage / "rtprop.sqlite").exists()
