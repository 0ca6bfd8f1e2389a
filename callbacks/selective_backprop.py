"""Selective backprop (Jiang et al. 2019) as NTNG ran it: pure selection math + a callback.

The module-level functions are the method (loss percentiles in a history, keep probabilities,
the Bernoulli draw, Composer's fixed-fraction draw, the expected selection rate); the callback
applies them in training and prices an update with them for ``ntng plan``. The mechanics shared with RHO-loss (candidate
stream, scoring, in-place batch swap) live in ``callbacks.selection``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer

from app.accounting.planning import PlanSettings, UpdateCost, baseline_update_cost, forward_seconds
from app.errors import ConfigurationError
from callbacks.sampling import step_generator
from callbacks.selection import BatchSelection


def loss_percentiles(history: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
    """Percentile of each loss within ``history``, as a fraction in (0, 1].

    scipy's ``percentileofscore(history, loss, kind="rank") / 100`` (NTNG): ties take the average
    rank, ``(below + at_or_below + [at_or_below > below]) / (2 n)``.

    Args:
        history: ``[n]`` recent losses (the current batch already appended, as NTNG and the official code do).
        losses: ``[b]`` losses to rank.

    Returns:
        ``[b]`` percentiles.
    """
    below = (history[None, :] < losses[:, None]).sum(1)
    at_or_below = (history[None, :] <= losses[:, None]).sum(1)
    return (below + at_or_below + (at_or_below > below)).double() / (2 * history.numel())


def keep_probabilities(percentiles: torch.Tensor, beta: float) -> torch.Tensor:
    """Selective backprop's keep probability ``p ** beta`` (the official ``sampling_min`` is 0)."""
    return percentiles.double() ** beta


def sample_kept(probabilities: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Indices kept by independent Bernoulli draws ``U < p`` (CPU ``generator``; ``U`` in [0, 1))."""
    draws = torch.rand(probabilities.shape[0], generator=generator, dtype=torch.float64)
    return (draws < probabilities.cpu()).nonzero()[:, 0]


def fixed_fraction_kept(losses: torch.Tensor, keep_fraction: float, generator: torch.Generator) -> torch.Tensor:
    """Composer's variant: exactly ``int(keep_fraction * n)`` rows of this batch, no history.

    Ranks within the batch give percentiles ``(rank + 0.5) / n``; rows are drawn without replacement
    with probability proportional to ``percentile ** (1 / keep_fraction - 1)`` (keep 0.5: beta 1).

    Returns:
        Sorted indices of the kept rows.
    """
    count, rows = int(keep_fraction * losses.shape[0]), losses.shape[0]
    ranks = losses.cpu().argsort().argsort().double()
    weights = ((ranks + 0.5) / rows) ** (1.0 / keep_fraction - 1.0)
    return torch.multinomial(weights, count, replacement=False, generator=generator).sort().values


def expected_selection_rate(beta: float, variant: str, keep_fraction: float) -> float:
    """Expected share of scored examples kept: ``1 / (beta + 1)`` (uniform percentiles) or ``keep_fraction``."""
    return keep_fraction if variant == "fixed_fraction" else 1.0 / (beta + 1.0)


class SelectiveBackprop(BatchSelection):
    """Selective backprop: train on the examples whose loss is high relative to recent losses.

    Paper: Jiang et al., "Accelerating Deep Learning by Focusing on the Biggest Losers", 2019,
    arXiv 1910.00762 (code: github.com/angelajiang/SelectiveBackprop). NTNG (Kaddour et al. 2023,
    ``bert/pretrain_bert_sb.py``): every 128-sequence micro-batch is scored with a no-grad forward
    (per-sequence mean MLM loss over masked tokens); each loss joins a history of the last 5000;
    its percentile ``p`` in the history (scipy ``percentileofscore``, ties averaged) gives the keep
    probability ``p ** beta``, beta = 1 (about half kept; beta 2: a third); kept sequences are
    buffered until a full 1536 batch is trained. Every scoring forward is charged as forward-only
    reference time, every trained micro-batch as forward+backward. Expected cost per trained
    example: ``fb + fwd / rate``, 1.82x the baseline at 50 % with NTNG's forward = 0.41 of a step.

    How it runs here (mechanics in ``callbacks.selection``): at each micro-batch the callback scores
    candidate micro-batches from its own stream until the buffer holds a micro-batch of selected
    rows, then swaps them into Lightning's batch. Parameters only change between updates, so
    scoring lazily per micro-batch selects the same examples as NTNG's "score until 1536, then
    train 12 micro-batches"; rows left over after an update (scored with the previous parameters)
    go first into the next one, as in NTNG. The draws come from a generator seeded by
    (seed, candidate batch, rank): reproducible and resumable without saved RNG state.

    Choices and differences:

    * Scoring runs in the module's training mode under the training precision context; the recipes
      pretrain with dropout 0, where train and eval mode agree (the official code scores in eval mode).
    * The history is per rank under DDP (the reference notes call that fine for iid data).
    * ``variant: fixed_fraction`` is Composer's rule (exactly ``keep_fraction`` of each candidate
      batch, drawn by in-batch rank, no history); unlike Composer, selected rows refill the batch,
      so every update still trains ``batch_size`` examples. Composer's activity window and
      every-other-batch interrupt are not implemented.
    * No priming epoch (the official code trains the first epoch unselected; NTNG does not).
    * The history's length is given in updates' worth of losses: NTNG's 5,000 losses are 3.26
      batches of its 1,536, and ``history_updates`` keeps that ratio at every batch size (a fixed
      5,000 would outlast the tiny recipe's whole run at batch 16, where new losses rank low while
      the loss falls and about 25 % were kept instead of ≈ 50 %). ``history_size`` sets a count
      instead. While the loss still falls faster than the history turns over, fewer than
      ``1 / (beta + 1)`` are kept and each update scores more than the planner's stationary estimate.
    * ``train/loss`` is the loss of the selected (hard) examples, so it sits above a baseline's;
      compare runs on ``val/loss``.

    Args:
        beta: exponent of the keep probability ``p ** beta`` (NTNG: 1; tuned over 1, 2, 3).
        history_updates: the history's length in batches of this rank's candidates (NTNG: 5000 /
            1536 ≈ 3.26, its 5,000 losses at its batch size).
        history_size: a fixed number of losses instead (NTNG's count: 5000; official: 1024);
            None: ``history_updates`` batches.
        variant: ``history`` (NTNG, the paper) or ``fixed_fraction`` (Composer).
        keep_fraction: share kept per candidate batch with ``variant: fixed_fraction``.
        charge_scoring: charge scoring forwards to the budget; False is NTNG's "free" ablation.
        seed: seed of the candidate order and the keep draws; ``None`` uses the run's.
    """

    def __init__(
        self,
        beta: float = 1.0,
        history_updates: float = 5000 / 1536,
        history_size: int | None = None,
        variant: Literal["history", "fixed_fraction"] = "history",
        keep_fraction: float = 0.5,
        charge_scoring: bool = True,
        seed: int | None = None,
    ) -> None:
        super().__init__(charge_scoring, seed)
        if beta <= 0:
            raise ConfigurationError(f"SelectiveBackprop: beta must be > 0, got {beta}")
        if history_updates <= 0 or (history_size is not None and history_size < 1):
            raise ConfigurationError("SelectiveBackprop: history_updates must be > 0 and history_size >= 1, "
                                     f"got {history_updates} and {history_size}")
        if variant not in ("history", "fixed_fraction"):
            raise ConfigurationError(f"SelectiveBackprop: variant must be history or fixed_fraction, got {variant!r}")
        if not 0 < keep_fraction <= 1:
            raise ConfigurationError(f"SelectiveBackprop: keep_fraction must be in (0, 1], got {keep_fraction}")
        self.beta, self.history_updates, self.history_size = beta, history_updates, history_size
        self.variant, self.keep_fraction = variant, keep_fraction
        self._history_length = history_size or 0  # losses kept; from the batch size at setup
        self.history = torch.empty(0)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and self.history_size is None:
            batch = self.stream.batch_size * trainer.accumulate_grad_batches  # this rank's share of a batch
            self._history_length = max(1, round(self.history_updates * batch))
        if stage == "fit" and self.variant == "fixed_fraction" and int(self.keep_fraction * self.stream.batch_size) < 1:
            raise ConfigurationError(
                f"SelectiveBackprop: keep_fraction {self.keep_fraction} keeps no row of a {self.stream.batch_size}-row batch"
            )

    def fill(self, trainer: Trainer, pl_module: LightningModule, rows: int, micro_step: int) -> None:
        while len(self.buffer) < rows:
            candidates, _ = self.score(pl_module)
            losses = candidates["loss"]
            generator = step_generator(self.seed, self.batches_scored, trainer.global_rank)
            if self.variant == "fixed_fraction":
                kept = fixed_fraction_kept(losses, self.keep_fraction, generator)
            else:
                self.history = torch.cat([self.history.to(losses.device), losses])[-self._history_length :]
                kept = sample_kept(keep_probabilities(loss_percentiles(self.history, losses), self.beta), generator)
            self.select(candidates, kept)

    def expected_update_cost(self, settings: PlanSettings, progress: float, update: int = 0) -> UpdateCost:
        """The baseline update plus ``micro_batches / rate`` scoring forwards at full depth, rate =
        ``1 / (beta + 1)`` (or the fixed fraction, or ``settings.selection_rate``). NTNG's 24 h BERT
        budget: 50 % kept, so two forwards per trained micro-batch. The stationary rate
        overestimates while the loss falls faster than the history turns over."""
        if not self.charge_scoring:
            return baseline_update_cost(settings)
        rate = settings.selection_rate or expected_selection_rate(self.beta, self.variant, self.keep_fraction)
        if not 0 < rate <= 1:
            raise ConfigurationError(f"SelectiveBackprop: a selection rate must be in (0, 1], got {rate}")
        return baseline_update_cost(settings, extra_seconds=settings.micro_batches / rate * forward_seconds(settings))

    def rank_state(self) -> dict[str, Any]:
        return {**super().rank_state(), "history": self.history.cpu()}

    def load_rank_state(self, state: dict[str, Any]) -> None:
        super().load_rank_state(state)
        self.history = state["history"]
