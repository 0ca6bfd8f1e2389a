"""``--data-dir hub``: hub rows (stand-ins shaped like the real ones; no network) become the Examples
the local readers make of the same content."""

from __future__ import annotations

import json
import time
from pathlib import Path

import datasets
import pytest

from datamodules.tasks.hub import HUB_SPLITS, hub_examples, hub_split
from datamodules.tasks.registry import get_task
from datamodules.tasks.spec import MissingTaskData
from tests.conftest import run_cli
from tests.test_finetune import MAX_LENGTH, SENTENCES, checkpoint  # noqa: F401  (the tiny-checkpoint fixture)
from tests.test_tasks import SUPERGLUE_FIXTURES, write

RTE_LABELS = ("entailment", "not_entailment")
COPA = [{"premise": "The man fell.", "choice1": "He slipped.", "choice2": "He sang.", "question": "cause",
         "idx": 0, "label": 0},
        {"premise": "I ate.", "choice1": "I was full.", "choice2": "I was hungry.", "question": "effect",
         "idx": 1, "label": 1}]
# MultiRC as the hub has it: one row per answer.
MULTIRC = [
    {"paragraph": "Sent one. Sent two.", "question": "What is one?", "answer": "A sentence",
     "idx": {"paragraph": 4, "question": 7, "answer": 20}, "label": 1},
    {"paragraph": "Sent one. Sent two.", "question": "What is one?", "answer": "A dog",
     "idx": {"paragraph": 4, "question": 7, "answer": 21}, "label": 0},
    {"paragraph": "Sent one. Sent two.", "question": "How many?", "answer": "Two",
     "idx": {"paragraph": 4, "question": 8, "answer": 22}, "label": 1},
]
# ReCoRD as the hub has it: one row per query; ``entities`` is an unordered set, ``entity_spans`` by start.
RECORD_PASSAGE = "Obama met Putin in Paris.\n@highlight\nObama visits Paris\n@highlight\nTalks with Putin"
RECORD = [{
    "passage": RECORD_PASSAGE, "query": "@placeholder hosted the talks.",
    "entities": ["Putin", "Paris", "Obama"],
    "entity_spans": [{"text": RECORD_PASSAGE[s:e + 1], "start": s, "end": e}
                     for s, e in ((0, 4), (10, 14), (19, 23), (37, 41))],
    "answers": ["Paris"], "idx": {"passage": 0, "query": 5},
}]
# WSC (wsc.fixed): the span fields are top-level columns.
WSC = [
    {"text": "Mark told Pete lies about himself . He should have been skeptical.", "span1_index": 0,
     "span2_index": 7, "span1_text": "Mark", "span2_text": "He", "idx": 0, "label": 0},
    {"text": "He put the pebble in the iron safe . Some day they might use it , but not now.", "span1_index": 6,
     "span2_index": 13, "span1_text": "iron safe", "span2_text": "it", "idx": 1, "label": 1},
]
HUB_ROWS = {
    ("glue", "rte", "train"): [{"sentence1": a, "sentence2": b, "label": RTE_LABELS.index(label), "idx": i}
                               for i, (a, b, label) in enumerate(SENTENCES * 2)],
    ("glue", "rte", "validation"): [{"sentence1": a, "sentence2": b, "label": RTE_LABELS.index(label), "idx": i}
                                    for i, (a, b, label) in enumerate(SENTENCES)],
    ("glue", "rte", "test"): [{"sentence1": a, "sentence2": b, "label": -1, "idx": i}
                              for i, (a, b, _) in enumerate(SENTENCES[:5])],
    ("glue", "stsb", "validation"): [{"sentence1": a, "sentence2": b, "label": score, "idx": i}
                                     for i, ((a, b, _), score) in enumerate(zip(SENTENCES, (4.2, 1.0, 3.5)))],
    ("glue", "mnli", "validation_matched"): [
        {"premise": a, "hypothesis": b, "label": label, "idx": i}
        for i, ((a, b, _), label) in enumerate(zip(SENTENCES, (0, 2, 1)))],
    ("glue", "cola", "test"): [{"sentence": a, "label": -1, "idx": i} for i, (a, _, _) in enumerate(SENTENCES[:3])],
    ("super_glue", "copa", "validation"): COPA,
    ("super_glue", "multirc", "validation"): MULTIRC,
    ("super_glue", "record", "validation"): RECORD,
    ("super_glue", "wsc.fixed", "validation"): WSC,
}


@pytest.fixture(autouse=True)
def hub(monkeypatch):
    """``datasets.load_dataset`` answered from ``HUB_ROWS``; anything else is unreachable."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    calls = []

    def load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        if (path, name, split) not in HUB_ROWS:
            raise ConnectionError(f"Couldn't reach '{path}' on the Hub (LocalEntryNotFoundError)")
        return datasets.Dataset.from_list(HUB_ROWS[path, name, split])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def _tsv(path: Path, header: list[str], rows: list[list]) -> Path:
    return write(path, "\n".join("\t".join(str(v) for v in row) for row in [header, *rows]) + "\n")


def _local(root: Path, suite: str, name: str, split: str):
    spec = get_task(suite, name)
    return spec.reader(root / spec.directory, split)


def test_split_table():
    assert hub_split(get_task("glue", "mnli"), "dev_mismatched") == "validation_mismatched"
    assert hub_split(get_task("glue", "mnli"), "test_matched") == "test_matched"
    assert hub_split(get_task("glue", "rte"), "dev") == HUB_SPLITS["dev"] == "validation"
    assert hub_split(get_task("glue", "ax"), "diagnostic-full") == hub_split(get_task("glue", "ax"), "diagnostic")
    assert hub_split(get_task("superglue", "axb"), "dev") == hub_split(get_task("superglue", "axg"), "test") == "test"


def test_glue_rows_match_the_local_readers(tmp_path, hub):
    _tsv(tmp_path / "RTE" / "dev.tsv", ["index", "sentence1", "sentence2", "label"],
         [[i, a, b, label] for i, (a, b, label) in enumerate(SENTENCES)])
    _tsv(tmp_path / "RTE" / "test.tsv", ["index", "sentence1", "sentence2"],
         [[i, a, b] for i, (a, b, _) in enumerate(SENTENCES[:5])])
    _tsv(tmp_path / "STS-B" / "dev.tsv", ["index", "genre", "sentence1", "sentence2", "score"],
         [[i, "news", a, b, score] for i, ((a, b, _), score) in enumerate(zip(SENTENCES, ("4.200", "1.000", "3.5")))])
    _tsv(tmp_path / "MNLI" / "dev_matched.tsv", ["index", "genre", "sentence1", "sentence2", "gold_label"],
         [[i, "fiction", a, b, label] for i, ((a, b, _), label)
          in enumerate(zip(SENTENCES, ("entailment", "contradiction", "neutral")))])
    _tsv(tmp_path / "CoLA" / "test.tsv", ["index", "sentence"], [[i, a] for i, (a, _, _) in enumerate(SENTENCES[:3])])
    for name, split in (("rte", "dev"), ("rte", "test"), ("stsb", "dev"), ("mnli", "dev_matched"), ("cola", "test")):
        examples = hub_examples(get_task("glue", name), split)
        assert examples == _local(tmp_path, "glue", name, split), (name, split)
    assert hub[-1] == ("glue", "cola", "test")
    assert all(e.label is None for e in hub_examples(get_task("glue", "cola"), "test"))
    assert [e.label for e in hub_examples(get_task("glue", "mnli"), "dev_matched")] == [0, 2, 1]
    assert isinstance(hub_examples(get_task("glue", "stsb"), "dev")[0].label, float)


@pytest.mark.parametrize("name, local_file, split", [
    ("copa", "COPA/val.jsonl", "dev"), ("multirc", "MultiRC/val.jsonl", "dev"),
    ("record", "ReCoRD/val.jsonl", "dev"), ("wsc", "WSC/val.jsonl", "dev"),
])
def test_superglue_rows_match_the_local_readers(name, local_file, split, tmp_path):
    spec = get_task("superglue", name)
    write(tmp_path / local_file, SUPERGLUE_FIXTURES[local_file])
    assert hub_examples(spec, split) == _local(tmp_path, "superglue", name, split)


def test_multirc_rows_are_grouped_by_question_and_keep_their_idx():
    examples = hub_examples(get_task("superglue", "multirc"), "dev")
    assert [e.idx for e in examples] == [row["idx"] for row in MULTIRC]
    assert [e.group for e in examples] == [(4, 7), (4, 7), (4, 8)]
    assert [e.label for e in examples] == [1, 0, 1]
    assert examples[2].segments == ("Sent one. Sent two.", "How many? Two")


def test_record_candidates_are_the_entities_and_the_label_the_first_gold_one():
    (example,) = hub_examples(get_task("superglue", "record"), "dev")
    assert set(example.candidate_texts) == set(RECORD[0]["entities"])
    assert example.candidate_texts == ("Obama", "Putin", "Paris")  # first mention, as the local reader orders them
    assert (example.idx, example.group, example.answers) == (5, 5, ("Paris",))
    assert example.candidate_texts[example.label] == "Paris"
    assert example.candidates[example.label][1] == "Paris hosted the talks."


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_offline_is_missing_data_without_trying(var, monkeypatch, hub):
    monkeypatch.setenv(var, "1")
    start = time.perf_counter()
    with pytest.raises(MissingTaskData, match=f"hub dataset glue/rte split train could not be reached: {var}"):
        hub_examples(get_task("glue", "rte"), "train")
    assert hub == [] and time.perf_counter() - start < 1


def test_unreachable_hub_is_missing_data(hub):
    with pytest.raises(MissingTaskData, match="super_glue/boolq split validation could not be reached: Connection"):
        hub_examples(get_task("superglue", "boolq"), "dev")
    assert hub == [("super_glue", "boolq", "validation")]


def test_finetune_from_the_hub_end_to_end(tmp_path, checkpoint, capsys):  # noqa: F811
    output = tmp_path / "out"
    code, out, err = run_cli(
        ["finetune", "--model", str(checkpoint), "--suite", "glue", "--tasks", "rte,mrpc", "--data-dir", "hub",
         "--output", str(output), "--max-epochs", "1", "--batch-size", "4", "--max-length", str(MAX_LENGTH)],
        capsys,
    )
    assert code == 0, err
    assert "rte seed 0 epoch 1/1" in out and "skipping glue mrpc" in out
    results = json.loads((output / "results.json").read_text())
    assert set(results["tasks"]) == {"rte"} and results["settings"]["data_dir"] == "hub"
    assert "hub dataset glue/mrpc split train could not be reached" in results["skipped"]["mrpc"]
    assert len((output / "submission" / "RTE.tsv").read_text().splitlines()) == 6
