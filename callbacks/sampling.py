"""Shared mechanics of the methods: rank-synchronised randomness and the depth every stack shares.

Every random choice that shapes the graph (which layers run) must be the same on every DDP rank
(the slowest rank sets the step time, and DDP would average a layer's zero gradient on one rank
with real gradients on another) and the same after a resume. Drawing it from a generator seeded by
``(seed, optimizer step, micro-step)`` gives both without communication or saved RNG state.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from lightning.pytorch import Trainer

from app.errors import ConfigurationError


def run_seed(seed: int | None) -> int:
    """The method's seed: ``seed`` if given, else the run's (``seed_everything``), else 0."""
    if seed is not None:
        return seed
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def step_generator(seed: int, step: int, micro_step: int) -> torch.Generator:
    """A CPU generator whose stream is a pure function of ``(seed, step, micro_step)``.

    Args:
        seed: the method's seed.
        step: the optimizer step (``trainer.global_step``).
        micro_step: the micro-batch within the step (0 when sampling once per step).

    Returns:
        A freshly seeded ``torch.Generator``.
    """
    state = np.random.SeedSequence([seed, step, micro_step]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state >> np.uint64(1)))


def multi_process() -> bool:
    """Whether a ``torch.distributed`` group of more than one process is running."""
    distributed = torch.distributed
    return distributed.is_available() and distributed.is_initialized() and distributed.get_world_size() > 1


def micro_step(trainer: Trainer, batch_idx: int) -> int:
    """Index of this micro-batch within its optimizer step."""
    return batch_idx % trainer.accumulate_grad_batches


def common_depth(layers, method: str) -> int:
    """The depth shared by every stack (the methods change the same indices in encoder and decoder).

    Args:
        layers: the module's ``LayerAdapter``.
        method: the method's name, for the message.

    Raises:
        ConfigurationError: when the stacks differ in depth.
    """
    depths = {stack: layers.num_layers(stack) for stack in layers.stack_names}
    if len(set(depths.values())) != 1:
        raise ConfigurationError(f"{method} changes the same layers in every stack, whose depths differ: {depths}")
    return next(iter(depths.values()))
