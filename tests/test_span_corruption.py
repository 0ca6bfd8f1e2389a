"""T5 span corruption: lengths, the noise mask, sentinels, determinism, the Unigram tokenizer, the data module."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

import datamodules.pretraining.blocks as blocks_module
import datamodules.pretraining.tokenizer as tokenizer_module
from app.errors import ConfigurationError
from datamodules.pretraining.corpus import iter_documents, resolve_sources
from datamodules.pretraining.datamodule import PretrainingDataModule
from datamodules.pretraining.span_corruption import (
    SpanCorruption,
    compute_input_and_target_lengths,
    corrupt_spans,
    corrupted_lengths,
    noise_counts,
    random_segmentation,
)
from datamodules.pretraining.tokenizer import SENTINELS, SPECIAL_TOKENS, train_unigram, wordpiece_tokenizer
from tests.conftest import REPO_ROOT, SHARED_DATA

T5_TOKENIZER = SHARED_DATA / "tokenizers" / "t5"
VOCAB = 1000
SENTINEL_IDS = torch.arange(VOCAB - 1, VOCAB - 101, -1)  # <extra_id_k> = VOCAB - 1 - k, as in T5
EOS = 1


def corrupt(blocks: torch.Tensor, example_ids: torch.Tensor, epoch: int = 0, seed: int = 0, density=0.15, span=3.0):
    return corrupt_spans(blocks, example_ids, noise_density=density, mean_noise_span_length=span, seed=seed,
                         epoch=epoch, sentinel_ids=SENTINEL_IDS, eos_id=EOS)


def raw_blocks(rows: int, length: int, seed: int = 0) -> torch.Tensor:
    """Random tokens that are neither ``</s>`` nor sentinels, so runs can be told apart."""
    return torch.randint(3, VOCAB - 100, (rows, length), generator=torch.Generator().manual_seed(seed))


def runs(ids: list[int], sentinels: set[int]) -> tuple[list[list[int]], list[int]]:
    """The runs between sentinels, and the sentinels in order."""
    pieces, found = [[]], []
    for token in ids:
        if token in sentinels:
            found.append(token)
            pieces.append([])
        else:
            pieces[-1].append(token)
    return pieces, found


# ---------------------------------------------------------------------------------------------- lengths


def brute_force_lengths(inputs_length: int, density: float, span: float) -> tuple[int, int]:
    """The longest raw length whose inputs fit, by trying them all (T5's counts, written anew)."""
    def lengths(raw: int) -> tuple[int, int]:
        noise = min(max(int(np.round(raw * density)), 1), raw - 1)
        spans = max(int(np.round(noise / span)), 1)
        return raw - noise + spans + 1, noise + spans + 1

    raw = max(raw for raw in range(2, 4 * inputs_length) if lengths(raw)[0] <= inputs_length)
    assert lengths(raw)[0] == inputs_length
    return raw, lengths(raw)[1]


def test_t5_lengths():
    assert compute_input_and_target_lengths(512, 0.15, 3.0) == (568, 114)
    assert noise_counts(568, 0.15, 3.0) == (85, 28)
    assert corrupted_lengths(568, 0.15, 3.0) == (512, 114)


@pytest.mark.parametrize("inputs_length, density, span", [(8, 0.15, 3.0), (128, 0.15, 3.0), (1024, 0.15, 3.0),
                                                          (256, 0.3, 2.0), (100, 0.5, 5.0), (64, 0.2, 1.0)])
def test_lengths_match_brute_force_and_the_corrupted_batch(inputs_length, density, span):
    raw, targets = compute_input_and_target_lengths(inputs_length, density, span)
    assert (raw, targets) == brute_force_lengths(inputs_length, density, span)
    inputs, labels = corrupt(raw_blocks(3, raw), torch.arange(3), density=density, span=span)
    assert inputs.shape == (3, inputs_length) and labels.shape == (3, targets)


def test_settings_are_validated():
    for bad in ({"noise_density": 0.0}, {"noise_density": 1.0}, {"mean_noise_span_length": 0.5}, {"seed": -1}):
        with pytest.raises(ConfigurationError, match="must be"):
            SpanCorruption(**bad)
    with pytest.raises(ConfigurationError, match="non-noise tokens"):
        compute_input_and_target_lengths(512, 0.9, 1.0)
    with pytest.raises(RuntimeError, match="before bind"):
        SpanCorruption().collate(0)
    with pytest.raises(ConfigurationError, match="sentinels"):
        corrupt(raw_blocks(1, 2400), torch.arange(1))  # 120 spans, 100 sentinels


# ------------------------------------------------------------------------------------------ corruption


def test_sentinel_order_eos_and_reconstruction():
    blocks = raw_blocks(64, 568)
    inputs, targets = corrupt(blocks, torch.arange(64))
    sentinels = set(SENTINEL_IDS.tolist())
    assert (inputs[:, -1] == EOS).all() and (targets[:, -1] == EOS).all()
    for raw, row_inputs, row_targets in zip(blocks.tolist(), inputs.tolist(), targets.tolist(), strict=True):
        clean, input_sentinels = runs(row_inputs[:-1], sentinels)
        noise, target_sentinels = runs(row_targets[:-1], sentinels)
        # First span -> <extra_id_0>, then counting down, the same in inputs and targets.
        assert input_sentinels == target_sentinels == SENTINEL_IDS[:28].tolist()
        assert noise[0] == [] and clean[-1] == [] and all(clean[:-1]) and all(noise[1:])  # non-noise first
        assert sum((c + n for c, n in zip(clean, noise[1:], strict=False)), []) == raw


@pytest.mark.parametrize("density, span", [(0.15, 3.0), (0.3, 2.0)])
def test_noise_fraction_span_lengths_and_positions(density, span):
    blocks = raw_blocks(2000, 568)
    inputs, targets = corrupt(blocks, torch.arange(2000), density=density, span=span)
    noise, spans = noise_counts(568, density, span)
    assert abs(noise / 568 - density) < 0.005 and abs(noise / spans - span) < 0.1
    sentinels = set(SENTINEL_IDS.tolist())
    masks, lengths = [], []
    for row_inputs, row_targets in zip(inputs.tolist(), targets.tolist(), strict=True):
        clean, noisy = runs(row_inputs[:-1], sentinels)[0], runs(row_targets[:-1], sentinels)[0][1:]
        masks.append(sum(([False] * len(c) + [True] * len(n) for c, n in zip(clean, noisy, strict=False)), []))
        lengths += [len(n) for n in noisy]
    position_rate = torch.tensor(masks, dtype=torch.float).mean(0)
    assert position_rate[0] == 0 and position_rate[-1] == 1  # non-noise first, noise last
    interior = position_rate[20:-20]
    assert abs(interior.mean().item() - density) < 0.01 and (interior - density).abs().max().item() < 0.05
    lengths = torch.tensor(lengths, dtype=torch.float)
    assert abs(lengths.mean().item() - noise / spans) < 1e-6 and lengths.std().item() > 0.5 * span


def test_random_segmentation_is_uniform_over_cuts():
    uniforms = torch.rand(20000, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    lengths = random_segmentation(uniforms, 3)  # 5 items into 3 runs: 6 equally likely segmentations
    assert (lengths > 0).all() and (lengths.sum(1) == 5).all()
    _, counts = torch.unique(lengths, dim=0, return_counts=True)
    assert len(counts) == 6 and (counts - 20000 / 6).abs().max() < 200


def test_corruption_is_a_function_of_seed_id_and_epoch():
    blocks = raw_blocks(16, 200)
    example_ids = torch.arange(100, 116)
    inputs, targets = corrupt(blocks, example_ids, epoch=1, seed=3)
    order = torch.tensor([9, 2, 14, 5])  # another batch composition and order
    sub_inputs, sub_targets = corrupt(blocks[order], example_ids[order], epoch=1, seed=3)
    assert torch.equal(sub_inputs, inputs[order]) and torch.equal(sub_targets, targets[order])
    assert torch.equal(blocks, raw_blocks(16, 200))  # blocks untouched
    for other in (corrupt(blocks, example_ids, epoch=2, seed=3), corrupt(blocks, example_ids, epoch=1, seed=4)):
        assert not torch.equal(other[0], inputs)
    same_block = blocks[:1].repeat(2, 1)  # one block under two ids: different spans
    twins = corrupt(same_block, torch.tensor([0, 1]))[0]
    assert not torch.equal(twins[0], twins[1])


# ------------------------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def unigram_dir(tmp_path_factory) -> Path:
    """A Unigram tokenizer trained (once) on the shipped sample books, saved."""
    books = REPO_ROOT / "datamodules" / "samples" / "gutenberg"
    texts = [(books / name).read_text(encoding="utf-8")[:60_000] for name in ("pg11.txt", "pg35.txt")]
    target = tmp_path_factory.mktemp("unigram")
    documents = [part for text in texts for part in text.split("\n\n") if part.strip()]
    train_unigram(documents, 600, lowercase=False).save_pretrained(target)
    return target


def test_unigram_special_tokens_and_round_trip(unigram_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(unigram_dir))
    assert len(tok) == 600 and (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.convert_tokens_to_ids(SENTINELS) == list(range(599, 499, -1))  # <extra_id_0> = len - 1
    assert tok.extra_special_tokens == SENTINELS
    text = "Alice was beginning to get very tired of sitting by her sister on the bank."
    ids = tok(text)["input_ids"]
    assert ids[-1] == 1 and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(tok("two\nlines  here")["input_ids"], skip_special_tokens=True) == "two lines here"


# ------------------------------------------------------------------------------------------ data module


def t5_dm(corpus: Path, **kwargs) -> PretrainingDataModule:
    options = {"tokenizer_vocab_size": 600, "lowercase": False, "seq_len": 64, "micro_batch_size": 4, "val_size": 4,
               "objective": SpanCorruption(seed=1)}
    return PretrainingDataModule([str(corpus)], **(options | kwargs))


def test_data_module_trains_and_caches_a_unigram_tokenizer(sample_corpus, monkeypatch):
    dm = t5_dm(sample_corpus)
    assert (dm.planned_vocab_size, dm.planned_pad_token_id) == (600, 0)  # before any tokenizer exists
    assert dm.vocab_size == 600 and dm.pad_token_id == 0 and dm.tokenizer.convert_tokens_to_ids("<extra_id_0>") == 599
    monkeypatch.setattr(tokenizer_module, "train_unigram", lambda *a: pytest.fail("train_unigram must not run"))
    assert t5_dm(sample_corpus).tokenizer.get_vocab() == dm.tokenizer.get_vocab()
    with pytest.raises(ConfigurationError, match="exceed the 103 special tokens"):
        t5_dm(sample_corpus, tokenizer_vocab_size=103)


def test_data_module_blocks_batches_and_access_by_id(sample_corpus, unigram_dir):
    dm = t5_dm(sample_corpus, tokenizer=str(unigram_dir))
    dm.setup("fit")
    tok, blocks = dm.tokenizer, np.asarray(dm.blocks)
    assert blocks.shape[1] == 70 and dm.seq_len == 64  # compute_input_and_target_lengths(64) = (70, 14)
    stream = []
    for text in iter_documents(resolve_sources([str(sample_corpus)]), "text", None, "train", None):
        stream += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert blocks.reshape(-1).tolist() == stream[: blocks.size]  # bare stream, documents end with </s>

    train = dm.train_dataloader()
    train.sampler.set_epoch(2)  # as Lightning does before epoch 2; the loader corrupts with it
    out = next(iter(train))
    assert out["input_ids"].shape == (4, 64) and out["labels"].shape == (4, 14) and out["example_ids"].shape == (4,)
    assert out["input_ids"].dtype == out["labels"].dtype == torch.int64
    assert (out["labels"][:, 0] == 599).all() and (out["labels"][:, -1] == 1).all()

    ids = out["example_ids"].numpy()[[2, 0]]
    (again,) = list(dm.masked_batches(ids, epoch=2, batch_size=8))
    assert all(torch.equal(again[key], out[key][[2, 0]]) for key in ("input_ids", "labels"))
    in_workers = t5_dm(sample_corpus, tokenizer=str(unigram_dir), num_workers=1)
    in_workers.setup("fit")
    (from_worker,) = list(in_workers.masked_batches(ids, epoch=2, batch_size=8))
    assert torch.equal(from_worker["labels"], again["labels"])
    assert dm.example_fingerprint() == {"blocks": dm.example_fingerprint()["blocks"], "seq_len": 64,
                                        "objective": "span_corruption", "noise_density": 0.15,
                                        "mean_noise_span_length": 3.0, "seed": 1, "version": 1}


def test_masked_lm_and_span_corruption_blocks_never_share_a_cache_entry(tmp_path, sample_corpus, unigram_dir):
    # One tokenizer with both BERT's and T5's special tokens, so only the objective differs.
    from transformers import AutoTokenizer

    both = AutoTokenizer.from_pretrained(str(unigram_dir))
    both.add_special_tokens({"cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"})
    both.save_pretrained(tmp_path / "both")
    mlm = PretrainingDataModule([str(sample_corpus)], tokenizer=str(tmp_path / "both"), seq_len=32, val_size=4)
    t5 = t5_dm(sample_corpus, tokenizer=str(tmp_path / "both"), seq_len=32)
    for dm in (mlm, t5):
        dm.setup("fit")
    assert mlm.example_fingerprint()["blocks"] != t5.example_fingerprint()["blocks"]
    assert mlm.blocks.shape[1] == 32 and t5.blocks.shape[1] == compute_input_and_target_lengths(32, 0.15, 3.0)[0]
    meta = {name: json.loads((dm._blocks_path.parent / "meta.json").read_text())
            for name, dm in (("mlm", mlm), ("t5", t5))}
    assert "layout" not in meta["mlm"]["fingerprint"]  # masked LM's cache names are those of before layouts
    layout = {"length": t5.blocks.shape[1], "separator": 1, "prefix": [], "suffix": []}
    assert meta["t5"]["fingerprint"]["layout"] == layout


def test_streaming_packs_like_the_cache(tmp_path, sample_corpus, unigram_dir):
    documents = iter_documents(resolve_sources([str(sample_corpus)]), "text", None, "train", None)
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("".join(json.dumps({"text": text}) + "\n" for text in documents), encoding="utf-8")
    cached = t5_dm(jsonl, tokenizer=str(unigram_dir))
    cached.setup("fit")
    streamed = t5_dm(jsonl, tokenizer=str(unigram_dir), streaming=True, val_size=3)
    streamed.setup("fit")
    for sample in list(streamed.train_dataloader().dataset)[:5]:
        assert sample["input_ids"].tolist() == cached.blocks[sample["example_ids"]].tolist()


def test_a_recipe_selects_span_corruption_by_class_path(sample_corpus, unigram_dir):
    from jsonargparse import ArgumentParser
    from lightning.pytorch import LightningDataModule

    recipe = yaml.safe_load(f"""
    data:
      class_path: datamodules.pretraining.datamodule.PretrainingDataModule
      init_args:
        sources: [{sample_corpus}]
        tokenizer: {unigram_dir}
        seq_len: 64
        objective:
          class_path: datamodules.pretraining.span_corruption.SpanCorruption
          init_args: {{noise_density: 0.2, mean_noise_span_length: 2.0, seed: 5}}
    """)
    parser = ArgumentParser()
    parser.add_subclass_arguments(LightningDataModule, "data")
    dm = parser.instantiate_classes(parser.parse_object(recipe)).data
    assert isinstance(dm.objective, SpanCorruption) and dm.objective.fingerprint()["noise_density"] == 0.2
    assert dm.block_layout.length == compute_input_and_target_lengths(64, 0.2, 2.0)[0]


@pytest.mark.skipif(not (T5_TOKENIZER / "tokenizer.json").is_file(), reason="no T5 tokenizer in ../shared")
def test_released_t5_tokenizer(sample_corpus):
    dm = t5_dm(sample_corpus, tokenizer=str(T5_TOKENIZER), seq_len=512)
    assert dm.tokenizer.convert_tokens_to_ids("<extra_id_0>") == 32099
    assert dm.vocab_size == dm.planned_vocab_size == 32100
    dm.setup("fit")
    assert dm.blocks.shape[1] == 568
    (batch,) = list(dm.masked_batches(dm.train_example_ids[:2], epoch=0, batch_size=2))
    assert batch["input_ids"].shape == (2, 512) and batch["labels"].shape == (2, 114)
    sentinels = [token for token in batch["labels"][0].tolist() if token >= 32000]
    assert sentinels == list(range(32099, 32099 - 28, -1)) and batch["labels"][0, -1] == 1
    assert dm.tokenizer.decode(batch["labels"][0, :1]) == "<extra_id_0>"


def test_the_tokenizer_is_checked_before_packing(tmp_path, sample_corpus, unigram_dir, monkeypatch):
    monkeypatch.setattr(blocks_module, "tokenize_batch", lambda *a: pytest.fail("packing must not start"))
    with pytest.raises(ConfigurationError, match="needs 114 sentinels, the tokenizer has 100"):
        t5_dm(sample_corpus, tokenizer=str(unigram_dir), seq_len=2048).prepare_data()
    bert = wordpiece_tokenizer({token: i for i, token in enumerate([*SPECIAL_TOKENS.values(), "the"])}, True)
    bert.save_pretrained(tmp_path / "bert")
    with pytest.raises(ConfigurationError, match="no eos token"):
        t5_dm(sample_corpus, tokenizer=str(tmp_path / "bert")).prepare_data()
    bert.add_special_tokens({"eos_token": "</s>"})
    bert.save_pretrained(tmp_path / "bert")
    with pytest.raises(ConfigurationError, match="<extra_id_0>"):
        t5_dm(sample_corpus, tokenizer=str(tmp_path / "bert")).prepare_data()
