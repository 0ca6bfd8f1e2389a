"""``MaskedLanguageModel``: BERT-style masked-LM pretraining as a LightningModule.

The module is the only place that runs the network, so it is also where the budget clock is
charged and where callbacks find the small public surface they may use: ``layers`` (the layer
adapter), ``per_example_losses`` (scoring without gradient) and ``budget_progress``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from torchmetrics.aggregation import MeanMetric

from app.model.backbones import build_masked_lm, masked_lm_logits, max_sequence_length
from app.accounting.clock import ReferenceClock
from app.errors import ConfigurationError
from app.model.layers import LayerAdapter, truncated_model
from app.model.param_groups import weight_decay_groups
from app.model.schedules import LRSchedule, OneCycleTriangle


class MaskedLanguageModel(LightningModule):
    """Masked-LM pretraining of an HF encoder with a sparse prediction head.

    Args:
        backbone: masked-LM family of a freshly initialised model: ``roberta-prelayernorm``
            (Pre-LN, the recipes' default, stable under layer dropping) or ``bert`` (Post-LN).
        config: HF config fields for the backbone (``num_hidden_layers``, ``hidden_size``,
            ``num_attention_heads``, ``intermediate_size``, ``max_position_embeddings``, dropout
            probabilities, ...). Dropout values here are the ones exported for fine-tuning.
        checkpoint: an HF-format directory to continue from instead of a fresh model.
        vocab_size: size of the tokenizer's vocabulary (linked from the data module). A fresh
            model gets it; a checkpoint must already have it.
        pad_token_id: the tokenizer's padding id (linked from the data module); RoBERTa-style
            models derive position ids from it.
        seq_len: tokens per training sequence (linked from the data module), checked against the
            model's position embeddings.
        pretraining_dropout: dropout used while pretraining. NTNG/cramming pretrain with dropout
            off (0.0) and fine-tune with the config's values, which the export keeps.
        sparse_prediction: compute MLM logits only at masked positions (same loss, less compute).
        optimizer: optimizer class and arguments; biases and norm weights get no weight decay.
        lr_schedule: learning-rate multiplier as a function of budget progress.
    """

    def __init__(
        self,
        backbone: str = "roberta-prelayernorm",
        config: dict[str, Any] | None = None,
        checkpoint: str | None = None,
        vocab_size: int | None = None,
        pad_token_id: int | None = None,
        seq_len: int | None = None,
        pretraining_dropout: float = 0.0,
        sparse_prediction: bool = True,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_schedule: LRSchedule | None = None,
    ) -> None:
        super().__init__()
        # Objects stay out of hparams: checkpoints load with weights_only=True (config.yaml has them).
        self.save_hyperparameters(ignore=["optimizer", "lr_schedule"])
        overrides = dict(config or {})
        if checkpoint is None:
            if vocab_size is not None:
                declared = overrides.setdefault("vocab_size", vocab_size)
                if declared != vocab_size:
                    raise ConfigurationError(
                        f"tokenizer has {vocab_size} tokens but model config.vocab_size is {declared}"
                    )
            if pad_token_id is not None:
                overrides.setdefault("pad_token_id", pad_token_id)
        self.model, self.family = build_masked_lm(backbone, overrides, checkpoint)
        hf_config = self.model.config
        if vocab_size is not None and hf_config.vocab_size != vocab_size:
            raise ConfigurationError(
                f"tokenizer has {vocab_size} tokens but checkpoint {checkpoint} has vocab_size {hf_config.vocab_size}"
            )
        if pad_token_id is not None and hf_config.pad_token_id != pad_token_id:
            raise ConfigurationError(
                f"tokenizer pad id {pad_token_id} differs from the model's pad_token_id {hf_config.pad_token_id}"
            )
        if seq_len is not None and seq_len > max_sequence_length(hf_config, self.family):
            raise ConfigurationError(
                f"seq_len {seq_len} exceeds the model's maximum of {max_sequence_length(hf_config, self.family)} "
                f"positions (raise config.max_position_embeddings)"
            )
        # Train with ``pretraining_dropout`` but leave the config alone, so the export carries the
        # configured (fine-tuning) dropout. HF attention reads its probability from ``dropout.p``.
        for module in self.model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = pretraining_dropout
        self.layers = LayerAdapter(self.model)
        self.optimizer_factory = optimizer
        self.lr_schedule = lr_schedule or OneCycleTriangle()
        self.sparse_prediction = sparse_prediction
        self.seq_len = seq_len
        self.val_loss = MeanMetric()
        self.clock: ReferenceClock | None = None
        # Layers (a prefix of every stack) that make up the model for validation and export;
        # None means all. Layer stacking grows it; other methods leave it alone.
        self.model_depth: int | None = None
        # Extra LR multipliers by name, as functions of budget progress (e.g. a re-warm after growth).
        self.lr_adjustments: dict[str, Callable[[float], float]] = {}
        self._stepping = False

    def model_layers(self) -> list[int] | None:
        """Indices of the layers that make up the model now (``None``: all of them)."""
        return None if self.model_depth is None else list(range(self.model_depth))

    # -- the clock --------------------------------------------------------------------------------

    def attach_clock(self, clock: ReferenceClock) -> None:
        """Install the reference clock this module charges for every pass it runs."""
        self.clock = clock

    def charge(self, kind: str, input_ids: torch.Tensor) -> None:
        """Pay for one pass over ``input_ids`` at the current active depth (no-op without a clock)."""
        if self.clock is not None:
            self.clock.charge(kind, input_ids.numel(), self.layers.active_depth())

    @property
    def prediction_head(self) -> torch.nn.Module:
        """The MLM head (for FLOP counting)."""
        return getattr(self.model, self.family.head_attribute)

    def model_signature(self) -> dict[str, Any]:
        """What an RST profile must have been measured for to price this model."""
        config = self.model.config
        return {
            "family": config.model_type,
            "layers": {stack: self.layers.num_layers(stack) for stack in self.layers.stack_names},
            "hidden": config.hidden_size,
            "heads": config.num_attention_heads,
            "ffn": config.intermediate_size,
            "vocab": config.vocab_size,
            "seq_len": self.seq_len,
        }

    # -- the network ------------------------------------------------------------------------------

    def mlm_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy over all masked tokens of the batch."""
        labels = batch["labels"]
        if self.sparse_prediction:
            logits, targets = masked_lm_logits(
                self.model, self.family, batch["input_ids"], labels, batch.get("attention_mask")
            )
            return F.cross_entropy(logits.float(), targets)
        logits, _ = masked_lm_logits(self.model, self.family, batch["input_ids"], None, batch.get("attention_mask"))
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)

    @torch.no_grad()
    def per_example_losses(self, batch: dict[str, torch.Tensor], charge: bool = True) -> torch.Tensor:
        """Per-sequence mean MLM loss without gradient, for batch-selection methods.

        Args:
            batch: a masked batch (``input_ids``, ``labels``).
            charge: pay the pass as forward-only on the clock (False: NTNG's "free scoring" ablation).

        Returns:
            ``[batch]`` losses; a sequence with no masked token gets 0.
        """
        labels = batch["labels"]
        if charge:
            self.charge("forward", batch["input_ids"])
        logits, targets = masked_lm_logits(
            self.model, self.family, batch["input_ids"], labels, batch.get("attention_mask")
        )
        token_losses = F.cross_entropy(logits.float(), targets, reduction="none")
        rows = (labels != -100).nonzero()[:, 0]
        sums = torch.zeros(labels.shape[0], device=labels.device).index_add_(0, rows, token_losses)
        counts = torch.bincount(rows, minlength=labels.shape[0]).clamp_min(1)
        return sums / counts

    def hessian_pass(self, batch: dict[str, torch.Tensor], charge: bool = True) -> int:
        """One forward+backward of Sophia-G's Gauss-Newton-Bartlett loss on ``batch``.

        Labels are sampled from the model's own *vocabulary* distribution at the positions that
        carry the MLM loss (labels != -100), with no gradient through the sampling, and the
        cross-entropy on them is *summed*; ``backward`` adds into ``.grad``. Accumulating over the
        micro-batches of a Hessian batch (and DDP ranks) and dividing by the summed counts gives the
        gradient of the mean GNB loss over all loss tokens of that batch, whatever each micro-batch
        holds. When ``charge``, the pass is paid as a forward+backward micro-batch at the current
        active depth, exactly like a training micro-batch.

        Returns:
            The number of loss tokens (labels != -100) in ``batch``.
        """
        if charge:
            self.charge("forward_backward", batch["input_ids"])
        logits, _ = masked_lm_logits(
            self.model, self.family, batch["input_ids"], batch["labels"], batch.get("attention_mask")
        )
        logits = logits.float()
        if logits.shape[0] == 0:
            return 0
        with torch.no_grad():
            sampled = torch.distributions.Categorical(logits=logits.detach()).sample()
        F.cross_entropy(logits, sampled, reduction="sum").backward()
        return int(sampled.numel())

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        # Charged before the pass runs, as NTNG does, so progress includes this micro-batch.
        self.charge("forward_backward", batch["input_ids"])
        loss = self.mlm_loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        # Evaluation measures the whole model (for stacking: as grown so far), whatever a method has
        # switched off for training; it is never charged to the clock.
        with self.layers.active(self.model_layers()), self.layers.unscaled():
            loss = self.mlm_loss(batch)
        self.val_loss.update(loss, weight=(batch["labels"] != -100).sum())

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test")

    def _log_evaluation(self, prefix: str) -> None:
        loss = self.val_loss.compute()  # token-weighted mean over the epoch
        self.val_loss.reset()
        self.log(f"{prefix}/loss", loss, prog_bar=True, sync_dist=True)
        self.log(f"{prefix}/perplexity", torch.exp(loss.clamp(max=50)), sync_dist=True)

    # -- optimisation -----------------------------------------------------------------------------

    def configure_optimizers(self) -> torch.optim.Optimizer:
        optimizer = self.optimizer_factory(weight_decay_groups(self.model))
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        return optimizer

    def budget_progress(self) -> float:
        """Fraction of the training budget spent, counting the step now being taken.

        With a budgeted clock this is the clock's progress (whatever a step costs); otherwise the
        fraction of ``trainer.max_steps`` (or the epochs' steps) taken. Either way it counts what has
        been charged: at a batch's start the coming update is not included, when the LR is set
        right before the update it is.
        """
        if self.clock is not None and self.clock.budget is not None:
            return self.clock.progress
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total) or total <= 0:
            raise ConfigurationError("set trainer.max_steps (or max_epochs) so the LR schedule has an end")
        return min((self.trainer.global_step + self._stepping) / total, 1.0)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Set the LR right before the update from the progress *including* this step, so the
        # schedule reaches its final value exactly on the step that spends the budget.
        if self.clock is not None:
            self.clock.charge_optimizer_step(type(optimizer).__name__, _updated_fraction(optimizer))
        self._stepping = True  # the update being taken counts from here on
        try:
            progress = self.budget_progress()
        finally:
            self._stepping = False
        multiplier = self.lr_schedule(progress)
        for adjustment in self.lr_adjustments.values():
            multiplier *= adjustment(progress)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * multiplier
        self.log("train/lr", optimizer.param_groups[0]["lr"])

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.clock is not None:
            checkpoint["reference_clock"] = self.clock.state_dict()
        checkpoint["model_depth"] = self.model_depth

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A resumed run continues the same clock exactly (the budget callback attached it in setup).
        if self.clock is not None and "reference_clock" in checkpoint:
            self.clock.load_state_dict(checkpoint["reference_clock"])
        self.model_depth = checkpoint.get("model_depth")

    # -- export -----------------------------------------------------------------------------------

    def export_pretrained(self, directory: str | Path, tokenizer: Any = None) -> Path:
        """Write an HF checkpoint (``save_pretrained``) plus the tokenizer, at the model's depth.

        The export holds every layer, or for a stacked model only the layers grown so far (with
        the config's depth updated). Its config carries the dropout values of ``config`` (for
        fine-tuning), not the pretraining dropout.

        Args:
            directory: target directory, created if needed.
            tokenizer: a tokenizer with ``save_pretrained``, written next to the weights.

        Returns:
            The directory.
        """
        directory = Path(directory)
        if self.model_depth is not None and self.model_depth < self.layers.num_layers():
            truncated_model(self.model, self.model_depth).save_pretrained(directory)
        else:
            with self.layers.active(None), self.layers.unscaled():
                self.model.save_pretrained(directory)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
        return directory


def _updated_fraction(optimizer: torch.optim.Optimizer) -> float:
    """Share of the optimizer's parameter elements that have a gradient (and so get updated)."""
    total = updated = 0
    for group in optimizer.param_groups:
        for param in group["params"]:
            total += param.numel()
            updated += param.numel() if param.grad is not None else 0
    return updated / total if total else 1.0
