"""``ntng plan``: what a budget buys, without training.

From a recipe (``ntng plan -c recipe.yaml [-c overlay.yaml] [--key value]``): the trainer, module,
data module and callbacks are built exactly as ``ntng fit`` with the same arguments would build them,
and the plan uses their settings: batch, micro-batch, sequence length, optimizer, the budget, its
cost model and stop rule, and the method callback, which prices each update from its own fields.

From a profile alone (``ntng plan --profile P --budget-hours H --batch-size B --micro-batch-size M
--method NAME [--NAME.option value]``): the same method classes, built from flags with their own
defaults (``--help`` lists every option).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from typing import Any

from jsonargparse import ArgumentParser

from app.accounting.clock import Budget, analytic_flops_model
from app.accounting.cost_models import RSTProfile
from app.accounting.planning import PlanSettings, PricedMethod, UpdateCost, baseline_update_cost, plan_budget
from app.commands import CommandParser
from app.errors import ConfigurationError
from app.model.layers import family_traits
from app.recipe import build_recipe
from callbacks.budget import ReferenceTimeBudget
from callbacks.layer_drop import ProgressiveLayerDrop
from callbacks.random_path import RandomPathTraining
from callbacks.rho_loss import RhoLoss
from callbacks.selective_backprop import SelectiveBackprop
from callbacks.sophia import SophiaHessian
from callbacks.stacking import LayerStacking

# Method name (as in configs/methods/<name>.yaml) -> the callback that prices it and the optimizer
# it implies in the flag form (a recipe states its optimizer itself).
METHODS: dict[str, tuple[type | None, str | None]] = {
    "baseline": (None, None),
    "layer_drop": (ProgressiveLayerDrop, None),
    "raptr": (RandomPathTraining, None),
    "stacking": (LayerStacking, None),
    "selective_backprop": (SelectiveBackprop, None),
    "rho_loss": (RhoLoss, None),
    "sophia": (SophiaHessian, "SophiaG"),
    "lion": (None, "Lion"),
}


@dataclass(frozen=True)
class Plan:
    """A plan and what it was made from.

    Attributes:
        method: the method's name (``METHODS``), ``baseline`` without one.
        settings: the shared planning inputs.
        budget: what the run may spend.
        stop_rule: the budget callback's stop rule.
        result: ``plan_budget``'s expected counts.
    """

    method: str
    settings: PlanSettings
    budget: Budget
    stop_rule: str
    result: dict[str, float]


def plan_method(method: PricedMethod | None, name: str, settings: PlanSettings, budget: Budget,
                stop_rule: str) -> Plan:
    """Walk the budget with ``method``'s update price (the baseline's when None)."""

    def update_cost(progress: float, update: int) -> UpdateCost:
        if method is None:
            return baseline_update_cost(settings, progress)
        return method.expected_update_cost(settings, progress, update)

    return Plan(name, settings, budget, stop_rule, plan_budget(update_cost, budget, stop_rule))


def recipe_settings(cli: Any, selection_rate: float | None = None) -> tuple[PlanSettings, Budget, str]:
    """The planning inputs of the built recipe ``cli`` (``app.recipe.build_recipe``).

    Args:
        cli: the built recipe (``.trainer`` with its callbacks, ``.model``, ``.datamodule``).
        selection_rate: an observed batch-selection rate to plan with (see ``PlanSettings``).

    Returns:
        ``(settings, budget, stop rule)``: as ``ntng fit`` with the same arguments would run.
    """
    trainer, module, data = cli.trainer, cli.model, cli.datamodule
    budget_callback = next((c for c in trainer.callbacks if isinstance(c, ReferenceTimeBudget)), None)
    if budget_callback is None:
        raise ConfigurationError("this recipe has no ReferenceTimeBudget callback to plan")
    budget = budget_callback.budget
    if budget is None:
        if trainer.max_steps is None or trainer.max_steps < 1:
            raise ConfigurationError("this recipe sets neither budget.budget nor trainer.max_steps: nothing ends it")
        budget = Budget(trainer.max_steps, "steps")
    if budget_callback.profile_path is not None:
        cost_model = RSTProfile.load(budget_callback.profile_path)
        for difference in cost_model.check_signature(module.model_signature(),
                                                     budget_callback.allow_profile_mismatch):
            print(f"ntng plan: warning: RST profile mismatch allowed: {difference}", file=sys.stderr)
    else:
        cost_model = analytic_flops_model(module.layers, module.prediction_head,
                                          budget_callback.reference_flops_per_second)
    layers = module.layers
    micro = data.hparams.micro_batch_size
    settings = PlanSettings(
        profile=cost_model,
        batch_size=micro * trainer.accumulate_grad_batches * trainer.world_size,
        micro_batch_size=micro,
        seq_len=data.seq_len,
        optimizer=type(module.configure_optimizers()).__name__,
        layers={stack: layers.num_layers(stack) for stack in layers.stack_names},
        always_active=layers.traits.always_active,
        selection_rate=selection_rate,
    )
    return settings, budget, budget_callback.stop_rule


def plan_recipe(cli: Any, selection_rate: float | None = None) -> Plan:
    """Plan what ``ntng fit`` on the built recipe ``cli`` would run, priced by its method callback."""
    settings, budget, stop_rule = recipe_settings(cli, selection_rate)
    priced = [c for c in cli.trainer.callbacks if isinstance(c, PricedMethod)]
    if len(priced) > 1:
        raise ConfigurationError("ntng plan prices one method at a time; this recipe has "
                                 + ", ".join(type(c).__name__ for c in priced))
    method = priced[0] if priced else None
    return plan_method(method, _method_name(method, settings.optimizer), settings, budget, stop_rule)


# A recipe without a method callback is named by its optimizer (NTNG's T5 Lion is RMSScaledLion).
OPTIMIZER_METHODS = {"Lion": "lion", "RMSScaledLion": "lion"}


def _method_name(method: PricedMethod | None, optimizer: str) -> str:
    if method is None:
        return OPTIMIZER_METHODS.get(optimizer, "baseline")
    return next((name for name, (cls, _) in METHODS.items() if type(method) is cls), type(method).__name__)


def flag_parser() -> ArgumentParser:
    """The flag form's options: the shared inputs, then each method's own constructor arguments."""
    parser = ArgumentParser(prog="ntng plan", description=__doc__.split("\n\n")[0], exit_on_error=False)
    parser.add_argument("--profile", type=str, required=True, help="RST profile YAML")
    parser.add_argument("--budget-hours", type=float, required=True, help="RST budget in hours")
    parser.add_argument("--batch-size", type=int, required=True, help="sequences per optimizer update")
    parser.add_argument("--micro-batch-size", type=int, required=True, help="sequences per forward/backward")
    parser.add_argument("--seq-len", type=int | None, default=None, help="tokens per sequence (default: the profile's)")
    parser.add_argument("--optimizer", type=str | None, default=None,
                        help="optimizer class name, for per-step costs (default: the method's, else AdamW)")
    parser.add_argument("--method", type=str, default="baseline", choices=list(METHODS))
    parser.add_argument("--stop-rule", type=str, default="after_crossing", choices=["after_crossing", "before_crossing"])
    for name, (cls, _) in METHODS.items():
        if cls is not None:
            parser.add_class_arguments(cls, name, skip={"irreducible_losses", "seed"})
    return parser


def profile_settings(profile: RSTProfile, batch_size: int, micro_batch_size: int, seq_len: int | None = None,
                     optimizer: str = "AdamW", selection_rate: float | None = None) -> PlanSettings:
    """Planning inputs from a profile alone: depth and family from its ``model`` signature.

    Args:
        profile: the cost table.
        batch_size: sequences per optimizer update.
        micro_batch_size: sequences per forward/backward.
        seq_len: tokens per sequence (default: the profile's).
        optimizer: optimizer class name, for per-step costs.
        selection_rate: an observed batch-selection rate (see ``PlanSettings``).
    """
    seq_len = seq_len or profile.model.get("seq_len")
    if not seq_len:
        raise ConfigurationError(f"profile {profile.name!r} states no seq_len; pass --seq-len")
    layers = profile.model.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise ConfigurationError(f"profile {profile.name!r} does not state model.layers per stack")
    return PlanSettings(
        profile=profile, batch_size=batch_size, micro_batch_size=micro_batch_size, seq_len=int(seq_len),
        optimizer=optimizer, layers={stack: int(n) for stack, n in layers.items()},
        always_active=family_traits(profile.model.get("family")).always_active, selection_rate=selection_rate,
    )


def plan_flags(argv: list[str], selection_rate: float | None = None) -> Plan:
    """Plan from an RST profile and flags (no recipe)."""
    parser = flag_parser()
    try:
        config = parser.parse_args(argv)
    except argparse.ArgumentError as err:
        raise ConfigurationError(f"ntng plan: {_flag_names(str(err), parser)}; `ntng plan --help` lists the "
                                 "flags") from err
    if not config.budget_hours > 0:
        raise ConfigurationError(f"ntng plan --budget-hours {config.budget_hours:g}: the budget must be positive; "
                                 "give the RST hours the run may spend, e.g. --budget-hours 24")
    cls, implied = METHODS[config.method]
    settings = profile_settings(RSTProfile.load(config.profile), config.batch_size, config.micro_batch_size,
                                config.seq_len, config.optimizer or implied or "AdamW", selection_rate)
    method = None
    if cls is not None:
        method = cls(**{key: value for key, value in vars(config[config.method]).items()})
    budget = Budget(config.budget_hours, "rst_hours")
    return plan_method(method, config.method, settings, budget, config.stop_rule)


def _flag_names(message: str, parser: ArgumentParser) -> str:
    """jsonargparse names missing flags by their destination (``batch_size``): name them as typed."""
    head, found, missing = message.partition("the following arguments are required: ")
    if not found:
        return message
    flags = {action.dest: action.option_strings[-1] for action in parser._actions if action.option_strings}
    return head + found + ", ".join(flags.get(name.strip(), name.strip()) for name in missing.split(","))


def _round(value: float) -> float | int:
    return int(value) if float(value).is_integer() else round(value, 2)


def print_plan(plan: Plan, output_format: str) -> None:
    """Print a plan as a table or as ``{method: {micro_batches, updates, tokens}}`` JSON."""
    counts = {k: _round(plan.result[k]) for k in ("micro_batches", "updates", "tokens")}
    if output_format == "json":
        print(json.dumps({plan.method: counts}))
        return
    s, budget = plan.settings, plan.budget
    print(f"{plan.method} on {s.profile.name}: {budget.amount:g} {budget.unit}, batch {s.batch_size} "
          f"= {s.micro_batches} x {s.micro_batch_size}, seq_len {s.seq_len}, {s.optimizer}")
    for key, value in counts.items():
        print(f"  {key:<14}{value:>16,}" if isinstance(value, int) else f"  {key:<14}{value:>16,.2f}")
    print(f"  {'s/update':<14}{plan.result['rst_hours'] * 3600.0 / max(plan.result['updates'], 1):>16.4f}")
    if budget.unit == "rst_hours" and not math.isclose(plan.result["rst_hours"], budget.amount, rel_tol=0.05):
        print(f"  note: spends {plan.result['rst_hours']:.4f} RST hours (one update overshoots or undershoots)")


def main(argv: list[str]) -> None:
    """``ntng plan`` entry point."""
    common = CommandParser(prog="ntng plan", add_help=False)
    common.add_argument("-c", "--config", action="append", default=[])
    common.add_argument("--format", default="table", choices=["table", "json"])
    common.add_argument("--selection-rate", type=float, default=None)
    known, rest = common.parse_known_args(argv)
    if known.selection_rate is not None and not 0 < known.selection_rate <= 1:
        raise ConfigurationError(f"ntng plan --selection-rate {known.selection_rate:g}: --selection-rate must be in "
                                 "(0, 1] (the share of scored examples a selection method kept); leave it out to "
                                 "plan with the method's expectation")
    if known.config:
        plan = plan_recipe(build_recipe(known.config, rest, planning=True), known.selection_rate)
    elif {"-h", "--help"} & set(rest) or not rest:
        flag_parser().print_help()
        print("\nrecipe form: ntng plan -c recipe.yaml [-c overlay.yaml] [--key value] [--format json] "
              "[--selection-rate R]")
        return
    else:
        plan = plan_flags(rest, known.selection_rate)
    print_plan(plan, known.format)
