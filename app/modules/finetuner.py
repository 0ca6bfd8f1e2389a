"""``FineTuner``: fine-tune a fresh copy of a pretrained encoder on one GLUE/SuperGLUE task.

Each run loads the checkpoint directory again, so every task and seed starts from the same
pretrained weights (NTNG). The task head is a function of the task's kind and the model's config
(``head_for``):

* ``sequence_classification``: ``AutoModelForSequenceClassification`` with ``len(label_names)``
  outputs (classification, cross-entropy) or one (regression, mean squared error);
* ``multiple_choice``: ``AutoModelForMultipleChoice`` (encoder + a scalar score per candidate) run
  on the real candidates only, with padded candidates' logits set to ``-inf`` so they never win.

Encoder-decoder (T5) checkpoints are fine-tuned text-to-text by ``app.modules.text_to_text``
instead; ``head_for`` refuses them. Both modules share ``TaskModule``: the dev metrics of every
validation epoch (``history``, ``last_predictions``) and the optimizer.

Optimisation follows NTNG / cramming's "sane" fine-tuning settings: AdamW (betas 0.9/0.98, eps 1e-6,
no weight decay), cosine decay with 10 % linear warmup per optimizer step, no gradient clipping.
NTNG computes its warmup once from the first task's (CoLA's) step count and reuses that absolute
number for every later task; here every run warms up for 10 % of its *own* steps. (SNI's T5 runs
use nanoT5's constant schedule instead: ``schedule="constant"``.)
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from transformers import (
    AutoConfig,
    AutoModelForMultipleChoice,
    AutoModelForSequenceClassification,
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
)
from transformers.utils import logging as hf_logging

from app.errors import ConfigurationError
from app.evaluation.metrics import score
from datamodules.tasks.spec import Example, TaskSpec, report_name

# Fine-tuning learning rates of NTNG's suites (cramming's GLUE_sane, NTNG's SuperGLUE config, nanoT5's SNI).
SUITE_LEARNING_RATES = {"glue": 4e-5, "superglue": 5e-5, "sni": 5e-5}
SCHEDULES = ("cosine", "constant")  # after warmup: decay to 0, or stay at the peak


def head_for(spec: TaskSpec, config: Any) -> str:
    """The head a task gets on a model with ``config`` (see the module docstring).

    Raises:
        ConfigurationError: for encoder-decoder models (fine-tuned by ``TextToTextFineTuner``).
    """
    if getattr(config, "is_encoder_decoder", False):
        raise ConfigurationError(
            f"{config.model_type} checkpoints have no classification head: fine-tune them text-to-text "
            "(app.modules.text_to_text.TextToTextFineTuner)"
        )
    return "multiple_choice" if spec.kind == "multiple_choice" else "sequence_classification"


def load_config(model_dir: str | Path) -> Any:
    """The checkpoint's config, or a ``ConfigurationError`` naming the directory."""
    try:
        return AutoConfig.from_pretrained(str(model_dir))
    except (OSError, ValueError) as err:
        raise ConfigurationError(f"cannot load model {model_dir}: {' '.join(str(err).split())}") from err


@contextmanager
def quiet_transformers():
    """Silence transformers while loading: a "newly initialized head" warning and a loading
    progress bar per task and seed are noise."""
    verbosity, progress_bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if progress_bar:
            hf_logging.enable_progress_bar()


def build_task_model(spec: TaskSpec, model_dir: str | Path, config: Any = None) -> torch.nn.Module:
    """A fresh task model from the checkpoint in ``model_dir`` (the head is newly initialised).

    Weights load in float32 whatever dtype they were saved in; mixed precision is the Trainer's job.
    """
    config = config if config is not None else load_config(model_dir)
    head = head_for(spec, config)
    with quiet_transformers():
        if head == "multiple_choice":
            model = AutoModelForMultipleChoice.from_pretrained(str(model_dir), dtype=torch.float32)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(
                str(model_dir),
                num_labels=len(spec.label_names) or 1,
                problem_type="regression" if spec.kind == "regression" else "single_label_classification",
                dtype=torch.float32,
            )
    # from_pretrained returns the model in eval mode and Lightning keeps submodules' modes, which
    # would fine-tune without dropout.
    return model.train()


class TaskModule(LightningModule):
    """What every fine-tuning run shares: dev metrics per validation epoch and the optimizer.

    A subclass sets ``self.model`` and, in ``validation_step``, calls ``record(dataloader_idx,
    index, predictions, loss, count)``.

    Args:
        spec: the task.
        model_dir: an HF-format checkpoint directory (``save_pretrained``; e.g. ntng's export).
        lr: peak learning rate (default: the suite's, 4e-5 GLUE / 5e-5 SuperGLUE and SNI).
        betas: AdamW betas.
        eps: AdamW epsilon.
        weight_decay: AdamW weight decay.
        warmup_fraction: share of the run's optimizer steps spent warming up linearly.
        schedule: after warmup, ``cosine`` decay to 0 or ``constant``.

    Attributes:
        history: report key -> per-epoch metric dicts (from ``app.evaluation.metrics.score``).
        last_predictions: report key -> predictions of the latest validation epoch, aligned with
            the data module's ``eval_examples``.
    """

    def __init__(
        self,
        spec: TaskSpec,
        model_dir: str | Path,
        lr: float | None = None,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        warmup_fraction: float = 0.1,
        schedule: str = "cosine",
    ) -> None:
        super().__init__()
        lr = SUITE_LEARNING_RATES[spec.suite] if lr is None else lr
        if schedule not in SCHEDULES:
            raise ConfigurationError(f"unknown schedule {schedule!r}; known: {', '.join(SCHEDULES)}")
        self.save_hyperparameters(
            {"task": spec.name, "suite": spec.suite, "model_dir": str(model_dir), "lr": lr, "betas": list(betas),
             "eps": eps, "weight_decay": weight_decay, "warmup_fraction": warmup_fraction, "schedule": schedule}
        )
        self.spec = spec
        self.lr, self.betas, self.eps = lr, tuple(betas), eps
        self.weight_decay, self.warmup_fraction, self.schedule = weight_decay, warmup_fraction, schedule
        self.history: dict[str, list[dict[str, float]]] = {}
        self.last_predictions: dict[str, list[Any]] = {}
        self._outputs: dict[int, list[tuple[torch.Tensor, Sequence[Any]]]] = {}
        self._val_loss: dict[int, list[tuple[float, int]]] = {}

    def record(self, dataloader_idx: int, index: torch.Tensor, predictions: Sequence[Any],
               loss: torch.Tensor | None, count: int) -> None:
        """Keep one validation batch's predictions (and its mean loss over ``count`` examples)."""
        self._outputs.setdefault(dataloader_idx, []).append((index.cpu(), predictions))
        if loss is not None:
            self._val_loss.setdefault(dataloader_idx, []).append((loss.item(), count))

    def on_validation_epoch_start(self) -> None:
        self._outputs, self._val_loss = {}, {}

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        datamodule = self.trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "eval_examples"):
            raise RuntimeError("fine-tuning validates with a TaskDataModule (predictions are matched to its examples)")
        for loader_idx, split in enumerate(self.spec.dev_splits):
            key = report_name(self.spec, split)
            examples = datamodule.eval_examples[split]
            predictions = gather_predictions(self._outputs.get(loader_idx, []), len(examples))
            metrics = {name: float(value) for name, value in score(self.spec, examples, predictions).items()}
            self.history.setdefault(key, []).append(metrics)
            self.last_predictions[key] = predictions
            for name, value in metrics.items():
                self.log(f"val/{key}/{name}", value)
            losses = self._val_loss.get(loader_idx)
            if losses:
                total = sum(count for _, count in losses)
                self.log(f"val/{key}/loss", sum(loss * count for loss, count in losses) / total)
        self._outputs, self._val_loss = {}, {}

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(
            self.parameters(), lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay
        )
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total) or total <= 0:
            raise ConfigurationError("fine-tuning needs a finite number of steps (set max_epochs)")
        warmup = int(self.warmup_fraction * total)
        if self.schedule == "cosine":
            scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=warmup,
                                                        num_training_steps=int(total))
        else:
            scheduler = get_constant_schedule_with_warmup(optimizer, num_warmup_steps=warmup)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class FineTuner(TaskModule):
    """One fine-tuning run of a pretrained encoder on one task (arguments: ``TaskModule``'s)."""

    def __init__(self, spec: TaskSpec, model_dir: str | Path, **optimizer: Any) -> None:
        super().__init__(spec, model_dir, **optimizer)
        config = load_config(model_dir)
        self.head = head_for(spec, config)
        self.model = build_task_model(spec, model_dir, config)
        # Inputs the model's forward takes: BERT-style tokenizers emit token_type_ids that a model
        # with a single token type (RoBERTa checkpoints) or none (DistilBERT) must not get.
        self._drop_token_types = getattr(config, "type_vocab_size", 2) < 2 or (
            "token_type_ids" not in inspect.signature(self.model.forward).parameters
        )

    # -- the network --------------------------------------------------------------------------------

    def _inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        keys = ["input_ids", "attention_mask"] + ([] if self._drop_token_types else ["token_type_ids"])
        return {key: batch[key] for key in keys if key in batch}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits: ``[B, labels]`` (classification), ``[B]`` (regression) or ``[B, C]`` (multiple
        choice, ``-inf`` at padded candidates)."""
        inputs = self._inputs(batch)
        if self.head == "multiple_choice":
            mask = batch["candidate_mask"]
            # Only the real candidates run: as [N, 1, L], each its own "example" of one choice.
            real = {key: value[mask].unsqueeze(1) for key, value in inputs.items()}
            scores = self.model(**real).logits.float().squeeze(-1)
            logits = torch.full(mask.shape, float("-inf"), dtype=scores.dtype, device=scores.device)
            return logits.masked_scatter(mask, scores)
        logits = self.model(**inputs).logits.float()
        return logits.squeeze(-1) if self.spec.kind == "regression" else logits

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean squared error (regression) or cross-entropy (classes and candidates)."""
        if self.spec.kind == "regression":
            return F.mse_loss(logits, labels.float())
        return F.cross_entropy(logits, labels)

    def predictions(self, logits: torch.Tensor) -> torch.Tensor:
        """Class ids, regression values or the chosen candidates' indices."""
        return logits if self.spec.kind == "regression" else logits.argmax(dim=-1)

    # -- steps --------------------------------------------------------------------------------------

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(self(batch), batch["labels"])
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        logits = self(batch)
        loss = self.loss(logits, batch["labels"]) if "labels" in batch else None
        self.record(dataloader_idx, batch["index"], self.predictions(logits).cpu(), loss, batch["index"].shape[0])

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0):
        return batch["index"].cpu(), self.predictions(self(batch)).cpu()


def gather_predictions(outputs: Sequence[tuple[torch.Tensor, Sequence[Any]]], count: int) -> list[Any]:
    """Predictions in example order from ``(index, predictions)`` batches (a tensor or a list).

    Returns:
        ``count`` Python values (ints for classes and candidates, floats for regression, strings
        for generation).

    Raises:
        RuntimeError: when an example got no prediction (a loader dropped or repeated rows).
    """
    predictions: list[Any] = [None] * count
    for indices, values in outputs:
        for index, value in zip(indices.tolist(), values.tolist() if torch.is_tensor(values) else values):
            predictions[index] = value
    missing = sum(p is None for p in predictions)
    if missing:
        raise RuntimeError(f"{missing} of {count} examples got no prediction")
    return predictions


def predict(trainer, module: TaskModule, loader, examples: Sequence[Example]) -> list[Any]:
    """Predictions of ``module`` for ``examples`` (served in order by ``loader``) via ``trainer.predict``."""
    outputs = trainer.predict(module, dataloaders=loader)
    return gather_predictions(outputs or [], len(examples))
