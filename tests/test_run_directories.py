"""Run directories: ``--resume`` finds the newest checkpoint, an earlier run is never written over
without ``--overwrite true``, and a NaN stops the run without a NaN checkpoint or export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from app.recipe import parse_error_line
from tests.conftest import run_cli, tiny_fit_args

BUDGET = 0.00003  # about eight updates of the tiny-cpu reference


class PoisonAt(Callback):
    """Fill the first weight with NaN as update ``step`` (counted from 1) starts: a diverging run."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step - 1:
            with torch.no_grad():
                next(pl_module.parameters()).fill_(float("nan"))


def fit_args(sample_corpus: Path, root: Path, *extra: str) -> list[str]:
    return tiny_fit_args(sample_corpus, BUDGET) + [
        f"--trainer.logger.init_args.save_dir={root}", "--budget.checkpoint_every_fraction=0.25",
        "--budget.validate_every_fraction=null", *extra]


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("ntng: error:")]


def updates(run_dir: Path) -> int:
    return json.loads((run_dir / "summary.json").read_text())["updates"]


def test_resume_continues_the_newest_version_with_a_checkpoint(sample_corpus, tmp_path, capsys, caplog):
    runs = tmp_path / "runs" / "bert-tiny"
    code, _, err = run_cli(fit_args(sample_corpus, tmp_path / "runs"), capsys)
    assert code == 0, err
    finished = updates(runs / "version_0")
    # version_1 dies after update 5 (its cadence checkpoints kept); version_2 has no checkpoint (killed at setup).
    with pytest.raises(RuntimeError, match="simulated crash after update 5"):
        run_cli(fit_args(sample_corpus, tmp_path / "runs", "--trainer.callbacks+=tests.conftest.CrashAfter",
                         "--trainer.callbacks.step=5"), capsys)
    assert not (runs / "version_1" / "summary.json").exists()
    assert (runs / "version_1" / "checkpoints" / "last.ckpt").is_file()
    (runs / "version_2").mkdir()

    code, _, err = run_cli(fit_args(sample_corpus, tmp_path / "runs", "--resume=true"), capsys)
    assert code == 0, err
    assert f"resuming {runs / 'version_1'} from last.ckpt" in caplog.text
    assert updates(runs / "version_1") == finished  # it ended where the uninterrupted run did
    assert not (runs / "version_3").exists() and not list((runs / "version_2").iterdir())


def test_resume_with_nothing_to_resume_starts_a_new_run(sample_corpus, tmp_path, capsys, caplog):
    code, _, err = run_cli(fit_args(sample_corpus, tmp_path / "runs", "--ckpt_path=last"), capsys)
    assert code == 0, err
    assert "nothing to resume" in caplog.text and "starting a new run" in caplog.text
    assert (tmp_path / "runs" / "bert-tiny" / "version_0" / "hf").is_dir()


def test_an_earlier_run_is_kept_unless_overwrite_says_otherwise(sample_corpus, tmp_path, capsys, caplog):
    fixed = ["--trainer.logger.init_args.version=0"]
    code, _, err = run_cli(fit_args(sample_corpus, tmp_path / "runs", *fixed), capsys)
    assert code == 0, err
    run_dir = tmp_path / "runs" / "bert-tiny" / "version_0"
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and "events" not in p.name}

    code, out, err = run_cli(fit_args(sample_corpus, tmp_path / "runs", *fixed), capsys)
    assert code == 2
    [line] = error_lines(err)
    assert str(run_dir) in line and "--resume" in line and "--overwrite true" in line
    assert "Traceback" not in err + out
    assert {p: p.read_bytes() for p in before} == before  # nothing was touched

    marker = run_dir / "checkpoints" / "rst-9.9999h.ckpt"  # a checkpoint the new run would never write
    marker.write_bytes(b"old")
    code, _, err = run_cli(fit_args(sample_corpus, tmp_path / "runs", *fixed, "--overwrite=true"), capsys)
    assert code == 0, err
    assert "--overwrite: removing the earlier run" in caplog.text
    assert not marker.exists() and updates(run_dir) == json.loads(before[run_dir / "summary.json"])["updates"]


@pytest.mark.parametrize(("extra", "expected"), [
    (["--resume=true", "--ckpt_path=some.ckpt"], "give one of the two"),
    (["--ckpt_path=missing.ckpt"], "no such checkpoint file"),
], ids=["resume-and-ckpt-path", "missing-ckpt-path"])
def test_contradictory_or_missing_checkpoints_are_one_error_line(extra, expected, sample_corpus, tmp_path, capsys):
    code, out, err = run_cli(fit_args(sample_corpus, tmp_path / "runs", *extra), capsys)
    assert code == 2 and "Traceback" not in out + err
    [line] = error_lines(err)
    assert expected in line
    assert not (tmp_path / "runs").exists()  # refused before anything was written


def test_a_nan_loss_stops_the_run_naming_the_update_and_keeps_the_last_good_checkpoint(sample_corpus, tmp_path,
                                                                                        capsys):
    code, out, err = run_cli(fit_args(sample_corpus, tmp_path / "runs", "--trainer.logger.init_args.version=0",
                                      "--trainer.callbacks+=tests.test_run_directories.PoisonAt",
                                      "--trainer.callbacks.step=5"), capsys)
    assert code == 2 and "Traceback" not in out + err
    [line] = error_lines(err)
    assert "NaN or inf at update 5" in line and "last.ckpt" in line and "lower the learning rate" in line
    run_dir = tmp_path / "runs" / "bert-tiny" / "version_0"
    assert not (run_dir / "hf").exists() and not (run_dir / "summary.json").exists()
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] < 5  # written before the poisoned update
    for path in (run_dir / "checkpoints").glob("*.ckpt"):
        weights = torch.load(path, weights_only=False)["state_dict"]
        assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point()), path.name


@pytest.mark.parametrize(("message", "expected"), [
    ('Parser key "budget.budget":\n  Expected a <class \'float\'>. Got value: abc', "budget.budget:"),
    ("unrecognized arguments: --budget.bugdet=1 extra", "unrecognized arguments: --budget.bugdet=1; `ntng fit --help`"),
    ('Parser key "trainer.callbacks":\n  Problem with given class_path \'callbacks.stacking.LayerStacking\':\n'
     "    Option 'depths' is not accepted", "callbacks.stacking.LayerStacking has no option 'depths'"),
], ids=["wrong-type", "unknown-key", "unknown-method-option"])
def test_parse_errors_become_one_line_with_the_key_and_the_fix(message, expected):
    line = parse_error_line(message)
    assert "\n" not in line and expected in line
