"""GLUE task readers: the TSV files written by the classic ``download_glue_data.py``.

Every task's ``<data>/<Directory>/<split>.tsv`` is read with ``csv`` (tab delimiter,
``quoting=csv.QUOTE_NONE``: GLUE text contains ``"`` characters that are not CSV quoting, e.g. MRPC's
``" The foodservice pie ...`` and QNLI's ``"quiescent"``), ``encoding="utf-8-sig"`` (MRPC train/dev
begin with a BOM) and ``newline=""`` (``diagnostic-full.tsv`` has CRLF endings). Files with and
without a trailing newline read alike; fully blank lines are skipped. Every row must have as many
columns as the header (or CoLA's four): anything else is a ``ConfigurationError`` naming file and
line. (The 2018 QQP release had such rows; the current "QQP-clean" one, like every staged file, has
none.) Split names are file stems: ``train``, ``dev``, ``test``; MNLI ``dev_matched``,
``dev_mismatched``, ``test_matched``, ``test_mismatched``; AX ``diagnostic-full`` (labelled) and
``diagnostic`` (the unlabelled test set).

Columns are found by header name, so column order and extra metadata columns do not matter:

* CoLA: train/dev have **no header** (source, label, author mark, sentence); test has
  ``index, sentence``. Segments: (sentence,). The source code and the author's original mark
  (``*``, ``?*``, ``??`` on the unacceptable rows: it gives the label away) are never shown.
* SST-2: (sentence,); the trailing spaces of its sentences are kept. Test: ``index, sentence``.
* MRPC: (#1 String, #2 String), label ``Quality``; the sentence ids are metadata. Test adds ``index``.
* STS-B: ten columns (index, genre, filename, year, old_index, source1, source2, sentence1,
  sentence2, score); segments (sentence1, sentence2), the float ``score`` is the label.
* QQP: (question1, question2), label ``is_duplicate``, idx from ``id``; qid1/qid2 are metadata.
* MNLI: (sentence1, sentence2), label ``gold_label``; the parses repeat the sentences, genre and the
  annotators' label1..label5 are metadata.
* QNLI (question, sentence), RTE and WNLI (sentence1, sentence2), label ``label``.
* AX: ``diagnostic-full.tsv`` (Lexical Semantics, ..., Domain, Premise, Hypothesis, Label) gives
  (Premise, Hypothesis) with MNLI's labels; the category columns are analysis metadata.
  ``diagnostic.tsv`` is (index, sentence1, sentence2): the same pairs in the same order (two
  hypotheses differ by a trailing space). AX is never trained on, so it has no ``train`` split.

``idx`` is the file's index column (``index``, QQP's ``id``) when present, else the 0-based row
number (CoLA train/dev, SST-2 train/dev, MRPC train/dev, diagnostic-full). Test splits are
unlabelled (``label=None``). Label names are the label strings as they appear in the files, in
the order of the Hugging Face ``glue`` class labels (so hub label ids mean the same).
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from app.errors import ConfigurationError
from datamodules.pretraining.corpus import not_utf8_text
from datamodules.tasks.spec import Example, MissingTaskData, TaskSpec

NLI_LABELS = ("entailment", "neutral", "contradiction")
BINARY_NLI_LABELS = ("entailment", "not_entailment")
_COLA_COLUMNS = ("source", "label", "author_mark", "sentence")


@dataclass(frozen=True)
class Layout:
    """Where a task's fields are: per segment (and for the label) the header names it may have."""

    text: tuple[tuple[str, ...], ...]
    label: tuple[str, ...] = ("label",)
    index: str = "index"
    headerless: tuple[str, ...] = ()
    columns: tuple[str, ...] = ()


def read_tsv(path: Path) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(line number, fields)`` for each non-blank line of a GLUE TSV file."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
            for fields in reader:
                if len(fields) > 1 or (fields and fields[0].strip()):
                    yield reader.line_num, fields
    except UnicodeDecodeError:
        raise not_utf8_text(path) from None


def _column(header: list[str], names: tuple[str, ...], path: Path) -> int:
    """Index of the first of ``names`` in the header, or a ConfigurationError."""
    for name in names:
        if name in header:
            return header.index(name)
    raise ConfigurationError(f"{path}: no column {' or '.join(map(repr, names))} in header {header}")


def _label(value: str, label_names: tuple[str, ...]) -> int | float:
    """A class id (index into ``label_names``), or a float score when there are no label names."""
    if not label_names:
        return float(value)
    if value not in label_names:
        raise ValueError(f"label {value!r} is not one of {label_names}")
    return label_names.index(value)


def read_split(layout: Layout, label_names: tuple[str, ...], splits: tuple[str, ...],
               test_splits: tuple[str, ...], task_dir: Path, split: str) -> list[Example]:
    """Read ``<task_dir>/<split>.tsv`` into examples (``label=None`` for test splits).

    Raises:
        MissingTaskData: the split's file does not exist.
        ConfigurationError: an unknown split, a missing column, or a malformed row (file and line).
    """
    task_dir = Path(task_dir)
    if split not in splits:
        raise ConfigurationError(f"{task_dir.name} has no split {split!r}; splits: {', '.join(splits)}")
    path = task_dir / f"{split}.tsv"
    if not path.is_file():
        raise MissingTaskData(path)
    rows = read_tsv(path)
    if split in layout.headerless:
        header = list(layout.columns)
    else:
        header = next(rows, (0, None))[1]
        if header is None:
            raise ConfigurationError(f"{path}: empty file (expected a header line)")
    text = [_column(header, names, path) for names in layout.text]
    label = None if split in test_splits else _column(header, layout.label, path)
    index = header.index(layout.index) if layout.index in header else None
    examples = []
    for row, (line, fields) in enumerate(rows):
        if len(fields) != len(header):
            raise ConfigurationError(
                f"{path}, line {line}: expected {len(header)} tab-separated columns ({', '.join(header)}), found "
                f"{len(fields)}; fix the row (a tab inside a text field splits it) or re-download the task")
        try:
            examples.append(Example(
                idx=row if index is None else int(fields[index]),
                segments=tuple(fields[column] for column in text),
                label=None if label is None else _label(fields[label], label_names),
            ))
        except ValueError as error:
            raise ConfigurationError(f"{path}, line {line}: {error}") from None
    return examples


# The GLUE tasks by name, in registration order (diagnostics last).
TASKS: dict[str, TaskSpec] = {}


def _register(name: str, directory: str, label_names: tuple[str, ...], metrics: tuple[str, ...],
              layout: Layout, submission: str, dev_splits: tuple[str, ...] = ("dev",),
              test_splits: tuple[str, ...] = ("test",), parent: str | None = None) -> None:
    """Add one GLUE task (regression when it has no label names; no train split for diagnostics)."""
    splits = (*(() if parent else ("train",)), *dev_splits, *test_splits)
    TASKS[name] = TaskSpec(
        name=name, suite="glue", kind="classification" if label_names else "regression",
        label_names=label_names, metrics=metrics, directory=directory,
        reader=partial(read_split, layout, label_names, splits, test_splits),
        dev_splits=dev_splits, test_splits=test_splits, submission_name=submission,
        hub=("glue", name), parent=parent,
    )


_PAIR = Layout(text=(("sentence1",), ("sentence2",)))
_register("cola", "CoLA", ("0", "1"), ("matthews",),
          Layout(text=(("sentence",),), headerless=("train", "dev"), columns=_COLA_COLUMNS), "CoLA.tsv")
_register("sst2", "SST-2", ("0", "1"), ("accuracy",), Layout(text=(("sentence",),)), "SST-2.tsv")
_register("mrpc", "MRPC", ("0", "1"), ("f1", "accuracy"),
          Layout(text=(("#1 String",), ("#2 String",)), label=("Quality",)), "MRPC.tsv")
_register("stsb", "STS-B", (), ("pearson", "spearman"), Layout(_PAIR.text, label=("score",)), "STS-B.tsv")
_register("qqp", "QQP", ("0", "1"), ("f1", "accuracy"),
          Layout(text=(("question1",), ("question2",)), label=("is_duplicate",), index="id"), "QQP.tsv")
# One submission name for two test splits: the runner writes MNLI-m.tsv and MNLI-mm.tsv from it.
_register("mnli", "MNLI", NLI_LABELS, ("accuracy",), Layout(_PAIR.text, label=("gold_label",)), "MNLI.tsv",
          dev_splits=("dev_matched", "dev_mismatched"), test_splits=("test_matched", "test_mismatched"))
_register("qnli", "QNLI", BINARY_NLI_LABELS, ("accuracy",),
          Layout(text=(("question",), ("sentence",))), "QNLI.tsv")
_register("rte", "RTE", BINARY_NLI_LABELS, ("accuracy",), _PAIR, "RTE.tsv")
_register("wnli", "WNLI", ("0", "1"), ("accuracy",), _PAIR, "WNLI.tsv")
_register("ax", "diagnostic", NLI_LABELS, ("matthews",),
          Layout(text=(("sentence1", "Premise"), ("sentence2", "Hypothesis")), label=("Label",)), "AX.tsv",
          dev_splits=("diagnostic-full",), test_splits=("diagnostic",), parent="mnli")
