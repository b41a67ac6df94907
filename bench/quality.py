"""Quality of the classic propagator on the real data in ../shared/data (a script, not a test).

Cases: every organ of totalseg-ct/ct_3mm that spans >= 5 axial slices, and the GTV of sts-001 on
CT and MR T1. Prompt: the tight bounding box of the reference on its middle slice
(pipeline.prompts.prompt_from_roi), propagated by models.propagate.propagate with backend classic.
Baselines: the middle-slice mask copied to every slice, and copied within the true extent.

    .venv/bin/python bench/quality.py [--data ../shared/data] [--prompt box|point|mask]
                                      [--method register_refine|intensity]
                                      [--key-slice tight_select|histogram]
                                      [--only totalseg_label5,sts001_GTV_Mass_CT]
                                      [--out bench/results/quality.json, quality_point.json, ...]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from config.schema import PropagationConfig
from models.prompts import MaskPrompt, PointPrompt, Prompt, PromptError
from models.propagate import propagate
from pipeline.metrics import evaluate_masks
from pipeline.prompts import middle_slice, prompt_from_roi

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


def make_prompt(mask: np.ndarray, kind: str, spacing_yx: tuple[float, float]) -> Prompt:
    """The prompt a planner would give on the reference's middle slice."""
    if kind == "box":
        return prompt_from_roi(mask, "box")
    z = middle_slice(mask)
    if kind == "mask":
        return MaskPrompt(z, mask[z])
    depth = ndimage.distance_transform_edt(np.pad(mask[z], 1), sampling=spacing_yx)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return PointPrompt(z, ((int(x), int(y), True),))


def evaluate_case(case: dict, settings: PropagationConfig, kind: str = "box") -> dict:
    mask, spacing = case["mask"], case["spacing"]
    z = middle_slice(mask)
    everywhere = np.repeat(mask[z][None], mask.shape[0], axis=0)
    within = everywhere.copy()
    lo, hi = _extent(mask)
    within[:lo] = False
    within[hi + 1:] = False
    row = {"structure": case["name"], "modality": case["modality"], "slices_in_gt": int(hi - lo + 1),
           "true_extent": [lo, hi], "key_slice": z,
           "baseline_copy_everywhere_dice": evaluate_masks(everywhere, mask, spacing)["dice"],
           "baseline_copy_within_extent_dice": evaluate_masks(within, mask, spacing)["dice"]}
    t0 = time.perf_counter()
    try:
        result = propagate(case["image"], spacing, make_prompt(mask, kind, spacing[1:]), case["modality"], settings)
    except PromptError as exc:  # counted as a failure (Dice 0), not hidden
        row.update(error=str(exc), dice=0.0, key_slice_dice=0.0, hd95_mm=None, predicted_extent=None)
        return row
    row["seconds"] = time.perf_counter() - t0
    metrics = evaluate_masks(result.mask, mask, spacing)
    row.update(dice=metrics["dice"], hd95_mm=metrics["hd95_mm"], msd_mm=metrics["msd_mm"], nsd=metrics["nsd"],
               predicted_extent=_extent(result.mask), stop=result.details.get("stop"),
               key_slice_dice=evaluate_masks(result.mask[z], mask[z], spacing[1:])["dice"],
               per_slice_s=result.details["timings_s"]["per_slice"])
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared data folder")
    parser.add_argument("--prompt", choices=["box", "point", "mask"], default="box", help="prompt kind (default box)")
    parser.add_argument("--method", choices=["register_refine", "intensity"], default=None,
                        help="classic method (default: the config default)")
    parser.add_argument("--key-slice", choices=["tight_select", "histogram"], default=None,
                        help="classic key-slice segmentation for box prompts (default: the config default)")
    parser.add_argument("--only", default="", help="comma-separated structure names to run (default: all)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON results (default bench/results/quality.json, quality_<prompt>.json if not box)")
    args = parser.parse_args(argv)

    settings = PropagationConfig(backend="classic")
    if args.method:
        settings.classic.method = args.method
    if args.key_slice:
        settings.classic.key_slice = args.key_slice
    cases = totalseg_cases(args.data)
    try:
        cases += sts_cases(args.data)
    except ImportError as exc:
        print(f"sts-001 skipped: {exc} (converters.series / converters.rtstruct_read not available)", file=sys.stderr)
    if args.only:
        wanted = set(args.only.split(","))
        cases = [c for c in cases if c["name"] in wanted]

    rows = []
    print(f"{'structure':30s} {'slices':>6s} {'dice':>6s} {'hd95mm':>7s} {'pred extent':>12s} {'true extent':>12s}"
          f" {'copy':>6s} {'copyext':>7s}")
    for case in cases:
        row = evaluate_case(case, settings, args.prompt)
        rows.append(row)
        pe = row.get("predicted_extent")
        hd = row.get("hd95_mm")
        print(f"{row['structure']:30s} {row['slices_in_gt']:6d} {row['dice']:6.3f} "
              f"{(f'{hd:7.1f}' if hd is not None else '      -')} {str(pe):>12s} {str(row['true_extent']):>12s} "
              f"{row['baseline_copy_everywhere_dice']:6.3f} {row['baseline_copy_within_extent_dice']:7.3f}", flush=True)

    def mean(key: str, prefix: str) -> float | None:
        values = [r[key] for r in rows if r["structure"].startswith(prefix)]
        return float(np.mean(values)) if values else None

    summary = {}
    for group, prefix in (("totalseg_organs", "totalseg_"), ("sts001_gtv", "sts001_"), ("all", "")):
        summary[group] = {"n": sum(r["structure"].startswith(prefix) for r in rows), "dice": mean("dice", prefix),
                          "key_slice_dice": mean("key_slice_dice", prefix),
                          "baseline_copy_everywhere_dice": mean("baseline_copy_everywhere_dice", prefix),
                          "baseline_copy_within_extent_dice": mean("baseline_copy_within_extent_dice", prefix)}
        s = summary[group]
        if s["n"]:
            print(f"MEAN {group:20s} n={s['n']:2d} dice={s['dice']:.3f}  key-slice={s['key_slice_dice']:.3f}  copy-everywhere={s['baseline_copy_everywhere_dice']:.3f}"
                  f"  copy-within-extent={s['baseline_copy_within_extent_dice']:.3f}")
    if args.out is None:
        name = "quality.json" if args.prompt == "box" else f"quality_{args.prompt}.json"
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
