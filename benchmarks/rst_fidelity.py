"""How well does reference system time predict real training time on the reference machine?

Calibrates an RST profile for a recipe on this machine, runs a budgeted pretraining priced by that
profile, and prints the clock's predicted seconds against the measured wall time of the same
training steps (forward, backward and optimizer step; data loading and validation excluded), as a
ratio measured side by side in one run. Goal: within 3 %.

    python benchmarks/rst_fidelity.py [--recipe configs/quickstart.yaml] [--budget-hours 0.01]
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time
from pathlib import Path

from lightning.pytorch import Callback

from app.commands.calibrate import main as calibrate
from app.recipe import build_recipe


class StepTimer(Callback):
    """Wall time from the start to the end of every training batch (the optimizer step included)."""

    def __init__(self) -> None:
        self.seconds, self.steps, self._start = 0.0, 0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seconds += time.perf_counter() - self._start
        self.steps += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="configs/quickstart.yaml")
    parser.add_argument("--budget-hours", type=float, default=0.01)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        profile = Path(workdir) / "profile.yaml"
        # In a process of its own: the fit then runs in a heap no earlier work left behind.
        context = multiprocessing.get_context("forkserver")
        with context.Pool(1) as pool:
            pool.apply(calibrate, (["-c", args.recipe, "--output", str(profile), "--repeats", str(args.repeats)],))
        cli = build_recipe(
            [args.recipe], [f"--budget.budget={args.budget_hours}", f"--budget.profile={profile}",
             f"--trainer.default_root_dir={workdir}", "--trainer.logger=false",
             "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false"],
        )
        timer = StepTimer()
        cli.trainer.callbacks.append(timer)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        predicted = cli.model.clock.rst_seconds
    print(f"\nrecipe {args.recipe}, budget {args.budget_hours} RST hours, {timer.steps} micro-batches")
    print(f"predicted (RST)   {predicted:9.2f} s")
    print(f"measured (wall)   {timer.seconds:9.2f} s")
    print("goal: predicted / measured within 3 % of 1")
    print(f"ratio: {predicted / timer.seconds:.4f}")


if __name__ == "__main__":
    main()
