"""Files that are complete or absent, never half-written: the one atomic-write helper.

Everything rtprop writes that another program may read (archived instances, quarantine files,
results, masks, volumes, cine labels) goes through `atomic_path`: written under a temporary name in
the same folder, optionally fsynced, renamed into place. Permissions follow the umask (0644 with
the usual 022), like the archive, so a TPS import share can read the results. A temporary a killed
process leaves behind starts with TEMP_PREFIX and names its writer (`temp_name`), so the next start
removes its own dead writers' temporaries and never those of a process still writing on the same
shared storage (dicom_node/storage.py `recover`).
"""
from __future__ import annotations

import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TEMP_PREFIX = ".rtprop-tmp-"


def temp_name(suffix: str = "") -> str:
    """A temporary's file name: TEMP_PREFIX, then its writer (`host~pid~`), then a random part."""
    return f"{TEMP_PREFIX}{socket.gethostname()}~{os.getpid()}~{uuid.uuid4().hex}{suffix}"


def temp_writer(name: str) -> tuple[str, int] | None:
    """(host, pid) of the process that made temporary `name`; None for names without one (older releases)."""
    parts = name[len(TEMP_PREFIX):].split("~")
    if not name.startswith(TEMP_PREFIX) or len(parts) < 3 or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1])


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _suffixes(path: Path) -> str:
    """The file's own suffixes (".nii.gz"), which some writers (SimpleITK) need on the temporary too."""
    name = path.name.lstrip(".")
    return name[name.index("."):] if "." in name else ""


@contextmanager
def atomic_path(path: Path | str, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block ends without error it becomes `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / temp_name(_suffixes(path))
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if fsync:
        fsync_dir(path.parent)


def write_atomic(path: Path | str, data: bytes, *, fsync: bool = True) -> Path:
    """Write `data` to `path` so that `path` is either absent or complete."""
    with atomic_path(path, fsync=fsync) as tmp:
        with open(tmp, "xb") as fh:
            fh.write(data)
    return Path(path)


def copy_atomic(source: Path | str, path: Path | str, *, fsync: bool = True) -> Path:
    """Copy `source` to `path`, complete or absent."""
    with atomic_path(path, fsync=fsync) as tmp:
        shutil.copyfile(source, tmp)
    return Path(path)
