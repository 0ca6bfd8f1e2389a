"""What ``ntng finetune`` takes: its flags, each suite's defaults (NTNG's), and the checked settings."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.commands import CommandParser
from app.errors import ConfigurationError
from app.modules.finetuner import SUITE_LEARNING_RATES, load_config
from app.shipped import shipped_path
from datamodules.tasks.datamodule import is_text_to_text
from datamodules.tasks.hub import HUB
from datamodules.tasks.registry import get_task, suite_tasks

# NTNG's fine-tuning epochs per suite (cramming GLUE_sane: 5; NTNG SuperGLUE: 10; nanoT5 SNI: 2).
SUITE_EPOCHS = {"glue": 5, "superglue": 10, "sni": 2}
SUITE_BATCH_SIZES = {"glue": 16, "superglue": 16, "sni": 8}
# Input tokens: NTNG's BERT 128, T5's fine-tuning 512, nanoT5's SNI sources 1,024.
DEFAULT_MAX_LENGTH, TEXT_TO_TEXT_MAX_LENGTH, SNI_MAX_LENGTH = 128, 512, 1024
_SANE_ADAMW = {"name": "AdamW", "betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": 0.0,
               "schedule": "cosine", "warmup_fraction": 0.1, "gradient_clipping": None}
# nanoT5's SNI fine-tuning: transformers' AdamW defaults, constant LR, no warmup.
SUITE_OPTIMIZERS = {"glue": _SANE_ADAMW, "superglue": _SANE_ADAMW,
                    "sni": dict(_SANE_ADAMW, betas=[0.9, 0.999], schedule="constant", warmup_fraction=0.0)}


@dataclass
class FinetuneSettings:
    """Resolved settings of one ``ntng finetune`` call (written into ``results.json``)."""

    model: str
    suite: str
    tasks: list[str]
    seeds: list[int]
    data_dir: str
    output: str
    max_epochs: int
    lr: float
    batch_size: int
    max_length: int
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    precision: str = "32-true"
    accelerator: str = "auto"
    num_workers: int = 0
    text_to_text: bool = False
    optimizer: dict[str, Any] = field(default_factory=lambda: dict(_SANE_ADAMW))


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="ntng finetune",
                           description="fine-tune a pretrained checkpoint on every task of GLUE, SuperGLUE or SNI")
    parser.add_argument("--model", required=True,
                        help="HF-format checkpoint directory (with its tokenizer); T5 is fine-tuned text-to-text")
    parser.add_argument("--suite", required=True, choices=sorted(SUITE_EPOCHS),
                        help="glue, superglue, or sni (Super-Natural-Instructions; T5 checkpoints only)")
    parser.add_argument("--tasks", nargs="+", default=None,
                        help="task names, comma- or space-separated (default: every task of the suite)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="fine-tuning seeds (default: 0)")
    parser.add_argument("--data-dir", default=None,
                        help="suite data directory (default: data/<suite>), or 'hub' to read every task from "
                             "its Hugging Face hub dataset (a local directory named hub: ./hub); sni: the "
                             "natural-instructions repository or a directory of task JSON files")
    parser.add_argument("--output", default=None, help="output directory (default: <model>/finetune-<suite>)")
    parser.add_argument("--max-epochs", type=int, default=None, help="epochs (default: GLUE 5, SuperGLUE 10, SNI 2)")
    parser.add_argument("--lr", type=float, default=None,
                        help="peak learning rate (default: GLUE 4e-5, SuperGLUE 5e-5, SNI 5e-5)")
    parser.add_argument("--batch-size", type=int, default=None, help="batch size (default: 16; SNI 8)")
    parser.add_argument("--max-length", type=int, default=None,
                        help="tokens per input, special tokens included (default: 128; T5 512; SNI 1024)")
    parser.add_argument("--max-train-examples", type=int, default=None, help="train on the first N examples")
    parser.add_argument("--max-eval-examples", type=int, default=None,
                        help="evaluate/predict the first N examples of every dev, test and diagnostic split")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed", "16-mixed"])
    parser.add_argument("--accelerator", default="auto", help="Lightning accelerator (one device is used)")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    return parser


def _data_dir(value: str) -> str:
    """``hub`` as given; a path expanded (a local ``./hub`` keeps its ``./`` so it is not the hub)."""
    if value == HUB:
        return HUB
    path = str(shipped_path(value))  # the working directory's, else the shipped samples
    return os.path.join(os.curdir, path) if path == HUB else path


def resolve_settings(args: argparse.Namespace) -> FinetuneSettings:
    """Defaults filled in and checked (unknown tasks raise ``ConfigurationError`` listing the known)."""
    if args.tasks is None:
        names = [spec.name for spec in suite_tasks(args.suite)]
    else:
        names = [name.strip().lower() for item in args.tasks for name in item.split(",") if name.strip()]
    if not names:
        raise ConfigurationError(f"no {args.suite} tasks registered or selected")
    for name in names:
        get_task(args.suite, name)
    if args.num_workers < 0:
        raise ConfigurationError(f"--num-workers must not be negative, not {args.num_workers}")
    for flag in ("batch_size", "max_length", "max_epochs", "max_train_examples", "max_eval_examples"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ConfigurationError(f"--{flag.replace('_', '-')} must be at least 1, not {value}")
    model = Path(args.model).expanduser()
    if not (model / "config.json").is_file():
        raise ConfigurationError(f"--model {model}: not a model directory (no config.json); pass an HF-format "
                                 "checkpoint, e.g. a pretraining run's hf/ export")
    text_to_text = is_text_to_text(load_config(model))
    if args.suite == "sni" and not text_to_text:
        raise ConfigurationError(
            f"--suite sni fine-tunes text-to-text: {model} is not an encoder-decoder (T5) checkpoint")
    max_length = args.max_length or (SNI_MAX_LENGTH if args.suite == "sni" else
                                     TEXT_TO_TEXT_MAX_LENGTH if text_to_text else DEFAULT_MAX_LENGTH)
    return FinetuneSettings(
        model=str(model),
        suite=args.suite,
        tasks=list(dict.fromkeys(names)),
        seeds=list(dict.fromkeys(args.seeds)),
        data_dir=_data_dir(args.data_dir or f"data/{args.suite}"),
        output=str(Path(args.output).expanduser() if args.output else model / f"finetune-{args.suite}"),
        max_epochs=args.max_epochs or SUITE_EPOCHS[args.suite],
        lr=args.lr if args.lr is not None else SUITE_LEARNING_RATES[args.suite],
        batch_size=args.batch_size or SUITE_BATCH_SIZES[args.suite],
        max_length=max_length,
        max_train_examples=args.max_train_examples,
        max_eval_examples=args.max_eval_examples,
        precision=args.precision,
        accelerator=args.accelerator,
        num_workers=args.num_workers,
        text_to_text=text_to_text,
        optimizer=dict(SUITE_OPTIMIZERS[args.suite]),
    )
