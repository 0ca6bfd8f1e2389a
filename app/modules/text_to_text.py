"""``TextToTextFineTuner``: fine-tune a fresh copy of a T5 (encoder-decoder) checkpoint on one task, text-to-text.

Each run loads the checkpoint directory again (``AutoModelForSeq2SeqLM``: ``T5ForConditionalGeneration``
for T5), as the encoder ``FineTuner`` does. The task's examples arrive as input/target token ids
(``datamodules.tasks.text_to_text``):

* training: teacher forcing, the model's token cross-entropy on the target (padding at -100 ignored);
* validation: the same loss, and greedy generation (one beam, no sampling, at most the longest
  label word's tokens; 128 for SNI) decoded without special tokens and mapped back to a class id,
  candidate index, float or string (``parse_prediction``; a string that is no label word is
  ``NO_LABEL``, which the scorer counts wrong), so scoring, history and reports are those of
  ``app.modules.finetuner.TaskModule``.

Dropout is what the checkpoint's config says (``dropout_rate``; ntng's T5 export writes 0.1 for
fine-tuning). The optimizer is ``TaskModule``'s AdamW with the command's learning rate and schedule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForSeq2SeqLM

from app.modules.finetuner import TaskModule, quiet_transformers
from datamodules.tasks.spec import TaskSpec
from datamodules.tasks.text_to_text import generation_length, parse_prediction


def build_seq2seq_model(model_dir: str | Path) -> torch.nn.Module:
    """A fresh ``AutoModelForSeq2SeqLM`` from ``model_dir`` in float32 and training mode."""
    with quiet_transformers():
        model = AutoModelForSeq2SeqLM.from_pretrained(str(model_dir), dtype=torch.float32)
    # T5 starts decoding from the pad token; a config built from scratch may not say so, and then
    # neither the shifted teacher-forcing inputs nor generation could be made.
    for config in (model.config, model.generation_config):
        if getattr(config, "decoder_start_token_id", None) is None:
            config.decoder_start_token_id = model.config.pad_token_id
    # from_pretrained returns eval mode, which would fine-tune without the checkpoint's dropout.
    return model.train()


class TextToTextFineTuner(TaskModule):
    """One text-to-text fine-tuning run of an encoder-decoder checkpoint on one task.

    Args:
        spec: the task.
        model_dir: an HF-format encoder-decoder checkpoint directory.
        tokenizer: the checkpoint's tokenizer (decodes the generations).
        **optimizer: ``TaskModule``'s ``lr``, ``betas``, ``eps``, ``weight_decay``, ``warmup_fraction``,
            ``schedule``.
    """

    def __init__(self, spec: TaskSpec, model_dir: str | Path, tokenizer: Any, **optimizer: Any) -> None:
        super().__init__(spec, model_dir, **optimizer)
        self.tokenizer = tokenizer
        self.model = build_seq2seq_model(model_dir)
        self.max_new_tokens = generation_length(spec, tokenizer)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The teacher-forced token cross-entropy of ``batch["labels"]``."""
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          labels=batch["labels"], use_cache=False).loss  # a key/value cache serves generation only

    def generate(self, batch: dict[str, torch.Tensor]) -> list[Any]:
        """Greedy generations for ``batch``, mapped to predictions (``parse_prediction``)."""
        tokens = self.model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                     max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1)
        texts = self.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        return [parse_prediction(self.spec, text) for text in texts]

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self(batch)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        loss = self(batch) if "labels" in batch else None
        self.record(dataloader_idx, batch["index"], self.generate(batch), loss, batch["index"].shape[0])

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0):
        return batch["index"].cpu(), self.generate(batch)
