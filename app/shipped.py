"""What ntng ships beside its code (``configs/``, ``datamodules/samples/``), found from any directory.

Recipes name shipped files by relative paths (``configs/rst/quickstart-cpu.yaml``,
``datamodules/samples/gutenberg``). Such a path is read from the working directory when it exists
there, as a user's own relative path is, and otherwise from the ntng checkout, so
``ntng fit -c ~/ntng/configs/quickstart.yaml`` runs from anywhere.
"""

from __future__ import annotations

from pathlib import Path

SHIPPED_ROOT = Path(__file__).resolve().parents[1]  # the ntng checkout


def shipped_path(name: str | Path) -> Path:
    """``name`` (``~`` expanded) from the working directory, else from the ntng checkout when it exists there.

    Args:
        name: a file or directory path as a recipe gives it.

    Returns:
        The path to open: as given when it exists, is absolute or is not shipped; else the shipped one.
    """
    path = Path(name).expanduser()
    if path.exists() or path.is_absolute() or not (SHIPPED_ROOT / path).exists():
        return path
    return SHIPPED_ROOT / path
