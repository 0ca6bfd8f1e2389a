"""Packed blocks: cutting a token stream into fixed-length examples, splitting them, reading them back.

A block is ``prefix + body + suffix`` (the objective's :class:`BlockLayout`: masked LM's is
``[CLS] + seq_len-2 stream tokens + [SEP]``, span corruption's bare stream tokens) cut from one
token stream in which every document ends with the layout's separator; its example id is its index
in the packed sequence.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info
from transformers import PreTrainedTokenizerFast

from app.errors import ConfigurationError
from datamodules.pretraining import corpus
from datamodules.pretraining.objective import BlockLayout

if TYPE_CHECKING:
    from datamodules.pretraining.datamodule import PretrainingDataModule

_TOKENIZE_BATCH = 1000


def tokenize_batch(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> list[list[int]]:
    """Token ids of each text without special tokens (the packer adds the layout's)."""
    # The backend call skips offset mappings and transformers' model_max_length warning on long documents.
    encodings = tokenizer.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    return [encoding.ids for encoding in encodings]


def _batches(items: Iterator, size: int) -> Iterator[list]:
    return iter(lambda: list(islice(items, size)), [])


class BlockPacker:
    """Cut the token stream (every document followed by the separator) into blocks of ``layout``.

    Args:
        tokenizer: Fast tokenizer.
        layout: Block length and framing (the objective's).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerFast, layout: BlockLayout) -> None:
        self.tokenizer, self.layout, self.width = tokenizer, layout, layout.body_length
        self.documents = self.tokens = 0  # totals so far; tokens include the document separators
        self._rest = np.empty(0, dtype=np.int64)

    def add(self, texts: list[str]) -> np.ndarray:
        """Tokenize and append documents; return the blocks completed by them, ``[k, layout.length]`` int64."""
        layout = self.layout
        pieces = [self._rest]
        for ids in tokenize_batch(self.tokenizer, texts):
            pieces += [np.asarray(ids, dtype=np.int64), np.array([layout.separator])]
        stream = np.concatenate(pieces)
        self.documents, self.tokens = self.documents + len(texts), self.tokens + len(stream) - len(self._rest)
        count = len(stream) // self.width
        self._rest = stream[count * self.width :]
        body = stream[: count * self.width].reshape(count, self.width)
        frame = [np.tile(np.asarray(ids, dtype=np.int64), (count, 1)) for ids in (layout.prefix, layout.suffix)]
        return np.concatenate([frame[0], body, frame[1]], axis=1)

    def pack(self, documents: Iterator[str]) -> Iterator[np.ndarray]:
        """Yield the completed blocks, one ``[k, layout.length]`` array per batch of documents."""
        return (self.add(batch) for batch in _batches(documents, _TOKENIZE_BATCH))


def split_example_ids(
    num_blocks: int,
    val_fraction: float,
    val_size: int | None,
    max_val_blocks: int | None,
    seed: int,
    holdout_fraction: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded train/validation/holdout split of block ids ``0..num_blocks-1``.

    With ``order = default_rng(seed).permutation(num_blocks)``, validation is the first ``n`` ids:
    ``n`` is ``val_size`` if given, else ``val_fraction * num_blocks`` (at least 1 when the fraction
    is positive), capped at ``max_val_blocks``. The holdout is the next
    ``int(holdout_fraction * num_blocks)`` ids, the rest is training. Validation never depends on
    the holdout, so runs with and without one evaluate on the same blocks.

    Returns:
        ``(train_ids, val_ids, holdout_ids)``, each sorted ``int64``.
    """
    count = val_size if val_size is not None else (max(1, int(num_blocks * val_fraction)) if val_fraction > 0 else 0)
    count = count if max_val_blocks is None else min(count, max_val_blocks)
    held = int(num_blocks * holdout_fraction)
    if count + held >= num_blocks:
        raise ConfigurationError(
            f"validation ({count}) and holdout ({held}) splits take all {num_blocks} blocks and leave no training block"
        )
    order = np.random.default_rng(seed).permutation(num_blocks).astype(np.int64)
    return np.sort(order[count + held :]), np.sort(order[:count]), np.sort(order[count : count + held])


def _sample(example_id: int, block: np.ndarray) -> dict:
    return {"input_ids": torch.from_numpy(block.astype(np.int64)), "example_ids": example_id}


class PackedBlocks(Dataset):
    """Map-style view of the cached blocks with ids ``example_ids``; the ``.npy`` is memory-mapped.

    An item is ``{"input_ids", "example_ids"}``; keyed by an ``(epoch, index)`` pair (what the
    training sampler yields) it also carries ``"epoch"``, which the training collate masks with.
    """

    def __init__(self, path: Path, example_ids: np.ndarray) -> None:
        self.path, self.example_ids, self._blocks = path, example_ids, None

    def __len__(self) -> int:
        return len(self.example_ids)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        if self._blocks is None:
            self._blocks = np.load(self.path, mmap_mode="r")
        epoch, index = key if isinstance(key, tuple) else (None, key)
        example_id = int(self.example_ids[index])
        sample = _sample(example_id, self._blocks[example_id])
        return sample if epoch is None else {**sample, "epoch": epoch}

    def __getstate__(self) -> dict:
        # Worker processes map the file themselves instead of receiving a pickled in-memory copy.
        return {**self.__dict__, "_blocks": None}


class StreamedBlocks(IterableDataset):
    """Blocks packed on the fly from opened streams; id = running block index in the stream.

    Blocks ``0..val_size-1`` are validation, the rest training. Every worker of every rank reads
    and packs the whole stream (a block's boundaries depend on all text before it) and keeps its
    share by block index modulo. Training shards by (rank, worker) and emits only complete rounds,
    so every rank gets the same number of blocks and no DDP rank waits on one that ran dry.
    Validation shards by worker only: every rank evaluates the same blocks. Every epoch re-reads
    the stream from its start; there is no mid-epoch resume state.

    Each training shard also emits its blocks in groups of ``samples_per_update`` (micro-batch
    size x gradient accumulation, set by the data module's ``train_dataloader``) and drops the
    incomplete last group. Every epoch then ends on a whole update, as cached epochs do: otherwise
    Lightning takes a short update on an epoch's leftover micro-batches, and callbacks that act at
    update boundaries (the budget stop, checkpoints, layer choices) miss it.
    """

    def __init__(self, streams: list, module: PretrainingDataModule, train: bool) -> None:
        self.streams, self.tokenizer, self.train, self.options = streams, module.tokenizer, train, module.hparams
        self.layout = module.block_layout
        self.samples_per_update = 1

    def _blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        documents = corpus.iter_streamed_documents(self.streams, self.options.text_field, self.options.max_documents)
        chunks = BlockPacker(self.tokenizer, self.layout).pack(documents)
        return enumerate(block for chunk in chunks for block in chunk)

    def __iter__(self) -> Iterator[dict]:
        worker = get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker is not None else (1, 0)
        if not self.train:
            blocks = islice(self._blocks(), self.options.val_size)
            yield from (_sample(index, block) for index, block in blocks if index % workers == worker_id)
            return
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
        shards, shard = world * workers, rank * workers + worker_id
        group: list[dict] = []
        for index, block in islice(self._blocks(), self.options.val_size, None):
            position = (index - self.options.val_size) % shards
            if position == shard:
                pending = _sample(index, block)
            if position == shards - 1:  # a complete round: every shard has its block
                group.append(pending)
                if len(group) == self.samples_per_update:
                    yield from group
                    group = []
