"""Every method on BERT and T5, as a real process killed at a random micro-batch (SIGKILL: no notice;
SIGTERM: the pre-emption notice SLURM sends), mid-accumulation included, then resumed with
``ntng fit --resume`` (or ``--ckpt_path last``): it ends as the uninterrupted run, same summary (RST, updates, tokens) and
bitwise-equal exported weights.

The processes are forked from a forkserver that imported ``app.cli`` once, so a fit costs its
training, not an interpreter start and the imports.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from safetensors.torch import load_file

from tests.test_methods import CASES, method_run

ACCUMULATE = 2  # every update is two micro-batches, so a kill can land between them
_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["app.cli", "tests.test_kill_resume"])


class KillAt(Callback):
    """Send this process ``signal_name`` when micro-batch ``micro_batch`` (counted from 1 over the
    whole run, resumed or not) has ended."""

    def __init__(self, micro_batch: int, signal_name: str = "SIGKILL") -> None:
        self.micro_batch, self.signal_name = micro_batch, signal_name

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.fit_loop.epoch_loop.total_batch_idx + 1 == self.micro_batch:
            os.kill(os.getpid(), getattr(signal, self.signal_name))


def _fit_in_child(args: list[str], env: dict[str, str], log: str) -> None:
    os.environ.update(env)
    torch.set_num_threads(1)
    with open(log, "w") as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
        from app.cli import main

        main(args)


def fit_process(configs: list[str], overrides: list[str], root: Path, *extra: str, timeout_s: float = 300) -> int:
    """``ntng fit`` in a forked process writing into ``root``; returns its exit code (negative: the signal)."""
    args = ["fit", *(a for c in configs for a in ("-c", c)), *overrides, f"--trainer.default_root_dir={root}", *extra]
    env = {"NTNG_CACHE_DIR": os.environ["NTNG_CACHE_DIR"], "OMP_NUM_THREADS": "1"}
    root.mkdir(parents=True, exist_ok=True)
    process = _CONTEXT.Process(target=_fit_in_child, args=(args, env, str(root / "fit.log")))
    process.start()
    process.join(timeout_s)
    if process.is_alive():
        process.kill()
        pytest.fail(f"ntng fit into {root} did not end within {timeout_s} s:\n{_tail(root)}")
    return process.exitcode


def _tail(root: Path) -> str:
    return (root / "fit.log").read_text(errors="replace")[-3000:]


def kill_plan(family: str, method: str, micro_batches: int) -> tuple[int, str]:
    """A seeded random micro-batch to kill at, mid-update for half the cases; SIGTERM for half of
    each kind, SIGKILL for the rest."""
    index = CASES.index((family, method))
    rng = random.Random(f"{family}/{method}")
    point = rng.randrange(micro_batches * 3 // 10, micro_batches - 2)  # after the first cadence checkpoint
    if point % ACCUMULATE != index % 2:  # odd index: an odd micro-batch, mid-update; even: an update boundary
        point += 1
    return point, "SIGTERM" if index % 4 in (1, 2) else "SIGKILL"


@pytest.mark.slow  # three fits per case
@pytest.mark.parametrize("family, method", [c for c in CASES if c[0] != "modernbert"])
def test_killed_at_a_random_micro_batch_and_resumed_it_ends_as_the_uninterrupted_run(family, method, sample_corpus,
                                                                                       tmp_path):
    run = method_run(family, method, sample_corpus, tmp_path)
    budget = next(o for o in run.overrides if o.startswith("--budget.budget="))
    # Twice the budget: the same number of updates as the method table's runs, each of two micro-batches.
    overrides = [o for o in run.overrides if o != budget] + [
        f"--budget.budget={2 * float(budget.split('=')[1])}", f"--trainer.accumulate_grad_batches={ACCUMULATE}",
        "--budget.checkpoint_every_fraction=0.2"]

    assert fit_process(run.configs, overrides, tmp_path / "full") == 0, _tail(tmp_path / "full")
    full = json.loads((tmp_path / "full" / "summary.json").read_text())
    point, signal_name = kill_plan(family, method, full["updates"] * ACCUMULATE)

    killed = tmp_path / "killed"
    code = fit_process(run.configs, overrides, killed, "--trainer.callbacks+=tests.test_kill_resume.KillAt",
                       f"--trainer.callbacks.micro_batch={point}", f"--trainer.callbacks.signal_name={signal_name}")
    if signal_name == "SIGKILL":
        assert code == -signal.SIGKILL, _tail(killed)
    else:  # a clean stop that saves where it stood when that is an update boundary
        assert code == 128 + signal.SIGTERM and "stopped by SIGTERM" in _tail(killed), _tail(killed)
        assert ("SIGTERM: saved" in _tail(killed)) == (point % ACCUMULATE == 0), _tail(killed)
    assert not (killed / "hf").exists() and not (killed / "summary.json").exists(), "the killed run finished"
    log = (killed / "fit.log").read_text()

    # Both spellings of "continue this run": --resume, and Lightning's --ckpt_path last.
    again = "--ckpt_path=last" if signal_name == "SIGTERM" else "--resume=true"
    assert fit_process(run.configs, overrides, killed, again) == 0, _tail(killed)
    assert "resuming" in (killed / "fit.log").read_text(), f"nothing was resumed (killed at micro-batch {point}):\n{log[-2000:]}"
    resumed = json.loads((killed / "summary.json").read_text())
    assert {k: v for k, v in resumed.items() if k != "wall_seconds"} == \
        {k: v for k, v in full.items() if k != "wall_seconds"}, f"killed at micro-batch {point} by {signal_name}"
    expected = load_file(tmp_path / "full" / "hf" / "model.safetensors")
    got = load_file(killed / "hf" / "model.safetensors")
    assert got.keys() == expected.keys()
    different = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not different, f"killed at micro-batch {point} by {signal_name}: {len(different)} tensors differ"
