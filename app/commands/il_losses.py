"""``ntng il-losses``: the irreducible loss of every training example of a recipe, for RHO-loss.

The workflow (Mindermann et al. 2022; NTNG):

1. Train the irreducible-loss (IL) model on the holdout split, with the target recipe plus
   ``configs/methods/rho_loss_il_model.yaml`` (an ordinary ``ntng fit``; its cost is not charged to
   the target run, as in the paper and NTNG).
2. ``ntng il-losses --model <IL run>/hf -c <target recipe> -c configs/methods/rho_loss.yaml --output FILE``
   computes the IL model's per-example loss for every *training* example id of the target run,
   masked exactly as the target run will mask it in each epoch (NTNG's table used another mask).
3. The ``RhoLoss`` callback loads FILE and refuses it if its ids or fingerprint differ from the run's.
"""

from __future__ import annotations

import datetime
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.accounting.cost_models import RSTProfile
from app.accounting.planning import PLANNED_UNITS
from app.commands import CommandParser
from app.commands.plan import plan_method, recipe_settings
from app.errors import ConfigurationError
from app.recipe import build_recipe
from callbacks.budget import ReferenceTimeBudget
from callbacks.rho_loss import RhoLoss
from datamodules.pretraining.tokenizer import load_tokenizer, tokenizer_fingerprint
from callbacks.irreducible_losses import IrreducibleLosses, compute_irreducible_losses, describe_uncharged


def uncharged_costs(model_dir: Path, module: Any, profile_path: str | None, examples: int, seq_len: int) -> dict:
    """What RHO-loss does not charge to the target run, for its report.

    Args:
        model_dir: the IL model's HF export; when it is a run's ``hf/``, the run's checkpoints hold
            the clock of its training.
        module: the IL model (for its signature and depth).
        profile_path: the target recipe's RST profile, to price the IL pass (if it fits the IL model).
        examples: forwards of the IL pass (examples x epochs).
        seq_len: tokens per example.

    Returns:
        ``il_model_rst_hours`` (``None`` when no checkpoint with a clock is found) and
        ``il_pass_rst_hours`` (``None`` without a profile for this model).
    """
    costs: dict[str, float | None] = {"il_model_rst_hours": None, "il_pass_rst_hours": None}
    spent = []
    for path in sorted((model_dir.resolve().parent / "checkpoints").glob("*.ckpt")):
        clock = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("reference_clock")
        if clock:
            spent.append(clock["rst_seconds"] / 3600.0)
    if spent:
        costs["il_model_rst_hours"] = max(spent)
    if profile_path is not None:
        profile = RSTProfile.load(profile_path)
        if not profile.check_signature(module.model_signature(), allow_mismatch=True):
            depth = {stack: module.layers.num_layers(stack) for stack in module.layers.stack_names}
            costs["il_pass_rst_hours"] = profile.seconds("forward", examples * seq_len, depth) / 3600.0
    return costs


def planned_candidate_epochs(cli: Any, data: Any) -> tuple[int, str] | None:
    """Masking epochs a RHO-loss run of this recipe will read candidates from, from its budget.

    The budget buys ``updates`` (planned as ``ntng plan`` does, priced by the recipe's ``RhoLoss``,
    or a default one when the recipe has none), each reading ``mega_batch_factor x batch_size``
    candidates; an epoch is the training split. ``None`` when the budget cannot be planned
    (no budget, or a wall-clock or FLOP one).

    Returns:
        ``(epochs, explanation)``.
    """
    trainer = cli.trainer
    rho = next((c for c in trainer.callbacks if isinstance(c, RhoLoss)), None) or RhoLoss()
    budget_callback = next((c for c in trainer.callbacks if isinstance(c, ReferenceTimeBudget)), None)
    if budget_callback is None or (budget_callback.budget is None and (trainer.max_steps or -1) < 1):
        return None  # nothing ends the run: no epochs to plan
    settings, budget, stop_rule = recipe_settings(cli)
    if budget.unit not in PLANNED_UNITS:
        return None
    amount, unit = budget.amount, budget.unit
    updates = plan_method(rho, "rho_loss", settings, budget, stop_rule).result["updates"]
    candidates = updates * settings.batch_size * rho.mega_batch_factor
    epochs = max(1, math.ceil(candidates / len(data.train_example_ids)))
    return epochs, (f"the recipe's budget ({amount:g} {unit}) buys ~{updates:,.0f} RHO-loss updates reading "
                    f"~{candidates:,.0f} candidates from {len(data.train_example_ids):,} training examples")


def main(argv: list[str]) -> None:
    """``ntng il-losses`` entry point."""
    parser = CommandParser(
        prog="ntng il-losses",
        description="Irreducible loss of every training example of a recipe, for RHO-loss.",
        epilog="Unknown arguments (e.g. --data.init_args.num_workers=8) override the recipe.",
    )
    parser.add_argument("--model", required=True, help="the IL model: an HF directory (an IL run's hf/ export)")
    parser.add_argument("-c", "--config", action="append", required=True,
                        help="the *target* run's recipe and overlays (repeatable), e.g. -c recipe.yaml -c configs/methods/rho_loss.yaml")
    parser.add_argument("--output", required=True, help="file to write (.npz)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="masking epochs to cover (default: as many as the recipe's budget will read, else 1); "
                             "a run reading candidates past them reuses epoch e mod N with a warning")
    parser.add_argument("--batch-size", type=int, default=None, help="rows per forward (default: the recipe's eval batch)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args, overrides = parser.parse_known_args(argv)
    if args.epochs is not None and args.epochs < 1:
        raise ConfigurationError(f"ntng il-losses --epochs {args.epochs}: --epochs must be >= 1 (masking epochs to "
                                 "cover); leave it out to cover what the recipe's budget reads")
    if not (Path(args.model) / "config.json").is_file():
        raise ConfigurationError(f"ntng il-losses --model {args.model}: not an HF model directory (no config.json); "
                                 "give the IL run's export, <run>/hf, which `ntng fit` writes when the IL model's "
                                 "run ends")

    cli = build_recipe(args.config, overrides)
    data, trainer = cli.datamodule, cli.trainer
    if getattr(data.hparams, "train_split", "train") != "train":
        raise ConfigurationError(
            "this recipe trains on the holdout split (the IL model's recipe); pass the target run's recipe, "
            "whose training examples need irreducible losses"
        )
    data.prepare_data()
    data.setup("fit")
    model_dir = Path(args.model)
    if (model_dir / "tokenizer.json").is_file() or (model_dir / "vocab.txt").is_file():
        if tokenizer_fingerprint(load_tokenizer(str(model_dir), data.hparams.lowercase, roles=data.objective.tokenizer_roles)) != tokenizer_fingerprint(data.tokenizer):
            raise ConfigurationError(f"the IL model in {model_dir} was trained with another tokenizer than this recipe's data")
    module = type(cli.model)(checkpoint=str(model_dir), vocab_size=data.vocab_size,
                             pad_token_id=data.pad_token_id, seq_len=data.seq_len)
    planned = planned_candidate_epochs(cli, data)
    if planned is not None:
        print(f"ntng il-losses: {planned[1]}: {planned[0]} masking epoch(s)", file=sys.stderr)
    epochs = args.epochs or (planned[0] if planned is not None else 1)
    if planned is not None and epochs < planned[0]:
        print(f"ntng il-losses: warning: --epochs {epochs} covers fewer; later epochs will reuse earlier masks' losses",
              file=sys.stderr)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    module.to(device)
    batch_size = args.batch_size or data.hparams.eval_batch_size or data.hparams.micro_batch_size
    losses = compute_irreducible_losses(
        module, data, epochs, batch_size, trainer.precision_plugin.forward_context,
        report=lambda line: print(line, file=sys.stderr),
    )
    budgets = [callback for callback in trainer.callbacks if isinstance(callback, ReferenceTimeBudget)]
    profile = budgets[0].profile_path if budgets else None
    provenance = {
        "model": str(model_dir), "recipe": [str(path) for path in args.config], "overrides": overrides,
        "precision": str(trainer.precision), "device": str(device), "examples": losses.shape[1], "epochs": epochs,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        **uncharged_costs(model_dir, module, profile, losses.size, data.seq_len),
    }
    IrreducibleLosses(np.asarray(data.train_example_ids), losses, data.example_fingerprint(), provenance).save(args.output)
    print(f"wrote {args.output}: {losses.shape[1]:,} examples x {losses.shape[0]} epoch(s), "
          f"mean irreducible loss {float(losses.mean()):.4f}")
    print(describe_uncharged(provenance))
