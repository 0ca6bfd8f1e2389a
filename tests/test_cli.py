"""The ``ntng`` command: every recipe parses, the tiny recipe trains end to end, bad input is one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForMaskedLM, AutoTokenizer

from app.accounting.cost_models import RSTProfile
from app.commands.plan import profile_settings
from tests.conftest import REPO_ROOT, plan_hours, run_cli, tiny_fit_args

RECIPES = sorted(
    p for p in (REPO_ROOT / "configs").rglob("*.yaml") if not {"rst", "methods", "sweeps", "shapes", "gpu"} & set(p.parts)
)
OVERLAYS = sorted((REPO_ROOT / "configs" / "methods").glob("*.yaml"))
T5_OVERLAYS = sorted([*(REPO_ROOT / "configs" / "t5" / "methods").glob("*.yaml"),
                      *(REPO_ROOT / "configs" / "t5" / "shapes").glob("*.yaml"),
                      REPO_ROOT / "configs" / "methods" / "selective_backprop.yaml",
                      REPO_ROOT / "configs" / "methods" / "rho_loss.yaml"])



@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_every_recipe_parses(recipe, capsys):
    code, out, err = run_cli(["fit", "-c", str(recipe), "--print_config"], capsys)
    assert code == 0, err
    resolved = yaml.safe_load(out)
    assert resolved["model"]["class_path"] and resolved["data"]["class_path"]


@pytest.mark.parametrize("overlay", T5_OVERLAYS, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_every_t5_overlay_parses_on_the_tiny_t5_recipe(overlay, capsys):
    code, _, err = run_cli(["fit", "-c", "configs/t5/tiny.yaml", "-c", str(overlay), "--print_config"], capsys)
    assert code == 0, err


@pytest.mark.parametrize("recipe", ["configs/bert/tiny.yaml", "configs/t5/tiny.yaml", "configs/quickstart.yaml"])
def test_the_gpu_overlay_parses_on_bert_and_t5(recipe, capsys):
    code, out, err = run_cli(["fit", "-c", recipe, "-c", "configs/gpu/fast.yaml", "--print_config"], capsys)
    assert code == 0, err
    resolved = yaml.safe_load(out)
    assert resolved["model"]["init_args"]["compile_layers"] == "inductor" and resolved["trainer"]["precision"] == "bf16-mixed"


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_every_method_overlay_parses_on_the_tiny_recipe(overlay, capsys):
    code, _, err = run_cli(["fit", "-c", "configs/bert/tiny.yaml", "-c", str(overlay), "--print_config"], capsys)
    assert code == 0, err


def test_tiny_recipe_trains_end_to_end(tmp_path, monkeypatch, sample_corpus, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(
        # 0.00003 RST h = 0.108 s of the tiny-cpu reference
        tiny_fit_args(sample_corpus, 0.00003) + ["--trainer.log_every_n_steps=1", "--throughput.log_every_n_steps=2"],
        capsys,
    )
    assert code == 0, err
    run_dir = tmp_path / "runs" / "bert-tiny" / "version_0"
    # The run stopped where the planner says the budget runs out.
    profile = RSTProfile.load(REPO_ROOT / "configs" / "rst" / "tiny-cpu.yaml")
    expected = plan_hours(None, profile_settings(profile, 16, 16, 64, "AdamW"), 0.00003)
    checkpoint = torch.load(next((run_dir / "checkpoints").glob("*.ckpt")), weights_only=False)
    assert checkpoint["global_step"] == expected["updates"]
    assert checkpoint["reference_clock"]["rst_seconds"] == pytest.approx(expected["rst_hours"] * 3600)
    assert (run_dir / "config.yaml").is_file()
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert list((run_dir / "checkpoints").glob("*.ckpt"))
    tags = _tensorboard_tags(run_dir)
    assert {"train/loss", "train/lr", "train/tokens_per_second", "val/loss", "val/perplexity", "rst/seconds"} <= tags
    # The export loads with plain transformers, tokenizer included.
    model = AutoModelForMaskedLM.from_pretrained(run_dir / "hf")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "hf")
    assert model.config.vocab_size == len(tokenizer)
    with torch.no_grad():
        logits = model(**tokenizer("alice was beginning to get very tired", return_tensors="pt")).logits
    assert torch.isfinite(logits).all()


def _tensorboard_tags(run_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir))
    accumulator.Reload()
    return set(accumulator.Tags()["scalars"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("--data.init_args.sources=[/nonexistent/corpus.txt]", "corpus source not found"),
        ("--model.init_args.backbone=gpt9", "unknown backbone 'gpt9'"),
        ("--data.init_args.seq_len=128", "seq_len 128 exceeds the model's maximum"),
    ],
)
def test_bad_input_prints_one_line_before_training(override, message, tmp_path, monkeypatch, sample_corpus, capsys):
    monkeypatch.chdir(tmp_path)
    recipe = REPO_ROOT / "configs" / "bert" / "tiny.yaml"
    code, _, err = run_cli(
        ["fit", "-c", str(recipe), f"--data.init_args.sources=[{sample_corpus}]",
         "--data.init_args.tokenizer_vocab_size=500", override],
        capsys,
    )
    assert code == 2
    error_lines = [line for line in err.splitlines() if line.startswith("ntng: error:")]
    assert len(error_lines) == 1 and message in error_lines[0]
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("*.ckpt"))


def test_validate_and_test_subcommands_evaluate_a_checkpoint(tmp_path, monkeypatch, sample_corpus, capsys):
    monkeypatch.chdir(tmp_path)
    common = ["-c", str(REPO_ROOT / "configs" / "bert" / "tiny.yaml"), f"--data.sources=[{sample_corpus}]",
              "--data.tokenizer_vocab_size=500", "--data.val_size=16", "--budget.allow_profile_mismatch=true",
              "--trainer.enable_progress_bar=false"]
    code, _, err = run_cli(["fit", *common, "--budget.budget=0.00001"], capsys)
    assert code == 0, err
    checkpoint = next((tmp_path / "runs" / "bert-tiny" / "version_0" / "checkpoints").glob("*.ckpt"))
    for command, key in (("validate", "val/loss"), ("test", "test/loss")):
        code, out, err = run_cli([command, *common, f"--ckpt_path={checkpoint}"], capsys)
        assert code == 0, err
        assert key in out
