"""Deterministic masked-LM masking: each example's mask is a pure function of (seed, example id, epoch).

The masking itself is transformers' ``DataCollatorForLanguageModeling.torch_mask_tokens``
(``mlm_probability`` of the non-special tokens are selected; of those ``mask_replace_prob``
become [MASK], ``random_replace_prob`` a random token, the rest stay). Only the random source
changes: one generator per example, seeded from (seed, example id, epoch), so the mask does not
depend on batch composition, order, dataloader worker or rank. That lets per-example losses be
recomputed later with exactly the masking the training run used.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import DataCollatorForLanguageModeling


def example_seed(seed: int, example_id: int, epoch: int) -> int:
    """A 64-bit seed mixing the three non-negative ints without collisions in practice.

    ``SeedSequence`` hashes its entropy words, so nearby tuples such as (0, 1, 0) and (0, 0, 1)
    give unrelated seeds (a sum or XOR would collide).
    """
    return int(np.random.SeedSequence([seed, example_id, epoch]).generate_state(1, np.uint64)[0])


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
    special = torch.isin(input_ids, torch.tensor(collator.tokenizer.all_special_ids))
    previous = collator.generator
    masked_rows, label_rows = [], []
    try:
        for row, row_special, example_id in zip(input_ids, special, example_ids.tolist(), strict=True):
            collator.generator = torch.Generator().manual_seed(example_seed(seed, example_id, epoch))
            masked, labels = collator.torch_mask_tokens(row.clone()[None], special_tokens_mask=row_special[None])
            masked_rows.append(masked)
            label_rows.append(labels)
    finally:
        collator.generator = previous
    return torch.cat(masked_rows), torch.cat(label_rows)



class MaskingCollate:
    """Collate blocks and mask them for one epoch (picklable, so masking runs in loader workers)."""

    def __init__(self, collator: DataCollatorForLanguageModeling, seed: int, epoch: int) -> None:
        self.collator, self.seed, self.epoch = collator, seed, epoch

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        input_ids = torch.stack([sample["input_ids"] for sample in samples])
        example_ids = torch.tensor([sample["example_ids"] for sample in samples], dtype=torch.int64)
        masked, labels = mask_tokens(input_ids, example_ids, self.collator, seed=self.seed, epoch=self.epoch)
        return {"input_ids": masked, "labels": labels, "example_ids": example_ids}
