"""What selective backprop and RHO-loss share: a candidate stream, scoring, and the in-place batch swap.

Why this shape. A Lightning callback cannot skip a batch or change how many micro-batches an update
has, and a step skipped on one DDP rank hangs the others (``training_step`` returning ``None`` is
refused under DDP). So Lightning's loop runs unchanged and only *what* a micro-batch holds changes:

* The callback owns this rank's candidate stream (:class:`CandidateStream`): seeded permutations of
  the data module's training ids, sharded by rank, read and masked by ``datamodule.masked_batches``
  exactly as a training batch would be (masking runs in the loader workers).
* In ``on_train_batch_start`` it scores as many candidate micro-batches as the method needs with
  ``pl_module.per_example_losses`` (no gradient; charged forward-only on the clock before the
  update's optimizer step, under DDP for the rank that scored most), keeps the chosen
  rows in a device buffer (:class:`SelectedRows`), and overwrites the tensors of the batch dict that
  Lightning passes on to ``training_step`` with exactly as many buffered rows as Lightning's batch had.

So every rank runs every micro-batch and every optimizer step, each update trains on exactly
``batch_size`` selected examples, and the clock sees every scoring pass and every trained micro-batch
at the depth it ran. Lightning's own loader still runs, and its batches are only used for their row
count: the callback tells the data module so at setup (``training_batches_replaced``), and those
batches are only stacked blocks, never masked. The candidate stream,
the buffer and the method's state are saved with the callback, so a resumed run continues exactly.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer

from app.errors import ConfigurationError
from app.modules.budgeted import require_budgeted_module
from callbacks.sampling import multi_process, run_seed

TRAINED_KEYS = ("input_ids", "labels", "example_ids")


class CandidateStream:
    """This rank's endless stream of masked candidate micro-batches.

    Epoch ``e`` is ``default_rng([seed, e]).permutation`` of the training ids, rank ``r`` of ``w``
    taking positions ``r, r + w, ...`` (the same count on every rank), cut into batches of
    ``batch_size`` (an incomplete last batch is dropped). Rows are masked with epoch ``e``, so
    dynamic masking works as in a plain run and a row's mask is known from (id, epoch) alone.

    Args:
        data: a data module with ``train_example_ids`` and ``masked_batches(ids, epoch, batch_size)``.
        batch_size: rows per candidate batch.
        seed: seed of the epoch orders.
        rank: this process's rank.
        world_size: number of ranks.
    """

    def __init__(self, data: Any, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.data, self.batch_size, self.seed, self.rank, self.world_size = data, batch_size, seed, rank, world_size
        self.example_ids = np.asarray(data.train_example_ids, dtype=np.int64)
        self.batches_per_epoch = len(self.example_ids) // world_size // batch_size
        if self.batches_per_epoch == 0:
            raise ConfigurationError(
                f"batch selection: {len(self.example_ids)} training examples over {world_size} rank(s) "
                f"do not fill one candidate batch of {batch_size}"
            )
        self.epoch = 0
        self.batches_read = 0  # in this epoch
        self._batches = None

    def order(self, epoch: int) -> np.ndarray:
        """This rank's example ids of ``epoch``, in reading order."""
        permutation = np.random.default_rng([self.seed, epoch]).permutation(len(self.example_ids))
        shard = permutation[self.rank :: self.world_size][: self.batches_per_epoch * self.batch_size]
        return self.example_ids[shard]

    def next(self) -> tuple[dict[str, torch.Tensor], int]:
        """The next candidate batch (CPU tensors) and the epoch it was masked for."""
        if self.batches_read == self.batches_per_epoch:
            self.epoch, self.batches_read, self._batches = self.epoch + 1, 0, None
        if self._batches is None:
            remaining = self.order(self.epoch)[self.batches_read * self.batch_size :]
            self._batches = iter(self.data.masked_batches(remaining, self.epoch, self.batch_size))
        self.batches_read += 1
        return next(self._batches), self.epoch

    def close(self) -> None:
        """Drop the open loader (and its worker processes)."""
        self._batches = None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_read": self.batches_read}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batches_read, self._batches = int(state["epoch"]), int(state["batches_read"]), None


class SelectedRows:
    """A FIFO of selected rows (``input_ids``, ``labels``, ``example_ids``), kept on device."""

    def __init__(self) -> None:
        self.rows: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.rows["example_ids"]) if self.rows else 0

    def add(self, rows: dict[str, torch.Tensor], index: torch.Tensor) -> None:
        """Append ``rows[key][index]`` for the keys training uses."""
        chosen = {key: rows[key][index] for key in TRAINED_KEYS}
        self.rows = {key: torch.cat([self.rows[key], value]) for key, value in chosen.items()} if self.rows else chosen

    def take(self, count: int) -> dict[str, torch.Tensor]:
        """Remove and return the ``count`` oldest rows."""
        taken = {key: value[:count] for key, value in self.rows.items()}
        self.rows = {key: value[count:] for key, value in self.rows.items()}
        return taken

    def to(self, device: torch.device) -> None:
        self.rows = {key: value.to(device) for key, value in self.rows.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {key: value.cpu() for key, value in self.rows.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.rows = dict(state)


class BatchSelection(Callback):
    """Base of the batch-selection callbacks: subclasses implement :meth:`fill`.

    Logs once per optimizer update, over the candidates scored during it: ``method/selection_rate``
    (rows selected / rows scored), ``method/scored_loss`` and ``method/selected_loss`` (mean
    per-example loss at scoring time), and ``method/candidate_epoch``. Subclasses log the mean of
    more per-row scores over the selected rows by extending :attr:`SELECTED_MEANS`.

    Args:
        charge_scoring: charge each scoring pass as forward-only reference time; False is NTNG's
            "free" ablation (selection then costs wall time but no budget).
        seed: seed of the candidate order and of any random selection; ``None`` uses the run's.
    """

    # Per-row score -> the tag logging its mean over the rows selected in an update.
    SELECTED_MEANS = {"loss": "method/selected_loss"}
    # Strategy kind -> why it is refused (app.modules.strategies.check_strategy_support; docs/strategies.md).
    unsupported_strategies: ClassVar[dict[str, str]] = {
        "fsdp": "it scores candidates by calling the module's forward directly, outside FSDP's wrapper, "
                "where the parameters FSDP shards are not gathered",
        "deepspeed": "untested: it scores candidates by calling the module's forward directly, outside the "
                     "DeepSpeed engine, where ZeRO-3 does not gather the partitioned parameters",
    }

    def __init__(self, charge_scoring: bool = True, seed: int | None = None) -> None:
        self.charge_scoring, self.seed = charge_scoring, seed
        self.stream: CandidateStream | None = None
        self.buffer = SelectedRows()
        self.batches_scored = 0  # candidate batches scored on this rank (seeds per-batch draws)
        self._unpaid_batches = 0  # scored in this update, charged before its optimizer step
        self._candidate_tokens = 0  # tokens of one candidate batch (what a scoring pass is charged for)
        self._saved_ranks: list[dict[str, Any]] | None = None  # restored before setup, applied there
        self._update = self._new_update()

    def _new_update(self) -> dict[str, Any]:
        return {"scored": 0, "selected": 0, "scored_loss": 0.0, "selected_sums": dict.fromkeys(self.SELECTED_MEANS, 0.0)}

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        data = trainer.datamodule
        if data is None or not hasattr(data, "masked_batches") or getattr(data, "train_example_ids", None) is None:
            raise ConfigurationError(
                f"{type(self).__name__} reads candidates by example id: it needs a data module with "
                "train_example_ids and masked_batches (PretrainingDataModule with streaming=false)"
            )
        require_budgeted_module(pl_module, type(self).__name__, needs=("per_example_losses",))
        self.seed = run_seed(self.seed)
        self.stream = CandidateStream(
            data, data.hparams.micro_batch_size, self.seed, trainer.global_rank, trainer.world_size
        )
        self._candidate_tokens = self.stream.batch_size * data.seq_len
        data.training_batches_replaced = True  # set before Lightning asks for the training loader
        self._restore()

    # -- the swap ---------------------------------------------------------------------------------

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        rows, device = batch["input_ids"].shape[0], batch["input_ids"].device
        self.buffer.to(device)
        with torch.no_grad(), trainer.precision_plugin.train_step_context():
            self.fill(trainer, pl_module, rows, batch_idx % trainer.accumulate_grad_batches)
        chosen = self.buffer.take(rows)
        for key in TRAINED_KEYS:
            batch[key] = chosen[key]

    def fill(self, trainer: Trainer, pl_module: LightningModule, rows: int, micro_step: int) -> None:
        """Score candidates and add selected rows until the buffer holds at least ``rows``.

        Args:
            trainer: the trainer.
            pl_module: the module being trained (scores with ``per_example_losses``).
            rows: rows the coming micro-batch takes.
            micro_step: index of this micro-batch within its optimizer update.
        """
        raise NotImplementedError

    def score(self, pl_module: LightningModule) -> tuple[dict[str, torch.Tensor], int]:
        """Read the next candidate batch, move it to the module's device and add each row's ``loss``.

        Returns:
            The rows (``input_ids``, ``labels``, ``example_ids``, ``loss``) and their masking epoch.
        """
        cpu, epoch = self.stream.next()
        rows = {key: cpu[key].to(pl_module.device, non_blocking=True) for key in TRAINED_KEYS}
        rows["loss"] = pl_module.per_example_losses(rows, charge=False).float()
        self.batches_scored += 1
        self._unpaid_batches += 1
        # Sums stay on the device (no host sync per candidate batch) until the update is logged.
        self._update["scored"] += len(rows["loss"])
        self._update["scored_loss"] = self._update["scored_loss"] + rows["loss"].sum()
        return rows, epoch

    def select(self, rows: dict[str, torch.Tensor], index: torch.Tensor) -> None:
        """Add ``rows[index]`` to the buffer (and to this update's statistics)."""
        index = index.to(rows["loss"].device)
        self.buffer.add(rows, index)
        self._update["selected"] += len(index)
        sums = self._update["selected_sums"]
        for key in sums:
            sums[key] = sums[key] + rows[key][index].sum()

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        # Scoring is paid per update, before the module sets the LR from budget progress. Under DDP
        # ranks score different numbers of candidates (selective backprop) but wait for the slowest
        # at the gradient all-reduce, and every rank's clock must agree (LR, cadence, stop): each
        # charges the largest count of any rank.
        batches, self._unpaid_batches = self._unpaid_batches, 0
        if not self.charge_scoring:
            return
        if multi_process():
            count = torch.tensor(batches, device=pl_module.device)
            dist.all_reduce(count, op=dist.ReduceOp.MAX)
            batches = int(count)
        for _ in range(batches):
            pl_module.charge("forward", self._candidate_tokens)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        update, self._update = self._update, self._new_update()
        if update["scored"]:
            pl_module.log_update("method/selection_rate", update["selected"] / update["scored"])
            pl_module.log_update("method/scored_loss", float(update["scored_loss"]) / update["scored"])
        if update["selected"]:
            for key, tag in self.SELECTED_MEANS.items():
                pl_module.log_update(tag, float(update["selected_sums"][key]) / update["selected"])
        pl_module.log_update("method/candidate_epoch", float(self.stream.epoch))

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.stream is not None:
            self.stream.close()

    # -- resume -----------------------------------------------------------------------------------
    # Every rank has its own stream position, buffer and history, but Lightning keeps rank 0's
    # callback state only. Checkpoints are dumped on every rank in step, so the states are
    # gathered there and each rank takes its own back on resume.

    def rank_state(self) -> dict[str, Any]:
        """This rank's state (subclasses add theirs)."""
        return {"stream": self.stream.state_dict(), "buffer": self.buffer.state_dict(),
                "batches_scored": self.batches_scored}

    def load_rank_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`rank_state` (the stream exists by then)."""
        self.stream.load_state_dict(state["stream"])
        self.buffer.load_state_dict(state["buffer"])
        self.batches_scored = int(state["batches_scored"])

    def state_dict(self) -> dict[str, Any]:
        if self.stream is None:  # saved before training started
            return {"ranks": self._saved_ranks}
        state = self.rank_state()
        if multi_process():
            states: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(states, state)
            return {"ranks": states}
        return {"ranks": [state]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._saved_ranks = state_dict["ranks"]
        if self.stream is not None:  # Lightning restores callbacks after ``setup``
            self._restore()

    def _restore(self) -> None:
        if self._saved_ranks is None:
            return
        if len(self._saved_ranks) != self.stream.world_size:
            raise ConfigurationError(
                f"{type(self).__name__}: the checkpoint holds the selection state of {len(self._saved_ranks)} "
                f"rank(s) but this run has {self.stream.world_size}; batch selection resumes only on as many ranks"
            )
        self.load_rank_state(self._saved_ranks[self.stream.rank])
