"""``MaskedLanguageModel``: BERT-style masked-LM pretraining, a :class:`BudgetedModule`.

What is masked-LM lives here: the HF model with its sparse prediction head, the loss, per-example
losses for batch selection and Sophia-G's Hessian pass. The clock, the LR, depth and export are the
base's (``app.modules.budgeted``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable

from app.errors import ConfigurationError
from app.model.backbones import build_masked_lm, masked_lm_logits, max_sequence_length
from app.model.layers import LayerAdapter
from app.model.shapes import apply_shape
from app.model.schedules import LRSchedule
from app.modules.budgeted import BudgetedModule, set_training_dropout
from app.modules.losses import row_means, sampled_label_backward


class MaskedLanguageModel(BudgetedModule):
    """Masked-LM pretraining of an HF encoder with a sparse prediction head.

    Args:
        backbone: masked-LM family of a freshly initialised model: ``roberta-prelayernorm``
            (Pre-LN, stable under layer dropping), ``modernbert`` (Pre-LN, GLU, no biases, rotary
            positions: the crammed recipe's cramming-``bert-c5`` match) or ``bert`` (Post-LN).
        config: HF config fields for the backbone (``num_hidden_layers``, ``hidden_size``,
            ``num_attention_heads``, ``intermediate_size``, ``max_position_embeddings``, dropout
            probabilities, ...). Dropout values here are the ones exported for fine-tuning.
        shape: Tay et al.'s shape knobs (``NL``, ``DM``, ``FF``, ``NH``; ``KV`` must be ``DM / NH``;
            ``app.model.shapes``) applied on top of ``config``.
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
        decay_norm_weights: decay normalisation weights too (NTNG's bert-o3 as it ran; the default
            excludes them, see ``app.model.param_groups``).
        compile_layers: a ``torch.compile`` backend for every layer's forward (``"inductor"``), or
            None to run eagerly (see ``BudgetedModule``).
    """

    def __init__(
        self,
        backbone: str = "roberta-prelayernorm",
        config: dict[str, Any] | None = None,
        shape: dict[str, int] | None = None,
        checkpoint: str | None = None,
        vocab_size: int | None = None,
        pad_token_id: int | None = None,
        seq_len: int | None = None,
        pretraining_dropout: float = 0.0,
        sparse_prediction: bool = True,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_schedule: LRSchedule | None = None,
        decay_norm_weights: bool = False,
        compile_layers: str | None = None,
    ) -> None:
        super().__init__(optimizer, lr_schedule, decay_norm_weights, compile_layers)
        # Objects stay out of hparams: checkpoints load with weights_only=True (config.yaml has them).
        self.save_hyperparameters(ignore=["optimizer", "lr_schedule"])
        overrides = apply_shape(config or {}, shape, "encoder")
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
                "positions; lower data.init_args.seq_len or raise model.init_args.config.max_position_embeddings"
            )
        # ModernBERT builds its attention output dropout as Identity when the config's probability is
        # 0, so there pretraining dropout can only be lowered.
        set_training_dropout(self.model, pretraining_dropout)
        self.layers = LayerAdapter(self.model)
        self.sparse_prediction = sparse_prediction
        self.seq_len = seq_len

    @property
    def prediction_head(self) -> torch.nn.Module:
        """The MLM head (for FLOP counting)."""
        return self.family.prediction_head(self.model)

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

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
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
            self.charge("forward", batch["input_ids"].numel())
        logits, targets = masked_lm_logits(
            self.model, self.family, batch["input_ids"], labels, batch.get("attention_mask")
        )
        return row_means(F.cross_entropy(logits.float(), targets, reduction="none"), labels)

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
            self.charge("forward_backward", batch["input_ids"].numel())
        logits, _ = masked_lm_logits(
            self.model, self.family, batch["input_ids"], batch["labels"], batch.get("attention_mask")
        )
        return sampled_label_backward(logits)
