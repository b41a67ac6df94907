"""Files that are complete or absent, never half-written: the one atomic-write helper.

Everything rtprop writes that another program may read (archived instances, quarantine files,
results, masks, volumes, cine labels) goes through `atomic_path`: written under a temporary name in
the same folder, optionally fsynced, renamed into place. Permissions follow the umask (0644 with
the usual 022), like the archive, so a TPS import share can read the results. A temporary a killed
process leaves behind starts with TEMP_PREFIX and is removed at the next start
(dicom_node/storage.py `recover`).
"""
from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TEMP_PREFIX = ".rtprop-tmp-"


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
    tmp = path.parent / f"{TEMP_PREFIX}{uuid.uuid4().hex}{_suffixes(path)}"
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
