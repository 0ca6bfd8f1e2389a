"""How well does reference system time predict real training time on the reference machine?

Calibrates an RST profile for a recipe on this machine, runs a budgeted pretraining priced by that
profile, and compares the clock's predicted seconds with the measured wall time of the same
training steps (forward, backward, clipping and optimizer step; data loading and validation
excluded). Goal: within 3 %.

A VM's speed drifts by more than that over a minute (steps of one fit ranged from 353 to 439 ms
on 2026-12-03), so the sequential comparison — calibrate, then train — mixes the profile's bias
with the machine's drift. The run therefore also repeats the calibration's own procedure beside
every training step, on a twin of the model (built from the same recipe, with its own optimizer):
forward and backward of the calibration batch at the step's active depth, then clipping and the
optimizer step. Twin and training step run back to back, so they share the machine's state of the
moment, and their ratio isolates what the profile's method gets wrong:

* ``predicted / measured``: what a user's clock sees on this machine (bias and drift together);
* ``twin / measured`` (the last line): the calibration's procedure against real training, side by
  side — the bias alone;
* ``predicted / twin``: how far the machine drifted since the calibration.

A model small enough to live in cache (T5 tiny) shares it with its twin, which slows both; there,
and with ``compile_layers`` (the twin runs eagerly), read ``--no-twin``'s sequential ratio.

    python benchmarks/rst_fidelity.py [--recipe configs/quickstart.yaml] [--budget-hours 0.01] [--no-twin]
    python benchmarks/rst_fidelity.py --trainer.precision=bf16-mixed   # recipe overrides: calibration and fit

The last line is ``ratio: <twin seconds / measured seconds>`` (``predicted / measured`` with ``--no-twin``).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback

from app.commands.calibrate import main as calibrate
from app.recipe import build_recipe


class StepTimer(Callback):
    """Wall time from the start to the end of every training batch (the optimizer step included)."""

    def __init__(self) -> None:
        self.seconds, self.steps, self._start = 0.0, 0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        _synchronize(pl_module.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        _synchronize(pl_module.device)
        self.seconds += time.perf_counter() - self._start
        self.steps += 1


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CalibrationTwin(Callback):
    """After every training batch, untimed by ``StepTimer`` (which must come first in the callback
    list), time what ``ntng calibrate`` times on a twin module: forward+backward of the first
    training batch at the training step's active layers, and on the updates where training steps
    its optimizer, clipping plus the optimizer step."""

    def __init__(self, twin, gradient_clip_val: float | None) -> None:
        self.twin, self.clip, self.seconds = twin, gradient_clip_val, 0.0
        self.optimizer = twin.configure_optimizers()
        self.parameters = [p for p in twin.parameters() if p.requires_grad]
        self.batch: dict[str, torch.Tensor] | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.batch is None:
            self.batch = {key: value.clone() for key, value in batch.items()}  # what calibrate uses
            self.twin.to(pl_module.device)  # the same Parameter objects: the optimizer keeps them
        self.twin.train()
        start = time.perf_counter()
        with _same_active_layers(self.twin, pl_module), trainer.precision_plugin.forward_context():
            loss = self.twin.loss(self.batch)
        loss.backward()
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            if self.clip:
                torch.nn.utils.clip_grad_norm_(self.parameters, self.clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        _synchronize(pl_module.device)
        self.seconds += time.perf_counter() - start


def _same_active_layers(twin, module) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    for name in module.layers.stack_names:
        stack.enter_context(twin.layers.active(module.layers.active_layers(name), stack=name))
    return stack


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="configs/quickstart.yaml")
    parser.add_argument("--budget-hours", type=float, default=0.01)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-twin", dest="twin", action="store_false",
                        help="train alone: a model small enough to live in cache shares it with its twin, "
                             "which slows both (T5 tiny's steps by about 10 %%)")
    args, recipe_overrides = parser.parse_known_args()  # e.g. --trainer.precision=bf16-mixed, for both
    with tempfile.TemporaryDirectory() as workdir:
        profile = Path(workdir) / "profile.yaml"
        # In a process of its own: the fit then runs in a heap no earlier work left behind.
        context = multiprocessing.get_context("forkserver")
        with context.Pool(1) as pool:
            pool.apply(calibrate, (["-c", args.recipe, "--output", str(profile), "--repeats", str(args.repeats),
                                    *recipe_overrides],))
        overrides = [f"--budget.budget={args.budget_hours}", f"--budget.profile={profile}",
                     f"--trainer.default_root_dir={workdir}", "--trainer.logger=false",
                     "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
                     *recipe_overrides]
        cli = build_recipe([args.recipe], overrides)
        timer = StepTimer()
        cli.trainer.callbacks.append(timer)
        if args.twin:
            reference = CalibrationTwin(build_recipe([args.recipe], overrides).model, cli.trainer.gradient_clip_val)
            cli.trainer.callbacks.append(reference)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        predicted = cli.model.clock.rst_seconds
    print(f"\nrecipe {args.recipe}, budget {args.budget_hours} RST hours, {timer.steps} micro-batches")
    print(f"predicted (RST)                       {predicted:9.2f} s")
    print(f"measured (wall)                       {timer.seconds:9.2f} s")
    if not args.twin:
        print(f"ratio: {predicted / timer.seconds:.4f}")
        return
    print(f"calibration's procedure beside it     {reference.seconds:9.2f} s")
    print(f"predicted / measured  {predicted / timer.seconds:.4f}  (bias and this machine's drift together)")
    print(f"predicted / twin      {predicted / reference.seconds:.4f}  (drift since the calibration)")
    print(f"twin / measured       {reference.seconds / timer.seconds:.4f}  (the profile's bias; goal within 3 % of 1)")
    print(f"ratio: {reference.seconds / timer.seconds:.4f}")


if __name__ == "__main__":
    main()
