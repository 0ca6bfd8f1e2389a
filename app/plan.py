"""``ntng plan``: what a budget buys, from an RST profile alone (no model, no training).

Each method registers a planner: the *expected* reference cost of one optimizer update (and the
micro-batches and tokens it trains on) at a given budget progress. ``plan`` walks updates until
the budget is spent under the same stop rule as ``ReferenceTimeBudget``, which is what nanoT5 users
do by hand when they turn hours into steps, but for methods whose step cost changes over the run.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from typing import Callable

from app.clock import budget_spent
from app.cost_models import RSTProfile
from app.errors import ConfigurationError


@dataclass(frozen=True)
class PlanSettings:
    """What every planner gets.

    Attributes:
        profile: the cost table.
        batch_size: sequences per optimizer update.
        micro_batch_size: sequences per forward/backward pass.
        seq_len: tokens per sequence.
        optimizer: optimizer class name (for per-step optimizer costs).
        options: method-specific options from the command line.
    """

    profile: RSTProfile
    batch_size: int
    micro_batch_size: int
    seq_len: int
    optimizer: str
    options: argparse.Namespace

    @property
    def micro_batches(self) -> int:
        return self.batch_size // self.micro_batch_size

    @property
    def micro_batch_tokens(self) -> int:
        return self.micro_batch_size * self.seq_len

    def full_depth(self) -> dict[str, int]:
        layers = self.profile.model.get("layers")
        if not isinstance(layers, dict) or not layers:
            raise ConfigurationError(f"profile {self.profile.name!r} does not state model.layers per stack")
        return {stack: int(n) for stack, n in layers.items()}


@dataclass(frozen=True)
class UpdateCost:
    """Expected cost of one optimizer update."""

    seconds: float
    micro_batches: float  # trained (forward+backward) micro-batches
    tokens: float  # tokens trained on


Planner = Callable[[PlanSettings, float], UpdateCost]
PLANNERS: dict[str, tuple[Planner, Callable[[argparse.ArgumentParser], None] | None]] = {}


def register_planner(name: str, options: Callable[[argparse.ArgumentParser], None] | None = None):
    """Decorator: make ``planner`` available as ``ntng plan --method name``."""

    def decorate(planner: Planner) -> Planner:
        PLANNERS[name] = (planner, options)
        return planner

    return decorate


@register_planner("baseline")
def plan_baseline(settings: PlanSettings, progress: float) -> UpdateCost:
    """Every micro-batch runs forward+backward at full depth."""
    per_micro = settings.profile.seconds("forward_backward", settings.micro_batch_tokens, settings.full_depth())
    optimizer = settings.profile.optimizer_seconds(settings.optimizer, settings.full_depth())
    seconds = settings.micro_batches * per_micro + optimizer
    return UpdateCost(seconds, settings.micro_batches, settings.micro_batches * settings.micro_batch_tokens)


def plan(
    method: str, settings: PlanSettings, budget_hours: float, stop_rule: str = "after_crossing"
) -> dict[str, float]:
    """Walk expected updates until ``budget_hours`` of reference time are spent.

    Args:
        method: a registered planner name.
        settings: shared inputs.
        budget_hours: the RST budget.
        stop_rule: ``after_crossing`` (the crossing update is taken, NTNG) or ``before_crossing``.

    Returns:
        ``{"micro_batches", "updates", "tokens", "rst_hours"}`` (expected values).
    """
    if method not in PLANNERS:
        raise ConfigurationError(f"unknown method {method!r}; known: {', '.join(sorted(PLANNERS))}")
    planner = PLANNERS[method][0]
    budget = budget_hours * 3600.0
    spent = micro_batches = tokens = 0.0
    updates, last = 0, 0.0
    while not budget_spent(spent, budget):
        cost = planner(settings, spent / budget)
        if stop_rule == "before_crossing" and updates and not budget_spent(budget, spent + last):
            break
        if cost.seconds <= 0:
            raise ConfigurationError(f"planner {method!r} priced an update at {cost.seconds} s")
        spent, micro_batches, tokens, updates, last = (
            spent + cost.seconds, micro_batches + cost.micro_batches, tokens + cost.tokens, updates + 1, cost.seconds
        )
    return {"micro_batches": micro_batches, "updates": updates, "tokens": tokens, "rst_hours": spent / 3600.0}


def _round(value: float) -> float | int:
    return int(value) if float(value).is_integer() else round(value, 2)


def main(argv: list[str]) -> None:
    """``ntng plan`` entry point."""
    # Import the method modules so their planners register themselves.
    import callbacks  # noqa: F401

    parser = argparse.ArgumentParser(prog="ntng plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", required=True, help="RST profile YAML")
    parser.add_argument("--budget-hours", type=float, required=True, help="RST budget in hours")
    parser.add_argument("--batch-size", type=int, required=True, help="sequences per optimizer update")
    parser.add_argument("--micro-batch-size", type=int, required=True, help="sequences per forward/backward")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the profile's)")
    parser.add_argument("--optimizer", default="AdamW", help="optimizer class name, for per-step costs")
    parser.add_argument("--method", default="baseline", choices=sorted(PLANNERS))
    parser.add_argument("--stop-rule", default="after_crossing", choices=["after_crossing", "before_crossing"])
    parser.add_argument("--format", default="table", choices=["table", "json"])
    for name, (_, options) in sorted(PLANNERS.items()):
        if options is not None:
            options(parser.add_argument_group(f"{name} options"))
    args = parser.parse_args(argv)
    if args.batch_size % args.micro_batch_size:
        raise ConfigurationError("--batch-size must be a multiple of --micro-batch-size")
    profile = RSTProfile.load(args.profile)
    seq_len = args.seq_len or profile.model.get("seq_len")
    if not seq_len:
        raise ConfigurationError(f"profile {profile.name!r} states no seq_len; pass --seq-len")
    settings = PlanSettings(profile, args.batch_size, args.micro_batch_size, int(seq_len), args.optimizer, args)
    result = plan(args.method, settings, args.budget_hours, args.stop_rule)
    counts = {k: _round(result[k]) for k in ("micro_batches", "updates", "tokens")}
    if args.format == "json":
        print(json.dumps({args.method: counts}))
        return
    per_update = result["rst_hours"] * 3600.0 / max(result["updates"], 1)
    print(f"{args.method} on {profile.name}: {args.budget_hours:g} RST hours, batch {args.batch_size} "
          f"= {settings.micro_batches} x {args.micro_batch_size}, seq_len {seq_len}")
    for key, value in counts.items():
        print(f"  {key:<14}{value:>16,}" if isinstance(value, int) else f"  {key:<14}{value:>16,.2f}")
    print(f"  {'s/update':<14}{per_update:>16.4f}")
    if not math.isclose(result["rst_hours"], args.budget_hours, rel_tol=0.05):
        print(f"  note: spends {result['rst_hours']:.4f} RST hours (one update overshoots or undershoots)")
