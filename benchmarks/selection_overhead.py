"""What do batch-selection mechanics cost beyond the passes the clock charges?

RST prices the network's passes only. Selection adds host-side work that no profile sees: reading
and masking candidates, moving them to the device, ranking or top-k, buffering, and Lightning's own
batch, which is read and then discarded (selection tells the data module, so it is no longer
masked: only its blocks are stacked). This trains the quickstart model (4 layers,
hidden 256, seq 128, micro-batch 32) on the shipped sample corpus for a few updates with no
selection, selective backprop and RHO-loss (an irreducible-loss file of zeros), and splits each
update's wall time into the training step, the scoring forwards and the rest of the selection
hook (the mechanics), plus making Lightning's batch (in the training process with no workers). Timings inside one run, so machine
noise affects both sides alike. Goal: mechanics + discarded batch under 5 % of an update.

    python benchmarks/selection_overhead.py [--updates 12] [--num-workers 0]

The last line is ``ratio: <the largest overhead, as a share of an update>``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import Callback, Trainer

from callbacks.irreducible_losses import IrreducibleLosses
from app.modules.masked_lm import MaskedLanguageModel
from callbacks.budget import ReferenceTimeBudget
from callbacks.rho_loss import RhoLoss
from callbacks.selective_backprop import SelectiveBackprop
from datamodules.pretraining.datamodule import PretrainingDataModule
from datamodules.pretraining.objective import TrainingCollate
from timing import timed

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {"num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 4, "intermediate_size": 1024,
          "max_position_embeddings": 130}
SECONDS: dict[str, float] = defaultdict(float)


class TimedModel(MaskedLanguageModel):
    per_example_losses = timed(MaskedLanguageModel.per_example_losses, SECONDS, "scoring forwards")


# Lightning's training batches are made by this collate (in the training process without workers).
TrainingCollate.__call__ = timed(TrainingCollate.__call__, SECONDS, "Lightning batch")


class UpdateClock(Callback):
    """Wall seconds of the updates after the first (warm-up); resets ``SECONDS`` there."""

    def __init__(self) -> None:
        self.start: tuple[float, int] | None = None
        self.wall_per_update = 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.start is None:
            SECONDS.clear()
            self.start = (time.perf_counter(), trainer.global_step)

    def on_train_end(self, trainer, pl_module):
        started, step = self.start
        self.updates = trainer.global_step - step
        self.wall_per_update = (time.perf_counter() - started) / self.updates


def run(data, selection, updates: int, directory: Path) -> dict[str, float]:
    torch.manual_seed(0)
    module = TimedModel(config=CONFIG, vocab_size=data.vocab_size, pad_token_id=data.pad_token_id, seq_len=data.seq_len)
    if selection is not None:
        selection.on_train_batch_start = timed(selection.on_train_batch_start, SECONDS, "selection hook")
    clock = UpdateClock()
    callbacks = ([selection] if selection else []) + [ReferenceTimeBudget(), clock]
    trainer = Trainer(default_root_dir=directory, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                      limit_val_batches=0, max_steps=updates + 1, callbacks=callbacks)
    trainer.fit(module, datamodule=data)
    per_update = {kind: seconds / clock.updates for kind, seconds in SECONDS.items()}
    mechanics = per_update.pop("selection hook", 0.0) - per_update.get("scoring forwards", 0.0)
    return {"wall": clock.wall_per_update, "scoring": per_update.get("scoring forwards", 0.0),
            "mechanics": mechanics, "discarded": per_update.get("Lightning batch", 0.0) if selection else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--updates", type=int, default=12)
    parser.add_argument("--num-workers", type=int, default=0, help="loader workers (candidates are masked there)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = PretrainingDataModule([str(ROOT / "datamodules" / "samples" / "gutenberg")], tokenizer_vocab_size=8192,
                         seq_len=128, val_size=512, micro_batch_size=32, num_workers=args.num_workers,
                         cache_dir=str(tmp / "cache"))
        data.prepare_data()
        data.setup("fit")
        zeros = np.zeros((8, len(data.train_example_ids)), np.float32)
        IrreducibleLosses(data.train_example_ids, zeros, data.example_fingerprint()).save(tmp / "il.npz")
        makers = {"baseline": lambda: None, "selective_backprop": lambda: SelectiveBackprop(seed=0),
                  "rho_loss": lambda: RhoLoss(str(tmp / "il.npz"), seed=0)}
        print(f"{'method':<20}{'wall s/update':>14}{'scoring':>10}{'mechanics':>11}{'discarded':>11}{'overhead':>10}")
        overheads = []
        for name, make in makers.items():
            r = run(data, make(), args.updates, tmp / name)
            overhead = (r["mechanics"] + r["discarded"]) / r["wall"]
            overheads.append(overhead)
            print(f"{name:<20}{r['wall']:>14.4f}{r['scoring']:>10.4f}{r['mechanics']:>11.4f}{r['discarded']:>11.4f}"
                  f"{100 * overhead:>9.1f}%")
        print(f"ratio: {max(overheads):.4f}")  # the largest share of an update (goal: under 0.05)


if __name__ == "__main__":
    main()
