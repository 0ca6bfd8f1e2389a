"""Text-to-text fine-tuning of T5 checkpoints: T5's input strings, label words and back, scoring of
generations that are no label word, the module, and ``ntng finetune`` end to end on a tiny T5."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration, T5TokenizerFast

from app.evaluation.metrics import score
from app.modules.text_to_text import TextToTextFineTuner, build_seq2seq_model
from datamodules.tasks.datamodule import TaskDataModule
from datamodules.tasks.registry import get_task, suite_tasks
from datamodules.tasks.spec import NO_LABEL, Example
from datamodules.tasks.text_to_text import (
    TextToTextCollator,
    encode_text_to_text,
    format_input,
    generation_length,
    parse_prediction,
    stsb_target,
    target_text,
    target_words,
)
from tests.conftest import SHARED_DATA, run_cli
from tests.test_finetune import SENTENCES, _jsonl, _lines, write_superglue

SPECIAL = ["<pad>", "</s>", "<unk>", *(f"<extra_id_{i}>" for i in range(4))]
FIELD_WORDS = ("rte cb copa hypothesis: premise: choice1: choice2: question: cause effect What was the cause? "
               "What happened as a result? the dog ate the book entailment not_entailment contradiction neutral "
               "choice1 choice2 sentence1: sentence2:")


def word_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the space-separated words of ``texts`` that, like T5's
    SentencePiece, decodes back to the text (Metaspace), has T5's special tokens and appends </s>."""
    words = sorted({word for text in texts for word in text.split(" ") if word})
    vocab = {token: i for i, token in enumerate(SPECIAL + ["\u2581" + word for word in words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   additional_special_tokens=SPECIAL[3:])


def save_tiny_t5(directory: Path, tokenizer: PreTrainedTokenizerFast) -> Path:
    """A tiny T5 (d_model 32, 2 layers, 2 heads, d_ff 64) with its tokenizer, saved like an export. The
    config is built from scratch, so it has no decoder_start_token_id (the module supplies it)."""
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=16, num_layers=2, num_heads=2, d_ff=64,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    T5ForConditionalGeneration(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def t5_tokenizer() -> PreTrainedTokenizerFast:
    return word_tokenizer([" ".join(row[:2]) for row in SENTENCES] + [FIELD_WORDS])


@pytest.fixture(scope="module")
def t5_checkpoint(tmp_path_factory, t5_tokenizer) -> Path:
    return save_tiny_t5(tmp_path_factory.mktemp("tiny-t5"), t5_tokenizer)


def write_rte(root: Path) -> Path:
    """SuperGLUE RTE (12 train, the first 6 of them as val) under ``root``."""
    rte = [{"premise": a, "hypothesis": b, "label": label, "idx": i} for i, (a, b, label) in enumerate(SENTENCES * 2)]
    _jsonl(root / "RTE" / "train.jsonl", rte)
    _jsonl(root / "RTE" / "val.jsonl", rte[:6])
    return root


RTE_EXAMPLES = [Example(idx=i, segments=(a, b), label=("entailment", "not_entailment").index(label))
                for i, (a, b, label) in enumerate(SENTENCES)]


# -- formats ---------------------------------------------------------------------------------------


def test_inputs_are_written_as_t5_writes_them():
    pair = Example(idx=0, segments=("A cat sat.", "A cat exists."), label=0)
    assert format_input(get_task("glue", "rte"), pair) == "rte sentence1: A cat sat. sentence2: A cat exists."
    assert format_input(get_task("glue", "mnli"), pair) == "mnli hypothesis: A cat exists. premise: A cat sat."
    assert format_input(get_task("glue", "ax"), pair) == "mnli hypothesis: A cat exists. premise: A cat sat."
    assert format_input(get_task("superglue", "cb"), pair) == "cb hypothesis: A cat exists. premise: A cat sat."
    # AX-b is predicted by the RTE model, so it is written as RTE.
    assert format_input(get_task("superglue", "axb"), pair) == "rte hypothesis: A cat exists. premise: A cat sat."
    assert format_input(get_task("superglue", "boolq"), Example(idx=0, segments=("is it?", "It is."))) == \
        "boolq passage: It is. question: is it?"
    copa = Example(idx=0, candidates=(("The man fell. What was the cause?", "He slipped."),
                                      ("The man fell. What was the cause?", "He sang.")), label=0)
    assert format_input(get_task("superglue", "copa"), copa) == \
        "copa choice1: He slipped. choice2: He sang. premise: The man fell. question: cause"
    wic = Example(idx=0, segments=("bank: The *bank* is open.", "A river *bank*."), label=1)
    assert format_input(get_task("superglue", "wic"), wic) == \
        "wic sentence1: The *bank* is open. sentence2: A river *bank*. word: bank"
    multirc = Example(idx={}, segments=("<b>Sent 1: </b>Cats nap.<br>", "Who naps? Cats"), label=1)
    assert format_input(get_task("superglue", "multirc"), multirc) == \
        "multirc question: Who naps? Cats paragraph: Sent 1: Cats nap. "


def test_targets_are_label_words_and_generations_map_back():
    assert target_words(get_task("superglue", "rte")) == ("entailment", "not_entailment")
    assert target_words(get_task("glue", "cola")) == ("unacceptable", "acceptable")
    assert target_words(get_task("glue", "sst2")) == ("negative", "positive")
    assert target_words(get_task("superglue", "copa")) == ("choice1", "choice2")
    assert target_words(get_task("superglue", "boolq")) == ("False", "True")
    cb = get_task("superglue", "cb")
    assert target_text(cb, Example(idx=0, segments=("a", "b"), label=2)) == "neutral"
    assert target_text(cb, Example(idx=0, segments=("a", "b"))) is None
    assert parse_prediction(cb, " neutral ") == 2
    assert parse_prediction(cb, "Neutral") == NO_LABEL and parse_prediction(cb, "") == NO_LABEL
    assert parse_prediction(get_task("superglue", "copa"), "choice2") == 1


@pytest.mark.skipif(not (SHARED_DATA / "tokenizers" / "t5").is_dir(), reason="shared T5 tokenizer not present")
def test_every_label_word_survives_t5s_own_tokenizer():
    tokenizer = T5TokenizerFast.from_pretrained(SHARED_DATA / "tokenizers" / "t5")
    for suite in ("glue", "superglue"):
        for spec in suite_tasks(suite):
            words = target_words(spec)
            decoded = [tokenizer.decode(tokenizer(word)["input_ids"], skip_special_tokens=True) for word in words]
            assert [parse_prediction(spec, text) for text in decoded] == (
                [float(w) for w in words] if spec.kind == "regression" else list(range(len(words)))), spec.name


def test_stsb_targets_round_to_a_fifth_and_non_numbers_count_as_zero():
    stsb = get_task("glue", "stsb")
    assert [stsb_target(v) for v in (3.77, 1.23, 4.91, 0.0, 5.0)] == ["3.8", "1.2", "5.0", "0.0", "5.0"]
    assert len(target_words(stsb)) == 26 and target_words(stsb)[:2] == ("0.0", "0.2")
    assert parse_prediction(stsb, "3.8") == pytest.approx(3.8)
    assert [parse_prediction(stsb, text) for text in ("three", "", "nan", "inf")] == [0.0] * 4


def test_generations_that_are_no_label_word_are_wrong_whatever_the_label():
    rte = get_task("superglue", "rte")
    examples = RTE_EXAMPLES[:4]  # labels 0, 1, 0, 1
    assert score(rte, examples, [0, 1, NO_LABEL, NO_LABEL]) == {"accuracy": 0.5}
    # Binary F1 (MultiRC F1a): a positive label missed, no false positive for a negative one.
    multirc = get_task("superglue", "multirc")
    grouped = [Example(idx={"paragraph": 0, "question": i, "answer": 0}, segments=("p", "q"), label=e.label)
               for i, e in enumerate(examples)]
    assert score(multirc, grouped, [0, 1, NO_LABEL, NO_LABEL]) == {"f1": pytest.approx(2 / 3), "exact_match": 0.5}
    # CB macro-F1 averages the real classes only: labels 0, 1, 2; predictions 0, 1, none.
    cb = get_task("superglue", "cb")
    three = [Example(idx=i, segments=("a", "b"), label=i) for i in range(3)]
    assert score(cb, three, [0, 1, NO_LABEL]) == {"accuracy": pytest.approx(2 / 3), "f1": pytest.approx(2 / 3)}
    assert score(cb, three, [0, 1, 2])["f1"] == 1.0
    assert score(get_task("glue", "cola"), examples, [0, 1, 0, NO_LABEL])["matthews"] < \
        score(get_task("glue", "cola"), examples, [0, 1, 0, 1])["matthews"]


def test_features_end_with_eos_and_batches_pad_targets_with_minus_100(t5_tokenizer):
    rte = get_task("superglue", "rte")
    features = encode_text_to_text(rte, t5_tokenizer, RTE_EXAMPLES[:2] + [Example(idx=9, segments=("a", "b"))], 64)
    eos = t5_tokenizer.eos_token_id
    assert all(f["input_ids"][-1] == eos for f in features) and [f["index"] for f in features] == [0, 1, 2]
    assert t5_tokenizer.decode(features[0]["input_ids"], skip_special_tokens=True) == \
        "rte hypothesis: a cat sat premise: the cat sat on the house"
    assert features[1]["labels"] == t5_tokenizer("not_entailment")["input_ids"] and "labels" not in features[2]
    assert generation_length(rte, t5_tokenizer) == 2  # "not_entailment" </s>
    batch = TextToTextCollator(0)([{"input_ids": [5, 6, 1], "labels": [7, 1], "index": 3},
                                   {"input_ids": [5, 1], "labels": [1], "index": 4}])
    assert batch["input_ids"].tolist() == [[5, 6, 1], [5, 1, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[7, 1], [1, -100]] and batch["index"].tolist() == [3, 4]
    assert "labels" not in TextToTextCollator(0)(features[2:])
    truncated = encode_text_to_text(rte, t5_tokenizer, RTE_EXAMPLES[:1], 4)[0]["input_ids"]
    assert len(truncated) == 4 and truncated[-1] == eos


def test_encoder_decoder_configs_choose_the_text_to_text_format(t5_checkpoint, t5_tokenizer, tmp_path):
    model = build_seq2seq_model(t5_checkpoint)
    assert model.training and model.config.decoder_start_token_id == t5_tokenizer.pad_token_id
    data = TaskDataModule(get_task("superglue", "cb"), write_superglue(tmp_path), t5_tokenizer, batch_size=4,
                          model_config=model.config)
    data.setup("fit")
    batch = next(iter(data.val_dataloader()[0]))
    assert set(batch) == {"input_ids", "attention_mask", "index", "labels"}


# -- the module ------------------------------------------------------------------------------------


def test_a_tiny_text_to_text_fine_tune_learns_its_examples(t5_checkpoint, t5_tokenizer):
    rte = get_task("superglue", "rte")
    torch.manual_seed(0)
    module = TextToTextFineTuner(rte, t5_checkpoint, t5_tokenizer)
    batch = TextToTextCollator(t5_tokenizer.pad_token_id)(encode_text_to_text(rte, t5_tokenizer, RTE_EXAMPLES, 64))
    labels = [example.label for example in RTE_EXAMPLES]
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2)
    module.eval()
    with torch.no_grad():
        before_loss, before = float(module(batch)), module.generate(batch)
    module.train()
    for _ in range(30):
        module(batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    module.eval()
    with torch.no_grad():
        after_loss, after = float(module(batch)), module.generate(batch)
    accuracy = [sum(p == label for p, label in zip(predictions, labels)) / len(labels)
                for predictions in (before, after)]
    assert after_loss < before_loss / 4 and accuracy[1] > accuracy[0] and accuracy[1] == 1.0


# -- ntng finetune ---------------------------------------------------------------------------------


def test_finetune_superglue_text_to_text_end_to_end(tmp_path, t5_checkpoint, capsys):
    data, output = write_superglue(tmp_path / "superglue"), tmp_path / "out"
    write_rte(data)
    code, out, err = run_cli(
        ["finetune", "--model", str(t5_checkpoint), "--suite", "superglue", "--tasks", "copa,cb,rte,record",
         "--data-dir", str(data), "--output", str(output), "--max-epochs", "2", "--batch-size", "4",
         "--max-length", "48"],
        capsys,
    )
    assert code == 0, err
    assert "(text-to-text)" in out and "copa seed 0 epoch 2/2" in out
    results = json.loads((output / "results.json").read_text())
    assert set(results["tasks"]) == {"copa", "cb", "rte"}
    assert set(results["tasks"]["cb"]) == {"accuracy", "f1"} and set(results["tasks"]["copa"]) == {"accuracy"}
    assert all(0.0 <= v <= 1.0 for metrics in results["tasks"].values() for v in metrics.values())
    assert "ReCoRD has no text-to-text format" in results["skipped"]["record"]
    assert results["settings"]["text_to_text"] is True and results["settings"]["lr"] == 5e-5
    assert {"superglue_score", "ntng_superglue"} <= set(results["averages"])
    for task in ("copa", "cb", "rte"):
        lines = _lines(output / "predictions" / f"{task}_dev.jsonl")
        assert len(lines) == 6 and all(line["prediction"] in (NO_LABEL, 0, 1, 2) for line in lines)
    submission = _lines(output / "submission" / "COPA.jsonl")
    assert len(submission) == 4 and all(line["label"] in (0, 1) for line in submission)
    assert (output / "results.md").is_file() and list((output / "tensorboard" / "rte" / "seed_0").iterdir())


def test_finetune_text_to_text_learns_the_training_examples(tmp_path, t5_checkpoint, capsys):
    # The dev examples are among the training examples: generation in validation_step, mapped back
    # to class ids, must then score them right.
    data = write_rte(tmp_path / "superglue")
    code, _, err = run_cli(
        ["finetune", "--model", str(t5_checkpoint), "--suite", "superglue", "--tasks", "rte", "--data-dir", str(data),
         "--output", str(tmp_path / "out"), "--max-epochs", "15", "--batch-size", "4", "--lr", "3e-3",
         "--max-length", "48"],
        capsys,
    )
    assert code == 0, err
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["tasks"]["rte"]["accuracy"] > 0.9
