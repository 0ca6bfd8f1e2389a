"""Budget branches vs independent runs: what branching smaller budgets' cooldowns from the largest
budget's run saves in RST, and what it changes in final validation loss.

Runs the quickstart recipe with a warmup-stable-decay schedule (10 % warmup, 20 % decay) through
``ntng sweep`` twice, side by side in one process: once with ``branch_budgets: true`` and once with
every budget trained on its own. Prints, per budget, both final validation losses and the RST each
way spent; the last line is ``ratio: <RST of the branched sweep / RST of the independent sweep>``.

    python benchmarks/budget_branches.py                      # budgets 0.004 and 0.008 h, seed 0
    python benchmarks/budget_branches.py --budgets 0.01 0.02 0.04 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import yaml

from app.commands.sweep import SweepRunner
from app.commands.sweep_spec import SweepSpec

WSD = ('--model.init_args.lr_schedule={"class_path": "app.model.schedules.WarmupStableDecay", '
       '"init_args": {"warmup_fraction": 0.1, "decay_fraction": 0.2}}')


def sweep(workdir: Path, budgets: list[float], seeds: list[int], branch: bool) -> dict[tuple[float, int], dict]:
    """Run one sweep; returns each cell's ``summary.json`` by (budget, seed)."""
    path = workdir / f"sweep-{'branched' if branch else 'independent'}.yaml"
    path.write_text(yaml.safe_dump({
        "name": path.stem, "recipe": "configs/quickstart.yaml", "budgets": budgets, "seeds": seeds,
        "overrides": [WSD, "--trainer.limit_val_batches=4", "--trainer.enable_progress_bar=false"],
        "methods": {"baseline": {}}, "validate_every_fraction": 0.25, "branch_budgets": branch,
    }))
    root = workdir / path.stem
    done, failed = SweepRunner(SweepSpec.load(path), root).run()
    if failed:
        raise SystemExit(f"{failed} cell(s) failed; see {root}/cells/*/*/*/fit.log")
    return {(b, s): json.loads((root / f"cells/baseline/b{b:g}/s{s}/fit/version_0/summary.json").read_text())
            for b in budgets for s in seeds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.004, 0.008])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        branched = sweep(Path(workdir), args.budgets, args.seeds, branch=True)
        independent = sweep(Path(workdir), args.budgets, args.seeds, branch=False)
    largest = max(args.budgets)
    # A branched cell re-uses the largest run's shared part: only its cooldown is new RST.
    spent_branched = sum(v["rst_hours"] - (0.8 * b if b < largest else 0.0) for (b, _), v in branched.items())
    spent_independent = sum(v["rst_hours"] for v in independent.values())
    print(f"\n{'budget':>8} {'seed':>4} {'val loss branched':>18} {'val loss independent':>21} {'updates b/i':>12}")
    for (budget, seed), summary in sorted(branched.items()):
        other = independent[(budget, seed)]
        print(f"{budget:>8g} {seed:>4} {summary['final_val_loss']:>18.4f} {other['final_val_loss']:>21.4f} "
              f"{summary['updates']:>5}/{other['updates']:<6}")
    print(f"RST spent: branched {spent_branched:.5f} h, independent {spent_independent:.5f} h, "
          f"saved {spent_independent - spent_branched:.5f} h")
    print(f"ratio: {spent_branched / spent_independent:.4f}")


if __name__ == "__main__":
    main()
