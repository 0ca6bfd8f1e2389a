"""The ``ntng`` command: one table from command names to the functions that run them.

``fit``, ``validate`` and ``test`` are LightningCLI (``app.recipe``); the commands that train nothing
are in ``app.commands``. Bad input raises ``ConfigurationError``, printed as one ``ntng: error:`` line.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from lightning.pytorch.utilities.exceptions import SIGTERMException

from app.commands import calibrate, finetune, il_losses, plan, report, sweep
from app.errors import ConfigurationError
from app.recipe import build_cli

COMMANDS: dict[str, Callable[[list[str]], object]] = {
    "plan": plan.main,
    "calibrate": calibrate.main,
    "il-losses": il_losses.main,
    "finetune": finetune.main,
    "sweep": sweep.main,
    "report": report.main,
}
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``ntng`` console script."""
    argv = list(sys.argv[1:] if args is None else args)
    try:
        command = COMMANDS.get(argv[0]) if argv else None
        if argv and command is None and not argv[0].startswith("-") and argv[0] not in LIGHTNING_COMMANDS:
            raise ConfigurationError(f"unknown command {argv[0]!r}; the commands are "
                                     f"{', '.join([*LIGHTNING_COMMANDS, *COMMANDS])} (`ntng --help`)")
        if command is not None:
            command(argv[1:])
        else:
            build_cli(argv)  # fit, validate, test, and LightningCLI's own --help
    except SIGTERMException:
        # A pre-emption notice, not a failure of the run: the budget callback said what it saved.
        print("ntng: stopped by SIGTERM; continue this run with --resume", file=sys.stderr)
        sys.exit(128 + 15)  # what a shell reports for a process ended by SIGTERM
    except Exception as err:
        cause = _configuration_error(err)
        if cause is None:
            raise
        print(f"ntng: error: {cause}", file=sys.stderr)
        sys.exit(2)


def _configuration_error(err: BaseException) -> ConfigurationError | None:
    # jsonargparse wraps errors raised while instantiating classes in its own ValueError; the
    # original stays in the exception chain.
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, ConfigurationError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


if __name__ == "__main__":
    main()
