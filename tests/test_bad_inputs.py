"""The bad-input catalogue: every way users are known to get an input wrong, and the one line they see.

Each case runs ``ntng`` in-process on one bad input and checks what a user sees: exit code 2, exactly
one ``ntng: error:`` line on stderr that names what is wrong, where, and how to fix it (a few key
words per case), no traceback and no argparse usage block, no checkpoint written, and every file
that existed before the command (corpus, earlier outputs) byte for byte unchanged. Every case fails
before training. ``docs/bad-inputs.md`` lists the same cases with the line each prints; some of
them are also tested, with their mechanics, next to the code that owns them (``test_cli``,
``test_datamodule``, ``test_finetune``, ``test_sweep``, ...).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning
import numpy as np
import pytest
import torch
import yaml

from callbacks.irreducible_losses import IrreducibleLosses
from tests.conftest import REPO_ROOT, run_cli, tiny_fit_args, write_profile
from tests.test_finetune import checkpoint, write_glue, write_superglue  # noqa: F401 (checkpoint: a fixture)

TINY = str(REPO_ROOT / "configs" / "bert" / "tiny.yaml")
TINY_PROFILE = str(REPO_ROOT / "configs" / "rst" / "tiny-cpu.yaml")
PLAN_FLAGS = ["--profile", TINY_PROFILE, "--budget-hours", "0.001", "--batch-size", "16", "--micro-batch-size", "16"]


@dataclass
class Inputs:
    """What a case may build its bad input from (all under the test's ``tmp_path``, the working directory)."""

    tmp: Path
    corpus: Path  # the small sample corpus (tests/conftest.py)
    model: Path | None = None  # a tiny exported checkpoint, for the cases that need one

    def fit(self, *overrides: str, overlays: tuple[str, ...] = (), budget: float = 0.00003) -> list[str]:
        """``ntng fit`` on the tiny recipe (+ overlays) and the sample corpus, then ``overrides``."""
        return [*tiny_fit_args(self.corpus, budget, *overlays), *overrides]

    def write(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    def yaml(self, name: str, document: object) -> str:
        return str(self.write(name, yaml.safe_dump(document)))

    def sweep(self, **fields: object) -> list[str]:
        document = {"name": "bad", "recipe": TINY, "budgets": [0.00003], "seeds": [0],
                    "methods": {"baseline": {}}} | fields
        return ["sweep", "-c", self.yaml("sweep.yaml", document), "--output", str(self.tmp / "sweep"), "--dry-run"]


@dataclass(frozen=True)
class Case:
    """One bad input.

    Attributes:
        id: the test id (``docs/bad-inputs.md`` lists it).
        make: builds the input under ``Inputs`` and returns the ``ntng`` arguments.
        says: words the error line must contain: what is wrong, where, how to fix it.
        needs_model: the case needs the tiny exported checkpoint.
    """

    id: str
    make: Callable[[Inputs], list[str]]
    says: tuple[str, ...]
    needs_model: bool = False


# -- inputs the cases build ------------------------------------------------------------------------

def _corpus_dir(inputs: Inputs, files: dict[str, bytes]) -> str:
    for name, content in files.items():
        inputs.write(f"bad-corpus/{name}", content)
    return str(inputs.tmp / "bad-corpus")


def _sources(path: str | Path) -> str:
    return f"--data.init_args.sources=[{path}]"


JSONL_BAD_LINE_3 = '{"text": "one"}\n{"text": "two"}\n{"text": three\n'


def _small_checkpoint(inputs: Inputs) -> str:
    """A checkpoint of the tiny recipe's model with 2 layers (what a 2-layer ``ntng fit`` saves)."""
    from app.modules.masked_lm import MaskedLanguageModel

    config = yaml.safe_load(Path(TINY).read_text())["model"]["init_args"]["config"]
    module = MaskedLanguageModel(config=config, vocab_size=500, pad_token_id=0, seq_len=64)
    path = inputs.tmp / "runs" / "two-layer" / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": module.state_dict(), "epoch": 0, "global_step": 10,
                "pytorch-lightning_version": lightning.__version__}, path)
    return str(path)


def _four_layers(inputs: Inputs) -> str:
    config = yaml.safe_load(Path(TINY).read_text())["model"]["init_args"]["config"] | {"num_hidden_layers": 4}
    return inputs.yaml("four-layers.yaml", {"model": {"init_args": {"config": config}}})


def _il_file(inputs: Inputs) -> str:
    """An irreducible-loss file made for another run (five example ids that are not this run's)."""
    path = inputs.tmp / "other-il.npz"
    IrreducibleLosses(np.arange(5), np.zeros((1, 5), dtype=np.float32), {"blocks": "0123abcd"}, {}).save(path)
    return str(path)


def _existing_run(inputs: Inputs) -> list[str]:
    """A fresh fit into the fixed run directory ``runs/bert-tiny/version_0`` where an earlier run finished."""
    inputs.write("runs/bert-tiny/version_0/summary.json", json.dumps({"updates": 12}))
    inputs.write("runs/bert-tiny/version_0/checkpoints/last.ckpt", b"an earlier run's checkpoint")
    return inputs.fit("--trainer.logger.init_args.version=0")


def _finetune(inputs: Inputs, *extra: str, data: Path | None = None) -> list[str]:
    """``ntng finetune`` of the tiny checkpoint (or a path without one) into an output that holds earlier results."""
    output = inputs.tmp / "finetuned"
    inputs.write("finetuned/results.json", '{"an earlier": "result"}')
    return ["finetune", "--model", str(inputs.model or inputs.tmp / "model"), "--data-dir", str(data or inputs.tmp), "--output", str(output),
            "--max-epochs", "1", "--max-length", "32", *extra]


def _malformed_glue(inputs: Inputs) -> list[str]:
    root = write_glue(inputs.tmp / "glue")
    train = root / "RTE" / "train.tsv"
    lines = train.read_text().splitlines()
    lines[3] = lines[3].rsplit("\t", 1)[0]  # the third example lost its label column
    train.write_text("\n".join(lines) + "\n")
    return _finetune(inputs, "--suite", "glue", "--tasks", "rte", data=root)


def _superglue_missing_field(inputs: Inputs) -> list[str]:
    root = write_superglue(inputs.tmp / "superglue")
    train = root / "CB" / "train.jsonl"
    records = [json.loads(line) for line in train.read_text().splitlines()]
    del records[1]["hypothesis"]
    train.write_text("".join(json.dumps(r) + "\n" for r in records))
    return _finetune(inputs, "--suite", "superglue", "--tasks", "cb", data=root)


def _calibrate_output(inputs: Inputs) -> Path:
    return inputs.write("profiles/mine.yaml", "name: an earlier profile\n")


CASES = [
    # -- the recipe: YAML files and --key value arguments ----------------------------------------
    Case("yaml-unknown-key", lambda i: i.fit("-c", i.yaml("typo.yaml", {"budget": {"budgett": 0.001}})),
         ("budget.budgett", "no such option", "spelling", "ntng fit --help")),
    Case("yaml-bad-type", lambda i: i.fit("-c", i.yaml("type.yaml", {"data": {"init_args": {"micro_batch_size": "sixteen"}}})),
         ("data.init_args.micro_batch_size", "expected int", "'sixteen'", "fix it")),
    Case("yaml-syntax", lambda i: i.fit("-c", str(i.write("broken.yaml", "budget: {budget: 0.001\n"))),
         ("broken.yaml", "not valid YAML", "line 2", "fix the file")),
    Case("config-file-missing", lambda i: i.fit("-c", str(i.tmp / "nope.yaml")),
         ("nope.yaml", "-c")),
    Case("unknown-option", lambda i: i.fit("--budget.bugdet=0.001"),
         ("--budget.bugdet", "ntng fit --help")),
    Case("unknown-subcommand", lambda i: ["fitt", "-c", TINY],
         ("unknown command 'fitt'", "fit", "sweep", "ntng --help")),
    Case("unknown-method-option", lambda i: i.fit(
        "-c", i.yaml("pld.yaml", {"trainer": {"callbacks": [{"class_path": "callbacks.layer_drop.ProgressiveLayerDrop",
                                                              "init_args": {"theta_bar": 0.5, "keep_ratio": 0.5}}]}})),
         ("ProgressiveLayerDrop", "keep_ratio", "help")),
    Case("unknown-backbone", lambda i: i.fit("--model.init_args.backbone=gpt9"),
         ("gpt9", "bert", "roberta-prelayernorm")),
    # -- the budget and its cost model -------------------------------------------------------------
    Case("budget-zero", lambda i: i.fit("--budget.budget=0"), ("budget.budget", "positive", "0")),
    Case("budget-negative", lambda i: i.fit("--budget.budget=-2"), ("budget.budget", "positive", "-2")),
    Case("budget-not-a-number", lambda i: i.fit("--budget.budget=2h"), ("budget.budget", "float", "2h")),
    Case("budget-unknown-unit", lambda i: i.fit("--budget.unit=days"),
         ("budget.unit", "days", "rst_hours", "wall_hours")),
    Case("profile-missing", lambda i: i.fit(f"--budget.profile={i.tmp / 'rst' / 'mine.yaml'}"),
         ("RST profile not found", "mine.yaml", "configs/rst/", "ntng calibrate")),
    Case("profile-mismatch", lambda i: i.fit(
        f"--budget.profile={write_profile(i.tmp / 'small.yaml', {1: 0.01, 2: 0.02})}",
        "--budget.allow_profile_mismatch=false"),
         ("small", "another model", "hidden: profile 32 vs run 64", "ntng calibrate", "budget.allow_profile_mismatch=true")),
    Case("profile-malformed", lambda i: i.fit("--budget.profile=" + str(i.write("bad-profile.yaml", "name: x\n"))),
         ("bad-profile.yaml", "malformed RST profile", "passes")),
    # -- method settings that do not fit the model ---------------------------------------------------
    Case("stacking-deeper-than-model", lambda i: i.fit(overlays=("stacking",)),
         ("stacking", "initial_layers", "2 layers")),
    Case("stacking-doubling-overshoots", lambda i: i.fit(
        "--trainer.callbacks.initial_layers=1", "--trainer.callbacks.growth_fractions=[0.2,0.5]", overlays=("stacking",)),
         ("stacking", "1 -> 2 -> 4", "2 layers", "growth_fractions")),
    Case("raptr-path-longer-than-model", lambda i: i.fit(overlays=("raptr",)),
         ("RaPTr", "path_lengths", "[8, 11, 13, 16]", "depth 2")),
    Case("pld-keep-ratio-above-1", lambda i: i.fit("--trainer.callbacks.theta_bar=1.5", overlays=("layer_drop",)),
         ("theta_bar", "1.5", "(0, 1]")),
    Case("pld-keep-ratio-zero", lambda i: i.fit("--trainer.callbacks.theta_bar=0", overlays=("layer_drop",)),
         ("theta_bar", "(0, 1]")),
    Case("callback-value-of-the-wrong-type", lambda i: i.fit("--trainer.callbacks.theta_bar=abc",
                                                             overlays=("layer_drop",)),
         ("theta_bar", "expected float", "'abc'", "ProgressiveLayerDrop")),
    # -- the corpus ------------------------------------------------------------------------------------
    Case("corpus-missing", lambda i: i.fit(_sources(i.tmp / "no-such-corpus")),
         ("corpus source not found", "no-such-corpus")),
    Case("corpus-empty", lambda i: i.fit(_sources(_corpus_dir(i, {"a.txt": b"", "b.txt": b"  \n\n"}))),
         ("corpus is empty", "bad-corpus")),
    Case("corpus-not-utf8", lambda i: i.fit(_sources(_corpus_dir(i, {"latin1.txt": "café crème\n".encode("latin-1")}))),
         ("latin1.txt", "line 1", "not UTF-8", "0xe9", "iconv")),
    Case("corpus-dir-without-text", lambda i: i.fit(_sources(_corpus_dir(i, {"notes.md": b"# notes", "t.csv": b"a,b"}))),
         ("bad-corpus", ".txt", ".jsonl", ".parquet")),
    Case("corpus-unsupported-file", lambda i: i.fit(_sources(i.write("notes.md", "# notes"))),
         ("notes.md", "'.md'", ".txt")),
    Case("corpus-jsonl-malformed-line", lambda i: i.fit(_sources(i.write("docs.jsonl", JSONL_BAD_LINE_3))),
         ("docs.jsonl", "line 3", "invalid JSON")),
    Case("corpus-jsonl-missing-field", lambda i: i.fit(_sources(i.write("docs.jsonl", '{"body": "one"}\n'))),
         ("docs.jsonl", "line 1", "'text'", "body", "data.init_args.text_field")),
    # -- shapes: sequence length and batch ------------------------------------------------------------
    Case("seq-len-above-max-positions", lambda i: i.fit("--data.init_args.seq_len=128"),
         ("seq_len 128", "65 positions", "data.init_args.seq_len", "max_position_embeddings")),
    Case("micro-batch-zero", lambda i: i.fit("--data.init_args.micro_batch_size=0"),
         ("data.init_args.micro_batch_size=0", ">= 1", "set positive")),
    Case("batch-not-multiple-of-micro-batch", lambda i: ["plan", *PLAN_FLAGS[:4], "--batch-size", "10",
                                                          "--micro-batch-size", "4"],
         ("batch size 10", "multiple of the micro-batch 4", "--batch-size")),
    # -- checkpoints and RHO-loss's irreducible losses -------------------------------------------------
    Case("ckpt-path-missing", lambda i: i.fit(f"--ckpt_path={i.tmp / 'runs' / 'nope.ckpt'}"),
         ("--ckpt_path", "nope.ckpt", "no such checkpoint", "--resume")),
    Case("ckpt-path-other-model", lambda i: i.fit("-c", _four_layers(i), f"--ckpt_path={_small_checkpoint(i)}"),
         ("last.ckpt", "different model", "weights missing", "layer.2", "recipe that wrote it")),
    Case("fit-over-an-earlier-run", _existing_run, ("already holds a run", "--resume", "--overwrite")),
    Case("il-losses-file-missing", lambda i: i.fit(f"--trainer.callbacks.irreducible_losses={i.tmp / 'il.npz'}",
                                                   overlays=("rho_loss",)),
         ("il.npz", "not found", "ntng il-losses")),
    Case("il-losses-file-of-another-run", lambda i: i.fit(f"--trainer.callbacks.irreducible_losses={_il_file(i)}",
                                                          overlays=("rho_loss",)),
         ("other-il.npz", "5 example ids", "recompute with `ntng il-losses`")),
    # -- ntng finetune -------------------------------------------------------------------------------
    Case("finetune-unknown-task", lambda i: _finetune(i, "--suite", "glue", "--tasks", "rte,mnli2"),
         ("unknown glue task 'mnli2'", "known tasks", "rte")),
    Case("finetune-unknown-suite", lambda i: _finetune(i, "--suite", "glu"),
         ("--suite", "glu", "glue", "superglue")),
    Case("finetune-model-not-a-model-directory", lambda i: ["finetune", "--model", str(i.corpus), "--suite", "glue"],
         ("--model", "corpus", "no config.json", "HF-format", "hf/")),
    Case("finetune-model-argument-missing", lambda i: ["finetune", "--suite", "glue"],
         ("ntng finetune", "--model", "required")),
    Case("finetune-glue-malformed-row", _malformed_glue, ("train.tsv", "line 4", "columns"), needs_model=True),
    Case("finetune-superglue-missing-field", _superglue_missing_field,
         ("train.jsonl", "line 2", "'hypothesis'"), needs_model=True),
    # -- ntng plan ---------------------------------------------------------------------------------------
    Case("plan-unknown-method", lambda i: ["plan", *PLAN_FLAGS, "--method", "layerdrop"],
         ("--method", "layerdrop", "layer_drop")),
    Case("plan-budget-zero", lambda i: ["plan", *PLAN_FLAGS[:2], "--budget-hours", "0", *PLAN_FLAGS[4:]],
         ("--budget-hours 0", "positive", "e.g. --budget-hours")),
    Case("plan-required-flag-missing", lambda i: ["plan", "--profile", TINY_PROFILE, "--budget-hours", "1"],
         ("ntng plan", "required", "--batch-size, --micro-batch-size", "ntng plan --help")),
    Case("plan-bad-format", lambda i: ["plan", *PLAN_FLAGS, "--format", "xml"],
         ("ntng plan", "--format", "xml", "json", "--help")),
    Case("plan-selection-rate", lambda i: ["plan", *PLAN_FLAGS, "--selection-rate", "1.5"],
         ("--selection-rate 1.5", "(0, 1]", "leave it out")),
    Case("plan-method-option-out-of-range", lambda i: ["plan", *PLAN_FLAGS, "--method", "layer_drop",
                                                        "--layer_drop.theta_bar", "2"],
         ("theta_bar", "(0, 1]", "2")),
    # -- ntng sweep ----------------------------------------------------------------------------------
    Case("sweep-unknown-method", lambda i: i.sweep(methods={"baseline": {}, "layerdrop": {"overlays": ["configs/methods/layerdrop.yaml"]}}),
         ("sweep.yaml", "method layerdrop", "layerdrop.yaml", "not found", "layer_drop")),
    Case("sweep-methods-not-a-mapping", lambda i: i.sweep(methods=["baseline", "layer_drop"]),
         ("sweep.yaml", "methods", "mapping", "overlays")),
    Case("sweep-budget-not-positive", lambda i: i.sweep(budgets=[0.001, 0]),
         ("sweep.yaml", "budgets", "positive", "0")),
    Case("sweep-budget-not-a-number", lambda i: i.sweep(budgets=["2h"]),
         ("sweep.yaml", "budgets", "'2h'", "number")),
    Case("sweep-file-missing", lambda i: ["sweep", "-c", str(i.tmp / "none.yaml")],
         ("sweep file not found", "none.yaml", "-c", "configs/sweeps/")),
    Case("sweep-config-argument-missing", lambda i: ["sweep", "--dry-run"], ("ntng sweep", "-c", "required")),
    # -- ntng report ------------------------------------------------------------------------------------
    Case("report-not-a-sweep-directory", lambda i: ["report", str(i.corpus)],
         ("no sweep cells", "corpus", "cells/<method>/b<budget>/s<seed>/cell.json", "ntng sweep")),
    Case("report-bad-epoch", lambda i: ["report", str(i.tmp), "--epoch", "last"],
         ("ntng report", "--epoch", "last", "final", "best")),
    # -- ntng calibrate ----------------------------------------------------------------------------------
    Case("calibrate-output-missing", lambda i: ["calibrate", "-c", TINY], ("ntng calibrate", "--output", "required")),
    Case("calibrate-repeats-zero", lambda i: ["calibrate", "-c", TINY, "--output", str(_calibrate_output(i)),
                                              "--repeats", "0"],
         ("ntng calibrate --repeats 0", "at least 1", "e.g.")),
    # -- ntng il-losses ---------------------------------------------------------------------------------
    Case("il-losses-model-not-a-model-directory", lambda i: [
        "il-losses", "--model", str(i.tmp / "runs" / "il" / "hf"), "-c", TINY, "-c", str(REPO_ROOT / "configs/methods/rho_loss.yaml"),
        "--output", str(i.write("il.npz", b"an earlier file")), _sources(i.corpus),
        "--data.init_args.tokenizer_vocab_size=500"],
         ("--model", "runs/il/hf", "no config.json", "<run>/hf", "ntng fit")),
    Case("il-losses-epochs-zero", lambda i: ["il-losses", "--model", str(i.tmp), "-c", TINY, "--output",
                                             str(i.tmp / "il.npz"), "--epochs", "0"],
         ("--epochs 0", ">= 1", "leave it out")),
    Case("il-losses-il-model-recipe", lambda i: [
        "il-losses", "--model", str(i.model), "-c", TINY, "-c", str(REPO_ROOT / "configs/methods/rho_loss_il_model.yaml"),
        "--output", str(i.tmp / "il.npz"), _sources(i.corpus),
        "--data.init_args.tokenizer_vocab_size=500"],
         ("holdout split", "target run's recipe"), needs_model=True),
    Case("il-losses-output-argument-missing", lambda i: ["il-losses", "--model", str(i.tmp), "-c", TINY],
         ("ntng il-losses", "--output", "required")),
]


def _snapshot(root: Path) -> dict[Path, bytes]:
    """Every file under ``root`` except the test's tokenizer/block cache, with its bytes."""
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and "ntng-cache" not in p.parts}


def test_the_catalogue_is_large_and_its_ids_are_unique():
    ids = [case.id for case in CASES]
    assert len(ids) >= 30 and len(set(ids)) == len(ids)


def test_the_docs_list_every_case():
    table = (REPO_ROOT / "docs" / "bad-inputs.md").read_text()
    assert [case.id for case in CASES if f"`{case.id}`" not in table] == []


@pytest.fixture
def inputs(request, tmp_path, sample_corpus, monkeypatch) -> Inputs:
    monkeypatch.chdir(tmp_path)
    case = request.node.callspec.params["case"]
    model = request.getfixturevalue("checkpoint") if case.needs_model else None
    return Inputs(tmp_path, sample_corpus, model)


@pytest.mark.parametrize("command", ["plan", "calibrate", "il-losses", "finetune", "sweep", "report"])
def test_help_still_prints_the_usage(command, capsys):
    code, out, err = run_cli([command, "--help"], capsys)
    assert code == 0 and "usage:" in out and "ntng: error" not in err


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_bad_input_is_one_actionable_line_before_anything_is_written(case, inputs, capsys):
    args = case.make(inputs)
    before = _snapshot(inputs.tmp)
    capsys.readouterr()
    code, out, err = run_cli(args, capsys)
    assert "Traceback" not in out + err, err
    assert not any(line.startswith("usage:") for line in err.splitlines()), err  # argparse's block
    errors = [line for line in err.splitlines() if line.startswith("ntng: error:")]
    assert code == 2 and len(errors) == 1, err
    missing = [word for word in case.says if word not in errors[0]]
    assert not missing, f"{errors[0]!r} lacks {missing}"
    after = _snapshot(inputs.tmp)
    assert [p for p in before if after.get(p) != before[p]] == [], "an existing file was changed or removed"
    assert [p for p in after if p not in before and p.suffix in (".ckpt", ".npz", ".json", ".safetensors")] == []
