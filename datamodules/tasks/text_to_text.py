"""The ``text_to_text`` input format: tasks as T5 sees them, input string -> target string.

Inputs follow T5's GLUE/SuperGLUE preprocessing (``t5.data.preprocessors.glue``): the task's name,
then ``<field>: <text>`` for each field, fields in alphabetical order as T5 sorts them::

    rte sentence1: <sentence1> sentence2: <sentence2>                  (GLUE RTE; also MRPC, STS-B, WNLI)
    mnli hypothesis: <hypothesis> premise: <premise>                   (GLUE MNLI and AX)
    cb hypothesis: <hypothesis> premise: <premise>                     (SuperGLUE CB; RTE, AX-b, AX-g as "rte")
    copa choice1: <choice1> choice2: <choice2> premise: <premise> question: cause
    wic sentence1: <sentence1> sentence2: <sentence2> word: <word>     (T5's own field order)
    multirc question: <question> <answer> paragraph: <paragraph>       (T5's order: question first)
    wsc text: <text with span1 as *...* and span2 as #...#>            (T5's ``wsc`` preprocessor)

Field names are those of the original files for the segments the readers build (``superglue``,
``glue``): CoLA/SST-2 ``sentence``, QQP ``question1``/``question2``, QNLI ``question``/``sentence``,
BoolQ ``passage``/``question``. Where a reader has merged fields they are taken apart again (COPA's
question type from the premise's appended wording, WiC's word from ``"<word>: "``) except MultiRC's
question and answer, which stay one field; MultiRC's paragraph loses its ``<br>`` (a space) and
``<b>``/``</b>`` markup, as in T5.
Diagnostics (AX, AX-b, AX-g) are written as their parent task (name and fields), because the
parent's model predicts them. WiC and WSC keep the readers' ``*...*``/``#...#`` marks.

Targets are label words: the task's ``label_names`` (``entailment``/``not_entailment``,
``False``/``True``), except where GLUE's files label with digits, which get T5's (tfds') class names
(``LABEL_WORDS``: CoLA ``unacceptable``/``acceptable``, SST-2 ``negative``/``positive``, ...); COPA's
are ``choice1``/``choice2``; STS-B's is the score rounded to the nearest 0.2 written with one
decimal (``"3.8"``), as T5 does. A generated string maps back by exact match (surrounding
whitespace stripped) to a label word, else to ``NO_LABEL``, which the scorer counts wrong; STS-B
parses a float, and a generation that is no finite number counts as 0.0. ReCoRD (a free entity
from a long passage) has no text-to-text form here (``UNSUPPORTED``).

Generation tasks (SNI, ``datamodules.tasks.sni``) keep their prompt in parts, ``segments =
(instruction, *demonstrations, input)``: demonstrations are dropped from the end until the prompt
fits ``max_length`` tokens (Tk-Instruct), and a prompt still too long is truncated at its end. Their
target is the example's ``label`` (its first reference), truncated to ``MAX_TARGET_LENGTH`` tokens.

Every input and target ends with the tokenizer's EOS token (``</s>``); batches pad inputs with the
pad id (attention mask 0) and targets with -100 (ignored by the loss). An input longer than
``max_length`` loses its end, as in T5 (whose fine-tuning inputs had 512 tokens, ``ntng finetune``'s
default for T5): with BoolQ's long passages written before the question, a short limit cuts the question.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import torch

from app.errors import ConfigurationError
from datamodules.tasks.spec import NO_LABEL, Example, TaskSpec
from datamodules.tasks.superglue import COPA_QUESTIONS

Feature = dict[str, Any]
# Tk-Instruct / nanoT5's longest SNI target (and generation) in tokens.
MAX_TARGET_LENGTH = 128
# T5's preprocessing of a field: (name, index of the Example segment holding it), in T5's order.
_FIELDS: dict[tuple[str, str], tuple[tuple[str, int], ...]] = {
    ("glue", "cola"): (("sentence", 0),),
    ("glue", "sst2"): (("sentence", 0),),
    ("glue", "mrpc"): (("sentence1", 0), ("sentence2", 1)),
    ("glue", "stsb"): (("sentence1", 0), ("sentence2", 1)),
    ("glue", "qqp"): (("question1", 0), ("question2", 1)),
    ("glue", "mnli"): (("hypothesis", 1), ("premise", 0)),
    ("glue", "qnli"): (("question", 0), ("sentence", 1)),
    ("glue", "rte"): (("sentence1", 0), ("sentence2", 1)),
    ("glue", "wnli"): (("sentence1", 0), ("sentence2", 1)),
    ("superglue", "boolq"): (("passage", 1), ("question", 0)),
    ("superglue", "cb"): (("hypothesis", 1), ("premise", 0)),
    ("superglue", "multirc"): (("question", 1), ("paragraph", 0)),
    ("superglue", "rte"): (("hypothesis", 1), ("premise", 0)),
    ("superglue", "wsc"): (("text", 0),),
}
LABEL_WORDS: dict[tuple[str, str], tuple[str, ...]] = {
    ("glue", "cola"): ("unacceptable", "acceptable"),
    ("glue", "sst2"): ("negative", "positive"),
    ("glue", "mrpc"): ("not_equivalent", "equivalent"),
    ("glue", "qqp"): ("not_duplicate", "duplicate"),
    ("glue", "wnli"): ("not_entailment", "entailment"),
    ("superglue", "copa"): ("choice1", "choice2"),
}
UNSUPPORTED = {
    ("superglue", "record"): "ReCoRD has no text-to-text format in ntng (T5 generates the answer entity "
                             "from the whole passage; scoring a free string against the candidates is not written)",
}
_LINE_BREAK, _BOLD = re.compile(r"<br>"), re.compile(r"</?b>")
_COPA_QUESTION_TYPES = {f" {wording}": kind for kind, wording in COPA_QUESTIONS.items()}


def _prefix(spec: TaskSpec) -> tuple[str, str]:
    """``(suite, task)`` whose format ``spec`` is written in (a diagnostic's parent)."""
    return spec.suite, spec.parent or spec.name


def _fields(spec: TaskSpec, example: Example) -> list[tuple[str, str]]:
    """``(field name, text)`` pairs of ``example`` in T5's order."""
    key = _prefix(spec)
    if key == ("superglue", "copa"):
        prompt, choice1 = example.candidates[0]
        suffix = next((s for s in _COPA_QUESTION_TYPES if prompt.endswith(s)), None)
        if suffix is None:
            raise ConfigurationError(f"COPA example {example.idx!r}: no question wording in {prompt!r}")
        return [("choice1", choice1), ("choice2", example.candidates[1][1]),
                ("premise", prompt[: -len(suffix)]), ("question", _COPA_QUESTION_TYPES[suffix])]
    if key == ("superglue", "wic"):
        word, sentence1 = example.segments[0].split(": ", 1)
        return [("sentence1", sentence1), ("sentence2", example.segments[1]), ("word", word)]
    if key not in _FIELDS:
        raise ConfigurationError(f"{spec.suite} {spec.name} has no text-to-text format")
    fields = [(name, example.segments[index]) for name, index in _FIELDS[key]]
    if key == ("superglue", "multirc"):
        question, paragraph = fields
        fields = [question, ("paragraph", _BOLD.sub("", _LINE_BREAK.sub(" ", paragraph[1])))]
    return fields


def format_input(spec: TaskSpec, example: Example) -> str:
    """The input string of ``example`` (module docstring); a generation prompt joined whole."""
    if spec.kind == "generation":
        return "".join(example.segments)
    fields = " ".join(f"{name}: {text}" for name, text in _fields(spec, example))
    return f"{_prefix(spec)[1]} {fields}"


def stsb_target(score: float) -> str:
    """T5's STS-B target: the score rounded to the nearest 0.2, one decimal (``3.77`` -> ``"3.8"``)."""
    return f"{round(float(score) * 5) / 5:.1f}"


def target_words(spec: TaskSpec) -> tuple[str, ...]:
    """Every target string of a closed-vocabulary task (STS-B: ``"0.0"``, ``"0.2"``, ..., ``"5.0"``).

    Returns:
        The words in class-id (candidate) order; empty for generation tasks.
    """
    if spec.kind == "generation":
        return ()
    if spec.kind == "regression":
        return tuple(stsb_target(step / 5) for step in range(26))
    return LABEL_WORDS.get(_prefix(spec), spec.label_names)


def target_text(spec: TaskSpec, example: Example) -> str | None:
    """The target string of a labelled example; None when unlabelled."""
    if example.label is None:
        return None
    if spec.kind == "generation":
        return str(example.label)
    if spec.kind == "regression":
        return stsb_target(example.label)
    return target_words(spec)[int(example.label)]


def parse_prediction(spec: TaskSpec, text: str) -> int | float | str:
    """A generated string as the prediction ``score`` takes (module docstring).

    Returns:
        The class id / candidate index of the matching label word, else ``NO_LABEL``; a float for
        STS-B (0.0 for anything but a finite number); the stripped text for generation tasks.
    """
    text = text.strip()
    if spec.kind == "generation":
        return text
    if spec.kind == "regression":
        try:
            value = float(text)
        except ValueError:
            return 0.0
        return value if math.isfinite(value) else 0.0
    words = target_words(spec)
    return words.index(text) if text in words else NO_LABEL


def generation_length(spec: TaskSpec, tokenizer) -> int:
    """Tokens to generate: the longest label word's encoding (EOS included), SNI's 128 for generation."""
    if spec.kind == "generation":
        return MAX_TARGET_LENGTH
    return max(len(ids) for ids in _encode(tokenizer, list(target_words(spec)), MAX_TARGET_LENGTH))


def _encode(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids of ``texts`` (truncated to ``max_length``), each ending with EOS.

    A target without EOS would never teach the model to stop after the label word, so it is
    appended where the tokenizer's own template does not add it.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigurationError("text-to-text fine-tuning needs a tokenizer with an EOS token")
    encoded = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"] if texts else []
    return [ids if ids and ids[-1] == eos else ids[: max_length - 1] + [eos] for ids in encoded]


def fit_prompt(tokenizer, segments: Sequence[str], max_length: int) -> str:
    """A generation prompt from ``(instruction, *demonstrations, input)`` that fits ``max_length``
    tokens by keeping only the first demonstrations that fit (all of them if the prompt fits)."""
    instruction, *demonstrations, task_input = segments
    kept: list[str] = []
    for demonstration in demonstrations:
        candidate = instruction + "".join(kept) + demonstration + task_input
        if len(tokenizer(candidate)["input_ids"]) > max_length:
            break
        kept.append(demonstration)
    return instruction + "".join(kept) + task_input


def _prompts(spec: TaskSpec, tokenizer, examples: Sequence[Example], max_length: int) -> list[str]:
    texts = [format_input(spec, example) for example in examples]
    if spec.kind != "generation" or not texts:
        return texts
    # Most prompts fit whole: one batched call finds the few that need demonstrations dropped.
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    return [text if length <= max_length else fit_prompt(tokenizer, example.segments, max_length)
            for text, length, example in zip(texts, lengths, examples)]


def encode_text_to_text(spec: TaskSpec, tokenizer, examples: Sequence[Example], max_length: int) -> list[Feature]:
    """Features of ``examples``: ``input_ids`` (at most ``max_length``), target ``labels`` when
    labelled, and ``index`` (position in ``examples``).

    Raises:
        ConfigurationError: for a task without a text-to-text format (``UNSUPPORTED``).
    """
    if _prefix(spec) in UNSUPPORTED:
        raise ConfigurationError(UNSUPPORTED[_prefix(spec)])
    inputs = _encode(tokenizer, _prompts(spec, tokenizer, examples, max_length), max_length)
    targets = [target_text(spec, example) for example in examples]
    labelled = [i for i, target in enumerate(targets) if target is not None]
    encoded = dict(zip(labelled, _encode(tokenizer, [targets[i] for i in labelled], MAX_TARGET_LENGTH)))
    features = []
    for index, ids in enumerate(inputs):
        feature: Feature = {"input_ids": ids, "index": index}
        if index in encoded:
            feature["labels"] = encoded[index]
        features.append(feature)
    return features


class TextToTextCollator:
    """Pads inputs with the pad id (attention mask 0 there) and targets with -100.

    Args:
        pad_token_id: the tokenizer's padding id.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    @staticmethod
    def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
        out = torch.full((len(rows), max(len(row) for row in rows)), value, dtype=torch.long)
        for i, row in enumerate(rows):
            out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return out

    def __call__(self, features: list[Feature]) -> dict[str, torch.Tensor]:
        inputs = [f["input_ids"] for f in features]
        batch = {
            "input_ids": self._pad(inputs, self.pad_token_id),
            "attention_mask": self._pad([[1] * len(ids) for ids in inputs], 0),
            "index": torch.tensor([f["index"] for f in features]),
        }
        if all("labels" in f for f in features):
            batch["labels"] = self._pad([f["labels"] for f in features], -100)
        return batch
