"""Recipes: ntng's LightningCLI, and the configured objects a recipe describes, built without running.

``ntng fit|validate|test -c recipe.yaml [-c overlay.yaml] [--key value]`` is :class:`NtngCLI`: later
files override earlier ones, ``--print_config`` shows the resolved configuration, and the config is
saved in the run directory. Commands that train nothing (``ntng plan``, ``calibrate``, ``il-losses``)
call :func:`build_recipe` to get the same trainer, module, data module and callbacks that
``ntng fit`` with the same arguments would train with.
"""

from __future__ import annotations

from collections.abc import Sequence

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

from callbacks.budget import ReferenceTimeBudget
from callbacks.export import HuggingFaceExport
from callbacks.monitoring import RunRecord, TokenThroughput

TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs", "name": "ntng", "default_hp_metric": False},
    },
}


class NtngCLI(LightningCLI):
    """LightningCLI with ntng's always-on callbacks and the data -> model links."""

    # Model argument -> the data module attribute it is linked to.
    model_links = {"vocab_size": "vocab_size", "pad_token_id": "pad_token_id", "seq_len": "seq_len"}

    def add_arguments_to_parser(self, parser) -> None:
        # Forced callbacks get their own config keys (they cannot be linked inside trainer.callbacks).
        parser.add_lightning_class_args(ReferenceTimeBudget, "budget")
        parser.add_lightning_class_args(HuggingFaceExport, "export")
        parser.add_lightning_class_args(TokenThroughput, "throughput")
        parser.add_lightning_class_args(RunRecord, "record")
        # The tokenizer decides the vocabulary; the model must agree with it, so link, never repeat.
        for name, source in self.model_links.items():
            parser.link_arguments(f"data.{source}", f"model.init_args.{name}", apply_on="instantiate")

    def parse_arguments(self, parser, args) -> None:
        # ntng always passes the arguments it was given (the console script's, or a command's own
        # recipe arguments), so LightningCLI's warning about args differing from sys.argv does not apply.
        self.config = parser.parse_args(list(args))


class PlanningCLI(NtngCLI):
    """The same recipe, with the model linked to the vocabulary the tokenizer *will* have, so it is
    built without reading the corpus or training a tokenizer (``ntng plan``)."""

    model_links = {"vocab_size": "planned_vocab_size", "pad_token_id": "planned_pad_token_id", "seq_len": "seq_len"}


def build_cli(args: Sequence[str], run: bool = True, cli_class: type[NtngCLI] = NtngCLI) -> NtngCLI:
    """The LightningCLI with ntng's defaults on ``args``; it runs its subcommand when ``run``."""
    return cli_class(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        args=list(args),
        run=run,
    )


def recipe_args(configs: Sequence[str], overrides: Sequence[str] = ()) -> list[str]:
    """``-c`` arguments for each recipe file, then the ``--key value`` overrides."""
    return [arg for path in configs for arg in ("-c", str(path))] + list(overrides)


def build_recipe(configs: Sequence[str], overrides: Sequence[str] = (), planning: bool = False) -> NtngCLI:
    """Instantiate what ``ntng fit -c <configs> <overrides>`` would train, without training.

    Args:
        configs: recipe and overlay files, later ones overriding earlier ones.
        overrides: ``--key value`` arguments, as on the ``ntng fit`` command line.
        planning: build without reading the corpus (:class:`PlanningCLI`): the model's vocabulary
            is the one the tokenizer will have.

    Returns:
        The CLI object: ``.trainer`` (with every callback), ``.model`` and ``.datamodule``.
    """
    return build_cli(recipe_args(configs, overrides), run=False, cli_class=PlanningCLI if planning else NtngCLI)
