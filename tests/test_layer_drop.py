"""ProgressiveLayerDrop: the schedule and sampling math, the callback in tiny fits, and its planner."""

from __future__ import annotations

import itertools
import json
import math
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.loggers import Logger

from app.accounting.clock import budget_spent
from app.accounting.cost_models import RSTProfile
from app.errors import ConfigurationError
from app.accounting.planning import PlanSettings
from app.commands.plan import main as plan_main
from app.commands.plan import profile_settings
from app.modules.masked_lm import MaskedLanguageModel
from callbacks.budget import ReferenceTimeBudget
from callbacks.layer_drop import (
    ProgressiveLayerDrop,
    depth_distribution,
    expected_depth,
    keep_probabilities,
    keep_ratio,
    sample_active_layers,
)
from callbacks.sampling import step_generator
from tests.conftest import REPO_ROOT, fit_tiny, plan_hours, tiny_masked_lm, write_profile

# Seconds per micro-batch (4 x 16 tokens = the profile's reference tokens) by active depth; not
# linear, so the total charge identifies the depths that ran.
FB_SECONDS = {1: 0.1, 2: 0.25, 3: 0.45, 4: 0.7}
BERT_PROFILE = REPO_ROOT / "configs" / "rst" / "ntng-bert-rtx3090.yaml"
T5_PROFILE = REPO_ROOT / "configs" / "rst" / "ntng-t5-a100.yaml"


# -- the functional core --------------------------------------------------------------------------


def test_keep_ratio_starts_at_one_and_decays_to_theta_bar():
    assert keep_ratio(0.0, 0.5, 100.0) == 1.0
    assert keep_ratio(1.0, 0.5, 100.0) == pytest.approx(0.5 + 0.5 * math.exp(-100.0))
    assert keep_ratio(0.05, 0.5, 20.0) == pytest.approx(0.5 + 0.5 * math.exp(-1.0))
    values = [keep_ratio(t / 10, 0.5, 20.0) for t in range(11)]
    assert values == sorted(values, reverse=True)


def test_keep_probabilities_follow_the_paper():
    assert keep_probabilities(0.5, 4) == pytest.approx([0.875, 0.75, 0.625, 0.5])
    assert keep_probabilities(1.0, 4) == [1.0] * 4
    assert keep_probabilities(0.5, 4, always_active=(0,)) == pytest.approx([1.0, 0.75, 0.625, 0.5])


@pytest.mark.parametrize("layers, theta", [(10, 0.5), (16, 0.5), (12, 0.3), (4, 0.9)])
def test_expected_depth_formula(layers, theta):
    probabilities = keep_probabilities(theta, layers)
    assert sum(probabilities) == pytest.approx(layers - (1 - theta) * (layers + 1) / 2)
    # With the "nothing kept => all layers" rule the mean gains L * P(nothing kept).
    assert expected_depth(probabilities) == pytest.approx(
        sum(probabilities) + layers * math.prod(1 - p for p in probabilities)
    )


def test_ntng_unit_test_value():
    assert sum(keep_probabilities(0.5, 10)) == pytest.approx(7.25)
    assert expected_depth(keep_probabilities(0.5, 10)) == pytest.approx(7.25, abs=1e-5)


@pytest.mark.parametrize("keep_first", [False, True])
def test_depth_distribution_is_exact(keep_first):
    probabilities = keep_probabilities(0.2, 4, (0,) if keep_first else ())
    # Brute force over all 2^4 keep masks, the empty mask running all layers.
    brute = [0.0] * 5
    for mask in itertools.product([0, 1], repeat=4):
        mass = math.prod(p if kept else 1 - p for p, kept in zip(probabilities, mask))
        brute[sum(mask) or 4] += mass
    distribution = depth_distribution(probabilities)
    assert distribution == pytest.approx(brute)
    assert sum(distribution) == pytest.approx(1.0)
    assert distribution[0] == 0.0
    assert sum(d * m for d, m in enumerate(distribution)) == pytest.approx(expected_depth(probabilities))


def test_sampler_matches_its_probabilities():
    probabilities = keep_probabilities(0.1, 4)  # P(nothing kept) = 7.4 %, so the fallback shows up
    draws = 8000
    kept_count, depth_count = [0] * 4, [0] * 5
    for step in range(draws):
        kept = sample_active_layers(probabilities, step_generator(7, step, 0))
        for index in kept:
            kept_count[index] += 1
        depth_count[len(kept)] += 1
    # The empty draw (where every layer was dropped) runs all layers, so layer i runs with p_i + P(empty).
    empty = math.prod(1 - p for p in probabilities)
    for index, p in enumerate(probabilities):
        seen = p + empty
        assert kept_count[index] / draws == pytest.approx(seen, abs=4 * math.sqrt(seen * (1 - seen) / draws))
    for depth, mass in enumerate(depth_distribution(probabilities)):
        assert depth_count[depth] / draws == pytest.approx(mass, abs=4 * math.sqrt(mass * (1 - mass) / draws) + 1e-12)
    mean_depth = sum(d * c for d, c in enumerate(depth_count)) / draws
    assert mean_depth == pytest.approx(expected_depth(probabilities), abs=0.05)


def test_t5_block_zero_is_never_dropped():
    probabilities = keep_probabilities(0.01, 4, always_active=(0,))
    draws = [sample_active_layers(probabilities, step_generator(0, step, 0)) for step in range(2000)]
    assert all(kept[0] == 0 for kept in draws)
    assert {len(kept) for kept in draws} >= {1, 2}  # the other blocks do get dropped


# -- the callback in tiny fits --------------------------------------------------------------------


class Recorder(Callback):
    """After the method's hook: records the active set, scales and keep ratio of every micro-batch."""

    def __init__(self, theta_bar: float, gamma_f: float) -> None:
        self.theta_bar, self.gamma_f = theta_bar, gamma_f
        self.draws: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.draws.append({
            "step": trainer.global_step,
            "micro": batch_idx % trainer.accumulate_grad_batches,
            "kept": pl_module.layers.active_layers(),
            "scales": pl_module.layers.output_scales(),
            "theta": keep_ratio(pl_module.budget_progress(), self.theta_bar, self.gamma_f),
        })

    def sets(self, from_step: int = 0) -> list[tuple[int, int, list[int]]]:
        return [(d["step"], d["micro"], d["kept"]) for d in self.draws if d["step"] >= from_step]


class MemoryLogger(Logger):
    """Keeps every logged row in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append((step, dict(metrics)))


class ProbedModule(MaskedLanguageModel):
    """Records the depth and scales every evaluation-mode loss is computed with (inside validation_step)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.eval_passes: list[tuple[int, dict]] = []

    def loss(self, batch):
        if not self.training:
            self.eval_passes.append((self.layers.active_depth()["encoder"], self.layers.output_scales()))
        return super().loss(batch)


def tiny_module(backbone: str = "roberta-prelayernorm") -> ProbedModule:
    return tiny_masked_lm(4, ProbedModule, backbone=backbone)


def fit(tmp_path, method: ProgressiveLayerDrop, budget_seconds: float = 12.0, accumulate: int = 2,
        max_steps: int = -1, ckpt_path=None, module: ProbedModule | None = None, logger=False,
        validate_every_fraction: float | None = None):
    module = module or tiny_module()
    tmp_path.mkdir(parents=True, exist_ok=True)
    profile = write_profile(tmp_path / "p.yaml", FB_SECONDS, layers={"encoder": 4},
                            family=module.model_signature()["family"])
    budget = ReferenceTimeBudget(budget=budget_seconds / 3600.0, profile=str(profile),
                                 validate_every_fraction=validate_every_fraction)
    recorder = Recorder(method.theta_bar, method.gamma_f)
    trainer = fit_tiny(module, [budget, method, recorder], tmp_path, ckpt_path, max_steps=max_steps,
                       accumulate_grad_batches=accumulate, logger=logger, log_every_n_steps=1,
                       enable_checkpointing=False)
    return trainer, module, recorder


def test_fit_charges_the_active_depth_logs_and_validates_the_full_model(tmp_path):
    logger = MemoryLogger()
    method = ProgressiveLayerDrop(theta_bar=0.3, gamma_f=20.0, seed=1)
    trainer, module, recorder = fit(tmp_path, method, logger=logger, validate_every_fraction=0.5)
    depths = [len(d["kept"]) for d in recorder.draws]
    assert len(set(depths)) >= 3  # layers were dropped, at various depths
    assert module.clock.rst_seconds == pytest.approx(sum(FB_SECONDS[d] for d in depths))
    assert module.clock.passes["forward_backward"] == len(depths) == 2 * trainer.global_step
    # micro_batch resampling: the two micro-batches of some step ran different sets.
    by_step = {}
    for step, _, kept in recorder.sets():
        by_step.setdefault(step, []).append(kept)
    assert any(a != b for a, b in by_step.values())
    # One row per optimizer step: the mean depth of its micro-batches and the step's keep ratio.
    logged = [m for _, m in logger.rows if "method/active_layers" in m]
    assert len(logged) == trainer.global_step
    for step, metrics in enumerate(logged):
        step_draws = [d for d in recorder.draws if d["step"] == step]
        assert metrics["method/active_layers"] == pytest.approx(sum(len(d["kept"]) for d in step_draws) / 2)
        assert metrics["method/keep_ratio"] == pytest.approx(step_draws[-1]["theta"])
    assert recorder.draws[0]["theta"] == 1.0 and recorder.draws[0]["kept"] == [0, 1, 2, 3]
    assert logged[-1]["method/keep_ratio"] < 0.45
    # Validation (mid-run and at the stop) ran every layer, unscaled, although training dropped some.
    assert len(module.eval_passes) >= 2
    assert all(passed == (4, {}) for passed in module.eval_passes)
    assert module.layers.all_active()


def test_output_scaling_uses_one_over_p_and_is_gone_for_validation(tmp_path):
    method = ProgressiveLayerDrop(theta_bar=0.3, gamma_f=20.0, scale_outputs=True, seed=1)
    _, module, recorder = fit(tmp_path, method, validate_every_fraction=0.5)
    for draw in recorder.draws:
        probabilities = keep_probabilities(draw["theta"], 4)
        expected = {i: 1 / probabilities[i] for i in draw["kept"] if probabilities[i] != 1.0}
        assert draw["scales"] == pytest.approx(expected)
    assert any(draw["scales"] for draw in recorder.draws)
    assert all(passed == (4, {}) for passed in module.eval_passes)
    assert module.layers.all_active() and module.layers.output_scales() == {}


def test_output_scaling_is_refused_for_post_ln_bert_at_setup(tmp_path):
    with pytest.raises(ConfigurationError, match="Post-LN"):
        fit(tmp_path, ProgressiveLayerDrop(scale_outputs=True), module=tiny_module("bert"))


def test_per_step_resampling_gives_every_micro_batch_of_a_step_the_same_set(tmp_path):
    method = ProgressiveLayerDrop(theta_bar=0.3, gamma_f=20.0, resample="step", seed=1)
    trainer, _, recorder = fit(tmp_path, method)
    by_step = {}
    for step, _, kept in recorder.sets():
        by_step.setdefault(step, []).append(kept)
    assert len(by_step) == trainer.global_step
    assert all(len(sets) == 2 and sets[0] == sets[1] for sets in by_step.values())
    assert len({tuple(sets[0]) for sets in by_step.values()}) > 1


def test_two_ranks_draw_the_same_sets():
    # Two "ranks": separate models and callbacks, different global RNG states, same seed.
    sets = []
    for rank in range(2):
        torch.manual_seed(100 + rank)
        module = tiny_module()
        module.budget_progress = lambda: progress
        trainer = SimpleNamespace(global_step=0, accumulate_grad_batches=3, world_size=1, strategy=None)
        method = ProgressiveLayerDrop(seed=5)
        method.setup(trainer, module, "fit")
        drawn = []
        for batch_idx in range(30):
            trainer.global_step, progress = batch_idx // 3, batch_idx / 60
            torch.rand(rank + 1)  # ranks consume the global RNG differently
            method.on_train_batch_start(trainer, module, None, batch_idx)
            drawn.append(module.layers.active_layers())
        sets.append(drawn)
    assert sets[0] == sets[1]
    assert len({tuple(s) for s in sets[0]}) > 1


def test_plain_ddp_is_refused_for_layer_drop_and_find_unused_parameters_is_accepted():
    from lightning.pytorch.strategies import DDPStrategy

    from app.modules.strategies import check_unused_parameter_support

    def trainer(strategy, world_size=2):
        return SimpleNamespace(callbacks=[ProgressiveLayerDrop()], world_size=world_size, strategy=strategy)

    with pytest.raises(ConfigurationError, match="ProgressiveLayerDrop.*ddp_find_unused_parameters_true"):
        check_unused_parameter_support(trainer(DDPStrategy()))
    check_unused_parameter_support(trainer(DDPStrategy(find_unused_parameters=True)))
    check_unused_parameter_support(trainer(DDPStrategy(), world_size=1))  # one process: no reducer to trip


@pytest.mark.parametrize("resample", ["micro_batch", "step"])
def test_resumed_run_makes_the_same_choices(tmp_path, resample):
    make = lambda: ProgressiveLayerDrop(theta_bar=0.3, gamma_f=20.0, resample=resample, seed=3)  # noqa: E731
    full, _, full_recorder = fit(tmp_path / "full", make())
    partial, _, partial_recorder = fit(tmp_path / "part", make(), max_steps=4)
    checkpoint = tmp_path / "part.ckpt"
    partial.save_checkpoint(checkpoint)
    resumed, _, resumed_recorder = fit(tmp_path / "resumed", make(), ckpt_path=checkpoint)
    assert resumed.global_step == full.global_step
    assert partial_recorder.sets() == full_recorder.sets()[: len(partial_recorder.sets())]
    assert resumed_recorder.sets() == full_recorder.sets(from_step=4)


# -- the planner ----------------------------------------------------------------------------------


def bert_settings() -> PlanSettings:
    return profile_settings(RSTProfile.load(BERT_PROFILE), 1536, 128, 128, "AdamW")


def test_planner_buys_more_updates_than_the_baseline():
    settings = bert_settings()
    baseline, dropped = plan_hours(None, settings, 1.0), plan_hours(ProgressiveLayerDrop(), settings, 1.0)
    assert dropped["updates"] > 1.25 * baseline["updates"]  # steady state: 11.75 of 16 layers
    assert dropped["tokens"] == dropped["updates"] * 1536 * 128
    # theta_bar = 1 drops nothing: exactly the baseline.
    assert plan_hours(ProgressiveLayerDrop(theta_bar=1.0), bert_settings(), 1.0) == baseline


def test_planner_agrees_with_simulated_runs():
    settings, budget_hours = bert_settings(), 0.1
    planned = plan_hours(ProgressiveLayerDrop(), settings, budget_hours)
    budget, profile, tokens = budget_hours * 3600.0, settings.profile, settings.micro_batch_tokens
    updates = []
    for seed in range(4):
        spent, step = 0.0, 0
        while not budget_spent(spent, budget):  # the planner's and the budget callback's stop rule
            for micro in range(settings.micro_batches):  # theta read per micro-batch, as the callback does
                probabilities = keep_probabilities(keep_ratio(spent / budget, 0.5, 100.0), 16)
                kept = sample_active_layers(probabilities, step_generator(seed, step, micro))
                spent += profile.seconds("forward_backward", tokens, {"encoder": len(kept)})
            step += 1
        updates.append(step)
    assert sum(updates) / len(updates) == pytest.approx(planned["updates"], rel=0.01)


def test_t5_planner_keeps_block_zero():
    profile = RSTProfile.load(T5_PROFILE)
    settings = profile_settings(profile, 144, 72, 512, "AdamWScale")
    cost = ProgressiveLayerDrop(gamma_f=20.0).expected_update_cost(settings, 1.0)
    theta = keep_ratio(1.0, 0.5, 20.0)

    def update_seconds(keep_first: bool) -> float:
        distribution = depth_distribution(keep_probabilities(theta, 12, (0,) if keep_first else ()))
        return 2 * sum(m * profile.seconds("forward_backward", 72 * 512, {"encoder": d, "decoder": d})
                       for d, m in enumerate(distribution) if m)

    assert cost.seconds == pytest.approx(update_seconds(keep_first=True))
    assert cost.seconds > update_seconds(keep_first=False)  # block 0 is priced as always kept


def test_plan_command_runs_the_layer_drop_planner(capsys):
    args = ["--profile", str(BERT_PROFILE), "--budget-hours", "0.5", "--batch-size", "1536",
            "--micro-batch-size", "128", "--method", "layer_drop", "--layer_drop.gamma_f", "20", "--format", "json"]
    plan_main(args)
    counts = json.loads(capsys.readouterr().out)["layer_drop"]
    expected = plan_hours(ProgressiveLayerDrop(gamma_f=20.0, theta_bar=0.5), bert_settings(), 0.5)
    assert counts["updates"] == expected["updates"]
    assert counts["micro_batches"] == expected["micro_batches"]


def test_bad_options_are_refused():
    with pytest.raises(ConfigurationError, match="theta_bar"):
        ProgressiveLayerDrop(theta_bar=0.0)
    with pytest.raises(ConfigurationError, match="resample"):
        ProgressiveLayerDrop(resample="epoch")
