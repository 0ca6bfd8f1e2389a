"""Super-Natural-Instructions: the task-file reader and its prompt, the splits, Rouge-L, and
``ntng finetune --suite sni`` on a tiny T5."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import BertConfig

from app.errors import ConfigurationError
from app.evaluation.metrics import rouge_l, rouge_tokens, score
from datamodules.tasks.registry import get_task
from datamodules.tasks.sni import read_split
from datamodules.tasks.spec import Example, MissingTaskData
from datamodules.tasks.text_to_text import fit_prompt, format_input
from tests.conftest import run_cli
from tests.test_finetune import _lines
from tests.test_text_to_text import save_tiny_t5, word_tokenizer

NOUNS = ["the cat", "a dog", "the man", "a woman", "the child", "they"]
VERBS = ["sat", "ran", "ate", "saw a car", "was happy", "left"]


def task_file(directory: Path, name: str, instances: int = 12) -> Path:
    """An SNI task file: "write the subject of the sentence", with three positive examples."""
    task = {
        "Contributors": ["ntng tests"], "Source": ["made up"], "Categories": ["Keyword Tagging"],
        "Definition": ["Given a sentence, write its subject"],
        "Positive Examples": [{"input": "the cat sat", "output": "the cat", "explanation": "the cat sat"},
                              {"input": "a dog ran.", "output": "a dog", "explanation": "a dog ran"},
                              {"input": "they left", "output": "they", "explanation": "never shown"}],
        "Negative Examples": [{"input": "the cat sat", "output": "sat", "explanation": "a verb"}],
        "Instances": [{"id": f"{name}-{i}", "input": f"{NOUNS[i % 6]} {VERBS[(i // 6 + i) % 6]}",
                       "output": [NOUNS[i % 6], NOUNS[i % 6].split()[-1]]} for i in range(instances)],
    }
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(json.dumps(task))
    return path


PROMPT = ("Definition: Given a sentence, write its subject.\n\n"
          " Positive Example 1 -\nInput: the cat sat.\n Output: the cat.\n\n"
          " Positive Example 2 -\nInput: a dog ran.\n Output: a dog.\n\n"
          "Now complete the following example -\nInput: the man ate.\nOutput: ")


def test_instances_get_tk_instructs_prompt_and_all_their_references(tmp_path):
    task_file(tmp_path, "task001_subjects")
    dev = read_split(tmp_path, "dev")
    assert [e.idx for e in dev] == ["task001_subjects-0", "task001_subjects-1"]  # ceil(12 / 10) first instances
    sni = get_task("sni", "sni")
    example = next(e for e in read_split(tmp_path, "train") if e.idx == "task001_subjects-2")
    assert format_input(sni, example) == PROMPT
    assert example.label == "the man" and example.answers == ("the man", "man")
    assert example.group == "task001_subjects"


def test_splits_are_deterministic_and_follow_sni_when_its_split_files_are_there(tmp_path):
    plain = tmp_path / "plain"
    task_file(plain, "task001_a", instances=30)
    task_file(plain, "task002_b", instances=5)
    train, dev = read_split(plain, "train"), read_split(plain, "dev")
    assert [e.idx for e in dev] == ["task001_a-0", "task001_a-1", "task001_a-2", "task002_b-0"]
    assert len(train) == 27 + 4 and not {e.idx for e in train} & {e.idx for e in dev}
    assert [e.idx for e in read_split(plain, "train")] == [e.idx for e in train]
    # The natural-instructions layout: train tasks train, test tasks' first instances evaluate.
    repo = tmp_path / "natural-instructions"
    task_file(repo / "tasks", "task001_a", instances=150)
    task_file(repo / "tasks", "task002_b")
    (repo / "splits" / "default").mkdir(parents=True)
    (repo / "splits" / "default" / "train_tasks.txt").write_text("task001_a\n")
    (repo / "splits" / "default" / "test_tasks.txt").write_text("task002_b\n")
    train, dev = read_split(repo, "train"), read_split(repo, "dev")
    assert len(train) == 100 and {e.group for e in train} == {"task001_a"}
    assert [e.idx for e in dev] == [f"task002_b-{i}" for i in range(12)]


def test_missing_and_malformed_task_files(tmp_path):
    with pytest.raises(MissingTaskData):
        read_split(tmp_path, "train")
    (tmp_path / "task009_bad.json").write_text(json.dumps({"Definition": ["x"]}))
    with pytest.raises(ConfigurationError, match="task009_bad.json: missing field 'Instances'"):
        read_split(tmp_path, "dev")


def test_demonstrations_that_do_not_fit_are_dropped(tmp_path):
    task_file(tmp_path, "task001_subjects")
    example = next(e for e in read_split(tmp_path, "train") if e.idx == "task001_subjects-2")
    tokenizer = word_tokenizer([PROMPT])
    length = len(tokenizer(PROMPT)["input_ids"])
    definition, first, second, task_input = example.segments
    assert fit_prompt(tokenizer, example.segments, length) == PROMPT
    assert fit_prompt(tokenizer, example.segments, length - 1) == definition + first + task_input
    assert fit_prompt(tokenizer, example.segments, 5) == definition + task_input


def test_rouge_l_on_known_strings():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert rouge_l("the cat", "a dog") == 0.0
    assert rouge_l("", "a dog") == 0.0 and rouge_l("...", "a dog") == 0.0
    # LCS "the cat on the mat" = 5 of 6 tokens either side.
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # LCS "a c": precision 2/3, recall 2/4, F = 2PR / (P + R) = 4/7.
    assert rouge_l("a b c", "a c d e") == pytest.approx(4 / 7)
    assert rouge_tokens("Hello, World! It's 3-D.") == ["hello", "world", "it", "s", "3", "d"]
    assert rouge_l("Hello, world!", "hello world") == 1.0
    sni = get_task("sni", "sni")
    examples = [Example(idx=0, label="a cat", answers=("a cat", "the cat")),
                Example(idx=1, label="x y", answers=("x y",))]
    # Max over references (1.0 for "the cat"), mean over instances: (1 + 0) / 2.
    assert score(sni, examples, ["The cat.", "z"]) == {"rouge_l": 0.5, "exact_match": 0.5}


def test_finetune_sni_end_to_end(tmp_path, capsys):
    data = tmp_path / "sni"
    task_file(data, "task001_subjects")
    task_file(data, "task002_more", instances=8)
    tokenizer = word_tokenizer([PROMPT] + [f"{n} {v}" for n in NOUNS for v in VERBS])
    model, output = save_tiny_t5(tmp_path / "t5", tokenizer), tmp_path / "out"
    code, out, err = run_cli(["finetune", "--model", str(model), "--suite", "sni", "--data-dir", str(data),
                              "--output", str(output), "--max-epochs", "1", "--batch-size", "4"], capsys)
    assert code == 0, err
    results = json.loads((output / "results.json").read_text())
    assert set(results["tasks"]) == {"sni"} and set(results["tasks"]["sni"]) == {"rouge_l", "exact_match"}
    assert 0.0 <= results["tasks"]["sni"]["rouge_l"] <= 1.0 and results["averages"] == {}
    settings = results["settings"]
    assert settings["max_length"] == 1024 and settings["optimizer"]["schedule"] == "constant"
    assert settings["optimizer"]["betas"] == [0.9, 0.999] and settings["max_epochs"] == 1
    lines = _lines(output / "predictions" / "sni_dev.jsonl")
    assert [line["idx"] for line in lines] == ["task001_subjects-0", "task001_subjects-1", "task002_more-0"]
    assert set(lines[0]) == {"idx", "task", "prediction", "references", "rouge_l"}
    assert lines[0]["task"] == "task001_subjects" and lines[0]["references"] == ["the cat", "cat"]
    assert "| sni |" in (output / "results.md").read_text()


def test_sni_needs_a_text_to_text_checkpoint(tmp_path, capsys):
    bert = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    bert.save_pretrained(tmp_path)
    code, _, err = run_cli(["finetune", "--model", str(tmp_path), "--suite", "sni", "--data-dir", str(tmp_path)],
                           capsys)
    assert code == 2 and "not an encoder-decoder (T5) checkpoint" in err
