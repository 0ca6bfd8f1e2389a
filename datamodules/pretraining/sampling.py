"""A training order that survives a mid-epoch resume.

The order of epoch ``e`` is a pure function of ``(seed, e)`` (``DistributedSampler``'s seeded
``randperm``, then this rank's share), not of torch's global RNG, so a resumed run can rebuild it.
The loader counts nothing itself: Lightning fetches ahead of training, so the data module counts
the batches training consumed (:class:`TrainingPosition`) and the loader checkpoints that count.
Lightning saves a training loader's ``state_dict()`` in the fit loop's checkpoint state and calls
``load_state_dict()`` before the resumed run iterates it; iteration must then continue with the
first batch the saved run had not trained.

The sampler yields ``(epoch, index)`` pairs, so the epoch travels with the indices to the loader
workers, which apply the objective (masking, span corruption) for that epoch off the training
process (:class:`~datamodules.pretraining.objective.TrainingCollate`): a persistent worker that is
already fetching the next epoch's batches masks them with the next epoch, never a stale one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice

from torch.utils.data import DataLoader, Dataset, DistributedSampler

from app.errors import ConfigurationError


@dataclass
class TrainingPosition:
    """Where training stands: ``batches`` of ``epoch``'s order are trained."""

    epoch: int = 0
    batches: int = 0

    def advance(self, epoch: int, epoch_batches: float) -> None:
        """Count one batch of ``epoch`` as trained.

        Args:
            epoch: The epoch of the batch (a new one restarts the count).
            epoch_batches: Batches Lightning trains per epoch (``trainer.num_training_batches``).
        """
        if epoch != self.epoch:
            self.epoch, self.batches = epoch, 0
        self.batches += 1
        if self.batches >= epoch_batches:
            # A finished epoch is the start of the next one: that is where Lightning resumes it.
            self.epoch, self.batches = epoch + 1, 0


class ResumableSampler(DistributedSampler):
    """Shuffled, tail-dropping ``DistributedSampler`` whose next pass can start part-way into an epoch.

    Being a ``DistributedSampler`` keeps Lightning from swapping in its own under DDP; Lightning
    calls ``set_epoch`` before every epoch. ``len`` is always the whole epoch (cut to whole
    updates), also when resuming part-way into one. Yields
    ``(epoch, index)`` pairs (the dataset takes either form, see ``PackedBlocks``).

    Args:
        dataset: The training dataset (map-style).
        seed: Seed of the order.
        num_replicas: Number of ranks sharing the epoch.
        rank: This rank.
        samples_per_update: Samples one update takes on this rank (micro-batch x accumulation): an
            epoch ends with whole updates. Lightning would otherwise step on the epoch's last
            micro-batch with a smaller batch, an update no callback deciding at accumulation
            boundaries sees, and no planner prices.
    """

    def __init__(self, dataset: Dataset, seed: int, num_replicas: int = 1, rank: int = 0,
                 samples_per_update: int = 1) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        # The parent takes the first total_size indices of the permutation, then this rank's share.
        self.num_samples = self.num_samples // samples_per_update * samples_per_update
        self.total_size = self.num_samples * num_replicas
        self._resume: tuple[int, int] | None = None

    def resume(self, epoch: int, samples: int) -> None:
        """Make the next pass cover ``epoch`` without its first ``samples`` samples (on this rank).

        Args:
            epoch: The epoch to continue.
            samples: Samples of it already trained.
        """
        # Lightning creates the resumed iterator before its own set_epoch, and loader workers draw
        # their first indices right then, so the epoch is set here already.
        self.set_epoch(epoch)
        self._resume = (epoch, samples)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        resume, self._resume = self._resume, None
        skip = resume[1] if resume is not None and resume[0] == self.epoch else 0
        epoch = self.epoch
        return ((epoch, index) for index in islice(super().__iter__(), skip, None))


class ResumableLoader(DataLoader):
    """The training DataLoader over a :class:`ResumableSampler`, checkpointed by Lightning mid-epoch.

    Args:
        dataset: The training dataset (map-style).
        sampler: Its sampler.
        **kwargs: Other ``DataLoader`` arguments.
    """

    def __init__(self, dataset: Dataset, *, sampler: ResumableSampler, **kwargs) -> None:
        super().__init__(dataset, sampler=sampler, **kwargs)
        self.position = TrainingPosition()  # advanced by the data module as batches are trained

    def state_dict(self) -> dict[str, int]:
        """The position, and the seed and rank count it is meaningful for."""
        return {
            "epoch": self.position.epoch,
            "batches": self.position.batches,
            "seed": self.sampler.seed,
            "num_replicas": self.sampler.num_replicas,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a saved position: the next pass skips the batches trained in its epoch.

        Args:
            state: A :meth:`state_dict`.

        Raises:
            ConfigurationError: When resuming mid-epoch under another seed or number of ranks
                (the rest of the saved epoch's order could not be rebuilt).
        """
        if state["batches"]:
            for key, now in (("seed", self.sampler.seed), ("num_replicas", self.sampler.num_replicas)):
                if state[key] != now:
                    raise ConfigurationError(
                        f"the checkpoint stopped mid-epoch with the training order's {key} {state[key]}, this run has "
                        f"{now}: resume with the same shuffle_seed (or seed_everything) and devices, or from an "
                        "end-of-epoch checkpoint"
                    )
        self.position.epoch, self.position.batches = state["epoch"], state["batches"]  # in place: the data module holds it
        self.sampler.resume(state["epoch"], state["batches"] * self.batch_size)
