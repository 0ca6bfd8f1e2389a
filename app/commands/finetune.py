"""``ntng finetune``: fine-tune a pretrained checkpoint on every task of GLUE, SuperGLUE or SNI.

Every task and seed starts from a fresh copy of the checkpoint (NTNG's protocol), trains for a
fixed number of epochs and is evaluated on its dev split(s) after every epoch. The report gives
the final epoch and, as NTNG does, the best epoch per metric (optimistic: selected on dev), plus
the suite's averages. Diagnostic sets (GLUE AX, SuperGLUE AX-b/AX-g) are never trained on: the
parent task's model (first seed, final epoch) predicts them. Unlabelled test splits become
leaderboard submission files, also from the first seed's model.

Encoder checkpoints (BERT, RoBERTa) get classification heads (``app.modules.finetuner``). A T5
checkpoint (``model_type == "t5"`` or any ``is_encoder_decoder`` config) is fine-tuned
text-to-text instead (``app.modules.text_to_text``: T5's input strings and label-word targets,
greedy generation mapped back to labels; ``datamodules.tasks.text_to_text``), into the same files,
metrics and averages. A generation that is no label word is predicted as -1 (``NO_LABEL``) in
``predictions/`` and scored wrong; a submission file needs a label, so there it becomes the task's
first label (counted in the log). ReCoRD is skipped for T5 (reason in the report). Text-to-text
runs default to ``--max-length 512`` (T5's fine-tuning inputs; BERT's default is 128).

``--suite sni`` (T5 checkpoints only) fine-tunes ONE model on Super-Natural-Instructions task files
(``--data-dir``: the natural-instructions repository, or any directory of task JSON files;
``datamodules.tasks.sni``) and reports the task ``sni``: Rouge-L and exact match over every dev
instance. Defaults follow nanoT5's SNI fine-tuning (NTNG's T5 downstream): 2 epochs, batch 8,
lr 5e-5 constant (AdamW betas 0.9/0.999), inputs of 1,024 tokens, targets and generations of 128.
Its predictions (``predictions/sni_dev.jsonl``) are ``{"idx", "task", "prediction", "references",
"rouge_l"}``.

Outputs under ``--output`` (default ``<model>/finetune-<suite>``)::

    results.json  results.md                  metrics, averages, skipped tasks, settings
    predictions/<key>_dev.jsonl                final-epoch dev predictions (first seed;
                                               other seeds: <key>_dev_seed<N>.jsonl)
    predictions/<task>_<split>.jsonl           diagnostic predictions (ax_diagnostic-full, axb_dev, ...)
    submission/                                leaderboard files (GLUE TSV / SuperGLUE JSONL)
    tensorboard/<task>/seed_<N>/               per-run curves; tensorboard/summary/ the averages

A task whose train or dev data is missing is skipped with a printed line and its reason in the
report. Data are read from the original files (GLUE TSVs, SuperGLUE JSONL), or with ``--data-dir hub``
from each task's Hugging Face hub dataset (``datamodules.tasks.hub``; a hub that cannot be reached
skips the task); the reason for a missing file names the task's hub dataset.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from transformers import AutoTokenizer

from app.commands.finetune_settings import FinetuneSettings, build_parser, resolve_settings
from app.model.backbones import MASKED_LM_FAMILIES, max_sequence_length
from app.errors import ConfigurationError
from app.evaluation.metrics import rouge_l, score, summarize
from app.evaluation.reports import markdown_table, write_predictions, write_results, write_submission
from app.files import write_text_atomic
from app.modules.finetuner import FineTuner, TaskModule, load_config, predict
from app.modules.text_to_text import TextToTextFineTuner
from datamodules.tasks.datamodule import TaskDataModule
from datamodules.tasks.registry import get_task
from datamodules.tasks.spec import NO_LABEL, Example, MissingTaskData, TaskSpec, report_name
from datamodules.tasks.text_to_text import UNSUPPORTED

Runs = dict[str, dict[int, list[dict[str, float]]]]


def load_tokenizer_for(model_dir: str, max_length: int):
    """The checkpoint's tokenizer, checked against the model's positions."""
    config = load_config(model_dir)
    family = MASKED_LM_FAMILIES.get(config.model_type)
    limit = max_sequence_length(config, family) if family else getattr(config, "max_position_embeddings", None)
    if limit is not None and max_length > limit:
        raise ConfigurationError(f"--max-length {max_length} exceeds the model's {limit} positions")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as err:
        reason = " ".join(str(err).split())
        raise ConfigurationError(f"cannot load the tokenizer saved with {model_dir}: {reason}") from err
    if tokenizer.pad_token_id is None:
        raise ConfigurationError(f"the tokenizer of {model_dir} has no padding token")
    return tokenizer, config


class EpochReport(Callback):
    """Prints each validation epoch's metrics as ``task seed N epoch e/E: key metric=value ...``."""

    def __init__(self, task: str, seed: int) -> None:
        self.task, self.seed = task, seed

    def on_validation_end(self, trainer: Trainer, module: TaskModule) -> None:
        if trainer.sanity_checking:
            return
        parts = []
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            parts.append(f"train loss {float(loss):.4f}")
        for key, history in module.history.items():
            parts.append(f"{key} " + " ".join(f"{m}={_fmt(v)}" for m, v in history[-1].items()))
        epoch = len(next(iter(module.history.values()), []))
        print(f"  {self.task} seed {self.seed} epoch {epoch}/{trainer.max_epochs}: {'; '.join(parts)}", flush=True)


def _fmt(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.4f}"


@contextmanager
def _quiet_lightning():
    """Hide Lightning's per-Trainer banners and advice that repeat for every task and seed, and
    restore the global determinism flag the Trainers set."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            for message in (".*does not have many workers.*", ".*smaller than the logging interval.*",
                            ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*"):
                warnings.filterwarnings("ignore", message)
            yield
    finally:
        logger.setLevel(level)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


class SuiteRun:
    """One ``ntng finetune`` call: trains the tasks, writes predictions and the report."""

    def __init__(self, settings: FinetuneSettings) -> None:
        self.settings = settings
        self.output = Path(settings.output)
        self.tokenizer, self.config = load_tokenizer_for(settings.model, settings.max_length)
        self.runs: Runs = {}
        self.skipped: dict[str, str] = {}

    # -- helpers ------------------------------------------------------------------------------------

    def data_module(self, spec: TaskSpec) -> TaskDataModule:
        s = self.settings
        return TaskDataModule(
            spec, s.data_dir, self.tokenizer, max_length=s.max_length, batch_size=s.batch_size,
            max_train_examples=s.max_train_examples, max_eval_examples=s.max_eval_examples,
            num_workers=s.num_workers, model_config=self.config,
        )

    def trainer(self, task: str, seed: int, steps_per_epoch: int) -> Trainer:
        s = self.settings
        logger = TensorBoardLogger(
            str(self.output / "tensorboard"), name=task, version=f"seed_{seed}", default_hp_metric=False
        )
        return Trainer(
            max_epochs=s.max_epochs,
            accelerator=s.accelerator,
            devices=1,  # the validation-epoch metrics are gathered on one process
            precision=s.precision,
            logger=logger,
            callbacks=[EpochReport(task, seed)],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            log_every_n_steps=max(1, min(50, steps_per_epoch)),
            deterministic="warn",  # deterministic kernels where torch has them; no error where not
        )

    def task_module(self, spec: TaskSpec) -> TaskModule:
        """A fresh fine-tuning module from the checkpoint: text-to-text for T5, else with a task head."""
        s = self.settings
        optimizer = {key: s.optimizer[key] for key in ("eps", "weight_decay", "warmup_fraction", "schedule")}
        optimizer.update(lr=s.lr, betas=tuple(s.optimizer["betas"]))
        if s.text_to_text:
            return TextToTextFineTuner(spec, s.model, self.tokenizer, **optimizer)
        return FineTuner(spec, s.model, **optimizer)

    def skip(self, name: str, reason: str) -> None:
        self.skipped[name] = reason
        print(f"skipping {self.settings.suite} {name}: {reason}", flush=True)

    # -- the suite ----------------------------------------------------------------------------------

    def run(self) -> dict:
        """Fine-tune every selected task and write the report; returns the summary."""
        s = self.settings
        specs = [get_task(s.suite, name) for name in s.tasks]
        trained = {spec.name for spec in specs if spec.parent is None}
        for spec in specs:
            if spec.parent is not None and spec.parent not in trained:
                self.skip(spec.name, f"diagnostic set of {spec.parent}, which is not fine-tuned in this run "
                                     f"(add {spec.parent} to --tasks)")
        with _quiet_lightning():
            for spec in specs:
                if spec.parent is None:
                    diagnostics = [d for d in specs if d.parent == spec.name]
                    self.finetune_task(spec, diagnostics)
        return self.report()

    def finetune_task(self, spec: TaskSpec, diagnostics: list[TaskSpec]) -> None:
        s = self.settings
        data = self.data_module(spec)
        try:
            if s.text_to_text and (spec.suite, spec.name) in UNSUPPORTED:
                raise MissingTaskData(f"not fine-tuned text-to-text: {UNSUPPORTED[spec.suite, spec.name]}")
            data.setup("fit")
        except MissingTaskData as err:
            self.skip(spec.name, str(err))
            for diagnostic in diagnostics:
                self.skip(diagnostic.name, f"its parent task {spec.name} was skipped")
            return
        steps = len(data.train_examples) // s.batch_size
        print(
            f"{s.suite} {spec.name}: {len(data.train_examples)} train examples ({steps} steps/epoch), "
            + ", ".join(f"{len(e)} {split}" for split, e in data.eval_examples.items())
            + (f"; {data.dropped_train} unlabelled train examples dropped" if data.dropped_train else ""),
            flush=True,
        )
        for seed in s.seeds:
            seed_everything(seed, workers=True, verbose=False)
            module = self.task_module(spec)
            trainer = self.trainer(spec.name, seed, steps)
            trainer.fit(module, datamodule=data)
            for key, history in module.history.items():
                self.runs.setdefault(key, {})[seed] = history
            first = seed == s.seeds[0]
            for split, key in data.report_keys.items():
                suffix = "" if first else f"_seed{seed}"
                write = write_generations if spec.kind == "generation" else write_predictions
                write(self.output / "predictions" / f"{key}_dev{suffix}.jsonl",
                      spec, data.eval_examples[split], module.last_predictions[key])
            if first:
                self.write_submissions(spec, data, trainer, module)
                for diagnostic in diagnostics:
                    self.predict_diagnostic(diagnostic, spec, trainer, module, seed)
            del module, trainer

    def write_submissions(self, spec: TaskSpec, data: TaskDataModule, trainer: Trainer, module: TaskModule) -> None:
        """Predict the task's unlabelled test splits into ``submission/``."""
        for split in spec.test_splits:
            try:
                examples = data.read(split, self.settings.max_eval_examples)
            except MissingTaskData as err:
                print(f"  {spec.name} {split}: no submission ({err})", flush=True)
                continue
            if not examples or any(example.label is not None for example in examples):
                continue
            predictions = predict(trainer, module, data.predict_loader(examples), examples)
            path = write_submission(self.output / "submission", spec, split, examples,
                                    submittable(spec, split, predictions))
            partial = " (first examples only: --max-eval-examples)" if self.settings.max_eval_examples else ""
            print(f"  {spec.name} {split}: submission {path}{partial}", flush=True)

    def predict_diagnostic(
        self, diagnostic: TaskSpec, parent: TaskSpec, trainer: Trainer, module: TaskModule, seed: int
    ) -> None:
        """Predict a diagnostic set with its parent's model; score it when labelled."""
        if diagnostic.kind != parent.kind or len(diagnostic.label_names) != len(parent.label_names):
            self.skip(diagnostic.name, f"its labels do not match those of {parent.name}")
            return
        data = self.data_module(diagnostic)
        found = False
        for split in dict.fromkeys(diagnostic.dev_splits + diagnostic.test_splits):
            try:
                examples = data.read(split, self.settings.max_eval_examples)
            except MissingTaskData as err:
                print(f"  {diagnostic.name} {split}: not found ({err})", flush=True)
                continue
            if not examples:
                continue
            found = True
            predictions = predict(trainer, module, data.predict_loader(examples), examples)
            key = report_name(diagnostic, split)
            write_predictions(self.output / "predictions" / f"{diagnostic.name}_{split}.jsonl",
                              diagnostic, examples, predictions)
            if all(example.label is not None for example in examples):
                metrics = score(diagnostic, examples, predictions)
                self.runs.setdefault(key, {})[seed] = [metrics]
                print(f"  {key} (with {parent.name}'s model): "
                      + " ".join(f"{m}={_fmt(v)}" for m, v in metrics.items()), flush=True)
            if split in diagnostic.test_splits:
                write_submission(self.output / "submission", diagnostic, split, examples,
                                 [int(p) for p in submittable(diagnostic, split, predictions)])
        if not found:
            where = "on the hub" if data.from_hub else f"under {Path(self.settings.data_dir) / diagnostic.directory}"
            self.skip(diagnostic.name, f"no data {where}")

    # -- the report ---------------------------------------------------------------------------------

    def report(self) -> dict:
        s = self.settings
        summary = summarize(self.runs, s.suite)
        settings = asdict(s)
        write_results(self.output / "results.json", s.suite, summary, self.skipped, settings)
        table = markdown_table(summary, self.skipped)
        write_text_atomic(self.output / "results.md", table)
        self.log_summary(summary, settings)
        return summary

    def log_summary(self, summary: dict, settings: dict) -> None:
        """Settings as hparams with the averages as their metrics, and every result as a scalar."""
        logger = TensorBoardLogger(str(self.output / "tensorboard"), name="summary", version="",
                                   default_hp_metric=False)
        scalars: dict[str, float] = {}
        for prefix, part in (("final", summary), ("best_epoch", summary["best_epoch"])):
            for key, metrics in part["tasks"].items():
                for metric, value in metrics.items():
                    scalars[f"{prefix}/{key}/{metric}"] = _mean(value)
            for name, average in part.get("averages", {}).items():
                if average["value"] is not None:
                    scalars[f"{prefix}/average/{name}"] = _mean(average["value"])
        scalars = {k: v for k, v in scalars.items() if not math.isnan(v)}
        hparams = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in settings.items()}
        logger.log_hyperparams(hparams, {f"hp/{k}": v for k, v in scalars.items() if "/average/" in k})
        logger.log_metrics(scalars, step=0)
        logger.finalize("success")


def submittable(spec: TaskSpec, split: str, predictions: list[Any]) -> list[Any]:
    """Predictions for a submission file, which needs a label: ``NO_LABEL`` becomes class 0 (the
    first label word, or COPA's first choice), with a printed count."""
    if spec.kind in ("regression", "generation"):
        return predictions
    invalid = sum(p == NO_LABEL for p in predictions)
    if invalid:
        print(f"  {spec.name} {split}: {invalid} generations were no label word; submitted as class 0", flush=True)
    return [0 if p == NO_LABEL else p for p in predictions]


def write_generations(path: Path, spec: TaskSpec, examples: list[Example], predictions: list[str]) -> Path:
    """JSONL of generation predictions: ``{"idx", "task", "prediction", "references", "rouge_l"}``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for example, text in zip(examples, predictions, strict=True):
        best = max(rouge_l(text, reference) for reference in example.answers)
        lines.append(json.dumps({"idx": example.idx, "task": example.group, "prediction": text,
                                 "references": list(example.answers), "rouge_l": best}) + "\n")
    write_text_atomic(path, "".join(lines))
    return path


def _mean(value: Any) -> float:
    """A summarized value's mean (plain float with one seed)."""
    if isinstance(value, dict):
        value = value["mean"]
    return math.nan if value is None else float(value)


def main(argv: list[str]) -> None:
    """``ntng finetune`` entry point."""
    settings = resolve_settings(build_parser().parse_args(argv))
    mode = " (text-to-text)" if settings.text_to_text else ""
    print(
        f"ntng finetune {settings.suite}{mode}: {', '.join(settings.tasks)}; seeds {settings.seeds}; "
        f"{settings.max_epochs} epoch{'s' * (settings.max_epochs != 1)}, lr {settings.lr:g}, "
        f"batch {settings.batch_size}, "
        f"max length {settings.max_length}; output {settings.output}",
        flush=True,
    )
    SuiteRun(settings).run()
    output = Path(settings.output)
    print()
    print((output / "results.md").read_text(), end="")
    print(f"\nwrote {output / 'results.json'}, {output / 'results.md'}", flush=True)
