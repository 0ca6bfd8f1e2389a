"""LayerStacking: schedule and copy plans, copies by name, optimizer policies, tiny fits, resume, planner."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.loggers import Logger
from transformers import AutoModelForMaskedLM, T5Config, T5ForConditionalGeneration

from app.accounting.clock import budget_spent
from app.accounting.cost_models import RSTProfile
from app.errors import ConfigurationError
from app.model.layers import LayerAdapter
from app.accounting.planning import PlanSettings
from app.commands.plan import main as plan_main
from app.commands.plan import profile_settings
from app.modules.masked_lm import MaskedLanguageModel
from app.model.schedules import OneCycleTriangle
from callbacks.budget import ReferenceTimeBudget
from callbacks.stacking import (
    REWARM_KEY,
    GrowthSchedule,
    LayerStacking,
    LinearRewarm,
    apply_growth,
    growth_copies,
)
from tests.conftest import REPO_ROOT, fit_tiny, mlm_batch, plan_hours, tiny_masked_lm, write_profile

TABLE = {1: 0.25, 2: 0.5, 3: 0.75, 4: 1.0}  # seconds per micro-batch of 4 x 16 tokens, by depth
BUDGET_SECONDS = 12.0
MICRO_BATCHES = 2


def tiny_module(layers: int = 4) -> MaskedLanguageModel:
    return tiny_masked_lm(layers)


def simulate(schedule: GrowthSchedule, budget: float = BUDGET_SECONDS) -> list[int]:
    """Depth of every update of a run charging TABLE at the schedule's depth until the budget is spent."""
    spent, depths = 0.0, []
    while not budget_spent(spent, budget):
        depths.append(schedule.depth_at(spent / budget))
        spent += MICRO_BATCHES * TABLE[depths[-1]]
    return depths


# -- functional core ---------------------------------------------------------------------------------


def test_depth_at_progress_for_doubling_and_adding():
    double = GrowthSchedule(1, (0.25, 0.5))
    assert double.depths() == [1, 2, 4]
    assert [double.depth_at(p) for p in (0.0, 0.2499, 0.25, 0.4999, 0.5, 1.0)] == [1, 1, 2, 2, 4, 4]
    add = GrowthSchedule(2, (0.2, 0.4, 0.6), "add", 2)
    assert add.depths() == [2, 4, 6, 8]
    assert [add.depth_at(p) for p in (0.1, 0.2, 0.5, 0.7)] == [2, 4, 6, 8]
    assert GrowthSchedule(4, (0.125, 0.3)).depths() == [4, 8, 16]  # NTNG BERT
    # A progress a rounding error short of a fraction counts as reaching it (the clock's tolerance).
    assert double.depth_at(0.25 * (1 - 1e-12)) == 2


def test_copy_plans():
    assert growth_copies(2, "double") == [(0, 2), (1, 3)]
    assert growth_copies(4, "double") == [(0, 4), (1, 5), (2, 6), (3, 7)]
    assert growth_copies(4, "add", 2) == [(2, 4), (3, 5)]  # the top block of 2 copied on top
    assert growth_copies(3, "add", 1) == [(2, 3)]


@pytest.mark.parametrize(
    "args, message",
    [
        ((0, (0.5,)), "initial_layers must be >= 1"),
        ((2, ()), "strictly increasing"),
        ((2, (0.3, 0.1)), "strictly increasing"),
        ((2, (0.1, 0.1)), "strictly increasing"),
        ((2, (0.0, 0.5)), "strictly increasing"),
        ((2, (0.5, 1.0)), "strictly increasing"),
        ((2, (0.5,), "triple"), "growth must be"),
        ((2, (0.5,), "add"), "1 <= add_layers <= initial_layers"),
        ((2, (0.5,), "add", 3), "1 <= add_layers <= initial_layers"),
        ((2, (0.5,), "double", 1), "only used with growth='add'"),
    ],
)
def test_schedule_validation(args, message):
    with pytest.raises(ConfigurationError, match=message):
        GrowthSchedule(*args)


def test_schedule_must_fit_the_model_depth():
    GrowthSchedule(4, (0.125, 0.3)).check_full_depth(16)
    GrowthSchedule(2, (0.1, 0.2), "add", 1).check_full_depth(16)  # adding may stop short of full depth
    with pytest.raises(ConfigurationError, match="must end at the model's 8 layers"):
        GrowthSchedule(4, (0.125, 0.3)).check_full_depth(8)
    with pytest.raises(ConfigurationError, match="must be below the model's 4 layers"):
        GrowthSchedule(4, (0.5,), "add", 1).check_full_depth(4)
    with pytest.raises(ConfigurationError, match="exceeds the model's 5 layers"):
        GrowthSchedule(2, (0.1, 0.2), "add", 2).check_full_depth(5)
    with pytest.raises(ConfigurationError, match="optimizer_state"):
        LayerStacking(optimizer_state="keep")
    with pytest.raises(ConfigurationError, match="rewarm_fraction"):
        LayerStacking(rewarm_fraction=-0.1)


# -- copies and optimizer state ----------------------------------------------------------------------


def _layer_params(adapter: LayerAdapter, index: int, stack: str = "encoder") -> dict[str, torch.nn.Parameter]:
    return dict(adapter.layers(stack)[index].named_parameters())


def _trained(layers: int = 4, active: int = 2) -> tuple[MaskedLanguageModel, torch.optim.AdamW]:
    """A tiny model after one AdamW step at depth ``active`` (the deeper layers have no state)."""
    module = tiny_module(layers)
    module.layers.set_active_layers(range(active))
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    module.loss(mlm_batch()).backward()
    optimizer.step()
    optimizer.zero_grad()
    return module, optimizer


@pytest.mark.parametrize("growth, depth, add_layers", [("double", 2, None), ("add", 2, 1)])
def test_new_layers_equal_their_sources(growth, depth, add_layers):
    module, optimizer = _trained(active=depth)
    copies = growth_copies(depth, growth, add_layers)
    assert apply_growth(module.layers, copies, optimizer, "copy") == copies[-1][1] + 1
    assert module.layers.active_layers() == list(range(copies[-1][1] + 1))
    for src, dst in copies:
        source, target = _layer_params(module.layers, src), _layer_params(module.layers, dst)
        assert source.keys() == target.keys()
        for name, param in target.items():
            assert torch.equal(param, source[name]) and param is not source[name]


def test_t5_encoder_and_decoder_grow_together_and_keep_block0_bias():
    torch.manual_seed(0)
    config = T5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=4, num_decoder_layers=4,
                      num_heads=2, dropout_rate=0.0, decoder_start_token_id=0)  # fmt: skip
    model = T5ForConditionalGeneration(config)
    adapter = LayerAdapter(model)
    adapter.set_active_layers(range(2))
    biases = {s: adapter.layers(s)[0].layer[0].SelfAttention.relative_attention_bias.weight.clone()
              for s in adapter.stack_names}  # fmt: skip
    apply_growth(adapter, growth_copies(2, "double"), torch.optim.AdamW(model.parameters()), "new_only")
    assert adapter.active_depth() == {"encoder": 4, "decoder": 4}
    for stack in ("encoder", "decoder"):
        for src, dst in [(0, 2), (1, 3)]:
            source, target = _layer_params(adapter, src, stack), _layer_params(adapter, dst, stack)
            assert not any("relative_attention_bias" in name for name in target)
            assert set(target) == {n for n in source if "relative_attention_bias" not in n}
            assert all(torch.equal(param, source[name]) for name, param in target.items())
        bias = adapter.layers(stack)[0].layer[0].SelfAttention.relative_attention_bias.weight
        assert torch.equal(bias, biases[stack])


@pytest.mark.parametrize("policy", ["reset", "copy", "new_only"])
def test_optimizer_state_policies(policy):
    module, optimizer = _trained()
    before = {id(p): state["exp_avg"].clone() for p, state in optimizer.state.items()}
    assert all(_layer_params(module.layers, i)["attention.self.query.weight"] in optimizer.state for i in (0, 1))
    apply_growth(module.layers, growth_copies(2, "double"), optimizer, policy)
    if policy == "reset":
        assert len(optimizer.state) == 0 and isinstance(optimizer.state, defaultdict)
    for src, dst in [(0, 2), (1, 3)]:
        source, target = _layer_params(module.layers, src), _layer_params(module.layers, dst)
        for name, param in target.items():
            if policy == "copy":
                assert torch.equal(optimizer.state[param]["exp_avg"], optimizer.state[source[name]]["exp_avg"])
                assert optimizer.state[param]["exp_avg"] is not optimizer.state[source[name]]["exp_avg"]
            elif policy == "new_only":
                assert param not in optimizer.state
                assert torch.equal(optimizer.state[source[name]]["exp_avg"], before[id(source[name])])
    # The optimizer stays usable: the next step trains all four layers.
    module.loss(mlm_batch(seed=1)).backward()
    optimizer.step()
    assert all(_layer_params(module.layers, i)["attention.self.query.weight"] in optimizer.state for i in range(4))


def test_doubled_preln_model_applies_the_trained_stack_twice():
    # Shallow model: norm(F(embed(x))) with F = layers 0, 1. Doubled: norm(F(F(embed(x)))), exactly.
    module, optimizer = _trained()
    base = module.model.eval().base_model
    ids = mlm_batch()["input_ids"]
    with torch.no_grad():
        shallow = base(input_ids=ids, output_hidden_states=True)
        apply_growth(module.layers, growth_copies(2, "double"), optimizer, "reset")
        grown = base(input_ids=ids, output_hidden_states=True)
        layer0, layer1 = module.layers.layers()[:2]
        stack = lambda hidden: layer1(layer0(hidden))  # noqa: E731
        embedded = shallow.hidden_states[0]
        assert torch.equal(shallow.last_hidden_state, base.LayerNorm(stack(embedded)))
        assert torch.equal(grown.last_hidden_state, base.LayerNorm(stack(stack(embedded))))
    assert len(grown.hidden_states) == 5 and torch.equal(grown.hidden_states[2], stack(embedded))


# -- tiny fits ---------------------------------------------------------------------------------------


class MetricsLogger(Logger):
    """Keeps every logged metric by step."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: dict[str, dict[int, float]] = defaultdict(dict)

    name, version = "memory", 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        for key, value in metrics.items():
            self.metrics[key][step] = value


class Recorder(Callback):
    """Depth and LR of every update, and which layers ran in each validation batch."""

    def __init__(self) -> None:
        self.depths: list[int] = []
        self.micro_depths: list[int] = []
        self.lrs: list[float] = []
        self.validated: list[list[int]] = []
        self._ran: list[int] = []

    def setup(self, trainer, pl_module, stage):
        for index, layer in enumerate(pl_module.layers.layers()):
            layer.register_forward_hook(lambda module, args, output, index=index: self._ran.append(index))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.micro_depths.append(pl_module.layers.active_depth()["encoder"])
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            self.depths.append(self.micro_depths[-1])
            self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._ran.clear()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.validated.append(sorted(set(self._ran)))


def fit(tmp_path, stacking: LayerStacking, module=None, max_steps: int = -1, ckpt_path=None, **budget):
    tmp_path.mkdir(parents=True, exist_ok=True)
    profile = write_profile(tmp_path / "profile.yaml", TABLE, layers={"encoder": 4})
    recorder, logger = Recorder(), MetricsLogger()
    module = module or tiny_module()
    budget_callback = ReferenceTimeBudget(budget=BUDGET_SECONDS / 3600, profile=str(profile), **budget)
    trainer = fit_tiny(module, [budget_callback, stacking, recorder], tmp_path, ckpt_path, max_steps=max_steps,
                       max_epochs=-1, accumulate_grad_batches=MICRO_BATCHES, logger=logger, log_every_n_steps=1,
                       enable_checkpointing=False)
    return trainer, module, recorder, logger


def test_growth_in_a_budgeted_fit(tmp_path):
    stacking = LayerStacking(initial_layers=1, growth_fractions=[0.25, 0.5])
    trainer, module, recorder, logger = fit(tmp_path, stacking, validate_every_fraction=0.25)
    # 6 updates at 0.5 s reach 25 %, 3 at 1 s reach 50 %, 3 at 2 s spend the 12 s.
    assert recorder.depths == simulate(stacking.schedule) == [1] * 6 + [2] * 3 + [4] * 3
    assert recorder.micro_depths == [d for d in recorder.depths for _ in range(MICRO_BATCHES)]
    assert trainer.global_step == 12
    assert module.clock.rst_seconds == pytest.approx(sum(MICRO_BATCHES * TABLE[d] for d in recorder.depths))
    settings = profile_settings(RSTProfile.load(tmp_path / "profile.yaml"), 8, 4, 16, "AdamW")
    planned = plan_hours(LayerStacking(initial_layers=1, growth_fractions=(0.25, 0.5)), settings, BUDGET_SECONDS / 3600)
    assert planned["updates"] == trainer.global_step
    assert list(logger.metrics["method/depth"].values()) == recorder.depths
    events = {step: depth for step, depth in logger.metrics["method/growth_event"].items() if depth}
    assert events == {6: 2.0, 9: 4.0}  # the new depth at the 7th and 10th update, 0 at the others
    # Validation at 25 / 50 / 75 / 100 % runs the model as grown so far.
    assert recorder.validated == [[0], [0, 1], [0, 1, 2, 3], [0, 1, 2, 3]]
    # The LR schedule runs on, not restarted at growth.
    spent = [sum(MICRO_BATCHES * TABLE[d] for d in recorder.depths[: i + 1]) for i in range(12)]
    assert recorder.lrs == pytest.approx([1e-3 * OneCycleTriangle()(s / BUDGET_SECONDS) for s in spent])


def rewarmed() -> LayerStacking:
    return LayerStacking(initial_layers=1, growth_fractions=[0.25, 0.5], rewarm_fraction=0.25)


@pytest.fixture(scope="module")
def rewarmed_run(tmp_path_factory):
    """An uninterrupted re-warmed run (shared: tiny fits are the slow part of these tests)."""
    return fit(tmp_path_factory.mktemp("rewarmed"), rewarmed())


def test_rewarm_ramps_the_lr_after_each_growth(rewarmed_run):
    _, module, recorder, _ = rewarmed_run
    # After growth at 3 s (25 %) the updates end at 4, 5, 6 s: the ramp spans 3 s; after 6 s, at 8, 10, 12 s.
    ramp = [1.0] * 6 + [1 / 3, 2 / 3, 1.0] + [2 / 3, 1.0, 1.0]
    spent = [0.5 * i for i in range(1, 7)] + [4.0, 5.0, 6.0, 8.0, 10.0, 12.0]
    assert recorder.lrs == pytest.approx([1e-3 * OneCycleTriangle()(s / 12) * r for s, r in zip(spent, ramp)])
    assert module.lr_adjustments[REWARM_KEY] == LinearRewarm(0.5, 0.25)


def test_budget_ending_before_the_last_growth_exports_the_grown_depth(tmp_path):
    stacking = LayerStacking(initial_layers=1, growth_fractions=[0.25, 0.95])
    trainer, module, recorder, _ = fit(tmp_path, stacking)
    assert recorder.depths == [1] * 6 + [2] * 9  # the last update starts at 11/12 < 95 %
    assert module.model_depth == 2 and module.layers.active_layers() == [0, 1]
    module.export_pretrained(tmp_path / "hf")
    exported = AutoModelForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    assert exported.config.num_hidden_layers == 2
    ids = mlm_batch()["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, module.model.eval()(input_ids=ids).logits)


def test_schedule_not_reaching_the_model_depth_fails_at_setup(tmp_path):
    with pytest.raises(ConfigurationError, match="must end at the model's 4 layers"):
        fit(tmp_path, LayerStacking(initial_layers=2, growth_fractions=[0.25, 0.5]))


@pytest.mark.parametrize("stop_after", [4, 8])  # before the first growth, and inside the re-warm after it
def test_resume_continues_identically(tmp_path, rewarmed_run, stop_after):
    full, full_module, full_recorder, _ = rewarmed_run
    partial, _, partial_recorder, _ = fit(tmp_path / "part", rewarmed(), max_steps=stop_after)
    checkpoint = tmp_path / "part.ckpt"
    partial.save_checkpoint(checkpoint)
    resumed, resumed_module, resumed_recorder, _ = fit(tmp_path / "resumed", rewarmed(), ckpt_path=checkpoint)
    assert partial_recorder.depths + resumed_recorder.depths == full_recorder.depths
    assert partial_recorder.lrs + resumed_recorder.lrs == pytest.approx(full_recorder.lrs)
    assert resumed.global_step == full.global_step == 12
    assert resumed_module.clock.state_dict() == full_module.clock.state_dict()
    assert resumed_module.model_depth == full_module.model_depth == 4


# -- planner -----------------------------------------------------------------------------------------


def _settings(profile: str, batch: int, micro: int, seq_len: int) -> PlanSettings:
    loaded = RSTProfile.load(REPO_ROOT / "configs" / "rst" / profile)
    return profile_settings(loaded, batch, micro, seq_len, "AdamW")


def test_planner_buys_more_updates_and_matches_a_step_by_step_simulation():
    settings, stacking = _settings("ntng-bert-rtx3090.yaml", 1536, 128, 128), LayerStacking()
    schedule = stacking.schedule
    assert schedule.depths() == [4, 8, 16]
    stacked, baseline = plan_hours(stacking, settings, 24.0), plan_hours(None, settings, 24.0)
    assert stacked["updates"] > baseline["updates"]
    table = settings.profile.passes["forward_backward"].table
    budget, spent, updates = 24.0 * 3600, 0.0, 0
    while not budget_spent(spent, budget):
        spent += 12 * table[schedule.depth_at(spent / budget)]
        updates += 1
    assert stacked["updates"] == updates
    assert stacked["rst_hours"] * 3600 == pytest.approx(spent, rel=1e-12)
    assert stacked["tokens"] == updates * 1536 * 128


def test_planner_defaults_and_options_for_t5(capsys):
    settings = _settings("ntng-t5-a100.yaml", 144, 72, 512)
    doubled = LayerStacking(initial_layers=3)  # NTNG's T5 start: 3 of 12 layers
    assert doubled.schedule.depths() == [3, 6, 12]
    assert plan_hours(doubled, settings, 1.0)["updates"] > 0
    added = LayerStacking(initial_layers=3, growth="add", add_layers=3, growth_fractions=(0.1, 0.2, 0.3))
    assert added.schedule.depths() == [3, 6, 9, 12]
    assert plan_hours(added, settings, 1.0)["updates"] > plan_hours(None, settings, 1.0)["updates"]
    # The same options in the flag form of ``ntng plan``.
    plan_main(["--profile", str(REPO_ROOT / "configs" / "rst" / "ntng-t5-a100.yaml"), "--budget-hours", "1",
               "--batch-size", "144", "--micro-batch-size", "72", "--seq-len", "512", "--optimizer", "AdamW",
               "--method", "stacking", "--stacking.initial_layers", "3", "--stacking.growth", "add",
               "--stacking.add_layers", "3", "--stacking.growth_fractions", "[0.1,0.2,0.3]", "--format", "json"])
    counts = json.loads(capsys.readouterr().out)["stacking"]
    assert counts["updates"] == plan_hours(added, settings, 1.0)["updates"]
    with pytest.raises(ConfigurationError, match="must end at"):
        plan_hours(LayerStacking(initial_layers=4), settings, 1.0)
