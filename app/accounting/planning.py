"""``ntng plan``: what a budget buys, from an RST profile alone (no model, no training).

Each method registers a planner: the *expected* reference cost of one optimizer update (and the
micro-batches and tokens it trains on) at a given budget progress. ``plan`` walks updates until
the budget is spent under the same stop rule as ``ReferenceTimeBudget``, which is what nanoT5 users
do by hand when they turn hours into steps, but for methods whose step cost changes over the run.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable

from app.accounting.clock import budget_spent
from app.accounting.cost_models import RSTProfile
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
