"""The pretraining data path: reading, tokenizer, packing, cache, split, masking, loaders, streaming."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast

import datamodules.pretraining.blocks as blocks_module
import datamodules.pretraining.tokenizer as tokenizer_module
from app.errors import ConfigurationError
from datamodules.pretraining.corpus import iter_documents, resolve_sources
from datamodules.pretraining.mlm_masking import MASKING_VERSION, MaskedLanguageModeling, mask_tokens
from datamodules.pretraining.datamodule import PretrainingDataModule, split_example_ids
from datamodules.pretraining.tokenizer import load_tokenizer

WORDS = (
    "the a of and to in is was he she it that for on with as his her they at by this had not but from "
    "king queen castle forest wolf little girl golden bird river stone bread wonderful journey evening "
    "morning brother sister mother father house garden tree window door night day shining running"
).split()


def write_corpus(path: Path, documents: int = 150, seed: int = 0) -> Path:
    """Blank-line separated paragraphs of random words (about 40 words each)."""
    rng = random.Random(seed)
    paragraphs = []
    for _ in range(documents):
        lines = [
            " ".join(rng.choices(WORDS, k=rng.randint(8, 20))).capitalize() + "." for _ in range(rng.randint(1, 3))
        ]
        paragraphs.append("\n".join(lines))
    path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    return path


def make_dm(tmp_path: Path, sources: list[str] | None = None, **kwargs) -> PretrainingDataModule:
    options = {"tokenizer_vocab_size": 300, "seq_len": 32, "micro_batch_size": 8, "cache_dir": str(tmp_path / "cache")}
    options.update(kwargs)
    if sources is None:
        corpus = tmp_path / "corpus.txt"
        sources = [str(corpus if corpus.exists() else write_corpus(corpus))]
    return PretrainingDataModule(sources, **options)


def forbid(monkeypatch, module, name: str) -> None:
    def fail(*args, **kwargs):
        raise AssertionError(f"{name} must not run")

    monkeypatch.setattr(module, name, fail)


# ----------------------------------------------------------------------------------------------- reading


def test_txt_with_bom_and_crlf_splits_on_blank_lines(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_bytes("\ufeffFirst line\r\nsecond line\r\n\r\n   \r\n\r\nThird doc\r\n\r\nFourth".encode())
    documents = list(iter_documents(resolve_sources([str(path)]), "text", None, "train", None))
    assert documents == ["First line\nsecond line", "Third doc", "Fourth"]
    assert not any("\ufeff" in d or "\r" in d for d in documents)


def test_jsonl_text_field_and_malformed_line(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"body": "one", "text": "x"}\n\n{"body": "two"}\n', encoding="utf-8")
    assert list(iter_documents(resolve_sources([str(good)]), "body", None, "train", None)) == ["one", "two"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "one"}\n\n{"text": broken\n', encoding="utf-8")
    with pytest.raises(ConfigurationError, match=r"bad\.jsonl, line 3"):
        list(iter_documents(resolve_sources([str(bad)]), "text", None, "train", None))


def test_parquet_and_max_documents(tmp_path):
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": ["alpha", None, "beta", "gamma"]}), path)
    assert list(iter_documents(resolve_sources([str(path)]), "text", None, "train", None)) == ["alpha", "beta", "gamma"]
    assert list(iter_documents(resolve_sources([str(path)]), "text", None, "train", 2)) == ["alpha", "beta"]


def test_directory_recursion_order(tmp_path):
    root = tmp_path / "dir"
    (root / "a").mkdir(parents=True)
    for name in ("b.txt", "a/z.jsonl", "a/y.txt", "c.md"):
        (root / name).write_text('{"text": "z"}\n' if name.endswith("jsonl") else name, encoding="utf-8")
    sources = resolve_sources([str(root)])
    assert [s.path.relative_to(root).as_posix() for s in sources] == ["a/y.txt", "a/z.jsonl", "b.txt"]
    assert list(iter_documents(sources, "text", None, "train", None)) == ["a/y.txt", "z", "b.txt"]


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("source", ["/nonexistent/corpus.txt", "missing.jsonl", "./somewhere"])
def test_missing_source(tmp_path, source):
    with pytest.raises(ConfigurationError, match="corpus source not found"):
        make_dm(tmp_path, sources=[source])


def test_unknown_extension_and_no_sources(tmp_path):
    (tmp_path / "notes.md").write_text("hello", encoding="utf-8")
    with pytest.raises(ConfigurationError, match="unsupported corpus file type '.md'"):
        make_dm(tmp_path, sources=[str(tmp_path / "notes.md")])
    with pytest.raises(ConfigurationError, match="no corpus sources"):
        make_dm(tmp_path, sources=[])


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n  \n", encoding="utf-8")
    dm = make_dm(tmp_path, sources=[str(tmp_path / "empty.txt")])
    with pytest.raises(ConfigurationError, match="corpus is empty"):
        dm.prepare_data()


def test_corpus_too_small_and_seq_len_too_small(tmp_path):
    write_corpus(tmp_path / "tiny.txt", documents=2)
    with pytest.raises(ConfigurationError, match="corpus too small"):
        make_dm(tmp_path, sources=[str(tmp_path / "tiny.txt")], seq_len=512).setup("fit")
    with pytest.raises(ConfigurationError, match="seq_len must be at least 8"):
        make_dm(tmp_path, seq_len=4)


def test_hub_failure_is_a_configuration_error(tmp_path, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    dm = make_dm(tmp_path, sources=["someone/some-corpus"])
    with pytest.raises(ConfigurationError, match="hub cannot be reached offline"):
        dm.prepare_data()


def test_hub_dataset_is_read_through_datasets(tmp_path, monkeypatch):
    import datasets

    calls = []

    def fake_hub(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return datasets.Dataset.from_dict({"content": ["first doc", "", "second doc"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    sources = resolve_sources(["someone/corpus"])
    assert list(iter_documents(sources, "content", "en", "validation", None)) == ["first doc", "second doc"]
    assert calls == [("someone/corpus", "en", "validation", False)]
    with pytest.raises(ConfigurationError, match="has no column 'text'"):
        list(iter_documents(sources, "text", "en", "validation", None))


# ----------------------------------------------------------------------------------------------- packing


def test_blocks_are_packed_stream(tmp_path):
    dm = make_dm(tmp_path)
    dm.setup("fit")
    tok, blocks = dm.tokenizer, np.asarray(dm.blocks)
    assert blocks.dtype == np.uint16 and blocks.shape[1] == 32 and len(blocks) > 100
    assert (blocks[:, 0] == tok.cls_token_id).all() and (blocks[:, -1] == tok.sep_token_id).all()
    stream = []
    for text in iter_documents(resolve_sources(dm.hparams.sources), "text", None, "train", None):
        stream += tok(text, add_special_tokens=False)["input_ids"] + [tok.sep_token_id]
    interior = blocks[:, 1:-1].reshape(-1)
    assert len(stream) - len(interior) < 30
    assert interior.tolist() == stream[: len(interior)]
    assert np.array_equal(np.sort(np.concatenate([dm.train_example_ids, dm.val_example_ids])), np.arange(len(blocks)))
    # Packing from scratch with the same tokenizer gives the same blocks and ids. (The tokenizer itself is
    # compared through its cache: WordPiece training is not bit-reproducible, tokenizers issue #1794.)
    tok.save_pretrained(tmp_path / "tok")
    fresh = make_dm(tmp_path, tokenizer=str(tmp_path / "tok"), cache_dir=str(tmp_path / "elsewhere"))
    fresh.setup("fit")
    assert np.array_equal(fresh.blocks, blocks) and np.array_equal(fresh.train_example_ids, dm.train_example_ids)
    sample = dm.train_dataloader().dataset[5]
    assert torch.equal(sample["input_ids"], torch.from_numpy(blocks[dm.train_example_ids[5]].astype(np.int64)))


def test_cache_reused_stable_and_invalidated_by_seq_len(tmp_path, monkeypatch):
    first = make_dm(tmp_path)
    first.prepare_data()
    first.setup("fit")
    forbid(monkeypatch, blocks_module, "tokenize_batch")
    forbid(monkeypatch, tokenizer_module, "train_wordpiece")
    second = make_dm(tmp_path)
    second.setup("fit")  # no prepare_data: setup must find (or build) the cache itself
    assert np.array_equal(first.blocks, second.blocks)
    assert np.array_equal(first.val_example_ids, second.val_example_ids)
    with pytest.raises(AssertionError, match="tokenize_batch must not run"):
        make_dm(tmp_path, seq_len=24).prepare_data()


# ------------------------------------------------------------------------------------------------- split


def test_split_deterministic_seeded_disjoint_and_covering(tmp_path):
    a, b = make_dm(tmp_path, val_size=20), make_dm(tmp_path, val_size=20)
    c = make_dm(tmp_path, val_size=20, split_seed=1)
    for dm in (a, b, c):
        dm.setup("fit")
    assert np.array_equal(a.val_example_ids, b.val_example_ids)
    assert not np.array_equal(a.val_example_ids, c.val_example_ids)
    assert len(np.intersect1d(a.train_example_ids, a.val_example_ids)) == 0
    assert len(a.train_example_ids) + len(a.val_example_ids) == len(a.blocks)
    assert a.train_example_ids.dtype == np.int64 and (np.diff(a.val_example_ids) > 0).all()


def test_split_sizes():
    assert len(split_example_ids(1000, 0.1, None, None, 0)[1]) == 100
    assert len(split_example_ids(1000, 0.1, 7, None, 0)[1]) == 7  # val_size overrides the fraction
    assert len(split_example_ids(1000, 0.5, None, 3, 0)[1]) == 3  # capped
    assert len(split_example_ids(10, 0.001, None, None, 0)[1]) == 1  # at least one
    assert len(split_example_ids(10, 0.0, None, None, 0)[1]) == 0
    with pytest.raises(ConfigurationError, match="no training block"):
        split_example_ids(5, 0.0, 5, None, 0)


def test_holdout_split_is_disjoint_and_leaves_validation_alone():
    train, val, holdout = split_example_ids(1000, 0.1, None, None, 3, holdout_fraction=0.2)
    assert (len(train), len(val), len(holdout)) == (700, 100, 200)
    assert np.array_equal(np.sort(np.concatenate([train, val, holdout])), np.arange(1000))
    assert np.array_equal(val, split_example_ids(1000, 0.1, None, None, 3)[1])
    with pytest.raises(ConfigurationError, match="no training block"):
        split_example_ids(10, 0.5, None, None, 0, holdout_fraction=0.5)


def test_train_split_holdout_trains_on_the_holdout(tmp_path):
    target, il_model = make_dm(tmp_path, holdout_fraction=0.25), make_dm(tmp_path, holdout_fraction=0.25, train_split="holdout")
    target.setup("fit")
    il_model.setup("fit")
    assert np.array_equal(il_model.train_example_ids, target.holdout_example_ids)
    assert np.array_equal(il_model.val_example_ids, target.val_example_ids)
    assert len(np.intersect1d(target.train_example_ids, il_model.train_example_ids)) == 0
    with pytest.raises(ConfigurationError, match="needs holdout_fraction"):
        make_dm(tmp_path, train_split="holdout")


def test_masked_batches_match_training_batches(tmp_path):
    dm = make_dm(tmp_path)
    dm.setup("fit")
    ids = dm.train_example_ids[[4, 1, 7]]
    (batch,) = list(dm.masked_batches(ids, epoch=2, batch_size=8))
    expected = mask_tokens(
        torch.from_numpy(dm.blocks[ids].astype(np.int64)), torch.from_numpy(ids), dm.collator, seed=dm.hparams.mask_seed, epoch=2
    )
    assert batch["example_ids"].tolist() == ids.tolist()
    assert torch.equal(batch["input_ids"], expected[0]) and torch.equal(batch["labels"], expected[1])
    with pytest.raises(ConfigurationError, match="cached blocks"):
        make_dm(tmp_path).example_fingerprint()  # before setup
    in_workers = make_dm(tmp_path, num_workers=1)
    in_workers.setup("fit")
    (batch_from_worker,) = list(in_workers.masked_batches(ids, epoch=2, batch_size=8))
    assert torch.equal(batch_from_worker["labels"], batch["labels"])
    other = make_dm(tmp_path, mask_seed=1)
    other.setup("fit")
    assert other.example_fingerprint()["mask_seed"] == 1 and other.example_fingerprint()["blocks"] == dm.example_fingerprint()["blocks"]


def test_objective_given_or_built_from_the_masking_arguments(tmp_path):
    legacy = make_dm(tmp_path, mask_seed=2, mlm_probability=0.2)
    given = make_dm(tmp_path, objective=MaskedLanguageModeling(mlm_probability=0.2, mask_seed=2))
    for dm in (legacy, given):
        dm.setup("fit")
    # Files keyed by example id compare these keys with what earlier versions wrote: exactly these.
    assert legacy.example_fingerprint() == given.example_fingerprint() == {
        "blocks": legacy.example_fingerprint()["blocks"], "seq_len": 32, "mask_seed": 2, "mlm_probability": 0.2,
        "mask_replace_prob": 0.8, "random_replace_prob": 0.1, "masking": MASKING_VERSION,
    }
    ids = legacy.train_example_ids[:5]
    (a,), (b,) = list(legacy.masked_batches(ids, 1, 8)), list(given.masked_batches(ids, 1, 8))
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert "objective" not in given.hparams  # checkpoints hold plain values only (weights_only loading)
    with pytest.raises(ConfigurationError, match="set the masking settings on it"):
        make_dm(tmp_path, objective=MaskedLanguageModeling(), mask_seed=1)
    with pytest.raises(ConfigurationError, match="mlm_probability must be in"):
        make_dm(tmp_path, mlm_probability=0.0)
    with pytest.raises(ConfigurationError, match="at most 1"):
        MaskedLanguageModeling(mask_replace_prob=0.8, random_replace_prob=0.3)
    with pytest.raises(ConfigurationError, match="mask_seed must be >= 0"):
        make_dm(tmp_path, mask_seed=-1)
    with pytest.raises(RuntimeError, match="before bind"):
        MaskedLanguageModeling().collate(0)


# ----------------------------------------------------------------------------------------------- masking


@pytest.fixture
def collator(tmp_path) -> DataCollatorForLanguageModeling:
    return make_dm(tmp_path).collator


def random_blocks(tok, count: int, length: int) -> torch.Tensor:
    ids = torch.randint(len(tok.all_special_ids), len(tok), (count, length), generator=torch.Generator().manual_seed(0))
    ids[:, 0], ids[:, -1], ids[:, length // 2] = tok.cls_token_id, tok.sep_token_id, tok.sep_token_id
    return ids


def test_masking_is_a_function_of_seed_id_and_epoch(collator):
    ids = random_blocks(collator.tokenizer, 16, 32)
    example_ids = torch.arange(100, 116)
    masked, labels = mask_tokens(ids, example_ids, collator, seed=3, epoch=1)
    order = torch.tensor([9, 2, 14, 5])  # another batch composition and order
    sub_masked, sub_labels = mask_tokens(ids[order], example_ids[order], collator, seed=3, epoch=1)
    assert torch.equal(sub_masked, masked[order]) and torch.equal(sub_labels, labels[order])
    assert torch.equal(ids, random_blocks(collator.tokenizer, 16, 32))  # inputs untouched
    other_epoch = mask_tokens(ids, example_ids, collator, seed=3, epoch=2)[1]
    other_seed = mask_tokens(ids, example_ids, collator, seed=4, epoch=1)[1]
    assert not torch.equal(other_epoch, labels) and not torch.equal(other_seed, labels)


def test_masking_statistics_and_special_tokens(collator):
    tok = collator.tokenizer
    ids = random_blocks(tok, 256, 128)
    masked, labels = mask_tokens(ids, torch.arange(256), collator, seed=0, epoch=0)
    special = torch.isin(ids, torch.tensor(tok.all_special_ids))
    selected = labels != -100
    assert not selected[special].any()
    assert torch.equal(labels[selected], ids[selected])
    assert torch.equal(masked[~selected], ids[~selected])
    assert abs(selected[~special].float().mean().item() - 0.15) < 0.01
    to_mask = (masked[selected] == tok.mask_token_id).float().mean().item()
    kept = (masked[selected] == ids[selected]).float().mean().item()
    assert abs(to_mask - 0.8) < 0.02 and abs(kept - 0.1) < 0.02 and abs(1 - to_mask - kept - 0.1) < 0.02


@pytest.mark.parametrize("replace, randomise", [(1.0, 0.0), (0.0, 1.0), (0.0, 0.0), (0.5, 0.5)])
def test_masking_replacement_shares_at_the_edges(collator, replace, randomise):
    collator.mask_replace_prob, collator.random_replace_prob = replace, randomise
    tok = collator.tokenizer
    ids = random_blocks(tok, 64, 128)
    masked, labels = mask_tokens(ids, torch.arange(64), collator, seed=0, epoch=0)
    selected = labels != -100
    to_mask = (masked[selected] == tok.mask_token_id).float().mean().item()
    changed = (masked[selected] != ids[selected]).float().mean().item()
    assert abs(to_mask - replace) < 0.03 and abs(changed - replace - randomise) < 0.03
    assert masked.max() < len(tok) and masked.min() >= 0


# ----------------------------------------------------------------------------------------------- loaders


def test_loaders_make_examples_in_the_loader_with_the_sampler_epoch_and_the_hook_counts(tmp_path):
    dm = make_dm(tmp_path, eval_batch_size=5)
    dm.setup("fit")
    train, val = dm.train_dataloader(), dm.val_dataloader()
    assert len(train) == len(dm.train_example_ids) // 8

    def expected(batch, epoch):  # the objective applied to the unmodified blocks of the batch's rows
        blocks = torch.from_numpy(np.asarray(dm.blocks)[batch["example_ids"].numpy()].astype(np.int64))
        return mask_tokens(blocks, batch["example_ids"], dm.collator, seed=0, epoch=epoch)

    for epoch in (0, 2):  # Lightning sets the sampler's epoch before each epoch
        train.sampler.set_epoch(epoch)
        batch = next(iter(train))
        assert set(batch) == {"input_ids", "labels", "example_ids"} and batch["input_ids"].shape == (8, 32)
        assert batch["input_ids"].dtype == torch.long and batch["example_ids"].dtype == torch.int64
        masked, labels = expected(batch, epoch)
        assert torch.equal(batch["input_ids"], masked) and torch.equal(batch["labels"], labels)
    batch = next(iter(val))  # evaluation: always epoch 0
    assert batch["example_ids"].tolist() == dm.val_example_ids[:5].tolist()
    assert torch.equal(batch["labels"], expected(batch, 0)[1])

    # In training the hook passes the batch on and counts it for the checkpointed position.
    dm.trainer = SimpleNamespace(training=True, current_epoch=2, num_training_batches=len(train))
    assert dm.on_before_batch_transfer(batch, 0) is batch
    assert train.state_dict()["batches"] == 1


def test_a_replaced_training_batch_is_not_made_into_examples(tmp_path):
    dm = make_dm(tmp_path)
    dm.setup("fit")
    dm.training_batches_replaced = True  # what a batch-selection callback sets at its setup
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "example_ids"}  # the row count, stacked blocks, no masking
    blocks = np.asarray(dm.blocks)[batch["example_ids"].numpy()].astype(np.int64)
    assert torch.equal(batch["input_ids"], torch.from_numpy(blocks))


def test_lightning_fit_sees_masked_batches(tmp_path):
    from lightning.pytorch import LightningModule, Trainer

    seen = []

    class Probe(LightningModule):
        def __init__(self, vocab_size: int):
            super().__init__()
            self.embed = torch.nn.Embedding(vocab_size, 8)
            self.head = torch.nn.Linear(8, vocab_size)

        def training_step(self, batch, batch_idx):
            seen.append(batch)
            logits = self.head(self.embed(batch["input_ids"]))
            return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())

        def validation_step(self, batch, batch_idx):
            seen.append(batch)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = make_dm(tmp_path, val_size=8)
    trainer = Trainer(
        max_steps=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        val_check_interval=2,
    )
    trainer.fit(Probe(dm.vocab_size), datamodule=dm)
    assert len(seen) == 3 and all((b["labels"] != -100).any() and b["labels"].shape == (8, 32) for b in seen)


# --------------------------------------------------------------------------------------------- tokenizer


def test_trained_tokenizer_cached_and_reloaded(tmp_path, monkeypatch):
    first = make_dm(tmp_path)
    assert first.vocab_size == len(first.tokenizer) and first.pad_token_id == 0 and first.seq_len == 32
    assert len(list((tmp_path / "cache" / "tokenizers").iterdir())) == 1
    forbid(monkeypatch, tokenizer_module, "train_wordpiece")
    second = make_dm(tmp_path)
    assert second.tokenizer.get_vocab() == first.tokenizer.get_vocab()


def test_uncased_setting_survives_the_cache(tmp_path):
    cased = make_dm(tmp_path, lowercase=False).tokenizer
    assert cased.backend_tokenizer.normalizer.normalize_str("Élan King") == "Elan King"
    uncased = make_dm(tmp_path).tokenizer
    assert uncased.backend_tokenizer.normalizer.normalize_str("Élan King") == "elan king"


def test_tokenizer_from_saved_directory_and_vocab_txt(tmp_path):
    trained = make_dm(tmp_path).tokenizer
    trained.save_pretrained(tmp_path / "saved")
    loaded = make_dm(tmp_path, tokenizer=str(tmp_path / "saved")).tokenizer
    assert (
        loaded.get_vocab() == trained.get_vocab()
        and loaded("The king")["input_ids"] == trained("The king")["input_ids"]
    )
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "king", "##s", "."]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    from_vocab = load_tokenizer(str(tmp_path / "vocab.txt"), lowercase=True)
    assert len(from_vocab) == len(vocab) and from_vocab.mask_token_id == 4
    assert from_vocab("The Kings.")["input_ids"] == [2, 5, 6, 7, 8, 3]


def test_tokenizer_errors(tmp_path):
    with pytest.raises(ConfigurationError, match="tokenizer not found"):
        load_tokenizer(str(tmp_path / "nope" / "vocab.txt"), lowercase=True)
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nthe\n", encoding="utf-8")
    with pytest.raises(ConfigurationError, match=r"lacks \[MASK\]"):
        load_tokenizer(str(tmp_path / "vocab.txt"), lowercase=True)
    no_mask = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, "a": 2}, unk_token="[UNK]")),
        pad_token="[PAD]",
        unk_token="[UNK]",
    )
    no_mask.save_pretrained(tmp_path / "no_mask")
    with pytest.raises(ConfigurationError, match="no mask token"):
        load_tokenizer(str(tmp_path / "no_mask"), lowercase=True)


# --------------------------------------------------------------------------------------------- streaming


def test_streaming_local_jsonl(tmp_path, monkeypatch):
    documents = iter_documents(
        resolve_sources([str(write_corpus(tmp_path / "corpus.txt"))]), "text", None, "train", None
    )
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("".join(json.dumps({"text": text}) + "\n" for text in documents), encoding="utf-8")
    cached = make_dm(tmp_path, sources=[str(jsonl)])
    cached.setup("fit")
    cached.tokenizer.save_pretrained(tmp_path / "tok")
    dm = make_dm(tmp_path, sources=[str(jsonl)], tokenizer=str(tmp_path / "tok"), streaming=True, val_size=3)
    dm.setup("fit")
    val = [(s["example_ids"], s["input_ids"]) for s in dm.val_dataloader().dataset]  # the blocks, before masking
    assert [i for i, _ in val] == [0, 1, 2] and dm.val_example_ids.tolist() == [0, 1, 2]
    train = list(dm.train_dataloader().dataset)
    ids = [s["example_ids"] for s in train]
    assert ids == list(range(3, len(cached.blocks)))  # consecutive, validation excluded, same count as the cache
    for example_id, block in val + [(s["example_ids"], s["input_ids"]) for s in train[:5]]:
        assert block.tolist() == cached.blocks[example_id].tolist()  # same packing as the cached path
    assert next(iter(dm.train_dataloader()))["input_ids"].shape == (8, 32)
    # Epochs end on whole updates: with 3 micro-batches of 8 per update, blocks come in groups of 24.
    dm.trainer = SimpleNamespace(accumulate_grad_batches=3)
    grouped = [s["example_ids"] for s in dm.train_dataloader().dataset]
    assert len(ids) % 24 and grouped == ids[: len(ids) // 24 * 24]
    workers = make_dm(tmp_path, sources=[str(jsonl)], tokenizer=str(tmp_path / "tok"), streaming=True, val_size=3,
                      num_workers=2)
    workers.setup("fit")
    workers.trainer = SimpleNamespace(accumulate_grad_batches=3)
    batches = list(workers.train_dataloader())  # each worker cuts its own share to whole updates
    assert batches and len(batches) % 3 == 0
    # Rank 1 of 2 keeps every other block, only from complete rounds, in whole updates.
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    rank_ids = [s["example_ids"] for s in dm.train_dataloader().dataset]
    assert rank_ids == list(range(4, 3 + (len(ids) // 2) * 2, 2))[: len(ids) // 2 // 24 * 24]


def test_streaming_needs_supported_sources_and_val_size(tmp_path):
    write_corpus(tmp_path / "corpus.txt")
    with pytest.raises(ConfigurationError, match="streaming supports hub datasets and local"):
        make_dm(tmp_path, tokenizer="x", streaming=True, val_size=2)
    (tmp_path / "c.jsonl").write_text('{"text": "a"}\n', encoding="utf-8")
    with pytest.raises(ConfigurationError, match="val_size"):
        make_dm(tmp_path, sources=[str(tmp_path / "c.jsonl")], tokenizer="x", streaming=True)


def test_cramming_framing_keeps_cls_out_of_the_packed_blocks(tmp_path):
    from datamodules.pretraining.mlm_masking import MaskedLanguageModeling

    bert = make_dm(tmp_path)
    cramming = make_dm(tmp_path,
                       objective=MaskedLanguageModeling(framing="cramming"))
    for dm in (bert, cramming):
        dm.setup("fit")
    cls_id = bert.tokenizer.cls_token_id
    assert (bert.blocks[:, 0] == cls_id).all()
    assert not (cramming.blocks == cls_id).any() and cramming.blocks.shape[1] == bert.blocks.shape[1]
    assert cramming.example_fingerprint()["blocks"] != bert.example_fingerprint()["blocks"]
    with pytest.raises(ConfigurationError, match="framing"):
        MaskedLanguageModeling(framing="gpt")
