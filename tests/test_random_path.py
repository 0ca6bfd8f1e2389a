"""RaPTr (callbacks.random_path): pure functions, tiny Lightning fits, rank/resume determinism, planner."""

from __future__ import annotations

import math
from collections import Counter
from types import SimpleNamespace

import pytest
from lightning.pytorch import Callback
from transformers import T5Config, T5ForConditionalGeneration

from app.accounting.cost_models import RSTProfile
from app.errors import ConfigurationError
from app.accounting.planning import PlanSettings
from app.commands.plan import profile_settings
from app.model.layers import LayerAdapter, family_traits
from app.modules.budgeted import BudgetedModule
from app.modules.masked_lm import MaskedLanguageModel
from callbacks.budget import ReferenceTimeBudget
from callbacks.random_path import (
    RandomPathTraining,
    check_schedule,
    default_path_lengths,
    keep_probability,
    output_scales,
    path_length_distribution,
    resolve_schedule,
    sample_path,
    stage_index,
)
from callbacks.sampling import step_generator
from tests.conftest import REPO_ROOT, fit_tiny, plan_hours, tiny_masked_lm, write_profile

FB_SECONDS = {d: 0.05 + 0.1 * d for d in range(1, 7)}  # per micro-batch of 4 x 16 tokens
RTX3090 = REPO_ROOT / "configs" / "rst" / "ntng-bert-rtx3090.yaml"



def six_layer_module(backbone: str = "roberta-prelayernorm") -> MaskedLanguageModel:
    return tiny_masked_lm(6, backbone=backbone)


def fake_trainer(step: int = 0, accumulate: int = 1) -> SimpleNamespace:
    return SimpleNamespace(global_step=step, accumulate_grad_batches=accumulate, world_size=1, strategy=None)


class AdapterModule(BudgetedModule):
    """A bare budgeted module around a layer adapter: what the callback uses of a module, with the
    budget progress set by the test and logging ignored."""

    def __init__(self, layers: LayerAdapter) -> None:
        super().__init__()
        self.layers = layers
        self.progress = 0.0

    def budget_progress(self) -> float:
        return self.progress

    def log(self, *args, **kwargs) -> None:
        pass


def prepared(callback: RandomPathTraining, layers: LayerAdapter) -> AdapterModule:
    """A budgeted module around ``layers`` after ``callback.setup``."""
    module = AdapterModule(layers)
    callback.setup(fake_trainer(), module, "fit")
    return module


def fixed_layers(fixed: list[int], num_layers: int, family: str | None) -> tuple[int, ...]:
    return resolve_schedule(None, None, fixed, num_layers, family_traits(family).always_active, "subset")[2]


# -- functional core --------------------------------------------------------------------------------


def test_default_path_lengths_scale_the_papers_schedule():
    assert default_path_lengths(12) == [6, 8, 10, 12]  # the paper's BERT-base 6-8-10-12
    assert default_path_lengths(16) == [8, 11, 13, 16]  # mean 12/16 = 9/12
    assert default_path_lengths(6) == [3, 4, 5, 6]
    assert default_path_lengths(4) == [2, 3, 4]  # repeats merge


def test_stage_lookup_at_fractions():
    equal = check_schedule([3, 4, 5, 6], None)
    assert equal == [0.0, 0.25, 0.5, 0.75]
    assert [stage_index(t, equal) for t in (0.0, 0.2499, 0.25, 0.5, 0.7499, 0.75, 1.0)] == [0, 0, 1, 2, 2, 3, 3]
    custom = check_schedule([4, 6], [0.0, 0.9])
    assert [stage_index(t, custom) for t in (0.0, 0.89, 0.9, 1.0)] == [0, 0, 1, 1]


def test_fixed_layers_resolve_negative_indices_and_t5_block_zero():
    assert fixed_layers([0, -1], 6, "roberta-prelayernorm") == (0, 5)
    assert fixed_layers([-2, 5, -1], 6, "bert") == (4, 5)
    assert fixed_layers([-1], 4, "t5") == (0, 3)  # block 0 holds T5's position bias
    assert fixed_layers([], 4, "t5") == (0,)
    with pytest.raises(ConfigurationError, match="out of range"):
        fixed_layers([-7], 6, "bert")


def test_subset_paths_have_exactly_the_stage_length_and_all_fixed_layers():
    fixed = fixed_layers([0, -1], 6, None)
    for length in (2, 3, 4, 5, 6):
        for step in range(50):
            path = sample_path(step_generator(0, step, 0), length, 6, fixed, "subset")
            assert len(path) == length and {0, 5} <= set(path) and path == sorted(set(path))


@pytest.mark.parametrize("sampling", ["subset", "bernoulli"])
def test_non_fixed_layers_are_included_uniformly_with_the_keep_probability(sampling):
    draws, fixed = 4000, (0, 5)
    p = keep_probability(3, 6, 2)
    assert p == 0.25
    counts, lengths = Counter(), []
    for step in range(draws):
        path = sample_path(step_generator(1, step, 0), 3, 6, fixed, sampling)
        counts.update(path)
        lengths.append(len(path))
    assert counts[0] == counts[5] == draws
    for layer in (1, 2, 3, 4):  # binomial sd of the frequency: sqrt(p(1-p)/4000) = 0.007
        assert counts[layer] / draws == pytest.approx(p, abs=0.03)
    assert sum(lengths) / draws == pytest.approx(3.0, abs=0.06)
    if sampling == "bernoulli":
        assert len(set(lengths)) > 1  # the length varies; its distribution is |I| + Binomial(L - |I|, p)
        expected = path_length_distribution(3, 6, 2, "bernoulli")
        assert sum(expected.values()) == pytest.approx(1.0)
        assert sum(n * q for n, q in expected.items()) == pytest.approx(3.0)
        assert Counter(lengths)[2] / draws == pytest.approx(expected[2], abs=0.03)


def test_scales_for_each_option():
    path, fixed = [0, 2, 3, 5], (0, 5)
    keep = keep_probability(4, 6, 2)  # 0.5
    assert output_scales(path, fixed, keep, "none") == {}
    assert output_scales(path, fixed, keep, "inverse_keep") == {2: 2.0, 3: 2.0}
    assert output_scales(path, fixed, keep, "inverse_sqrt_keep") == pytest.approx({2: math.sqrt(2), 3: math.sqrt(2)})
    assert output_scales(list(range(6)), fixed, keep_probability(6, 6, 2), "inverse_keep") == {}  # full depth
    assert output_scales([0, 5], fixed, keep_probability(2, 6, 2), "inverse_keep") == {}  # p = 0: fixed only


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"path_lengths": [4, 3, 6]}, "strictly increasing"),
        ({"path_lengths": [4, 4, 6]}, "strictly increasing"),
        ({"path_lengths": [0, 6]}, "positive"),
        ({"path_lengths": [3, 6], "stage_fractions": [0.1, 0.5]}, "starting at 0"),
        ({"path_lengths": [3, 6], "stage_fractions": [0.0, 1.0]}, r"\[0, 1\)"),
        ({"path_lengths": [3, 4, 6], "stage_fractions": [0.0, 0.5, 0.5]}, "strictly increasing"),
        ({"path_lengths": [3, 6], "stage_fractions": [0.0]}, "one per path length"),
        ({"sampling": "poisson"}, "sampling must be one of"),
        ({"resample": "epoch"}, "resample must be one of"),
        ({"scale": "linear"}, "scale must be one of"),
    ],
)
def test_bad_configurations_fail_at_construction(kwargs, message):
    with pytest.raises(ConfigurationError, match=message):
        RandomPathTraining(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"path_lengths": [3, 4, 5]}, "last stage must train the full model"),
        ({"path_lengths": [4, 8]}, "last stage must train the full model"),
        ({"path_lengths": [1, 6]}, "shorter than the 2 fixed layers"),
        ({"path_lengths": [2, 6], "fixed_layers": [0, 1, -1]}, "shorter than the 3 fixed layers"),
        ({"path_lengths": [3, 6], "fixed_layers": [7]}, "out of range"),
        ({"path_lengths": [3, 6], "fixed_layers": [], "sampling": "bernoulli"}, "empty path"),
    ],
)
def test_bad_configurations_for_the_model_fail_at_setup(kwargs, message):
    with pytest.raises(ConfigurationError, match=message):
        prepared(RandomPathTraining(**kwargs), six_layer_module().layers)


def test_scaling_is_refused_for_post_ln_bert_at_setup():
    layers = six_layer_module("bert").layers
    with pytest.raises(ConfigurationError, match="bert is Post-LN: use scale: none"):
        prepared(RandomPathTraining(), layers)
    prepared(RandomPathTraining(scale="none"), layers)  # fine without scaling


def test_t5_always_runs_block_zero_in_both_stacks():
    config = T5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=4, num_decoder_layers=4, num_heads=2,
                      dropout_rate=0.0, decoder_start_token_id=0)
    layers = LayerAdapter(T5ForConditionalGeneration(config))
    callback = RandomPathTraining(path_lengths=[2, 3, 4], fixed_layers=[-1])
    module = prepared(callback, layers)
    for step in range(20):
        callback.on_train_batch_start(fake_trainer(step), module, None, 0)
        path = layers.active_layers("encoder")
        assert len(path) == 2 and {0, 3} <= set(path) and layers.active_layers("decoder") == path
        assert layers.output_scales("decoder") == {}  # {0, 3} fixed and unscaled


# -- as a callback in tiny fits ---------------------------------------------------------------------


class PathRecorder(Callback):
    """Placed after RandomPathTraining: records what every micro-batch actually runs."""

    def __init__(self) -> None:
        self.records: list[tuple[int, int, tuple[int, ...], dict[int, float], float]] = []
        self.validation_scales: list[dict[int, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        layers = pl_module.layers
        self.records.append((trainer.global_step, batch_idx % trainer.accumulate_grad_batches,
                             tuple(layers.active_layers()), layers.output_scales(), pl_module.budget_progress()))

    def on_validation_start(self, trainer, pl_module):
        # Observe inside the loss computation, where the module runs the plain model.
        if not hasattr(pl_module, "_plain_mlm_loss"):
            pl_module._plain_mlm_loss = pl_module.loss

            def observed(batch):
                if trainer.validating:
                    self.validation_scales.append(pl_module.layers.output_scales())
                return pl_module._plain_mlm_loss(batch)

            pl_module.loss = observed


def fit(tmp_path, callback, budget_updates=20.0, max_steps=-1, ckpt_path=None, accumulate=2, validate_every=None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    profile = write_profile(tmp_path / "p.yaml", FB_SECONDS, layers={"encoder": 6})
    # budget_updates full-depth updates of accumulate micro-batches each.
    budget = ReferenceTimeBudget(budget=budget_updates * accumulate * FB_SECONDS[6] / 3600, profile=str(profile),
                                 validate_every_fraction=validate_every)
    recorder, module = PathRecorder(), six_layer_module()
    trainer = fit_tiny(module, [budget, callback, recorder], tmp_path, ckpt_path, max_steps=max_steps,
                       max_epochs=-1, accumulate_grad_batches=accumulate, enable_checkpointing=False)
    return trainer, module, recorder


def test_fit_charges_the_depths_it_runs_and_ends_at_full_depth(tmp_path):
    callback = RandomPathTraining(seed=3)
    trainer, module, recorder = fit(tmp_path, callback, validate_every=0.3)
    profile = RSTProfile.load(tmp_path / "p.yaml")
    depths = [len(path) for _, _, path, _, _ in recorder.records]
    assert module.clock.rst_seconds == pytest.approx(sum(profile.seconds("forward_backward", 64, {"encoder": n})
                                                         for n in depths))
    lengths, fractions = [3, 4, 5, 6], [0.0, 0.25, 0.5, 0.75]
    step_progress = {}
    for step, _, path, scales, progress in recorder.records:
        step_progress.setdefault(step, progress)  # the stage is read at the update's first micro-batch
        stage = stage_index(step_progress[step], fractions)
        assert len(path) == lengths[stage] and {0, 5} <= set(path)
        keep = keep_probability(lengths[stage], 6, 2)
        assert scales == ({i: 1 / keep for i in path if i not in (0, 5)} if keep < 1 else {})
    assert set(depths) == {3, 4, 5, 6}
    # One path per optimizer step (the default): both micro-batches of a step run the same layers.
    assert all(recorder.records[i][2] == recorder.records[i + 1][2] for i in range(0, len(recorder.records), 2))
    assert len(recorder.records[-1][2]) == 6  # the last stage trains the full model
    assert trainer.callback_metrics["method/stage"] == 3.0
    assert trainer.callback_metrics["method/active_layers"] == 6.0
    assert module.layers.all_active() and module.layers.output_scales() == {}
    assert len(recorder.validation_scales) >= 3 and all(s == {} for s in recorder.validation_scales)  # unscaled


def test_micro_batch_resampling_draws_a_path_per_micro_batch(tmp_path):
    _, _, recorder = fit(tmp_path, RandomPathTraining(seed=3, resample="micro_batch"), budget_updates=6.0)
    per_step: dict[int, set] = {}
    for step, _, path, _, _ in recorder.records:
        per_step.setdefault(step, set()).add(path)
    assert any(len(paths) > 1 for paths in per_step.values())


@pytest.mark.parametrize("resample", ["step", "micro_batch"])
def test_two_ranks_with_the_same_seed_choose_the_same_paths(resample):
    ranks = [RandomPathTraining(seed=11, resample=resample) for _ in range(2)]
    modules = [prepared(callback, six_layer_module().layers) for callback in ranks]
    other = RandomPathTraining(seed=12, resample=resample)
    other_module = prepared(other, six_layer_module().layers)
    chosen: list[list] = [[], [], []]
    for step in range(12):
        for micro in range(3):
            for index, (callback, module) in enumerate([*zip(ranks, modules), (other, other_module)]):
                module.progress = step / 12
                callback.on_train_batch_start(fake_trainer(step, accumulate=3), module, None, 3 * step + micro)
                chosen[index].append((module.layers.active_layers(), module.layers.output_scales()))
    assert chosen[0] == chosen[1]
    assert chosen[0] != chosen[2]  # the seed matters


def test_resumed_run_takes_the_same_paths(tmp_path):
    _, _, full = fit(tmp_path / "full", RandomPathTraining(seed=5), budget_updates=12.0)
    part, _, _ = fit(tmp_path / "part", RandomPathTraining(seed=5), budget_updates=12.0, max_steps=7)
    checkpoint = tmp_path / "part.ckpt"
    part.save_checkpoint(checkpoint)
    resumed_callback = RandomPathTraining(seed=5)
    _, _, again = fit(tmp_path / "resumed", resumed_callback, budget_updates=12.0, ckpt_path=checkpoint)
    tail = [record[:4] for record in full.records if record[0] >= 7]
    assert len({len(path) for _, _, path, _ in tail}) > 1  # the resumed part crosses a stage change
    assert [record[:4] for record in again.records] == tail
    assert resumed_callback.state_dict()["stage"] == 3


# -- planner ----------------------------------------------------------------------------------------


def rtx3090_settings() -> PlanSettings:
    return profile_settings(RSTProfile.load(RTX3090), 1536, 128, 128, "AdamW")


def raptr(**options) -> RandomPathTraining:
    return RandomPathTraining(**{"path_lengths": None, "stage_fractions": None, "fixed_layers": [0, -1],
                                 "sampling": "subset"} | options)


def test_planner_buys_more_updates_and_matches_a_direct_simulation():
    settings, hours = rtx3090_settings(), 1.0
    planned, baseline = plan_hours(raptr(), settings, hours), plan_hours(None, settings, hours)
    assert planned["updates"] > 1.25 * baseline["updates"]
    # Direct simulation: each update charges 12 micro-batches at the stage depth 8-11-13-16.
    table, spent, updates, budget = settings.profile.passes["forward_backward"].table, 0.0, 0, hours * 3600
    while spent < budget * (1 - 1e-9):
        spent += 12 * table[[8, 11, 13, 16][min(int(4 * spent / budget), 3)]]
        updates += 1
    assert planned["updates"] == updates and planned["rst_hours"] * 3600 == pytest.approx(spent)
    assert planned["tokens"] == updates * 1536 * 128


def test_bernoulli_planner_prices_the_expected_path_length():
    settings, method = rtx3090_settings(), raptr(sampling="bernoulli", path_lengths=[6, 8, 10, 12, 16])
    table, fixed = settings.profile.passes["forward_backward"].table, (0, 15)
    for progress, length in ((0.0, 6), (0.45, 10), (0.8, 16)):
        draws = [len(sample_path(step_generator(2, i, 0), length, 16, fixed, "bernoulli")) for i in range(3000)]
        simulated = 12 * sum(table[n] for n in draws) / len(draws)
        assert method.expected_update_cost(settings, progress).seconds == pytest.approx(simulated, rel=0.01)


def test_planner_options_on_the_command_line(capsys):
    from app.commands.plan import main

    main(["--profile", str(RTX3090), "--budget-hours", "1", "--batch-size", "1536", "--micro-batch-size", "128",
          "--method", "raptr", "--raptr.path_lengths", "[8,16]", "--raptr.stage_fractions", "[0,0.5]", "--format", "json"])
    short = capsys.readouterr().out
    main(["--profile", str(RTX3090), "--budget-hours", "1", "--batch-size", "1536", "--micro-batch-size", "128",
          "--method", "raptr", "--format", "json"])
    default = capsys.readouterr().out
    assert '"raptr"' in short and short != default
