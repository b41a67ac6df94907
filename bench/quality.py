"""Quality of the classic propagator on the real data in ../shared/data (a script, not a test).

Cases (the 41 shared ones): every organ of totalseg-ct/ct_3mm that spans >= 5 axial slices, and the
GTV of sts-001 on CT and MR T1; with --cases totalseg512, the organs of totalseg-ct/dicom at 512 x 512
(0.98 mm pixels, as most clinical CT) instead. Prompts, as a planner would give them, propagated by
models.propagate.propagate with backend classic:
- box: the tight bounding box of the reference on its middle slice (pipeline.prompts.prompt_from_roi);
- point: one click at the deepest point of the middle slice; mask: the middle slice's outline;
- multi: tight boxes on the slices at 25 %, 50 % and 75 % of the reference's extent;
- corrective: the point prompt, then up to 3 corrective clicks, each at the deepest point of the
  largest error region (2D connected piece, any slice): positive in a miss, negative in a leak;
  Dice after each click (`dice_after_clicks`; `dice` is the last).
- boxclicks (the CVPR 2025 interactive-3D protocol): the box prompt, then up to --clicks (5) clicks,
  each at the deepest point of the largest 3D error region (positive in a miss, negative in a leak),
  on whatever slice it lies, given to models.corrections.correct as a reviewer's corrections (each
  with the result before it as `previous`, as the review page does); Dice after each click.
For multi and boxclicks the summary lists the cases ending below the box alone (`below_box`).
Baselines: the middle-slice mask copied to every slice, and copied within the true extent.
Each result's guard warnings (models/guard.py) are kept; the summary gives the share flagged.

    .venv/bin/python bench/quality.py [--data ../shared/data]
                                      [--prompt box|point|mask|multi|corrective|boxclicks] [--clicks 5]
                                      [--cases shared|totalseg512]
                                      [--method register_refine|intensity]
                                      [--key-slice tight_select|histogram]
                                      [--only totalseg_label5,sts001_GTV_Mass_CT]
                                      [--out bench/results/quality.json, quality_point.json,
                                             quality_point_totalseg512.json, ...]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from config.schema import PropagationConfig
from models.corrections import correct
from models.prompts import BoxPrompt, MaskPrompt, PointPrompt, Prompt, PromptError
from models.propagate import propagate
from models.result import PropagationResult
from pipeline.metrics import evaluate_masks
from pipeline.prompts import box_from_slice, middle_slice, prompt_from_roi

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("RTPROP_SHARED_DATA", REPO.parent / "shared" / "data"))
MIN_SLICES = 5


def totalseg_cases(data: Path) -> list[dict]:
    """(name, image, spacing_zyx, mask, modality) for each ct_3mm organ spanning >= MIN_SLICES slices."""
    image = sitk.ReadImage(str(data / "totalseg-ct" / "ct_3mm.nii.gz"))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(data / "totalseg-ct" / "ct_3mm_labels.nii.gz")))
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    spacing = tuple(float(s) for s in reversed(image.GetSpacing()))
    cases = []
    for value in np.unique(labels)[1:]:
        mask = labels == value
        if int(mask.any(axis=(1, 2)).sum()) >= MIN_SLICES:
            cases.append(dict(name=f"totalseg_label{int(value)}", image=array, spacing=spacing, mask=mask,
                              modality="CT"))
    return cases


def totalseg512_cases(data: Path) -> list[dict]:
    """Each organ spanning >= MIN_SLICES slices of totalseg-ct/dicom (20 slices, 512 x 512, 0.98 mm, 2 mm
    apart): the same kind of organs at a clinical resolution. Its labels are resampled onto the series
    through physical coordinates (the NIfTI's y axis is flipped against the DICOM rows)."""
    from converters.series import read_series
    from converters.volume_io import volume_to_sitk

    volume = read_series(data / "totalseg-ct" / "dicom")
    labels = sitk.GetArrayFromImage(sitk.Resample(sitk.ReadImage(str(data / "totalseg-ct" / "dicom_labels.nii.gz")),
                                                  volume_to_sitk(volume), sitk.Transform(),
                                                  sitk.sitkNearestNeighbor, 0))
    array = volume.array.astype(np.float32)
    cases = []
    for value in np.unique(labels)[1:]:
        mask = labels == value
        if int(mask.any(axis=(1, 2)).sum()) >= MIN_SLICES:
            cases.append(dict(name=f"totalseg512_label{int(value)}", image=array, spacing=volume.geometry.spacing_zyx,
                              mask=mask, modality="CT"))
    return cases


def sts_cases(data: Path) -> list[dict]:
    """The sts-001 GTV on CT and MR T1, read through the project's converters."""
    from converters.rtstruct_read import read_rtstruct
    from converters.series import read_series

    cases = []
    for folder, modality in (("CT", "CT"), ("MR_T1", "MR")):
        volume = read_series(data / "sts-001" / folder / "image")
        rtstruct = next((data / "sts-001" / folder / "rtstruct").glob("*.dcm"))
        roi = read_rtstruct(rtstruct, volume).rois[0]
        cases.append(dict(name=f"sts001_{roi.name}", image=volume.array.astype(np.float32),
                          spacing=volume.geometry.spacing_zyx, mask=np.asarray(roi.mask, dtype=bool),
                          modality=volume.modality or modality))
    return cases


def _extent(mask: np.ndarray) -> tuple[int, int] | None:
    slices = np.flatnonzero(mask.any(axis=(1, 2)))
    return (int(slices[0]), int(slices[-1])) if slices.size else None


def _deepest_point(region: np.ndarray, spacing_yx: tuple[float, float]) -> tuple[int, int]:
    """(x, y) of the pixel of `region` farthest from its edge: where a planner clicks."""
    depth = ndimage.distance_transform_edt(np.pad(region, 1), sampling=spacing_yx)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return int(x), int(y)


def _nearest_contoured(mask: np.ndarray, z: int) -> int:
    slices = np.flatnonzero(mask.any(axis=(1, 2)))
    return int(slices[np.argmin(np.abs(slices - z))])


def make_prompts(mask: np.ndarray, kind: str, spacing_yx: tuple[float, float]) -> list[Prompt]:
    """The prompts a planner would give: on the reference's middle slice, or (multi) on three slices."""
    if kind == "box":
        return [prompt_from_roi(mask, "box")]
    if kind == "multi":
        lo, hi = _extent(mask)
        slices = sorted({_nearest_contoured(mask, lo + round(f * (hi - lo))) for f in (0.25, 0.5, 0.75)})
        return [box_from_slice(mask[z], z) for z in slices]
    z = middle_slice(mask)
    if kind == "mask":
        return [MaskPrompt(z, mask[z])]
    x, y = _deepest_point(mask[z], spacing_yx)
    return [PointPrompt(z, ((x, y, True),))]


def corrective_click(predicted: np.ndarray, reference: np.ndarray, spacing_yx: tuple[float, float],
                     taken: set[tuple[int, int, int]]) -> PointPrompt | None:
    """One click at the deepest point of the largest 2D error piece on any slice (+ in a miss, - in a leak).

    A piece whose deepest point was clicked before is passed over (the planner would not click the
    same pixel twice); None when nothing is wrong.
    """
    pieces = []
    for positive, error in ((True, reference & ~predicted), (False, predicted & ~reference)):
        for z in np.flatnonzero(error.any(axis=(1, 2))):
            labels, n = ndimage.label(error[z])
            sizes = np.bincount(labels.ravel())
            pieces += [(int(sizes[i]), int(z), i, positive, labels) for i in range(1, n + 1)]
    for _size, z, i, positive, labels in sorted(pieces, key=lambda p: (-p[0], p[1], p[2], not p[3])):
        x, y = _deepest_point(labels == i, spacing_yx)
        if (z, x, y) not in taken:
            taken.add((z, x, y))
            return PointPrompt(z, ((x, y, positive),))
    return None


def error_click(predicted: np.ndarray, reference: np.ndarray, spacing_zyx: tuple[float, float, float],
                taken: set[tuple[int, int, int]]) -> PointPrompt | None:
    """One click at the deepest point (3D, in mm) of the largest 3D error region (26-connected):
    positive in a miss, negative in a leak, on whatever slice that point lies (CVPR 2025 interactive
    3D protocol). A region whose deepest point was clicked before is passed over; None: nothing wrong."""
    regions = []
    for positive, error in ((True, reference & ~predicted), (False, predicted & ~reference)):
        labels, n = ndimage.label(error, structure=np.ones((3, 3, 3), dtype=bool))
        sizes = np.bincount(labels.ravel())
        regions += [(int(sizes[i]), positive, i, labels) for i in range(1, n + 1)]
    for _size, positive, i, labels in sorted(regions, key=lambda r: (-r[0], not r[1], r[2])):
        region = labels == i
        zs, ys, xs = (np.flatnonzero(region.any(axis=a)) for a in ((1, 2), (0, 2), (0, 1)))
        box = (slice(zs[0], zs[-1] + 1), slice(ys[0], ys[-1] + 1), slice(xs[0], xs[-1] + 1))
        depth = ndimage.distance_transform_edt(np.pad(region[box], 1), sampling=spacing_zyx)[1:-1, 1:-1, 1:-1]
        z, y, x = (int(v) + b.start for v, b in zip(np.unravel_index(int(np.argmax(depth)), depth.shape), box))
        if (z, x, y) not in taken:
            taken.add((z, x, y))
            return PointPrompt(z, ((x, y, positive),))
    return None


def _case_row(case: dict) -> dict:
    mask = case["mask"]
    z = middle_slice(mask)
    everywhere = np.repeat(mask[z][None], mask.shape[0], axis=0)
    within = everywhere.copy()
    lo, hi = _extent(mask)
    within[:lo] = False
    within[hi + 1:] = False
    return {"structure": case["name"], "modality": case["modality"], "slices_in_gt": int(hi - lo + 1),
            "true_extent": [lo, hi], "key_slice": z,
            "baseline_copy_everywhere_dice": evaluate_masks(everywhere, mask, case["spacing"])["dice"],
            "baseline_copy_within_extent_dice": evaluate_masks(within, mask, case["spacing"])["dice"]}


def _score(row: dict, case: dict, prompts: list[Prompt], settings: PropagationConfig,
           corrections: list[Prompt] | None = None, previous: PropagationResult | None = None
           ) -> PropagationResult | None:
    """Propagate `prompts` (with `corrections`: through models.corrections.correct, given `previous`) and
    write the figures into `row`; None (Dice 0, error kept) if refused."""
    mask, spacing, z = case["mask"], case["spacing"], row["key_slice"]
    t0 = time.perf_counter()
    try:
        if corrections is None:
            result = propagate(case["image"], spacing, prompts, case["modality"], settings)
        else:
            result = correct(case["image"], spacing, prompts, corrections, case["modality"], settings, previous)
    except PromptError as exc:  # counted as a failure (Dice 0), not hidden
        row.update(error=str(exc), dice=0.0, key_slice_dice=0.0, hd95_mm=None, predicted_extent=None, warnings=[])
        return None
    row["seconds"] = time.perf_counter() - t0
    metrics = evaluate_masks(result.mask, mask, spacing)
    row.update(dice=metrics["dice"], hd95_mm=metrics["hd95_mm"], msd_mm=metrics["msd_mm"], nsd=metrics["nsd"],
               predicted_extent=_extent(result.mask), stop=result.details.get("stop"),
               key_slice_dice=evaluate_masks(result.mask[z], mask[z], spacing[1:])["dice"],
               per_slice_s=result.details["timings_s"]["per_slice"], warnings=list(result.warnings))
    row.pop("error", None)
    return result


def evaluate_case(case: dict, settings: PropagationConfig, kind: str = "box", clicks: int = 3) -> dict:
    row = _case_row(case)
    first = {"corrective": "point", "boxclicks": "box"}.get(kind, kind)
    prompts = make_prompts(case["mask"], first, case["spacing"][1:])
    row["prompts"] = [_describe(p) for p in prompts]
    result = _score(row, case, prompts, settings)
    if kind == "multi":  # the middle box alone, which the boxes on three slices must not end below
        alone: dict = {"key_slice": row["key_slice"]}
        _score(alone, case, make_prompts(case["mask"], "box", case["spacing"][1:]), settings)
        row["box_dice"] = alone["dice"]
    if kind == "boxclicks":
        return _box_then_clicks(row, case, prompts, result, settings, clicks)
    if kind != "corrective":
        return row
    row["dice_after_clicks"] = [row["dice"]]
    row["key_slice_dice_after_clicks"] = [row["key_slice_dice"]]
    row["warnings_after_clicks"] = [row["warnings"]]
    taken = {(p.slice_index, x, y) for p in prompts if isinstance(p, PointPrompt) for x, y, _ in p.points}
    for _ in range(clicks):
        predicted = result.mask if result is not None else np.zeros_like(case["mask"])
        click = corrective_click(predicted, case["mask"], case["spacing"][1:], taken)
        if click is not None:
            prompts.append(click)
            row["prompts"].append(_describe(click))
            result = _score(row, case, prompts, settings)
        row["dice_after_clicks"].append(row["dice"])
        row["key_slice_dice_after_clicks"].append(row["key_slice_dice"])
        row["warnings_after_clicks"].append(row["warnings"])
    return row


def _box_then_clicks(row: dict, case: dict, prompts: list[Prompt], result: PropagationResult | None,
                     settings: PropagationConfig, clicks: int) -> dict:
    """The CVPR 2025 interactive protocol on `row`: clicks at the largest 3D error, each a correction."""
    row["box_dice"] = row["dice"]
    for key in ("dice", "key_slice_dice", "warnings"):
        row[f"{key}_after_clicks"] = [row[key]]
    row["correction_s"] = []
    corrections: list[Prompt] = []
    taken: set[tuple[int, int, int]] = set()
    for _ in range(clicks):
        predicted = result.mask if result is not None else np.zeros_like(case["mask"])
        click = error_click(predicted, case["mask"], case["spacing"], taken)
        if click is not None:
            corrections.append(click)
            row["prompts"].append(_describe(click))
            result = _score(row, case, prompts, settings, corrections, result) or result
            row["correction_s"].append(row.get("seconds"))
        for key in ("dice", "key_slice_dice", "warnings"):
            row[f"{key}_after_clicks"].append(row[key])
    return row


def _describe(prompt: Prompt) -> str:
    if isinstance(prompt, BoxPrompt):
        return f"box z={prompt.slice_index} ({prompt.x0},{prompt.y0})-({prompt.x1},{prompt.y1})"
    if isinstance(prompt, PointPrompt):
        return f"click z={prompt.slice_index} " + " ".join(f"({x},{y}){'+' if p else '-'}" for x, y, p in prompt.points)
    return f"outline z={prompt.slice_index} ({int(np.count_nonzero(prompt.mask))} px)"


GROUPS = (("organs", lambda r: r["structure"].startswith("totalseg_")),
          ("organs_512", lambda r: r["structure"].startswith("totalseg512_")),
          ("gtv_ct", lambda r: r["structure"].startswith("sts001_") and r["modality"] == "CT"),
          ("gtv_mr", lambda r: r["structure"].startswith("sts001_") and r["modality"] != "CT"),
          ("all", lambda r: True))


def grouped(rows: list[dict]) -> list[tuple[str, list[dict]]]:
    """(group, its rows) for each of GROUPS that has any."""
    pairs = [(group, [r for r in rows if member(r)]) for group, member in GROUPS]
    return [(group, chosen) for group, chosen in pairs if chosen]


def summarise(rows: list[dict]) -> dict:
    """Mean Dice (and key-slice Dice, baselines, share flagged by the guard) per group of cases."""
    summary = {}
    for group, chosen in grouped(rows):
        s = {"n": len(chosen)}
        for key in ("dice", "key_slice_dice", "baseline_copy_everywhere_dice", "baseline_copy_within_extent_dice"):
            s[key] = float(np.mean([r[key] for r in chosen]))
        s["flagged"] = sum(bool(r.get("warnings")) for r in chosen)
        s["flagged_fraction"] = s["flagged"] / len(chosen)
        # a flag on a result of Dice >= 0.5 is a false flag; one on Dice < 0.2 a caught failure
        good, bad = [r for r in chosen if r["dice"] >= 0.5], [r for r in chosen if r["dice"] < 0.2]
        s["false_flags"] = f"{sum(bool(r.get('warnings')) for r in good)}/{len(good)}"
        s["caught_failures"] = f"{sum(bool(r.get('warnings')) for r in bad)}/{len(bad)}"
        if "box_dice" in chosen[0]:  # more from the planner must never cost accuracy: who ends below?
            s["box_dice"] = float(np.mean([r["box_dice"] for r in chosen]))
            s["below_box"] = {r["structure"]: [round(r["box_dice"], 3), round(r["dice"], 3)] for r in chosen
                              if r["dice"] < r["box_dice"] - 1e-3}
            if "dice_after_clicks" in chosen[0]:
                s["below_box_after_clicks"] = [
                    sum(d < r["box_dice"] - 1e-3 for r in chosen for d in [r["dice_after_clicks"][k]])
                    for k in range(len(chosen[0]["dice_after_clicks"]))]
        if "dice_after_clicks" in chosen[0]:
            s["dice_after_clicks"] = [float(v) for v in np.mean([r["dice_after_clicks"] for r in chosen], axis=0)]
            s["key_slice_dice_after_clicks"] = [float(v) for v in
                                                np.mean([r["key_slice_dice_after_clicks"] for r in chosen], axis=0)]
        summary[group] = s
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared data folder")
    parser.add_argument("--prompt", choices=["box", "point", "mask", "multi", "corrective", "boxclicks"],
                        default="box", help="prompt kind (default box; see above)")
    parser.add_argument("--clicks", type=int, default=None,
                        help="clicks after the first prompt (corrective: default 3; boxclicks: default 5)")
    parser.add_argument("--method", choices=["register_refine", "intensity"], default=None,
                        help="classic method (default: the config default)")
    parser.add_argument("--key-slice", choices=["tight_select", "histogram"], default=None,
                        help="classic key-slice segmentation for box prompts (default: the config default)")
    parser.add_argument("--cases", choices=["shared", "totalseg512"], default="shared",
                        help="shared: the 41 cases above (default); totalseg512: the organs of totalseg-ct/dicom "
                             "at 512 x 512")
    parser.add_argument("--only", default="", help="comma-separated structure names to run (default: all)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON results (default bench/results/quality.json, quality_<prompt>.json if not box)")
    args = parser.parse_args(argv)

    settings = PropagationConfig(backend="classic")
    if args.method:
        settings.classic.method = args.method
    if args.key_slice:
        settings.classic.key_slice = args.key_slice
    cases = (totalseg_cases(args.data) + sts_cases(args.data) if args.cases == "shared"
             else totalseg512_cases(args.data))
    if args.only:
        wanted = set(args.only.split(","))
        cases = [c for c in cases if c["name"] in wanted]

    rows = []
    print(f"{'structure':30s} {'slices':>6s} {'dice':>6s} {'key':>6s} {'hd95mm':>7s} {'pred extent':>12s}"
          f" {'true extent':>12s} {'copy':>6s} {'copyext':>7s}  guard / clicks")
    for case in cases:
        row = evaluate_case(case, settings, args.prompt,
                            args.clicks if args.clicks is not None else 5 if args.prompt == "boxclicks" else 3)
        rows.append(row)
        pe = row.get("predicted_extent")
        hd = row.get("hd95_mm")
        after = ("  clicks: " + " ".join(f"{d:.3f}" for d in row["dice_after_clicks"])
                 if "dice_after_clicks" in row else "")
        flag = f"  FLAG: {'; '.join(row['warnings'])}" if row.get("warnings") else ""
        print(f"{row['structure']:30s} {row['slices_in_gt']:6d} {row['dice']:6.3f} {row['key_slice_dice']:6.3f} "
              f"{(f'{hd:7.1f}' if hd is not None else '      -')} {str(pe):>12s} {str(row['true_extent']):>12s} "
              f"{row['baseline_copy_everywhere_dice']:6.3f} {row['baseline_copy_within_extent_dice']:7.3f}"
              f"{after}{flag}", flush=True)

    summary = summarise(rows)
    for group, s in summary.items():
        after = ("  after clicks: " + " ".join(f"{d:.3f}" for d in s["dice_after_clicks"])
                 if "dice_after_clicks" in s else "")
        print(f"MEAN {group:8s} n={s['n']:2d} dice={s['dice']:.3f}  key-slice={s['key_slice_dice']:.3f}  "
              f"copy-everywhere={s['baseline_copy_everywhere_dice']:.3f}  "
              f"copy-within-extent={s['baseline_copy_within_extent_dice']:.3f}  "
              f"flagged={s['flagged']}/{s['n']} (Dice>=0.5: {s['false_flags']}, Dice<0.2: {s['caught_failures']}){after}")
        if "below_box" in s:
            print(f"     below the box alone ({s['box_dice']:.3f}): {len(s['below_box'])}/{s['n']} "
                  + " ".join(f"{name} {b:.3f}->{d:.3f}" for name, (b, d) in s["below_box"].items())
                  + (f"; after each click: {s['below_box_after_clicks']}" if "below_box_after_clicks" in s else ""))
    if args.out is None:
        name = "quality" + ("" if args.prompt == "box" else f"_{args.prompt}")
        name += ("" if args.cases == "shared" else f"_{args.cases}") + ".json"
        args.out = REPO / "bench" / "results" / name
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"prompt": args.prompt, "method": settings.classic.method,
                                    "key_slice": settings.classic.key_slice,
                                    "summary": summary, "cases": rows},
                                   indent=2, default=str))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
