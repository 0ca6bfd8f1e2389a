"""The pretraining objective: how documents become blocks, and a block a training example.

The objective decides the block layout (:class:`BlockLayout`: block length and framing, from the
tokenizer and the data module's ``seq_len``, the tokens per example the model sees) and which
tokenizer is trained when none is given. The data module packs and caches blocks in that layout,
reads them unmodified (``input_ids`` with stable ``example_ids``) and hands them to the objective,
which makes the model's inputs and labels. An objective's output for one example must be a pure
function of (its settings, the block, the example id, the epoch), never of batch composition,
order, worker or rank: batch-selection methods and irreducible-loss files recompute an example's
tensors later and must get exactly what training saw.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerFast


@dataclass(frozen=True)
class BlockLayout:
    """How blocks are cut: ``prefix + body + suffix`` token ids, the body cut from one stream of documents
    each followed by ``separator``.

    Attributes:
        length: Tokens per block, framing included.
        separator: Id appended to every document in the stream (BERT: [SEP], T5: ``</s>``).
        prefix: Ids opening every block (BERT: [CLS]; T5: none).
        suffix: Ids closing every block (BERT: [SEP]; T5: none).
    """

    length: int
    separator: int
    prefix: tuple[int, ...] = ()
    suffix: tuple[int, ...] = ()

    @classmethod
    def bert(cls, tokenizer: PreTrainedTokenizerFast, length: int) -> BlockLayout:
        """``[CLS] + length-2 stream tokens + [SEP]``, documents separated by [SEP]."""
        return cls(length, tokenizer.sep_token_id, (tokenizer.cls_token_id,), (tokenizer.sep_token_id,))

    @property
    def body_length(self) -> int:
        """Stream tokens per block."""
        return self.length - len(self.prefix) - len(self.suffix)

    def describe(self) -> dict[str, Any]:
        """The layout as JSON-able values (for cache fingerprints)."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}


class PretrainingObjective(ABC):
    """What the pretraining data module needs from an objective (masked LM, span corruption).

    Attributes:
        tokenizer_kind: The tokenizer trained on the corpus when none is given (see
            ``tokenizer.cached_tokenizer``): ``"wordpiece"`` (BERT's) or ``"unigram"`` (T5's).
        tokenizer_roles: Special-token roles (``"mask_token"``, ``"eos_token"``, ...) a given
            tokenizer must have.
    """

    tokenizer_kind: str
    tokenizer_roles: tuple[str, ...]

    @abstractmethod
    def layout(self, tokenizer: PreTrainedTokenizerFast, seq_len: int) -> BlockLayout:
        """The blocks this objective makes examples of.

        Args:
            tokenizer: The data module's tokenizer.
            seq_len: Tokens per example the model sees (the model is built for it).

        Returns:
            The block layout; its ``length`` may differ from ``seq_len`` (span corruption cuts
            longer blocks and shortens them).

        Raises:
            ConfigurationError: When ``seq_len`` cannot be made with this objective's settings.
        """

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
            input_ids: ``LongTensor[B, L]`` unmodified blocks of the layout's length (CPU); not modified.
            example_ids: ``LongTensor[B]`` stable ids of the rows.
            epoch: The epoch (non-negative); evaluation uses 0.

        Returns:
            ``{"input_ids", "labels", "example_ids"}`` (labels -100 where nothing is predicted); the
            lengths of ``input_ids`` and ``labels`` are the objective's (masked LM: ``L`` both).
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


def stack_blocks(samples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids [B, L], example_ids [B])`` of a list of ``PackedBlocks`` samples (what every collate stacks)."""
    input_ids = torch.stack([sample["input_ids"] for sample in samples])
    return input_ids, torch.tensor([sample["example_ids"] for sample in samples], dtype=torch.int64)


class TrainingCollate:
    """Training batches made in the loader's workers, off the training process's critical path.

    The samples carry the epoch the sampler drew them in (``PackedBlocks`` keyed by
    ``(epoch, index)``), so a batch is exactly ``objective.apply(blocks, ids, epoch)``, whichever
    worker makes it and however far ahead it fetches.

    Args:
        objective: The bound objective (picklable: it travels to the workers).
        apply: False when a batch-selection method replaces every training batch's tensors with
            its own rows (only the row count of Lightning's batch is used): the blocks are then
            only stacked, and no objective work is wasted on rows that are never trained.
    """

    def __init__(self, objective: PretrainingObjective, apply: bool = True) -> None:
        self.objective, self.apply = objective, apply

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        input_ids, example_ids = stack_blocks(samples)
        if not self.apply:
            return {"input_ids": input_ids, "example_ids": example_ids}
        return self.objective.apply(input_ids, example_ids, samples[0]["epoch"])
