"""``ntng calibrate``: a profile of every active depth, timed in the conditions of training."""

from __future__ import annotations

import time

import torch

from app.accounting.cost_models import RSTProfile
import contextlib

from app.commands.calibrate import calibrate_module, median_seconds
from tests.conftest import REPO_ROOT, mlm_batch, run_cli, tiny_masked_lm


def test_between_runs_untimed_after_every_timed_run():
    calls = []
    seconds = median_seconds(lambda: time.sleep(0.002), warmup=1, repeats=3, device=torch.device("cpu"),
                             between=lambda: (calls.append(1), time.sleep(0.02)))
    assert len(calls) == 4 and seconds < 0.015  # the 20 ms between runs is not in the timing


def test_every_timed_optimizer_step_follows_a_fresh_backward():
    # Back to back on the same gradients the step runs cache-warm: 35 % faster than in training.
    stale = []  # per step: did any gradient already reach an earlier step?

    class RecordingAdamW(torch.optim.AdamW):
        def step(self, closure=None):
            grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
            stale.append(not grads or any(hasattr(g, "stepped") for g in grads))
            for g in grads:
                g.stepped = True
            return super().step(closure)

    module = tiny_masked_lm(optimizer=lambda params: RecordingAdamW(params, lr=1e-3))
    calibrate_module(module, mlm_batch(), contextlib.nullcontext, warmup=1, repeats=3, gradient_clip_val=1.0)
    assert len(stale) >= 4 and not any(stale[-4:])  # the step timing: one warm-up and three timed steps


def test_calibrate_writes_a_profile_of_every_depth_for_the_recipe(sample_corpus, tmp_path, capsys):
    output = tmp_path / "profile.yaml"
    code, out, err = run_cli(["calibrate", "-c", str(REPO_ROOT / "configs" / "bert" / "tiny.yaml"),
                              f"--data.init_args.sources=[{sample_corpus}]", "--data.init_args.tokenizer_vocab_size=500",
                              "--data.init_args.val_size=16", "--output", str(output), "--warmup", "1",
                              "--repeats", "2"], capsys)
    assert code == 0, err
    profile = RSTProfile.load(output)
    assert profile.model["layers"] == {"encoder": 2} and profile.model["vocab"] == 500
    for kind in ("forward", "forward_backward"):
        assert sorted(profile.passes[kind].table) == [1, 2] and all(v > 0 for v in profile.passes[kind].table.values())
    assert profile.optimizer_step_seconds["AdamW"] > 0  # the recipe's clipping at 0.5 timed with it
    assert profile.reference_tokens == 16 * 64
