"""Fine-tuning: the task data module, the FineTuner and ``ntng finetune`` end to end on tiny data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from app.modules.finetuner import FineTuner, gather_predictions
from app.modules.masked_lm import MaskedLanguageModel
from datamodules.tasks.datamodule import CandidateCollator, TaskDataModule
from datamodules.tasks.registry import get_task
from datamodules.tasks.spec import Example, TaskSpec
from datamodules.pretraining.tokenizer import wordpiece_tokenizer
from tests.conftest import TINY_CONFIG, run_cli

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MAX_LENGTH = 32
WORDS = (
    "the a an is was were not no yes and or of to in on at it he she they we cat dog man woman child "
    "ran sat saw ate big small good bad red blue house park car book water food happy sad home today "
    "what cause happened result because so this that there who"
).split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A WordPiece tokenizer over ``WORDS`` with BERT's special tokens and [CLS] a [SEP] b [SEP] pairs."""
    return wordpiece_tokenizer({token: i for i, token in enumerate(SPECIAL + WORDS + list(".,?!'\":;-"))}, True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny exported masked-LM checkpoint (RoBERTa-PreLN, 2 layers, hidden 32) with its tokenizer."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = MaskedLanguageModel(config=dict(TINY_CONFIG), vocab_size=len(tokenizer),
                                pad_token_id=tokenizer.pad_token_id)
    return model.export_pretrained(tmp_path_factory.mktemp("tiny-checkpoint"), tokenizer)


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return AutoTokenizer.from_pretrained(checkpoint)


# -- fixture data in the original formats ----------------------------------------------------------

SENTENCES = [
    ("the cat sat on the house", "a cat sat", "entailment"),
    ("the dog ran in the park", "the dog was not in the park", "not_entailment"),
    ("a man ate good food at home", "a man ate", "entailment"),
    ("the woman saw a red car", "the woman saw no car", "not_entailment"),
    ("the child was happy today", "the child was sad", "not_entailment"),
    ("they saw a big blue house", "they saw a house", "entailment"),
]


def _tsv(path: Path, header: list[str] | None, rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ([("\t".join(header))] if header else []) + ["\t".join(str(v) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")


def _jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def write_glue(root: Path, train_size: int = 12) -> Path:
    """GLUE RTE and STS-B (train/dev/test) as the download script writes them; MRPC left out."""
    rows = [SENTENCES[i % len(SENTENCES)] for i in range(train_size)]
    _tsv(root / "RTE" / "train.tsv", ["index", "sentence1", "sentence2", "label"],
         [[i, a, b, label] for i, (a, b, label) in enumerate(rows)])
    _tsv(root / "RTE" / "dev.tsv", ["index", "sentence1", "sentence2", "label"],
         [[i, a, b, label] for i, (a, b, label) in enumerate(SENTENCES)])
    _tsv(root / "RTE" / "test.tsv", ["index", "sentence1", "sentence2"],
         [[i, a, b] for i, (a, b, _) in enumerate(SENTENCES[:5])])
    sts_header = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2"]
    scores = [4.2, 1.0, 3.4, 0.6, 1.8, 4.8]
    _tsv(root / "STS-B" / "train.tsv", sts_header + ["score"],
         [[i, "main-news", "x", "2012", f"{i:04d}", "none", "none", a, b, f"{scores[i % 6]:.3f}"]
          for i, (a, b, _) in enumerate(rows)])
    _tsv(root / "STS-B" / "dev.tsv", sts_header + ["score"],
         [[i, "main-news", "x", "2012", f"{i:04d}", "none", "none", a, b, f"{scores[i]:.3f}"]
          for i, (a, b, _) in enumerate(SENTENCES)])
    # MNLI with two dev splits and one of its two test splits; the AX diagnostic, labelled and not.
    nli = {"entailment": "entailment", "not_entailment": "contradiction"}
    mnli_header = ["index", "genre", "sentence1", "sentence2", "gold_label"]
    _tsv(root / "MNLI" / "train.tsv", mnli_header,
         [[i, "fiction", a, b, nli[label] if i % 3 else "neutral"] for i, (a, b, label) in enumerate(rows)])
    for split in ("dev_matched", "dev_mismatched"):
        _tsv(root / "MNLI" / f"{split}.tsv", mnli_header,
             [[i, "fiction", a, b, nli[label]] for i, (a, b, label) in enumerate(SENTENCES[:4])])
    _tsv(root / "MNLI" / "test_matched.tsv", ["index", "genre", "sentence1", "sentence2"],
         [[i, "fiction", a, b] for i, (a, b, _) in enumerate(SENTENCES[:3])])
    _tsv(root / "diagnostic" / "diagnostic-full.tsv", ["Lexical Semantics", "Premise", "Hypothesis", "Label"],
         [["", a, b, nli[label]] for a, b, label in SENTENCES])
    _tsv(root / "diagnostic" / "diagnostic.tsv", ["index", "sentence1", "sentence2"],
         [[i, a, b] for i, (a, b, _) in enumerate(SENTENCES)])
    return root


def write_superglue(root: Path, train_size: int = 12) -> Path:
    """SuperGLUE CB and COPA (train/val/test JSONL)."""
    cb_labels = {"entailment": "entailment", "not_entailment": "contradiction"}
    cb = [{"premise": a, "hypothesis": b, "label": cb_labels[label] if i % 5 else "neutral", "idx": i}
          for i, (a, b, label) in enumerate(SENTENCES[i % 6] for i in range(train_size))]
    _jsonl(root / "CB" / "train.jsonl", cb)
    _jsonl(root / "CB" / "val.jsonl", cb[:6])
    _jsonl(root / "CB" / "test.jsonl", [{k: v for k, v in r.items() if k != "label"} for r in cb[:4]])
    copa = [{"premise": a, "choice1": b, "choice2": "the dog ate the book", "question": ("cause", "effect")[i % 2],
             "label": i % 2, "idx": i}
            for i, (a, b, _) in enumerate(SENTENCES[i % 6] for i in range(train_size))]
    _jsonl(root / "COPA" / "train.jsonl", copa)
    _jsonl(root / "COPA" / "val.jsonl", copa[:6])
    _jsonl(root / "COPA" / "test.jsonl", [{k: v for k, v in r.items() if k != "label"} for r in copa[:4]])
    return root


def choice_spec(examples: list[Example]) -> TaskSpec:
    """An unregistered multiple-choice task serving ``examples`` for every split."""
    return TaskSpec(name="toy-choice", suite="superglue", kind="multiple_choice", label_names=(),
                    metrics=("accuracy",), directory="toy", reader=lambda task_dir, split: list(examples))


CHOICE_EXAMPLES = [
    Example(idx=0, candidates=(("the cat sat", "on the house"), ("the cat sat", "in the car")), label=0),
    Example(idx=1, candidates=(("a dog ran", "to the park"), ("a dog ran", "home"), ("a dog ran", "at the car")),
            label=2),
    Example(idx=2, candidates=(("the man ate",),), label=0),
]



# -- the data module -------------------------------------------------------------------------------


def test_pairs_are_tokenized_as_pairs_and_subsets_take_the_first_examples(tmp_path, tokenizer):
    data = TaskDataModule(get_task("glue", "rte"), write_glue(tmp_path), tokenizer, max_length=MAX_LENGTH,
                          batch_size=4, max_train_examples=10, max_eval_examples=4)
    data.setup("fit")
    assert [e.idx for e in data.train_examples] == list(range(10))
    assert [e.idx for e in data.eval_examples["dev"]] == [0, 1, 2, 3]
    # One batch of the in-order dev loader: [CLS] a [SEP] b [SEP], second segment typed 1, labels and index.
    batch = next(iter(data.val_dataloader()[0]))
    a, b, _ = SENTENCES[0]
    expected = tokenizer(a, b)["input_ids"]
    assert batch["input_ids"][0, : len(expected)].tolist() == expected
    assert (batch["input_ids"][0] == tokenizer.sep_token_id).sum() == 2
    assert batch["token_type_ids"][0, : len(expected)].tolist() == tokenizer(a, b)["token_type_ids"]
    assert set(batch["token_type_ids"][0].tolist()) == {0, 1}
    assert batch["labels"].tolist() == [0, 1, 0, 1] and batch["index"].tolist() == [0, 1, 2, 3]
    # Training: shuffled, incomplete last batch dropped (10 examples, batch 4 -> 2 batches).
    assert len(data.train_dataloader()) == 2
    # Truncation keeps every input within max_length, longest segment first.
    long = TaskDataModule(get_task("glue", "rte"), tmp_path, tokenizer, max_length=8, batch_size=4)
    features = long.encode([Example(idx=0, segments=("the cat sat on the big red house today", "a cat"))])
    assert len(features[0]["input_ids"]) == 8 and features[0]["input_ids"].count(tokenizer.sep_token_id) == 2


def test_regression_labels_are_floats(tmp_path, tokenizer):
    data = TaskDataModule(get_task("glue", "stsb"), write_glue(tmp_path), tokenizer, max_length=MAX_LENGTH,
                          batch_size=4)
    data.setup("fit")
    batch = next(iter(data.val_dataloader()[0]))
    assert batch["labels"].dtype == torch.float32
    assert batch["labels"].tolist() == pytest.approx([4.2, 1.0, 3.4, 0.6])


def test_candidates_are_padded_with_a_mask(tokenizer):
    data = TaskDataModule(choice_spec(CHOICE_EXAMPLES), ".", tokenizer, max_length=MAX_LENGTH, batch_size=2,
                          eval_batch_size=3)
    data.setup("fit")
    batch = next(iter(data.val_dataloader()[0]))
    assert batch["input_ids"].shape[:2] == (3, 3)
    assert batch["candidate_mask"].tolist() == [[True, True, False], [True, True, True], [True, False, False]]
    # Padded candidates are all padding; real ones are the candidate's pair encoding.
    assert (batch["input_ids"][0, 2] == tokenizer.pad_token_id).all() and not batch["attention_mask"][0, 2].any()
    expected = tokenizer("a dog ran", "at the car")["input_ids"]
    assert batch["input_ids"][1, 2, : len(expected)].tolist() == expected
    assert batch["labels"].tolist() == [0, 2, 0]
    # Unlabelled examples (test) batch without labels.
    unlabelled = CandidateCollator(tokenizer.pad_token_id)(data.encode([Example(idx=9, candidates=(("a",), ("b",)))]))
    assert "labels" not in unlabelled and unlabelled["candidate_mask"].all()


def test_too_few_training_examples_for_one_batch_is_an_error(tmp_path, tokenizer):
    from app.errors import ConfigurationError

    data = TaskDataModule(get_task("glue", "rte"), write_glue(tmp_path, train_size=3), tokenizer, batch_size=4)
    with pytest.raises(ConfigurationError, match="no full batch of 4"):
        data.setup("fit")


# -- the module ------------------------------------------------------------------------------------


def _batch(spec: TaskSpec, tmp_path: Path, tokenizer) -> dict[str, torch.Tensor]:
    data = TaskDataModule(spec, write_glue(tmp_path), tokenizer, max_length=MAX_LENGTH, batch_size=4)
    data.setup("fit")
    return next(iter(data.train_dataloader()))


@pytest.mark.parametrize("task", ["rte", "stsb"])
def test_classification_and_regression_forward_backward(task, tmp_path, checkpoint, tokenizer):
    spec = get_task("glue", task)
    module = FineTuner(spec, checkpoint)
    assert module.model.training  # dropout on while fine-tuning (from_pretrained returns eval mode)
    assert module.lr == 4e-5
    batch = _batch(spec, tmp_path, tokenizer)
    logits = module(batch)
    assert logits.shape == ((4, 2) if task == "rte" else (4,))
    loss = module.loss(logits, batch["labels"])
    loss.backward()
    assert torch.isfinite(loss)
    encoder_grads = [p.grad for n, p in module.model.named_parameters() if "encoder" in n]
    assert encoder_grads and all(g is not None for g in encoder_grads)
    predictions = module.predictions(logits)
    assert predictions.shape == (4,)
    assert predictions.dtype == (torch.long if task == "rte" else torch.float32)


def test_multiple_choice_masks_padded_candidates(checkpoint, tokenizer):
    spec = choice_spec(CHOICE_EXAMPLES)
    module = FineTuner(spec, checkpoint)
    assert module.lr == 5e-5
    data = TaskDataModule(spec, ".", tokenizer, max_length=MAX_LENGTH, batch_size=3)
    data.setup("fit")
    batch = next(iter(data.val_dataloader()[0]))
    # Even with a head that scores padding highest, a padded candidate never wins.
    with torch.no_grad():
        module.model.classifier.bias.fill_(1e6)
    logits = module(batch)
    assert logits.shape == (3, 3)
    assert torch.isinf(logits[~batch["candidate_mask"]]).all() and torch.isfinite(logits[batch["candidate_mask"]]).all()
    predictions = module.predictions(logits)
    assert all(batch["candidate_mask"][i, p] for i, p in enumerate(predictions.tolist()))
    loss = module.loss(logits, batch["labels"])
    loss.backward()
    assert torch.isfinite(loss) and module.model.classifier.weight.grad is not None
    # A candidate's score does not depend on how much padding its batch has.
    module.eval()
    with torch.no_grad():
        alone = module(CandidateCollator(tokenizer.pad_token_id)(data.encode(CHOICE_EXAMPLES[:1])))
        padded = module(batch)
    assert torch.allclose(alone[0], padded[0, :2], atol=1e-5)


def test_gather_predictions_restores_example_order():
    outputs = [(torch.tensor([2, 0]), torch.tensor([1, 0])), (torch.tensor([1]), torch.tensor([1]))]
    assert gather_predictions(outputs, 3) == [0, 1, 1]
    with pytest.raises(RuntimeError, match="1 of 4"):
        gather_predictions(outputs, 4)


# -- ntng finetune ---------------------------------------------------------------------------------


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _event_files(directory: Path) -> list[Path]:
    return list(directory.glob("events.out.tfevents.*"))


def test_finetune_glue_end_to_end(tmp_path, checkpoint, capsys):
    data, output = write_glue(tmp_path / "glue"), tmp_path / "out"
    code, out, err = run_cli(
        ["finetune", "--model", str(checkpoint), "--suite", "glue", "--tasks", "rte,stsb,mrpc",
         "--data-dir", str(data), "--output", str(output), "--max-epochs", "1", "--batch-size", "4",
         "--max-length", str(MAX_LENGTH)],
        capsys,
    )
    assert code == 0, err
    assert "skipping glue mrpc" in out and "rte seed 0 epoch 1/1" in out and "| task |" in out
    results = json.loads((output / "results.json").read_text())
    assert set(results["tasks"]) == {"rte", "stsb"}
    assert set(results["tasks"]["rte"]) == {"accuracy"} and set(results["tasks"]["stsb"]) == {"pearson", "spearman"}
    assert set(results["best_epoch"]["tasks"]) == {"rte", "stsb"}
    assert {"ntng_glue", "glue_score"} <= set(results["averages"])
    assert "mrpc/f1" in results["averages"]["ntng_glue"]["missing"]
    assert "mrpc" in results["skipped"] and "not found" in results["skipped"]["mrpc"]
    assert results["settings"]["lr"] == 4e-5 and results["settings"]["max_epochs"] == 1
    assert "mrpc" in (output / "results.md").read_text()
    rte = _lines(output / "predictions" / "rte_dev.jsonl")
    assert len(rte) == len(SENTENCES) and set(rte[0]) == {"idx", "label", "prediction"}
    assert [line["idx"] for line in rte] == list(range(len(SENTENCES)))
    assert isinstance(_lines(output / "predictions" / "stsb_dev.jsonl")[0]["prediction"], float)
    submission = (output / "submission" / "RTE.tsv").read_text().splitlines()
    assert submission[0] == "index\tprediction" and len(submission) == 6
    assert all(row.split("\t")[1] in ("entailment", "not_entailment") for row in submission[1:])
    assert not (output / "submission" / "STS-B.tsv").exists()  # no STS-B test file in the fixture
    for run in ("rte/seed_0", "stsb/seed_0", "summary"):
        assert _event_files(output / "tensorboard" / run), run


def test_finetune_mnli_reports_both_dev_splits_and_predicts_the_diagnostic(tmp_path, checkpoint, capsys):
    data, output = write_glue(tmp_path / "glue"), tmp_path / "out"
    code, out, err = run_cli(
        ["finetune", "--model", str(checkpoint), "--suite", "glue", "--tasks", "ax", "mnli",
         "--data-dir", str(data), "--output", str(output), "--max-epochs", "1", "--batch-size", "4",
         "--max-length", str(MAX_LENGTH)],
        capsys,
    )
    assert code == 0, err
    results = json.loads((output / "results.json").read_text())
    assert set(results["tasks"]) == {"mnli-m", "mnli-mm", "ax"} and not results["skipped"]
    assert set(results["tasks"]["ax"]) == {"matthews"}
    for key in ("mnli-m", "mnli-mm"):
        assert len(_lines(output / "predictions" / f"{key}_dev.jsonl")) == 4
    assert len(_lines(output / "predictions" / "ax_diagnostic-full.jsonl")) == len(SENTENCES)
    assert len((output / "submission" / "MNLI-m.tsv").read_text().splitlines()) == 4
    assert not (output / "submission" / "MNLI-mm.tsv").exists()  # test_mismatched is absent: no file
    assert len((output / "submission" / "AX.tsv").read_text().splitlines()) == len(SENTENCES) + 1


def test_finetune_superglue_end_to_end_with_two_seeds(tmp_path, checkpoint, capsys):
    data, output = write_superglue(tmp_path / "superglue"), tmp_path / "out"
    code, out, err = run_cli(
        ["finetune", "--model", str(checkpoint), "--suite", "superglue", "--tasks", "cb", "copa",
         "--seeds", "0", "1", "--data-dir", str(data), "--output", str(output), "--max-epochs", "1",
         "--batch-size", "4", "--max-length", str(MAX_LENGTH), "--max-train-examples", "8"],
        capsys,
    )
    assert code == 0, err
    results = json.loads((output / "results.json").read_text())
    assert set(results["tasks"]) == {"cb", "copa"} and not results["skipped"]
    copa = results["tasks"]["copa"]["accuracy"]
    assert set(copa) == {"mean", "std", "per_seed"} and set(copa["per_seed"]) == {"0", "1"}
    assert results["settings"]["lr"] == 5e-5
    assert len(_lines(output / "predictions" / "copa_dev.jsonl")) == 6
    assert (output / "predictions" / "copa_dev_seed1.jsonl").is_file()
    submission = _lines(output / "submission" / "COPA.jsonl")
    assert len(submission) == 4 and all(line["label"] in (0, 1) for line in submission)
    assert {line["label"] for line in _lines(output / "submission" / "CB.jsonl")} <= {
        "entailment", "contradiction", "neutral"}
    assert _event_files(output / "tensorboard" / "copa" / "seed_1")


@pytest.mark.parametrize("suite, task, metric, epochs", [("glue", "rte", "accuracy", 15),
                                                          ("glue", "stsb", "pearson", 40),
                                                          ("superglue", "copa", "accuracy", 15)])
def test_finetuning_learns_the_training_examples(suite, task, metric, epochs, tmp_path, checkpoint, capsys):
    # The dev examples are among the training examples: a working engine fits them. (Regression
    # needs longer: the head first has to find the labels' mean.)
    data = write_glue(tmp_path / "data") if suite == "glue" else write_superglue(tmp_path / "data")
    code, _, err = run_cli(
        ["finetune", "--model", str(checkpoint), "--suite", suite, "--tasks", task, "--data-dir", str(data),
         "--output", str(tmp_path / "out"), "--max-epochs", str(epochs), "--batch-size", "4",
         "--max-length", "32", "--lr", "3e-3"],
        capsys,
    )
    assert code == 0, err
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["tasks"][task][metric] > 0.9


def test_finetune_is_reproducible_per_seed(tmp_path, checkpoint, capsys):
    data = write_glue(tmp_path / "glue")
    documents = []
    for run in ("a", "b"):
        code, _, err = run_cli(
            ["finetune", "--model", str(checkpoint), "--suite", "glue", "--tasks", "stsb", "--data-dir", str(data),
             "--output", str(tmp_path / run), "--max-epochs", "1", "--batch-size", "4", "--max-length", "32"],
            capsys,
        )
        assert code == 0, err
        documents.append(json.loads((tmp_path / run / "results.json").read_text())["tasks"])
    assert documents[0] == documents[1]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tasks", "rte,nosuchtask"], "unknown glue task 'nosuchtask'; known tasks: cola, sst2"),
        (["--tasks", "rte", "--max-length", "128"], "--max-length 128 exceeds the model's 39 positions"),
    ],
)
def test_bad_input_is_one_line(extra, message, tmp_path, checkpoint, capsys):
    code, _, err = run_cli(["finetune", "--model", str(checkpoint), "--suite", "glue",
                            "--data-dir", str(tmp_path), "--output", str(tmp_path / "out"), *extra], capsys)
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("ntng: error:")]
    assert len(errors) == 1 and message in errors[0]
    assert not (tmp_path / "out" / "results.json").exists()


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="staged GLUE/SuperGLUE data (shared/data) not present")
@pytest.mark.parametrize("suite, task, submission", [("glue", "rte", "RTE.tsv"), ("superglue", "cb", "CB.jsonl")])
def test_finetune_on_staged_data(suite, task, submission, tmp_path, checkpoint, capsys):
    output = tmp_path / "out"
    code, out, err = run_cli(
        ["finetune", "--model", str(checkpoint), "--suite", suite, "--tasks", task,
         "--data-dir", str(SHARED_DATA / suite), "--output", str(output), "--max-epochs", "1",
         "--max-length", str(MAX_LENGTH), "--max-train-examples", "64", "--max-eval-examples", "64"],
        capsys,
    )
    assert code == 0, err
    results = json.loads((output / "results.json").read_text())
    assert set(results["tasks"]) == {task} and not results["skipped"]
    assert 0.0 <= results["tasks"][task]["accuracy"] <= 1.0
    assert len(_lines(output / "predictions" / f"{task}_dev.jsonl")) == (64 if task == "rte" else 56)
    assert (output / "submission" / submission).is_file()
