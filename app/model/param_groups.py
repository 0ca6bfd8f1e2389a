"""Optimizer parameter groups.

Weight decay on biases and normalisation weights only pulls them towards zero without any
regularising benefit, so by default they get a group of their own with ``weight_decay = 0`` (BERT,
nanoT5 and cramming's later ``o4`` optimizer config exclude them). NTNG's ``bert-o3`` meant to
exclude norms too, but its keys never matched cramming's module names, so NTNG decayed every norm
weight: ``decay_norm_weights=True`` is that parity switch (biases stay undecayed; bert-c5 has none).
"""

from __future__ import annotations

from typing import Any

from torch import nn


def _is_norm(module: nn.Module) -> bool:
    # HF uses nn.LayerNorm for BERT/RoBERTa and its own T5LayerNorm (RMSNorm) class for T5.
    name = type(module).__name__
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or "LayerNorm" in name or "RMSNorm" in name


def weight_decay_groups(model: nn.Module, decay_norm_weights: bool = False) -> list[dict[str, Any]]:
    """Split parameters into a decayed group and a no-decay group (biases and norm weights).

    Tied parameters (the MLM decoder shares the word embeddings) appear once, as
    ``named_parameters`` already de-duplicates them.

    Args:
        model: the model whose trainable parameters to group.
        decay_norm_weights: decay normalisation weights like any weight (NTNG's bert-o3 as it ran).

    Returns:
        Two param groups; the second sets ``weight_decay=0.0`` and overrides the optimizer's value.
    """
    no_decay_ids = set() if decay_norm_weights else {
        id(param)
        for module in model.modules()
        if _is_norm(module)
        for param in module.parameters(recurse=False)
    }
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith("bias") or id(param) in no_decay_ids:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
