"""``ReferenceClock``: the one meter every pass of a run is charged to.

The LightningModule owns the clock and charges it inside the methods that run the network
(training step: forward+backward; scoring: forward only; optimizer step), so no method can forget
to pay and nothing else adds to it. The budget callback, the LR schedule and every stage schedule
read ``progress`` from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping, Protocol

from torch import nn

from app.accounting.cost_models import AnalyticFlops
from app.errors import ConfigurationError

BudgetUnit = Literal["rst_hours", "wall_hours", "tokens", "steps", "flops"]
BUDGET_UNITS: tuple[str, ...] = ("rst_hours", "wall_hours", "tokens", "steps", "flops")
# Sums of float costs drift by ~1e-16 per addition; a budget counts as spent within this relative
# tolerance so 12 updates of 0.6 s exhaust 7.2 s instead of buying a 13th.
RELATIVE_TOLERANCE = 1e-9


def budget_spent(spent: float, amount: float) -> bool:
    """Whether ``spent`` reaches ``amount`` (within ``RELATIVE_TOLERANCE``)."""
    return spent >= amount * (1.0 - RELATIVE_TOLERANCE)


class CostModel(Protocol):
    """Anything that prices a pass in reference seconds (``RSTProfile``, ``AnalyticFlops``)."""

    name: str

    def seconds(self, kind: str, tokens: int, active_layers: Mapping[str, int]) -> float: ...

    def optimizer_seconds(self, optimizer_name: str, active_layers: Mapping[str, float] | None = None) -> float: ...


@dataclass(frozen=True)
class Budget:
    """How much a run may spend.

    Attributes:
        amount: the budget in ``unit``.
        unit: ``rst_hours`` (reference system time, the default and NTNG's unit), ``wall_hours``
            (measured training time on this machine), ``tokens`` (tokens trained on), ``steps``
            (optimizer updates) or ``flops`` (analytic FLOPs of every charged pass).
    """

    amount: float
    unit: BudgetUnit = "rst_hours"

    def __post_init__(self) -> None:
        if self.unit not in BUDGET_UNITS:
            raise ConfigurationError(f"budget unit must be one of {', '.join(BUDGET_UNITS)}, got {self.unit!r}")
        if not self.amount > 0:
            raise ConfigurationError(f"budget must be positive, got {self.amount:g} {self.unit}")


class ReferenceClock:
    """Accumulates reference seconds, tokens, FLOPs, passes and steps of a run.

    Args:
        cost_model: prices each pass in reference seconds.
        flops_model: counts FLOPs of each pass (for the ``flops`` unit and logging).
        budget: what the run may spend; None leaves progress to the trainer's step limit.
    """

    def __init__(self, cost_model: CostModel, flops_model: AnalyticFlops, budget: Budget | None = None) -> None:
        self.cost_model, self.flops_model, self.budget = cost_model, flops_model, budget
        self.rst_seconds = 0.0
        self.wall_seconds = 0.0
        self.flops = 0.0
        self.tokens_trained = 0
        self.tokens_scored = 0
        self.passes = {"forward": 0, "forward_backward": 0}
        self.optimizer_steps = 0

    def charge(self, kind: str, tokens: int, active_layers: Mapping[str, int]) -> float:
        """Pay for one pass; returns its reference seconds.

        Args:
            kind: ``forward`` (no gradient: scoring, Hessian-free estimates) or ``forward_backward``.
            tokens: input tokens of the pass.
            active_layers: active depth per layer stack during the pass.
        """
        seconds = self.cost_model.seconds(kind, tokens, active_layers)
        self.rst_seconds += seconds
        self.flops += self.flops_model.flops(kind, tokens, active_layers)
        self.passes[kind] += 1
        if kind == "forward_backward":
            self.tokens_trained += tokens
        else:
            self.tokens_scored += tokens
        return seconds

    def charge_optimizer_step(self, optimizer_name: str, updated_fraction: float = 1.0) -> float:
        """Pay for one optimizer update.

        Args:
            optimizer_name: the optimizer's class name (profiles price optimizers separately).
            updated_fraction: share of the trainable parameters that had a gradient. PyTorch
                optimizers skip parameters whose grad is None, so a step at reduced depth updates
                fewer of them; the profile's full-depth cost is scaled by this share.

        Returns:
            The seconds charged.
        """
        seconds = self.cost_model.optimizer_seconds(optimizer_name) * updated_fraction
        self.rst_seconds += seconds
        self.optimizer_steps += 1
        return seconds

    def add_wall_seconds(self, seconds: float) -> None:
        """Add measured training wall time (used by the ``wall_hours`` unit)."""
        self.wall_seconds += seconds

    def spent(self, unit: str | None = None) -> float:
        """What has been spent, in ``unit`` (default: the budget's)."""
        unit = unit or (self.budget.unit if self.budget else "rst_hours")
        return {
            "rst_hours": self.rst_seconds / 3600.0,
            "wall_hours": self.wall_seconds / 3600.0,
            "tokens": float(self.tokens_trained),
            "steps": float(self.optimizer_steps),
            "flops": self.flops,
        }[unit]

    @property
    def progress(self) -> float:
        """Fraction of the budget spent, in [0, 1] (clamped: the crossing step may overshoot)."""
        if self.budget is None:
            raise RuntimeError("this clock has no budget; progress is undefined")
        return 1.0 if self.exhausted else self.spent() / self.budget.amount

    @property
    def exhausted(self) -> bool:
        """Whether the budget is spent."""
        return self.budget is not None and budget_spent(self.spent(), self.budget.amount)

    def state_dict(self) -> dict[str, Any]:
        return {
            "rst_seconds": self.rst_seconds,
            "wall_seconds": self.wall_seconds,
            "flops": self.flops,
            "tokens_trained": self.tokens_trained,
            "tokens_scored": self.tokens_scored,
            "passes": dict(self.passes),
            "optimizer_steps": self.optimizer_steps,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.rst_seconds = float(state["rst_seconds"])
        self.wall_seconds = float(state["wall_seconds"])
        self.flops = float(state["flops"])
        self.tokens_trained = int(state["tokens_trained"])
        self.tokens_scored = int(state["tokens_scored"])
        self.passes = dict(state["passes"])
        self.optimizer_steps = int(state["optimizer_steps"])


def count_parameters(module: nn.Module, skip: tuple[str, ...] = ()) -> int:
    """Parameters of ``module``, leaving out those whose name contains any of ``skip``."""
    return sum(p.numel() for n, p in module.named_parameters() if not any(s in n for s in skip))


def analytic_flops_model(layers: Any, head: nn.Module, flops_per_second: float) -> AnalyticFlops:
    """Build the FLOP model of an HF model from its layer adapter and prediction head.

    Embedding lookups do no matmul work, so the always-run part is the head (whose decoder is the
    tied embedding matrix: that projection is real work).

    Args:
        layers: the model's ``LayerAdapter``.
        head: the module that runs on every prediction (MLM head or LM head).
        flops_per_second: declared throughput of the reference device.
    """
    # Block 0 of T5 carries the relative position bias, a lookup: count a later block when possible.
    layer_params = {
        stack: count_parameters(layers.layers(stack)[-1], skip=("relative_attention_bias",))
        for stack in layers.stack_names
    }
    return AnalyticFlops(layer_params, count_parameters(head), flops_per_second)
