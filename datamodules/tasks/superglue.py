"""SuperGLUE task readers: the official JSON-lines files (``train.jsonl``, ``val.jsonl``, ``test.jsonl``).

The split ``dev`` is read from ``val.jsonl``. Files are read as ``utf-8-sig`` (a BOM is dropped),
one JSON object per line; blank lines are skipped and a line that is not a JSON object, or that
lacks a field, is a ``ConfigurationError`` naming file and line. Test splits are unlabelled
(``label=None``). ``idx`` is each record's own ``idx``. Booleans (BoolQ, MultiRC, WiC, WSC) map to
the label names ``("False", "True")`` (the Hugging Face ``super_glue`` class names): ``false``/``0``
is 0 and ``true``/``1`` is 1, whether written as JSON booleans, integers (MultiRC) or strings
(any case). String labels must be one of the task's label names.

Each task puts every field into at most two segments:

* BoolQ: (question, passage).
* CB, RTE, AX-g: (premise, hypothesis); AX-b: (sentence1, sentence2). AX-g's ``pair_id`` is metadata.
* COPA: multiple choice over (choice1, choice2); each candidate is
  (premise + " What was the cause?" or " What happened as a result?", choice), so the question type
  reaches the model. ``label`` is the index of the right choice.
* MultiRC: one example per answer option: (paragraph, question + " " + answer), idx
  ``{"paragraph", "question", "answer"}`` and group ``(paragraph idx, question idx)``. This is the
  current (v1.1) layout, as staged; the 2019 release's ``paragraph``/``isAnswer`` layout is not read.
* ReCoRD: one multiple-choice example per query. The candidates are the passage's unique entity
  strings (``passage.entities`` offsets, ``end`` inclusive) in order of first mention; candidate *i* is
  (passage, query with ``@placeholder`` replaced by entity *i*). The passage's ``@highlight`` lines
  become sentences (". " joins them, as in T5's preprocessing). ``answers`` are the gold texts, and
  ``label`` is the first candidate that is a gold answer (None when none is, and on test).
* WiC: (word + ": " + sentence1, sentence2) with the target word's occurrence in each sentence (the
  ``start``/``end`` character offsets) marked as ``*...*``; the offsets hold in every staged file
  (they point at inflected forms: "bought" for "buy").
* WSC: (text with span1 marked ``*...*`` and span2 ``#...#``, ``Does "<span2>" refer to "<span1>"?``).
  Spans are located by word index in ``text.split()``, covering as many words as the span text
  has (a possessive word like "Emma's" for "Emma" is marked whole). Where the words there do not
  start with the span text (letters and digits compared, case-insensitively), the nearest index
  where they do is used (staged WSC val idx 42 has ``span2_index`` 30 for "it", which is word 31);
  where none does (test's "Kamenev and Zinoviev" spans, split by other words) the index is kept.

AX-b and AX-g are diagnostics predicted by the RTE model; their one file serves as the labelled
``dev`` split and as the (label-stripped) ``test`` split whose predictions are submitted; they have
no ``train`` split. When ``AX-b/AX-b.jsonl`` is absent, AX-b is built from GLUE's labelled
diagnostic, the same 1,104 pairs (staged):
``AX-b/diagnostic-full.tsv`` or, in a data directory laid out as ``<data>/superglue/AX-b``,
``<data>/glue/diagnostic/diagnostic-full.tsv``; neutral and contradiction become not_entailment.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from app.errors import ConfigurationError
from datamodules.tasks import glue
from datamodules.pretraining.corpus import read_jsonl
from datamodules.tasks.spec import Example, MissingTaskData, Reader, TaskSpec

BOOLEAN_LABELS = ("False", "True")
COPA_QUESTIONS = {"cause": "What was the cause?", "effect": "What happened as a result?"}
_HIGHLIGHT = re.compile(r"([.!?\"'])?\n@highlight\n")
_STANDARD_FILES = {"train": "train.jsonl", "dev": "val.jsonl", "test": "test.jsonl"}
Builder = Callable[[dict[str, Any], bool], list[Example]]


def class_id(value: Any, label_names: tuple[str, ...]) -> int:
    """The class id of a label written as a name (any case), a boolean or an integer id."""
    if isinstance(value, (bool, int)) and 0 <= value < len(label_names):
        return int(value)
    lowered = [name.lower() for name in label_names]
    if isinstance(value, str) and value.lower() in lowered:
        return lowered.index(value.lower())
    raise ValueError(f"label {value!r} is not one of {label_names}")


def read_split(build: Builder, files: dict[str, str], test_splits: tuple[str, ...],
               task_dir: Path, split: str) -> list[Example]:
    """Read one split's JSONL file with ``build(record, labelled)``.

    Raises:
        MissingTaskData: the split's file does not exist.
        ConfigurationError: an unknown split, or a malformed line (file and line number).
    """
    task_dir = Path(task_dir)
    if split not in files:
        raise ConfigurationError(f"{task_dir.name} has no split {split!r}; splits: {', '.join(files)}")
    path = task_dir / files[split]
    if not path.is_file():
        raise MissingTaskData(path)
    examples = []
    for line, record in read_jsonl(path):
        try:
            examples.extend(build(record, split not in test_splits))
        except KeyError as error:
            raise ConfigurationError(f"{path}, line {line}: missing field {error}; every {task_dir.name} record "
                                     "needs it: fix the line or re-download the task") from None
        except (TypeError, ValueError, IndexError, AttributeError) as error:
            raise ConfigurationError(f"{path}, line {line}: {error}; fix the line or re-download the task") from None
    return examples


def _pair(first: str, second: str, label_names: tuple[str, ...]) -> Builder:
    """A builder for a sentence-pair classification record with fields ``first`` and ``second``."""
    def build(record: dict[str, Any], labelled: bool) -> list[Example]:
        label = class_id(record["label"], label_names) if labelled else None
        return [Example(idx=record["idx"], segments=(record[first], record[second]), label=label)]
    return build


def _copa(record: dict[str, Any], labelled: bool) -> list[Example]:
    """Two candidates, each (premise + the question's wording, choice)."""
    if record["question"] not in COPA_QUESTIONS:
        raise ValueError(f"question {record['question']!r} is not 'cause' or 'effect'")
    prompt = f"{record['premise']} {COPA_QUESTIONS[record['question']]}"
    return [Example(idx=record["idx"], candidates=((prompt, record["choice1"]), (prompt, record["choice2"])),
                    label=class_id(record["label"], ("choice1", "choice2")) if labelled else None)]


def _multirc(record: dict[str, Any], labelled: bool) -> list[Example]:
    """One example per answer option: (paragraph, question + " " + answer)."""
    paragraph, passage = record["idx"], record["passage"]
    return [
        Example(idx={"paragraph": paragraph, "question": question["idx"], "answer": answer["idx"]},
                segments=(passage["text"], f"{question['question']} {answer['text']}"),
                label=class_id(answer["label"], BOOLEAN_LABELS) if labelled else None,
                group=(paragraph, question["idx"]))
        for question in passage["questions"] for answer in question["answers"]
    ]


def _record(record: dict[str, Any], labelled: bool) -> list[Example]:
    """One ranking example per query over the passage's unique entities."""
    raw = record["passage"]["text"]
    spans = record["passage"]["entities"]
    entities = tuple(dict.fromkeys(raw[entity["start"]:entity["end"] + 1] for entity in spans))
    return record_examples(raw, entities, record["qas"], labelled)


def record_examples(raw: str, entities: tuple[str, ...], queries: list[dict[str, Any]],
                    labelled: bool) -> list[Example]:
    """ReCoRD examples of a passage's ``queries`` (``idx``, ``query``, ``answers``) over its unique ``entities``."""
    passage = _HIGHLIGHT.sub(lambda match: (match.group(1) or ".") + " ", raw)
    examples = []
    for query in queries:
        if "@placeholder" not in query["query"]:
            raise ValueError(f"query {query['idx']!r} has no @placeholder")
        answers = tuple(dict.fromkeys(answer["text"] for answer in query["answers"])) if labelled else ()
        examples.append(Example(
            idx=query["idx"],
            candidates=tuple((passage, query["query"].replace("@placeholder", entity)) for entity in entities),
            label=next((i for i, entity in enumerate(entities) if entity in answers), None),
            group=query["idx"], answers=answers, candidate_texts=entities,
        ))
    return examples


def _mark(sentence: str, start: int, end: int) -> str:
    """The sentence with characters ``start:end`` wrapped in ``*``."""
    if not 0 <= start < end <= len(sentence):
        raise ValueError(f"offsets {start}:{end} outside a sentence of {len(sentence)} characters")
    return f"{sentence[:start]}*{sentence[start:end]}*{sentence[end:]}"


def _wic(record: dict[str, Any], labelled: bool) -> list[Example]:
    """(word + ": " + sentence1, sentence2), the word's occurrences marked."""
    first = _mark(record["sentence1"], record["start1"], record["end1"])
    second = _mark(record["sentence2"], record["start2"], record["end2"])
    return [Example(idx=record["idx"], segments=(f"{record['word']}: {first}", second),
                    label=class_id(record["label"], BOOLEAN_LABELS) if labelled else None)]


def _span(words: list[str], span: str, index: int) -> tuple[int, int]:
    """First and last word of ``span`` at ``index``, or at the nearest index whose words start with it."""
    if not 0 <= index < len(words):
        raise IndexError(f"span index {index} outside a text of {len(words)} words")
    width = max(len(span.split()), 1)

    def key(text: str) -> str:
        return "".join(char for char in text.lower() if char.isalnum())

    nearest = sorted(range(len(words)), key=lambda i: (abs(i - index), i))
    start = next((i for i in nearest if key(" ".join(words[i:i + width])).startswith(key(span))), index)
    return start, min(start + width, len(words)) - 1


def _wsc(record: dict[str, Any], labelled: bool) -> list[Example]:
    """(text with span1 as *...* and span2 as #...#, a question naming both spans)."""
    words, target = record["text"].split(), record["target"]
    for number, marker in (("1", "*"), ("2", "#")):
        start, end = _span(words, target[f"span{number}_text"], target[f"span{number}_index"])
        words[start] = marker + words[start]
        words[end] = words[end] + marker
    question = f"Does \"{target['span2_text']}\" refer to \"{target['span1_text']}\"?"
    return [Example(idx=record["idx"], segments=(" ".join(words), question),
                    label=class_id(record["label"], BOOLEAN_LABELS) if labelled else None)]


def _jsonl(build: Builder, diagnostic: str | None = None) -> Reader:
    """A reader of ``train/val/test.jsonl``, or of a diagnostic's one file (labelled dev, unlabelled test)."""
    files = {"dev": f"{diagnostic}.jsonl", "test": f"{diagnostic}.jsonl"} if diagnostic else _STANDARD_FILES
    return partial(read_split, build, files, ("test",))


_ENTAILMENT = glue.BINARY_NLI_LABELS
_AXB_BUILD = _pair("sentence1", "sentence2", _ENTAILMENT)
_AXB_JSONL = _jsonl(_AXB_BUILD, "AX-b")


def _read_axb(task_dir: Path, split: str) -> list[Example]:
    """AX-b from ``AX-b.jsonl``, else from GLUE's labelled diagnostic (three labels folded to two)."""
    task_dir = Path(task_dir)
    if (task_dir / "AX-b.jsonl").is_file() or split not in ("dev", "test"):
        return _AXB_JSONL(task_dir, split)
    for directory in (task_dir, task_dir.parent.parent / "glue" / "diagnostic"):
        if (directory / "diagnostic-full.tsv").is_file():
            full = glue.TASKS["ax"].reader(directory, "diagnostic-full")
            entailment = glue.NLI_LABELS.index("entailment")  # neutral, contradiction -> not_entailment
            return [Example(idx=example.idx, segments=example.segments,
                            label=None if split == "test" else int(example.label != entailment)) for example in full]
    raise MissingTaskData(task_dir / "AX-b.jsonl")


# Per task, its record builder, for readers of the same records from elsewhere (``datamodules.tasks.hub``).
BUILDERS: dict[str, Builder] = {}


# The SuperGLUE tasks by name, in registration order (diagnostics last).
TASKS: dict[str, TaskSpec] = {}


def _register(name: str, directory: str, kind: str, label_names: tuple[str, ...], metrics: tuple[str, ...],
              build: Builder, reader: Reader | None = None, hub_config: str | None = None,
              parent: str | None = None) -> None:
    """Add one SuperGLUE task (its submission file is ``<Directory>.jsonl``).

    ``reader`` defaults to the JSONL files read with ``build`` (a diagnostic's one ``<Directory>.jsonl``).
    """
    BUILDERS[name] = build
    TASKS[name] = TaskSpec(
        name=name, suite="superglue", kind=kind, label_names=label_names, metrics=metrics,
        directory=directory, reader=reader or _jsonl(build, directory if parent else None),
        submission_name=f"{directory}.jsonl", hub=("super_glue", hub_config or name), parent=parent,
    )


_CB_LABELS = ("entailment", "contradiction", "neutral")
_register("boolq", "BoolQ", "classification", BOOLEAN_LABELS, ("accuracy",),
          _pair("question", "passage", BOOLEAN_LABELS))
_register("cb", "CB", "classification", _CB_LABELS, ("accuracy", "f1"), _pair("premise", "hypothesis", _CB_LABELS))
_register("copa", "COPA", "multiple_choice", (), ("accuracy",), _copa)
_register("multirc", "MultiRC", "classification", BOOLEAN_LABELS, ("f1", "exact_match"), _multirc)
_register("record", "ReCoRD", "multiple_choice", (), ("f1", "exact_match"), _record)
_register("rte", "RTE", "classification", _ENTAILMENT, ("accuracy",), _pair("premise", "hypothesis", _ENTAILMENT))
_register("wic", "WiC", "classification", BOOLEAN_LABELS, ("accuracy",), _wic)
# NTNG fine-tunes on the hub's "wsc.fixed" config (span texts corrected); the JSONL files are the original.
_register("wsc", "WSC", "classification", BOOLEAN_LABELS, ("accuracy",), _wsc, hub_config="wsc.fixed")
_register("axb", "AX-b", "classification", _ENTAILMENT, ("matthews",), _AXB_BUILD, reader=_read_axb, parent="rte")
_register("axg", "AX-g", "classification", _ENTAILMENT, ("accuracy",), _pair("premise", "hypothesis", _ENTAILMENT),
          parent="rte")
