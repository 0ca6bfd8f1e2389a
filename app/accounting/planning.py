"""Planning: what a budget buys, without a model or training (pure functions of the settings).

Each method prices one optimizer update from its own configured fields, as
``method.expected_update_cost(settings, progress, update) -> UpdateCost`` (:class:`PricedMethod`); the
baseline is :func:`baseline_update_cost`. :func:`plan_budget` walks updates until the budget is
spent under the same stop rule as ``ReferenceTimeBudget``: what nanoT5 users do by hand when they
turn hours into steps, but for methods whose step cost changes over the run. ``ntng plan``
(``app.commands.plan``) builds the settings and the method from a recipe or from a profile.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from app.accounting.clock import Budget, CostModel, budget_spent
from app.errors import ConfigurationError

# Budget units a plan can walk: each is a field of UpdateCost (wall time and FLOPs are not priced).
PLANNED_UNITS = {"rst_hours": "seconds", "steps": "updates", "tokens": "tokens"}


@dataclass(frozen=True)
class PlanSettings:
    """What every update price depends on besides the method.

    Attributes:
        profile: the cost model (an ``RSTProfile``, or ``AnalyticFlops`` without one).
        batch_size: sequences per optimizer update (all micro-batches and ranks).
        micro_batch_size: sequences per forward/backward pass.
        seq_len: tokens per sequence.
        optimizer: optimizer class name (profiles price optimizer steps by name).
        layers: full depth per stack (``{"encoder": 16}``).
        always_active: layers every active set keeps (the layer adapter's family traits).
        selection_rate: an observed share of scored examples kept, for batch-selection methods to
            plan with instead of their stationary expectation (None: the expectation).
    """

    profile: CostModel
    batch_size: int
    micro_batch_size: int
    seq_len: int
    optimizer: str
    layers: Mapping[str, int]
    always_active: tuple[int, ...] = ()
    selection_rate: float | None = None

    def __post_init__(self) -> None:
        if self.micro_batch_size < 1 or self.batch_size % self.micro_batch_size:
            raise ConfigurationError(
                f"batch size {self.batch_size} must be a positive multiple of the micro-batch {self.micro_batch_size}; "
                "give a --batch-size that is --micro-batch-size x the micro-batches per update (a recipe's batch is "
                "data micro_batch_size x trainer.accumulate_grad_batches x devices)"
            )
        if not self.layers:
            raise ConfigurationError(f"no layer depth to plan for (profile {self.profile.name!r} states no model.layers)")

    @property
    def micro_batches(self) -> int:
        """Micro-batches per optimizer update."""
        return self.batch_size // self.micro_batch_size

    @property
    def micro_batch_tokens(self) -> int:
        """Tokens per micro-batch."""
        return self.micro_batch_size * self.seq_len

    def depth(self, layers: float) -> dict[str, float]:
        """The same (expected) active depth in every stack."""
        return dict.fromkeys(self.layers, layers)


@dataclass(frozen=True)
class UpdateCost:
    """Expected cost of one optimizer update.

    Attributes:
        seconds: reference seconds of every pass and the optimizer step.
        micro_batches: micro-batches trained on (forward+backward).
        tokens: tokens trained on.
    """

    seconds: float
    micro_batches: float
    tokens: float
    updates: float = 1.0


@runtime_checkable
class PricedMethod(Protocol):
    """A method that can say what one update costs from its own configured fields."""

    def expected_update_cost(self, settings: PlanSettings, progress: float, update: int = 0) -> UpdateCost:
        """Expected cost of update number ``update`` (0-based), which starts at budget ``progress``."""
        ...


def trained_update_cost(settings: PlanSettings, depths: Mapping[int, float], extra_seconds: float = 0.0) -> UpdateCost:
    """An update whose every micro-batch trains at a depth drawn from ``depths``.

    Args:
        settings: the shared inputs.
        depths: ``{active layers per stack: probability}`` of one micro-batch.
        extra_seconds: passes that train nothing (scoring, Hessian estimates), per update.

    Returns:
        The micro-batches at their expected cost, the optimizer step at the mean depth (its cost is
        linear in the parameters updated), plus ``extra_seconds``.
    """
    tokens = settings.micro_batch_tokens
    per_micro = sum(mass * settings.profile.seconds("forward_backward", tokens, settings.depth(depth))
                    for depth, mass in depths.items() if mass > 0.0)
    mean_depth = sum(depth * mass for depth, mass in depths.items())
    optimizer = settings.profile.optimizer_seconds(settings.optimizer, settings.depth(mean_depth))
    micro = settings.micro_batches
    return UpdateCost(micro * per_micro + optimizer + extra_seconds, micro, micro * tokens)


def full_depth(settings: PlanSettings, method: str) -> int:
    """The depth shared by every stack (depth methods change the same indices in each)."""
    depths = set(settings.layers.values())
    if len(depths) != 1:
        raise ConfigurationError(f"{method} changes the same layers in every stack, whose depths differ: "
                                 f"{dict(settings.layers)}")
    return depths.pop()


def baseline_update_cost(settings: PlanSettings, progress: float = 0.0, extra_seconds: float = 0.0) -> UpdateCost:
    """Every micro-batch at full depth (plus ``extra_seconds`` of untrained passes)."""
    return trained_update_cost(settings, {max(settings.layers.values()): 1.0}, extra_seconds)


def forward_seconds(settings: PlanSettings) -> float:
    """One no-grad forward of a micro-batch at full depth (what scoring a candidate batch costs)."""
    return settings.profile.seconds("forward", settings.micro_batch_tokens, dict(settings.layers))


def plan_budget(update_cost: Callable[[float, int], UpdateCost], budget: Budget,
                stop_rule: str = "after_crossing") -> dict[str, float]:
    """Walk expected updates until ``budget`` is spent.

    Args:
        update_cost: the cost of an update from the budget progress at its start and its index.
        budget: the amount and unit (``rst_hours``, ``steps`` or ``tokens``).
        stop_rule: ``after_crossing`` (the crossing update is taken, NTNG) or ``before_crossing``
            (stop when the next update, priced like the last, would overshoot).

    Returns:
        ``{"micro_batches", "updates", "tokens", "rst_hours"}`` (expected values).
    """
    if budget.unit not in PLANNED_UNITS:
        raise ConfigurationError(f"ntng plan walks budgets in {', '.join(PLANNED_UNITS)}; {budget.unit} is measured, "
                                 "not priced")
    field = PLANNED_UNITS[budget.unit]
    amount = budget.amount * 3600.0 if budget.unit == "rst_hours" else budget.amount
    spent = {"seconds": 0.0, "micro_batches": 0.0, "tokens": 0.0, "updates": 0.0}
    last = 0.0
    while not budget_spent(spent[field], amount):
        cost = update_cost(spent[field] / amount, int(spent["updates"]))
        if stop_rule == "before_crossing" and spent["updates"] and not budget_spent(amount, spent[field] + last):
            break
        if cost.seconds <= 0:
            raise ConfigurationError(f"an update was priced at {cost.seconds} s")
        for key in spent:
            spent[key] += getattr(cost, key)
        last = getattr(cost, field)
    return {"micro_batches": spent["micro_batches"], "updates": int(spent["updates"]), "tokens": spent["tokens"],
            "rst_hours": spent["seconds"] / 3600.0}
