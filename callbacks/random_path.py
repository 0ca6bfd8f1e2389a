"""RaPTr: train a random path of layers whose length grows in stages. Pure functions hold the math
(shared by the callback, the tests and ``ntng plan``); ``RandomPathTraining`` applies it."""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from typing import Any, ClassVar, Literal, get_args

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from app.accounting.planning import PlanSettings, UpdateCost, full_depth, trained_update_cost
from app.errors import ConfigurationError
from app.modules.budgeted import require_budgeted_module
from callbacks.sampling import common_depth, micro_step, run_seed, step_generator

Sampling = Literal["subset", "bernoulli"]
Resample = Literal["step", "micro_batch"]
Scale = Literal["none", "inverse_keep", "inverse_sqrt_keep"]
_CHOICES = {"sampling": get_args(Sampling), "resample": get_args(Resample), "scale": get_args(Scale)}


def default_path_lengths(num_layers: int) -> list[int]:
    """The paper's BERT-base 6-8-10-12 as fractions L/2, 2L/3, 5L/6, L of ``num_layers``, rounded half up.

    Returns:
        Strictly increasing lengths (repeats merge in shallow models); 8-11-13-16 for 16 layers, whose
        mean 12/16 keeps the paper's 0.75 of full depth under equal stages.
    """
    lengths = {(2 * num_layers * n + d) // (2 * d) for n, d in ((1, 2), (2, 3), (5, 6))}
    return sorted(lengths | {num_layers})


def check_schedule(path_lengths: Sequence[int], stage_fractions: Sequence[float] | None) -> list[float]:
    """Checks the depth-independent parts of a schedule (ConfigurationError if bad).

    Args:
        path_lengths: path length per stage: positive, strictly increasing.
        stage_fractions: budget fraction at which each stage starts (one per stage, first 0, strictly
            increasing in [0, 1)), or None for equal stages.

    Returns:
        The stage start fractions.
    """
    lengths = list(path_lengths)
    if not lengths or lengths[0] < 1 or any(b <= a for a, b in zip(lengths, lengths[1:])):
        raise ConfigurationError(f"RaPTr path_lengths must be positive and strictly increasing, got {lengths}")
    if stage_fractions is None:
        return [s / len(lengths) for s in range(len(lengths))]
    fractions = [float(f) for f in stage_fractions]
    if (len(fractions) != len(lengths) or fractions[0] != 0.0 or fractions[-1] >= 1.0
            or any(b <= a for a, b in zip(fractions, fractions[1:]))):
        raise ConfigurationError(f"RaPTr stage_fractions must be {len(lengths)} strictly increasing budget fractions "
                                 f"in [0, 1) starting at 0 (one per path length), got {fractions}")
    return fractions


def resolve_schedule(path_lengths: Sequence[int] | None, stage_fractions: Sequence[float] | None,
                     fixed_layers: Sequence[int], num_layers: int, always_active: Sequence[int],
                     sampling: Sampling) -> tuple[list[int], list[float], tuple[int, ...]]:
    """Completes and checks a schedule for a ``num_layers``-deep model (used by setup and the planner).

    Args:
        path_lengths: per stage (last = full depth, none shorter than I), or None for the default.
        stage_fractions: stage starts, or None for equal stages (see ``check_schedule``).
        fixed_layers: layers always in the path; negative indices count from the top.
        num_layers: full depth L.
        always_active: layers the family needs in every pass, added to the fixed layers (T5 block 0,
            which holds the relative position bias; ``LayerAdapter.traits``).
        sampling: ``subset`` or ``bernoulli`` (needs a fixed layer, or it could draw an empty path).

    Returns:
        ``(path lengths, stage start fractions, sorted distinct fixed layers I)``; ConfigurationError if bad.
    """
    lengths = list(path_lengths or default_path_lengths(num_layers))
    fractions = check_schedule(lengths, stage_fractions)
    if bad := [i for i in fixed_layers if not -num_layers <= i < num_layers]:
        raise ConfigurationError(f"RaPTr fixed_layers {bad} are out of range for {num_layers} layers; give layer "
                                 f"indices in [-{num_layers}, {num_layers - 1}]")
    fixed = tuple(sorted({i % num_layers for i in fixed_layers} | set(always_active)))
    if lengths[-1] != num_layers:
        raise ConfigurationError(f"RaPTr's last stage must train the full model: path_lengths {lengths} must end "
                                 f"at the model's depth {num_layers}; set trainer.callbacks.path_lengths to "
                                 f"increasing lengths ending at {num_layers}, or null to derive them from the model")
    if lengths[0] < len(fixed):
        raise ConfigurationError(f"RaPTr path_lengths {lengths} are shorter than the {len(fixed)} fixed layers "
                                 f"{list(fixed)}; lengthen the first path or fix fewer layers (fixed_layers)")
    if sampling == "bernoulli" and not fixed:
        raise ConfigurationError("RaPTr bernoulli sampling needs a fixed layer: it could draw an empty path")
    return lengths, fractions, fixed


def stage_index(progress: float, fractions: Sequence[float]) -> int:
    """Returns the stage running at budget ``progress`` (stage s starts at ``fractions[s]``)."""
    return bisect.bisect_right(fractions, progress) - 1


def keep_probability(path_length: int, num_layers: int, num_fixed: int) -> float:
    """Probability p = (ℓ − |I|) / (L − |I|) that a non-fixed layer is in a path of length ℓ."""
    free = num_layers - num_fixed
    return 1.0 if free == 0 else (path_length - num_fixed) / free


def sample_path(generator: torch.Generator, path_length: int, num_layers: int, fixed: Sequence[int],
                sampling: Sampling) -> list[int]:
    """Draws one path: the fixed layers I plus random others.

    Args:
        generator: source of randomness (``step_generator``: rank- and resume-stable).
        path_length: the stage's ℓ_s; num_layers: full depth L; fixed: the resolved fixed layers I.
        sampling: ``subset`` (ℓ_s − |I| others uniformly without replacement: exactly ℓ_s layers) or
            ``bernoulli`` (each other layer independently with ``keep_probability``).

    Returns:
        Sorted layer indices.
    """
    free = torch.tensor([i for i in range(num_layers) if i not in fixed], dtype=torch.long)
    if sampling == "subset":
        chosen = free[torch.randperm(len(free), generator=generator)[: path_length - len(fixed)]]
    else:
        keep = keep_probability(path_length, num_layers, len(fixed))
        chosen = free[torch.rand(len(free), generator=generator) < keep]
    return sorted([*fixed, *chosen.tolist()])


def output_scales(path: Sequence[int], fixed: Sequence[int], keep: float, scale: Scale) -> dict[int, float]:
    """Residual scale 1/p (``inverse_keep``) or 1/sqrt(p) of each sampled non-fixed layer.

    Args:
        path: the sampled layers; fixed: the fixed layers (never scaled).
        keep: keep probability p of a non-fixed layer (1 at full depth: nothing is scaled).
        scale: ``none``, ``inverse_keep`` or ``inverse_sqrt_keep``.

    Returns:
        ``{layer: scale}`` for ``LayerAdapter.set_output_scales``.
    """
    if scale == "none" or not 0.0 < keep < 1.0:
        return {}
    value = 1.0 / keep if scale == "inverse_keep" else 1.0 / math.sqrt(keep)
    return {i: value for i in path if i not in fixed}


def path_length_distribution(path_length: int, num_layers: int, num_fixed: int, sampling: Sampling) -> dict[int, float]:
    """Distribution ``{depth: probability}`` of the active layers in a stage of length ``path_length``:
    exactly ℓ for ``subset``, |I| + Binomial(L − |I|, p) for ``bernoulli``."""
    if sampling == "subset":
        return {path_length: 1.0}
    free, p = num_layers - num_fixed, keep_probability(path_length, num_layers, num_fixed)
    return {num_fixed + k: math.comb(free, k) * p**k * (1.0 - p) ** (free - k) for k in range(free + 1)}


class RandomPathTraining(Callback):
    """RaPTr (Panigrahi et al. 2024, "Efficient Stagewise Pretraining via Progressive Subnetworks",
    arXiv 2402.05913, ICLR 2025): each update trains a random path of layers, the fixed layers I (paper:
    first and last) plus random others; skipped layers pass their input through and get no gradient.
    The path length grows in stages as budget progress passes ``stage_fractions``, and the last stage
    trains the full model. Stage changes touch nothing else (no weight copies; the LR schedule runs on).
    Validation and export see the full model, unscaled. Paths come from ``step_generator(seed, step,
    micro_step)``, so all DDP ranks and a resumed run make the same choices.

    Our notes on the paper are second-hand (abstract and OpenReview reviews, no Algorithm 1), so:
    * ``subset`` sampling (exactly ℓ_s layers, so every step costs exactly its stage's depth) is our
      default; the v2 text reportedly keeps each layer with an independent Bernoulli p ("6-8-10-12"
      being expected lengths): ``bernoulli``.
    * Reviewers say the paper rescales sampled layers' outputs and that it helps; the rule is not in our
      notes. Our default ``inverse_keep`` (our choice, not a confirmed paper formula) scales each sampled
      non-fixed layer's residual by 1/p, p = (ℓ_s − |I|)/(L − |I|): the expected sum of residual branches
      then equals the full model's at every stage, so stage transitions and full-depth evaluation see the
      same expected residual-stream magnitude (the stability the paper's theory is about). p = 1 in the
      last stage, which is plain training. Post-LN BERT cannot be scaled: use ``scale: none``.
    * Layers the family needs in every pass are always fixed (T5 block 0 computes the relative
      position bias every later block reuses); encoder and decoder run the same indices.
    * The stage is read once per update, from the budget progress before it (as the planner does).

    Args:
        path_lengths: path length per stage, strictly increasing, ending at the model's depth; None:
            L/2, 2L/3, 5L/6, L rounded half up (6-8-10-12 for 12 layers, 8-11-13-16 for 16).
        stage_fractions: budget fraction at which each stage starts (first 0); None: equal stages (paper).
        fixed_layers: layers always in the path, negative indices counting from the top; None: [0, -1].
        sampling: ``subset`` (default) or ``bernoulli``.
        resample: a path per optimizer ``step`` (default) or per ``micro_batch``.
        scale: ``inverse_keep`` (default), ``inverse_sqrt_keep`` or ``none``.
        seed: seed of the path stream; None: the run's ``seed_everything`` seed. A resumed run keeps
            the checkpoint's.
    """

    leaves_layers_without_gradient: ClassVar[bool] = True
    # Strategy kind -> why it is refused (app.modules.strategies.check_strategy_support; docs/strategies.md).
    unsupported_strategies: ClassVar[dict[str, str]] = {
        "fsdp": "untested: it trains a random path of layers, while FSDP gathers and reduce-scatters each "
                "wrapped layer in its forward and backward; which layers run changes every step",
        "deepspeed": "ZeRO-3 cannot skip layers at random (its parameter prefetch follows the layer order; "
                     "transformers runs every layer under it instead), stages 1-2 are untested",
    }

    def __init__(self, path_lengths: list[int] | None = None, stage_fractions: list[float] | None = None,
                 fixed_layers: list[int] | None = None, sampling: Sampling = "subset", resample: Resample = "step",
                 scale: Scale = "inverse_keep", seed: int | None = None) -> None:
        for name, value in (("sampling", sampling), ("resample", resample), ("scale", scale)):
            if value not in _CHOICES[name]:
                raise ConfigurationError(f"RaPTr {name} must be one of {_CHOICES[name]}, got {value!r}")
        if path_lengths is not None:
            check_schedule(path_lengths, stage_fractions)  # the depth is only known in setup
        self.path_lengths, self.stage_fractions = path_lengths, stage_fractions
        self.fixed_layers = [0, -1] if fixed_layers is None else list(fixed_layers)
        self.sampling, self.resample, self.scale, self.seed = sampling, resample, scale, seed
        self._seed: int | None = None
        self._stage: int | None = None  # stage of the current update
        self._depths: list[int] = []  # active depth of each micro-batch of the current update

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        layers = require_budgeted_module(pl_module, "RandomPathTraining").layers
        self._num_layers = common_depth(layers, "RaPTr")
        self._lengths, self._fractions, self._fixed = resolve_schedule(
            self.path_lengths, self.stage_fractions, self.fixed_layers, self._num_layers,
            layers.traits.always_active, self.sampling)
        if self.scale != "none" and not layers.traits.exact_residual_scaling:
            raise ConfigurationError(f"RaPTr scale={self.scale!r} needs a Pre-LN model; {layers.family} is Post-LN: "
                                     "use scale: none with it (or a Pre-LN backbone: roberta-prelayernorm, modernbert)")
        self._seed = run_seed(self.seed)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        micro = micro_step(trainer, batch_idx)
        if micro == 0 or self._stage is None:
            progress = pl_module.budget_progress()
            stage = stage_index(progress, self._fractions)
            if stage != self._stage:
                rank_zero_info(f"RaPTr: stage {stage}, path length {self._lengths[stage]} of {self._num_layers}, "
                               f"at budget progress {progress:.4f}")
            self._stage, self._depths = stage, []
        length = self._lengths[self._stage]
        # Per-step resampling draws micro-step 0 for every micro-batch: the same path, no stored state.
        generator = step_generator(self._seed, trainer.global_step, 0 if self.resample == "step" else micro)
        path = sample_path(generator, length, self._num_layers, self._fixed, self.sampling)
        pl_module.layers.set_active_layers(path)
        keep = keep_probability(length, self._num_layers, len(self._fixed))
        pl_module.layers.set_output_scales(output_scales(path, self._fixed, keep, self.scale))
        self._depths.append(len(path))

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # logged once per optimizer step
        pl_module.log_update("method/stage", float(self._stage))
        pl_module.log_update("method/active_layers", sum(self._depths) / len(self._depths))

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pl_module.layers.set_active_layers(None)
        pl_module.layers.set_output_scales(None)

    def expected_update_cost(self, settings: PlanSettings, progress: float, update: int = 0) -> UpdateCost:
        """The update's micro-batches at the stage's path-length distribution (exactly ℓ_s for subset
        sampling), the stage read from the progress before the update as in training."""
        num_layers = full_depth(settings, "RaPTr")
        lengths, fractions, fixed = resolve_schedule(self.path_lengths, self.stage_fractions, self.fixed_layers,
                                                     num_layers, settings.always_active, self.sampling)
        length = lengths[stage_index(progress, fractions)]
        return trained_update_cost(settings, path_length_distribution(length, num_layers, len(fixed), self.sampling))

    def state_dict(self) -> dict[str, Any]:
        # Paths are a pure function of (seed, step, micro-step) and the stage one of budget progress (the
        # module checkpoints its clock), so no RNG state is saved. The seed is kept so a resume without
        # seed_everything continues the same stream; the stage so a resume announces no false change.
        return {"stage": self._stage, "seed": self._seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._stage = state_dict["stage"]
        if state_dict["seed"] is not None:
            self._seed = state_dict["seed"]
