"""Super-Natural-Instructions (SNI): task JSON files as one generation task, ``sni``.

A task file (``tasks/<name>.json`` of https://github.com/allenai/natural-instructions) holds
``{"Definition": [str], "Positive Examples": [{"input", "output", "explanation"}], "Instances":
[{"id", "input", "output": [str, ...]}], ...}``. Every instance becomes one ``Example``: ``idx`` its
``id``, ``label`` its first output (the training target), ``answers`` all of its outputs (Rouge-L
takes the best), ``group`` the task's name (the file's stem). The prompt is nanoT5's / Tk-Instruct's
(``DataCollatorForNI`` with the task definition, 2 positive examples, no negative examples, no
explanations, no task name), kept in parts as ``segments = (definition, example 1, example 2, input)``
so that the text-to-text format can drop examples that do not fit (``datamodules.tasks.text_to_text``)::

    Definition: <Definition[0]>.\\n\\n
     Positive Example 1 -\\nInput: <input>.\\n Output: <output>.\\n\\n
     Positive Example 2 -\\nInput: <input>.\\n Output: <output>.\\n\\n
    Now complete the following example -\\nInput: <instance input>.\\nOutput:<space>

Texts are stripped, and the ``.`` is added only where a text does not already end in punctuation.

Splits (``--data-dir`` is read as one of two layouts):

* the natural-instructions repository (``tasks/`` and ``splits/default/{train,test}_tasks.txt``):
  SNI's own split, as NTNG/nanoT5 use it: ``train`` is the train tasks' instances, at most 100 per
  task, drawn by a shuffle seeded with the task's name (Tk-Instruct shuffles unseeded); ``dev`` is
  the test tasks' first 100 instances (SNI puts the curated, label-balanced evaluation instances
  first). Scores on ``dev`` are then on unseen tasks, NTNG's T5 downstream number.
* any other directory: every ``*.json`` task file in it (sorted by name), each split by instance:
  ``dev`` is its first ceil(n / 10) instances, at most 100, and ``train`` the rest, at most 100 drawn
  by the same seeded shuffle. Scores are then on held-out instances of seen tasks.
"""

from __future__ import annotations

import json
import math
import random
import string
from pathlib import Path
from typing import Any

from app.errors import ConfigurationError
from datamodules.tasks.spec import Example, MissingTaskData, TaskSpec

MAX_INSTANCES_PER_TASK = 100  # nanoT5's max_num_instances_per_task (train and test)
POSITIVE_EXAMPLES = 2
DEV_FRACTION = 0.1
_SPLIT_FILES = {"train": "train_tasks.txt", "dev": "test_tasks.txt"}


def _sentence(text: str) -> str:
    """``text`` with a ``.`` appended unless it ends in punctuation (Tk-Instruct's rule)."""
    return text if text and text[-1] in string.punctuation else text + "."


def prompt_parts(task: dict[str, Any], instance_input: str) -> tuple[str, ...]:
    """The prompt of one instance as ``(definition, *positive examples, input)`` (module docstring)."""
    definition = task["Definition"]
    definition = definition[0] if isinstance(definition, list) else definition
    parts = [_sentence("Definition: " + definition.strip()) + "\n\n"]
    for number, example in enumerate(task.get("Positive Examples", [])[:POSITIVE_EXAMPLES], start=1):
        shown = _sentence(f" Positive Example {number} -\nInput: {example['input'].strip()}") + "\n"
        parts.append(_sentence(shown + f" Output: {example['output'].strip()}") + "\n\n")
    parts.append(_sentence(f"Now complete the following example -\nInput: {instance_input.strip()}") + "\nOutput: ")
    return tuple(parts)


def read_task(path: Path) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    """A task file's name, its contents and its instances.

    Raises:
        ConfigurationError: the file is not JSON, lacks a field, or has an instance without outputs.
    """
    try:
        task = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigurationError(f"{path}: not a JSON task file ({err})") from None
    missing = [key for key in ("Definition", "Instances") if not isinstance(task, dict) or key not in task]
    if missing:
        raise ConfigurationError(f"{path}: missing field {missing[0]!r}")
    instances = task["Instances"]
    for instance in instances:
        if not instance.get("output") or "input" not in instance or "id" not in instance:
            raise ConfigurationError(f"{path}: instance {instance.get('id')!r} needs an id, an input and outputs")
    return path.stem, task, instances


def _examples(name: str, task: dict[str, Any], instances: list[dict[str, Any]]) -> list[Example]:
    examples = []
    for instance in instances:
        outputs = instance["output"]
        outputs = (outputs,) if isinstance(outputs, str) else tuple(outputs)
        examples.append(Example(idx=instance["id"], segments=prompt_parts(task, instance["input"]),
                                label=outputs[0], group=name, answers=outputs))
    return examples


def _train_sample(name: str, instances: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """At most ``MAX_INSTANCES_PER_TASK`` instances, shuffled with the task's name as seed."""
    shuffled = list(instances)
    random.Random(name).shuffle(shuffled)
    return shuffled[:MAX_INSTANCES_PER_TASK]


def _listed_tasks(directory: Path, split: str) -> list[Path]:
    names = (directory / "splits" / "default" / _SPLIT_FILES[split]).read_text(encoding="utf-8").split()
    return [directory / "tasks" / f"{name}.json" for name in names]


def read_split(directory: Path, split: str) -> list[Example]:
    """The ``train`` or ``dev`` examples of the SNI data in ``directory`` (layouts in the module docstring).

    Raises:
        MissingTaskData: ``directory`` has no task files (or a listed task file is absent).
        ConfigurationError: an unknown split, or a malformed task file.
    """
    directory = Path(directory)
    if split not in _SPLIT_FILES:
        raise ConfigurationError(f"sni has no split {split!r}; splits: {', '.join(_SPLIT_FILES)}")
    official = all((directory / "splits" / "default" / f).is_file() for f in _SPLIT_FILES.values())
    paths = _listed_tasks(directory, split) if official else sorted(directory.glob("*.json"))
    if not paths:
        raise MissingTaskData(f"{directory} (no *.json task files)")
    examples = []
    for path in paths:
        if not path.is_file():
            raise MissingTaskData(path)
        name, task, instances = read_task(path)
        if official:
            chosen = _train_sample(name, instances) if split == "train" else instances[:MAX_INSTANCES_PER_TASK]
        else:
            dev_size = min(MAX_INSTANCES_PER_TASK, math.ceil(DEV_FRACTION * len(instances)))
            chosen = instances[:dev_size] if split == "dev" else _train_sample(name, instances[dev_size:])
        examples.extend(_examples(name, task, chosen))
    return examples


TASKS: dict[str, TaskSpec] = {
    "sni": TaskSpec(name="sni", suite="sni", kind="generation", label_names=(), metrics=("rouge_l", "exact_match"),
                    directory="", reader=read_split, test_splits=()),
}
