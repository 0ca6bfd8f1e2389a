"""A real process, stopped mid-run by SIGTERM (pre-emption notice) or SIGKILL (no notice), resumed with
``--ckpt_path last``, ends exactly as the uninterrupted run: same updates, RST and bitwise weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO_ROOT


def fit_command(corpus: Path, root: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "app.cli", "fit", "-c", str(REPO_ROOT / "configs" / "bert" / "tiny.yaml"),
            f"--data.init_args.sources=[{corpus}]", "--data.init_args.tokenizer_vocab_size=500",
            "--data.init_args.val_size=16", "--budget.budget=0.0004", "--budget.allow_profile_mismatch=true",
            "--budget.checkpoint_every_fraction=0.1", "--budget.validate_every_fraction=0.5",
            "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={root}", "--trainer.logger.init_args.version=0", *extra]


def run_dir(root: Path) -> Path:
    return root / "bert-tiny" / "version_0"


@pytest.mark.slow  # three interpreter starts and fits: about 30 s each
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_stopped_run_resumed_with_ckpt_path_last_ends_as_the_uninterrupted_one(stop, sample_corpus, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run(fit_command(sample_corpus, tmp_path / "full"), cwd=tmp_path, env=env, check=True,
                   capture_output=True)

    stopped = subprocess.Popen(fit_command(sample_corpus, tmp_path / "part"), cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    checkpoints = run_dir(tmp_path / "part") / "checkpoints"
    deadline = time.time() + 120
    while not list(checkpoints.glob("rst-*.ckpt")) and time.time() < deadline and stopped.poll() is None:
        time.sleep(0.05)
    stopped.send_signal(stop)  # SIGTERM: as SLURM does before pre-empting; SIGKILL: no chance to save
    output = stopped.communicate(timeout=120)[0].decode()
    assert (checkpoints / "last.ckpt").is_file(), output[-2000:]
    # SIGTERM saves where it stopped; after SIGKILL, last.ckpt is the newest cadence checkpoint.
    assert ("SIGTERM: saved" in output) == (stop == signal.SIGTERM)
    assert not (run_dir(tmp_path / "part") / "hf").exists()  # it did not finish

    subprocess.run(fit_command(sample_corpus, tmp_path / "part", "--ckpt_path=last"), cwd=tmp_path, env=env,
                   check=True, capture_output=True)
    full, resumed = run_dir(tmp_path / "full"), run_dir(tmp_path / "part")
    summary = {name: json.loads((d / "summary.json").read_text()) for name, d in (("full", full), ("part", resumed))}
    assert summary["part"]["updates"] == summary["full"]["updates"]
    assert summary["part"]["rst_hours"] == summary["full"]["rst_hours"]
    expected = load_file(full / "hf" / "model.safetensors")
    for key, value in load_file(resumed / "hf" / "model.safetensors").items():
        assert torch.equal(value, expected[key]), key
