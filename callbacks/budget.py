"""``ReferenceTimeBudget``: stop a run when its budget is spent, and pace validation by budget.

NTNG's rule (§2.5): a micro-batch's reference cost is added *before* it runs and training stops
once the counter reaches the budget, so the step that crosses the budget is taken. We stop at
optimizer-step granularity: the update during which spending crosses the budget completes (all its
accumulated micro-batches), then the run stops (``stop_rule="after_crossing"``, the default).
``stop_rule="before_crossing"`` instead stops when the next update, priced like the last one,
would overshoot: the run then never exceeds its budget but may leave up to one update unspent.

The LR schedule and every method read budget progress from the module's clock, so this callback
only decides *when to stop*, *when to validate or checkpoint*, and logs what was spent.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from app.accounting.clock import Budget, BudgetUnit, ReferenceClock, analytic_flops_model, budget_spent
from app.accounting.cost_models import RSTProfile
from app.errors import ConfigurationError, TrainingDiverged
from app.files import atomic_path, staging_path
from app.modules.budgeted import require_budgeted_module
from callbacks.export import HuggingFaceExport

# Lightning validates when (batch index + 1) % val_check_batch == 0; "never" without an inf, which
# Lightning reads as "validate at every epoch end".
_NEVER = 10**15


class ReferenceTimeBudget(Callback):
    """Charge-aware budget: stop, validate and checkpoint by what the reference clock says.

    Args:
        budget: amount the run may spend in ``unit``; None leaves stopping to ``trainer.max_steps``
            (the clock still runs and is logged).
        unit: ``rst_hours``, ``wall_hours``, ``tokens``, ``steps`` or ``flops``.
        profile: RST profile YAML pricing each pass; None prices passes analytically from FLOPs at
            ``reference_flops_per_second``.
        allow_profile_mismatch: use a profile measured for a different model (logged as a warning).
        reference_flops_per_second: throughput of the reference device for the analytic model
            (default 1e14: a bf16 A100 at roughly a third of its peak).
        stop_rule: ``after_crossing`` (NTNG: the crossing update is taken) or ``before_crossing``.
        validate_every_hours: validate whenever RST passes a multiple of this (NTNG: 6, or 3 for
            batch selection).
        validate_every_fraction: validate whenever budget progress passes a multiple of this.
        checkpoint_every_hours: save ``checkpoints/rst-<hours>h.ckpt`` at multiples of this RST.
        checkpoint_every_fraction: the same at multiples of budget progress.
        checkpoint_at_hours: also save ``checkpoints/at-<hours>h.ckpt`` at the first update boundary
            whose RST reaches each of these (``ntng sweep`` branches shorter budgets' cooldowns from them).
    """

    def __init__(
        self,
        budget: float | None = None,
        unit: BudgetUnit = "rst_hours",
        profile: str | None = None,
        allow_profile_mismatch: bool = False,
        reference_flops_per_second: float = 1.0e14,
        stop_rule: Literal["after_crossing", "before_crossing"] = "after_crossing",
        validate_every_hours: float | None = None,
        validate_every_fraction: float | None = None,
        checkpoint_every_hours: float | None = None,
        checkpoint_every_fraction: float | None = None,
        checkpoint_at_hours: list[float] | None = None,
    ) -> None:
        if budget is not None and not budget > 0:
            raise ConfigurationError(f"budget.budget={budget:g}: the budget must be positive; set it to what the run "
                                     f"may spend in budget.unit ({unit}), e.g. --budget.budget=0.001, or to null to "
                                     "stop at trainer.max_steps")
        self.budget = Budget(budget, unit) if budget is not None else None
        if stop_rule not in ("after_crossing", "before_crossing"):
            raise ConfigurationError(f"stop_rule must be after_crossing or before_crossing, got {stop_rule!r}")
        if self.budget is None and (validate_every_fraction or checkpoint_every_fraction):
            raise ConfigurationError("validate/checkpoint_every_fraction need a budget")
        self.profile_path, self.allow_profile_mismatch = profile, allow_profile_mismatch
        self.reference_flops_per_second, self.stop_rule = reference_flops_per_second, stop_rule
        self.validate_every = self._cadence(validate_every_hours, validate_every_fraction)
        self.checkpoint_every = self._cadence(checkpoint_every_hours, checkpoint_every_fraction)
        self.checkpoint_at_hours = sorted(checkpoint_at_hours or [])
        if any(hours <= 0 for hours in self.checkpoint_at_hours):
            raise ConfigurationError(f"checkpoint_at_hours must be positive, got {self.checkpoint_at_hours}")
        self.clock: ReferenceClock | None = None
        self._marks = {"validate": 0, "checkpoint": 0, "at_hours": 0}  # cadence intervals, marks passed
        self._spent_at_last_step = 0.0
        self._last_step_cost = 0.0
        self._step_started: float | None = None
        self._nonfinite_loss: torch.Tensor | bool = False  # any micro-batch of this update had a NaN/inf loss

    @staticmethod
    def _cadence(hours: float | None, fraction: float | None) -> tuple[str, float] | None:
        if hours is not None and fraction is not None:
            raise ConfigurationError("give a cadence in hours or as a budget fraction, not both")
        if hours is not None:
            return ("hours", hours)
        return ("fraction", fraction) if fraction is not None else None

    # -- setup ------------------------------------------------------------------------------------

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        pl_module = require_budgeted_module(pl_module, "ReferenceTimeBudget")
        signature = pl_module.model_signature()
        flops_model = analytic_flops_model(pl_module.layers, pl_module.prediction_head, self.reference_flops_per_second)
        if self.profile_path is not None:
            cost_model = RSTProfile.load(self.profile_path)
            for difference in cost_model.check_signature(signature, self.allow_profile_mismatch):
                rank_zero_warn(f"RST profile mismatch allowed: {difference}")
        else:
            cost_model = flops_model
        self.clock = ReferenceClock(cost_model, flops_model, self.budget)
        pl_module.attach_clock(self.clock)
        if self.budget is not None:
            if trainer.max_steps != -1:
                rank_zero_warn(f"trainer.max_steps={trainer.max_steps} may end the run before its budget")
            if trainer.fit_loop.max_epochs is None or trainer.fit_loop.max_epochs > 0:
                trainer.fit_loop.max_epochs = -1  # the budget, not the epoch count, ends the run
            rank_zero_info(
                f"ntng: budget {self.budget.amount:g} {self.budget.unit} priced by {cost_model.name}"
            )
        if self.validate_every is not None:
            trainer.check_val_every_n_epoch = None  # validation is paced by the clock instead

    # -- per step ---------------------------------------------------------------------------------

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._step_started = time.perf_counter()
        if self.clock is not None and self.budget is not None and self.clock.exhausted:
            trainer.should_stop = True  # resumed from a checkpoint taken after the budget ran out

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._step_started = time.perf_counter()  # validation is not training time

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        clock = self.clock
        if clock is None:
            return
        if self.budget is not None and self.budget.unit == "wall_hours":
            # Wall time runs from the previous micro-batch's end, so it covers data loading and every
            # callback's batch-start work (batch selection scores there) whatever the callback order.
            # Rank 0's clock decides so every rank computes the same progress.
            now = time.perf_counter()
            clock.add_wall_seconds(trainer.strategy.broadcast(now - self._step_started, src=0))
            self._step_started = now
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):  # no host sync here: the flag stays on the device until the update ends
            self._nonfinite_loss = ~torch.isfinite(loss.detach()) | self._nonfinite_loss
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # decisions are taken at optimizer-step boundaries only
        self._stop_if_diverged(trainer)
        spent = clock.spent()
        self._last_step_cost, self._spent_at_last_step = spent - self._spent_at_last_step, spent
        pl_module.log_update("rst/seconds", clock.rst_seconds)
        pl_module.log_update("rst/hours", clock.rst_seconds / 3600.0)
        if self.budget is not None:
            pl_module.log_update("rst/progress", clock.progress, prog_bar=True)
            # Nothing syncs should_stop across ranks; rank 0's identical clock decides for all.
            trainer.should_stop = trainer.should_stop or trainer.strategy.broadcast(self._should_stop(), src=0)
        if self._passed("validate"):
            trainer.val_check_batch = trainer.fit_loop.epoch_loop.total_batch_idx + 1
        elif self.validate_every is not None:
            trainer.val_check_batch = _NEVER
        if self._passed("checkpoint") and not trainer.should_stop:
            path = self._checkpoint_path(trainer)
            self._save(trainer, pl_module, path)
            self._replace_last(trainer, path)
        for hours in self.checkpoint_at_hours[self._marks["at_hours"]:]:
            if not budget_spent(clock.rst_seconds / 3600.0, hours):
                break
            self._marks["at_hours"] += 1
            self._save(trainer, pl_module, self._checkpoint_path(trainer).with_name(f"at-{hours:g}h.ckpt"))

    def _stop_if_diverged(self, trainer: Trainer) -> None:
        """End the run, keeping the last good checkpoint, when an update's loss was NaN or inf on any rank."""
        flag = self._nonfinite_loss
        self._nonfinite_loss = False
        diverged = bool(flag.item()) if isinstance(flag, torch.Tensor) else flag
        if trainer.strategy.reduce_boolean_decision(diverged, all=False):
            raise TrainingDiverged(f"the training loss became NaN or inf at update {trainer.global_step} "
                                   f"({self.clock.rst_seconds / 3600.0:.4g} RST h); nothing was saved after the "
                                   f"last good checkpoint ({self._last_path(trainer)}); lower the learning "
                                   "rate or use fp32/bf16 instead of fp16, then resume or start again")

    def _save(self, trainer: Trainer, pl_module: LightningModule, path: Path) -> None:
        """Save a checkpoint beside ``path`` and rename it into place (a kill mid-write leaves no torn file)."""
        finite = all(bool(torch.isfinite(p).all()) for p in pl_module.parameters())
        if trainer.strategy.reduce_boolean_decision(not finite, all=False):
            # A finite loss followed by an inf gradient leaves NaN weights before any loss shows it.
            raise TrainingDiverged(f"the weights became NaN or inf by update {trainer.global_step}; the checkpoint "
                                   f"{path.name} was not written, the last good one is kept "
                                   f"({self._last_path(trainer)}); lower the learning rate, then resume or start again")
        self._write(trainer, path)

    @staticmethod
    def _write(trainer: Trainer, path: Path) -> None:
        # Every rank takes part in save_checkpoint (rank 0 writes); only rank 0 renames.
        trainer.save_checkpoint(staging_path(path))
        if trainer.is_global_zero:
            os.replace(staging_path(path), path)

    def _last_path(self, trainer: Trainer) -> Path:
        return self._checkpoint_path(trainer).with_name("last.ckpt")

    def _should_stop(self) -> bool:
        if self.stop_rule == "after_crossing":
            return self.clock.exhausted
        return not budget_spent(self.budget.amount, self.clock.spent() + self._last_step_cost)

    def _position(self, unit: str) -> float:
        return self.clock.rst_seconds / 3600.0 if unit == "hours" else self.clock.progress

    def _passed(self, what: str) -> bool:
        cadence = self.validate_every if what == "validate" else self.checkpoint_every
        if cadence is None:
            return False
        intervals = int(self._position(cadence[0]) / cadence[1] + 1e-9)
        if intervals > self._marks[what]:
            self._marks[what] = intervals
            return True
        return False

    def _replace_last(self, trainer: Trainer, source: Path | None = None) -> None:
        """Make ``checkpoints/last.ckpt`` the newest state: a copy of ``source``, or a fresh save.

        Written beside and renamed into place, so a kill while writing leaves the previous one whole.
        ``--ckpt_path last`` resumes it (Lightning looks for ``last*.ckpt`` in the checkpoint directory).
        """
        last = self._last_path(trainer)
        if source is None:
            self._write(trainer, last)
        elif trainer.is_global_zero:
            with atomic_path(last) as staging:
                shutil.copyfile(source, staging)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # SIGTERM (and SLURM's pre-emption signals, which Lightning turns into it) ends the run at a
        # batch boundary: keep that state as last.ckpt when it is also an update boundary (mid-update,
        # the accumulated gradients would be lost, so the previous last.ckpt stays the newest).
        if not isinstance(exception, SIGTERMException) or self.clock is None:
            return
        batches = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        if batches % trainer.accumulate_grad_batches == 0:
            self._replace_last(trainer)
            rank_zero_info(f"ntng: SIGTERM: saved {self._checkpoint_path(trainer).with_name('last.ckpt')} at update "
                           f"{trainer.global_step}; resume with --ckpt_path last")

    def _checkpoint_path(self, trainer: Trainer) -> Path:
        run_dir = HuggingFaceExport.run_directory(trainer)
        return run_dir / "checkpoints" / f"rst-{self.clock.rst_seconds / 3600.0:.4f}h.ckpt"

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.clock is not None and self.budget is not None:
            rank_zero_info(
                f"ntng: spent {self.clock.spent():.6g} of {self.budget.amount:g} {self.budget.unit} "
                f"({self.clock.rst_seconds / 3600.0:.4f} RST hours, {self.clock.optimizer_steps} updates, "
                f"{self.clock.tokens_trained} tokens trained)"
            )

    # -- resume -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        # The clock itself is saved by its owner, the module.
        return {
            "marks": dict(self._marks),
            "spent_at_last_step": self._spent_at_last_step,
            "last_step_cost": self._last_step_cost,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._marks = {"at_hours": 0, **state_dict["marks"]}
        self._spent_at_last_step = state_dict["spent_at_last_step"]
        self._last_step_cost = state_dict["last_step_cost"]
