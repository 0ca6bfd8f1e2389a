"""Every method overlay on the tiny BERT (RoBERTa-PreLN and ModernBERT) and T5 recipes, driven by one table (as Composer's ``algorithm_settings``):

(a) it trains, and the clock equals what the passes that actually ran cost under the profile;
(b) a run resumed from a mid-run budget checkpoint ends exactly as the uninterrupted run: the same
    update count, clock and bitwise-equal weights (CPU);
(c) ``ntng plan`` on the same files gives the update count the fit ran (exactly for deterministic
    methods; within the documented tolerance for randomised ones).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from app.accounting.cost_models import RSTProfile
from app.recipe import build_recipe
from callbacks.irreducible_losses import IrreducibleLosses
from callbacks.selection import BatchSelection
from tests.conftest import REPO_ROOT, PassRecorder, recipe_fit, run_cli

# Per family: the tiny recipe, a budget of about ten updates on its CPU profile, its overlay directory.
RECIPES = {
    "bert": {"recipe": "configs/bert/tiny.yaml", "budget": 0.00004, "profile": "configs/rst/tiny-cpu.yaml",
             "overlays": "configs/methods"},
    "modernbert": {"recipe": "configs/bert/tiny-modernbert.yaml", "budget": 0.00004,
                   "profile": "configs/rst/tiny-modernbert-cpu.yaml", "overlays": "configs/methods"},
    "t5": {"recipe": "configs/t5/tiny.yaml", "budget": 0.00013, "profile": "configs/rst/t5-tiny-cpu.yaml",
           "overlays": "configs/t5/methods"},
}


@dataclass(frozen=True)
class MethodSettings:
    """How one method runs on the tiny recipe.

    Attributes:
        overlay: ``configs/methods/<overlay>.yaml``, or None for the baseline.
        overrides: extra ``--key value`` arguments (a deeper model, a schedule that fits it).
        plan_tolerance: updates by which ``ntng plan`` may differ from the fit (randomised or
            front-loaded costs; 0 means exact).
        needs_il_file: the method reads an irreducible-loss file (the test writes one).
        generic: the overlay is ``configs/methods/<overlay>.yaml`` for every family, not the family's own.
    """

    overlay: str | None
    overrides: tuple[str, ...] = ()
    plan_tolerance: int = 0
    needs_il_file: bool = False
    generic: bool = False  # the overlay is configs/methods/<overlay>.yaml for every family


METHODS: dict[str, MethodSettings] = {
    "baseline": MethodSettings(None),
    # Depths are drawn at random: the plan prices their exact expectation, the fit one draw of about
    # ten depths, which may buy an update more or less.
    "layer_drop": MethodSettings("layer_drop", plan_tolerance=1),
    # The recipe's two layers: a first stage of one layer (the fixed first), then the full model.
    "raptr": MethodSettings("raptr", ("--trainer.callbacks.path_lengths=[1,2]", "--trainer.callbacks.fixed_layers=[0]")),
    "stacking": MethodSettings("stacking", ("--trainer.callbacks.initial_layers=1",
                                            "--trainer.callbacks.growth_fractions=[0.3]")),
    # Planned with the fit's observed selection rate (the stationary 1/(beta+1) is the documented
    # overestimate for a loss that falls fast); rows left over from an update shift the count by one.
    "selective_backprop": MethodSettings("selective_backprop", plan_tolerance=1, generic=True),
    "rho_loss": MethodSettings("rho_loss", needs_il_file=True, generic=True),
    "lion": MethodSettings("lion"),
    # Refreshes are priced on the updates they happen (update 0: the one micro-batch that exists);
    # charged here on T5 too (its overlay does not charge them for NTNG's A100 profile, ours has no surcharge).
    "sophia": MethodSettings("sophia", ("--trainer.precision=32-true", "--trainer.callbacks.charge=true")),
}
CASES = [(family, method) for family in RECIPES for method in sorted(METHODS)]


@dataclass
class MethodRun:
    configs: list[str]
    overrides: list[str]
    extra: list[str] = field(default_factory=list)


def method_run(family: str, name: str, sample_corpus, tmp_path) -> MethodRun:
    settings, recipe = METHODS[name], RECIPES[family]
    configs = [str(REPO_ROOT / recipe["recipe"])]
    if settings.overlay:
        directory = "configs/methods" if settings.generic else recipe["overlays"]
        configs.append(str(REPO_ROOT / directory / f"{settings.overlay}.yaml"))
    overrides = [
        f"--data.init_args.sources=[{sample_corpus}]", "--data.init_args.tokenizer_vocab_size=500",
        "--data.init_args.val_size=16", f"--budget.budget={recipe['budget']}", "--budget.allow_profile_mismatch=true",
        "--budget.validate_every_fraction=null", "--budget.checkpoint_every_fraction=0.5",
        "--trainer.enable_progress_bar=false", "--trainer.logger=false", "--trainer.num_sanity_val_steps=0",
        f"--trainer.default_root_dir={tmp_path}", *settings.overrides,
    ]
    if settings.needs_il_file:
        overrides.append(f"--trainer.callbacks.irreducible_losses={_il_file(configs, overrides, tmp_path)}")
    return MethodRun(configs, overrides)


def _il_file(configs: list[str], overrides: list[str], tmp_path) -> str:
    """Irreducible losses for the run's training ids (random: these tests check mechanics, not selection)."""
    cli = build_recipe(configs, overrides + ["--trainer.callbacks.irreducible_losses=unused"])
    data = cli.datamodule
    data.prepare_data()
    data.setup("fit")
    ids = np.asarray(data.train_example_ids)
    losses = np.random.default_rng(0).random((4, len(ids)), dtype=np.float32)
    path = tmp_path / "il.npz"
    IrreducibleLosses(ids, losses, data.example_fingerprint(), {}).save(path)
    return str(path)


def final_state(cli) -> dict:
    return {"updates": cli.trainer.global_step, "clock": cli.model.clock.state_dict(),
            "weights": {k: v.clone() for k, v in cli.model.state_dict().items()}}


@pytest.mark.parametrize("family", sorted(RECIPES))
def test_the_table_covers_every_method_overlay(family):
    overlays = {p.stem for p in (REPO_ROOT / RECIPES[family]["overlays"]).glob("*.yaml")}
    own = {s.overlay for s in METHODS.values() if s.overlay and (family != "t5" or not s.generic)}
    # The IL model's overlay is a baseline run on the holdout, tested with RHO-loss's workflow.
    assert overlays - {"rho_loss_il_model"} == own


@pytest.mark.parametrize("family, method", CASES)
def test_method_trains_charges_what_ran_resumes_exactly_and_is_planned(family, method, sample_corpus, tmp_path,
                                                                        monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run = method_run(family, method, sample_corpus, tmp_path)
    recorder = PassRecorder()
    full = recipe_fit(run.configs, run.overrides + [f"--trainer.default_root_dir={tmp_path / 'full'}"],
                      callbacks=[recorder])
    done = final_state(full)

    # (a) it trained, and the clock is the price of exactly the passes and steps that ran.
    assert done["updates"] >= 4
    profile = RSTProfile.load(REPO_ROOT / RECIPES[family]["profile"])
    assert done["clock"]["rst_seconds"] == pytest.approx(recorder.reference_seconds(profile), rel=1e-9)
    assert done["clock"]["optimizer_steps"] == len(recorder.steps) == done["updates"]

    # (b) resumed from the mid-run budget checkpoint, it ends where the uninterrupted run ended.
    checkpoints = sorted((tmp_path / "full").rglob("rst-*.ckpt"))
    assert checkpoints, "the budget callback saved no mid-run checkpoint"
    resumed = final_state(recipe_fit(run.configs, run.overrides + [f"--trainer.default_root_dir={tmp_path / 'resumed'}"],
                                     ckpt_path=str(checkpoints[0])))
    assert resumed["updates"] == done["updates"]
    assert resumed["clock"] == done["clock"]
    for key, value in done["weights"].items():
        assert torch.equal(resumed["weights"][key], value), key

    # (c) ntng plan on the same files buys what the fit ran.
    extra = []
    selection = next((c for c in full.trainer.callbacks if isinstance(c, BatchSelection)), None)
    if selection is not None and METHODS[method].plan_tolerance:
        extra = [f"--selection-rate={observed_selection_rate(selection, full)}"]
    args = ["plan", *(a for c in run.configs for a in ("-c", c)), *run.overrides, "--format", "json", *extra]
    capsys.readouterr()
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    (planned,) = json.loads(out.strip().splitlines()[-1]).values()
    assert abs(planned["updates"] - done["updates"]) <= METHODS[method].plan_tolerance, (planned, done["updates"])


def observed_selection_rate(selection: BatchSelection, cli) -> float:
    """Rows trained / rows scored over the run."""
    trained = cli.trainer.global_step * cli.trainer.accumulate_grad_batches * cli.datamodule.hparams.micro_batch_size
    return trained / (selection.batches_scored * selection.stream.batch_size)
