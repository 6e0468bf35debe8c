"""Writing files without losing what the user already has.

One rule for every script: a path that exists is never overwritten unless the user asked (the script's
`--overwrite_*` flag); an input of the command is never its output; and what is written appears whole or not at
all (written beside its destination, then renamed over it), so a crash or a full disk mid-write leaves the old
file or folder as it was.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["FolderInUse", "check_new_output", "is_inside", "lock_folder", "same_path", "staged_files", "unlock_folder", "write_text_atomic"]


def same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether `a` and `b` name the same file or folder (through symlinks and relative paths)."""
    a, b = Path(a).expanduser(), Path(b).expanduser()
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def is_inside(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """Whether `path` lies inside `folder` (through symlinks and relative paths; not `folder` itself)."""
    return Path(folder).expanduser().resolve() in Path(path).expanduser().resolve().parents


def check_new_output(
    path: str | os.PathLike,
    overwrite: bool,
    inputs: Iterable = (),
    option: str = "--output_file",
    overwrite_flag: str = "--overwrite_output_file",
) -> None:
    """Raise FileExistsError when writing the file `path` (given as `option`) would replace one of `inputs` or a
    file inside an input folder (always refused), or an existing file the user did not ask to overwrite with
    `overwrite_flag`."""
    path = Path(path)
    for source in inputs:
        if same_path(path, source) or (Path(source).is_dir() and is_inside(path, source)):
            raise FileExistsError(
                f"{option} {path} is an input of this command, or inside one ({source}); refusing to overwrite it"
            )
    if path.is_dir():
        raise FileExistsError(f"{option} {path} is a folder; expected the path of a file to write")
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"{option} {path} already exists; pass {overwrite_flag} to replace it, or choose another path"
        )


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder, renamed over `path` when complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


@contextmanager
def staged_files(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty hidden folder inside `folder` (created if needed) to write into. When the block ends
    without an error, each file written there is renamed into `folder`, replacing the file of that name; on an
    error nothing in `folder` changes. Either way the staging folder is removed.

    The slow and fallible part (serialising weights, rendering plots and the card) happens in the staging
    folder; moving the finished files into place is one rename each.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=".staging-"))
    try:
        yield staging
        for path in sorted(staging.iterdir()):
            if not path.is_file():
                raise IsADirectoryError(f"{path}: only files are moved out of a staging folder")
        for path in sorted(staging.iterdir()):
            os.replace(path, folder / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


LOCK_NAME = ".vivit-medmnist.lock"


class FolderInUse(ValueError):
    """Another process holds the folder's lock."""


def lock_folder(folder: str | os.PathLike, option: str = "--output_dir"):
    """Take the exclusive lock of `folder` (created if needed) for as long as the returned file stays open, or
    raise FolderInUse naming the process that holds it. The lock is the kernel's (`flock` on `LOCK_NAME` in the
    folder): a process that dies, even by SIGKILL, releases it, so no stale lock is ever left behind. Where
    `fcntl` does not exist (Windows) nothing is locked."""
    try:
        import fcntl
    except ImportError:
        return None
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / LOCK_NAME, "a+")  # noqa: SIM115 -- held open for the run's lifetime
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise FolderInUse(
            f"{option} {folder} is in use by a training run that is still going ({holder}); wait for it to end, "
            "or choose another folder"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}\n")
    handle.flush()
    return handle


def unlock_folder(handle) -> None:
    """Release a `lock_folder` lock and remove its file (a lock file left by a killed process holds no lock)."""
    if handle is None:
        return
    Path(handle.name).unlink(missing_ok=True)
    handle.close()
