"""`rtprop track`: a cine case folder in, per-frame labels and a CSV out (models/tracking.py does the tracking)."""
from __future__ import annotations

from pathlib import Path

from config.schema import PropagationConfig
from converters.cine import CineError, CineLabelWriter, DicomCine, open_trackrad_case, read_first_mask
from models.tracking import TrackingSummary, track


def track_case(case: str | Path, out_dir: str | Path, settings: PropagationConfig | None = None,
               first_label: str | Path | None = None) -> TrackingSummary:
    """Track a TrackRAD2025 case folder, or a DICOM cine folder (then `first_label` is required).

    Writes `<out_dir>/targets/<case>_labels.mha` and `<out_dir>/<case>_tracking.csv`.
    """
    case = Path(case)
    if (case / "images").is_dir():
        opened = open_trackrad_case(case)
        source, mask0 = opened.source, opened.first_label
        if first_label is not None:
            mask0 = read_first_mask(first_label)
    else:
        if first_label is None:
            raise CineError(f"{case}: a DICOM cine series needs a first-frame mask file (first_label)")
        source, mask0 = DicomCine(case), read_first_mask(first_label)
    with source:
        writer = CineLabelWriter(out_dir, source, case=source.name)
        try:
            summary = track(source, mask0, settings,
                            sink=lambda t, m, c, ms: writer.add(m, confidence=c, latency_ms=ms))
        finally:
            writer.close()
    summary.labels_path, summary.csv_path = writer.labels_path, writer.csv_path
    return summary
