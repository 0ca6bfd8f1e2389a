"""Recipes: ntng's LightningCLI, and the configured objects a recipe describes, built without running.

``ntng fit|validate|test -c recipe.yaml [-c overlay.yaml] [--key value]`` is :class:`NtngCLI`: later
files override earlier ones, ``--print_config`` shows the resolved configuration, and the config is
saved in the run directory. Commands that train nothing (``ntng plan``, ``calibrate``, ``il-losses``)
call :func:`build_recipe` to get the same trainer, module, data module and callbacks that
``ntng fit`` with the same arguments would train with.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

from app.errors import ConfigurationError
from app.runs import prepare_run_directory
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
        parser.add_argument("--resume", type=bool, default=False,
                            help="fit: continue the newest checkpoint of this run (the newest version directory "
                                 "that has one), or start a new run when there is none")
        parser.add_argument("--overwrite", type=bool, default=False,
                            help="fit: delete an earlier run in the (fixed) run directory instead of refusing")

    def before_instantiate_classes(self) -> None:
        if self.subcommand == "fit":
            prepare_run_directory(self.config.fit)

    def parse_arguments(self, parser, args) -> None:
        # ntng always passes the arguments it was given (the console script's, or a command's own
        # recipe arguments), so LightningCLI's warning about args differing from sys.argv does not apply.
        try:
            self.config = parser.parse_args(list(args))
        except argparse.ArgumentError as err:  # the parser is built with exit_on_error=False
            broken = _unreadable_config(args) if str(err).startswith("Problems parsing config") else None
            raise ConfigurationError(broken or parse_error_line(str(err))) from err


class PlanningCLI(NtngCLI):
    """The same recipe, with the model linked to the vocabulary the tokenizer *will* have, so it is
    built without reading the corpus or training a tokenizer (``ntng plan``)."""

    model_links = {"vocab_size": "planned_vocab_size", "pad_token_id": "planned_pad_token_id", "seq_len": "seq_len"}


_CLASS = re.compile(r"<class '(?:builtins\.)?([^']+)'>")  # "<class 'float'>" -> "float"


def _type_name(text: str) -> str:
    if text == "NoneType":
        return "None"
    if text.startswith("typing.Literal["):
        return "one of " + ", ".join(re.findall(r"'([^']*)'", text)) if "'" in text else text
    return text


def _unreadable_config(args: Sequence[str]) -> str | None:
    """The first ``-c`` file that is not valid YAML, as an error line (jsonargparse does not name it)."""
    import yaml

    paths = [value for flag, value in zip(args, args[1:]) if flag in ("-c", "--config")]
    paths += [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    for path in paths:
        try:
            with open(path) as handle:
                yaml.safe_load(handle)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or "cannot be parsed"
            return f"config {path}: not valid YAML{where} ({problem}); fix the file"
        except OSError:
            continue
    return None


def parse_error_line(message: str) -> str:
    """jsonargparse's multi-line parse error as one line: the key, what is wrong, and how to fix it.

    Args:
        message: the ``ArgumentError`` text, e.g. ``Parser key "budget.budget": ... Given value: abc``.

    Returns:
        E.g. ``budget.budget: expected float or None, got 'abc'; fix it in the recipe or on the command line``.
    """
    key = re.match(r'Parser key "([^"]+)":\s*(.*)', message.splitlines()[0] if message else "")
    unknown = re.match(r"Subcommand '([^']+)' does not accept option '([^']+)'", message)
    if unknown:  # a key in a -c file that no class takes
        command, name = unknown.groups()
        return (f"{name}: no such option (a key in a -c file or a --{name} argument); check the spelling, "
                f"`ntng {command} --help` lists the options")
    if key is None:
        if message.startswith("unrecognized arguments:"):
            given = " ".join(a for a in message.split(":", 1)[1].split() if a.startswith("-"))
            return f"unrecognized arguments: {given}; `ntng fit --help` lists the options"
        return message.splitlines()[0] if message else "could not parse the arguments"
    name, rest = key.groups()
    message, rest = _CLASS.sub(r"\1", message), _CLASS.sub(r"\1", rest)
    fix = "check the -c paths" if name == "config" else "fix it in the recipe or on the command line"
    # A bad value of one init arg of a subclass (data, model, a callback): name that arg. Checked
    # before unknown options: for a callback list, jsonargparse also tries the value as one plain
    # Callback, which takes no options, and that alternative's complaint is not the user's mistake.
    nested = re.search(r"Problem with given class_path '([^']+)':\s*Parser key \"([^\"]+)\":\s*(.+)", message)
    option = re.search(r"class_path '([^']+)':\s*Option '([^']+)' is not accepted", message)
    if option and not nested:
        class_path, bad = option.groups()
        return (f"{name}: {class_path} has no option {bad!r}; `ntng fit --{name}.help {class_path}` lists its "
                "options")
    if nested:
        class_path, inner, reason = nested.groups()
        value = re.match(r"Expected an? (.+?)\. Got value: (.*)$", reason.strip())
        what = f"expected {_type_name(value[1])}, got {value[2]!r}" if value else reason.strip().rstrip(".")
        return f"{name}.init_args.{inner}: {what} ({class_path}); {fix}"
    if rest:  # a one-line reason: a scalar of the wrong type, a missing config file
        return f"{name}: {rest.rstrip('.')}; {fix}"
    found = re.findall(r"Expected an? (.+?)(?:\. Got value: (.*))?$", message, flags=re.MULTILINE)
    expected = [_type_name(t) for t, _ in found]
    given = re.search(r"Given value: (.*)", message)
    given = given.group(1) if given else next((g for _, g in found if g), None)
    if expected:
        got = f", got {given!r}" if given is not None else ""
        return f"{name}: expected {' or '.join(dict.fromkeys(expected))}{got}; {fix}"
    details = [line.strip() for line in message.splitlines()[1:] if line.strip()]
    return f"{name}: {details[-1] if details else 'invalid value'}; {fix}"


def build_cli(args: Sequence[str], run: bool = True, cli_class: type[NtngCLI] = NtngCLI) -> NtngCLI:
    """The LightningCLI with ntng's defaults on ``args``; it runs its subcommand when ``run``."""
    return cli_class(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"exit_on_error": False},  # errors become one ntng: error: line, not usage + message
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
