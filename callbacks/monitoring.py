"""Training throughput in tokens per second, measured on the wall clock.

Lightning's ``ThroughputMonitor`` counts samples and assumes a fixed batch size; methods that
shrink batches (selective backprop) or models whose cost is per token need tokens instead.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


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
