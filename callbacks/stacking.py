"""``LayerStacking``: train a shallow prefix of the model and grow it by copying layers.

Functional core, shared by the callback, ``ntng plan`` and the tests: :class:`GrowthSchedule` (the
depth at budget progress ``t``), :func:`growth_copies` (the ``(src, dst)`` copies of one growth
event) and :func:`apply_growth` (one event through the layer adapter). :class:`LayerStacking` is the
thin stateful callback, which also prices an update for ``ntng plan``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Sequence

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from app.accounting.clock import budget_spent
from app.accounting.planning import PlanSettings, UpdateCost, full_depth, trained_update_cost
from app.errors import ConfigurationError
from app.model.layers import LayerAdapter
from app.modules.budgeted import require_budgeted_module
from callbacks.sampling import common_depth

Growth = Literal["double", "add"]
OptimizerStatePolicy = Literal["reset", "copy", "new_only"]
REWARM_KEY = "stacking_rewarm"
# What each policy does to a copied layer's state (``reset`` then clears every parameter's state).
_PER_COPY_POLICY = {"reset": "leave", "copy": "copy", "new_only": "reset"}


def growth_copies(depth: int, growth: Growth, add_layers: int | None = None) -> list[tuple[int, int]]:
    """The layer copies of one growth event at ``depth`` (grown depth: last destination + 1).

    Args:
        depth: active layers before the event.
        growth: ``"double"`` (layer ``i -> i + depth`` for ``i < depth``) or ``"add"`` (the top
            ``add_layers`` layers copied on top: ``depth - k + j -> depth + j``).
        add_layers: ``k``, layers added by an ``"add"`` event.

    Returns:
        ``(src, dst)`` pairs; every source is below ``depth``, so the order of copies is free.
    """
    if growth == "double":
        return [(i, i + depth) for i in range(depth)]
    return [(depth - add_layers + j, depth + j) for j in range(add_layers)]


@dataclass(frozen=True)
class GrowthSchedule:
    """When, and by how much, the depth grows (checked on construction).

    Attributes:
        initial_layers: depth before the first event.
        growth_fractions: budget fractions of the events, increasing, in (0, 1).
        growth: ``"double"`` or ``"add"`` (see :func:`growth_copies`).
        add_layers: layers per ``"add"`` event; None with ``"double"``.
    """

    initial_layers: int
    growth_fractions: tuple[float, ...]
    growth: Growth = "double"
    add_layers: int | None = None

    def __post_init__(self) -> None:
        fractions = list(self.growth_fractions)
        if self.initial_layers < 1:
            raise ConfigurationError(f"stacking: initial_layers must be >= 1, got {self.initial_layers}")
        if not fractions or not 0.0 < fractions[0] or fractions[-1] >= 1.0 or fractions != sorted(set(fractions)):
            raise ConfigurationError(f"stacking: growth_fractions must be strictly increasing in (0, 1): {fractions}")
        if self.growth not in ("double", "add"):
            raise ConfigurationError(f"stacking: growth must be 'double' or 'add', got {self.growth!r}")
        if self.growth == "double" and self.add_layers is not None:
            raise ConfigurationError("stacking: add_layers is only used with growth='add'")
        if self.growth == "add" and not (self.add_layers is not None and 1 <= self.add_layers <= self.initial_layers):
            raise ConfigurationError(
                f"stacking: growth='add' copies the top add_layers layers, so it needs 1 <= add_layers <= "
                f"initial_layers ({self.initial_layers}), got {self.add_layers}"
            )

    def depths(self) -> list[int]:
        """Depth before the first event, then after each event."""
        depths = [self.initial_layers]
        for _ in self.growth_fractions:
            depths.append(growth_copies(depths[-1], self.growth, self.add_layers)[-1][1] + 1)
        return depths

    def events_due(self, progress: float) -> int:
        """Number of events whose fraction ``progress`` has reached."""
        # Within the clock's tolerance, so callback and planner agree when progress lands on a fraction.
        return sum(budget_spent(progress, f) for f in self.growth_fractions)

    def depth_at(self, progress: float) -> int:
        """Depth of an update that starts at budget progress ``progress``."""
        return self.depths()[self.events_due(progress)]

    def check_full_depth(self, full_depth: int) -> None:
        """Raises ``ConfigurationError`` unless the schedule fits a model of ``full_depth`` layers."""
        depths = " -> ".join(map(str, self.depths()))
        if not self.initial_layers < full_depth:
            raise ConfigurationError(
                f"stacking: initial_layers={self.initial_layers} must be below the model's {full_depth} layers "
                f"(schedule {depths}); set trainer.callbacks.initial_layers{self._fitting(full_depth)}")
        if self.growth == "double" and self.depths()[-1] != full_depth:
            raise ConfigurationError(
                f"stacking: doubling {depths} must end at the model's {full_depth} layers; "
                f"change initial_layers or the number of growth_fractions{self._fitting(full_depth)}"
            )
        if self.depths()[-1] > full_depth:
            raise ConfigurationError(f"stacking: adding layers {depths} exceeds the model's {full_depth} layers; "
                                     "lower initial_layers or add_layers, or use fewer growth_fractions")

    def _fitting(self, full_depth: int) -> str:
        """A doubling schedule that ends at ``full_depth`` (as a hint), or nothing when there is none."""
        events = len(self.growth_fractions)
        for count in [events, *range(events - 1, 0, -1), *range(events + 1, 5)]:
            if full_depth % 2**count == 0 and full_depth // 2**count >= 1:
                fractions = "" if count == events else f" and {count} growth fraction{'s' * (count != 1)}"
                return f", e.g. initial_layers={full_depth // 2**count}{fractions} with growth: double"
        return ""


def apply_growth(layers: LayerAdapter, copies: Sequence[tuple[int, int]], optimizer: torch.optim.Optimizer,
                 optimizer_state: OptimizerStatePolicy) -> int:
    """Copies layers by name in every stack, applies the optimizer-state policy, activates the prefix.

    Args:
        layers: the model's layer adapter.
        copies: ``(src, dst)`` pairs of one event (:func:`growth_copies`).
        optimizer: the optimizer holding every layer's parameters.
        optimizer_state: ``"reset"`` (all state cleared), ``"copy"`` (a new layer gets a copy of its
            source's state) or ``"new_only"`` (new layers start with fresh state).

    Returns:
        The grown depth.
    """
    for src, dst in copies:
        layers.copy_layer(src, dst, optimizer=optimizer, optimizer_state=_PER_COPY_POLICY[optimizer_state])
    if optimizer_state == "reset":
        # clear(), not NTNG's `state = {}`: torch optimizers need the defaultdict they created.
        optimizer.state.clear()
    depth = max(dst for _, dst in copies) + 1
    layers.set_active_layers(range(depth))
    return depth


@dataclass(frozen=True)
class LinearRewarm:
    """LR multiplier ramping linearly 0 -> 1 from budget progress ``start`` over ``length``."""

    start: float
    length: float

    def __call__(self, progress: float) -> float:
        return min(1.0, max(0.0, (progress - self.start) / self.length))


class LayerStacking(Callback):
    """Progressive layer stacking: train the bottom layers, then grow the depth by copying layers.

    Papers: Gong et al. 2019 (*Efficient Training of BERT by Progressively Stacking*: double the stack
    by copying it on top, 3 -> 6 -> 12), Reddi et al. 2023 (*Efficient Training of Language Models
    using Few-Shot Learning*: gradual stacking, the top block copied on top, LR re-warmed per stage),
    and NTNG's variant (Kaddour et al. 2023), whose defaults these are: BERT 4 -> 8 -> 16 doubling at
    12.5 % and 30 % of the budget, T5 3 -> 6 -> 12, both with fresh optimizer state for the new
    layers only (``new_only``); one budget-driven LR schedule, not restarted. NTNG's BERT config says
    ``reset_optim: true``, but the only call that builds its stacking scheduler never passes it, so
    the code that produced NTNG's results kept the old layers' Adam moments and step counts and gave
    the new layers fresh state: ``new_only``. Gong et al.'s ``--reset-optimizer`` is ``reset``.

    The full-depth model exists throughout; only the first ``depth`` layers of every stack run (T5's
    encoder and decoder grow together, and block 0, with the relative position bias, is always in
    the prefix). Growth happens at the first optimizer-step boundary whose budget progress (spent
    before the step) reaches a growth fraction, so every micro-batch of an update has one depth and
    all DDP ranks grow at the same step; several due events are applied in order. Layers are copied
    by name (T5 block 0's bias is never copied). ``model_depth`` follows the grown depth, so
    validation and export use the model as grown so far, also when the budget ends before the last
    event. Logs ``method/depth`` and ``method/growth_event`` (new depth at a growth, else 0) every update.

    Args:
        initial_layers: active layers at the start (NTNG: BERT 4, T5 3).
        growth_fractions: budget fractions of the growth events, increasing, in (0, 1).
        growth: ``"double"`` (Gong, NTNG: layer ``i -> i + n``) or ``"add"`` (Reddi: ``add_layers``
            copied from the top ``add_layers`` layers). Doubling must end exactly at the model's
            depth; adding must not exceed it.
        add_layers: layers per ``"add"`` event (Reddi et al.'s block size is unstated; no default).
        optimizer_state: ``"new_only"`` (NTNG, BERT and T5 as run: fresh state for the new layers,
            the others keep theirs), ``"reset"`` (every parameter's state cleared, Adam restarts;
            Gong's ``--reset-optimizer``, NTNG's config as written) or ``"copy"`` (new layers get
            their source's state; Gong's ``--double-optimizer``).
        rewarm_fraction: 0 keeps the LR schedule (NTNG, Gong); > 0 multiplies the LR after each
            growth by a linear 0 -> 1 ramp over this budget fraction (Reddi et al.'s per-stage warmup,
            here in budget units rather than their 10k steps).
    """

    leaves_layers_without_gradient: ClassVar[bool] = True
    # Strategy kind -> why it is refused (app.modules.strategies.check_strategy_support; docs/strategies.md).
    unsupported_strategies: ClassVar[dict[str, str]] = {
        "fsdp": "it copies whole layers, and their optimizer state by parameter, into other layers mid-run; "
                "FSDP's parameters and optimizer state are flat shards",
        "deepspeed": "it copies whole layers, and their optimizer state by parameter, into other layers mid-run; "
                     "ZeRO keeps the optimizer state as flat partitions (and stage 3 the parameters too)",
    }

    def __init__(
        self,
        initial_layers: int = 4,
        growth_fractions: Sequence[float] = (0.125, 0.3),
        growth: Growth = "double",
        add_layers: int | None = None,
        optimizer_state: OptimizerStatePolicy = "new_only",
        rewarm_fraction: float = 0.0,
    ) -> None:
        self.schedule = GrowthSchedule(initial_layers, tuple(growth_fractions), growth, add_layers)
        if optimizer_state not in _PER_COPY_POLICY:
            raise ConfigurationError(
                f"stacking: optimizer_state must be one of {list(_PER_COPY_POLICY)}, got {optimizer_state!r}"
            )
        if not 0.0 <= rewarm_fraction < 1.0:
            raise ConfigurationError(f"stacking: rewarm_fraction must be in [0, 1), got {rewarm_fraction}")
        self.optimizer_state, self.rewarm_fraction = optimizer_state, rewarm_fraction
        self._reset()

    def _reset(self) -> None:
        self.depth, self.next_event, self.rewarm_start = self.schedule.initial_layers, 0, None

    def _apply(self, pl_module: LightningModule) -> None:
        pl_module.layers.set_active_layers(range(self.depth))
        pl_module.model_depth = self.depth
        if self.rewarm_start is None:
            pl_module.lr_adjustments.pop(REWARM_KEY, None)
        else:
            pl_module.lr_adjustments[REWARM_KEY] = LinearRewarm(self.rewarm_start, self.rewarm_fraction)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        layers = require_budgeted_module(pl_module, "LayerStacking").layers
        self.schedule.check_full_depth(common_depth(layers, "LayerStacking"))
        # A fresh run starts shallow here, so the sanity validation already sees the initial depth;
        # a resume then loads the saved state, which on_train_start applies.
        self._reset()
        self._apply(pl_module)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._apply(pl_module)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx % trainer.accumulate_grad_batches:
            return
        progress = pl_module.budget_progress()
        due, event = self.schedule.events_due(progress), 0.0
        if due > self.next_event:
            before = self.depth
            for _ in range(self.next_event, due):
                copies = growth_copies(self.depth, self.schedule.growth, self.schedule.add_layers)
                self.depth = apply_growth(pl_module.layers, copies, trainer.optimizers[0], self.optimizer_state)
            self.next_event = due
            if self.rewarm_fraction > 0:
                self.rewarm_start = progress
            self._apply(pl_module)
            event = float(self.depth)
            rank_zero_info(
                f"ntng: LayerStacking grew {before} -> {self.depth} layers at budget progress {progress:.4f} "
                f"(step {trainer.global_step}, event {due} of {len(self.schedule.growth_fractions)})"
            )
        pl_module.log_update("method/depth", float(self.depth))
        # Logged every update: Lightning re-emits a step metric until the epoch ends, so a value logged
        # only at growth would repeat on the following updates.
        pl_module.log_update("method/growth_event", event)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # model_depth stays at the grown depth: an unfinished schedule exports the trained prefix.
        pl_module.layers.set_active_layers(pl_module.model_layers())

    def state_dict(self) -> dict[str, Any]:
        return {"depth": self.depth, "next_event": self.next_event, "rewarm_start": self.rewarm_start}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.depth, self.next_event = int(state_dict["depth"]), int(state_dict["next_event"])
        self.rewarm_start = state_dict["rewarm_start"]

    def expected_update_cost(self, settings: PlanSettings, progress: float, update: int = 0) -> UpdateCost:
        """Every micro-batch of the update at the schedule's depth at ``progress``."""
        self.schedule.check_full_depth(full_depth(settings, "LayerStacking"))
        return trained_update_cost(settings, {self.schedule.depth_at(progress): 1.0})
