"""Writes that a kill cannot leave half-done: write beside the target, then rename into place.

``os.replace`` is atomic on POSIX within one file system, so a reader (or a resumed run) sees either
the previous complete file or the new complete one, never a truncated one. Directories are swapped
with two renames: between them the target is briefly absent, but the previous complete copy is kept
under a hidden name until the new one is in place.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def staging_path(path: str | Path) -> Path:
    """The hidden name beside ``path`` that a write goes to before it is renamed into place."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on error it is removed.

    Args:
        path: the file to write.

    Returns:
        A context manager yielding the staging path (write it with any library: ``torch.save``,
        ``savefig``, ``np.savez``).
    """
    path = Path(path)
    staging = staging_path(path)
    try:
        yield staging
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a kill mid-write leaves the previous file whole."""
    with atomic_path(path) as staging:
        with open(staging, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield an empty staging directory that replaces ``path`` (and everything in it) on success.

    Args:
        path: the directory to (re)write, e.g. a run's ``hf/`` export.

    Returns:
        A context manager yielding the staging directory; on error it is removed and ``path`` is
        left as it was.
    """
    path = Path(path)
    staging, previous = staging_path(path), path.with_name(f".{path.name}.previous")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(previous, ignore_errors=True)
    if path.exists():
        os.replace(path, previous)
    os.replace(staging, path)
    shutil.rmtree(previous, ignore_errors=True)
