"""GLUE/SuperGLUE examples from the Hugging Face hub (``ntng finetune --data-dir hub``).

Each task's ``TaskSpec.hub`` names its dataset and config; ``datasets.load_dataset`` fetches a split
and each row becomes the same ``Example`` the local readers make of the original files:

* Splits (``HUB_SPLITS``): ``train`` -> ``train``, ``dev`` -> ``validation`` (MNLI ``dev_matched`` ->
  ``validation_matched``, ...), test splits keep their names. Diagnostics (GLUE AX, SuperGLUE AX-b and
  AX-g) have one hub split, ``test``, read for both their dev and test splits; GLUE AX's is unlabelled
  there (its predictions are written but not scored), AX-b/AX-g's is labelled.
* Labels are class ids in the hub's order, which the readers' ``label_names`` follow; ``-1`` (test
  rows) is no label.
* GLUE rows carry the segments in the columns of ``GLUE_COLUMNS`` and ``idx``.
* SuperGLUE rows go through the readers' record builders (``superglue.BUILDERS``): BoolQ, CB, COPA,
  RTE, WiC, AX-b and AX-g rows are the JSONL records; WSC's flat span fields are put back under
  ``target``; MultiRC's per-answer rows are grouped back into paragraphs and questions; ReCoRD's
  per-query rows give the passage, the query and its answers, with the candidates the unique entity
  texts in order of first mention (``entity_spans``; ``entities`` where a row has no spans).

A hub that cannot be reached (or ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` set) is ``MissingTaskData``,
so the task is skipped with that reason.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from app.errors import ConfigurationError
from datamodules.tasks import superglue
from datamodules.tasks.spec import Example, MissingTaskData, TaskSpec

HUB = "hub"  # the --data-dir value that reads from the hub
HUB_SPLITS = {
    "train": "train",
    "dev": "validation",
    "dev_matched": "validation_matched",
    "dev_mismatched": "validation_mismatched",
    "test": "test",
    "test_matched": "test_matched",
    "test_mismatched": "test_mismatched",
    # Diagnostics: their one hub split, labelled (dev) or not (submission).
    "diagnostic-full": "test",
    "diagnostic": "test",
}
GLUE_COLUMNS = {
    "cola": ("sentence",),
    "sst2": ("sentence",),
    "mrpc": ("sentence1", "sentence2"),
    "stsb": ("sentence1", "sentence2"),
    "qqp": ("question1", "question2"),
    "mnli": ("premise", "hypothesis"),
    "qnli": ("question", "sentence"),
    "rte": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
    "ax": ("premise", "hypothesis"),
}
_OFFLINE = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def hub_split(spec: TaskSpec, split: str) -> str:
    """The hub split holding ``split`` of ``spec`` (a diagnostic's is always ``test``)."""
    splits = (*(() if spec.parent else ("train",)), *spec.dev_splits, *spec.test_splits)
    if split not in splits or split not in HUB_SPLITS:
        raise ConfigurationError(f"{spec.suite} {spec.name} has no split {split!r}; splits: {', '.join(splits)}")
    return "test" if spec.parent else HUB_SPLITS[split]


def load_rows(spec: TaskSpec, split: str) -> Iterable[dict[str, Any]]:
    """The hub rows of ``split``.

    Raises:
        MissingTaskData: the task has no hub dataset, the hub is switched off, or it could not be reached.
    """
    if spec.hub is None:
        raise MissingTaskData(f"{spec.suite} {spec.name} has no hub dataset")
    name, source = "/".join(spec.hub), hub_split(spec, split)
    where = f"{split} data: hub dataset {name} split {source}"
    offline = [var for var in _OFFLINE if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE")]
    if offline:
        raise MissingTaskData(f"{where} could not be reached: {offline[0]} is set")
    import datasets  # only here: loading it takes a second that local runs need not spend

    try:
        return datasets.load_dataset(spec.hub[0], spec.hub[1], split=source)
    except Exception as error:  # noqa: BLE001  (offline, unknown repo, HTTP: each a reason to skip the task)
        reason = (str(error).strip().splitlines() or [""])[0]
        raise MissingTaskData(f"{where} could not be reached: {type(error).__name__}: {reason}") from None


def _label(value: Any, spec: TaskSpec) -> int | float | None:
    """A hub class id (or STS-B's float score); -1 and None are no label."""
    if value is None or value == -1:
        return None
    if not spec.label_names:
        return float(value)
    if not (isinstance(value, int) and 0 <= value < len(spec.label_names)):
        raise ValueError(f"label {value!r} is not a class id of {spec.label_names}")
    return value


def _glue(spec: TaskSpec, rows: Iterable[dict[str, Any]], labelled: bool) -> list[Example]:
    columns = GLUE_COLUMNS[spec.name]
    return [Example(idx=row["idx"], segments=tuple(row[column] for column in columns),
                    label=_label(row["label"], spec) if labelled else None) for row in rows]


def _wsc_record(row: dict[str, Any]) -> dict[str, Any]:
    """The hub's flat span fields put back under ``target``, as in the JSONL."""
    fields = ("span1_index", "span2_index", "span1_text", "span2_text")
    return {**row, "target": {field: row[field] for field in fields}}


def _multirc_records(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-answer hub rows grouped back into JSONL records: paragraph -> questions -> answers."""
    paragraphs: dict[Any, dict[Any, dict[str, Any]]] = {}
    texts: dict[Any, str] = {}
    for row in rows:
        idx = row["idx"]
        texts.setdefault(idx["paragraph"], row["paragraph"])
        questions = paragraphs.setdefault(idx["paragraph"], {})
        question = questions.setdefault(idx["question"], {"idx": idx["question"], "question": row["question"],
                                                          "answers": []})
        question["answers"].append({"idx": idx["answer"], "text": row["answer"], "label": row["label"]})
    return [{"idx": paragraph, "passage": {"text": texts[paragraph], "questions": list(questions.values())}}
            for paragraph, questions in paragraphs.items()]


def _record_entities(row: dict[str, Any]) -> tuple[str, ...]:
    """The unique entity texts in order of first mention (``entity_spans``), else as ``entities`` lists them."""
    spans = row.get("entity_spans")
    if isinstance(spans, dict):  # a Sequence of dicts reads as a dict of lists
        spans = [dict(zip(spans, values)) for values in zip(*spans.values())]
    if spans:
        return tuple(dict.fromkeys(span["text"] for span in sorted(spans, key=lambda span: span["start"])))
    return tuple(dict.fromkeys(row["entities"]))


def _record(row: dict[str, Any], labelled: bool) -> list[Example]:
    query = {"idx": row["idx"]["query"], "query": row["query"], "answers": [{"text": a} for a in row["answers"]]}
    return superglue.record_examples(row["passage"], _record_entities(row), [query], labelled)


def hub_examples(spec: TaskSpec, split: str) -> list[Example]:
    """The examples of ``split`` of ``spec`` read from the hub (``label=None`` on test splits).

    Raises:
        MissingTaskData: the hub could not be reached (or is switched off).
        ConfigurationError: an unknown split, or a row the task's builder cannot read.
    """
    rows = load_rows(spec, split)
    labelled = split not in spec.test_splits
    if spec.suite == "glue":
        try:
            return _glue(spec, rows, labelled)
        except (KeyError, TypeError, ValueError) as error:
            raise ConfigurationError(f"hub dataset {'/'.join(spec.hub)} {split}: {error!r}") from None
    if spec.name == "multirc":
        records, build = _multirc_records(rows), superglue.BUILDERS["multirc"]
    elif spec.name == "record":
        records, build = rows, _record
    elif spec.name == "wsc":
        records, build = map(_wsc_record, rows), superglue.BUILDERS["wsc"]
    else:
        records, build = rows, superglue.BUILDERS[spec.name]
    examples = []
    for number, record in enumerate(records):
        try:
            examples.extend(build(record, labelled))
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as error:
            raise ConfigurationError(f"hub dataset {'/'.join(spec.hub)} {split}, record {number}: {error!r}") from None
    return examples
