"""``ntng sweep``: the sweep file, dry runs, SLURM scripts, resume after a crash or a failure, branches."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from app.commands.sweep import SweepRunner, main as sweep_main
from app.commands.sweep_spec import SweepSpec
from app.errors import ConfigurationError
from tests.conftest import REPO_ROOT, run_cli, run_in_process

TINY = str(REPO_ROOT / "configs" / "bert" / "tiny.yaml")
COPA = str(REPO_ROOT / "datamodules" / "samples" / "superglue")


def tiny_sweep(tmp_path: Path, corpus: Path, **fields) -> Path:
    """A sweep of the tiny recipe on ``corpus`` (about eight updates per cell), written to a file."""
    document = {
        "name": "tiny", "recipe": TINY, "budgets": [0.00003], "seeds": [0],
        "overrides": [f"--data.init_args.sources=[{corpus}]", "--data.init_args.tokenizer_vocab_size=500",
                      "--data.init_args.val_size=16", "--budget.allow_profile_mismatch=true",
                      "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false"],
        "methods": {"baseline": {}},
        "validate_every_fraction": 0.25, "checkpoint_every_fraction": 0.25,
    } | fields
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def run_sweep(path: Path, root: Path, lines: list[str] | None = None) -> tuple[int, int]:
    report = (lambda line: lines.append(line)) if lines is not None else (lambda line: None)
    return SweepRunner(SweepSpec.load(path), root, report=report, execute=run_in_process).run()


def cell_state(root: Path, key: str) -> dict:
    return json.loads((root / "cells" / key / "cell.json").read_text())


def summary(root: Path, key: str) -> dict:
    return json.loads((root / "cells" / key / "fit" / "version_0" / "summary.json").read_text())


def weights(root: Path, key: str) -> dict[str, torch.Tensor]:
    return load_file(root / "cells" / key / "fit" / "version_0" / "hf" / "model.safetensors")


@pytest.mark.parametrize("document, message", [
    ({"recipe": TINY, "budgets": [1], "seeds": [0], "methods": {"baseline": {}}, "budget": 3}, "unknown key"),
    ({"budgets": [1], "seeds": [0], "methods": {"baseline": {}}}, "`recipe` is required"),
    ({"recipe": TINY, "budgets": [1, 1], "seeds": [0], "methods": {"baseline": {}}}, "distinct"),
    ({"recipe": TINY, "budgets": [1], "seeds": [0], "methods": {"x": {"overlay": []}}}, "method x: unknown key"),
    ({"recipe": TINY, "budgets": [1], "seeds": [0], "methods": {"x": {"overlays": ["nope.yaml"]}}}, "not found"),
    ({"recipe": TINY, "budgets": [1], "seeds": [0], "methods": {"b": {}}, "finetune": [{"suite": "xglue"}]},
     "one of glue, superglue, sni"),
])
def test_a_bad_sweep_file_names_what_is_wrong(tmp_path, document, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(document))
    with pytest.raises(ConfigurationError, match=message):
        SweepSpec.load(path)


@pytest.mark.parametrize("name, cells, suites", [("quickstart", 12, 1), ("ntng-bert", 72, 2), ("quickstart-t5", 12, 1),
                                                 ("ntng-t5", 45, 1)])
def test_dry_run_prints_every_step_of_every_cell(name, cells, suites, tmp_path, capsys):
    sweep_main(["-c", str(REPO_ROOT / "configs" / "sweeps" / f"{name}.yaml"), "--output", str(tmp_path), "--dry-run"])
    lines = capsys.readouterr().out.splitlines()
    fits = [shlex.split(line) for line in lines if line.startswith("ntng fit ")]
    finetunes = [line for line in lines if line.startswith("ntng finetune ")]
    assert len(fits) == cells and len(finetunes) == cells * suites
    spec = SweepSpec.load(REPO_ROOT / "configs" / "sweeps" / f"{name}.yaml")
    seen = {(a.split("=")[1] for a in fit if a.startswith(("--budget.budget=", "--seed_everything="))) for fit in fits}
    assert len({tuple(s) for s in seen}) <= cells
    budgets = {float(a.split("=")[1]) for fit in fits for a in fit if a.startswith("--budget.budget=")}
    assert budgets == set(spec.budgets)
    assert not list(tmp_path.iterdir())  # a dry run writes nothing


@pytest.mark.parametrize("name", ["quickstart", "ntng-bert", "quickstart-t5", "ntng-t5"])
def test_every_shipped_sweep_method_parses_as_a_fit(name, tmp_path, capsys):
    spec = SweepSpec.load(REPO_ROOT / "configs" / "sweeps" / f"{name}.yaml")
    runner = SweepRunner(spec, tmp_path)
    for method in spec.methods:  # one cell per method: the budget and seed only change two values
        (_, fit), *_ = runner.steps(next(c for c in spec.cells if c.method == method))
        code, out, err = run_cli([*fit[1:], "--print_config"], capsys)
        assert code == 0, (method.name, err)
        assert yaml.safe_load(out)["budget"]["budget"] == min(spec.budgets)


def test_emit_slurm_writes_one_array_task_per_cell(tmp_path, capsys):
    sweep_main(["-c", str(REPO_ROOT / "configs" / "sweeps" / "quickstart.yaml"), "--output", str(tmp_path),
                "--emit", "slurm"])
    script = (tmp_path / "sweep.slurm").read_text()
    assert script.startswith("#!/bin/bash") and "#SBATCH --array=0-11" in script
    assert '--unit "$SLURM_ARRAY_TASK_ID"' in script and (tmp_path / "slurm").is_dir()
    with pytest.raises(ConfigurationError, match="--unit must be in 0..11"):
        sweep_main(["-c", str(REPO_ROOT / "configs" / "sweeps" / "quickstart.yaml"), "--output", str(tmp_path),
                    "--unit", "12", "--no-report"])


def test_cells_run_finish_resume_after_a_crash_and_rerun_after_a_failure(tmp_path, sample_corpus, monkeypatch):
    monkeypatch.chdir(tmp_path)
    crash = '--trainer.callbacks+={"class_path": "tests.conftest.CrashAfter", "init_args": {"step": 5}}'
    methods = {
        "baseline": {},
        "crashed": {"overrides": [crash]},  # the baseline, pre-empted after update 5
        "broken": {"overlays": [str(REPO_ROOT / "configs" / "methods" / "layer_drop.yaml")],
                   "overrides": ["--trainer.callbacks.theta_bar=2.0"]},
    }
    finetune = [{"suite": "superglue", "data_dir": COPA, "tasks": ["copa"], "epochs": 1,
                 "args": ["--max-train-examples", "16", "--max-eval-examples", "16", "--batch-size", "8", "--max-length", "32"]}]
    path, root = tiny_sweep(tmp_path, sample_corpus, methods=methods, finetune=finetune), tmp_path / "sweep"
    lines: list[str] = []
    assert run_sweep(path, root, lines) == (1, 2)
    assert cell_state(root, "baseline/b3e-05/s0")["status"] == "done"
    assert (root / "cells/baseline/b3e-05/s0/finetune/superglue/results.json").is_file()
    assert cell_state(root, "crashed/b3e-05/s0")["status"] == "failed"
    assert list((root / "cells/crashed/b3e-05/s0/fit/version_0/checkpoints").glob("rst-*.ckpt"))
    broken = cell_state(root, "broken/b3e-05/s0")
    assert broken["status"] == "failed" and "theta_bar must be in (0, 1]" in broken["error"]
    assert any("broken/b3e-05/s0: fit FAILED" in line for line in lines)

    methods["crashed"] = {}  # the cluster gave the job back
    methods["broken"]["overrides"] = []
    path = tiny_sweep(tmp_path, sample_corpus, methods=methods, finetune=finetune)
    lines.clear()
    assert run_sweep(path, root, lines) == (3, 0)
    assert any("baseline/b3e-05/s0: done, skipped" in line for line in lines)
    assert "--ckpt_path=" in (root / "cells/crashed/b3e-05/s0/fit.log").read_text().split("$ ")[-1]
    # Resumed from its checkpoint, the pre-empted cell ends exactly where the uninterrupted one did.
    assert summary(root, "crashed/b3e-05/s0")["updates"] == summary(root, "baseline/b3e-05/s0")["updates"]
    assert summary(root, "crashed/b3e-05/s0")["rst_hours"] == summary(root, "baseline/b3e-05/s0")["rst_hours"]
    reference = weights(root, "baseline/b3e-05/s0")
    assert all(torch.equal(value, reference[key]) for key, value in weights(root, "crashed/b3e-05/s0").items())
    assert cell_state(root, "broken/b3e-05/s0")["status"] == "done"
    assert "theta_bar" in (root / "cells/broken/b3e-05/s0/errors.log").read_text()  # the earlier error is kept
    curve = [json.loads(line) for line in (root / "cells/crashed/b3e-05/s0/fit/version_0/curve.jsonl").open()]
    assert [row["updates"] for row in curve] == sorted(row["updates"] for row in curve)  # no replayed rows


def test_branched_cells_continue_the_largest_run_and_are_charged_the_shared_part(tmp_path, sample_corpus,
                                                                              monkeypatch):
    monkeypatch.chdir(tmp_path)
    wsd = ['--model.init_args.lr_schedule={"class_path": "app.model.schedules.WarmupStableDecay", '
           '"init_args": {"warmup_fraction": 0.1, "decay_fraction": 0.5}}', "--record.train_every_n_steps=1"]
    path = tiny_sweep(tmp_path, sample_corpus, budgets=[0.00002, 0.00004], branch_budgets=True,
                      methods={"baseline": {"overrides": wsd}})
    root = tmp_path / "sweep"
    assert run_sweep(path, root) == (2, 0)
    small, large = "baseline/b2e-05/s0", "baseline/b4e-05/s0"
    assert cell_state(root, small)["branched_from"] == {"budget": 0.00004, "rst_hours": 0.00001}
    assert (root / "cells" / large / "fit/version_0/checkpoints/at-1e-05h.ckpt").is_file()
    # The branched cell's clock holds the shared part: it spent its whole budget, not only its cooldown.
    spent = summary(root, small)["rst_hours"]
    assert 0.00002 <= spent < 0.00002 + 0.0000035
    curve = [json.loads(line) for line in (root / "cells" / small / "fit/version_0/curve.jsonl").open()]
    train = [row for row in curve if row["kind"] == "train"]
    assert train[0]["rst_hours"] < 0.00001  # the shared part's rows come first
    assert train[-1]["lr_multiplier"] < 0.5 * max(row["lr_multiplier"] for row in train)  # decayed at its budget
    assert summary(root, small)["updates"] < summary(root, large)["updates"]
