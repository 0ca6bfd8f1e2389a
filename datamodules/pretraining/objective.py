"""The pretraining objective: how a block of token ids becomes a training example.

The data module reads unmodified blocks (``input_ids`` with stable ``example_ids``) and hands them
to its objective, which decides the model's inputs and labels. An objective's output for one
example must be a pure function of (its settings, the block, the example id, the epoch), never of
batch composition, order, worker or rank: batch-selection methods and irreducible-loss files
recompute an example's tensors later and must get exactly what training saw.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from transformers import PreTrainedTokenizerFast


class PretrainingObjective(ABC):
    """What the pretraining data module needs from an objective (masked LM today, span corruption next)."""

    @abstractmethod
    def bind(self, tokenizer: PreTrainedTokenizerFast) -> None:
        """Prepare for ``tokenizer`` (special tokens, vocabulary); called before every use, so idempotent.

        Args:
            tokenizer: The data module's tokenizer.
        """

    @abstractmethod
    def apply(self, input_ids: torch.Tensor, example_ids: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
        """The training tensors of a batch of blocks in ``epoch``.

        Args:
            input_ids: ``LongTensor[B, L]`` unmodified blocks (CPU); not modified.
            example_ids: ``LongTensor[B]`` stable ids of the rows.
            epoch: The epoch (non-negative); evaluation uses 0.

        Returns:
            ``{"input_ids", "labels", "example_ids"}`` (labels -100 where nothing is predicted).
        """

    @abstractmethod
    def collate(self, epoch: int) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
        """A picklable collate function doing :meth:`apply` for ``epoch`` inside loader workers.

        Args:
            epoch: The epoch the batches are made for.

        Returns:
            A function from a list of ``{"input_ids": LongTensor[L], "example_ids": int}`` samples to
            :meth:`apply`'s output for them.
        """

    @abstractmethod
    def fingerprint(self) -> dict[str, Any]:
        """The JSON-able settings that decide an example's training tensors.

        Files keyed by example id store it and compare it key by key, so a key may never change its
        meaning. Objectives other than masked LM must include ``"objective": <name>`` (masked LM
        omits it: its files predate pluggable objectives).

        Returns:
            A flat dict of JSON-able values.
        """
