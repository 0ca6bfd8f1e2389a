"""ReferenceTimeBudget in real (tiny) Lightning fits: charging, stopping, LR end, cadence, resume."""

from __future__ import annotations

import math

import pytest
from lightning.pytorch import Callback

from app.errors import ConfigurationError
from app.modules.masked_lm import MaskedLanguageModel
from app.model.schedules import OneCycleTriangle
from callbacks.budget import ReferenceTimeBudget
from tests.conftest import fit_tiny, tiny_masked_lm, write_profile

SECONDS_PER_HOUR = 3600.0


class Recorder(Callback):
    """Records the LR of every optimizer step and counts validation runs."""

    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.validations = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.validations += 1


def tiny_module(lr_schedule=None) -> MaskedLanguageModel:
    return tiny_masked_lm(lr_schedule=lr_schedule)


def fit(tmp_path, budget: ReferenceTimeBudget, accumulate: int = 2, max_steps: int = -1, ckpt_path=None,
        module: MaskedLanguageModel | None = None):
    recorder = Recorder()
    module = module or tiny_module()
    trainer = fit_tiny(module, [budget, recorder], tmp_path, ckpt_path, max_steps=max_steps,
                       accumulate_grad_batches=accumulate)
    return trainer, module, recorder


@pytest.mark.parametrize("stop_rule, updates", [("after_crossing", 6), ("before_crossing", 5)])
def test_budget_stops_at_the_documented_step(tmp_path, stop_rule, updates):
    # 1 s per micro-batch of 4 x 16 tokens at full depth, 2 micro-batches per update: 2 s per update.
    profile = write_profile(tmp_path / "p.yaml", {1: 0.5, 2: 1.0})
    budget = ReferenceTimeBudget(budget=10.5 / SECONDS_PER_HOUR, profile=str(profile), stop_rule=stop_rule)
    trainer, module, _ = fit(tmp_path, budget)
    # after_crossing (NTNG): the update that crosses 10.5 s (the 6th, ending at 12 s) is taken.
    assert trainer.global_step == updates
    assert module.clock.rst_seconds == pytest.approx(2.0 * updates)
    # Every micro-batch charged exactly once as forward+backward; validation and sanity checks never.
    assert module.clock.passes == {"forward": 0, "forward_backward": 2 * updates}
    assert module.clock.tokens_trained == 2 * updates * 4 * 16


@pytest.mark.parametrize("fb_seconds", [{1: 0.5, 2: 1.0}, {1: 0.1, 2: 0.3}])
def test_lr_reaches_its_final_value_exactly_at_budget_end(tmp_path, fb_seconds):
    profile = write_profile(tmp_path / "p.yaml", fb_seconds)
    per_update = 2 * fb_seconds[2]
    budget_seconds = 12 * per_update  # exactly 12 updates
    budget = ReferenceTimeBudget(budget=budget_seconds / SECONDS_PER_HOUR, profile=str(profile))
    trainer, _, recorder = fit(tmp_path, budget, module=tiny_module(OneCycleTriangle()))
    assert trainer.global_step == 12
    assert recorder.lrs[-1] == 0.0  # fully decayed on the update that spends the budget
    assert recorder.lrs[5] == pytest.approx(1e-3)  # peak at half the budget (update 6 of 12)
    assert all(lr > 0 for lr in recorder.lrs[:-1])


def test_resumed_run_spends_the_same_and_stops_at_the_same_step(tmp_path):
    profile = write_profile(tmp_path / "p.yaml", {1: 0.5, 2: 1.0})
    make_budget = lambda: ReferenceTimeBudget(budget=19.0 / SECONDS_PER_HOUR, profile=str(profile))  # noqa: E731
    full, full_module, _ = fit(tmp_path / "full", make_budget())
    partial, _, _ = fit(tmp_path / "part", make_budget(), max_steps=4)
    checkpoint = tmp_path / "part.ckpt"
    partial.save_checkpoint(checkpoint)
    resumed, resumed_module, recorder = fit(tmp_path / "resumed", make_budget(), ckpt_path=checkpoint)
    assert resumed.global_step == full.global_step == 10
    assert resumed_module.clock.state_dict() == full_module.clock.state_dict()
    assert recorder.lrs[-1] == 0.0


def test_validation_and_checkpoints_follow_budget_fractions(tmp_path):
    profile = write_profile(tmp_path / "p.yaml", {1: 0.5, 2: 1.0})
    budget = ReferenceTimeBudget(
        budget=16.0 / SECONDS_PER_HOUR, profile=str(profile),
        validate_every_fraction=0.25, checkpoint_every_hours=8.0 / SECONDS_PER_HOUR,
    )
    trainer, _, recorder = fit(tmp_path, budget)
    assert trainer.global_step == 8
    assert recorder.validations == 4  # at 25, 50, 75 and 100 % (the stop's forced run is the 4th)
    saved = sorted(p.name for p in (tmp_path / "checkpoints").glob("rst-*.ckpt"))
    assert saved == ["rst-0.0022h.ckpt"]  # at 8 s; the one due at 16 s coincides with the stop


def test_profile_for_another_model_is_refused_before_training(tmp_path):
    profile = write_profile(tmp_path / "p.yaml", {1: 0.5, 2: 1.0}, layers={"encoder": 16})
    with pytest.raises(ConfigurationError, match="layers: profile"):
        fit(tmp_path, ReferenceTimeBudget(budget=1.0, profile=str(profile)))
    trainer, _, _ = fit(tmp_path, ReferenceTimeBudget(budget=4.0 / 3600, profile=str(profile),
                                                      allow_profile_mismatch=True))
    assert trainer.global_step == 2


@pytest.mark.parametrize("unit, amount, updates", [("steps", 7, 7), ("tokens", 640, 5)])
def test_other_budget_units(tmp_path, unit, amount, updates):
    trainer, module, recorder = fit(tmp_path, ReferenceTimeBudget(budget=amount, unit=unit))
    assert trainer.global_step == updates  # tokens: 128 per update, 640 = exactly 5 updates
    assert recorder.lrs[-1] == 0.0
    assert module.clock.flops > 0 and math.isfinite(module.clock.rst_seconds)


class SlowBatchStart(Callback):
    """Stands in for work a method does before the step (batch selection scores candidates there)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        import time

        time.sleep(0.05)


def test_wall_budget_counts_work_done_by_callbacks_before_it(tmp_path):
    # The slow callback runs *before* the budget's hooks; 0.25 s of wall budget at >= 0.05 s per
    # micro-batch and 2 micro-batches per update is spent within 3 updates.
    budget = ReferenceTimeBudget(budget=0.25 / SECONDS_PER_HOUR, unit="wall_hours")
    module = tiny_module()
    trainer = fit_tiny(module, [SlowBatchStart(), budget], tmp_path, accumulate_grad_batches=2, limit_val_batches=0)
    assert trainer.global_step <= 3
    assert module.clock.wall_seconds >= 0.1 * trainer.global_step
