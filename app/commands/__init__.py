"""The ``ntng`` commands that train nothing themselves: ``plan`` (what a budget buys), ``calibrate``
(measure an RST profile), ``il_losses`` (irreducible losses for RHO-loss), ``finetune`` (the GLUE /
SuperGLUE suites; its flags and defaults in ``finetune_settings``), ``sweep`` (methods x budgets x
seeds, each cell's steps run as ``ntng`` commands; its file format in ``sweep_spec``) and ``report``
(NTNG's Table 1 from a sweep's cells). Each builds what it needs from the recipe (``app.recipe``),
and parses its flags with :class:`CommandParser`."""

from __future__ import annotations

import argparse
from typing import NoReturn

from app.errors import ConfigurationError


class CommandParser(argparse.ArgumentParser):
    """``argparse`` for the commands: a bad flag raises ``ConfigurationError``, which ``ntng`` prints as
    one ``ntng: error:`` line (exit 2), instead of argparse's usage block; ``--help`` is unchanged."""

    def error(self, message: str) -> NoReturn:
        raise ConfigurationError(f"{self.prog}: {message}; `{self.prog} --help` lists the options")
