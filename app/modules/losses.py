"""Per-example loss math the masked-LM and span-corruption objectives share: per-row means for batch
selection and Sophia-G's sampled-label backward."""

from __future__ import annotations

import torch


def row_means(token_losses: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row mean of the losses of the tokens that carry a label, in row-major label order.

    Args:
        token_losses: ``[n]`` losses of the positions where ``labels != -100``, row-major.
        labels: ``[batch, length]`` labels (-100 where nothing is predicted).

    Returns:
        ``[batch]`` means; a row without a label gets 0.
    """
    rows = (labels != -100).nonzero()[:, 0]
    sums = torch.zeros(labels.shape[0], device=labels.device).index_add_(0, rows, token_losses)
    return sums / torch.bincount(rows, minlength=labels.shape[0]).clamp_min(1)


def sampled_label_backward(logits: torch.Tensor) -> int:
    """Sophia-G's Gauss-Newton-Bartlett backward: labels sampled from the model's own distribution.

    The labels are drawn from ``softmax(logits)`` with no gradient through the draw, and the summed
    cross-entropy on them is back-propagated (``.grad`` accumulates, so a Hessian batch may span
    micro-batches and ranks before the caller divides by the summed count).

    Args:
        logits: ``[n, vocab]`` logits of the positions that carry a loss.

    Returns:
        ``n``, the loss tokens of the pass.
    """
    logits = logits.float()
    if logits.shape[0] == 0:
        return 0
    with torch.no_grad():
        sampled = torch.distributions.Categorical(logits=logits.detach()).sample()
    torch.nn.functional.cross_entropy(logits, sampled, reduction="sum").backward()
    return int(sampled.numel())
