"""Deterministic masked-LM masking: each example's mask is a pure function of (seed, example id, epoch).

The rule is transformers' ``DataCollatorForLanguageModeling.torch_mask_tokens``, with the
collator's settings: ``mlm_probability`` of the non-special tokens are selected; of those
``mask_replace_prob`` become [MASK], ``random_replace_prob`` a random token (any id of the
tokenizer), the rest stay. Only the random source differs: one generator per example, seeded from
(seed, example id, epoch), so the mask does not depend on batch composition, order, dataloader
worker or rank, and per-example losses can be recomputed later under exactly the training mask.

Written here rather than calling ``torch_mask_tokens`` row by row (it takes one generator per
call): drawing each row's uniforms in one call and applying the rule to the whole batch is ~6x
faster (4 ms instead of 25 ms for 128 x 128 tokens on one CPU core), which matters because
training batches are masked on the main process.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast

from app.errors import ConfigurationError
from datamodules.pretraining.objective import BlockLayout, PretrainingObjective, stack_blocks
from datamodules.pretraining.tokenizer import MLM_ROLES


def example_seed(seed: int, example_id: int, epoch: int) -> int:
    """A 64-bit seed mixing the three non-negative ints without collisions in practice.

    ``SeedSequence`` hashes its entropy words, so nearby tuples such as (0, 1, 0) and (0, 0, 1)
    give unrelated seeds (a sum or XOR would collide).
    """
    return int(np.random.SeedSequence([seed, example_id, epoch]).generate_state(1, np.uint64)[0])


# Bump when the masking rule or its random draws change: files keyed by example id (irreducible
# losses) record it, so a mask they were computed under is never silently replaced.
MASKING_VERSION = 2


def mask_tokens(
    input_ids: torch.Tensor,
    example_ids: torch.Tensor,
    collator: DataCollatorForLanguageModeling,
    *,
    seed: int,
    epoch: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask a batch for MLM, each row with its own (seed, example id, epoch) generator.

    Args:
        input_ids: ``LongTensor[B, L]`` of unmasked token ids (CPU); not modified.
        example_ids: ``LongTensor[B]`` stable ids of the rows.
        collator: The MLM collator whose probabilities and tokenizer are used.
        seed: Run-level masking seed (non-negative).
        epoch: Epoch number (non-negative); a new epoch gives a new mask.

    Returns:
        ``(masked_input_ids, labels)``, both ``LongTensor[B, L]``; ``labels`` holds the original
        id at selected positions and -100 elsewhere. Special tokens are never selected.
    """
    tokenizer = collator.tokenizer
    rows, length = input_ids.shape
    # One draw per row: selection, [MASK] replacement, random replacement, the random token.
    uniforms = torch.empty(rows, 4, length)
    for row, example_id in enumerate(example_ids.tolist()):
        generator = torch.Generator().manual_seed(example_seed(seed, example_id, epoch))
        torch.rand(4, length, generator=generator, out=uniforms[row])
    random_words = (uniforms[:, 3] * len(tokenizer)).long()  # uniform over the ids: u < 1, so < len
    special = torch.isin(input_ids, torch.tensor(tokenizer.all_special_ids))
    selected = (uniforms[:, 0] < collator.mlm_probability) & ~special
    replaced = selected & (uniforms[:, 1] < collator.mask_replace_prob)
    # As transformers does: the random share is drawn among the tokens not replaced by [MASK].
    remaining = 1.0 - collator.mask_replace_prob
    randomised = selected & ~replaced & (uniforms[:, 2] < (collator.random_replace_prob / remaining if remaining > 0 else 0.0))
    masked = input_ids.clone()
    masked[replaced] = tokenizer.mask_token_id
    masked[randomised] = random_words[randomised]
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, -100))
    return masked, labels


class MaskingCollate:
    """Collate blocks and mask them for one epoch (picklable, so masking runs in loader workers)."""

    def __init__(self, collator: DataCollatorForLanguageModeling, seed: int, epoch: int) -> None:
        self.collator, self.seed, self.epoch = collator, seed, epoch

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        input_ids, example_ids = stack_blocks(samples)
        masked, labels = mask_tokens(input_ids, example_ids, self.collator, seed=self.seed, epoch=self.epoch)
        return {"input_ids": masked, "labels": labels, "example_ids": example_ids}


class MaskedLanguageModeling(PretrainingObjective):
    """BERT's masked-LM objective; an example's mask depends only on (mask_seed, example id, epoch).

    Blocks are ``[CLS] + seq_len-2 stream tokens + [SEP]`` with documents separated by [SEP]
    (``framing: bert``), or, as cramming packs its corpus, ``seq_len`` stream tokens with no [CLS]
    and no closing [SEP] (``framing: cramming``; documents are still separated by [SEP]). When no
    tokenizer is given a WordPiece one is trained (lower-cased and accent-stripped with
    ``lowercase: true``, as cramming normalises).

    Args:
        mlm_probability: Fraction of non-special tokens selected for prediction.
        mask_replace_prob: Fraction of selected tokens replaced by [MASK].
        random_replace_prob: Fraction of selected tokens replaced by a random token.
        mask_seed: Seed of the masking.
        framing: ``bert`` ([CLS] ... [SEP] blocks) or ``cramming`` (no [CLS] in the packed corpus).

    Raises:
        ConfigurationError: When a probability is out of range or ``mask_seed`` is negative.
    """

    tokenizer_kind = "wordpiece"
    tokenizer_roles = MLM_ROLES

    def __init__(
        self,
        mlm_probability: float = 0.15,
        mask_replace_prob: float = 0.8,
        random_replace_prob: float = 0.1,
        mask_seed: int = 0,
        framing: Literal["bert", "cramming"] = "bert",
    ) -> None:
        checks = {
            f"framing must be bert or cramming, got {framing!r}": framing in ("bert", "cramming"),
            f"mlm_probability must be in (0, 1], got {mlm_probability}": 0 < mlm_probability <= 1,
            "mask_replace_prob and random_replace_prob must be >= 0": min(mask_replace_prob, random_replace_prob) >= 0,
            "mask_replace_prob + random_replace_prob must be at most 1": mask_replace_prob + random_replace_prob <= 1,
            f"mask_seed must be >= 0, got {mask_seed}": mask_seed >= 0,
        }
        for message, ok in checks.items():
            if not ok:
                raise ConfigurationError(message)
        self.mlm_probability, self.mask_seed, self.framing = mlm_probability, mask_seed, framing
        self.mask_replace_prob, self.random_replace_prob = mask_replace_prob, random_replace_prob
        self.collator: DataCollatorForLanguageModeling | None = None  # set by bind()

    def layout(self, tokenizer: PreTrainedTokenizerFast, seq_len: int) -> BlockLayout:
        """Blocks of ``seq_len`` tokens as ``framing`` says; see :meth:`PretrainingObjective.layout`."""
        if self.framing == "cramming":
            return BlockLayout(seq_len, tokenizer.sep_token_id)
        return BlockLayout.bert(tokenizer, seq_len)

    def bind(self, tokenizer: PreTrainedTokenizerFast) -> None:
        """Build the transformers collator holding the tokenizer and probabilities (once per tokenizer)."""
        if self.collator is None or self.collator.tokenizer is not tokenizer:
            self.collator = DataCollatorForLanguageModeling(
                tokenizer,
                mlm_probability=self.mlm_probability,
                mask_replace_prob=self.mask_replace_prob,
                random_replace_prob=self.random_replace_prob,
            )

    def _bound(self) -> DataCollatorForLanguageModeling:
        if self.collator is None:
            raise RuntimeError("MaskedLanguageModeling is used before bind(tokenizer)")
        return self.collator

    def apply(self, input_ids: torch.Tensor, example_ids: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
        """Mask a batch with ``mask_tokens``; see :meth:`PretrainingObjective.apply`."""
        masked, labels = mask_tokens(input_ids, example_ids, self._bound(), seed=self.mask_seed, epoch=epoch)
        return {"input_ids": masked, "labels": labels, "example_ids": example_ids}

    def collate(self, epoch: int) -> MaskingCollate:
        """A :class:`MaskingCollate` for ``epoch``; see :meth:`PretrainingObjective.collate`."""
        return MaskingCollate(self._bound(), self.mask_seed, epoch)

    def fingerprint(self) -> dict:
        """The seed, the probabilities and ``MASKING_VERSION`` (no ``"objective"`` key, see the base)."""
        return {
            "mask_seed": self.mask_seed,
            "mlm_probability": self.mlm_probability,
            "mask_replace_prob": self.mask_replace_prob,
            "random_replace_prob": self.random_replace_prob,
            "masking": MASKING_VERSION,
        }
