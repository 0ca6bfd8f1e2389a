"""The training order: seeded per epoch, sharded by rank, and resumed exactly from a mid-epoch checkpoint."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from app.errors import ConfigurationError
from datamodules.pretraining.tokenizer import SPECIAL_TOKENS
from tests.test_datamodule import WORDS, make_dm

MICRO = 16


def ready(tmp_path, **kwargs):
    """Set-up data on the random-word corpus with a fixed vocabulary (trained WordPiece is not
    bit-reproducible, and these tests count batches)."""
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join([*SPECIAL_TOKENS.values(), ".", *sorted(set(WORDS))]) + "\n")
    dm = make_dm(tmp_path, tokenizer=str(vocab), micro_batch_size=MICRO, val_fraction=0.0, **kwargs)
    dm.setup("fit")
    return dm


def epoch_ids(loader, epoch: int) -> list[list[int]]:
    loader.sampler.set_epoch(epoch)  # as Lightning does before every epoch
    return [batch["example_ids"].tolist() for batch in loader]


def consume(dm, batches: list, epoch: int, epoch_batches: int) -> None:
    """What Lightning does with each trained batch: pass it through the hook in training mode."""
    dm.trainer = SimpleNamespace(training=True, current_epoch=epoch, num_training_batches=epoch_batches)
    for batch in batches:
        dm.on_before_batch_transfer(batch, 0)


def test_order_is_a_function_of_seed_and_epoch(tmp_path, monkeypatch):
    a, b = ready(tmp_path, shuffle_seed=3).train_dataloader(), ready(tmp_path, shuffle_seed=3).train_dataloader()
    assert epoch_ids(a, 1) == epoch_ids(b, 1) and epoch_ids(a, 0) == epoch_ids(b, 0)
    assert epoch_ids(a, 0) != epoch_ids(a, 1)
    assert epoch_ids(a, 0) != epoch_ids(ready(tmp_path, shuffle_seed=4).train_dataloader(), 0)
    assert len(a) == len(a.dataset) // MICRO > 4 and all(len(ids) == MICRO for ids in epoch_ids(a, 0))
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")  # seed_everything's: the default seed
    assert ready(tmp_path).train_dataloader().sampler.seed == 7
    monkeypatch.delenv("PL_GLOBAL_SEED")
    assert ready(tmp_path).train_dataloader().sampler.seed == 0


def test_an_epoch_ends_with_whole_updates(tmp_path):
    full = ready(tmp_path, shuffle_seed=0)
    batches = len(full.train_dataloader())
    accumulate = next(a for a in (3, 4, 5, 7) if batches % a)  # an epoch that does not divide into updates
    dm = ready(tmp_path, shuffle_seed=0)
    dm.trainer = SimpleNamespace(world_size=1, global_rank=0, accumulate_grad_batches=accumulate)
    loader = dm.train_dataloader()
    assert len(loader) == batches // accumulate * accumulate
    # The same order, cut where the last whole update ends (no update of fewer micro-batches).
    assert epoch_ids(loader, 1) == epoch_ids(full.train_dataloader(), 1)[:len(loader)]


def test_ranks_share_each_epoch_disjointly(tmp_path):
    shares = []
    for rank in (0, 1):
        dm = ready(tmp_path, shuffle_seed=0)
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        shares.append({i for ids in epoch_ids(dm.train_dataloader(), 2) for i in ids})
    assert len(shares[0]) == len(shares[1]) == len(dm.train_example_ids) // 2 // MICRO * MICRO
    assert not shares[0] & shares[1]


def test_loaded_state_yields_the_rest_of_the_epoch(tmp_path):
    dm = ready(tmp_path, shuffle_seed=1)
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(1)
    batches = list(loader)
    full = [batch["example_ids"].tolist() for batch in batches]
    consume(dm, batches[:4], epoch=1, epoch_batches=len(loader))
    state = loader.state_dict()
    assert state == {"epoch": 1, "batches": 4, "seed": 1, "num_replicas": 1}
    fresh = ready(tmp_path, shuffle_seed=1).train_dataloader()
    fresh.load_state_dict(state)
    assert len(fresh) == len(full)  # the epoch's length, not what is left of it
    assert [batch["example_ids"].tolist() for batch in fresh] == full[4:]
    assert epoch_ids(fresh, 2) == epoch_ids(loader, 2)  # later passes are whole
    consume(dm, batches[4:], epoch=1, epoch_batches=len(loader))
    assert loader.state_dict()["epoch"] == 2 and loader.state_dict()["batches"] == 0  # finished: next epoch's start


def test_resuming_under_another_order_is_refused(tmp_path):
    dm = ready(tmp_path, shuffle_seed=1)
    loader = dm.train_dataloader()
    state = {"epoch": 0, "batches": 2, "seed": 1, "num_replicas": 1}
    with pytest.raises(ConfigurationError, match="seed 1, this run has 2"):
        ready(tmp_path, shuffle_seed=2).train_dataloader().load_state_dict(state)
    ready(tmp_path, shuffle_seed=2).train_dataloader().load_state_dict({**state, "batches": 0})  # nothing to skip
    loader.load_state_dict(state)
    assert epoch_ids(loader, 1) == epoch_ids(ready(tmp_path, shuffle_seed=1).train_dataloader(), 1)  # other epoch: whole


class Recorder(LightningModule):
    """One parameter, trained on a statistic of the masked batch; remembers what each step saw."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[int, list[int], int]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, batch["example_ids"].tolist(), int(batch["input_ids"].sum())))
        target = (batch["labels"] != -100).float().mean() * batch["input_ids"].float().mean() / 100
        return (self.weight - target).pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def fit(tmp_path, run: str, steps: int, ckpt_path=None, **data):
    """Fit a fresh ``Recorder`` on fresh data, checkpointing every step into ``tmp_path/run``."""
    module, dm = Recorder(), ready(tmp_path, shuffle_seed=5, **data)
    trainer = Trainer(
        default_root_dir=tmp_path / run, max_steps=steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[ModelCheckpoint(tmp_path / run, filename="{step}", every_n_train_steps=1, save_top_k=-1)],
    )
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module


@pytest.mark.parametrize("workers", [0, 1])  # a worker draws its first indices before Lightning's set_epoch
def test_resumed_fit_trains_what_the_uninterrupted_one_did(tmp_path, workers):
    per_epoch = len(ready(tmp_path).train_dataloader())
    steps = 2 * per_epoch + 2
    full = fit(tmp_path, "full", steps, num_workers=workers)
    assert [epoch for epoch, _, _ in full.seen] == [0] * per_epoch + [1] * per_epoch + [2] * 2
    # Mid epoch 0, at the end of epoch 0 (resumes into epoch 1), mid epoch 1.
    for step in (3, per_epoch, per_epoch + 3):
        resumed = fit(tmp_path, f"from-{step}", steps, tmp_path / "full" / f"step={step}.ckpt", num_workers=workers)
        assert resumed.seen == full.seen[step:], step  # same ids, epochs and masks
        assert torch.equal(resumed.weight, full.weight)
