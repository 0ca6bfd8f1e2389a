"""The irreducible-loss file of RHO-loss: per-example losses of an IL model keyed by example id,
how they are computed, and the line that reports what they cost.

``ntng il-losses`` (``app.commands.il_losses``) writes the file; ``RhoLoss`` reads and checks it.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.errors import ConfigurationError

FORMAT = "ntng-irreducible-losses/1"


@dataclass
class IrreducibleLosses:
    """Per-example losses of an IL model for each masking epoch, keyed by example id.

    Attributes:
        example_ids: ``[n]`` sorted training example ids.
        losses: ``[epochs, n]`` loss of example ``example_ids[j]`` under epoch ``e``'s mask.
        fingerprint: the data module's ``example_fingerprint()`` (blocks and masking settings).
        provenance: where the numbers came from (model, recipe, date).
    """

    example_ids: np.ndarray
    losses: np.ndarray
    fingerprint: dict[str, Any]
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def epochs(self) -> int:
        return self.losses.shape[0]

    def save(self, path: str | Path) -> Path:
        """Write an ``.npz`` (no pickles) atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = json.dumps({"format": FORMAT, "fingerprint": self.fingerprint, "provenance": self.provenance})
        handle, staging = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npz")
        with os.fdopen(handle, "wb") as file:
            np.savez(file, example_ids=self.example_ids.astype(np.int64),
                     losses=self.losses.astype(np.float32), meta=np.array(meta))
        os.replace(staging, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> IrreducibleLosses:
        """Read a file written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise ConfigurationError(
                f"irreducible-loss file {path} not found; make it with "
                f"`ntng il-losses --model <IL model>/hf -c <this run's recipe(s)> --output {path}`"
            )
        try:
            with np.load(path, allow_pickle=False) as content:
                meta = json.loads(str(content["meta"]))
                example_ids, losses = content["example_ids"], content["losses"]
        except (OSError, KeyError, ValueError) as err:
            raise ConfigurationError(f"{path} is not an irreducible-loss file: {err}") from err
        if meta.get("format") != FORMAT:
            raise ConfigurationError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
        return cls(example_ids, losses, meta["fingerprint"], meta.get("provenance", {}))

    def check(self, example_ids: np.ndarray, fingerprint: dict[str, Any], source: str = "the file") -> None:
        """Raise unless these losses belong to a run training on ``example_ids`` with ``fingerprint``."""
        example_ids = np.asarray(example_ids)
        if not np.array_equal(self.example_ids, example_ids):
            count = min(len(self.example_ids), len(example_ids))
            differing = np.flatnonzero(self.example_ids[:count] != example_ids[:count])
            first = (f"; first difference at position {differing[0]}: id {self.example_ids[differing[0]]} "
                     f"in the file, {example_ids[differing[0]]} in the run") if len(differing) else ""
            raise ConfigurationError(
                f"{source} has irreducible losses for {len(self.example_ids)} example ids but this run trains on "
                f"{len(example_ids)}{first}: the data split (val/holdout fraction, split_seed, train_split), the "
                "corpus, the tokenizer or seq_len differ; recompute with `ntng il-losses` and this run's recipe"
            )
        differences = [
            f"{key}: {self.fingerprint.get(key)!r} in the file, {value!r} in the run"
            for key, value in fingerprint.items() if self.fingerprint.get(key) != value
        ]
        if differences:
            raise ConfigurationError(
                f"{source} was computed for different data or masking ({'; '.join(differences)}); "
                "recompute with `ntng il-losses` and this run's recipe"
            )

    def table(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """``[epochs, max_id + 1]`` float32 lookup by example id (NaN for ids not in the file)."""
        table = torch.full((self.epochs, int(self.example_ids.max()) + 1), math.nan)
        table[:, torch.from_numpy(self.example_ids)] = torch.from_numpy(self.losses).float()
        return table.to(device)


def compute_irreducible_losses(
    module: Any,
    data: Any,
    epochs: int = 1,
    batch_size: int = 128,
    context: Callable[[], AbstractContextManager] = nullcontext,
    report: Callable[[str], None] = print,
) -> np.ndarray:
    """Per-example loss of ``module`` on every training example of ``data``, for each masking epoch.

    Args:
        module: an IL model with ``per_example_losses(batch, charge)``, on its device.
        data: a set-up data module with ``train_example_ids`` and ``masked_batches``.
        epochs: masking epochs to cover (epoch ``e`` masks as the training run's ``e``-th pass).
        batch_size: rows per forward.
        context: precision context for the forwards.
        report: receives progress lines.

    Returns:
        ``[epochs, n]`` float32 losses in ``train_example_ids`` order.
    """
    device = next(module.parameters()).device
    example_ids = np.asarray(data.train_example_ids)
    losses = np.empty((epochs, len(example_ids)), dtype=np.float32)
    module.eval()
    total, done, next_report = epochs * len(example_ids), 0, 0.1
    for epoch in range(epochs):
        position = 0
        for batch in data.masked_batches(example_ids, epoch, batch_size):
            batch = {key: value.to(device) for key, value in batch.items()}
            with torch.no_grad(), context():
                values = module.per_example_losses(batch, charge=False)
            losses[epoch, position : position + len(values)] = values.float().cpu().numpy()
            position += len(values)
            done += len(values)
            if done / total >= next_report:
                report(f"ntng il-losses: {done:,} / {total:,} examples ({100 * done / total:.0f} %)")
                next_report += 0.1
    return losses


def describe_uncharged(provenance: dict) -> str:
    """One line for the target run's report: what was not charged to its budget."""

    def hours(value: float | None) -> str:
        return "cost unknown" if value is None else f"{value:.4g} RST h"

    examples, epochs = provenance.get("examples"), provenance.get("epochs")
    scope = f" over {examples:,} examples x {epochs} epoch(s)" if examples is not None else ""
    return (
        "not charged to this budget (as in Mindermann et al. and NTNG): training the irreducible-loss model "
        f"({hours(provenance.get('il_model_rst_hours'))}) and its loss pass{scope} "
        f"({hours(provenance.get('il_pass_rst_hours'))})"
    )


