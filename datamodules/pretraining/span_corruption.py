"""T5's span corruption; an example's noise mask is a pure function of (seed, example id, epoch).

The rule is T5's ``random_spans_noise_mask`` (google-research/text-to-text-transfer-transformer,
``t5/data/preprocessors.py``; nanoT5's numpy port in ``nanoT5/utils/copied_utils.py``): a block of
``L`` raw tokens has ``round(L * noise_density)`` noise tokens in ``round(noise / mean_span)``
spans, the noise and the non-noise tokens are each cut into that many non-empty runs uniformly at
random, and the runs alternate starting with non-noise. The inputs keep the non-noise tokens with
noise span ``k`` replaced by ``<extra_id_k>``; the targets are ``<extra_id_k>`` followed by span
``k``'s tokens, for every span. Both end with ``</s>``; their lengths depend only on ``L``, so
nothing is padded. Only the random source differs from T5's: one generator per example, seeded
from (seed, example id, epoch) like the masked-LM masking, and the whole batch is built at once.
"""

from __future__ import annotations

from itertools import count, takewhile

import torch
from transformers import PreTrainedTokenizerFast

from app.errors import ConfigurationError
from datamodules.pretraining.mlm_masking import example_seed
from datamodules.pretraining.objective import BlockLayout, PretrainingObjective, stack_blocks

# Bump when the corruption rule or its random draws change: files keyed by example id record it.
SPAN_CORRUPTION_VERSION = 1


def noise_counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """The numbers of noise tokens and noise spans in a block, as ``random_spans_noise_mask`` sets them.

    Args:
        length: Raw tokens in the block.
        noise_density: Fraction of tokens that are noise.
        mean_noise_span_length: Mean tokens per noise span.

    Returns:
        ``(noise_tokens, noise_spans)``: at least one of each and one non-noise token, as in T5.

    Raises:
        ConfigurationError: When there are more spans than non-noise tokens to separate them.
    """
    noise = min(max(round(length * noise_density), 1), length - 1)
    spans = max(round(noise / mean_noise_span_length), 1)
    if spans > length - noise:
        raise ConfigurationError(
            f"{length} tokens with noise_density={noise_density} have {spans} noise spans but only "
            f"{length - noise} non-noise tokens to separate them"
        )
    return noise, spans


def corrupted_lengths(raw_length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """Input and target lengths of a corrupted block, ``</s>`` included.

    Args:
        raw_length: Raw tokens in the block.
        noise_density: Fraction of tokens that are noise.
        mean_noise_span_length: Mean tokens per noise span.

    Returns:
        ``(inputs_length, targets_length)``: the non-noise tokens plus one sentinel per span plus
        ``</s>``, and the noise tokens plus one sentinel per span plus ``</s>``.
    """
    noise, spans = noise_counts(raw_length, noise_density, mean_noise_span_length)
    return raw_length - noise + spans + 1, noise + spans + 1


def compute_input_and_target_lengths(
    inputs_length: int, noise_density: float, mean_noise_span_length: float
) -> tuple[int, int]:
    """The raw block length whose corrupted inputs are exactly ``inputs_length`` tokens, and its targets' length.

    nanoT5's (and T5's ``random_spans_helper``) search: the longest raw length whose inputs fit.
    Inputs grow by 0 or 1 token per raw token, so they fit exactly. nanoT5's adjustment for
    ``noise_density == 0.5`` (one raw token less to make targets as long as inputs) is left out:
    it can leave the inputs one token short.

    Args:
        inputs_length: Encoder input tokens, ``</s>`` included (T5: 512).
        noise_density: Fraction of tokens that are noise (T5: 0.15).
        mean_noise_span_length: Mean tokens per noise span (T5: 3).

    Returns:
        ``(raw_length, targets_length)``; T5's settings give ``(568, 114)``.

    Raises:
        ConfigurationError: When no raw length gives ``inputs_length`` inputs.
    """
    raw = inputs_length
    # Mean spans near one token add a sentinel per noise token: the inputs outgrow the raw block.
    while raw > 2 and corrupted_lengths(raw, noise_density, mean_noise_span_length)[0] > inputs_length:
        raw -= 1
    while corrupted_lengths(raw + 1, noise_density, mean_noise_span_length)[0] <= inputs_length:
        raw += 1
    inputs, targets = corrupted_lengths(raw, noise_density, mean_noise_span_length)
    if inputs != inputs_length:
        raise ConfigurationError(f"no raw block length corrupts to {inputs_length} input tokens")
    return raw, targets


def random_segmentation(uniforms: torch.Tensor, segments: int) -> torch.Tensor:
    """Cut ``n`` items into ``segments`` non-empty runs per row, every cut equally likely (T5's
    ``_random_segmentation``).

    The ``segments - 1`` smallest uniforms of a row choose which of the ``n - 1`` gaps between
    items are cuts: a uniformly random subset, as T5's shuffled boolean vector is.

    Args:
        uniforms: ``[B, n - 1]`` uniforms in [0, 1), one per gap.
        segments: Runs per row, in ``[1, n]``.

    Returns:
        ``LongTensor[B, segments]`` of run lengths, each row summing to ``n``.
    """
    rows, gaps = uniforms.shape
    starts = torch.zeros(rows, gaps + 1, dtype=torch.int64)
    cuts = uniforms.argsort(dim=1, stable=True)[:, : segments - 1] + 1  # item after the gap starts a run
    starts.scatter_(1, cuts, 1)
    run = starts.cumsum(1)
    return torch.zeros(rows, segments, dtype=torch.int64).scatter_add_(1, run, torch.ones_like(run))


def random_spans_noise_mask(
    uniforms: torch.Tensor, noise_density: float, mean_noise_span_length: float
) -> torch.Tensor:
    """T5's noise mask for each row: alternating non-noise and noise runs, non-noise first.

    Args:
        uniforms: ``[B, L - 2]`` uniforms in [0, 1): the first ``noise - 1`` cut the noise tokens,
            the rest the non-noise tokens (``L`` is the raw block length).
        noise_density: Fraction of tokens that are noise.
        mean_noise_span_length: Mean tokens per noise span.

    Returns:
        ``BoolTensor[B, L]``, true at noise tokens.
    """
    rows, length = uniforms.shape[0], uniforms.shape[1] + 2
    noise, spans = noise_counts(length, noise_density, mean_noise_span_length)
    noise_runs = random_segmentation(uniforms[:, : noise - 1], spans)
    clean_runs = random_segmentation(uniforms[:, noise - 1 :], spans)
    run_starts = torch.stack([clean_runs, noise_runs], dim=2).reshape(rows, 2 * spans).cumsum(1)[:, :-1]
    indicator = torch.zeros(rows, length, dtype=torch.int64).scatter_(1, run_starts, 1)
    return indicator.cumsum(1) % 2 == 1


def fuse_spans(tokens: torch.Tensor, spans: torch.Tensor, sentinel_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Replace the ``k``-th run of ``spans`` in each row by ``sentinel_ids[k]`` and append ``</s>``.

    Args:
        tokens: ``LongTensor[B, L]`` raw blocks.
        spans: ``BoolTensor[B, L]``; every row has the same number of runs and of true entries.
        sentinel_ids: ``LongTensor[S]`` sentinel id of each run, ``S`` at least the runs per row.
        eos_id: Id of ``</s>``.

    Returns:
        ``LongTensor[B, L - true entries + runs + 1]``.
    """
    first = spans & ~torch.nn.functional.pad(spans[:, :-1], (1, 0), value=False)
    run = (first.cumsum(1) - 1).clamp(min=0)  # run index at first tokens (clamped where unused)
    values = torch.where(first, sentinel_ids[run], tokens)
    kept = values[~spans | first].reshape(len(tokens), -1)  # row-major: each row keeps its order
    return torch.cat([kept, torch.full((len(tokens), 1), eos_id, dtype=kept.dtype)], dim=1)


def corrupt_spans(
    input_ids: torch.Tensor,
    example_ids: torch.Tensor,
    *,
    noise_density: float,
    mean_noise_span_length: float,
    seed: int,
    epoch: int,
    sentinel_ids: torch.Tensor,
    eos_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Span-corrupt a batch, each row's noise drawn from its own (seed, example id, epoch) generator.

    Args:
        input_ids: ``LongTensor[B, L]`` raw blocks (CPU); not modified.
        example_ids: ``LongTensor[B]`` stable ids of the rows.
        noise_density: Fraction of tokens that are noise.
        mean_noise_span_length: Mean tokens per noise span.
        seed: Run-level corruption seed (non-negative).
        epoch: Epoch number (non-negative); a new epoch gives new spans.
        sentinel_ids: ``LongTensor[S]``: id of ``<extra_id_k>`` at ``k``.
        eos_id: Id of ``</s>``.

    Returns:
        ``(inputs, targets)``, ``LongTensor[B, I]`` and ``LongTensor[B, T]`` with
        ``(I, T) = corrupted_lengths(L, ...)``.

    Raises:
        ConfigurationError: When a block has more spans than there are sentinels.
    """
    rows, length = input_ids.shape
    spans = noise_counts(length, noise_density, mean_noise_span_length)[1]
    if spans > len(sentinel_ids):
        raise ConfigurationError(
            f"{length}-token blocks have {spans} noise spans but the tokenizer only {len(sentinel_ids)} sentinels"
        )
    # float64: float32's 24 bits would tie some of a row's ~L uniforms and bias the cuts.
    uniforms = torch.empty(rows, length - 2, dtype=torch.float64)
    for row, example_id in enumerate(example_ids.tolist()):
        generator = torch.Generator().manual_seed(example_seed(seed, example_id, epoch))
        torch.rand(length - 2, generator=generator, dtype=torch.float64, out=uniforms[row])
    noise = random_spans_noise_mask(uniforms, noise_density, mean_noise_span_length)
    return fuse_spans(input_ids, noise, sentinel_ids, eos_id), fuse_spans(input_ids, ~noise, sentinel_ids, eos_id)


class CorruptionCollate:
    """Collate blocks and corrupt them for one epoch (picklable, so corruption runs in loader workers)."""

    def __init__(self, objective: SpanCorruption, epoch: int) -> None:
        self.objective, self.epoch = objective, epoch

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        return self.objective.apply(*stack_blocks(samples), self.epoch)


class SpanCorruption(PretrainingObjective):
    """T5's span-corruption objective; an example's spans depend only on (seed, example id, epoch).

    Blocks are the ``compute_input_and_target_lengths(seq_len, ...)`` raw tokens (568 for 512
    inputs) cut from a stream of documents each ending with ``</s>``, without framing. Batches are
    ``{"input_ids": LongTensor[B, seq_len], "labels": LongTensor[B, targets_length], "example_ids"}``
    (labels are the targets; the model shifts them right itself). When no tokenizer is given a
    Unigram one with T5's special tokens and 100 sentinels is trained.

    Args:
        noise_density: Fraction of raw tokens that are noise.
        mean_noise_span_length: Mean tokens per noise span.
        seed: Seed of the corruption.

    Raises:
        ConfigurationError: When ``noise_density`` is not in (0, 1), ``mean_noise_span_length`` is
            below 1 or ``seed`` is negative.
    """

    tokenizer_kind = "unigram"
    tokenizer_roles = ("pad_token", "eos_token")

    def __init__(self, noise_density: float = 0.15, mean_noise_span_length: float = 3.0, seed: int = 0) -> None:
        checks = {
            f"noise_density must be in (0, 1), got {noise_density}": 0 < noise_density < 1,
            f"mean_noise_span_length must be at least 1, got {mean_noise_span_length}": mean_noise_span_length >= 1,
            f"seed must be >= 0, got {seed}": seed >= 0,
        }
        for message, ok in checks.items():
            if not ok:
                raise ConfigurationError(message)
        self.noise_density, self.mean_noise_span_length, self.seed = noise_density, mean_noise_span_length, seed
        # Set by bind(): the tokenizer, and the ids corruption needs (all that workers receive).
        self._tokenizer: PreTrainedTokenizerFast | None = None
        self._ids: tuple[int, torch.Tensor] | None = None

    def lengths(self, inputs_length: int) -> tuple[int, int]:
        """``(raw_length, targets_length)`` for ``inputs_length`` encoder inputs; see
        :func:`compute_input_and_target_lengths`."""
        return compute_input_and_target_lengths(inputs_length, self.noise_density, self.mean_noise_span_length)

    def layout(self, tokenizer: PreTrainedTokenizerFast, seq_len: int) -> BlockLayout:
        """Bare blocks of the raw length for ``seq_len`` inputs, documents ending with ``</s>``.

        Raises:
            ConfigurationError: When no raw length gives ``seq_len`` inputs, or its blocks have more
                noise spans than ``tokenizer`` has sentinels (checked here so packing never starts).
        """
        raw_length = self.lengths(seq_len)[0]
        self.bind(tokenizer)
        spans = noise_counts(raw_length, self.noise_density, self.mean_noise_span_length)[1]
        sentinels = len(self._bound()[1])
        if spans > sentinels:
            raise ConfigurationError(f"seq_len={seq_len} needs {spans} sentinels, the tokenizer has {sentinels}")
        return BlockLayout(raw_length, tokenizer.eos_token_id)

    def bind(self, tokenizer: PreTrainedTokenizerFast) -> None:
        """Look up ``</s>`` and the sentinels ``<extra_id_0>``, ``<extra_id_1>``, ... (once per tokenizer).

        Raises:
            ConfigurationError: When the tokenizer has no ``</s>`` or no ``<extra_id_0>``.
        """
        if self._tokenizer is tokenizer:
            return
        vocab = tokenizer.get_vocab()
        sentinels = [vocab[token] for token in takewhile(vocab.__contains__, (f"<extra_id_{k}>" for k in count()))]
        if tokenizer.eos_token_id is None or not sentinels:
            raise ConfigurationError("span corruption needs a tokenizer with </s> (eos) and <extra_id_0>.. sentinels")
        self._tokenizer, self._ids = tokenizer, (tokenizer.eos_token_id, torch.tensor(sentinels))

    def _bound(self) -> tuple[int, torch.Tensor]:
        if self._ids is None:
            raise RuntimeError("SpanCorruption is used before bind(tokenizer)")
        return self._ids

    def apply(self, input_ids: torch.Tensor, example_ids: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
        """Corrupt a batch with ``corrupt_spans``; see :meth:`PretrainingObjective.apply`."""
        eos_id, sentinel_ids = self._bound()
        inputs, targets = corrupt_spans(
            input_ids, example_ids, noise_density=self.noise_density,
            mean_noise_span_length=self.mean_noise_span_length, seed=self.seed, epoch=epoch,
            sentinel_ids=sentinel_ids, eos_id=eos_id,
        )
        return {"input_ids": inputs, "labels": targets, "example_ids": example_ids}

    def collate(self, epoch: int) -> CorruptionCollate:
        """A :class:`CorruptionCollate` for ``epoch``; see :meth:`PretrainingObjective.collate`."""
        self._bound()
        return CorruptionCollate(self, epoch)

    def fingerprint(self) -> dict:
        """The objective's name, settings and ``SPAN_CORRUPTION_VERSION``."""
        return {
            "objective": "span_corruption",
            "noise_density": self.noise_density,
            "mean_noise_span_length": self.mean_noise_span_length,
            "seed": self.seed,
            "version": SPAN_CORRUPTION_VERSION,
        }

    def __getstate__(self) -> dict:
        # Loader workers need the ids only, not the tokenizer.
        return {**self.__dict__, "_tokenizer": None}
