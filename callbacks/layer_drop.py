"""Progressive Layer Dropping (Zhang & He 2020) as NTNG ran it: pure schedule/sampling math + a callback.

The module-level functions are the method (keep-ratio schedule, per-layer keep probabilities,
sampler, exact depth distribution); the callback applies them in training and prices an update with
them for ``ntng plan``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from app.accounting.planning import PlanSettings, UpdateCost, full_depth, trained_update_cost
from app.errors import ConfigurationError
from app.modules.budgeted import require_budgeted_module
from callbacks.sampling import common_depth, micro_step, run_seed, step_generator


def keep_ratio(progress: float, theta_bar: float, gamma_f: float) -> float:
    """Global keep ratio θ(t) = θ̄ + (1 − θ̄)·exp(−γ_f·t).

    Args:
        progress: budget progress t in [0, 1].
        theta_bar: the ratio θ decays to.
        gamma_f: decay rate per unit of budget (NTNG's ``gamma_factor``; γ = γ_f / budget).

    Returns:
        θ(t), 1 at t = 0.
    """
    return theta_bar + (1.0 - theta_bar) * math.exp(-gamma_f * progress)


def keep_probabilities(theta: float, num_layers: int, always_active: Sequence[int] = ()) -> list[float]:
    """Per-layer keep probabilities p_l = 1 − (l/L)(1 − θ), l = 1..L: lower layers are kept more often.

    Args:
        theta: global keep ratio θ.
        num_layers: depth L.
        always_active: indices kept with probability 1 (the family's, e.g. T5 block 0, which holds
            the relative position bias).

    Returns:
        ``L`` probabilities, index ``i`` for layer ``l = i + 1``.
    """
    probabilities = [1.0 - (layer / num_layers) * (1.0 - theta) for layer in range(1, num_layers + 1)]
    for index in always_active:
        probabilities[index] = 1.0
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
    * Layers the family needs in every pass (T5 block 0, which computes the relative position bias
      for all blocks; ``LayerAdapter.traits``) are kept with probability 1; the others keep the
      paper's p_l.
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

    leaves_layers_without_gradient: ClassVar[bool] = True
    # Strategy kind -> why it is refused (app.modules.strategies.check_strategy_support; docs/strategies.md).
    unsupported_strategies: ClassVar[dict[str, str]] = {
        "fsdp": "untested: it skips layers at random, while FSDP gathers and reduce-scatters each "
                "wrapped layer in its forward and backward; which layers run changes every micro-batch or step",
        "deepspeed": "ZeRO-3 cannot skip layers at random (its parameter prefetch follows the layer order; "
                     "transformers runs every layer under it instead), stages 1-2 are untested",
    }

    def __init__(
        self,
        theta_bar: float = 0.5,
        gamma_f: float = 100.0,
        resample: Literal["micro_batch", "step"] = "micro_batch",
        scale_outputs: bool = False,
        seed: int | None = None,
    ) -> None:
        where = "ProgressiveLayerDrop (trainer.callbacks init_args)"
        if not 0.0 < theta_bar <= 1.0:
            raise ConfigurationError(f"{where}: theta_bar must be in (0, 1], got {theta_bar:g}: it is the keep ratio "
                                     "the schedule decays to (1 drops nothing); set e.g. theta_bar: 0.5 (NTNG)")
        if gamma_f < 0.0:
            raise ConfigurationError(f"{where}: gamma_f must be >= 0, got {gamma_f:g} (how fast the keep ratio "
                                     "decays); set e.g. gamma_f: 100 (NTNG's BERT)")
        if resample not in ("micro_batch", "step"):
            raise ConfigurationError(f"{where}: resample must be 'micro_batch' or 'step', got {resample!r}")
        self.theta_bar, self.gamma_f, self.resample = theta_bar, gamma_f, resample
        self.scale_outputs, self.seed = scale_outputs, seed
        self._seed = 0
        self._num_layers = 0
        self._always_active: tuple[int, ...] = ()
        self._key: tuple[int, int] | None = None  # (step, micro-step) of the current draw
        self._theta = 1.0
        self._probabilities: list[float] = []
        self._kept: list[int] = []
        self._depths: list[int] = []  # active depth of each micro-batch of the current step

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        layers = require_budgeted_module(pl_module, "ProgressiveLayerDrop").layers
        self._num_layers = common_depth(layers, "ProgressiveLayerDrop")
        self._always_active = layers.traits.always_active
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
            self._probabilities = keep_probabilities(self._theta, self._num_layers, self._always_active)
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

    def expected_update_cost(self, settings: PlanSettings, progress: float, update: int = 0) -> UpdateCost:
        """Every micro-batch at the exact expected cost over its sampled depth (θ held for the update).

        Args:
            settings: the shared planning inputs.
            progress: budget progress at the start of the update.
            update: the update's index (the schedule needs only progress).

        Returns:
            The expected seconds, micro-batches and tokens of the update.
        """
        theta = keep_ratio(progress, self.theta_bar, self.gamma_f)
        probabilities = keep_probabilities(theta, full_depth(settings, "ProgressiveLayerDrop"), settings.always_active)
        return trained_update_cost(settings, dict(enumerate(depth_distribution(probabilities))))
