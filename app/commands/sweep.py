"""``ntng sweep``: methods x budgets x seeds -> pretrain at equal reference time -> export -> fine-tune.

Every cell (method, budget, seed) is a directory ``<output>/cells/<method>/b<budget>/s<seed>/``:
``fit/version_0/`` (the run: TensorBoard log, config, checkpoints, ``hf/`` export, ``curve.jsonl``,
``summary.json``), ``finetune/<suite>/`` (``ntng finetune``'s results), one log per step, and
``cell.json`` (status, settings, the fit's clock summary, paths, the last error). Each step is the
``ntng`` command line ``--dry-run`` prints, run as a subprocess, so a failing cell cannot take the
others down. Run again, the sweep skips finished cells and steps, resumes a killed fit from its
newest checkpoint, and re-runs a failed cell (its earlier errors stay in ``errors.log``). At the end
it writes the report (``ntng report``) and prints where it is.

With ``branch_budgets: true`` and a ``WarmupStableDecay`` LR schedule, the largest budget of each
(method, seed) runs once and saves a checkpoint where each smaller budget's decay starts; each
smaller cell continues from it with its own budget, so it is charged the shared part (its clock
comes from the checkpoint) and is fully decayed at its budget, without re-running the shared part
(Hägele et al. 2024). Everything driven by budget progress (method stages, layer-drop θ, the
warmup) runs on the largest budget's axis until the branch point.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from app.commands import CommandParser
from app.commands.report import main as report_main
from app.commands.sweep_spec import Cell, SweepSpec
from app.errors import ConfigurationError
from app.files import write_text_atomic
from app.model.schedules import WarmupStableDecay
from app.recipe import build_recipe
from app.runs import newest_checkpoint
from callbacks.budget import ReferenceTimeBudget

FIT_DIR = "fit/version_0"


def fit_command(spec: SweepSpec, cell: Cell, root: Path, ckpt_path: str | None = None,
                branch_hours: list[float] | None = None) -> list[str]:
    """The ``ntng fit`` line of a cell (``ckpt_path``: continue a checkpoint; ``branch_hours``: save
    the checkpoints smaller budgets branch from)."""
    directory = cell.directory(root)
    command = ["ntng", "fit", "-c", spec.recipe]
    for overlay in cell.method.overlays:
        command += ["-c", overlay]
    command += [
        # The sweep's cadences first, so the sweep's and the method's overrides can replace them.
        f"--budget.validate_every_fraction={spec.validate_every_fraction:g}",
        f"--budget.checkpoint_every_fraction={spec.checkpoint_every_fraction:g}",
        *spec.overrides, *cell.method.overrides,
        f"--seed_everything={cell.seed}", f"--budget.budget={cell.budget:g}",
        "--trainer.logger.class_path=lightning.pytorch.loggers.TensorBoardLogger",
        f"--trainer.logger.init_args.save_dir={directory}", "--trainer.logger.init_args.name=fit",
        "--trainer.logger.init_args.version=0", "--trainer.logger.init_args.default_hp_metric=false",
        f"--trainer.default_root_dir={directory}",
    ]
    if branch_hours:
        command.append(f"--budget.checkpoint_at_hours=[{','.join(f'{h:g}' for h in branch_hours)}]")
    if ckpt_path is not None:
        command.append(f"--ckpt_path={ckpt_path}")
    return command


def finetune_commands(spec: SweepSpec, cell: Cell, root: Path) -> list[tuple[str, list[str]]]:
    """``(step name, ntng finetune line)`` per suite of the sweep."""
    directory = cell.directory(root)
    steps = []
    for suite in spec.finetune:
        command = ["ntng", "finetune", "--model", str(directory / FIT_DIR / "hf"), "--suite", suite.suite,
                   "--output", str(directory / "finetune" / suite.suite), "--seeds", *map(str, suite.seeds)]
        if suite.tasks:
            command += ["--tasks", ",".join(suite.tasks)]
        if suite.data_dir:
            command += ["--data-dir", suite.data_dir]
        if suite.epochs:
            command += ["--max-epochs", str(suite.epochs)]
        steps.append((f"finetune-{suite.suite}", command + list(suite.args)))
    return steps


def branch_points(spec: SweepSpec, decay_fraction: float) -> dict[float, float]:
    """Smaller budget -> the RST hours where its decay starts (where it branches off the largest)."""
    largest = max(spec.budgets)
    return {b: b * (1.0 - decay_fraction) for b in spec.budgets if b < largest}


def wsd_decay_fraction(spec: SweepSpec) -> float:
    """The decay fraction of the recipe's ``WarmupStableDecay`` schedule (every method's), checked."""
    fractions = set()
    for method in spec.methods:
        cli = build_recipe([spec.recipe, *method.overlays], [*spec.overrides, *method.overrides], planning=True)
        schedule = cli.model.lr_schedule
        if not isinstance(schedule, WarmupStableDecay):
            raise ConfigurationError(f"branch_budgets needs a WarmupStableDecay lr_schedule; method {method.name} "
                                     f"has {type(schedule).__name__}")
        budget = next(c for c in cli.trainer.callbacks if isinstance(c, ReferenceTimeBudget)).budget
        if budget is None or budget.unit != "rst_hours":
            raise ConfigurationError("branch_budgets branches at RST hours: the recipe's budget unit must be rst_hours")
        fractions.add(schedule.decay_fraction)
    if len(fractions) != 1:
        raise ConfigurationError(f"branch_budgets needs one decay_fraction for every method, got {sorted(fractions)}")
    return fractions.pop()


def run_subprocess(command: list[str], log) -> int:
    """Run an ``ntng`` command line on this interpreter, its output into ``log``; returns the exit code."""
    return subprocess.run([sys.executable, "-m", "app.cli", *command[1:]], stdout=log,
                          stderr=subprocess.STDOUT).returncode


class SweepRunner:
    """Runs the cells of a sweep under ``root``, resuming what an earlier call left.

    Args:
        spec: the sweep.
        root: the output directory.
        report: print progress lines with this function.
        execute: runs one step's command line with its output into an open log file and returns the
            exit code (default: a subprocess, so a crash or a leak stays inside its step).
    """

    def __init__(self, spec: SweepSpec, root: Path, report=print, execute=run_subprocess) -> None:
        self.spec, self.root, self.report, self.execute = spec, root, report, execute
        self.branch_hours: dict[float, float] = {}
        if spec.branch_budgets:
            self.branch_hours = branch_points(spec, wsd_decay_fraction(spec))

    # -- what one cell runs -----------------------------------------------------------------------

    def steps(self, cell: Cell) -> list[tuple[str, list[str]]]:
        """The cell's steps as they would run now (``--dry-run`` prints them)."""
        fit_dir = cell.directory(self.root) / FIT_DIR
        ckpt, branch = newest_checkpoint(fit_dir), None
        if cell.budget in self.branch_hours:
            parent = Cell(cell.method, max(self.spec.budgets), cell.seed).directory(self.root) / FIT_DIR
            branch = parent / "checkpoints" / f"at-{self.branch_hours[cell.budget]:g}h.ckpt"
        largest = self.branch_hours and cell.budget == max(self.spec.budgets)
        fit = fit_command(self.spec, cell, self.root, str(ckpt or branch) if (ckpt or branch) else None,
                          sorted(self.branch_hours.values()) if largest else None)
        return [("fit", fit), *finetune_commands(self.spec, cell, self.root)]

    def _done(self, cell: Cell, step: str) -> bool:
        directory = cell.directory(self.root)
        if step == "fit":
            return (directory / FIT_DIR / "summary.json").is_file() and (directory / FIT_DIR / "hf").is_dir()
        return (directory / "finetune" / step.removeprefix("finetune-") / "results.json").is_file()

    def run_cell(self, cell: Cell, position: str) -> bool:
        """Run (or finish) one cell; returns whether it is done."""
        directory = cell.directory(self.root)
        directory.mkdir(parents=True, exist_ok=True)
        state = self._state(cell)
        if state.get("status") == "done":
            self.report(f"ntng sweep: {position} {cell.key}: done, skipped")
            return True
        state.update(status="running", error=None)
        self._save(cell, state)
        for name, command in self.steps(cell):
            if self._done(cell, name):
                continue
            if name == "fit" and cell.budget in self.branch_hours:
                self._inherit_curve(cell, command)
            self.report(f"ntng sweep: {position} {cell.key}: {name} ...")
            started = time.perf_counter()
            code = self._execute(command, directory / f"{name}.log")
            state.setdefault("seconds", {})[name] = round(time.perf_counter() - started, 1)
            if code != 0:
                error = self._failure(cell, name, code)
                state.update(status="failed", error=error)
                self._save(cell, state)
                self.report(f"ntng sweep: {position} {cell.key}: {name} FAILED: {error.splitlines()[0]}")
                return False
            if name == "fit":
                summary = json.loads((directory / FIT_DIR / "summary.json").read_text())
                self.report(f"ntng sweep: {position} {cell.key}: spent {summary['rst_hours']:.4g} RST h "
                            f"({summary['updates']} updates), final val loss {summary['final_val_loss']}")
        state.update(status="done", fit=self._summary(cell))
        self._save(cell, state)
        return True

    def _execute(self, command: list[str], log: Path) -> int:
        with open(log, "a") as handle:
            handle.write(f"\n$ {shlex.join(command)}\n")
            handle.flush()
            return self.execute(command, handle)

    def _failure(self, cell: Cell, step: str, code: int) -> str:
        lines = (cell.directory(self.root) / f"{step}.log").read_text().splitlines()
        errors = [line for line in lines if line.startswith("ntng: error:")]
        error = errors[-1] if errors else f"{step} exited with code {code}; last lines:\n" + "\n".join(lines[-15:])
        with open(cell.directory(self.root) / "errors.log", "a") as handle:
            handle.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {step} (exit {code})\n{error}\n")
        return error

    def _inherit_curve(self, cell: Cell, command: list[str]) -> None:
        """A branched cell's curve starts with the largest run's rows up to the branch checkpoint."""
        ckpt = next((a.split("=", 1)[1] for a in command if a.startswith("--ckpt_path=")), None)
        target = cell.directory(self.root) / FIT_DIR / "curve.jsonl"
        if ckpt is None or "/at-" not in ckpt or target.is_file():
            return  # a branched cell resuming its own checkpoint already has its curve
        step = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)["global_step"]
        source = Path(ckpt).parents[1] / "curve.jsonl"
        rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
        target.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(target, "".join(json.dumps(r) + "\n" for r in rows if r["updates"] <= step))

    # -- cell.json ------------------------------------------------------------------------------------

    def _state(self, cell: Cell) -> dict[str, Any]:
        path = cell.directory(self.root) / "cell.json"
        state = json.loads(path.read_text()) if path.is_file() else {}
        branched = None
        if cell.budget in self.branch_hours:
            branched = {"budget": max(self.spec.budgets), "rst_hours": self.branch_hours[cell.budget]}
        state.update(method=cell.method.name, budget=cell.budget, seed=cell.seed, branched_from=branched,
                     fit_dir=FIT_DIR, overlays=list(cell.method.overlays), overrides=list(cell.method.overrides),
                     recipe=self.spec.recipe, sweep=self.spec.source,
                     finetune={s.suite: f"finetune/{s.suite}/results.json" for s in self.spec.finetune})
        state.setdefault("status", "pending")
        return state

    def _summary(self, cell: Cell) -> dict[str, Any]:
        summary = json.loads((cell.directory(self.root) / FIT_DIR / "summary.json").read_text())
        return {key: summary.get(key) for key in ("rst_hours", "updates", "tokens_trained", "wall_seconds",
                                                  "final_val_loss", "unit")}

    def _save(self, cell: Cell, state: dict[str, Any]) -> None:
        if "unit" not in state and (fit := state.get("fit")):
            state["unit"] = fit.get("unit")
        write_text_atomic(cell.directory(self.root) / "cell.json", json.dumps(state, indent=2) + "\n")

    # -- the sweep --------------------------------------------------------------------------------

    def run(self, units: list[int] | None = None) -> tuple[int, int]:
        """Run the given units (all by default); returns (done, failed) cells."""
        chosen = self.spec.units()
        indices = range(len(chosen)) if units is None else units
        total = sum(len(chosen[i]) for i in indices)
        done = failed = position = 0
        for index in indices:
            for cell in chosen[index]:
                position += 1
                if self.run_cell(cell, f"[{position}/{total}]"):
                    done += 1
                else:
                    failed += 1
                    if self.spec.branch_budgets and cell.budget == max(self.spec.budgets):
                        self.report(f"ntng sweep: the cells branched from {cell.key} wait for it")
                        failed += len(chosen[index]) - 1
                        position += len(chosen[index]) - 1
                        break
        return done, failed


def slurm_script(spec: SweepSpec, root: Path) -> str:
    """A job-array script: one array task per unit (a cell, or a branched chain of cells)."""
    count = len(spec.units())
    sweep = shlex.quote(str(Path(spec.source).resolve()))
    out = shlex.quote(str(root.resolve()))
    return f"""#!/bin/bash
# ntng sweep {spec.name}: {len(spec.cells)} cells in {count} array tasks. Submit with: sbatch {root}/sweep.slurm
# Then, when every task has ended:  ntng report {root}
# Resources are yours to set: one task trains one cell (or one chain of branched cells); several GPUs
# inside a cell come from the recipe's trainer.devices / trainer.strategy (Lightning's own strategies).
#SBATCH --job-name=ntng-{spec.name}
#SBATCH --array=0-{count - 1}
#SBATCH --output={out}/slurm/%A_%a.log
#SBATCH --requeue
##SBATCH --gres=gpu:1
##SBATCH --time=30:00:00
set -euo pipefail
cd {shlex.quote(str(Path.cwd()))}
# A requeued or re-submitted task resumes its cell from the newest checkpoint.
ntng sweep -c {sweep} --output {out} --unit "$SLURM_ARRAY_TASK_ID" --no-report
"""


def main(argv: list[str]) -> None:
    """``ntng sweep`` entry point."""
    parser = CommandParser(prog="ntng sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--config", required=True, help="sweep file (configs/sweeps/*.yaml)")
    parser.add_argument("--output", default=None, help="sweep directory (default: runs/sweeps/<name>)")
    parser.add_argument("--dry-run", action="store_true", help="print every step's ntng command line, run nothing")
    parser.add_argument("--emit", choices=["slurm"], default=None, help="write a job-array script instead of running")
    parser.add_argument("--unit", type=int, action="append", default=None,
                        help="run only this unit (a SLURM array index; repeatable)")
    parser.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    args = parser.parse_args(argv)
    spec = SweepSpec.load(args.config)
    root = Path(args.output or Path("runs") / "sweeps" / spec.name)
    units = spec.units()
    if args.unit and not all(0 <= u < len(units) for u in args.unit):
        raise ConfigurationError(f"--unit must be in 0..{len(units) - 1}, got {args.unit}")
    if args.emit == "slurm":
        (root / "slurm").mkdir(parents=True, exist_ok=True)  # SLURM does not create --output's directory
        write_text_atomic(root / "sweep.slurm", slurm_script(spec, root))
        print(f"wrote {root / 'sweep.slurm'}: {len(units)} array tasks for {len(spec.cells)} cells")
        return
    runner = SweepRunner(spec, root)
    if args.dry_run:
        for index, unit in enumerate(units):
            for cell in unit:
                print(f"# unit {index}: {cell.key}")
                for _, command in runner.steps(cell):
                    print(shlex.join(command))
        return
    done, failed = runner.run(args.unit)
    print(f"ntng sweep: {done} cell(s) done, {failed} failed, in {root}")
    if runner.branch_hours:
        saved = sum(runner.branch_hours[c.budget] for c in spec.cells if c.budget in runner.branch_hours)
        print(f"ntng sweep: branching saved {saved:.4g} RST hours of shared training")
    if not args.no_report:
        report_main([str(root)])
    if failed:
        sys.exit(1)
