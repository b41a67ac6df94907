"""Load: 8 parallel storescu associations x 100 small instances: 0 lost, 0 duplicated (bench/load.py)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import load  # noqa: E402  (bench/load.py)


def test_parallel_associations_lose_and_duplicate_nothing(tmp_path: Path) -> None:
    result = load.run(800, 8, tmp_path)
    assert result["storescu_failures"] == []
    assert (result["lost"], result["duplicated"], result["archive_temp_files"]) == (0, 0, 0)
    assert result["db_rows"] == result["archive_files"] == result["audit_instance_received"] == 800
    assert result["ok"]
