"""``SpanCorruptionModel``: T5 v1.1 span-corruption pretraining, a :class:`BudgetedModule`.

What is T5 lives here: the encoder-decoder with an *untied* output head, the span-corruption loss,
per-example losses for batch selection and Sophia-G's Hessian pass. The clock, the LR, depth and
export are the base's (``app.modules.budgeted``); the span-corruption batches come from the data
module's objective (``datamodules.pretraining.span_corruption``).

The untied head: T5 v1.1 has an ``lm_head`` of its own (the encoder and decoder embeddings stay
shared). transformers 5 forces ``T5Config.tie_word_embeddings`` on (``tie_word_embeddings=False``
only turns off the decoder-output scaling), so a stock ``T5ForConditionalGeneration`` silently ties
``lm_head`` to ``shared`` (222.9M instead of 247.6M parameters for T5-v1.1-base).
:class:`UntiedT5ForConditionalGeneration` drops ``lm_head`` from the tied keys; its export keeps both
tensors, and plain ``T5ForConditionalGeneration.from_pretrained`` loads them untied (it ties only
tensors that are missing or equal).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from transformers import T5Config, T5ForConditionalGeneration

from app.errors import ConfigurationError
from app.model.fused_t5 import use_fused_kernels
from app.model.layers import LayerAdapter
from app.model.shapes import apply_shape
from app.model.schedules import LRSchedule
from app.modules.budgeted import BudgetedModule, set_training_dropout
from app.modules.losses import row_means, sampled_label_backward

# T5 v1.1 (Raffel et al. 2020; the v1.1 checkpoints): gated-GELU FFN, untied head, no dropout while
# pretraining; the rest of the shape comes from the recipe's ``config``.
V1_1 = {"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False, "decoder_start_token_id": 0}


class UntiedT5ForConditionalGeneration(T5ForConditionalGeneration):
    """``T5ForConditionalGeneration`` whose ``lm_head`` is its own parameter (T5 v1.1)."""

    _tied_weights_keys = {"encoder.embed_tokens.weight": "shared.weight",
                          "decoder.embed_tokens.weight": "shared.weight"}


class SpanCorruptionModel(BudgetedModule):
    """T5 v1.1 pretraining with span corruption (inputs with sentinels, targets the dropped spans).

    Args:
        config: T5 config fields (``d_model``, ``d_ff``, ``d_kv``, ``num_heads``, ``num_layers``,
            ``num_decoder_layers``, ``dropout_rate``, ...) on top of v1.1's gated-GELU, untied head
            and ``decoder_start_token_id`` 0. ``dropout_rate`` is the one exported for fine-tuning.
        shape: Tay et al.'s shape knobs (``NL``, ``EL``, ``DL``, ``DM``, ``FF``, ``KV``, ``NH``;
            ``app.model.shapes``) applied on top of ``config``.
        checkpoint: an HF-format T5 directory to continue from instead of a fresh model.
        vocab_size: the tokenizer's vocabulary (linked from the data module); the model's
            ``config.vocab_size`` defaults to it and may be larger (T5 pads 32,100 tokens to 32,128 rows).
        pad_token_id: the tokenizer's padding id (linked from the data module; T5: 0).
        seq_len: encoder input tokens per example (linked from the data module; relative position
            buckets have no maximum, so it is only recorded in the model signature).
        pretraining_dropout: dropout while pretraining (NTNG / nanoT5: 0.0); the export keeps ``config``'s.
        optimizer: optimizer class and arguments (NTNG: ``app.model.optimizers.AdamWScale``).
        lr_schedule: learning-rate multiplier as a function of budget progress.
        decay_norm_weights: decay the RMSNorm weights too (no-decay is the default; NTNG's T5 used no
            weight decay at all).
        fused_kernels: compute the RMSNorms and tanh-GELUs with fused kernels (the same math up to
            float rounding, 8 % off a CPU step of t5-efficient-tiny; ``app.model.fused_t5``); false
            runs HF's modules as they are.
        compile_layers: a ``torch.compile`` backend for every block's forward (``"inductor"``), or
            None to run eagerly (see ``BudgetedModule``).
    """

    def __init__(
        self,
        config: dict[str, Any] | None = None,
        shape: dict[str, int] | None = None,
        checkpoint: str | None = None,
        vocab_size: int | None = None,
        pad_token_id: int | None = None,
        seq_len: int | None = None,
        pretraining_dropout: float = 0.0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_schedule: LRSchedule | None = None,
        decay_norm_weights: bool = False,
        fused_kernels: bool = True,
        compile_layers: str | None = None,
    ) -> None:
        super().__init__(optimizer, lr_schedule, decay_norm_weights, compile_layers)
        self.save_hyperparameters(ignore=["optimizer", "lr_schedule"])
        if checkpoint is not None:
            try:
                self.model = UntiedT5ForConditionalGeneration.from_pretrained(checkpoint)
            except OSError as err:
                raise ConfigurationError(f"cannot load T5 checkpoint {checkpoint!r}: {err}") from err
        else:
            fields = apply_shape({**V1_1, **(config or {})}, shape, "t5")
            if vocab_size is not None:
                fields.setdefault("vocab_size", vocab_size)
            if pad_token_id is not None and fields.setdefault("pad_token_id", pad_token_id) != pad_token_id:
                raise ConfigurationError(f"tokenizer pad id {pad_token_id} differs from model config.pad_token_id "
                                         f"{fields['pad_token_id']}")
            try:
                self.model = UntiedT5ForConditionalGeneration(T5Config(**fields))
            except (TypeError, ValueError) as err:
                raise ConfigurationError(f"invalid T5 config {fields}: {err}") from err
        hf_config = self.model.config
        # T5 pads its embedding past the tokenizer (32,100 tokens in 32,128 rows): more rows are fine.
        if vocab_size is not None and hf_config.vocab_size < vocab_size:
            raise ConfigurationError(f"tokenizer has {vocab_size} tokens but the model embeds only {hf_config.vocab_size}")
        if pad_token_id is not None and hf_config.pad_token_id != pad_token_id:
            raise ConfigurationError(f"tokenizer pad id {pad_token_id} differs from the model's {hf_config.pad_token_id}")
        set_training_dropout(self.model, pretraining_dropout)
        if fused_kernels:
            use_fused_kernels(self.model)
        self.layers = LayerAdapter(self.model)
        self.seq_len = seq_len

    @property
    def prediction_head(self) -> torch.nn.Module:
        """The LM head (for FLOP counting)."""
        return self.model.lm_head

    def model_signature(self) -> dict[str, Any]:
        """What an RST profile must have been measured for to price this model."""
        config = self.model.config
        return {
            "family": "t5",
            "layers": {stack: self.layers.num_layers(stack) for stack in self.layers.stack_names},
            "hidden": config.d_model,
            "heads": config.num_heads,
            "ffn": config.d_ff,
            "vocab": config.vocab_size,
            "seq_len": self.seq_len,
        }

    def _logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # The decoder inputs are the targets shifted right from decoder_start_token_id, as HF builds
        # them from ``labels``; passing labels would also make HF compute a loss nobody reads. No
        # key/value cache: it serves generation, and building and filling one cost ~1 ms a step.
        decoder_input_ids = self.model._shift_right(batch["labels"])
        return self.model(input_ids=batch["input_ids"], decoder_input_ids=decoder_input_ids, use_cache=False).logits

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy over every target token of the batch."""
        logits = self._logits(batch)
        return F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)

    @torch.no_grad()
    def per_example_losses(self, batch: dict[str, torch.Tensor], charge: bool = True) -> torch.Tensor:
        """Per-example mean span-corruption loss without gradient, for batch-selection methods.

        Args:
            batch: a span-corruption batch (``input_ids``, ``labels``).
            charge: pay the pass as forward-only on the clock (False: NTNG's "free scoring" ablation).

        Returns:
            ``[batch]`` losses.
        """
        if charge:
            self.charge("forward", batch["input_ids"].numel())
        labels = batch["labels"]
        logits = self._logits(batch)[labels != -100]
        return row_means(F.cross_entropy(logits.float(), labels[labels != -100], reduction="none"), labels)

    def hessian_pass(self, batch: dict[str, torch.Tensor], charge: bool = True) -> int:
        """One Sophia-G Gauss-Newton-Bartlett forward+backward on ``batch``: the decoder runs on the
        real targets (teacher forcing) and labels are sampled from its own distribution at every
        target position (see ``sampled_label_backward``). Charged like a training micro-batch.

        Returns:
            The number of target tokens in ``batch``.
        """
        if charge:
            self.charge("forward_backward", batch["input_ids"].numel())
        labels = batch["labels"]
        return sampled_label_backward(self._logits(batch)[labels != -100])
