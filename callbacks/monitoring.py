"""What a run reports besides Lightning's logs: token throughput, and the record a sweep report reads.

Lightning's ``ThroughputMonitor`` counts samples and assumes a fixed batch size; methods that
shrink batches (selective backprop) or models whose cost is per token need tokens instead.
"""

from __future__ import annotations

import json
import time
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from app.files import write_text_atomic
from callbacks.export import HuggingFaceExport


class TokenThroughput(Callback):
    """Log ``train/tokens_per_second`` once per optimizer step.

    The window runs from one logged step to the next and excludes time spent in validation, so
    the number describes training alone (data loading included).

    Args:
        log_every_n_steps: optimizer steps per logged value.
    """

    def __init__(self, log_every_n_steps: int = 10) -> None:
        if log_every_n_steps < 1:
            raise ValueError("log_every_n_steps must be >= 1")
        self.log_every_n_steps = log_every_n_steps
        self._tokens = 0
        self._started: float | None = None
        self._paused_at: float | None = None

    @staticmethod
    def _now(pl_module: LightningModule) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._started is None:
            self._started = self._now(pl_module)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._tokens += batch["input_ids"].numel()
        at_step_end = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
        if not at_step_end or trainer.global_step % self.log_every_n_steps:
            return
        elapsed = self._now(pl_module) - self._started
        if elapsed > 0:
            pl_module.log("train/tokens_per_second", self._tokens / elapsed)
        self._tokens, self._started = 0, self._now(pl_module)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.training or trainer.state.fn == "fit":
            self._paused_at = self._now(pl_module)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._paused_at is not None and self._started is not None:
            self._started += self._now(pl_module) - self._paused_at
        self._paused_at = None


class RunRecord(Callback):
    """Write what a sweep's report reads into the run directory: ``curve.jsonl`` and ``summary.json``.

    ``curve.jsonl`` holds one JSON object per line: ``{"kind": "val", "rst_hours", "updates", "tokens",
    "loss"}`` after every validation during fit, and ``{"kind": "train", "rst_hours", "updates",
    "lr_multiplier", "depth", "loss"}`` every ``train_every_n_steps`` updates (depth: mean active layers
    of the update's micro-batches). A resumed run first drops the rows written after its checkpoint,
    so the file is the curve of one uninterrupted run. ``summary.json`` is written at the end of fit:
    the clock's totals, the training wall time (validation excluded, summed over resumes) and the last
    validation loss.

    Args:
        train_every_n_steps: updates between train rows.
    """

    def __init__(self, train_every_n_steps: int = 10) -> None:
        if train_every_n_steps < 1:
            raise ValueError("train_every_n_steps must be >= 1")
        self.train_every_n_steps = train_every_n_steps
        self.wall_seconds = 0.0
        self._started: float | None = None
        self._depths: list[float] = []
        self._last_val_loss: float | None = None

    def _write(self, trainer: Trainer, row: dict) -> None:
        if trainer.is_global_zero:
            with open(HuggingFaceExport.run_directory(trainer) / "curve.jsonl", "a") as handle:
                handle.write(json.dumps(row) + "\n")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._started = time.perf_counter()
        path = HuggingFaceExport.run_directory(trainer) / "curve.jsonl"
        if trainer.is_global_zero and path.is_file():
            # Rows past the checkpoint were written by a run that did not get to save them.
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            kept = [row for row in rows if row["updates"] <= trainer.global_step]
            write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in kept))
            vals = [row["loss"] for row in kept if row["kind"] == "val"]
            self._last_val_loss = vals[-1] if vals else self._last_val_loss
        elif trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        layers = getattr(pl_module, "layers", None)
        if layers is not None:
            depths = layers.active_depth()
            self._depths.append(sum(depths.values()) / len(depths))
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        depths, self._depths = self._depths, []
        clock = getattr(pl_module, "clock", None)
        if clock is None or trainer.global_step % self.train_every_n_steps:
            return
        optimizer = trainer.optimizers[0]
        group = optimizer.param_groups[0]
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self._write(trainer, {
            "kind": "train", "rst_hours": clock.rst_seconds / 3600.0, "updates": trainer.global_step,
            "lr_multiplier": group["lr"] / group.get("initial_lr", group["lr"]),
            "depth": sum(depths) / len(depths) if depths else None,
            "loss": float(loss) if loss is not None else None,
        })

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._started is not None:
            self.wall_seconds += time.perf_counter() - self._started
            self._started = None

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        clock = getattr(pl_module, "clock", None)
        loss = trainer.callback_metrics.get("val/loss")
        if trainer.state.fn == "fit" and not trainer.sanity_checking and clock is not None and loss is not None:
            self._last_val_loss = float(loss)
            self._write(trainer, {"kind": "val", "rst_hours": clock.rst_seconds / 3600.0,
                                  "updates": trainer.global_step, "tokens": clock.tokens_trained,
                                  "loss": self._last_val_loss})
        if trainer.state.fn == "fit":
            self._started = time.perf_counter()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._started is not None:
            self.wall_seconds += time.perf_counter() - self._started
            self._started = None
        clock = getattr(pl_module, "clock", None)
        if clock is None or not trainer.is_global_zero:
            return
        budget = clock.budget
        summary = {
            "rst_hours": clock.rst_seconds / 3600.0, "updates": clock.optimizer_steps,
            "tokens_trained": clock.tokens_trained, "tokens_scored": clock.tokens_scored,
            "wall_seconds": self.wall_seconds, "final_val_loss": self._last_val_loss,
            "budget": budget.amount if budget else None, "unit": budget.unit if budget else None,
        }
        write_text_atomic(HuggingFaceExport.run_directory(trainer) / "summary.json", json.dumps(summary, indent=2) + "\n")

    def state_dict(self) -> dict[str, Any]:
        running = time.perf_counter() - self._started if self._started is not None else 0.0
        return {"wall_seconds": self.wall_seconds + running, "last_val_loss": self._last_val_loss}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.wall_seconds = float(state_dict["wall_seconds"])
        self._last_val_loss = state_dict["last_val_loss"]
