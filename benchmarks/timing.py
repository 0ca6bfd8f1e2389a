"""What the speed benchmarks share: quiet output, ``ntng fit``'s objects for a fixed number of
updates and their first training batches, a per-update timer, a side-by-side median, and this machine's measured matmul peak.

Imported as ``timing``: the scripts run as ``python benchmarks/<name>.py``, which puts this
directory first on ``sys.path``.
"""

from __future__ import annotations

import logging
import statistics
import time
import warnings
from pathlib import Path

import torch
from lightning.pytorch import Callback

from app.recipe import build_recipe

ROOT = Path(__file__).resolve().parents[1]


def quiet() -> None:
    """Only the benchmark's table: Lightning's and ntng's info lines, warnings and progress bars off."""
    import transformers

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def fit_objects(configs: list[str], workdir: Path, updates: int, *extra: str):
    """``ntng fit``'s configured objects (forced callbacks, TensorBoard logger) that stop after
    ``updates`` updates: the budget is made too large to end the run, no validation, no checkpoints."""
    overrides = ["--budget.budget=1000", "--budget.validate_every_fraction=null", f"--trainer.max_steps={updates}",
                 "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
                 "--trainer.enable_progress_bar=false", "--trainer.enable_checkpointing=false",
                 "--trainer.enable_model_summary=false", f"--trainer.logger.init_args.save_dir={workdir}",
                 "--overwrite=true", *extra]
    return build_recipe([str(ROOT / c) for c in configs], overrides)


def training_batches(cli, count: int) -> list[dict[str, torch.Tensor]]:
    """The first ``count`` training batches the ntng run trains (objective applied, as the fit gets them)."""
    data = cli.datamodule
    data.prepare_data()
    data.setup("fit")
    loader = iter(data.train_dataloader())
    return [next(loader) for _ in range(count)]


class UpdateTimer(Callback):
    """Seconds from the end of one update to the end of the next (everything the loop does between:
    loading, hooks, forward, backward, optimizer step)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._last: float | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # inside an update: its micro-batches are timed together
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        if self._last is not None:
            self.seconds.append(now - self._last)
        self._last = now


def timed(function, totals: dict[str, float], key: str):
    """``function`` with its wall time added to ``totals[key]`` on every call."""

    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            totals[key] += time.perf_counter() - started

    return wrapper


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in times.items() if values}


def matmul_peak_flops(size: int = 2048, repeats: int = 10, dtype: torch.dtype = torch.float32) -> float:
    """This machine's sustained matmul FLOP/s: the best of ``repeats`` timed ``size``-cube matmuls
    (``2 * size**3`` FLOPs each) on the device training uses."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    best = float("inf")
    for _ in range(repeats + 2):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best
