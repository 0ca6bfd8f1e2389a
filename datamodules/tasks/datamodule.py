"""``TaskDataModule``: one GLUE/SuperGLUE task's examples, tokenized once, as Lightning loaders.

The task readers (``datamodules.tasks.glue``, ``datamodules.tasks.superglue``) turn files into ``Example``s; this
module turns examples into model inputs. How that happens is an *input format* chosen from the
task's kind and the model (``input_format``):

* ``pair``: one or two text segments -> ``tokenizer(a, b)`` (classification and regression);
* ``candidates``: every candidate of an example tokenized as its own pair, batched as
  ``[batch, candidates, length]`` with a candidate mask (multiple choice and ranking);
* ``text_to_text``: for encoder-decoder (T5) models, every task: an input string and a target
  string (label words), padded per batch (``datamodules.tasks.text_to_text``). Generation tasks
  (SNI) have no other format.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding

from app.errors import ConfigurationError
from datamodules.tasks.hub import HUB, hub_examples
from datamodules.tasks.spec import Example, MissingTaskData, TaskSpec, report_name
from datamodules.tasks.text_to_text import TextToTextCollator, encode_text_to_text

Feature = dict[str, Any]
# Keys of a tokenizer's output that are per-token (and so padded); everything else is per example.
TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def encode_segments(tokenizer, segments: Sequence[Sequence[str]], max_length: int) -> list[dict[str, list[int]]]:
    """Tokenize one- or two-segment inputs in order, as ``tokenizer(a, b)`` with longest-first truncation.

    Args:
        tokenizer: a fast tokenizer.
        segments: per input, one or two strings.
        max_length: the longest encoding, special tokens included.

    Returns:
        Per input, its ``input_ids``/``attention_mask`` (and ``token_type_ids`` if the tokenizer makes them).
    """
    encoded: list[dict[str, list[int]] | None] = [None] * len(segments)
    for arity in (1, 2):
        positions = [i for i, texts in enumerate(segments) if len(texts) == arity]
        if not positions:
            continue
        first = [segments[i][0] for i in positions]
        second = [segments[i][1] for i in positions] if arity == 2 else None
        batch = tokenizer(first, second, truncation=True, max_length=max_length)
        keys = [key for key in TOKEN_KEYS if key in batch]
        for row, i in enumerate(positions):
            encoded[i] = {key: batch[key][row] for key in keys}
    bad = [i for i, item in enumerate(encoded) if item is None]
    if bad:
        raise ConfigurationError(f"input {bad[0]} has {len(segments[bad[0]])} text segments; a model takes 1 or 2")
    return encoded  # type: ignore[return-value]


def _label(example: Example, kind: str) -> int | float | None:
    if example.label is None:
        return None
    return float(example.label) if kind == "regression" else int(example.label)


def encode_pairs(spec: TaskSpec, tokenizer, examples: Sequence[Example], max_length: int) -> list[Feature]:
    """Features of classification/regression examples: tokens, ``labels`` (if any) and ``index``."""
    features = []
    for index, (example, tokens) in enumerate(
        zip(examples, encode_segments(tokenizer, [e.segments for e in examples], max_length))
    ):
        feature: Feature = dict(tokens, index=index)
        label = _label(example, spec.kind)
        if label is not None:
            feature["labels"] = label
        features.append(feature)
    return features


def encode_candidates(spec: TaskSpec, tokenizer, examples: Sequence[Example], max_length: int) -> list[Feature]:
    """Features of multiple-choice examples: per candidate its tokens, plus ``labels`` and ``index``."""
    flat = [candidate for example in examples for candidate in example.candidates]
    encoded = encode_segments(tokenizer, flat, max_length)
    features, start = [], 0
    for index, example in enumerate(examples):
        if not example.candidates:
            raise ConfigurationError(f"{spec.suite} {spec.name} example {example.idx!r} has no candidates")
        rows = encoded[start : start + len(example.candidates)]
        start += len(example.candidates)
        feature: Feature = {key: [row[key] for row in rows] for key in rows[0]}
        feature["index"] = index
        label = _label(example, spec.kind)
        if label is not None:
            feature["labels"] = label
        features.append(feature)
    return features


class CandidateCollator:
    """Pads multiple-choice features to ``[batch, max candidates, max length]`` with a candidate mask.

    Written by hand because transformers' ``DataCollatorForMultipleChoice`` takes the number of
    choices from the first example and reshapes the whole batch with it: it cannot batch ReCoRD,
    whose queries have different numbers of candidate entities, and it has no candidate mask to
    keep padded candidates from being chosen.

    Args:
        pad_token_id: the tokenizer's padding id (``input_ids`` of padding positions).
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[Feature]) -> dict[str, torch.Tensor]:
        batch_size = len(features)
        candidates = max(len(f["input_ids"]) for f in features)
        length = max(len(ids) for f in features for ids in f["input_ids"])
        keys = [key for key in TOKEN_KEYS if key in features[0]]
        batch = {
            key: torch.full(
                (batch_size, candidates, length), self.pad_token_id if key == "input_ids" else 0, dtype=torch.long
            )
            for key in keys
        }
        batch["candidate_mask"] = torch.zeros(batch_size, candidates, dtype=torch.bool)
        for i, feature in enumerate(features):
            for c, ids in enumerate(feature["input_ids"]):
                for key in keys:
                    batch[key][i, c, : len(ids)] = torch.tensor(feature[key][c])
            batch["candidate_mask"][i, : len(feature["input_ids"])] = True
        batch["index"] = torch.tensor([f["index"] for f in features])
        if all("labels" in f for f in features):
            batch["labels"] = torch.tensor([f["labels"] for f in features], dtype=torch.long)
        return batch


class PairCollator:
    """Pads pair features with transformers' ``DataCollatorWithPadding`` (labels and index pass through)."""

    def __init__(self, tokenizer, kind: str) -> None:
        self.pad = DataCollatorWithPadding(tokenizer)
        self.kind = kind

    def __call__(self, features: list[Feature]) -> dict[str, torch.Tensor]:
        batch = dict(self.pad(features))
        if "labels" in batch:
            batch["labels"] = batch["labels"].to(torch.float32 if self.kind == "regression" else torch.long)
        return batch


@dataclass(frozen=True)
class InputFormat:
    """How a task's examples become features and features become batches.

    Attributes:
        encode: ``encode(spec, tokenizer, examples, max_length) -> features`` (each with ``index``,
            its position in ``examples``, and ``labels`` when labelled).
        collator: ``collator(spec, tokenizer) -> collate_fn``.
    """

    encode: Callable[[TaskSpec, Any, Sequence[Example], int], list[Feature]]
    collator: Callable[[TaskSpec, Any], Callable[[list[Feature]], dict[str, torch.Tensor]]]


INPUT_FORMATS: dict[str, InputFormat] = {
    "pair": InputFormat(encode_pairs, lambda spec, tokenizer: PairCollator(tokenizer, spec.kind)),
    "candidates": InputFormat(encode_candidates, lambda spec, tokenizer: CandidateCollator(tokenizer.pad_token_id)),
    "text_to_text": InputFormat(encode_text_to_text,
                                lambda spec, tokenizer: TextToTextCollator(tokenizer.pad_token_id)),
}


def is_text_to_text(model_config: Any) -> bool:
    """Whether a model with ``model_config`` is fine-tuned text-to-text (T5 and other encoder-decoders)."""
    return getattr(model_config, "model_type", None) == "t5" or bool(getattr(model_config, "is_encoder_decoder", False))


def input_format(spec: TaskSpec, model_config: Any = None) -> str:
    """The input format for ``spec`` on a model with ``model_config``.

    Encoder-decoder models (``is_text_to_text``) take ``text_to_text`` inputs. Encoder models take
    ``pair`` inputs for classification/regression and ``candidates`` for multiple choice.

    Raises:
        ConfigurationError: a generation task for an encoder model (or no model config).
    """
    if model_config is not None and is_text_to_text(model_config):
        return "text_to_text"
    if spec.kind == "generation":
        raise ConfigurationError(f"{spec.suite} {spec.name} is a generation task: it needs a text-to-text "
                                 "(encoder-decoder, e.g. T5) checkpoint")
    return "candidates" if spec.kind == "multiple_choice" else "pair"


class TaskDataModule(LightningDataModule):
    """Train and dev loaders of one task, tokenized once and reused across seeds.

    Args:
        spec: the task.
        data_dir: the suite's data directory (the task's files are in ``data_dir / spec.directory``), or
            ``"hub"``: every split from the task's hub dataset (``datamodules.tasks.hub``).
        tokenizer: the fine-tuned model's tokenizer.
        max_length: the longest encoding in tokens (longer inputs are truncated longest-first).
        batch_size: training batch size; the last incomplete batch is dropped, as NTNG does.
        eval_batch_size: batch size of evaluation and prediction (default: ``batch_size``).
        max_train_examples: train on the first N examples only (deterministic subsets for smoke runs).
        max_eval_examples: evaluate and predict the first N examples of every other split only.
        num_workers: DataLoader workers.
        model_config: the model's config, for choosing the input format (see ``input_format``).
        shuffle: shuffle training examples each epoch (NTNG's GLUE run does; its SuperGLUE run did not).

    Attributes after ``setup``: ``train_examples``; ``eval_examples`` (dev split -> examples, in
    ``spec.dev_splits`` order), whose positions are the ``index`` carried by every batch so
    predictions can be matched back to examples.
    """

    def __init__(
        self,
        spec: TaskSpec,
        data_dir: str | Path,
        tokenizer: Any,
        max_length: int = 128,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        max_train_examples: int | None = None,
        max_eval_examples: int | None = None,
        num_workers: int = 0,
        model_config: Any = None,
        shuffle: bool = True,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.from_hub = str(data_dir) == HUB
        self.task_dir = Path(data_dir) / spec.directory
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.max_train_examples = max_train_examples
        self.max_eval_examples = max_eval_examples
        self.num_workers = num_workers
        self.shuffle = shuffle
        self.format = INPUT_FORMATS[input_format(spec, model_config)]
        self.collate = self.format.collator(spec, tokenizer)
        self.train_examples: list[Example] = []
        self.eval_examples: dict[str, list[Example]] = {}
        self._train_features: list[Feature] = []
        self._eval_features: dict[str, list[Feature]] = {}
        self.dropped_train = 0
        self._ready = False

    # -- reading ------------------------------------------------------------------------------------

    def read(self, split: str, limit: int | None = None) -> list[Example]:
        """The examples of ``split`` (the first ``limit`` of them).

        Raises:
            MissingTaskData: the split's file is absent (the message names the directory and, when the
                task has one, its hub dataset), or the hub could not be reached.
        """
        if self.from_hub:
            examples = hub_examples(self.spec, split)
        else:
            try:
                examples = self.spec.reader(self.task_dir, split)
            except MissingTaskData as err:
                # The hub copy is named for users who can read it (--data-dir hub).
                hub = f"; hub dataset {'/'.join(self.spec.hub)}" if self.spec.hub else ""
                raise MissingTaskData(f"{split} data not found: {err}{hub}") from None
        return list(examples[:limit] if limit is not None else examples)

    def encode(self, examples: Sequence[Example]) -> list[Feature]:
        """Tokenize ``examples`` into features (``index`` = position in ``examples``)."""
        return self.format.encode(self.spec, self.tokenizer, examples, self.max_length)

    def setup(self, stage: str | None = None) -> None:
        """Read and tokenize the train and dev splits (once; later calls do nothing)."""
        if self._ready:
            return
        # A training example without a label cannot be learned from (a ReCoRD query whose answer is
        # none of the passage's entities); the count is kept for the log.
        train = self.read("train")
        labelled = [example for example in train if example.label is not None]
        self.dropped_train = len(train) - len(labelled)
        self.train_examples = labelled[: self.max_train_examples] if self.max_train_examples else labelled
        self.eval_examples = {split: self.read(split, self.max_eval_examples) for split in self.spec.dev_splits}
        for split, examples in self.eval_examples.items():
            if any(example.label is None for example in examples):
                raise ConfigurationError(
                    f"{self.spec.suite} {self.spec.name} {split} has unlabelled examples; dev splits must be labelled"
                )
        self._train_features = self.encode(self.train_examples)
        self._eval_features = {split: self.encode(examples) for split, examples in self.eval_examples.items()}
        if len(self._train_features) < self.batch_size:
            raise ConfigurationError(
                f"{self.spec.suite} {self.spec.name}: {len(self._train_features)} training examples make no full "
                f"batch of {self.batch_size} (the last incomplete batch is dropped)"
            )
        self._ready = True

    @property
    def report_keys(self) -> dict[str, str]:
        """Dev split -> the key its results are reported under (``mnli-m``, ``rte``)."""
        return {split: report_name(self.spec, split) for split in self.spec.dev_splits}

    # -- loaders ------------------------------------------------------------------------------------

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self._train_features,
            batch_size=self.batch_size,
            shuffle=self.shuffle,
            drop_last=True,
            collate_fn=self.collate,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> list[DataLoader]:
        """One loader per dev split, in ``spec.dev_splits`` order (the ``dataloader_idx``)."""
        return [self._loader(self._eval_features[split]) for split in self.spec.dev_splits]

    def predict_loader(self, examples: Sequence[Example]) -> DataLoader:
        """An in-order loader over any examples (test splits, diagnostics)."""
        return self._loader(self.encode(examples))

    def _loader(self, features: list[Feature]) -> DataLoader:
        return DataLoader(
            features, batch_size=self.eval_batch_size, shuffle=False, collate_fn=self.collate,
            num_workers=self.num_workers,
        )
