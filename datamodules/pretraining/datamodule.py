"""The pretraining data path: sources -> tokenizer -> packed blocks -> objective -> batches.

The objective (masked LM, or T5 span corruption) decides the block layout: masked LM's blocks are
``[CLS] + seq_len-2 stream tokens + [SEP]`` cut from one token stream in which every document ends
with ``[SEP]``, span corruption's are the raw tokens that corrupt to ``seq_len`` inputs, cut from a
stream of documents each ending with ``</s>``; no padding. A block's example id is its index in the
packed sequence, stable for the same sources, tokenizer, ``seq_len`` and objective layout. Packed
blocks are cached on disk (``<cache_dir>/blocks/<fingerprint>/``) so later runs skip tokenization.
The training order is seeded per epoch and checkpointed mid-epoch (``sampling``), so a resumed run
trains what an uninterrupted one would have.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, IterableDataset
from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast

from app.errors import ConfigurationError
from datamodules.pretraining import corpus
from datamodules.pretraining.blocks import BlockPacker, PackedBlocks, StreamedBlocks, split_example_ids
from datamodules.pretraining.mlm_masking import MaskedLanguageModeling
from datamodules.pretraining.objective import BlockLayout, PretrainingObjective, TrainingCollate
from datamodules.pretraining.sampling import ResumableLoader, ResumableSampler, TrainingPosition
from datamodules.pretraining.tokenizer import (
    cached_tokenizer, load_tokenizer, publish, reserved_token_count, tokenizer_fingerprint, trained_pad_token_id,
)

# Bump when the packing or the cache layout changes, so stale caches are never reused.
FORMAT_VERSION = 1

# The masking settings the data module still takes itself (an objective's other settings are its own).
_MASKING = ("mlm_probability", "mask_replace_prob", "random_replace_prob", "mask_seed")
_MLM_DEFAULTS = {name: p.default for name, p in inspect.signature(MaskedLanguageModeling).parameters.items()
                 if name in _MASKING}


class PretrainingDataModule(LightningDataModule):
    """Pretraining data: packed fixed-length blocks with stable ids, made into examples by an objective.

    Batches reaching the model are the objective's ``{"input_ids": LongTensor[B, seq_len], "labels":
    LongTensor[B, T], "example_ids": LongTensor[B]}`` (masked LM: masked inputs, ``T = seq_len``,
    labels -100 where nothing is predicted; span corruption: inputs with sentinels, the targets as
    labels). The objective runs where the batches are made: in the loader workers for cached
    blocks (training with the epoch the sampler drew each block in, evaluation with epoch 0), so
    with ``num_workers > 0`` it is off the training process's critical path; streamed training
    blocks are made into examples in ``on_before_batch_transfer`` (a stream has no epoch-tagged
    sampler).

    Args:
        sources: Local ``.txt`` (blank-line separated documents), ``.jsonl`` or ``.parquet`` files,
            directories (searched recursively, sorted by path), or hub dataset names.
        tokenizer: A saved tokenizer directory (e.g. a T5 one), a WordPiece ``vocab.txt`` path or a
            hub name; ``None`` trains the objective's kind of tokenizer on the corpus and caches it
            (WordPiece for masked LM, Unigram with T5's special tokens for span corruption). That
            training is not bit-reproducible (tokenizers issue #1794), so the cached copy is the
            reference: give all nodes one shared ``cache_dir``, or train once and pass the saved
            directory.
        tokenizer_vocab_size: Vocabulary size when training the tokenizer.
        lowercase: Lowercase text (training a tokenizer or building one from ``vocab.txt``).
        seq_len: Tokens per example the model sees, at least 8: the block length for masked LM
            ([CLS] and [SEP] included), the encoder input length for span corruption.
        text_field: Field or column holding the text in ``.jsonl``, ``.parquet`` and hub data.
        hub_config: Configuration name of hub datasets.
        hub_split: Split of hub datasets.
        streaming: Tokenize and pack on the fly instead of caching (hub names and local
            ``.jsonl``/``.parquet`` only; needs ``tokenizer`` and ``val_size``).
        max_documents: Use at most this many documents (quick runs); ``None`` uses all.
        val_fraction: Fraction of blocks held out for validation (at least one when positive).
        val_size: Number of validation blocks; overrides ``val_fraction``.
        max_val_blocks: Cap on the number of validation blocks; ``None`` for no cap.
        holdout_fraction: Fraction of all blocks held out of training for an auxiliary model
            (RHO-loss's irreducible-loss model; NTNG: 0.2). Validation is unchanged by it.
        train_split: ``train`` trains on the blocks that are neither validation nor holdout;
            ``holdout`` trains on the holdout instead (the irreducible-loss model's recipe).
        split_seed: Seed of the train/validation/holdout split.
        shuffle_seed: Seed of the training order (epoch ``e``'s order depends only on it and ``e``);
            ``None`` uses the run's ``seed_everything`` seed, else 0.
        micro_batch_size: Sequences per micro-batch per device (the optimizer batch is this times
            ``accumulate_grad_batches`` times the number of devices).
        eval_batch_size: Sequences per validation batch; defaults to ``micro_batch_size``.
        num_workers: DataLoader worker processes (kept alive between epochs when positive).
        objective: How blocks are laid out and become training examples (``MaskedLanguageModeling``
            or ``span_corruption.SpanCorruption``); ``None`` builds ``MaskedLanguageModeling`` from
            the four settings below, which must otherwise keep their defaults.
        mlm_probability: Fraction of non-special tokens selected for prediction.
        mask_replace_prob: Fraction of selected tokens replaced by [MASK].
        random_replace_prob: Fraction of selected tokens replaced by a random token.
        mask_seed: Seed of the masking; an example's mask depends only on (mask_seed, id, epoch).
        cache_dir: Cache for trained tokenizers and packed blocks; ``None`` uses ``$NTNG_CACHE_DIR``
            or ``~/.cache/ntng``.
    """

    def __init__(
        self,
        sources: list[str],
        tokenizer: str | None = None,
        tokenizer_vocab_size: int = 30522,
        lowercase: bool = True,
        seq_len: int = 128,
        text_field: str = "text",
        hub_config: str | None = None,
        hub_split: str = "train",
        streaming: bool = False,
        max_documents: int | None = None,
        val_fraction: float = 0.005,
        val_size: int | None = None,
        max_val_blocks: int | None = 10000,
        holdout_fraction: float = 0.0,
        train_split: Literal["train", "holdout"] = "train",
        split_seed: int = 0,
        shuffle_seed: int | None = None,
        micro_batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        objective: PretrainingObjective | None = None,
        mlm_probability: float = 0.15,
        mask_replace_prob: float = 0.8,
        random_replace_prob: float = 0.1,
        mask_seed: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        # Checkpoints are loaded with weights_only=True, so only plain values go into hparams.
        self.save_hyperparameters(ignore=["objective"])
        masking = {"mlm_probability": mlm_probability, "mask_replace_prob": mask_replace_prob,
                   "random_replace_prob": random_replace_prob, "mask_seed": mask_seed}
        if objective is not None and masking != _MLM_DEFAULTS:
            raise ConfigurationError("objective is given: set the masking settings on it, not on the data module")
        self.objective = objective if objective is not None else MaskedLanguageModeling(**masking)
        reserved = reserved_token_count(self.objective.tokenizer_kind)  # of a trained tokenizer
        checks = {
            f"seq_len must be at least 8, got {seq_len}": seq_len >= 8,
            f"tokenizer_vocab_size must exceed the {reserved} special tokens": tokenizer_vocab_size > reserved,
            "max_documents must be at least 1": max_documents is None or max_documents >= 1,
            f"val_fraction must be in [0, 1), got {val_fraction}": 0 <= val_fraction < 1,
            "val_size and max_val_blocks must be >= 0": min(val_size or 0, max_val_blocks or 0) >= 0,
            f"holdout_fraction must be in [0, 1), got {holdout_fraction}": 0 <= holdout_fraction < 1,
            f"train_split must be train or holdout, got {train_split!r}": train_split in ("train", "holdout"),
            "train_split: holdout needs holdout_fraction > 0": train_split == "train" or holdout_fraction > 0,
            "streaming has no holdout split (holdout_fraction needs cached blocks)": not (streaming and holdout_fraction),
            "split_seed and shuffle_seed must be >= 0": min(split_seed, shuffle_seed or 0) >= 0,
            f"data.init_args.micro_batch_size={micro_batch_size}, eval_batch_size={eval_batch_size}: batch sizes "
            "must be >= 1 (sequences per forward; eval_batch_size null uses the micro-batch); set positive "
            "ones": min(micro_batch_size, eval_batch_size or 1) >= 1,
            "num_workers must be >= 0": num_workers >= 0,
        }
        for message, ok in checks.items():
            if not ok:
                raise ConfigurationError(message)
        # Local sources are resolved now (cheap, and a typo fails at once); hub names only on first
        # use, so a recipe can be built (``ntng plan``) where its hub corpus cannot be reached.
        local = [name for name in sources if corpus.looks_like_path(name) or Path(name).expanduser().exists()]
        local_sources = corpus.resolve_sources(local) if local or not sources else []
        self._resolved_sources = local_sources if len(local) == len(sources) else None
        if streaming:
            corpus.check_streamable(local_sources, tokenizer, val_size)
        self._cache_dir = Path(cache_dir or os.environ.get("NTNG_CACHE_DIR") or "~/.cache/ntng").expanduser()
        self._tokenizer: PreTrainedTokenizerFast | None = None
        self._position: TrainingPosition | None = None  # of the latest resumable training loader
        # Set by a batch-selection callback that replaces every training batch's tensors with its own
        # rows: Lightning's batches then only give the row count, so they are not made into examples.
        self.training_batches_replaced = False
        self._corpus_parts: dict | None = None
        self._train = self._val = None
        # Set by setup(): the memory-mapped blocks (not when streaming) and the split's sorted ids;
        # ``train_example_ids`` are the ids this run trains on (the holdout's with train_split=holdout).
        self.blocks = self.train_example_ids = self.val_example_ids = self.holdout_example_ids = None
        self._blocks_path: Path | None = None

    @property
    def tokenizer(self) -> PreTrainedTokenizerFast:
        """The tokenizer, loaded (or trained on the corpus and cached) on first access."""
        if self._tokenizer is None:
            h = self.hparams
            if h.tokenizer is not None:
                self._tokenizer = load_tokenizer(h.tokenizer, h.lowercase, self.objective.tokenizer_roles)
            else:
                key, kind = json.dumps(self._corpus_fingerprint(), sort_keys=True), self.objective.tokenizer_kind
                self._tokenizer = cached_tokenizer(
                    self._cache_dir, key, kind, h.tokenizer_vocab_size, h.lowercase, self._documents
                )
            rank_zero_info(f"[data] tokenizer: {len(self._tokenizer)} tokens")
        return self._tokenizer

    @property
    def _sources(self) -> list:
        if self._resolved_sources is None:
            h = self.hparams
            self._resolved_sources = corpus.resolve_sources(h.sources)
        return self._resolved_sources

    @property
    def planned_vocab_size(self) -> int:
        """The vocabulary size the model will get, without training a tokenizer: ``len(tokenizer)``
        for a given one, else ``tokenizer_vocab_size`` (what a trained tokenizer is asked for and
        reaches on any corpus of realistic size). ``ntng plan`` links the model to it."""
        return self.vocab_size if self.hparams.tokenizer is not None else self.hparams.tokenizer_vocab_size

    @property
    def planned_pad_token_id(self) -> int:
        """The pad id the model will get: the given tokenizer's, else the trained one's (0 for
        WordPiece's [PAD] and Unigram's ``<pad>``)."""
        if self.hparams.tokenizer is not None:
            return self.pad_token_id
        return trained_pad_token_id(self.objective.tokenizer_kind)

    @property
    def vocab_size(self) -> int:
        """Number of token ids the model must embed (``len(tokenizer)``, added tokens included)."""
        return len(self.tokenizer)

    @property
    def pad_token_id(self) -> int:
        """Id of the tokenizer's [PAD] token."""
        return self.tokenizer.pad_token_id

    @property
    def seq_len(self) -> int:
        """Tokens per example the model sees (masked LM: per block; span corruption: encoder inputs)."""
        return self.hparams.seq_len

    @property
    def block_layout(self) -> BlockLayout:
        """The objective's block length and framing for this tokenizer and ``seq_len``."""
        return self.objective.layout(self.tokenizer, self.seq_len)

    def _bound_objective(self) -> PretrainingObjective:
        self.objective.bind(self.tokenizer)
        return self.objective

    @property
    def collator(self) -> DataCollatorForLanguageModeling:
        """The masked-LM objective's transformers collator (tokenizer and probabilities of ``mask_tokens``)."""
        return self._bound_objective().collator

    def _corpus_fingerprint(self) -> dict:
        if self._corpus_parts is None:
            h = self.hparams
            self._corpus_parts = {
                "sources": corpus.source_fingerprints(self._sources, h.hub_config, h.hub_split),
                "text_field": h.text_field,
                "max_documents": h.max_documents,
            }
        return self._corpus_parts

    def _documents(self) -> Iterator[str]:
        h = self.hparams
        documents = corpus.iter_documents(self._sources, h.text_field, h.hub_config, h.hub_split, h.max_documents)
        first = next(documents, None)
        if first is None:
            raise ConfigurationError(f"corpus is empty: no documents in {', '.join(h.sources)}; check "
                                     "data.init_args.sources (and text_field, max_documents)")
        yield first
        yield from documents

    def _prepare_blocks(self) -> Path:
        """Return the cache directory of the packed blocks, tokenizing and packing on a miss (idempotent)."""
        layout = self.block_layout
        parts = {"format": FORMAT_VERSION, **self._corpus_fingerprint(), "seq_len": self.seq_len}
        parts["tokenizer"] = tokenizer_fingerprint(self.tokenizer)
        # Format 1 fingerprints predate layouts: their blocks are BERT's. Naming only other layouts
        # keeps existing caches (and the irreducible losses keyed by them) valid.
        if layout != BlockLayout.bert(self.tokenizer, self.seq_len):
            parts["layout"] = layout.describe()
        digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
        target = self._cache_dir / "blocks" / digest[:16]
        if (target / "meta.json").is_file():
            rank_zero_info(f"[data] block cache hit: {target}")
            return target
        rank_zero_info(f"[data] block cache miss: reading {len(self._sources)} source(s), packing into {target}")
        dtype = np.uint16 if self.vocab_size <= 1 << 16 else np.int32
        packer = BlockPacker(self.tokenizer, layout)
        blocks = np.concatenate([chunk.astype(dtype) for chunk in packer.pack(self._documents())])
        if len(blocks) == 0:
            raise ConfigurationError(
                f"corpus too small: {packer.tokens} tokens in {packer.documents} documents, "
                f"one block of seq_len={self.seq_len} needs {layout.body_length}"
            )
        meta = {"fingerprint": parts, "blocks": len(blocks), "tokens": packer.tokens, "documents": packer.documents}
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        np.save(staging / "blocks.npy", blocks)
        (staging / "meta.json").write_text(json.dumps(meta, indent=2))
        publish(staging, target)
        rank_zero_info(f"[data] packed {packer.documents} documents, {packer.tokens} tokens into {len(blocks)} blocks")
        return target

    def prepare_data(self) -> None:
        """Tokenize, pack and cache the corpus (once per node); nothing to do when streaming."""
        if not self.hparams.streaming:
            self._prepare_blocks()

    def setup(self, stage: str | None = None) -> None:
        """Load the cached blocks (building them if ``prepare_data`` did not run) and split them."""
        if self._train is not None:
            return
        h = self.hparams
        if h.streaming:
            streams = corpus.open_streams(self._sources, h.text_field, h.hub_config, h.hub_split)
            self._train, self._val = (
                StreamedBlocks(streams, self, train=True),
                StreamedBlocks(streams, self, train=False),
            )
            self.val_example_ids = np.arange(h.val_size, dtype=np.int64)
            return
        path = self._blocks_path = self._prepare_blocks() / "blocks.npy"
        self.blocks = np.load(path, mmap_mode="r")
        train, val, holdout = split_example_ids(
            len(self.blocks), h.val_fraction, h.val_size, h.max_val_blocks, h.split_seed, h.holdout_fraction
        )
        if h.train_split == "holdout":
            train, holdout = holdout, train
        self.train_example_ids, self.val_example_ids, self.holdout_example_ids = train, val, holdout
        held = f" / {len(holdout)} held out" if h.holdout_fraction else ""
        rank_zero_info(f"[data] {len(train)} training ({h.train_split} split) / {len(val)} validation blocks{held}")
        self._train, self._val = PackedBlocks(path, train), PackedBlocks(path, val)

    def _loader_options(self) -> dict:
        workers = self.hparams.num_workers
        return {"num_workers": workers, "persistent_workers": workers > 0, "pin_memory": torch.cuda.is_available()}

    def train_dataloader(self) -> DataLoader:
        """Shuffled training blocks, ``micro_batch_size`` per batch, each epoch cut to whole updates.

        Cached blocks come in a seeded per-epoch order (this rank's share under DDP) from a loader
        Lightning checkpoints and resumes mid-epoch. Streams shard themselves, are not shuffled and
        cannot resume mid-epoch: they hold no position to skip to, so a resumed run re-reads them.
        """
        h = self.hparams
        trainer = self.trainer
        samples_per_update = h.micro_batch_size * getattr(trainer, "accumulate_grad_batches", 1)
        if isinstance(self._train, IterableDataset):
            self._position = None
            self._train.samples_per_update = samples_per_update  # epochs end on whole updates
            return DataLoader(self._train, batch_size=h.micro_batch_size, drop_last=True, **self._loader_options())
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        seed = h.shuffle_seed if h.shuffle_seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        sampler = ResumableSampler(self._train, seed, replicas, rank, samples_per_update=samples_per_update)
        collate = TrainingCollate(self._bound_objective(), apply=not self.training_batches_replaced)
        loader = ResumableLoader(self._train, sampler=sampler, batch_size=h.micro_batch_size, drop_last=True,
                                 collate_fn=collate, **self._loader_options())
        self._position = loader.position
        return loader

    def val_dataloader(self) -> DataLoader | list:
        """Validation blocks in id order (an empty list when there are none)."""
        if len(self.val_example_ids) == 0:
            return []
        size = self.hparams.eval_batch_size or self.hparams.micro_batch_size
        return DataLoader(self._val, batch_size=size, collate_fn=self._bound_objective().collate(0),
                          **self._loader_options())

    def test_dataloader(self) -> DataLoader | list:
        """The held-out blocks again: a pretraining corpus has one held-out split (``ntng test``)."""
        return self.val_dataloader()

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Count a trained batch for the loader's checkpointed position; make streamed training blocks
        into examples (every other batch was made in the loader).

        Lightning calls this as training consumes a batch (after fetching ahead), which is why
        the position is counted here and not in the loader.
        """
        if self.trainer is None or not self.trainer.training:
            return batch
        if self._position is not None:
            self._position.advance(self.trainer.current_epoch, self.trainer.num_training_batches)
            return batch
        return self._bound_objective().apply(batch["input_ids"], batch["example_ids"], self.trainer.current_epoch)

    # -- access by example id (batch-selection methods, irreducible losses) ------------------------

    def masked_batches(self, example_ids: np.ndarray, epoch: int, batch_size: int) -> DataLoader:
        """Batches of the given blocks, in the given order, made by the objective as training makes them.

        Row ``i`` of the stream is block ``example_ids[i]`` in ``epoch`` (masked LM: masked with
        ``(mask_seed, id, epoch)``; span corruption: corrupted with ``(seed, id, epoch)``): exactly
        the tensors a training batch holds for that example in that epoch. The objective runs in the loader's workers (``num_workers``). An incomplete last
        batch is kept.

        Args:
            example_ids: block ids to read, in order.
            epoch: the epoch of the masking (corruption).
            batch_size: rows per batch.

        Returns:
            A DataLoader of ``{"input_ids", "labels", "example_ids"}`` CPU batches.

        Raises:
            ConfigurationError: when streaming (blocks have no random access).
        """
        if self.hparams.streaming or self._blocks_path is None:
            raise ConfigurationError("access by example id needs cached blocks: set data.streaming=false (and call setup)")
        return DataLoader(
            PackedBlocks(self._blocks_path, np.asarray(example_ids, dtype=np.int64)),
            batch_size=batch_size,
            collate_fn=self._bound_objective().collate(epoch),
            num_workers=self.hparams.num_workers,
            pin_memory=torch.cuda.is_available(),
        )

    def example_fingerprint(self) -> dict:
        """What decides the training tensors of an example id: the packed blocks and the objective's settings.

        Two runs with equal fingerprints give example ``i`` of epoch ``e`` the same input and
        labels (files keyed by example id, such as irreducible losses, check it).
        """
        if self._blocks_path is None:
            raise ConfigurationError("example_fingerprint needs cached blocks: set data.streaming=false (and call setup)")
        return {"blocks": self._blocks_path.parent.name, "seq_len": self.seq_len, **self.objective.fingerprint()}

