"""Learning-rate schedules as functions of *budget progress*, not of the step count.

A method that makes steps cheaper (layer dropping) or dearer (Sophia's Hessian passes) changes how
many steps a budget buys. A step-indexed schedule would then end early or late; these end exactly
when the budget is spent, whatever a step costs. Each schedule maps progress ``p`` in [0, 1] to a
multiplier of the optimizer's base learning rate; progress beyond 1 is clamped.
"""

from __future__ import annotations

import math


def _clamp(progress: float) -> float:
    return min(max(progress, 0.0), 1.0)


class LRSchedule:
    """Base class: ``schedule(progress) -> multiplier``."""

    def __call__(self, progress: float) -> float:
        raise NotImplementedError


class OneCycleTriangle(LRSchedule):
    """NTNG's BERT schedule (cramming's ``budget-one-cycle``): 0 -> 1 at ``peak_at``, then -> 0 at 1.

    Args:
        peak_at: budget fraction where the multiplier reaches 1 (NTNG: 0.5).
    """

    def __init__(self, peak_at: float = 0.5) -> None:
        if not 0.0 < peak_at < 1.0:
            raise ValueError(f"peak_at must be in (0, 1), got {peak_at}")
        self.peak_at = peak_at

    def __call__(self, progress: float) -> float:
        p = _clamp(progress)
        if p <= self.peak_at:
            return p / self.peak_at
        return (1.0 - p) / (1.0 - self.peak_at)


class WarmupCosine(LRSchedule):
    """Linear warmup from ``start`` to 1, then a cosine to ``floor`` at the end of the budget.

    NTNG's T5 schedule is ``WarmupCosine(warmup_fraction=0.1526, start=0.5, floor=1e-5)``
    (10,000 of 65,536 fake steps of warmup starting at half the LR).

    Args:
        warmup_fraction: budget fraction spent warming up.
        start: multiplier at progress 0.
        floor: multiplier at progress 1 (the cosine is clamped from below at it, as nanoT5 does).
    """

    def __init__(self, warmup_fraction: float = 0.1, start: float = 0.0, floor: float = 0.0) -> None:
        if not 0.0 <= warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction}")
        self.warmup_fraction, self.start, self.floor = warmup_fraction, start, floor

    def __call__(self, progress: float) -> float:
        p = _clamp(progress)
        if p < self.warmup_fraction:
            return self.start + (1.0 - self.start) * p / self.warmup_fraction
        decay = (p - self.warmup_fraction) / (1.0 - self.warmup_fraction)
        return max(self.floor, 0.5 * (1.0 + math.cos(math.pi * decay)))


class WarmupLinear(LRSchedule):
    """Linear warmup from 0 to 1, then linear decay to ``floor`` at the end of the budget.

    Args:
        warmup_fraction: budget fraction spent warming up.
        floor: multiplier at progress 1.
    """

    def __init__(self, warmup_fraction: float = 0.1, floor: float = 0.0) -> None:
        if not 0.0 <= warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction}")
        self.warmup_fraction, self.floor = warmup_fraction, floor

    def __call__(self, progress: float) -> float:
        p = _clamp(progress)
        if p < self.warmup_fraction:
            return p / self.warmup_fraction
        decay = (p - self.warmup_fraction) / (1.0 - self.warmup_fraction)
        return 1.0 - (1.0 - self.floor) * decay


class WarmupStableDecay(LRSchedule):
    """Warmup, a constant plateau, then a linear decay to ``floor`` over the last ``decay_fraction``.

    Args:
        warmup_fraction: budget fraction spent warming up from 0.
        decay_fraction: final budget fraction spent decaying.
        floor: multiplier at progress 1.
    """

    def __init__(self, warmup_fraction: float = 0.05, decay_fraction: float = 0.2, floor: float = 0.0) -> None:
        if warmup_fraction < 0 or decay_fraction <= 0 or warmup_fraction + decay_fraction > 1:
            raise ValueError("need warmup_fraction >= 0, decay_fraction > 0 and their sum <= 1")
        self.warmup_fraction, self.decay_fraction, self.floor = warmup_fraction, decay_fraction, floor

    def __call__(self, progress: float) -> float:
        p = _clamp(progress)
        if p < self.warmup_fraction:
            return p / self.warmup_fraction
        decay_start = 1.0 - self.decay_fraction
        if p <= decay_start:
            return 1.0
        return 1.0 - (1.0 - self.floor) * (p - decay_start) / self.decay_fraction
