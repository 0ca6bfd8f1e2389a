"""The ``ntng`` command.

``ntng fit|validate|test -c recipe.yaml [-c overlay.yaml] [--key value]`` is LightningCLI: later
files override earlier ones, ``--print_config`` shows the resolved configuration, and the config is
saved in the run directory. Commands that train nothing have their own small parsers:
``ntng plan`` (what a budget buys), ``ntng calibrate`` (measure an RST profile), ``ntng finetune``
and ``ntng il-losses`` (irreducible losses for RHO-loss).
Bad input raises ``ConfigurationError``, printed as one line.
"""

from __future__ import annotations

import sys
from unittest import mock

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

from app.errors import ConfigurationError
from callbacks.budget import ReferenceTimeBudget
from callbacks.export import HuggingFaceExport
from callbacks.monitoring import TokenThroughput

TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs", "name": "ntng", "default_hp_metric": False},
    },
}


class NtngCLI(LightningCLI):
    """LightningCLI with ntng's always-on callbacks and the data -> model links."""

    def add_arguments_to_parser(self, parser) -> None:
        # Forced callbacks get their own config keys (they cannot be linked inside trainer.callbacks).
        parser.add_lightning_class_args(ReferenceTimeBudget, "budget")
        parser.add_lightning_class_args(HuggingFaceExport, "export")
        parser.add_lightning_class_args(TokenThroughput, "throughput")
        # The tokenizer decides the vocabulary; the model must agree with it, so link, never repeat.
        for name in ("vocab_size", "pad_token_id", "seq_len"):
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")


def build_cli(args: list[str], **kwargs) -> NtngCLI:
    """The LightningCLI with ntng's defaults (``run=False`` in ``kwargs`` builds without running)."""
    # LightningCLI warns when ``args`` differ from sys.argv (true for `ntng calibrate` and in-process
    # callers); present the arguments as the command line instead.
    with mock.patch.object(sys, "argv", sys.argv[:1] + list(args)):
        return NtngCLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            trainer_defaults=TRAINER_DEFAULTS,
            save_config_kwargs={"overwrite": True},
            **kwargs,
        )


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``ntng`` console script."""
    argv = list(sys.argv[1:] if args is None else args)
    try:
        if argv[:1] == ["plan"]:
            from app.plan import main as plan_main

            plan_main(argv[1:])
        elif argv[:1] == ["calibrate"]:
            from app.calibrate import main as calibrate_main

            calibrate_main(argv[1:])
        elif argv[:1] == ["il-losses"]:
            from app.irreducible_losses import main as il_losses_main

            il_losses_main(argv[1:])
        elif argv[:1] == ["finetune"]:
            from app.finetune import main as finetune_main

            finetune_main(argv[1:])
        else:
            build_cli(argv)
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
