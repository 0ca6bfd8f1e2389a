"""Loading a pretrained tokenizer, or training (and caching) a WordPiece one on the corpus."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
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


def load_tokenizer(name: str, lowercase: bool) -> PreTrainedTokenizerFast:
    """Load a tokenizer from a ``vocab.txt`` file, a saved directory or a hub name.

    Args:
        name: Path to a WordPiece ``vocab.txt``, a ``save_pretrained`` directory, or a hub name.
        lowercase: Lowercase (and strip accents) when building from a ``vocab.txt``; saved
            tokenizers keep their own setting.

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
    check_tokenizer(tokenizer, name)
    return tokenizer


def check_tokenizer(tokenizer, name: str) -> None:
    """Raise unless ``tokenizer`` is a fast tokenizer with the tokens BERT-style MLM packing needs."""
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise ConfigurationError(f"tokenizer {name!r} is not a fast (tokenizers-backed) tokenizer")
    for role in ("mask_token", "pad_token", "cls_token", "sep_token"):
        if getattr(tokenizer, f"{role}_id") is None:
            raise ConfigurationError(
                f"tokenizer {name!r} has no {role.replace('_', ' ')} (masked LM packing needs one)"
            )


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerFast) -> str:
    """sha256 of the serialized ``tokenizer.json`` (vocab, normalizer, special tokens)."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


def cached_wordpiece(
    cache_dir: Path, corpus_fingerprint: str, vocab_size: int, lowercase: bool, texts: Callable[[], Iterable[str]]
) -> PreTrainedTokenizerFast:
    """Load the WordPiece tokenizer trained on this corpus from the cache, training it on a miss.

    Args:
        cache_dir: Root cache directory; the tokenizer lives in ``tokenizers/<fingerprint>/``.
        corpus_fingerprint: Identifies the training documents.
        vocab_size: Target vocabulary size.
        lowercase: Lowercase the text before tokenizing.
        texts: Called on a miss to get the training documents.

    Returns:
        The tokenizer, always as loaded from the cache so every run sees identical objects.
    """
    key = json.dumps([corpus_fingerprint, vocab_size, lowercase])
    target = cache_dir / "tokenizers" / hashlib.sha256(key.encode()).hexdigest()[:16]
    if target.is_dir():
        rank_zero_info(f"[data] tokenizer cache hit: {target}")
    else:
        rank_zero_info(f"[data] tokenizer cache miss: training WordPiece (vocab {vocab_size}) -> {target}")
        tokenizer = train_wordpiece(texts(), vocab_size, lowercase)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        tokenizer.save_pretrained(staging)
        publish(staging, target)
    tokenizer = AutoTokenizer.from_pretrained(str(target))
    check_tokenizer(tokenizer, str(target))
    return tokenizer


def publish(staging: Path, target: Path) -> None:
    """Move a fully written directory into place; if another process won the race, keep theirs."""
    try:
        staging.rename(target)
    except OSError:
        if not target.is_dir():
            raise
        shutil.rmtree(staging, ignore_errors=True)
