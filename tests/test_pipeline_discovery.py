"""Prompt discovery on the real sts-001 CT with prompt RTSTRUCTs built as a TPS writes them."""
from __future__ import annotations

import pytest

from config.schema import PipelineConfig, RTStructConfig
from converters.tps import output_style
from pipeline.prompt_rois import find_prompts
from pipeline_helpers import sts_prompt_case


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    from converters.rtstruct_read import read_rtstruct

    c = sts_prompt_case("CT", tmp_path_factory.mktemp("p"))
    c["ss"] = read_rtstruct(c["prompt_path"], c["volume"])
    return c


def test_rectangle_is_an_exact_box_and_points_group_by_marker(case):
    specs, notes = find_prompts(case["ss"], case["volume"], PipelineConfig())
    by = {s.structure: s for s in specs}
    assert set(by) == {"GTV", "GTVpt"}
    assert by["GTV"].kind == "box" and by["GTV"].box == list(case["box"]) and by["GTV"].slice == case["slice"]
    assert by["GTVpt"].kind == "point" and sorted(p[2] for p in by["GTVpt"].points) == [False, True]


def test_mask_mode_and_custom_markers(case):
    specs, _ = find_prompts(case["ss"], case["volume"], PipelineConfig(prompt_mode="mask"))
    assert {s.structure: s.kind for s in specs}["GTV"] == "mask"
    specs, notes = find_prompts(case["ss"], case["volume"], PipelineConfig(positive_point_marker="_pos",
                                                                          negative_point_marker="_neg"))
    assert [s.structure for s in specs] == ["GTV"] and any("no +/- marker" in n for n in notes)


def test_recontour_regex_on_the_reference_rtstruct(case):
    from converters.rtstruct_read import read_rtstruct
    from pipeline_helpers import STS_CT

    ref = read_rtstruct(next((STS_CT / "rtstruct").iterdir()), case["volume"])
    assert find_prompts(ref, case["volume"], PipelineConfig())[0] == []  # fully contoured: left alone
    specs, _ = find_prompts(ref, case["volume"], PipelineConfig(recontour_roi_regex="gtv_.*"))
    assert len(specs) == 1 and specs[0].mode == "recontour" and specs[0].kind == "box"


def test_tps_profiles():
    eclipse = output_style("GTV p/1", RTStructConfig(tps_profile="eclipse"))
    assert eclipse == {"name": "GTV p_1", "color": (255, 0, 0), "interpreted_type": "GTV"}
    generic = output_style("Liver", RTStructConfig())
    assert generic["interpreted_type"] == "ORGAN" and generic["color"] == (255, 128, 0)
    assert output_style("PTV_High", RTStructConfig(tps_profile="raystation"))["interpreted_type"] == "PTV"


# --------------------------------------------------------------------------- what a received job waits for
def _node_db(root, **pipeline):
    from config.load import load_config, resolve_storage
    from db.engine import open_database
    from dicom_node.storage import Store

    config = resolve_storage(load_config(None, environ={}, overrides={
        "storage": {"root": str(root), "fsync": False}, "node": {"series_quiet_period_s": 0},
        "pipeline": {"series_wait_s": 3600, **pipeline}}))
    factory = open_database(config.storage.database)
    return config, factory, Store(config.storage, factory, fsync=False)


def _ingest(store, *paths):
    from dicom_node.storage import Received

    for path in paths:
        assert store.ingest(path.read_bytes(), Received(calling_ae="TPS")).status == 0


def test_a_prompt_without_its_images_says_what_it_waits_for_at_once_then_fails_cleanly(tmp_path, caplog):
    """No silent hour in `received`: the first pass writes what the job waits for to the job, the log
    and the audit (once, not on every pass); after pipeline.series_wait_s it fails with that reason."""
    import logging
    from datetime import timedelta

    from sqlalchemy import select

    from db.schema import AuditEntry, Job, utcnow
    from dicom_node.completion import CompletionChecker
    from pipeline.discovery import discover, resolve_received
    from pipeline_helpers import synthetic_case

    case = tmp_path / "case"
    synthetic_case(case, seed=3)
    config, factory, store = _node_db(tmp_path / "s")
    _ingest(store, case / "RS_prompt.dcm")
    CompletionChecker(factory, config).check()
    with caplog.at_level(logging.INFO, logger="rtprop"):
        discover(factory, config)
        discover(factory, config)
    with factory() as session:
        job = session.execute(select(Job)).scalar_one()
        waiting = session.execute(select(AuditEntry).where(AuditEntry.event == "job.waiting")).scalars().all()
    assert job.state == "received" and job.waiting_for.startswith("waiting for image")
    assert len(waiting) == 1 and job.study_instance_uid in waiting[0].study_instance_uid
    assert any("waiting for image" in r.getMessage() for r in caplog.records)
    changed = resolve_received(factory, config, now=utcnow() + timedelta(seconds=3601))
    with factory() as session:
        job = session.get(Job, job.id)
    assert changed == {job.id: "failed"} and "no image series after" in job.error and job.waiting_for == ""


def test_an_ambiguous_series_fails_at_once_naming_the_candidates(tmp_path):
    """Two series of the study in the prompt's Frame of Reference, neither holding the images it
    references: refused on the first pass, both named; never a guess."""
    import pydicom
    from pydicom.uid import generate_uid
    from sqlalchemy import select

    from db.schema import Job
    from dicom_node.completion import CompletionChecker
    from pipeline.discovery import discover
    from pipeline_helpers import make_prompt_rtstruct, synthetic_case

    case = tmp_path / "case"
    info = synthetic_case(case, seed=4)
    images = sorted(case.glob("IMG*.dcm"))
    twin_uid = generate_uid()
    twins = []
    for i, path in enumerate(images):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID, ds.SOPInstanceUID = twin_uid, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(tmp_path / f"T{i:02d}.dcm")
        twins.append(tmp_path / f"T{i:02d}.dcm")
    prompt = make_prompt_rtstruct(info["volume"], tmp_path / "RS.dcm", boxes=[("Tumour", 6, (8, 8, 16, 16))],
                                  reference_images=False)
    config, factory, store = _node_db(tmp_path / "s")
    _ingest(store, *images, *twins, prompt)
    CompletionChecker(factory, config).check()
    discover(factory, config)
    with factory() as session:
        job = session.execute(select(Job)).scalar_one()
    assert job.state == "failed" and "ambiguous" in job.error
    assert twin_uid in job.error and info["volume"].series_instance_uid in job.error


def test_an_roi_drawn_on_a_few_separate_slices_is_one_prompt_on_each_of_them(case, tmp_path):
    """The TPS convention for prompts on several slices: first, middle and last slice of the target,
    none of them neighbours. Neighbouring slices are a contour, not a prompt; clicks add to a drawn prompt."""
    from converters.rtstruct_read import read_rtstruct
    from pipeline.prompt_rois import prompt_objects
    from pipeline_helpers import make_prompt_rtstruct

    z, (x0, y0, x1, y1) = case["slice"], case["box"]
    path = make_prompt_rtstruct(case["volume"], tmp_path / "RS.dcm", boxes=[
        ("GTV", z - 6, (x0 + 4, y0 + 4, x1 - 4, y1 - 4)), ("GTV", z, (x0, y0, x1, y1)), ("GTV", z + 6, (x0, y0, x1, y1)),
        ("Near", z, (x0, y0, x1, y1)), ("Near", z + 1, (x0, y0, x1, y1))],
        points=[("GTV-", z + 3, [(x0 + 2.0, y0 + 2.0)]), ("GTV+", z + 3, [case["inside"]])])
    specs, notes = find_prompts(read_rtstruct(path, case["volume"]), case["volume"], PipelineConfig())
    assert [s.structure for s in specs] == ["GTV"]
    gtv = specs[0]
    assert gtv.slices == [z - 6, z, z + 3, z + 6] and gtv.describe() == f"box + clicks on slices {z - 6}, {z}, {z + 3}, {z + 6}"
    assert [p["box"] for p in gtv.parts if p["kind"] == "box"][0] == [x0 + 4, y0 + 4, x1 - 4, y1 - 4]
    assert any("'Near'" in n and "neighbouring" in n for n in notes)
    back = type(gtv).from_json(gtv.to_json())  # what the job row stores
    prompts = prompt_objects(back)
    assert [p.slice_index for p in prompts] == [z - 6, z, z + 3, z + 6]
    assert sorted(pos for _, _, pos in prompts[2].points) == [False, True]
