"""Run directories: where a fit writes, what an earlier fit left there, and where a resume continues.

A run directory is ``<save_dir>/<name>/version_<n>`` for the TensorBoard/CSV loggers (or
``trainer.default_root_dir`` without a logger). It holds ``checkpoints/`` (the budget callback's
``rst-*.ckpt``, ``at-*.ckpt`` and ``last.ckpt``, each written beside and renamed into place, so every
file there is complete), ``summary.json`` and ``hf/`` once the fit finished.

``ntng fit --resume`` continues the newest checkpoint of the newest version that has one;
``--ckpt_path last`` does the same. An existing run directory is never written over unless
``--overwrite true`` says so: a fit that would start afresh in one stops with the way to resume.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_info

from app.errors import ConfigurationError

_VERSION = re.compile(r"version_(\d+)$")
# What a fit leaves that a fresh start in the same directory would destroy or mix with its own.
RUN_OUTPUTS = ("checkpoints/*.ckpt", "summary.json", "hf")


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint a resume continues: ``last.ckpt`` (always the newest state), else the most
    recently written ``*.ckpt`` of ``run_dir/checkpoints``."""
    directory = Path(run_dir) / "checkpoints"
    if (directory / "last.ckpt").is_file():
        return directory / "last.ckpt"
    checkpoints = sorted(directory.glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    return checkpoints[-1] if checkpoints else None


def run_outputs(run_dir: Path) -> list[str]:
    """The files and directories of an earlier fit in ``run_dir`` (relative paths; empty if none)."""
    run_dir = Path(run_dir)
    return sorted(str(p.relative_to(run_dir)) for pattern in RUN_OUTPUTS for p in run_dir.glob(pattern))


def version_directories(root: Path) -> list[Path]:
    """``root/version_<n>`` directories, by ``n``."""
    found = [(int(m.group(1)), p) for p in Path(root).glob("version_*") if (m := _VERSION.search(p.name))]
    return [p for _, p in sorted(found)]


class RunLocation:
    """Where the fit configured by a parsed ``ntng fit`` config writes.

    Args:
        config: the ``fit`` subcommand's parsed config (a jsonargparse Namespace).
    """

    def __init__(self, config: Any) -> None:
        self.config = config
        logger = config.trainer.logger
        if logger is None or logger is True:  # Lightning's default logger: <root>/lightning_logs/version_<n>
            self.root, self.version = Path(config.trainer.default_root_dir or ".") / "lightning_logs", None
        elif logger is False or isinstance(logger, list) or "save_dir" not in (logger.init_args or {}):
            self.root, self.version = None, None  # no versions: the run directory is default_root_dir
        else:
            args = logger.init_args
            self.root = Path(args.save_dir) / (args.get("name") or "")
            self.version = args.get("version")

    @property
    def fixed_directory(self) -> Path | None:
        """The run directory when the config names it (a logger version, or no versioned logger)."""
        if self.root is None:
            return Path(self.config.trainer.default_root_dir or ".")
        if self.version is None:
            return None
        version = self.version if isinstance(self.version, str) else f"version_{self.version}"
        return self.root / version

    def use_version(self, directory: Path) -> None:
        """Write into ``directory`` (one of ``root``'s versions) instead of a new version."""
        self.config.trainer.logger.init_args.version = int(_VERSION.search(directory.name).group(1))

    def resumable(self) -> tuple[Path, Path] | None:
        """(run directory, checkpoint) of the newest run here with a checkpoint, or None."""
        candidates = [self.fixed_directory] if self.fixed_directory is not None else version_directories(self.root)
        for directory in reversed(candidates):
            checkpoint = newest_checkpoint(directory)
            if checkpoint is not None:
                return directory, checkpoint
        return None


def prepare_run_directory(config: Any) -> None:
    """Resolve ``--resume`` / ``--ckpt_path`` and refuse to write over an earlier run, before anything is built.

    Args:
        config: the ``fit`` subcommand's parsed config. Its ``resume`` continues the newest checkpoint
            of this run (or starts a new run when there is none); its ``overwrite`` deletes an earlier
            run the fit would otherwise refuse to write over. Its ``ckpt_path`` and logger version are
            set here when resuming.

    Raises:
        ConfigurationError: ``--resume`` with an explicit ``--ckpt_path``; a ``--ckpt_path`` file that
            does not exist; a fresh fit into a directory that holds an earlier run.
    """
    location, ckpt_path, resume = RunLocation(config), config.ckpt_path, config.resume
    if resume and ckpt_path not in (None, "last"):
        raise ConfigurationError(f"--resume continues this run's newest checkpoint, but --ckpt_path={ckpt_path} "
                                 "names one; give one of the two")
    if resume or ckpt_path == "last":
        found = location.resumable()
        if found is None:
            config.ckpt_path = None
            rank_zero_info(f"ntng: nothing to resume under {location.fixed_directory or location.root} "
                           "(no checkpoints/*.ckpt): starting a new run")
        else:
            directory, config.ckpt_path = found[0], str(found[1])
            if location.fixed_directory is None:
                location.use_version(directory)
            rank_zero_info(f"ntng: resuming {directory} from {found[1].name}")
            return
    elif ckpt_path is not None and ckpt_path not in ("best", "hpc", "registry") and not Path(ckpt_path).is_file():
        raise ConfigurationError(f"--ckpt_path {ckpt_path}: no such checkpoint file; give an existing .ckpt "
                                 "(a run's checkpoints/ directory has them) or --resume to continue the newest one")
    directory = location.fixed_directory
    if directory is None or config.ckpt_path is not None:
        return  # a new version directory, or a resume that continues what is there
    if outputs := run_outputs(directory):
        if not config.overwrite:
            raise ConfigurationError(
                f"{directory} already holds a run ({', '.join(outputs[:3])}); continue it with --resume, "
                "start a new version by not fixing the logger's version (or give another directory), "
                "or replace it with --overwrite true")
        rank_zero_info(f"ntng: --overwrite: removing the earlier run in {directory}")
        for name in outputs:
            path = directory / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
