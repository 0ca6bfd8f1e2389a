"""Kill-safe writes: a process killed mid-write (or a write that fails) leaves the previous file or
directory whole, and the next write succeeds."""

from __future__ import annotations

import multiprocessing
import os
import signal
from pathlib import Path

import pytest

from app.files import atomic_directory, atomic_path, staging_path, write_text_atomic


def _killed_while_writing_file(path: str) -> None:
    with atomic_path(path) as staging:
        Path(staging).write_text("half of the new")
        os.kill(os.getpid(), signal.SIGKILL)


def _killed_while_writing_directory(path: str) -> None:
    with atomic_directory(path) as staging:
        (staging / "model.safetensors").write_text("half of the new")
        os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.parametrize("target", [_killed_while_writing_file, _killed_while_writing_directory],
                         ids=["file", "directory"])
def test_a_kill_mid_write_leaves_the_previous_copy_whole(target, tmp_path):
    path = tmp_path / ("hf" if target is _killed_while_writing_directory else "summary.json")
    if target is _killed_while_writing_directory:
        path.mkdir()
        (path / "model.safetensors").write_text("previous")
        previous = path / "model.safetensors"
    else:
        path.write_text("previous")
        previous = path
    process = multiprocessing.get_context("fork").Process(target=target, args=(str(path),))
    process.start()
    process.join(30)
    assert process.exitcode == -signal.SIGKILL
    assert previous.read_text() == "previous"
    assert staging_path(path).exists()  # the torn copy is beside, under a hidden name

    # The next write replaces both the torn staging copy and the previous one.
    if target is _killed_while_writing_directory:
        with atomic_directory(path) as staging:
            (staging / "model.safetensors").write_text("new")
    else:
        write_text_atomic(path, "new")
    assert previous.read_text() == "new"
    assert not staging_path(path).exists()


def test_a_failed_write_removes_its_staging_copy_and_keeps_the_previous(tmp_path):
    path = tmp_path / "report.md"
    path.write_text("previous")
    with pytest.raises(RuntimeError), atomic_path(path) as staging:
        staging.write_text("half")
        raise RuntimeError("disk full")
    assert path.read_text() == "previous" and not staging_path(path).exists()

    directory = tmp_path / "hf"
    directory.mkdir()
    (directory / "config.json").write_text("previous")
    with pytest.raises(RuntimeError), atomic_directory(directory) as staging:
        (staging / "config.json").write_text("half")
        raise RuntimeError("disk full")
    assert (directory / "config.json").read_text() == "previous" and not staging_path(directory).exists()
