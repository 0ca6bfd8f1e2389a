"""Downstream tasks: what an example is and what a task is (the known tasks are in ``registry``).

Readers turn a task's files (GLUE TSVs as written by the classic download script, SuperGLUE JSONL)
into ``Example``s whose text *segments* already contain every field of the task: a model sees at
most two segments per input (``tokenizer(a, b)``), so a task with three or four fields (WiC, MultiRC,
COPA, WSC) must combine them into those segments itself. NTNG's code passed extra fields to the
tokenizer where they became ``text_target`` and were silently dropped; that cannot happen here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal


TaskKind = Literal["classification", "regression", "multiple_choice", "generation"]

# The prediction of a text-to-text model whose output is none of the task's label words: the
# scorer counts it wrong whatever the label (``app.evaluation.metrics.score``).
NO_LABEL = -1


class MissingTaskData(Exception):
    """A split's file is absent; the suite skips the task and says so in its report."""


@dataclass(frozen=True)
class Example:
    """One labelled (or test) example.

    Attributes:
        idx: the task's own index (an int, or MultiRC's ``{"paragraph", "question", "answer"}``),
            written back in predictions and submission files.
        segments: one or two text segments (classification and regression).
        candidates: per candidate, one or two segments (multiple choice and ranking: COPA, ReCoRD).
        label: class id (index into ``TaskSpec.label_names``), a float (regression), the index of the
            correct candidate, the training target text (generation: SNI), or None for unlabelled
            test data (and for the rare ReCoRD query whose gold answer is none of the passage's
            entities: training skips those).
        group: key grouping examples for grouped metrics (MultiRC question, ReCoRD query).
        answers: gold answer strings (ReCoRD: F1/EM against the chosen candidate's text; generation:
            every reference output, scored by the best match).
        candidate_texts: the string each candidate stands for (ReCoRD entities).
    """

    idx: Any
    segments: tuple[str, ...] = ()
    candidates: tuple[tuple[str, ...], ...] = ()
    label: int | float | str | None = None
    group: Any = None
    answers: tuple[str, ...] = ()
    candidate_texts: tuple[str, ...] = ()


Reader = Callable[[Path, str], list[Example]]


@dataclass(frozen=True)
class TaskSpec:
    """How to read, train and score one task.

    Attributes:
        name: lower-case name within its suite (``"rte"``, ``"mnli"``, ``"sst2"``, ``"boolq"``,
            ``"axb"``); the registry key is ``(suite, name)`` since both suites have RTE.
        suite: ``"glue"``, ``"superglue"`` or ``"sni"`` (Super-Natural-Instructions).
        kind: ``classification``, ``regression``, ``multiple_choice`` (ranking included) or
            ``generation`` (free text scored against reference outputs; text-to-text models only).
        label_names: names of the class ids (GLUE/SuperGLUE label strings); empty for regression
            and multiple choice.
        metrics: metric names reported for the task, the first being its headline metric.
        directory: the task's directory under the suite's data directory (``"RTE"``, ``"SST-2"``).
        reader: ``reader(task_dir, split) -> examples``; raises ``MissingTaskData`` when the split's
            file is absent and ``ConfigurationError`` (with file and line) for a malformed row.
        dev_splits: evaluation splits (MNLI: matched and mismatched).
        test_splits: unlabelled splits written as submission files.
        submission_name: file name of the submission for the leaderboard.
        hub: ``(dataset, config)`` on the Hugging Face hub, for users who are online.
        parent: for diagnostic sets (AX, AX-b, AX-g): the task whose fine-tuned model predicts them;
            they are never trained on.
    """

    name: str
    suite: Literal["glue", "superglue", "sni"]
    kind: TaskKind
    label_names: tuple[str, ...]
    metrics: tuple[str, ...]
    directory: str
    reader: Reader
    dev_splits: tuple[str, ...] = ("dev",)
    test_splits: tuple[str, ...] = ("test",)
    submission_name: str = ""
    hub: tuple[str, str] | None = None
    parent: str | None = None


# Report keys of multi-split evaluations (NTNG reports MNLI matched and mismatched separately).
_SPLIT_SUFFIX = {"dev_matched": "m", "dev_mismatched": "mm"}


def report_name(spec: TaskSpec, split: str) -> str:
    """The key a task's evaluation on ``split`` is reported under (``mnli-m``, ``mnli-mm``, ``rte``)."""
    if len(spec.dev_splits) == 1 and split in spec.dev_splits:
        return spec.name
    return f"{spec.name}-{_SPLIT_SUFFIX.get(split, split)}"
