"""RHO-loss (Mindermann et al. 2022) as NTNG ran it: pure selection math + a callback.

The irreducible-loss file lives in ``callbacks.irreducible_losses`` (``ntng il-losses`` writes it); the mechanics
shared with selective backprop (candidate stream, scoring, in-place batch swap) in
``callbacks.selection``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from app.accounting.planning import PlanSettings, UpdateCost, baseline_update_cost, forward_seconds
from app.errors import ConfigurationError
from callbacks.irreducible_losses import IrreducibleLosses, describe_uncharged
from callbacks.selection import BatchSelection


def reducible_losses(losses: torch.Tensor, irreducible: torch.Tensor) -> torch.Tensor:
    """RHO score: training loss minus irreducible loss (negative values are fine)."""
    return losses - irreducible


def top_k_rows(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores, in their original (candidate) order."""
    return torch.topk(scores, k, largest=True, sorted=False).indices.sort().values


class RhoLoss(BatchSelection):
    """RHO-loss: train on the candidates with the highest reducible loss (training loss − irreducible loss).

    Paper: Mindermann et al., "Prioritized Training on Points that are Learnable, Worth Learning,
    and Not Yet Learnt", ICML 2022, arXiv 2206.07137 (code: github.com/OATML/RHO-Loss). NTNG
    (Kaddour et al. 2023, ``bert/pretrain_bert_rho_loss.py``): an IL model of the same architecture
    is trained on a 20 % holdout; its per-example MLM loss on every training example is stored; each
    update scores a mega-batch of 3072 candidates (2x the 1536 batch) with a no-grad forward of the
    target model, charged as forward-only reference time, and trains on the top 1536 by
    ``loss − IL``. The IL model's training and the IL pass are not charged (the paper treats them as
    amortised); ntng reports them at the end of the run (from the file's provenance: the IL run's
    clock and the IL pass priced by the target's profile), and plans them as what they are, an
    ordinary ``ntng fit`` and one forward per example.

    How it runs here (mechanics in ``callbacks.selection``): at the first micro-batch of an update,
    the callback scores ``mega_batch_factor x`` this rank's share of the batch from its candidate
    stream, keeps the top ``k`` (this rank's share) in candidate order, and feeds them to the
    update's micro-batches. The file is checked at setup: its example ids must be the run's training
    ids and its fingerprint (packed blocks, seq_len, masking seed and probabilities) the run's.

    Choices and differences:

    * Masking: the IL loss of each example is computed under the exact mask the run uses for it in
      each epoch (``ntng il-losses --epochs N``); NTNG's table used another random mask. Past the
      file's epochs the run reuses epoch ``e mod N`` and warns once (NTNG's mismatch returns).
    * DDP: selection is per rank (top ``k / world`` of ``mega / world`` candidates each), with no
      communication; the global top-k differs only by chance.
    * Scoring runs in the module's training mode (RHO's default ``selection_train_mode``) under the
      training precision context; the recipes pretrain with dropout 0.
    * ``train/loss`` is the loss of the selected examples; compare runs on ``val/loss``.

    Logs, besides ``BatchSelection``'s: ``method/selected_irreducible_loss`` and
    ``method/selected_reducible_loss`` (means over the examples selected in the update).

    Args:
        irreducible_losses: the ``ntng il-losses`` file for this run's data (required to train;
            planning does not read it).
        mega_batch_factor: candidates scored per trained example (NTNG: 2; its 10x "free" ablation: 10).
        charge_scoring: charge scoring forwards to the budget; False is NTNG's "free" ablation.
        seed: seed of the candidate order; ``None`` uses the run's.
    """

    SELECTED_MEANS = {
        **BatchSelection.SELECTED_MEANS,
        "irreducible": "method/selected_irreducible_loss",
        "reducible": "method/selected_reducible_loss",
    }

    def __init__(
        self,
        irreducible_losses: str | None = None,
        mega_batch_factor: float = 2.0,
        charge_scoring: bool = True,
        seed: int | None = None,
    ) -> None:
        super().__init__(charge_scoring, seed)
        if mega_batch_factor < 1:
            raise ConfigurationError(f"RhoLoss: mega_batch_factor must be >= 1, got {mega_batch_factor}")
        self.irreducible_losses, self.mega_batch_factor = irreducible_losses, mega_batch_factor
        self._table: torch.Tensor | None = None
        self._provenance: dict[str, Any] = {}
        self._warned_epoch = False

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        if self.irreducible_losses is None:
            raise ConfigurationError("RhoLoss needs irreducible_losses: the file `ntng il-losses` writes for this recipe")
        losses = IrreducibleLosses.load(self.irreducible_losses)
        losses.check(trainer.datamodule.train_example_ids, trainer.datamodule.example_fingerprint(),
                     source=str(self.irreducible_losses))
        self._table = losses.table(pl_module.device)
        self._provenance = losses.provenance

    def fill(self, trainer: Trainer, pl_module: LightningModule, rows: int, micro_step: int) -> None:
        if len(self.buffer) >= rows:
            return
        # Select for the rest of the update: all of it at micro-step 0; less when rows are left over
        # (Lightning ended an epoch inside an update) or after a resume taken inside an update.
        k = rows * (trainer.accumulate_grad_batches - micro_step) - len(self.buffer)
        batches = math.ceil(self.mega_batch_factor * k / self.stream.batch_size)
        scored = []
        for _ in range(batches):
            candidates, epoch = self.score(pl_module)
            candidates["irreducible"] = self._irreducible(candidates["example_ids"], epoch)
            scored.append(candidates)
        mega = {key: torch.cat([batch[key] for batch in scored]) for key in scored[0]}
        mega["reducible"] = reducible_losses(mega["loss"], mega["irreducible"])
        self.select(mega, top_k_rows(mega["reducible"], k))

    def _irreducible(self, example_ids: torch.Tensor, epoch: int) -> torch.Tensor:
        epochs = self._table.shape[0]
        if epoch >= epochs and not self._warned_epoch:
            self._warned_epoch = True
            rank_zero_warn(
                f"RhoLoss: candidates are in masking epoch {epoch} but {self.irreducible_losses} covers "
                f"{epochs}; reusing epoch {epoch % epochs}'s irreducible losses, computed under another mask "
                f"(recompute with `ntng il-losses --epochs {epoch + 1}` or more to avoid it)"
            )
        return self._table[epoch % epochs, example_ids.to(self._table.device)]

    def expected_update_cost(self, settings: PlanSettings, progress: float, update: int = 0) -> UpdateCost:
        """The baseline update plus ``mega_batch_factor x micro_batches`` scoring forwards at full depth.
        The IL model's training and ``ntng il-losses`` are not included (as in NTNG and the paper):
        price them as a separate baseline run and one forward per example."""
        if not self.charge_scoring:
            return baseline_update_cost(settings)
        scoring = self.mega_batch_factor * settings.micro_batches * forward_seconds(settings)
        return baseline_update_cost(settings, extra_seconds=scoring)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        rank_zero_info(f"ntng: RhoLoss: {describe_uncharged(self._provenance)}")
