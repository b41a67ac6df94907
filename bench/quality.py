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
Each result's guard warnings (models/guard.py) and structure confidence are kept; the summary gives the
share flagged, and the calibration of the confidence against Dice (a reliability table and the AUROC
of telling Dice < 0.5 apart).
--jitter PX (box prompts): each case is also run from --variants N boxes with every edge moved by up
to PX pixels (seeded by the case's name); --jitter-mm MM (point prompts): from N clicks moved by up to
MM mm, staying on the structure. The summary gives the mean exact and mean worst Dice, the flips (exact
>= 0.6, a variant < 0.3) and how many of them carried a warning, and the guard's catches and false holds.
--refit RESULTS.json ... (no run): the structure confidence's logistic refitted on the runs of those jitter results,
and its AUROC with the weights in use, refitted, and leaving each structure out (bench/results/confidence_fit.json).

    .venv/bin/python bench/quality.py [--data ../shared/data]
                                      [--prompt box|point|mask|multi|corrective|boxclicks] [--clicks 5]
                                      [--cases shared|totalseg512]
                                      [--method register_refine|intensity]
                                      [--key-slice tight_select|histogram]
                                      [--only totalseg_label5,sts001_GTV_Mass_CT]
                                      [--jitter PX | --jitter-mm MM] [--variants N]
                                      [--refit RESULTS.json ...]
                                      [--out bench/results/quality.json, quality_point.json,
                                             quality_point_totalseg512.json, quality_jitter.json, ...]
"""
from __future__ import annotations

import argparse
import json
import os
import time
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from config.schema import PropagationConfig
from models.confidence import BIAS, SIGNAL_WEIGHTS
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
        row.update(error=str(exc), dice=0.0, key_slice_dice=0.0, hd95_mm=None, predicted_extent=None,
                   warnings=[], confidence=0.0, slice_confidence=[])
        return None
    row["seconds"] = time.perf_counter() - t0
    metrics = evaluate_masks(result.mask, mask, spacing)
    row.update(dice=metrics["dice"], hd95_mm=metrics["hd95_mm"], msd_mm=metrics["msd_mm"], nsd=metrics["nsd"],
               predicted_extent=_extent(result.mask), stop=result.details.get("stop"),
               key_slice_dice=evaluate_masks(result.mask[z], mask[z], spacing[1:])["dice"],
               per_slice_s=result.details["timings_s"]["per_slice"], warnings=list(result.warnings),
               confidence=(None if result.structure_confidence is None else float(result.structure_confidence)),
               slice_confidence=_slice_pairs(result, mask),
               confidence_signals=result.details.get("confidence_signals", {}))
    row.pop("error", None)
    return result


def _slice_pairs(result: PropagationResult, reference: np.ndarray) -> list[list[float]]:
    """[confidence, Dice] of each slice the result holds (the per-slice calibration: how good is this contour)."""
    pairs = []
    for z in np.flatnonzero(result.mask.any(axis=(1, 2))):
        both = float(result.mask[z].sum() + reference[z].sum())
        pairs.append([round(float(result.confidence[z]), 3),
                      round(2.0 * float((result.mask[z] & reference[z]).sum()) / both, 3)])
    return pairs


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


def jittered_prompts(case: dict, prompt: Prompt, n: int, px: int = 0, mm: float = 0.0) -> list[Prompt]:
    """`n` variants of the exact prompt, seeded by the case's name: a box with every edge moved by up to
    `px` pixels (at least one edge moved; kept inside the image and not inverted), or a click moved by up to
    `mm` in a random direction onto another pixel of the reference on that slice (a planner clicks on the
    structure; on pixels coarser than `mm` the click may stay where it was)."""
    rng = np.random.default_rng(zlib.crc32(case["name"].encode()))
    ny, nx = case["mask"].shape[1:]
    out: list[Prompt] = []
    if isinstance(prompt, BoxPrompt):
        while len(out) < n:
            d = rng.integers(-px, px + 1, 4)
            if not d.any():
                continue
            x0, x1 = sorted(int(np.clip(v, 0, nx - 1)) for v in (prompt.x0 + d[0], prompt.x1 + d[2]))
            y0, y1 = sorted(int(np.clip(v, 0, ny - 1)) for v in (prompt.y0 + d[1], prompt.y1 + d[3]))
            out.append(BoxPrompt(prompt.slice_index, x0, y0, x1, y1))
        return out
    (x, y, _), = prompt.points
    region = case["mask"][prompt.slice_index]
    dy, dx = case["spacing"][1:]
    for _ in range(n):
        for _attempt in range(50):
            r, a = mm * np.sqrt(rng.uniform()), rng.uniform(0.0, 2.0 * np.pi)
            cx, cy = int(round(x + r * np.cos(a) / dx)), int(round(y + r * np.sin(a) / dy))
            if 0 <= cx < nx and 0 <= cy < ny and region[cy, cx]:
                break
        else:
            cx, cy = x, y
        out.append(PointPrompt(prompt.slice_index, ((cx, cy, True),)))
    return out


def evaluate_jitter(case: dict, settings: PropagationConfig, kind: str, n: int, px: int = 0,
                    mm: float = 0.0) -> dict:
    """The exact prompt's row (`evaluate_case`) plus `jitter`: each jittered variant's Dice, key-slice Dice,
    warnings and confidence, and the worst of them."""
    row = evaluate_case(case, settings, kind)
    exact = make_prompts(case["mask"], kind, case["spacing"][1:])[0]
    row["jitter"] = []
    for prompt in jittered_prompts(case, exact, n, px, mm):
        variant = {"key_slice": row["key_slice"]}
        _score(variant, case, [prompt], settings)
        row["jitter"].append({"prompt": _describe(prompt), **{k: variant.get(k) for k in (
            "dice", "key_slice_dice", "warnings", "confidence", "error", "slice_confidence",
            "confidence_signals")}})
    worst = min(row["jitter"], key=lambda v: v["dice"])
    row["worst_dice"], row["worst_warned"] = worst["dice"], _warned(worst)
    if isinstance(exact, BoxPrompt) and px:
        # how far the edges moved against the box's size: 2 px is a fifth of a 10 px box, all of a rib's at 3 mm
        row["moves_per_short_side"] = px / min(exact.x1 - exact.x0 + 1, exact.y1 - exact.y0 + 1)
    return row


def _warned(run: dict) -> bool:
    """Did the planner hear about this result: a guard warning, or the prompt refused with an error."""
    return bool(run.get("warnings")) or bool(run.get("error"))


def _runs(rows: list[dict]) -> list[dict]:
    """Every propagation of these rows: the exact prompt's and each jittered variant's."""
    return [r for row in rows for r in [row] + row.get("jitter", [])]


# Boxes whose edges moved by at most this share of their shorter side (a 2 px move on a box of 10 px or more):
# the jitter summary gives their exact and worst Dice apart, as a move of a box's whole width is another box.
SMALL_MOVE = 0.2


def jitter_summary(rows: list[dict]) -> dict:
    """Exact vs worst jittered Dice, flips (exact >= 0.6, a variant < 0.3) and how many were warned; for boxes,
    also the exact and worst Dice of those the move was small for (SMALL_MOVE)."""
    flips = [(row, v) for row in rows if row["dice"] >= 0.6 for v in row["jitter"] if v["dice"] < 0.3]
    small = [r for r in rows if r.get("moves_per_short_side", np.inf) <= SMALL_MOVE]
    return {**({"small_move": {"n": len(small), "mean_exact_dice": float(np.mean([r["dice"] for r in small])),
                               "mean_worst_dice": float(np.mean([r["worst_dice"] for r in small]))}} if small else {}),
            "mean_exact_dice": float(np.mean([r["dice"] for r in rows])),
            "mean_worst_dice": float(np.mean([r["worst_dice"] for r in rows])),
            "cases_flipped": len({row["structure"] for row, _ in flips}),
            "flips": len(flips), "flips_warned": sum(_warned(v) for _, v in flips),
            "silent_flips": [f"{row['structure']}: {v['prompt']} (Dice {v['dice']:.2f})" for row, v in flips
                             if not _warned(v)]}


CONFIDENCE_BINS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def auroc(scores: list[float], bad: list[bool]) -> float | None:
    """Probability that a bad result scores lower than a good one (ties count half); None without both."""
    s, b = np.asarray(scores, dtype=float), np.asarray(bad, dtype=bool)
    if b.all() or not b.any():
        return None
    lower = (s[b][:, None] < s[~b][None, :]).mean() + 0.5 * (s[b][:, None] == s[~b][None, :]).mean()
    return float(lower)


def reliability(pairs: list[tuple[float, float]]) -> list[dict]:
    """Per confidence bin: how many results, their mean confidence and mean Dice."""
    table = []
    for lo, hi in zip(CONFIDENCE_BINS, CONFIDENCE_BINS[1:]):
        inside = [(c, d) for c, d in pairs if lo <= c < hi or (hi == 1.0 and c == 1.0)]
        table.append({"bin": f"{lo:.1f}-{hi:.1f}", "n": len(inside),
                      "mean_confidence": float(np.mean([c for c, _ in inside])) if inside else None,
                      "mean_dice": float(np.mean([d for _, d in inside])) if inside else None})
    return table


def calibration(rows: list[dict]) -> dict:
    """How well the structure confidence (and each slice's) predicts Dice, over every run of these rows,
    and the guard's figures: results held that were fine (Dice >= 0.5) and failures (< 0.3) it caught."""
    runs = [r for r in _runs(rows) if r.get("confidence") is not None]
    pairs = [(float(r["confidence"]), float(r["dice"])) for r in runs]
    slices = [(c, d) for r in runs for c, d in r.get("slice_confidence") or []]
    fine, failed = [r for r in runs if r["dice"] >= 0.5], [r for r in runs if r["dice"] < 0.3]
    return {"runs": len(runs), "reliability": reliability(pairs),
            "auroc_dice_below_0_5": auroc([c for c, _ in pairs], [d < 0.5 for _, d in pairs]),
            "slice_reliability": reliability(slices),
            "slice_auroc_dice_below_0_5": auroc([c for c, _ in slices], [d < 0.5 for _, d in slices]),
            "false_holds": f"{sum(_warned(r) for r in fine)}/{len(fine)}",
            "failures_caught": f"{sum(_warned(r) for r in failed)}/{len(failed)}"}


def print_calibration(name: str, c: dict) -> None:
    auc = c["auroc_dice_below_0_5"]
    slice_auc = c["slice_auroc_dice_below_0_5"]
    print(f"CALIBRATION {name}: {c['runs']} results, AUROC (Dice < 0.5) "
          f"{'-' if auc is None else f'{auc:.3f}'}, per slice {'-' if slice_auc is None else f'{slice_auc:.3f}'}; "
          f"guard: held while fine {c['false_holds']}, failures (Dice < 0.3) caught {c['failures_caught']}")
    for b, sb in zip(c["reliability"], c["slice_reliability"]):
        fmt = (lambda v: "    -" if v is None else f"{v:5.3f}")
        print(f"   confidence {b['bin']}: {b['n']:4d} results, mean Dice {fmt(b['mean_dice'])}   "
              f"slices {sb['n']:5d}, mean Dice {fmt(sb['mean_dice'])}")


def refit_confidence(paths: list[Path]) -> dict:
    """The structure confidence's logistic (models/confidence.py: weights >= 0 on SIGNAL_WEIGHTS' signals, and a
    bias) refitted on every run of these jitter results, and the AUROC of telling Dice < 0.5 apart: with the
    weights in use, refitted in sample, and leaving each structure out in turn (its runs on every set and prompt
    scored by weights fitted on the other structures': what a structure not seen may expect)."""
    from scipy.optimize import minimize

    names = list(SIGNAL_WEIGHTS)
    x, good, groups = [], [], []
    for path in paths:
        for row in json.loads(Path(path).read_text())["cases"]:
            for run in _runs([row]):
                signals = run.get("confidence_signals") or {}
                if all(k in signals for k in names):
                    x.append([signals[k] for k in names])
                    good.append(run["dice"] >= 0.5)
                    groups.append(row["structure"].replace("totalseg512_", "totalseg_"))  # one organ, two series
    x, good, groups = np.asarray(x, dtype=float), np.asarray(good, dtype=float), np.asarray(groups)

    def fit(use: np.ndarray) -> np.ndarray:
        def loss(p: np.ndarray) -> float:
            logit = x[use] @ p[1:] + p[0]
            return float(np.mean(np.logaddexp(0.0, logit) - good[use] * logit)) + 1e-3 * float(p[1:] @ p[1:])
        return minimize(loss, np.zeros(len(names) + 1), method="L-BFGS-B",
                        bounds=[(None, None)] + [(0.0, None)] * len(names)).x

    everything = fit(np.ones(len(good), dtype=bool))
    left_out = np.empty(len(good))
    for group in np.unique(groups):
        out = groups == group
        p = fit(~out)
        left_out[out] = x[out] @ p[1:] + p[0]
    bad = list(good < 0.5)
    in_use = x @ np.array([SIGNAL_WEIGHTS[k] for k in names]) + BIAS
    return {"runs": int(len(good)), "structures": int(len(np.unique(groups))),
            "weights": {k: round(float(w), 2) for k, w in zip(names, everything[1:])},
            "bias": round(float(everything[0]), 2),
            "auroc_weights_in_use": auroc(list(in_use), bad),
            "auroc_refitted": auroc(list(x @ everything[1:] + everything[0]), bad),
            "auroc_leave_one_structure_out": auroc(list(left_out), bad)}


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
        if "jitter" in chosen[0]:
            s["jitter"] = jitter_summary(chosen)
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
    parser.add_argument("--jitter", type=int, default=0, metavar="PX",
                        help="box prompts: also run --variants boxes with every edge moved by up to PX pixels")
    parser.add_argument("--jitter-mm", type=float, default=0.0, metavar="MM",
                        help="point prompts: also run --variants clicks moved by up to MM mm (on the structure)")
    parser.add_argument("--variants", type=int, default=6, metavar="N", help="jittered prompts per case (default 6)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON results (default bench/results/quality.json, quality_<prompt>.json if not box; "
                             "quality_jitter[_point].json with a jitter)")
    parser.add_argument("--refit", type=Path, nargs="+", metavar="RESULTS",
                        help="instead of running: refit the structure confidence on these jitter results (JSON of "
                             "--jitter / --jitter-mm runs) and report its AUROC, also leaving each structure out "
                             "(writes --out, default bench/results/confidence_fit.json)")
    args = parser.parse_args(argv)
    if args.refit:
        fitted = refit_confidence(args.refit)
        print(f"REFIT {fitted['runs']} results of {fitted['structures']} structures: AUROC (Dice < 0.5) with the "
              f"weights in use {fitted['auroc_weights_in_use']:.3f}, refitted {fitted['auroc_refitted']:.3f}, "
              f"leaving each structure out {fitted['auroc_leave_one_structure_out']:.3f}; refitted weights "
              f"{fitted['weights']} bias {fitted['bias']}")
        out = args.out or REPO / "bench" / "results" / "confidence_fit.json"
        out.write_text(json.dumps({"results": [str(p) for p in args.refit], **fitted}, indent=2))
        print(f"wrote {out}")
        return 0
    jitter = args.jitter if args.prompt == "box" else args.jitter_mm if args.prompt == "point" else 0
    if (args.jitter or args.jitter_mm) and not jitter:
        parser.error("--jitter goes with --prompt box, --jitter-mm with --prompt point")

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
        row = (evaluate_jitter(case, settings, args.prompt, args.variants, args.jitter, args.jitter_mm) if jitter
               else evaluate_case(case, settings, args.prompt,
                                  args.clicks if args.clicks is not None else 5 if args.prompt == "boxclicks" else 3))
        rows.append(row)
        pe = row.get("predicted_extent")
        hd = row.get("hd95_mm")
        after = ("  clicks: " + " ".join(f"{d:.3f}" for d in row["dice_after_clicks"])
                 if "dice_after_clicks" in row else "")
        flag = f"  FLAG: {'; '.join(row['warnings'])}" if row.get("warnings") else ""
        if jitter:
            after += (f"  conf {row['confidence']:.2f}  worst of {args.variants}: {row['worst_dice']:.3f}"
                      f"{' (warned)' if row['worst_warned'] else ''}")
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
        if "jitter" in s:
            j = s["jitter"]
            print(f"JITTER {group:8s} exact={j['mean_exact_dice']:.3f} worst={j['mean_worst_dice']:.3f}  "
                  f"flips: {j['flips']} in {j['cases_flipped']} cases, {j['flips_warned']} warned"
                  + (f"; silent: {', '.join(j['silent_flips'])}" if j["silent_flips"] else ""))
            if "small_move" in j:
                m = j["small_move"]
                print(f"       boxes moved by <= {SMALL_MOVE:.0%} of their shorter side: n={m['n']} "
                      f"exact={m['mean_exact_dice']:.3f} worst={m['mean_worst_dice']:.3f}")
    calibrated = calibration(rows)
    print_calibration(args.prompt, calibrated)
    if args.out is None:
        name = "quality" + ("_jitter" if jitter else "") + ("" if args.prompt == "box" else f"_{args.prompt}")
        name += ("" if args.cases == "shared" else f"_{args.cases}") + ".json"
        args.out = REPO / "bench" / "results" / name
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"prompt": args.prompt, "method": settings.classic.method,
                                    "key_slice": settings.classic.key_slice,
                                    **({"jitter": {"px" if args.prompt == "box" else "mm": jitter,
                                                   "variants": args.variants}} if jitter else {}),
                                    "summary": summary, "calibration": calibrated, "cases": rows},
                                   indent=2, default=str))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
