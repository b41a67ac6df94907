"""Several processes on one storage root (docs/scaling.md): a process starting never removes the temporary
files of another that is still writing, here or on another host; leftovers of dead writers still go."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from config.schema import StorageConfig
from converters.files import TEMP_PREFIX, temp_name, temp_writer
from dicom_node.storage import OTHER_HOST_TEMP_AGE_S, recover


def test_a_starting_process_removes_only_the_temporaries_of_dead_writers(tmp_path: Path) -> None:
    archive = tmp_path / "archive" / "study" / "series"
    archive.mkdir(parents=True)
    storage = StorageConfig(root=tmp_path, archive=tmp_path / "archive", quarantine=tmp_path / "quarantine",
                            outbox=tmp_path / "outbox", database=tmp_path / "db.sqlite")
    dead = subprocess.Popen(["true"])
    dead.wait()
    writing = archive / temp_name()  # this process: a receiver in the middle of a C-STORE
    assert temp_writer(writing.name) == (os.uname().nodename, os.getpid())
    gone = archive / f"{TEMP_PREFIX}{os.uname().nodename}~{dead.pid}~abc"
    old_format = archive / f"{TEMP_PREFIX}0123456789abcdef"
    other_young = archive / f"{TEMP_PREFIX}otherhost~123~abc"
    other_old = archive / f"{TEMP_PREFIX}otherhost~124~abc"
    for path in (writing, gone, old_format, other_young, other_old):
        path.write_bytes(b"x")
    past = time.time() - OTHER_HOST_TEMP_AGE_S - 60
    os.utime(other_old, (past, past))
    assert recover(storage) == 3
    assert {p.name for p in archive.iterdir()} == {writing.name, other_young.name}
