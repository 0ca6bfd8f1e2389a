"""Sophia-G: the GNB Hessian pass, its charging in a budgeted fit, DDP averaging, Lion via YAML, planners."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import yaml
from lightning.pytorch import Callback, Trainer

from app.accounting.cost_models import RSTProfile
from app.errors import ConfigurationError
from app.model.optimizers import SophiaG
from app.accounting.planning import PlanSettings
from app.commands.plan import profile_settings
from app.modules.masked_lm import MaskedLanguageModel
from callbacks.budget import ReferenceTimeBudget
from callbacks.sophia import SophiaHessian, refresh_hessian
from tests.conftest import (
    REPO_ROOT,
    RandomMLMData,
    fit_tiny,
    mlm_batch,
    plan_hours,
    run_cli,
    tiny_fit_args,
    tiny_masked_lm,
    write_profile,
)

SECONDS_PER_HOUR = 3600.0


def tiny_module(optimizer=None) -> MaskedLanguageModel:
    return tiny_masked_lm(optimizer=optimizer or (lambda params: SophiaG(params, lr=1e-3, rho=0.04, weight_decay=0.0)))


def hessians(optimizer) -> list[torch.Tensor]:
    return [optimizer.state[p]["hessian"].clone() for g in optimizer.param_groups for p in g["params"]]


# -- the pass --------------------------------------------------------------------------------------


def test_hessian_pass_samples_from_vocabulary_logits_at_loss_positions(monkeypatch):
    module = tiny_module()
    batch = mlm_batch(vocab_size=100, batch=4, seq=16, seed=3)
    shapes = []
    real = torch.distributions.Categorical

    def recording(*args, **kwargs):
        shapes.append(tuple(kwargs["logits"].shape))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.distributions, "Categorical", recording)
    count = module.hessian_pass(batch, charge=False)
    n_labels = int((batch["labels"] != -100).sum())
    assert count == n_labels
    assert shapes == [(n_labels, 100)]  # vocabulary logits, loss positions only (not hidden states)
    decoder = module.model.get_output_embeddings().weight  # tied to the word embeddings
    assert decoder.grad is not None and decoder.grad.abs().sum() > 0
    assert all(p.grad is not None for p in module.model.base_model.encoder.parameters())

    # The labels' values never matter (labels come from the model), only where they are: relabelling
    # the loss positions with other token ids leaves the estimate unchanged under the same seed.
    def grads_for(b):
        module.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        module.hessian_pass(b, charge=False)
        return [p.grad.clone() for p in module.parameters() if p.grad is not None]

    relabelled = dict(batch, labels=torch.where(batch["labels"] != -100, 7, -100))
    for a, b in zip(grads_for(batch), grads_for(relabelled)):
        torch.testing.assert_close(a, b)


def test_refresh_restores_grads_and_sets_bs_to_loss_tokens():
    module = tiny_module()
    optimizer = module.configure_optimizers()
    batches = [mlm_batch(100, 4, 16, seed=s) for s in (1, 2)]
    module.loss(batches[0]).backward()
    before = {p: p.grad for p in module.parameters()}
    tokens = refresh_hessian(module, optimizer, batches, charge=False)
    assert tokens == sum(int((b["labels"] != -100).sum()) for b in batches)
    assert all(p.grad is before[p] for p in module.parameters())  # the same tensors, untouched
    assert all(group["bs"] == tokens for group in optimizer.param_groups)
    assert sum(h.abs().sum() for h in hessians(optimizer)) > 0


def test_refuses_an_optimizer_without_update_hessian(tmp_path):
    module = tiny_module(lambda params: torch.optim.AdamW(params, lr=1e-3))
    trainer = Trainer(default_root_dir=tmp_path, max_steps=1, logger=False, callbacks=[SophiaHessian()],
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    with pytest.raises(ConfigurationError, match="update_hessian"):
        trainer.fit(module, datamodule=RandomMLMData.make())


# -- charging in a budgeted fit --------------------------------------------------------------------


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.hessian_after_first_step: float | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        if self.hessian_after_first_step is None and (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            self.hessian_after_first_step = float(sum(h.abs().sum() for h in hessians(trainer.optimizers[0])))


@pytest.mark.parametrize("charge", [True, False])
def test_hessian_passes_are_charged_as_training_micro_batches(tmp_path, charge):
    # 1 s per micro-batch (4 x 16 tokens, 2 layers); 2 micro-batches per update; Hessian every 2 updates
    # from 2 micro-batches, at updates 0, 2, 4, ... Charged: 2 s per update + 2 s per refresh.
    profile = write_profile(tmp_path / "p.yaml", {1: 0.5, 2: 1.0})
    budget = ReferenceTimeBudget(budget=11.0 / SECONDS_PER_HOUR, profile=str(profile))
    sophia, recorder = SophiaHessian(every_n_steps=2, hessian_micro_batches=2, charge=charge), LossRecorder()
    module = tiny_module()
    trainer = fit_tiny(module, [budget, sophia, recorder], tmp_path, accumulate_grad_batches=2, limit_val_batches=0)
    updates = trainer.global_step
    refreshes = (updates + 1) // 2  # updates 0, 2, 4, ... below ``updates``
    assert sophia.hessian_updates == refreshes
    hessian_passes = 2 * refreshes if charge else 0
    clock = module.clock
    assert clock.passes == {"forward": 0, "forward_backward": 2 * updates + hessian_passes}
    assert clock.rst_seconds == pytest.approx(1.0 * (2 * updates + hessian_passes))
    # Charged: 2 + 2 (update 0 + its refresh) + 2 + 2 + 2 ... crosses 11 s at update 4 (12 s);
    # free: 2 s per update crosses at update 6.
    assert updates == (4 if charge else 6)
    assert recorder.hessian_after_first_step > 0  # update 0 already had a Hessian
    assert all(torch.isfinite(torch.tensor(recorder.losses)))


# -- DDP averaging ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_batches(rank: int) -> list[dict[str, torch.Tensor]]:
    return [mlm_batch(100, 4, 16, seed=10 * rank + i) for i in range(2)]


def _sampled_gradient_sum(rank: int) -> tuple[list[torch.Tensor], int]:
    """Single process: the summed GNB gradient of ``rank``'s batches, under ``rank``'s sampling seed."""
    module = tiny_module()
    optimizer = module.configure_optimizers()
    torch.manual_seed(100 + rank)
    tokens = sum(module.hessian_pass(b, charge=False) for b in _rank_batches(rank))
    return [p.grad.clone() for g in optimizer.param_groups for p in g["params"]], tokens


def _ddp_worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        module = tiny_module()
        optimizer = module.configure_optimizers()
        torch.manual_seed(100 + rank)
        tokens = refresh_hessian(module, optimizer, _rank_batches(rank), charge=False)
        torch.save({"hessians": hessians(optimizer), "tokens": tokens,
                    "bs": [g["bs"] for g in optimizer.param_groups]}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
@pytest.mark.slow  # two gloo processes: about 20 s
def test_two_process_ddp_refresh_averages_the_estimate(tmp_path):
    torch.multiprocessing.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    (sums0, n0), (sums1, n1) = _sampled_gradient_sum(0), _sampled_gradient_sum(1)
    total = n0 + n1
    assert results[0]["tokens"] == results[1]["tokens"] == total
    assert results[0]["bs"] == results[1]["bs"] == [total, total]
    beta2 = 0.99
    for h0, h1, s0, s1 in zip(results[0]["hessians"], results[1]["hessians"], sums0, sums1):
        torch.testing.assert_close(h0, h1, rtol=0, atol=0)  # identical on both ranks
        g_hat = (s0 + s1) / total  # mean GNB gradient over every loss token of both ranks
        torch.testing.assert_close(h0, (1 - beta2) * g_hat * g_hat)


# -- Lion through YAML -----------------------------------------------------------------------------


def test_lion_overlay_trains(tmp_path, monkeypatch, sample_corpus, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(tiny_fit_args(sample_corpus, 0.00002, "lion"), capsys)
    assert code == 0, err
    run_dir = tmp_path / "runs" / "bert-tiny" / "version_0"
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    optimizer = config["model"]["init_args"]["optimizer"]
    assert optimizer["class_path"] == "pytorch_optimizer.Lion"
    assert optimizer["init_args"]["lr"] == pytest.approx(7e-4)
    checkpoint = torch.load(next((run_dir / "checkpoints").glob("*.ckpt")), weights_only=False)
    assert checkpoint["global_step"] > 0


# -- planners --------------------------------------------------------------------------------------


def _settings(profile: str, batch: int, micro: int, seq_len: int, optimizer: str = "AdamW") -> PlanSettings:
    return profile_settings(RSTProfile.load(REPO_ROOT / "configs" / "rst" / profile), batch, micro, seq_len,
                            optimizer)


def test_sophia_planner_buys_five_percent_fewer_updates():
    settings = _settings("ntng-bert-rtx3090.yaml", 1536, 128, 128)
    sophia_settings = _settings("ntng-bert-rtx3090.yaml", 1536, 128, 128, "SophiaG")
    baseline = plan_hours(None, settings, 24.0)
    sophia = plan_hours(SophiaHessian(), sophia_settings, 24.0)  # defaults: 6 micro-batches every 10 updates
    # +6/120 micro-batches per update: 1/1.05 of the updates.
    assert sophia["updates"] == pytest.approx(baseline["updates"] / 1.05, abs=1)
    assert sophia["micro_batches"] == 12 * sophia["updates"]  # Hessian passes are not trained on
    free = plan_hours(SophiaHessian(charge=False), sophia_settings, 24.0)
    assert free == baseline
    explicit = SophiaHessian(every_n_steps=10, hessian_micro_batches=12)
    assert plan_hours(explicit, sophia_settings, 24.0)["updates"] == pytest.approx(baseline["updates"] / 1.1, abs=1)


def test_lion_planner_uses_the_profiles_lion_step_cost():
    result = plan_hours(None, _settings("ntng-t5-a100.yaml", 144, 72, 512, "Lion"), 1.0)
    assert result["rst_hours"] * 3600 / result["updates"] == pytest.approx(1.043)
    assert result["updates"] == 3452  # ceil(3600 / 1.043): the crossing update is taken


@pytest.mark.parametrize("rates, warned", [([0.02] * 5, "raise rho"), ([0.9] * 5, "lower rho"), ([0.3] * 5, None),
                                           ([0.02] * 2, None)])  # fewer than a window: no verdict yet
def test_a_win_rate_outside_sophias_range_warns_once_with_the_direction(rates, warned, recwarn):
    callback = SophiaHessian(win_rate_window=5)
    for rate in rates + rates:
        callback._check_win_rate(rate)
    messages = [str(w.message) for w in recwarn if "win rate" in str(w.message)]
    assert messages == ([] if warned is None else [messages[0]]) and (warned is None or warned in messages[0])
