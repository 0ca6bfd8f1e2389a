"""``ntng plan``: what a budget buys, from an RST profile alone (no model, no training)."""

from __future__ import annotations

import argparse
import json
import math

from app.accounting.cost_models import RSTProfile
from app.accounting.planning import PLANNERS, PlanSettings, plan
from app.errors import ConfigurationError


def _round(value: float) -> float | int:
    return int(value) if float(value).is_integer() else round(value, 2)


def main(argv: list[str]) -> None:
    """``ntng plan`` entry point."""
    # Import the method modules so their planners register themselves.
    import callbacks  # noqa: F401

    parser = argparse.ArgumentParser(prog="ntng plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", required=True, help="RST profile YAML")
    parser.add_argument("--budget-hours", type=float, required=True, help="RST budget in hours")
    parser.add_argument("--batch-size", type=int, required=True, help="sequences per optimizer update")
    parser.add_argument("--micro-batch-size", type=int, required=True, help="sequences per forward/backward")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the profile's)")
    parser.add_argument("--optimizer", default="AdamW", help="optimizer class name, for per-step costs")
    parser.add_argument("--method", default="baseline", choices=sorted(PLANNERS))
    parser.add_argument("--stop-rule", default="after_crossing", choices=["after_crossing", "before_crossing"])
    parser.add_argument("--format", default="table", choices=["table", "json"])
    for name, (_, options) in sorted(PLANNERS.items()):
        if options is not None:
            options(parser.add_argument_group(f"{name} options"))
    args = parser.parse_args(argv)
    if args.batch_size % args.micro_batch_size:
        raise ConfigurationError("--batch-size must be a multiple of --micro-batch-size")
    profile = RSTProfile.load(args.profile)
    seq_len = args.seq_len or profile.model.get("seq_len")
    if not seq_len:
        raise ConfigurationError(f"profile {profile.name!r} states no seq_len; pass --seq-len")
    settings = PlanSettings(profile, args.batch_size, args.micro_batch_size, int(seq_len), args.optimizer, args)
    result = plan(args.method, settings, args.budget_hours, args.stop_rule)
    counts = {k: _round(result[k]) for k in ("micro_batches", "updates", "tokens")}
    if args.format == "json":
        print(json.dumps({args.method: counts}))
        return
    per_update = result["rst_hours"] * 3600.0 / max(result["updates"], 1)
    print(f"{args.method} on {profile.name}: {args.budget_hours:g} RST hours, batch {args.batch_size} "
          f"= {settings.micro_batches} x {args.micro_batch_size}, seq_len {seq_len}")
    for key, value in counts.items():
        print(f"  {key:<14}{value:>16,}" if isinstance(value, int) else f"  {key:<14}{value:>16,.2f}")
    print(f"  {'s/update':<14}{per_update:>16.4f}")
    if not math.isclose(result["rst_hours"], args.budget_hours, rel_tol=0.05):
        print(f"  note: spends {result['rst_hours']:.4f} RST hours (one update overshoots or undershoots)")
