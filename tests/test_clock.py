"""Cost models, the reference clock and the planner (pure functions, no training)."""

from __future__ import annotations

import math

import pytest

from app.accounting.clock import Budget, ReferenceClock, budget_spent
from app.accounting.cost_models import AnalyticFlops, RSTProfile, fit_linear
from app.errors import ConfigurationError
from app.commands.plan import main as plan_main
from app.commands.plan import profile_settings
from tests.conftest import REPO_ROOT, plan_hours, write_profile

PROFILES = REPO_ROOT / "configs" / "rst"


def test_shipped_ntng_profiles_hold_the_published_numbers():
    corrected = RSTProfile.load(PROFILES / "ntng-bert-rtx3090.yaml")
    published = RSTProfile.load(PROFILES / "ntng-bert-rtx3090-as-published.yaml")
    t5 = RSTProfile.load(PROFILES / "ntng-t5-a100.yaml")
    micro_batch = 128 * 128
    assert corrected.seconds("forward_backward", micro_batch, {"encoder": 16}) == pytest.approx(0.2253)
    assert corrected.seconds("forward_backward", micro_batch, {"encoder": 7}) == pytest.approx(0.1052)
    assert published.seconds("forward_backward", micro_batch, {"encoder": 7}) == pytest.approx(0.01052)
    # NTNG's forward-only charge does not depend on depth; the corrected profile scales it.
    assert published.seconds("forward", micro_batch, {"encoder": 4}) == pytest.approx(0.09285)
    assert corrected.seconds("forward", micro_batch, {"encoder": 16}) == pytest.approx(0.09285)
    assert corrected.seconds("forward", micro_batch, {"encoder": 4}) < 0.09285 / 2
    # T5: per step of 144 x 512 tokens; a 72-sequence micro-batch is half of it.
    assert t5.seconds("forward_backward", 72 * 512, {"encoder": 12, "decoder": 12}) == pytest.approx(1.031 / 2)
    assert t5.seconds("forward_backward", 144 * 512, {"encoder": 3, "decoder": 3}) == pytest.approx(0.291)
    assert t5.optimizer_seconds("SophiaG") == pytest.approx(1.156 - 1.031)
    fixed, slope, worst = fit_linear(corrected.passes["forward_backward"].table)
    assert (fixed, slope) == pytest.approx((0.01172, 0.01336), abs=5e-5) and worst < 0.01


def test_profile_linear_fit_prices_depths_missing_from_the_table(tmp_path):
    profile = RSTProfile.load(write_profile(tmp_path / "p.yaml", {2: 1.0}))
    assert profile.seconds("forward_backward", 64, {"encoder": 1}) == pytest.approx(0.5)  # fit: 0 + 0.5 / layer
    assert profile.seconds("forward_backward", 128, {"encoder": 2}) == pytest.approx(2.0)  # linear in tokens


def test_profile_signature_mismatch_names_the_difference(tmp_path):
    profile = RSTProfile.load(write_profile(tmp_path / "p.yaml", {2: 1.0}, hidden=64))
    run = {"family": "roberta-prelayernorm", "layers": {"encoder": 2}, "hidden": 32, "heads": 2,
           "ffn": 64, "vocab": 100, "seq_len": 16}
    with pytest.raises(ConfigurationError, match="hidden: profile 64 vs run 32"):
        profile.check_signature(run)
    assert profile.check_signature(run, allow_mismatch=True) == ["hidden: profile 64 vs run 32"]


def test_malformed_and_missing_profiles_are_clear_errors(tmp_path):
    with pytest.raises(ConfigurationError, match="not found"):
        RSTProfile.load(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("name: x\npasses: {}\n")
    with pytest.raises(ConfigurationError, match="malformed RST profile"):
        RSTProfile.load(tmp_path / "bad.yaml")


def test_profile_yaml_round_trip(tmp_path):
    profile = RSTProfile.load(PROFILES / "ntng-t5-a100.yaml")
    (tmp_path / "copy.yaml").write_text(profile.to_yaml())
    again = RSTProfile.load(tmp_path / "copy.yaml")
    assert again.passes["forward_backward"].table == profile.passes["forward_backward"].table
    assert again.model == profile.model and again.optimizer_step_seconds == profile.optimizer_step_seconds


def test_analytic_flops_model():
    flops = AnalyticFlops({"encoder": 1000}, fixed_params=500, flops_per_second=1e6)
    assert flops.flops("forward", 10, {"encoder": 2}) == 2 * 2500 * 10
    assert flops.seconds("forward_backward", 10, {"encoder": 2}) == pytest.approx(6 * 2500 * 10 / 1e6)


def test_clock_accounts_every_unit_and_resumes_exactly():
    flops = AnalyticFlops({"encoder": 10}, 0, 1.0)
    clock = ReferenceClock(flops, flops, Budget(1000.0, "flops"))
    clock.charge("forward_backward", 4, {"encoder": 2})  # 6 * 20 * 4 = 480 FLOPs = 480 s
    clock.charge("forward", 4, {"encoder": 2})  # 160
    clock.charge_optimizer_step("AdamW")
    assert (clock.tokens_trained, clock.tokens_scored, clock.optimizer_steps) == (4, 4, 1)
    assert clock.passes == {"forward": 1, "forward_backward": 1}
    assert clock.rst_seconds == clock.flops == 640 and clock.progress == pytest.approx(0.64)
    assert not clock.exhausted
    clone = ReferenceClock(flops, flops, Budget(1000.0, "flops"))
    clone.load_state_dict(clock.state_dict())
    assert clone.state_dict() == clock.state_dict()
    clock.charge("forward_backward", 4, {"encoder": 2})
    assert clock.exhausted and clock.progress == 1.0
    with pytest.raises(ValueError, match="budget unit"):
        Budget(1.0, "days")


def simulate_training(profile: RSTProfile, budget_hours: float, batch: int, micro: int, seq_len: int,
                      stop_rule: str = "after_crossing") -> dict:
    """The training loop's accounting, independently of the planner: a clock charged per micro-batch."""
    clock = ReferenceClock(profile, AnalyticFlops({"encoder": 1}, 0, 1.0), Budget(budget_hours))
    depth = {"encoder": profile.model["layers"]["encoder"]}
    micro_batches, last_cost = 0, 0.0
    while True:
        before = clock.spent()
        for _ in range(batch // micro):
            clock.charge("forward_backward", micro * seq_len, depth)
            micro_batches += 1
        clock.charge_optimizer_step("AdamW")
        last_cost = clock.spent() - before
        overshoots = not budget_spent(budget_hours, clock.spent() + last_cost)
        if clock.exhausted or (stop_rule == "before_crossing" and overshoots):
            break
    return {"micro_batches": micro_batches, "updates": clock.optimizer_steps, "tokens": clock.tokens_trained}


@pytest.mark.parametrize("profile_name", ["ntng-bert-rtx3090.yaml", "ntng-t5-a100.yaml"])
@pytest.mark.parametrize("budget_hours", [0.01, 0.25, 1.0])
@pytest.mark.parametrize("stop_rule", ["after_crossing", "before_crossing"])
def test_plan_agrees_with_a_simulated_training_loop(profile_name, budget_hours, stop_rule):
    profile = RSTProfile.load(PROFILES / profile_name)
    batch, micro = (1536, 128) if "bert" in profile_name else (144, 72)
    seq_len = profile.model["seq_len"]
    settings = profile_settings(profile, batch, micro, seq_len, "AdamW")
    planned = plan_hours(None, settings, budget_hours, stop_rule)
    simulated = simulate_training(profile, budget_hours, batch, micro, seq_len, stop_rule)
    assert {k: planned[k] for k in simulated} == simulated
    per_update = planned["rst_hours"] / planned["updates"]
    expected = math.ceil if stop_rule == "after_crossing" else math.floor
    assert planned["updates"] == expected(budget_hours / per_update - 1e-12)


def test_plan_unknown_method_lists_the_known_ones():
    args = ["--profile", str(PROFILES / "ntng-bert-rtx3090.yaml"), "--budget-hours", "1", "--batch-size", "1536",
            "--micro-batch-size", "128", "--method", "nope"]
    with pytest.raises(ConfigurationError, match=r"--method: invalid choice: 'nope' \(choose from .*'baseline'"):
        plan_main(args)


def test_optimizer_step_cost_scales_with_the_parameters_updated(tmp_path):
    profile = RSTProfile.load(write_profile(tmp_path / "p.yaml", {2: 1.0}))
    profile.optimizer_step_seconds, profile.layer_parameter_share = {"AdamW": 0.2}, {"encoder": 0.25}
    assert profile.optimizer_seconds("AdamW") == pytest.approx(0.2)
    assert profile.optimizer_seconds("AdamW", {"encoder": 2}) == pytest.approx(0.2)
    assert profile.optimizer_seconds("AdamW", {"encoder": 1}) == pytest.approx(0.2 * 0.75)
    clock = ReferenceClock(profile, AnalyticFlops({"encoder": 1}, 0, 1.0))
    assert clock.charge_optimizer_step("AdamW", updated_fraction=0.75) == pytest.approx(0.15)
