"""The `rtprop` command line as users script it: argument forms, outputs on the input grid, exit codes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from pipeline.metrics import dice

RTPROP = [sys.executable, "-m", "cli"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(RTPROP + [str(a) for a in args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """An ellipsoid (60 HU) in a noisy 0 HU background, oblique direction, anisotropic spacing."""
    rng = np.random.default_rng(7)
    z, y, x = np.mgrid[0:24, 0:64, 0:72]
    truth = ((z - 12) / 8.0) ** 2 + ((y - 30) / 14.0) ** 2 + ((x - 40) / 18.0) ** 2 <= 1.0
    image = np.where(truth, 60.0, -10.0) + rng.normal(0, 6, truth.shape)
    img = sitk.GetImageFromArray(image.astype(np.float32))
    img.SetSpacing((0.8, 0.8, 2.5))
    img.SetOrigin((-20.0, 35.5, 100.0))
    c, s = np.cos(np.radians(25)), np.sin(np.radians(25))
    img.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    path = tmp_path_factory.mktemp("phantom") / "ct.nii.gz"
    sitk.WriteImage(img, str(path))
    return path, truth


def test_propagate_box_writes_mask_on_the_input_grid(phantom, tmp_path):
    path, truth = phantom
    rows, cols = np.nonzero(truth[12])
    out = tmp_path / "mask.nii.gz"
    res = run("propagate", path, "--box", f"12,{cols.min()},{rows.min()},{cols.max()},{rows.max()}",
              "--out", out, "--backend", "classic")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["backend"] == "classic" and summary["checkpoint_sha256"] is None
    assert 0.7 < summary["confidence"] <= 1.0 and summary["warnings"] == []  # a clear structure, boxed tight
    written = sitk.ReadImage(str(out))
    source = sitk.ReadImage(str(path))
    assert written.GetSize() == source.GetSize()
    assert np.allclose(written.GetDirection(), source.GetDirection())
    assert np.allclose(written.GetOrigin(), source.GetOrigin()) and np.allclose(written.GetSpacing(), source.GetSpacing())
    mask = sitk.GetArrayFromImage(written) > 0
    assert dice(mask, truth) > 0.85
    assert summary["voxels"] == int(mask.sum())


def test_propagate_real_nifti_ct_is_treated_as_ct(shared_data, tmp_path):
    # a NIfTI carries no Modality: the CLI must still see HU (read as MR-like percentiles, the organs
    # of this CT lose 0.04 mean Dice in bench/quality.py), exactly as the API given "CT"
    from models.propagate import propagate
    from pipeline.prompts import prompt_from_roi

    ct = shared_data / "totalseg-ct" / "ct_3mm.nii.gz"
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(ct))).astype(np.float32)
    kidney = sitk.GetArrayFromImage(sitk.ReadImage(str(shared_data / "totalseg-ct" / "ct_3mm_labels.nii.gz"))) == 2
    box = prompt_from_roi(kidney, "box")
    out = tmp_path / "kidney.nii.gz"
    res = run("propagate", ct, "--box", f"{box.slice_index},{box.x0},{box.y0},{box.x1},{box.y1}", "--out", out,
              "--backend", "classic")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1])["modality"] == "CT"
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out))) > 0
    assert np.array_equal(mask, propagate(image, (3.0, 3.0, 3.0), box, "CT").mask)
    assert dice(mask, kidney) > 0.8  # copying the key slice within the kidney's true extent: 0.735


def test_propagate_points_and_mask_prompts(phantom, tmp_path):
    path, truth = phantom
    out = tmp_path / "points.npz"
    res = run("propagate", path, "--point", "12,40,30,+", "--point", "12,5,5,-", "--out", out, "--backend", "classic")
    assert res.returncode == 0, res.stderr
    with np.load(out, allow_pickle=False) as data:
        assert dice(data["gts"] > 0, truth) > 0.8
    truth_file = tmp_path / "truth.nii.gz"
    ref = sitk.ReadImage(str(path))
    t = sitk.GetImageFromArray(truth.astype(np.uint8))
    t.CopyInformation(ref)
    sitk.WriteImage(t, str(truth_file))
    res = run("propagate", path, "--mask", truth_file, "--slice", "12", "--out", tmp_path / "m.mha", "--backend", "classic")
    assert res.returncode == 0, res.stderr
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "m.mha"))) > 0
    assert np.array_equal(mask[12], truth[12])  # the drawn contour is kept as drawn
    assert dice(mask, truth) > 0.85


@pytest.mark.parametrize("args,needle", [
    (["--box", "12,100,100,120,120"], "outside"),       # box outside the 72x64 image
    (["--box", "40,10,10,20,20"], "slice"),              # slice that does not exist
    (["--box", "12,30,20,10,40"], "box"),                # x1 < x0
    (["--box", "12,a,b,c,d"], "integers"),
    (["--point", "12,40,30,*"], "+ or -"),
    (["--box", "12,1,1,5,5", "--box", "12,2,2,9,9"], "at most one box"),  # two boxes on one slice
    (["--point", "12,40,30,-"], "positive"),             # nothing says where the structure is
    (["--mask", "THEVOLUME"], "binary"),                 # a CT is not a mask
    ([], "no prompt"),
])
def test_bad_prompts_exit_2_with_a_clear_message(phantom, tmp_path, args, needle):
    path, _ = phantom
    args = [str(path) if a == "THEVOLUME" else a for a in args]
    out = tmp_path / "x.nii.gz"
    res = run("propagate", path, *args, "--out", out, "--backend", "classic")
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert needle.lower() in res.stderr.lower()
    assert "Traceback" not in res.stderr
    assert not out.exists()  # nothing written half-way


def test_missing_checkpoint_names_the_file(phantom, tmp_path):
    path, _ = phantom
    ckpt = tmp_path / "models" / "sam2.1_hiera_tiny.pt"
    res = run("propagate", path, "--box", "12,30,20,50,40", "--out", tmp_path / "x.nii.gz",
              "--backend", "sam2", "--checkpoint", ckpt)
    assert res.returncode == 2
    assert ckpt.name in res.stderr and str(ckpt.parent) in res.stderr  # the file and where it goes
    assert "Traceback" not in res.stderr


def test_demo_writes_a_valid_rtstruct_better_than_copying(tmp_path):
    out = tmp_path / "demo"
    res = run("demo", "--out", out)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    rtstruct = Path(summary["rtstruct"])
    assert rtstruct.exists() and (out / "metrics.json").exists()
    # copying the middle slice to every slice scores 0.49 on this GTV (shared/data/README.md)
    assert summary["metrics"]["dice"] > 0.55
    assert subprocess.run(["dcmdump", "-q", str(rtstruct)], capture_output=True).returncode == 0
    errors = [l for l in subprocess.run(["dciodvfy", str(rtstruct)], capture_output=True, text=True).stderr.splitlines()
              if l.startswith("Error")]
    assert errors == []


def test_recontour_point_prompt_and_convert_round_trip(shared_data, tmp_path):
    series = shared_data / "sts-001" / "MR_T1" / "image"
    rs = shared_data / "sts-001" / "MR_T1" / "rtstruct" / "RS.dcm"
    res = run("recontour", series, rs, "--roi", "gtv_mass_mr_t1", "--prompt", "point", "--out", tmp_path / "rc")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["roi"] == "GTV_Mass_MR_T1" and summary["prompt"] == "point"
    metrics = json.loads((tmp_path / "rc" / "metrics.json").read_text())["metrics"]
    assert set(metrics) >= {"dice", "hd95_mm", "msd_mm", "nsd", "com_distance_mm", "volume_ratio"}
    # convert: RTSTRUCT -> mask -> RTSTRUCT -> evaluate against the original: identical
    mask = tmp_path / "gtv.nii.gz"
    assert run("convert", rs, mask, "--series", series).returncode == 0
    back = tmp_path / "gtv.dcm"
    assert run("convert", mask, back, "--series", series, "--roi-name", "GTV").returncode == 0
    res = run("evaluate", back, rs, "--series", series, "--roi", "GTV_Mass_MR_T1", "--pred-roi", "GTV")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["dice"] >= 0.98


def test_unknown_roi_lists_the_names(shared_data, tmp_path):
    series = shared_data / "sts-001" / "CT" / "image"
    rs = shared_data / "sts-001" / "CT" / "rtstruct" / "RS.dcm"
    res = run("recontour", series, rs, "--roi", "PTV", "--out", tmp_path)
    assert res.returncode == 2 and "GTV_Mass_CT" in res.stderr


def test_output_folder_must_exist(phantom, tmp_path):
    path, _ = phantom
    res = run("propagate", path, "--box", "12,30,20,50,40", "--out", tmp_path / "no" / "such" / "x.nii.gz",
              "--backend", "classic")
    assert res.returncode == 2 and "does not exist" in res.stderr
    assert not (tmp_path / "no").exists()  # nothing created on the user's behalf


# --------------------------------------------------------------------------- exit codes and dates (issue 10, defect 11)
@pytest.mark.parametrize("args,option", [
    (["batch", "--since", "yesterday"], "--since"),
    (["batch", "--until", "2026-13-40"], "--until"),
    (["audit", "export", "--since", "yesterday"], "--since"),
    (["audit", "export", "--until", "garbage"], "--until"),
])
def test_bad_dates_are_user_errors_naming_the_option(tmp_path, args, option):
    _tiny_database(tmp_path)
    res = run(*args, "--storage", tmp_path)
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert option in res.stderr and "ISO 8601" in res.stderr and "Traceback" not in res.stderr


def test_iso_dates_select_rows_as_documented(tmp_path):
    _tiny_database(tmp_path)
    today = run("audit", "export", "--storage", tmp_path, "--since", "2000-01-01")
    future = run("audit", "export", "--storage", tmp_path, "--since", "2999-01-01T00:00+01:00")
    assert today.returncode == future.returncode == 0
    assert len(today.stdout.splitlines()) == 1 and future.stdout == ""


def test_a_missing_storage_is_a_user_error(tmp_path):
    for args in (["audit", "verify"], ["audit", "export"], ["batch"], ["jobs", "list"]):
        res = run(*args, "--storage", tmp_path / "missing")
        assert res.returncode == 2 and "no rtprop database" in res.stderr, (args, res.stderr)


def _tiny_database(root: Path) -> None:
    from db import audit
    from db.engine import open_database, transaction

    factory = open_database(root / "rtprop.sqlite")
    with transaction(factory) as session:
        audit.record(session, "test.event")
    factory.kw["bind"].dispose()


# --------------------------------------------------------------------------- newcomer friction (issue 10, defect 14)
def test_series_uid_picks_one_of_two_series_in_a_folder(tmp_path):
    from phantoms import write_series

    folder = tmp_path / "two"
    image = np.zeros((6, 20, 20))
    image[1:5, 5:15, 5:15] = 100
    write_series(folder, image, series_instance_uid="1.2.3.4.100")
    for path in write_series(tmp_path / "other", image, series_instance_uid="1.2.3.4.200", seed=1):
        path.rename(folder / f"B{path.name}")
    out = tmp_path / "m.nii.gz"
    refused = run("propagate", folder, "--box", "3,5,5,14,14", "--out", out, "--backend", "classic")
    assert refused.returncode == 2 and "--series-uid" in refused.stderr
    picked = run("propagate", folder, "--series-uid", "1.2.3.4.200", "--box", "3,5,5,14,14", "--out", out,
                 "--backend", "classic")
    assert picked.returncode == 0, picked.stderr


def test_outputs_are_readable_like_the_archive(phantom, tmp_path):
    """Results and masks were written 0600 (tempfile) while the archive is 0644: a TPS import share could
    not read them. They follow the umask now."""
    import os

    path, truth = phantom
    old = os.umask(0o022)
    try:
        out = tmp_path / "mask.nii.gz"
        assert run("propagate", path, "--box", "12,30,20,50,40", "--out", out, "--backend", "classic").returncode == 0
        demo = tmp_path / "demo"
        assert run("demo", "--out", demo).returncode == 0
    finally:
        os.umask(old)
    assert oct(out.stat().st_mode & 0o777) == oct(0o644)
    assert [oct(p.stat().st_mode & 0o777) for p in demo.glob("*.dcm")] == [oct(0o644)]


def test_verbose_start_is_not_flooded_by_migrations(tmp_path):
    _tiny_database(tmp_path)
    res = run("-v", "audit", "verify", "--storage", tmp_path)
    assert res.returncode == 0 and "alembic" not in res.stderr.lower()


def test_convert_names_the_axis_order_of_the_spacing(phantom, tmp_path):
    path, _ = phantom
    res = run("convert", path, tmp_path / "v.npz")
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert "spacing_mm" not in summary and summary["spacing_zyx_mm"] == pytest.approx([2.5, 0.8, 0.8])
    assert summary["shape_zyx"] == [24, 64, 72]


def test_readme_lists_every_option_of_every_command():
    """The README's command table is where a newcomer looks: every long option `--help` shows is there."""
    import re

    from click.testing import CliRunner

    from cli.main import cli

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    missing = []

    def walk(command, path):
        if hasattr(command, "commands"):
            for name, sub in command.commands.items():
                walk(sub, path + [name])
            return
        for param in command.params:
            for opt in getattr(param, "opts", []) + getattr(param, "secondary_opts", []):
                if opt.startswith("--") and opt not in ("--help", "--config", "--storage") and opt not in readme:
                    missing.append(f"rtprop {' '.join(path)} {opt}")

    walk(cli, [])
    assert not missing, missing
    assert re.search(r"rtprop jobs", readme) and CliRunner().invoke(cli, ["--help"]).exit_code == 0


def test_docs_name_the_drop_in_folders_the_code_uses():
    from config.schema import DropInConfig

    docs = (Path(__file__).resolve().parents[1] / "docs" / "pipeline.md").read_text()
    defaults = DropInConfig()
    for name in ("inbox", "done", "outbox", "quarantine"):
        assert f"`{getattr(defaults, name)}/" in docs, name


def test_a_label_map_with_a_flipped_axis_lands_where_its_patient_coordinates_say(shared_data, tmp_path):
    """totalseg's dicom_labels.nii.gz has the series' shape but its y axis flipped: taken as a raw array it
    is the mirror image (liver at -75 HU). Through patient coordinates the liver averages about 89 HU."""
    from converters.rtstruct_read import read_rtstruct
    from converters.series import read_series

    series = shared_data / "totalseg-ct" / "dicom"
    out = tmp_path / "labels.dcm"
    res = run("convert", shared_data / "totalseg-ct" / "dicom_labels.nii.gz", out, "--series", series)
    assert res.returncode == 0, res.stderr
    volume = read_series(series)
    liver = read_rtstruct(out, volume).roi("dicom_labels_5").mask
    assert liver.sum() > 1000 and 60 < float(volume.array[liver].mean()) < 120


def test_prompts_on_several_slices_and_corrective_clicks_from_the_command_line(phantom, tmp_path):
    """`--box` and `--point` repeat with different Z, a 3D `--mask` without `--slice` gives one outline per
    drawn slice; the result passes through every prompted slice."""
    path, truth = phantom
    boxes = []
    for z in (6, 12, 18):
        rows, cols = np.nonzero(truth[z])
        boxes += ["--box", f"{z},{cols.min()},{rows.min()},{cols.max()},{rows.max()}"]
    out = tmp_path / "multi.nii.gz"
    res = run("propagate", path, *boxes, "--point", "9,40,30,+", "--point", "20,5,5,-", "--out", out,
              "--backend", "classic")
    assert res.returncode == 0, res.stderr
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out))) > 0
    assert all(mask[z].any() for z in (6, 9, 12, 18)) and dice(mask, truth) > 0.8
    drawn = tmp_path / "drawn.nii.gz"
    outline = np.zeros_like(truth)
    outline[[7, 17]] = truth[[7, 17]]
    reference = sitk.ReadImage(str(path))
    img = sitk.GetImageFromArray(outline.astype(np.uint8))
    img.CopyInformation(reference)
    sitk.WriteImage(img, str(drawn))
    res = run("propagate", path, "--mask", drawn, "--out", tmp_path / "m.nii.gz", "--backend", "classic")
    assert res.returncode == 0, res.stderr
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "m.nii.gz"))) > 0
    assert dice(mask[7], truth[7]) > 0.95 and dice(mask[17], truth[17]) > 0.95 and mask[8:17].any(axis=(1, 2)).all()
