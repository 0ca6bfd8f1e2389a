"""Progressive Layer Dropping (Zhang & He 2020) as NTNG ran it: pure schedule/sampling math + a callback.

The module-level functions are the method (keep-ratio schedule, per-layer keep probabilities,
sampler, exact depth distribution); the callback and the ``layer_drop`` planner both use them.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from app.errors import ConfigurationError
from app.accounting.planning import PlanSettings, UpdateCost, register_planner
from callbacks.sampling import common_depth, micro_step, require_unused_parameter_support, run_seed, step_generator

DEFAULT_THETA_BAR = 0.5
DEFAULT_GAMMA_F = 100.0  # NTNG BERT; NTNG T5 uses 20


def keep_ratio(progress: float, theta_bar: float = DEFAULT_THETA_BAR, gamma_f: float = DEFAULT_GAMMA_F) -> float:
    """Global keep ratio θ(t) = θ̄ + (1 − θ̄)·exp(−γ_f·t).

    Args:
        progress: budget progress t in [0, 1].
        theta_bar: the ratio θ decays to.
        gamma_f: decay rate per unit of budget (NTNG's ``gamma_factor``; γ = γ_f / budget).

    Returns:
        θ(t), 1 at t = 0.
    """
    return theta_bar + (1.0 - theta_bar) * math.exp(-gamma_f * progress)


def keep_probabilities(theta: float, num_layers: int, keep_first: bool = False) -> list[float]:
    """Per-layer keep probabilities p_l = 1 − (l/L)(1 − θ), l = 1..L: lower layers are kept more often.

    Args:
        theta: global keep ratio θ.
        num_layers: depth L.
        keep_first: keep index 0 with probability 1 (T5: block 0 holds the relative position bias).

    Returns:
        ``L`` probabilities, index ``i`` for layer ``l = i + 1``.
    """
    probabilities = [1.0 - (layer / num_layers) * (1.0 - theta) for layer in range(1, num_layers + 1)]
    if keep_first:
        probabilities[0] = 1.0
    return probabilities


def sample_active_layers(probabilities: Sequence[float], generator: torch.Generator) -> list[int]:
    """Independent Bernoulli draw per layer; an empty draw runs all layers (NTNG's rule).

    Args:
        probabilities: keep probability per layer index.
        generator: source of the draws (seeded by step, so ranks and resumed runs agree).

    Returns:
        Sorted indices of the layers to run, never empty.
    """
    draws = torch.rand(len(probabilities), generator=generator).tolist()
    # draws lie in [0, 1), so a probability of 1 always keeps its layer.
    kept = [index for index, (u, p) in enumerate(zip(draws, probabilities)) if u < p]
    return kept or list(range(len(probabilities)))


def depth_distribution(probabilities: Sequence[float]) -> list[float]:
    """Exact distribution of the active depth under :func:`sample_active_layers`.

    Poisson-binomial by dynamic programming over the layers; the mass of "nothing kept" moves to
    depth L, because the sampler then runs all layers.

    Args:
        probabilities: keep probability per layer index.

    Returns:
        ``P(depth = d)`` for ``d = 0..L`` (entry 0 is always 0).
    """
    distribution = [1.0]
    for p in probabilities:
        extended = [0.0] * (len(distribution) + 1)
        for kept, mass in enumerate(distribution):
            extended[kept] += mass * (1.0 - p)
            extended[kept + 1] += mass * p
        distribution = extended
    distribution[-1] += distribution[0]
    distribution[0] = 0.0
    return distribution


def expected_depth(probabilities: Sequence[float]) -> float:
    """Mean active depth under :func:`sample_active_layers` (Σ p_l plus the empty-draw correction)."""
    return sum(depth * mass for depth, mass in enumerate(depth_distribution(probabilities)))


def _pld_options(group: argparse.ArgumentParser) -> None:
    """Adds the ``ntng plan`` options of the ``layer_drop`` planner."""
    group.add_argument("--pld-theta-bar", type=float, default=DEFAULT_THETA_BAR,
                       help="keep ratio the schedule decays to (NTNG: 0.5)")
    group.add_argument("--pld-gamma-f", type=float, default=DEFAULT_GAMMA_F,
                       help="decay rate per budget (NTNG: 100 for BERT, 20 for T5)")


@register_planner("layer_drop", _pld_options)
def plan_layer_drop(settings: PlanSettings, progress: float) -> UpdateCost:
    """Expected cost of one update: every micro-batch at the exact expected cost over its sampled depth.

    Args:
        settings: the shared planner inputs; ``options`` may carry ``pld_theta_bar``/``pld_gamma_f``.
        progress: budget progress at the start of the update (θ is held for the whole update).

    Returns:
        The expected seconds, micro-batches and tokens of the update.
    """
    full = settings.full_depth()
    depths = set(full.values())
    if len(depths) != 1:
        raise ConfigurationError(f"layer_drop drops the same indices in every stack; profile depths differ: {full}")
    options = settings.options
    theta = keep_ratio(progress, getattr(options, "pld_theta_bar", DEFAULT_THETA_BAR),
                       getattr(options, "pld_gamma_f", DEFAULT_GAMMA_F))
    probabilities = keep_probabilities(theta, depths.pop(), keep_first=settings.profile.model.get("family") == "t5")
    tokens = settings.micro_batch_tokens
    distribution = depth_distribution(probabilities)
    per_micro = sum(mass * settings.profile.seconds("forward_backward", tokens, {stack: depth for stack in full})
                    for depth, mass in enumerate(distribution) if mass > 0.0)
    # The optimizer's cost is linear in the depth updated, so its expectation is its cost at the mean depth.
    mean_depth = sum(depth * mass for depth, mass in enumerate(distribution))
    optimizer = settings.profile.optimizer_seconds(settings.optimizer, {stack: mean_depth for stack in full})
    seconds = settings.micro_batches * per_micro + optimizer
    return UpdateCost(seconds, settings.micro_batches, settings.micro_batches * tokens)


class ProgressiveLayerDrop(Callback):
    """Progressive Layer Dropping (PLD): skip whole layers at random, more often higher up and later on.

    Paper: Zhang & He, "Accelerating Training of Transformer-Based Language Models with Progressive
    Layer Dropping", NeurIPS 2020, arXiv 2010.13369. Settings follow NTNG (Kaddour et al. 2023, §4.2 of
    our protocol notes), who found no gain over the baseline at equal reference time.

    What it does: before every training micro-batch (or once per optimizer step) it computes the keep
    ratio θ(t) = θ̄ + (1 − θ̄)·exp(−γ_f·t) from budget progress t (not steps, so the schedule is the
    same whatever a step costs), keeps layer l of L with p_l = 1 − (l/L)(1 − θ), and activates the
    kept layers in every stack (T5: the same indices in encoder and decoder). Dropped layers are
    identities and cost nothing: the module charges each pass at the depth it runs, so the reference
    clock follows the sampled depth without this callback touching it. Validation and export see
    all layers, unscaled.

    Choices where the sources differ or are silent:

    * Nothing kept: run all layers, as NTNG does (an empty index list means "all"); with scaling on
      they are scaled like any kept layer. Probability Π(1 − p_l): 2e-11 for 16 layers at θ = 0.5.
    * T5 block 0 is kept with probability 1 (it computes the relative position bias for all blocks);
      the other blocks keep the paper's p_l.
    * Scaling by 1/p_l (paper, DeepSpeed) is off by default, as in NTNG's non-checkpointed path. When
      on, gate and scale use the same p_l (avoiding DeepSpeedExamples' off-by-one); it needs Pre-LN
      layers (the adapter refuses Post-LN BERT, reported at setup).
    * θ for a micro-batch is read at its start, before it is charged; with ``resample="step"`` the
      step's first micro-batch fixes θ and the set for the whole step.
    * No state is checkpointed: draws come from a generator seeded by (seed, optimizer step,
      micro-step) and θ from the module's clock, which the module restores, so a resumed run makes
      the same choices, and every DDP rank makes the same choice without communication.

    Logs at every optimizer step ``method/active_layers`` (mean active depth over the step's
    micro-batches) and ``method/keep_ratio`` (θ of the step's last draw).

    Args:
        theta_bar: keep ratio θ̄ the schedule decays to, in (0, 1] (NTNG: 0.5).
        gamma_f: decay rate per whole budget; θ − θ̄ falls to 1 % of its start after 4.6/γ_f of
            the budget (NTNG: 100 for BERT, 20 for T5).
        resample: ``micro_batch`` draws a new set for every micro-batch (NTNG BERT); ``step`` draws
            once per optimizer step for all its micro-batches (NTNG T5).
        scale_outputs: scale each kept layer's residual by 1/p_l (paper); off in NTNG.
        seed: seed of the draws; None uses the run's ``seed_everything`` seed.
    """

    def __init__(
        self,
        theta_bar: float = DEFAULT_THETA_BAR,
        gamma_f: float = DEFAULT_GAMMA_F,
        resample: Literal["micro_batch", "step"] = "micro_batch",
        scale_outputs: bool = False,
        seed: int | None = None,
    ) -> None:
        if not 0.0 < theta_bar <= 1.0:
            raise ConfigurationError(f"theta_bar must be in (0, 1], got {theta_bar}")
        if gamma_f < 0.0:
            raise ConfigurationError(f"gamma_f must be >= 0, got {gamma_f}")
        if resample not in ("micro_batch", "step"):
            raise ConfigurationError(f"resample must be 'micro_batch' or 'step', got {resample!r}")
        self.theta_bar, self.gamma_f, self.resample = theta_bar, gamma_f, resample
        self.scale_outputs, self.seed = scale_outputs, seed
        self._seed = 0
        self._num_layers = 0
        self._keep_first = False
        self._key: tuple[int, int] | None = None  # (step, micro-step) of the current draw
        self._theta = 1.0
        self._probabilities: list[float] = []
        self._kept: list[int] = []
        self._depths: list[int] = []  # active depth of each micro-batch of the current step

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        require_unused_parameter_support(trainer, "ProgressiveLayerDrop")
        layers = pl_module.layers
        self._num_layers = common_depth(layers, "ProgressiveLayerDrop")
        self._keep_first = layers.family == "t5"
        self._seed = run_seed(self.seed)
        if self.scale_outputs:
            # Ask the adapter, which knows which layer types have a scalable residual branch.
            try:
                layers.set_output_scales({0: 2.0})
            except ValueError as err:
                raise ConfigurationError(f"ProgressiveLayerDrop(scale_outputs=True): {err}") from err
            finally:
                layers.set_output_scales(None)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        micro = micro_step(trainer, batch_idx)
        if micro == 0:
            self._depths.clear()
        key = (trainer.global_step, 0 if self.resample == "step" else micro)
        if key != self._key:
            self._theta = keep_ratio(pl_module.budget_progress(), self.theta_bar, self.gamma_f)
            self._probabilities = keep_probabilities(self._theta, self._num_layers, self._keep_first)
            self._kept = sample_active_layers(self._probabilities, step_generator(self._seed, *key))
            self._key = key
        # Applied at every micro-batch: validation or another callback may have changed the set since.
        pl_module.layers.set_active_layers(self._kept)
        if self.scale_outputs:
            pl_module.layers.set_output_scales({i: 1.0 / self._probabilities[i] for i in self._kept})
        self._depths.append(len(self._kept))

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        pl_module.log("method/active_layers", sum(self._depths) / len(self._depths))
        pl_module.log("method/keep_ratio", self._theta)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Validation already runs the plain model (the module switches layers and scales off inside
        # its step); after training, leave the model plain for whatever runs next.
        pl_module.layers.set_active_layers(None)
        if self.scale_outputs:
            pl_module.layers.set_output_scales(None)
