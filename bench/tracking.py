"""Cine tracking quality: Dice per frame, confidence and which stage ran (a benchmark, not a test).

Cases, each tracked from its frame-0 mask by the classic tracker (`ecc` and `flow`):
- Z_001: the TrackRAD2025 layout in ../shared/data/trackrad2025-synthetic (10 frames, 125 x 125,
  a disc moving along the rows), against its all-frame labels, through `rtprop track`'s code path
  (pipeline/track.py: the .mha read, the labels and CSV written and read back).
- respiratory phantom (tests/phantoms.SyntheticCine: 48 frames at 4 Hz, 4 s period, 10 and 20 mm).
- rotating phantom (tests/phantoms.affine_motion_cine: 24 frames, rotation up to 20 deg, +-15 %
  stretch, 8 mm shift): motion no shift of frame 0's mask can follow ("best shift" = the best Dice
  any whole-pixel shift of it reaches, from the truth alone).
Per case: mean and worst Dice over frames 1.., frame 0 copied, confidence (mean, min), the frames
the affine stage ran on, and the Dice of frames the stated method did not track.

    .venv/bin/python bench/tracking.py [--data ../shared/data] [--out bench/results/tracking.json]
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from config.schema import PropagationConfig  # noqa: E402
from converters.cine import read_stack_frames  # noqa: E402
from models.tracking import track  # noqa: E402
from phantoms import SyntheticCine, affine_motion_cine, best_translation_dice  # noqa: E402
from pipeline.metrics import dice  # noqa: E402
from pipeline.track import track_case  # noqa: E402

RESULTS = REPO / "bench" / "results" / "tracking.json"


def row(name: str, method: str, predicted: list[np.ndarray], truth: list[np.ndarray], confidence: list[float],
        summary, shift_best: list[float] | None = None) -> dict:
    scores = [dice(p, t) for p, t in zip(predicted, truth)]
    copied = [dice(truth[0], t) for t in truth]
    out = {"case": name, "method": method, "frames": len(truth), "dice_mean": float(np.mean(scores[1:])),
           "dice_worst": float(np.min(scores[1:])), "copied_mean": float(np.mean(copied[1:])),
           "confidence_mean": float(np.mean(confidence[1:])), "confidence_min": float(np.min(confidence[1:])),
           "affine_frames": summary.details.get("affine_frames"),
           "translation_only_frames": summary.details.get("translation_only_frames"),
           "warnings": list(getattr(summary, "warnings", [])), "dice_per_frame": [round(s, 4) for s in scores],
           "confidence_per_frame": [round(float(c), 4) for c in confidence]}
    if shift_best is not None:
        out["best_shift_mean"], out["best_shift_worst"] = float(np.mean(shift_best[1:])), float(np.min(shift_best[1:]))
    return out


def track_in_memory(source, truth: list[np.ndarray], settings: PropagationConfig):
    frames: list[tuple[np.ndarray, float]] = []
    summary = track(source, truth[0], settings, lambda t, mask, confidence, ms: frames.append((mask, confidence)))
    return summary, [m for m, _ in frames], [c for _, c in frames]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # the fallbacks are counted in the table, not printed
    rows = []
    for method in ("ecc", "flow"):
        settings = PropagationConfig(backend="classic", cine={"classic_method": method})
        case = args.data / "trackrad2025-synthetic" / "Z_001"
        with tempfile.TemporaryDirectory() as tmp:
            summary = track_case(case, Path(tmp) / "Z_001", settings)
            predicted = list(read_stack_frames(summary.labels_path) > 0)
            with open(summary.csv_path) as handle:
                confidence = [float(r["confidence"]) for r in csv.DictReader(handle)]
        truth = list(read_stack_frames(case / "targets" / "Z_001_labels.mha") > 0)
        rows.append(row("Z_001 (TrackRAD layout)", method, predicted, truth, confidence, summary))
        for amplitude in (10.0, 20.0):
            source = SyntheticCine(n_frames=48, frame_rate_hz=4.0, period_s=4.0, amplitude_mm=amplitude)
            truth = [source.truth(t) for t in range(source.n_frames)]
            summary, predicted, confidence = track_in_memory(source, truth, settings)
            rows.append(row(f"respiratory {amplitude:.0f} mm", method, predicted, truth, confidence, summary))
        source, truths = affine_motion_cine()
        truth = list(truths)
        summary, predicted, confidence = track_in_memory(source, truth, settings)
        rows.append(row("rotating, stretching", method, predicted, truth, confidence, summary,
                        [best_translation_dice(truth[0], t) for t in truth]))

    print(f"{'case':<26}{'method':>7}{'Dice mean':>11}{'worst':>8}{'copied':>8}{'best shift':>11}"
          f"{'conf mean':>11}{'min':>7}{'affine':>9}")
    for r in rows:
        shift = f"{r['best_shift_mean']:.3f}" if "best_shift_mean" in r else "-"
        affine = f"{r['affine_frames']}/{r['frames'] - 1}" if r["affine_frames"] is not None else "-"
        print(f"{r['case']:<26}{r['method']:>7}{r['dice_mean']:>11.3f}{r['dice_worst']:>8.3f}{r['copied_mean']:>8.3f}"
              f"{shift:>11}{r['confidence_mean']:>11.3f}{r['confidence_min']:>7.3f}{affine:>9}")
    z001 = rows[0]
    print("\nZ_001 (ecc) per frame, Dice / confidence: "
          + "  ".join(f"{t}: {d:.4f}/{c:.3f}" for t, (d, c) in enumerate(zip(z001["dice_per_frame"],
                                                                         z001["confidence_per_frame"]))))
    for r in rows:
        for message in r["warnings"]:
            print(f"warning ({r['case']}, {r['method']}): {message}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows}, indent=2))
    print(f"\nwritten {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
