"""Re-contour one ROI: prompt from its middle slice, propagate, write a new RTSTRUCT and metrics.

The same steps serve `rtprop recontour`, `rtprop demo` and the nightly batch. The RTSTRUCT is written
and file-checked as a job's result is (pipeline/write_result.py), so the batch may hand it to the
one exit (pipeline/delivery.py).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from config.schema import Config
from converters.rtstruct_read import read_rtstruct
from converters.series import read_series
from models.propagate import propagate
from pipeline.metrics import evaluate_masks
from pipeline.prompts import prompt_from_roi
from pipeline.write_result import Structure, write_result


def recontour(series_dir: Path, rtstruct: Path, roi_name: str, prompt_kind: str, out_dir: Path,
              config: Config, uid_seed: str | None = None) -> dict[str, Any]:
    """Run the whole re-contouring of one ROI; returns the summary also written to metrics.json.

    `uid_seed`: derive the new RTSTRUCT's UIDs from it (a batch item run twice writes the same instance)."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    volume = read_series(series_dir)
    structure_set = read_rtstruct(rtstruct, volume)
    reference = structure_set.roi(roi_name)
    timings["read_s"] = time.perf_counter() - t0

    prompt = prompt_from_roi(reference.mask, prompt_kind)
    t1 = time.perf_counter()
    result = propagate(volume.array, volume.geometry.spacing_zyx, prompt, volume.modality, config.propagation)
    timings["propagate_s"] = time.perf_counter() - t1

    z = prompt.slice_index
    structure = Structure(reference.name, result.mask, f"{prompt_kind} on slice {z}", result.backend,
                          tuple(result.warnings), tuple(float(c) for c in result.confidence), z, (z,),
                          float(result.structure_confidence))
    written = write_result(volume, [structure], Path(out_dir) / "RS_rtprop.dcm", config,
                           series_description=f"rtprop re-contoured {roi_name}", uid_seed=uid_seed)
    timings.update(written.timings_s)

    metrics = evaluate_masks(result.mask, reference.mask, volume.geometry.spacing_zyx)
    summary = {
        "series_instance_uid": volume.series_instance_uid,
        "roi": reference.name,
        "prompt": prompt_kind,
        "key_slice": prompt.slice_index,
        "backend": result.backend,
        "confidence": round(float(result.structure_confidence), 3),
        "checkpoint_sha256": result.checkpoint_sha256,
        "rtstruct": str(written.path),
        "sop_instance_uid": written.sop_instance_uid,
        "sha256": written.sha256,
        "warnings": list(result.warnings),
        "file_check": {"ok": written.check.ok, "min_dice": written.check.min_dice,
                       "problems": list(written.check.problems)},
        "metrics": metrics,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }
    (Path(out_dir) / "metrics.json").write_text(json.dumps(summary, indent=2, sort_keys=True, default=str))
    return summary
