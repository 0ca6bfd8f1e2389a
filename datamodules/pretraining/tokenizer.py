"""Loading a pretrained tokenizer, or training (and caching) one on the corpus: WordPiece with BERT's
special tokens for masked LM, Unigram with T5's special tokens and sentinels for span corruption."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, BertTokenizerFast, PreTrainedTokenizerFast

from app.errors import ConfigurationError
from datamodules.pretraining.corpus import looks_like_path

SPECIAL_TOKENS = {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
}
# What a trained Unigram tokenizer has, as in T5's vocabulary: these three are ids 0-2, the sentinels
# the top 100 ids, counting down (``<extra_id_0>`` is the last id).
UNIGRAM_SPECIAL_TOKENS = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
SENTINELS = [f"<extra_id_{k}>" for k in range(100)]
# The special tokens by role that open the vocabulary of each kind of trained tokenizer, in id order.
TRAINED_SPECIAL_TOKENS = {"wordpiece": SPECIAL_TOKENS, "unigram": UNIGRAM_SPECIAL_TOKENS}
# The roles masked LM needs of a tokenizer (``check_tokenizer``).
MLM_ROLES = ("mask_token", "pad_token", "cls_token", "sep_token")


def reserved_token_count(kind: str) -> int:
    """Ids a trained tokenizer of ``kind`` reserves for special tokens (sentinels included)."""
    return len(TRAINED_SPECIAL_TOKENS[kind]) + (len(SENTINELS) if kind == "unigram" else 0)


def trained_pad_token_id(kind: str) -> int:
    """The pad id of a tokenizer of ``kind`` trained by :func:`cached_tokenizer`, known before training."""
    return list(TRAINED_SPECIAL_TOKENS[kind]).index("pad_token")


def _wrap_bert(tokenizer: Tokenizer, lowercase: bool, strip_accents: bool | None) -> PreTrainedTokenizerFast:
    """Add BERT's [CLS]/[SEP] post-processor and wrap as a transformers fast tokenizer.

    ``do_lower_case``/``strip_accents`` are repeated for the wrapper because transformers 5
    rebuilds the normalizer from them when the saved tokenizer is loaded again.
    """
    cls, sep = SPECIAL_TOKENS["cls_token"], SPECIAL_TOKENS["sep_token"]
    tokenizer.post_processor = processors.BertProcessing(
        (sep, tokenizer.token_to_id(sep)), (cls, tokenizer.token_to_id(cls))
    )
    return BertTokenizerFast(
        tokenizer_object=tokenizer, do_lower_case=lowercase, strip_accents=strip_accents, **SPECIAL_TOKENS
    )


def _bert_pipeline(model, lowercase: bool, strip_accents: bool | None) -> Tokenizer:
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=strip_accents)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    return tokenizer


def train_wordpiece(texts: Iterable[str], vocab_size: int, lowercase: bool) -> PreTrainedTokenizerFast:
    """Train a BERT-style WordPiece tokenizer (accents stripped) on ``texts``.

    Args:
        texts: The training documents.
        vocab_size: Target vocabulary size, special tokens included (a small corpus may give fewer).
        lowercase: Lowercase the text before tokenizing.

    Returns:
        The trained tokenizer with [PAD] [UNK] [CLS] [SEP] [MASK] as ids 0-4.
    """
    tokenizer = _bert_pipeline(models.WordPiece(unk_token=SPECIAL_TOKENS["unk_token"]), lowercase, True)
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()))
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return _wrap_bert(tokenizer, lowercase, True)


def wordpiece_tokenizer(vocab: dict[str, int], lowercase: bool) -> PreTrainedTokenizerFast:
    """A BERT-style tokenizer over a fixed WordPiece vocabulary (token -> id, special tokens included).

    Built with the tokenizers library: transformers 5's ``BertTokenizerFast`` ignores ``vocab_file=``.
    """
    wordpiece = models.WordPiece(vocab, unk_token=SPECIAL_TOKENS["unk_token"])
    return _wrap_bert(_bert_pipeline(wordpiece, lowercase, None), lowercase, None)


def train_unigram(texts: Iterable[str], vocab_size: int, lowercase: bool) -> PreTrainedTokenizerFast:
    """Train a T5-style Unigram tokenizer on ``texts``.

    The pipeline is close to the released T5 tokenizer's: NFKC, every run of whitespace (newlines
    included, which T5 maps to spaces) one space, stripped ends, ``▁`` word prefixes and ``</s>``
    appended on encoding.

    Args:
        texts: The training documents.
        vocab_size: Target vocabulary size, special tokens and the 100 sentinels included (a small
            corpus may give fewer pieces).
        lowercase: Lowercase the text before tokenizing (T5's own tokenizer is cased).

    Returns:
        The trained tokenizer: ``<pad>`` ``</s>`` ``<unk>`` as ids 0-2, ``<extra_id_99>`` ..
        ``<extra_id_0>`` as the last 100 ids, the sentinels as its ``extra_special_tokens``.
    """
    tokenizer = Tokenizer(models.Unigram())
    steps = [normalizers.NFKC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
    if lowercase:
        steps.append(normalizers.Lowercase())
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    specials = list(UNIGRAM_SPECIAL_TOKENS.values())
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size - len(SENTINELS), special_tokens=specials, unk_token=UNIGRAM_SPECIAL_TOKENS["unk_token"]
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    # Added in reverse so <extra_id_0> gets the last id, as in T5's vocabulary.
    tokenizer.add_special_tokens([AddedToken(token, special=True) for token in reversed(SENTINELS)])
    eos = UNIGRAM_SPECIAL_TOKENS["eos_token"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, tokenizer.token_to_id(eos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, additional_special_tokens=SENTINELS, **UNIGRAM_SPECIAL_TOKENS
    )


def load_tokenizer(name: str, lowercase: bool, roles: tuple[str, ...] = MLM_ROLES) -> PreTrainedTokenizerFast:
    """Load a tokenizer from a ``vocab.txt`` file, a saved directory or a hub name.

    Args:
        name: Path to a WordPiece ``vocab.txt``, a ``save_pretrained`` directory, or a hub name.
        lowercase: Lowercase (and strip accents) when building from a ``vocab.txt``; saved
            tokenizers keep their own setting.
        roles: Special-token roles the tokenizer must have (the objective's ``tokenizer_roles``).

    Returns:
        The checked fast tokenizer.
    """
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix != ".txt":
            raise ConfigurationError(
                f"tokenizer file {name} is not a WordPiece vocab.txt (pass a saved directory instead)"
            )
        vocab = models.WordPiece.read_file(str(path))
        missing = [token for token in SPECIAL_TOKENS.values() if token not in vocab]
        if missing:
            raise ConfigurationError(f"tokenizer vocabulary {name} lacks {', '.join(missing)}")
        tokenizer = wordpiece_tokenizer(vocab, lowercase)
    elif path.is_dir() or not looks_like_path(name):
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path) if path.is_dir() else name)
        except (OSError, ValueError) as err:
            raise ConfigurationError(
                f"cannot load tokenizer {name!r} (the hub cannot be reached offline): {' '.join(str(err).split())}"
            ) from err
    else:
        raise ConfigurationError(f"tokenizer not found: {name}")
    check_tokenizer(tokenizer, name, roles)
    return tokenizer


def check_tokenizer(tokenizer, name: str, roles: tuple[str, ...] = MLM_ROLES) -> None:
    """Raise unless ``tokenizer`` is a fast tokenizer with a token for each of ``roles``."""
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise ConfigurationError(f"tokenizer {name!r} is not a fast (tokenizers-backed) tokenizer")
    for role in roles:
        if getattr(tokenizer, f"{role}_id") is None:
            raise ConfigurationError(
                f"tokenizer {name!r} has no {role.replace('_', ' ')} (the pretraining objective needs one)"
            )


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerFast) -> str:
    """sha256 of the serialized ``tokenizer.json`` (vocab, normalizer, special tokens)."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


def cached_tokenizer(
    cache_dir: Path,
    corpus_fingerprint: str,
    kind: str,
    vocab_size: int,
    lowercase: bool,
    texts: Callable[[], Iterable[str]],
) -> PreTrainedTokenizerFast:
    """Load the tokenizer of ``kind`` trained on this corpus from the cache, training it on a miss.

    Args:
        cache_dir: Root cache directory; the tokenizer lives in ``tokenizers/<fingerprint>/``.
        corpus_fingerprint: Identifies the training documents.
        kind: ``"wordpiece"`` (:func:`train_wordpiece`) or ``"unigram"`` (:func:`train_unigram`).
        vocab_size: Target vocabulary size.
        lowercase: Lowercase the text before tokenizing.
        texts: Called on a miss to get the training documents.

    Returns:
        The tokenizer, always as loaded from the cache so every run sees identical objects.
    """
    if kind not in TRAINED_SPECIAL_TOKENS:
        raise ConfigurationError(f"unknown tokenizer kind {kind!r}: expected {' or '.join(TRAINED_SPECIAL_TOKENS)}")
    # WordPiece's key predates the other kinds: unchanged, so existing caches stay valid.
    key = json.dumps([corpus_fingerprint, vocab_size, lowercase] + ([kind] if kind != "wordpiece" else []))
    target = cache_dir / "tokenizers" / hashlib.sha256(key.encode()).hexdigest()[:16]
    if target.is_dir():
        rank_zero_info(f"[data] tokenizer cache hit: {target}")
    else:
        rank_zero_info(f"[data] tokenizer cache miss: training {kind} (vocab {vocab_size}) -> {target}")
        train = train_wordpiece if kind == "wordpiece" else train_unigram
        tokenizer = train(texts(), vocab_size, lowercase)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        tokenizer.save_pretrained(staging)
        publish(staging, target)
    tokenizer = AutoTokenizer.from_pretrained(str(target))
    check_tokenizer(tokenizer, str(target), tuple(TRAINED_SPECIAL_TOKENS[kind]))
    return tokenizer


def publish(staging: Path, target: Path) -> None:
    """Move a fully written directory into place; if another process won the race, keep theirs."""
    try:
        staging.rename(target)
    except OSError:
        if not target.is_dir():
            raise
        shutil.rmtree(staging, ignore_errors=True)
