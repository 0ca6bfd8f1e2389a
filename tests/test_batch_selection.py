"""Selective backprop and RHO-loss: the selection math, the in-place swap in real fits, the clock, resume,
the irreducible-loss file and ``ntng il-losses``, and the planners."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, Trainer

from app.accounting.cost_models import RSTProfile
from app.errors import ConfigurationError
from callbacks.irreducible_losses import IrreducibleLosses
from app.accounting.planning import PlanSettings
from app.commands.plan import profile_settings
from app.modules.masked_lm import MaskedLanguageModel
from callbacks.budget import ReferenceTimeBudget
from callbacks.rho_loss import RhoLoss, top_k_rows
from callbacks.selection import CandidateStream
from callbacks.selective_backprop import (
    SelectiveBackprop,
    expected_selection_rate,
    fixed_fraction_kept,
    keep_probabilities,
    loss_percentiles,
    sample_kept,
)
from datamodules.pretraining.datamodule import PretrainingDataModule
from tests.conftest import REPO_ROOT, TINY_CONFIG, plan_hours, run_cli, tiny_fit_args, write_profile

MICRO, SEQ = 8, 32

# -- selection math -------------------------------------------------------------------------------


def test_percentiles_match_scipy_rank_kind():
    # scipy.stats.percentileofscore's documented examples (kind="rank", the default NTNG uses).
    assert loss_percentiles(torch.tensor([1.0, 2, 3, 4]), torch.tensor([3.0])).item() == 0.75
    assert loss_percentiles(torch.tensor([1.0, 2, 3, 3, 4]), torch.tensor([3.0])).item() == pytest.approx(0.70)
    assert loss_percentiles(torch.tensor([1.0, 2, 3, 4]), torch.tensor([0.5, 9.0])).tolist() == [0.0, 1.0]


@pytest.mark.parametrize("beta, rate", [(1.0, 1 / 2), (2.0, 1 / 3), (3.0, 1 / 4)])
def test_keep_probability_gives_the_expected_selection_rate(beta, rate):
    generator = torch.Generator().manual_seed(0)
    history, kept, scored = torch.empty(0), 0, 0
    for step in range(200):  # the callback's loop: append the batch, rank it, draw
        losses = torch.rand(128, generator=generator) * 5
        history = torch.cat([history, losses])[-5000:]
        kept += len(sample_kept(keep_probabilities(loss_percentiles(history, losses), beta), generator))
        scored += 128
    assert kept / scored == pytest.approx(rate, abs=0.01)
    assert expected_selection_rate(beta, "history", 0.5) == pytest.approx(rate)


def test_keep_probability_favours_high_losses():
    history = torch.arange(100.0)
    probabilities = keep_probabilities(loss_percentiles(history, torch.tensor([10.0, 50.0, 99.0])), 2.0)
    assert probabilities[0] < probabilities[1] < probabilities[2] == 1.0
    assert probabilities[1].item() == pytest.approx(0.51**2)  # (50 below + 51 at or below + 1) / 200


def test_fixed_fraction_keeps_exactly_that_many_biased_to_high_losses():
    losses, generator = torch.randn(64), torch.Generator().manual_seed(1)
    counts = torch.zeros(64)
    for _ in range(300):
        kept = fixed_fraction_kept(losses, 0.25, generator)
        assert len(kept) == 16 and len(set(kept.tolist())) == 16 and kept.tolist() == sorted(kept.tolist())
        counts[kept] += 1
    order = losses.argsort()
    assert counts[order[-16:]].sum() > 3 * counts[order[:16]].sum()


def test_top_k_is_exact_and_keeps_candidate_order():
    scores = torch.tensor([0.3, -2.0, 5.0, 1.0, 4.0, -0.5])
    assert top_k_rows(scores, 3).tolist() == [2, 3, 4]
    scores = torch.randn(1000)
    assert set(top_k_rows(scores, 100).tolist()) == set(scores.argsort(descending=True)[:100].tolist())


def test_candidate_stream_shards_disjointly_and_resumes(tmp_path):
    data = selection_data(tmp_path)
    streams = [CandidateStream(data, MICRO, seed=5, rank=rank, world_size=2) for rank in range(2)]
    orders = [stream.order(0) for stream in streams]
    assert len(orders[0]) == len(orders[1]) and not set(orders[0]) & set(orders[1])
    assert set(orders[0]) | set(orders[1]) <= set(data.train_example_ids.tolist())
    assert not np.array_equal(streams[0].order(0), streams[0].order(1))  # a new order each epoch
    stream = streams[0]
    batches = [stream.next() for _ in range(stream.batches_per_epoch + 2)]
    assert [epoch for _, epoch in batches][-3:] == [0, 1, 1]
    assert torch.equal(torch.cat([b["example_ids"] for b, _ in batches[: stream.batches_per_epoch]]),
                       torch.from_numpy(orders[0]))
    resumed = CandidateStream(data, MICRO, seed=5, rank=0, world_size=2)
    resumed.load_state_dict({"epoch": 0, "batches_read": 3})
    batch, _ = resumed.next()
    assert torch.equal(batch["input_ids"], batches[3][0]["input_ids"])


# -- in a fit ---------------------------------------------------------------------------------------


def selection_data(tmp_path, documents: int = 120, **kwargs) -> PretrainingDataModule:
    """Random-word documents with a fixed word vocabulary: the same blocks on every machine (a trained
    WordPiece tokenizer is not bit-reproducible, and the DDP test depends on exact block counts)."""
    from datamodules.pretraining.tokenizer import SPECIAL_TOKENS
    from tests.test_datamodule import WORDS, write_corpus

    corpus, vocab = tmp_path / "corpus.txt", tmp_path / "vocab.txt"
    if not corpus.exists():
        write_corpus(corpus, documents=documents)
        vocab.write_text("\n".join([*SPECIAL_TOKENS.values(), ".", *sorted(set(WORDS))]) + "\n")
    options = dict(tokenizer=str(vocab), seq_len=SEQ, micro_batch_size=MICRO, val_size=8,
                   cache_dir=str(tmp_path / "cache")) | kwargs
    data = PretrainingDataModule([str(corpus)], **options)
    data.setup("fit")
    return data


def adamw(params):
    return torch.optim.AdamW(params, lr=1e-3)


def selection_module(data) -> MaskedLanguageModel:
    torch.manual_seed(0)
    return MaskedLanguageModel(config=TINY_CONFIG, vocab_size=data.vocab_size, pad_token_id=data.pad_token_id,
                               seq_len=SEQ, optimizer=adamw)  # a module-level function: ddp_spawn pickles it


class Recorder(Callback):
    """What training_step saw, per micro-batch (after the selection callback's swap)."""

    def __init__(self) -> None:
        self.example_ids: list[list[int]] = []
        self.logged: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.example_ids.append(batch["example_ids"].tolist())
        self.logged.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("method/")})


def fit(tmp_path, data, selection, steps=4, accumulate=2, ckpt_path=None, profile=None, stop_after=-1):
    """A fit budgeted at ``steps`` updates (the LR schedule follows it); ``stop_after`` cuts it short."""
    module, recorder = selection_module(data), Recorder()
    budget = ReferenceTimeBudget(budget=steps, unit="steps", profile=profile, allow_profile_mismatch=True)
    trainer = Trainer(
        default_root_dir=tmp_path, logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, max_steps=stop_after, accumulate_grad_batches=accumulate,
        callbacks=[selection, budget, recorder], log_every_n_steps=1,  # the recorder reads every update's values
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer, module, recorder


class SelectionLog:
    """Mixin for tests: remembers every candidate batch scored and every row selected."""

    def score(self, pl_module):
        rows, epoch = super().score(pl_module)
        self.scored_ids = getattr(self, "scored_ids", []) + rows["example_ids"].tolist()
        return rows, epoch

    def select(self, rows, index):
        super().select(rows, index)
        self.selected_ids = getattr(self, "selected_ids", []) + rows["example_ids"][index].tolist()


class LoggedSB(SelectionLog, SelectiveBackprop):
    pass


class LoggedRho(SelectionLog, RhoLoss):
    pass


def test_selective_backprop_trains_exactly_the_selected_rows_and_charges_scoring(tmp_path):
    data = selection_data(tmp_path)
    profile = RSTProfile.load(REPO_ROOT / "configs" / "rst" / "tiny-cpu.yaml")
    sb = LoggedSB(beta=1.0, seed=0)
    trainer, module, recorder = fit(tmp_path, data, sb, steps=5, accumulate=2,
                                    profile=str(REPO_ROOT / "configs" / "rst" / "tiny-cpu.yaml"))
    assert trainer.global_step == 5
    trained = [i for ids in recorder.example_ids for i in ids]
    assert all(len(ids) == MICRO for ids in recorder.example_ids) and len(recorder.example_ids) == 10
    # Every trained row was selected, in selection order; leftovers stay in the buffer.
    assert sb.selected_ids[: len(trained)] == trained and len(sb.buffer) == len(sb.selected_ids) - len(trained)
    assert 0.3 < len(sb.selected_ids) / len(sb.scored_ids) < 0.7
    # The clock paid one forward per scored candidate batch and one forward+backward per trained one.
    clock, tokens = module.clock, MICRO * SEQ
    assert clock.passes == {"forward": sb.batches_scored, "forward_backward": 10}
    assert clock.tokens_scored == len(sb.scored_ids) * SEQ and clock.tokens_trained == len(trained) * SEQ
    depth = {"encoder": 2}
    expected = (sb.batches_scored * profile.seconds("forward", tokens, depth)
                + 10 * profile.seconds("forward_backward", tokens, depth) + 5 * profile.optimizer_seconds("AdamW", depth))
    assert clock.rst_seconds == pytest.approx(expected)
    logged = recorder.logged[-1]
    assert 0 < logged["method/selection_rate"] <= 1
    assert logged["method/selected_loss"] >= logged["method/scored_loss"] - 1e-6  # selection prefers high losses


def test_free_scoring_charges_nothing_for_selection(tmp_path):
    data = selection_data(tmp_path)
    sb = SelectiveBackprop(variant="fixed_fraction", keep_fraction=0.5, charge_scoring=False, seed=0)
    _, module, recorder = fit(tmp_path, data, sb, steps=3, accumulate=1)
    assert module.clock.passes == {"forward": 0, "forward_backward": 3}
    assert sb.batches_scored == 3 * 2  # exactly half of each 8-row candidate batch kept
    assert recorder.logged[-1]["method/selection_rate"] == 0.5


@pytest.mark.parametrize("method", ["selective_backprop", "rho_loss"])
def test_resumes_exactly(tmp_path, method):
    data = selection_data(tmp_path)
    values = np.random.default_rng(0).random(len(data.train_example_ids)).astype(np.float32)
    write_il_losses(tmp_path / "il.npz", data, values)
    make = {"selective_backprop": lambda: SelectiveBackprop(seed=1),  # noqa: E731
            "rho_loss": lambda: RhoLoss(str(tmp_path / "il.npz"), seed=1)}[method]
    full, full_module, full_recorder = fit(tmp_path / "full", data, make(), steps=6)
    assert data.training_batches_replaced  # so Lightning's own batches were never masked
    partial, _, partial_recorder = fit(tmp_path / "part", data, make(), steps=6, stop_after=3)
    checkpoint = tmp_path / "part.ckpt"
    partial.save_checkpoint(checkpoint)
    resumed_selection = make()
    resumed, resumed_module, resumed_recorder = fit(tmp_path / "resumed", data, resumed_selection, steps=6,
                                                    ckpt_path=checkpoint)
    assert partial_recorder.example_ids + resumed_recorder.example_ids == full_recorder.example_ids
    assert resumed_selection.batches_scored == full.callbacks[0].batches_scored
    for a, b in zip(full_module.parameters(), resumed_module.parameters()):
        assert torch.equal(a, b)
    assert resumed_module.clock.rst_seconds == pytest.approx(full_module.clock.rst_seconds)


def write_il_losses(path, data, values=None, epochs=1) -> IrreducibleLosses:
    ids = data.train_example_ids
    losses = np.tile(values if values is not None else np.zeros(len(ids), np.float32), (epochs, 1))
    result = IrreducibleLosses(ids, losses, data.example_fingerprint(), {"test": True})
    result.save(path)
    return result


def test_rho_loss_trains_the_top_k_of_each_mega_batch(tmp_path, caplog):
    data = selection_data(tmp_path)
    # Examples with id % 4 == 0 are "irreducible" (huge IL): with 2x candidates they are never worth training.
    ids = data.train_example_ids
    il = np.where(ids % 4 == 0, 1000.0, 0.0).astype(np.float32)
    write_il_losses(tmp_path / "il.npz", data, il)
    rho = LoggedRho(str(tmp_path / "il.npz"), mega_batch_factor=2.0, seed=0)
    trainer, module, recorder = fit(tmp_path, data, rho, steps=3, accumulate=2)
    trained = [i for ids_ in recorder.example_ids for i in ids_]
    assert len(trained) == 3 * 2 * MICRO and not [i for i in trained if i % 4 == 0]
    assert len(rho.scored_ids) == 2 * len(trained) and trained == rho.selected_ids
    assert module.clock.passes == {"forward": 3 * 4, "forward_backward": 3 * 2}
    assert recorder.logged[-1]["method/selection_rate"] == 0.5
    assert recorder.logged[-1]["method/selected_irreducible_loss"] == 0.0
    assert "RhoLoss: not charged to this budget" in caplog.text  # the end-of-run report says so


def test_rho_loss_refuses_a_file_for_other_data(tmp_path):
    data = selection_data(tmp_path)
    write_il_losses(tmp_path / "il.npz", data)
    other_split = selection_data(tmp_path, split_seed=1)
    with pytest.raises(ConfigurationError, match="example ids but this run trains on .*split"):
        fit(tmp_path, other_split, RhoLoss(str(tmp_path / "il.npz")), steps=1)
    other_mask = selection_data(tmp_path, mask_seed=3)
    with pytest.raises(ConfigurationError, match="mask_seed: 0 in the file, 3 in the run"):
        fit(tmp_path, other_mask, RhoLoss(str(tmp_path / "il.npz")), steps=1)
    with pytest.raises(ConfigurationError, match="not found; make it with `ntng il-losses"):
        fit(tmp_path, data, RhoLoss(str(tmp_path / "missing.npz")), steps=1)


def test_irreducible_loss_file_round_trip(tmp_path):
    data = selection_data(tmp_path)
    values = np.random.default_rng(0).random(len(data.train_example_ids)).astype(np.float32)
    written = write_il_losses(tmp_path / "il.npz", data, values, epochs=2)
    loaded = IrreducibleLosses.load(tmp_path / "il.npz")
    assert np.array_equal(loaded.example_ids, written.example_ids) and np.array_equal(loaded.losses, written.losses)
    assert loaded.fingerprint == data.example_fingerprint() and loaded.provenance == {"test": True}
    table = loaded.table()
    assert table.shape == (2, int(data.train_example_ids.max()) + 1)
    assert torch.equal(table[1, torch.from_numpy(data.train_example_ids)], torch.from_numpy(values))
    assert torch.isnan(table[0, torch.from_numpy(data.val_example_ids[data.val_example_ids < table.shape[1]])]).all()


def test_il_losses_command_uses_the_training_runs_masks(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = selection_data(tmp_path, holdout_fraction=0.2)
    il_model = selection_module(data)
    model_dir = il_model.export_pretrained(tmp_path / "il-run" / "hf", data.tokenizer)
    (model_dir.parent / "checkpoints").mkdir()  # the IL run's clock, as its checkpoints keep it
    torch.save({"reference_clock": {"rst_seconds": 5400.0}}, model_dir.parent / "checkpoints" / "last.ckpt")
    profile = write_profile(tmp_path / "profile.yaml", {1: 0.6, 2: 1.2}, reference_tokens=MICRO * SEQ,
                            vocab=data.vocab_size, seq_len=SEQ)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "model:\n  class_path: app.modules.masked_lm.MaskedLanguageModel\n"
        f"  init_args: {{config: {TINY_CONFIG}}}\n"
        "data:\n  class_path: datamodules.pretraining.datamodule.PretrainingDataModule\n"
        f"  init_args: {{sources: ['{tmp_path / 'corpus.txt'}'], tokenizer: '{tmp_path / 'vocab.txt'}', seq_len: {SEQ}, "
        f"micro_batch_size: {MICRO}, val_size: 8, holdout_fraction: 0.2, cache_dir: '{tmp_path / 'cache'}'}}\n"
    )
    output = tmp_path / "il.npz"
    args = ["il-losses", "--model", str(model_dir), "-c", str(recipe), "--output", str(output),
            "--epochs", "2", "--device", "cpu", f"--budget.profile={profile}"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    assert "wrote" in out and "100 %" in err
    losses = IrreducibleLosses.load(output)
    # What the target run will not be charged, for its report: the IL run's clock and the IL pass,
    # priced by the recipe's profile (forward 0.4 s per 8 x 32 tokens at 2 layers).
    examples = len(data.train_example_ids)
    assert losses.provenance["il_model_rst_hours"] == 1.5
    assert losses.provenance["il_pass_rst_hours"] == pytest.approx(2 * examples / MICRO * 0.4 / 3600)
    assert f"over {examples:,} examples x 2 epoch(s)" in out and "(1.5 RST h)" in out
    losses.check(data.train_example_ids, data.example_fingerprint())
    # Each value is the IL model's loss on the example exactly as the run masks it in that epoch.
    il_model.eval()
    for epoch in (0, 1):
        batch = next(iter(data.masked_batches(data.train_example_ids[:MICRO], epoch, MICRO)))
        expected = il_model.per_example_losses(batch, charge=False).numpy()
        assert np.allclose(losses.losses[epoch, :MICRO], expected, atol=1e-5)
    assert not np.allclose(losses.losses[0], losses.losses[1])  # a new mask each epoch
    # Without --epochs it covers as many masking epochs as the recipe's budget will read: 30 updates
    # of 8 sequences, 2 candidates each.
    planned = ["il-losses", "--model", str(model_dir), "-c", str(recipe), "--output", str(tmp_path / "planned.npz"),
               "--device", "cpu", "--budget.budget=30", "--budget.unit=steps"]
    code, _, err = run_cli(planned, capsys)
    assert code == 0, err
    expected = -(-30 * MICRO * 2 // examples)
    assert IrreducibleLosses.load(tmp_path / "planned.npz").epochs == expected > 1
    assert f"{expected} masking epoch(s)" in err
    # The IL model's own recipe (training on the holdout) is refused, with the reason.
    code, _, err = run_cli(args + ["--data.init_args.train_split=holdout"], capsys)
    assert code == 2 and "pass the target run's recipe" in err


# -- planners ---------------------------------------------------------------------------------------


def bert_settings(selection_rate: float | None = None) -> PlanSettings:
    profile = RSTProfile.load(REPO_ROOT / "configs" / "rst" / "ntng-bert-rtx3090.yaml")
    return profile_settings(profile, 1536, 128, 128, "AdamW", selection_rate=selection_rate)


def test_planners_price_two_forwards_per_trained_micro_batch_at_ntng_defaults():
    settings = bert_settings()
    baseline = plan_hours(None, settings, 24)
    profile, depth, tokens = settings.profile, dict(settings.layers), settings.micro_batch_tokens
    per_update = (12 * profile.seconds("forward_backward", tokens, depth) + profile.optimizer_seconds("AdamW", depth)
                  + 24 * profile.seconds("forward", tokens, depth))
    for method in (SelectiveBackprop(), RhoLoss()):
        planned = plan_hours(method, settings, 24)
        assert planned["updates"] == int(np.ceil(24 * 3600 / per_update - 1e-9))
        assert planned["tokens"] == planned["updates"] * 1536 * 128
    assert plan_hours(SelectiveBackprop(charge_scoring=False), settings, 24) == baseline
    assert plan_hours(RhoLoss(charge_scoring=False), settings, 24) == baseline
    # beta 2 keeps a third: three forwards per trained micro-batch, fewer updates.
    assert plan_hours(SelectiveBackprop(beta=2.0), settings, 24)["updates"] < plan_hours(RhoLoss(), settings, 24)["updates"]
    assert plan_hours(RhoLoss(mega_batch_factor=10.0), settings, 24)["updates"] < baseline["updates"] / 4
    # An observed rate replaces the stationary one: a third kept prices like beta 2.
    assert plan_hours(SelectiveBackprop(), bert_settings(selection_rate=1 / 3), 24) == plan_hours(
        SelectiveBackprop(beta=2.0), settings, 24)


class RankRecorder(Callback):
    """Writes what each DDP rank trained on to ``<directory>/rank<r>.pt`` (spawned ranks share no memory),
    and with ``checkpoint`` saves a checkpoint at the end (every rank takes part in saving)."""

    def __init__(self, directory, checkpoint=None) -> None:
        self.directory, self.checkpoint, self.example_ids = directory, checkpoint, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.example_ids.append(batch["example_ids"].tolist())

    def on_train_end(self, trainer, pl_module):
        self.directory.mkdir(exist_ok=True)
        torch.save({"example_ids": self.example_ids, "steps": trainer.global_step, "scored": trainer.callbacks[0].batches_scored,
                    "forward": pl_module.clock.passes["forward"], "rst": pl_module.clock.rst_seconds},
                   self.directory / f"rank{trainer.global_rank}.pt")
        if self.checkpoint is not None:
            trainer.save_checkpoint(self.checkpoint)


def ddp_fit(data, directory, stop_after=-1, checkpoint=None, ckpt_path=None) -> list[dict]:
    trainer = Trainer(
        default_root_dir=directory, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0, max_steps=stop_after,
        accumulate_grad_batches=2, accelerator="cpu", devices=2, strategy="ddp_spawn",
        callbacks=[SelectiveBackprop(seed=0), ReferenceTimeBudget(budget=6, unit="steps"),
                   RankRecorder(directory, checkpoint)],
    )
    trainer.fit(selection_module(data), datamodule=data, ckpt_path=ckpt_path)
    return [torch.load(directory / f"rank{rank}.pt") for rank in range(2)]


@pytest.mark.slow  # two gloo processes: about 20 s
def test_two_ddp_ranks_take_every_step_on_their_own_candidates_and_resume_exactly(tmp_path):
    data = selection_data(tmp_path, documents=600)  # ~570 examples per rank: the run stays in epoch 0
    full = ddp_fit(data, tmp_path / "full")
    assert [r["steps"] for r in full] == [6, 6]
    assert all(len(r["example_ids"]) == 12 and all(len(ids) == MICRO for ids in r["example_ids"]) for r in full)
    trained = [{i for ids in r["example_ids"] for i in ids} for r in full]
    assert not trained[0] & trained[1]  # disjoint candidate shards
    # Ranks score different numbers of candidates, but every clock charges the slowest rank's per
    # update (they wait for it at the all-reduce), so LR, cadence and stop agree everywhere.
    assert full[0]["forward"] == full[1]["forward"] >= max(r["scored"] for r in full) >= 12
    assert full[0]["rst"] == full[1]["rst"]
    assert full[0]["scored"] != full[1]["scored"]  # the case that needs it (deterministic data)
    # Each rank's stream position, buffer and history survive a checkpoint (Lightning keeps rank 0's
    # callback state only; the callback gathers every rank's into it).
    checkpoint = tmp_path / "part.ckpt"
    part = ddp_fit(data, tmp_path / "part", stop_after=3, checkpoint=checkpoint)
    resumed = ddp_fit(data, tmp_path / "resumed", ckpt_path=checkpoint)
    for rank in range(2):
        assert part[rank]["example_ids"] + resumed[rank]["example_ids"] == full[rank]["example_ids"]


def test_selective_backprop_overlay_trains_and_logs(tmp_path, monkeypatch, sample_corpus, capsys):
    from tests.test_cli import _tensorboard_tags

    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(
        tiny_fit_args(sample_corpus, 0.00003, "selective_backprop") + ["--trainer.log_every_n_steps=1"], capsys
    )
    assert code == 0, err
    run_dir = tmp_path / "runs" / "bert-tiny" / "version_0"
    assert {"method/selection_rate", "method/scored_loss", "method/selected_loss"} <= _tensorboard_tags(run_dir)
    checkpoint = torch.load(next((run_dir / "checkpoints").glob("*.ckpt")), weights_only=True)
    clock = checkpoint["reference_clock"]
    assert clock["passes"]["forward"] >= clock["passes"]["forward_backward"] > 0  # >= 1 scoring pass per trained one


class SelectionRates(Callback):
    """Per update: (budget progress, rows selected / rows scored), read before the callback resets it."""

    def __init__(self, selection) -> None:
        self.selection, self.rates = selection, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        update = self.selection._update
        if update["scored"]:
            self.rates.append((pl_module.budget_progress(), update["selected"] / update["scored"]))


def test_history_in_updates_keeps_the_intended_share_at_a_small_batch(sample_corpus, tmp_path, monkeypatch):
    from app.recipe import build_recipe

    monkeypatch.chdir(tmp_path)
    configs = [str(REPO_ROOT / "configs/bert/tiny.yaml"), str(REPO_ROOT / "configs/methods/selective_backprop.yaml")]
    overrides = tiny_fit_args(sample_corpus, 0.0003)[3:] + ["--trainer.logger=false"]  # after fit -c tiny
    cli = build_recipe(configs, overrides)
    selection = next(c for c in cli.trainer.callbacks if isinstance(c, SelectiveBackprop))
    rates = SelectionRates(selection)
    cli.trainer.callbacks.insert(0, rates)  # before the selection callback resets its update's counts
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert selection._history_length == round(5000 / 1536 * 16)  # 3.26 batches of 16 rows
    later = [rate for progress, rate in rates.rates if progress >= 0.1]
    assert len(later) >= 10
    assert abs(sum(later) / len(later) - 0.5) < 0.1  # 1 / (beta + 1) with beta 1
