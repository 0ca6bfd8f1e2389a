"""Comparing the cells of a sweep: NTNG's Table 1, the difference from the baseline and the time to
the baseline's loss, as plain data (``app.commands.report`` reads the cells and renders the tables).

Pure functions over ``Cell`` records, no I/O. Conventions:
    * mean ± std is over pretraining seeds, std the sample std (ddof=1), no std with one seed;
    * a cell's downstream score is the mean over its fine-tuning seeds (``results.json`` holds it);
    * an NTNG average with a missing component in any seed is not averaged: its row lists what is
      missing. The partial "mean of tasks run" averages each task's headline metric (its first) over
      the tasks that were run, and over the seeds that have it, so short runs still show a number;
    * differences pair pretraining seeds (method seed s - baseline seed s, seeds both have) and get
      a bootstrap percentile CI over the paired differences;
    * time to target is AlgoPerf's time-to-result: the RST at which the validation curve first
      reaches the baseline's final validation loss at the same budget and seed; speed-up is the
      baseline's time to it over the method's.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

BASELINE = "baseline"
PARTIAL = "mean_of_tasks_run"
# The NTNG average of each suite: the downstream columns of Table 1.
NTNG_AVERAGES = {"glue": "ntng_glue", "superglue": "ntng_superglue"}
# Suites scored by one metric of one task (NTNG's T5 downstream: Rouge-L on Super-Natural-Instructions).
SINGLE_SCORES = {"sni": ("sni", "rouge_l", "sni_rouge_l")}


@dataclass(frozen=True)
class Score:
    """One cell's downstream score.

    Attributes:
        value: the mean over fine-tuning seeds; NaN when a component was NaN; None when components
            are missing.
        missing: the missing components (``"task/metric"``, as ``results.json`` lists them).
        components: how many numbers the score averages (tasks, for the partial mean).
        tasks: for the partial mean, the ``"suite/task"`` keys it averages.
    """

    value: float | None
    missing: tuple[str, ...] = ()
    components: int = 0
    tasks: tuple[str, ...] = ()


@dataclass(frozen=True)
class Cell:
    """One pretraining run of a sweep and what it produced.

    Attributes:
        method, budget, seed, status, unit, error, branched_from: as in its ``cell.json``.
        summary: the fit's ``summary.json`` (empty when the cell is not done).
        val_curve: ``(rst_hours, loss)`` of each validation, in RST order.
        train_rows: the ``"train"`` rows of ``curve.jsonl`` (``rst_hours``, ``lr_multiplier``, ``depth``).
        scores: ``downstream_scores`` of its fine-tuning results; a suite without results is absent.
        missing_results: suites whose results file ``cell.json`` names but that does not exist.
    """

    method: str
    budget: float
    seed: int
    status: str
    unit: str = "rst_hours"
    error: str | None = None
    branched_from: dict | None = None
    summary: dict = field(default_factory=dict)
    val_curve: tuple[tuple[float, float], ...] = ()
    train_rows: tuple[dict, ...] = ()
    scores: dict[str, Score] = field(default_factory=dict)
    missing_results: tuple[str, ...] = ()

    @property
    def final_val_loss(self) -> float | None:
        """The loss of the run's last validation (None when none ran)."""
        loss = self.summary.get("final_val_loss")
        return None if loss is None else float(loss)


# ------------------------------------------------------------------------------------ statistics
def mean_std(values: Iterable[float]) -> dict[str, Any]:
    """``{"mean", "std", "n"}``: the sample std (ddof=1), None with fewer than two values."""
    values = [float(v) for v in values]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    std = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return {"mean": float(np.mean(values)), "std": std, "n": len(values)}


def bootstrap_ci(values: Sequence[float], confidence: float = 0.95, resamples: int = 10_000,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean: resample ``values`` with replacement.

    Args:
        values: the sample (here: paired differences, one per pretraining seed).
        confidence: the interval's coverage.
        resamples: bootstrap resamples.
        seed: for ``numpy.random.default_rng``, so a report is reproducible.

    Returns:
        ``(low, high)``; ``(v, v)`` for a single value (the CI is undefined there; callers say n=1).

    Raises:
        ValueError: for an empty sample.
    """
    sample = np.asarray(values, dtype=float)
    if sample.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    rng = np.random.default_rng(seed)
    means = sample[rng.integers(0, sample.size, size=(resamples, sample.size))].mean(axis=1)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def time_to_target(rst_hours: Sequence[float], losses: Sequence[float], target: float) -> float | None:
    """The RST at which a validation curve first reaches ``target`` (loss <= target).

    Args:
        rst_hours: the validations' RST, ascending.
        losses: their losses; NaN points are skipped (nothing is known about them).
        target: the loss to reach.

    Returns:
        The time, linearly interpolated between the last point above the target and the first at or
        below it; the first point's time if it is already at or below; None if never reached.
    """
    if len(rst_hours) != len(losses):
        raise ValueError(f"{len(rst_hours)} times for {len(losses)} losses")
    points = [(float(t), float(loss)) for t, loss in zip(rst_hours, losses) if math.isfinite(loss)]
    for index, (time, loss) in enumerate(points):
        if loss <= target:
            if index == 0:
                return time
            previous_time, previous_loss = points[index - 1]
            return previous_time + (time - previous_time) * (previous_loss - target) / (previous_loss - loss)
    return None


def paired_differences(method: dict[int, float], baseline: dict[int, float]) -> dict[int, float]:
    """``method[s] - baseline[s]`` for every seed ``s`` both have, in seed order."""
    return {seed: method[seed] - baseline[seed] for seed in sorted(method.keys() & baseline.keys())}


def mean_curve(curves: Sequence[Sequence[tuple[float, float]]], points: int = 50) -> dict[str, Any] | None:
    """Seeds' ``(rst_hours, loss)`` curves on one RST grid inside the range every curve covers.

    Returns:
        ``{"rst_hours", "mean", "min", "max"}`` arrays and ``"seeds"``; None without overlap.
    """
    curves = [curve for curve in curves if curve]
    if not curves:
        return None
    start, end = max(c[0][0] for c in curves), min(c[-1][0] for c in curves)
    if end < start:
        return None
    grid = np.linspace(start, end, points) if end > start else np.array([start])
    stacked = np.array([np.interp(grid, [t for t, _ in c], [loss for _, loss in c]) for c in curves])
    return {"rst_hours": grid, "mean": stacked.mean(axis=0), "min": stacked.min(axis=0),
            "max": stacked.max(axis=0), "seeds": len(curves)}


# ------------------------------------------------------------------------------- downstream scores
def headline(value: Any) -> float:
    """A metric of ``results.json``: the float, or the mean over fine-tuning seeds; NaN for null."""
    if isinstance(value, dict):
        value = value.get("mean")
    return math.nan if value is None else float(value)


def downstream_scores(results: dict[str, dict], epoch: str = "final") -> dict[str, Score]:
    """A cell's downstream scores from its ``results.json`` documents.

    Args:
        results: suite -> its ``results_document``.
        epoch: ``"final"`` (last epoch) or ``"best"`` (NTNG's per-metric best epoch, optimistic).

    Returns:
        The NTNG average of every suite present and ``PARTIAL`` (the mean of each task's headline
        metric over every task run; NaN propagates as in ``metrics``).
    """
    scores: dict[str, Score] = {}
    headlines: dict[str, float] = {}
    for suite, document in sorted(results.items()):
        section = document if epoch == "final" else document["best_epoch"]
        for task, metrics in section["tasks"].items():
            if metrics:
                headlines[f"{suite}/{task}"] = headline(next(iter(metrics.values())))
        if suite in SINGLE_SCORES:
            task, metric, name = SINGLE_SCORES[suite]
            value = section["tasks"].get(task, {}).get(metric)
            scores[name] = Score(None if value is None else headline(value), () if value is not None
                                 else (f"{task}/{metric}",), 1)
        average = section.get("averages", {}).get(NTNG_AVERAGES.get(suite, ""))
        if average is not None:
            # A null value with nothing missing is a NaN component (metrics' convention).
            value = None if average["missing"] else headline(average["value"])
            scores[NTNG_AVERAGES[suite]] = Score(value, tuple(average["missing"]), len(average["components"]))
    if headlines:
        tasks = tuple(sorted(headlines))
        scores[PARTIAL] = Score(float(np.mean([headlines[t] for t in tasks])), components=len(tasks), tasks=tasks)
    return scores


# ----------------------------------------------------------------------------------------- tables
def method_order(method: str) -> tuple[bool, str]:
    """Sort key: the baseline first, then the methods alphabetically."""
    return method != BASELINE, method


def groups(cells: Iterable[Cell]) -> dict[tuple[str, float], list[Cell]]:
    """Cells by ``(method, budget)``: budgets ascending, within one the baseline first; seeds ascending."""
    grouped: dict[tuple[str, float], list[Cell]] = {}
    for cell in cells:
        grouped.setdefault((cell.method, cell.budget), []).append(cell)
    order = sorted(grouped, key=lambda key: (key[1], method_order(key[0])))
    return {key: sorted(grouped[key], key=lambda c: c.seed) for key in order}


def _done(cells: Iterable[Cell]) -> list[Cell]:
    return [cell for cell in cells if cell.status == "done"]


def _aggregate_score(name: str, done: list[Cell]) -> dict[str, Any]:
    """A Table 1 entry: mean ± std over seeds, or the missing components when any seed lacks one."""
    present = {cell.seed: cell.scores[name] for cell in done if name in cell.scores}
    not_fine_tuned = [cell.seed for cell in done if name not in cell.scores]
    incomplete = [seed for seed, score in present.items() if score.value is None]
    missing = list(dict.fromkeys(m for score in present.values() for m in score.missing))
    entry = {"missing": missing, "components": max((s.components for s in present.values()), default=0),
             "seeds_not_fine_tuned": not_fine_tuned, "seeds_incomplete": incomplete}
    if name == PARTIAL:  # partial by design: over the seeds that have results
        values = [score.value for score in present.values()]
        entry["tasks"] = sorted({score.components for score in present.values()})
    else:
        values = [] if not_fine_tuned or incomplete else [score.value for score in present.values()]
    return mean_std(values) | entry


def table_rows(cells: Iterable[Cell], averages: Sequence[str]) -> list[dict[str, Any]]:
    """NTNG's Table 1: one row per method x budget over its done cells.

    Args:
        cells: every cell of the sweep (cells not done count in ``cells``, not in the statistics).
        averages: the downstream columns (NTNG averages and ``PARTIAL``).

    Returns:
        Rows with ``final_val_loss`` and each average as ``mean_std`` (plus missing components), the
        means of ``updates``, ``tokens_trained``, ``rst_hours`` and ``wall_seconds``, and the
        branched cells.
    """
    rows = []
    for (method, budget), group in groups(cells).items():
        done = _done(group)
        losses = [c.final_val_loss for c in done if c.final_val_loss is not None]
        row: dict[str, Any] = {"method": method, "budget": budget, "unit": group[0].unit, "n": len(done),
                               "cells": len(group), "seeds": [c.seed for c in done],
                               "final_val_loss": mean_std(losses)}
        for key in ("updates", "tokens_trained", "rst_hours", "wall_seconds"):
            row[key] = mean_std(c.summary[key] for c in done if c.summary.get(key) is not None)["mean"]
        row["downstream"] = {name: _aggregate_score(name, done) for name in averages}
        row["branched"] = [{"seed": c.seed, **c.branched_from} for c in done if c.branched_from]
        rows.append(row)
    return rows


def _seed_values(cells: Iterable[Cell], key: str) -> dict[int, float]:
    """Finite per-seed values of ``final_val_loss`` or of a downstream score."""
    values = {}
    for cell in _done(cells):
        value = cell.final_val_loss if key == "final_val_loss" else getattr(cell.scores.get(key), "value", None)
        if value is not None and math.isfinite(value):
            values[cell.seed] = value
    return values


def _partial_tasks(cells: Iterable[Cell]) -> dict[int, tuple[str, ...]]:
    return {cell.seed: cell.scores[PARTIAL].tasks for cell in _done(cells) if PARTIAL in cell.scores}


def _difference(method: dict[int, float], baseline: dict[int, float]) -> dict[str, Any]:
    differences = paired_differences(method, baseline)
    values = list(differences.values())
    ci = bootstrap_ci(values) if len(values) > 1 else None
    return {"mean": float(np.mean(values)) if values else None, "ci": ci, "n": len(values),
            "seeds": list(differences), "excludes_zero": ci is not None and (ci[0] > 0 or ci[1] < 0)}


def difference_rows(cells: Iterable[Cell], averages: Sequence[str]) -> list[dict[str, Any]]:
    """Each method minus the baseline at the same budget, paired by pretraining seed.

    The partial mean pairs only seeds whose task sets are equal (else it compares other tasks).

    Returns:
        Per method x budget: ``baseline`` (whether it has done cells there) and, for
        ``final_val_loss`` and each average, ``{"mean", "ci", "n", "seeds", "excludes_zero"}``.
    """
    grouped = groups(cells)
    rows = []
    for (method, budget), group in grouped.items():
        if method == BASELINE:
            continue
        baseline = grouped.get((BASELINE, budget), [])
        row: dict[str, Any] = {"method": method, "budget": budget, "unit": group[0].unit,
                               "baseline": bool(_done(baseline))}
        for key in ("final_val_loss", *averages):
            ours, theirs = _seed_values(group, key), _seed_values(baseline, key)
            if key == PARTIAL:
                our_tasks, their_tasks = _partial_tasks(group), _partial_tasks(baseline)
                ours = {seed: v for seed, v in ours.items() if our_tasks[seed] == their_tasks.get(seed)}
            row[key] = _difference(ours, theirs)
        rows.append(row)
    return rows


def _curve_time(cell: Cell, target: float) -> float | None:
    return time_to_target([t for t, _ in cell.val_curve], [loss for _, loss in cell.val_curve], target)


def time_to_target_rows(cells: Iterable[Cell]) -> list[dict[str, Any]]:
    """Time to the baseline's final validation loss, per method x budget (the baseline included).

    The target of seed s is the baseline's final loss at the budget and seed s, or the mean over
    the baseline's seeds when it lacks s. Speed-up is the baseline's time to that target over the
    method's (AlgoPerf's ratio): a run stops at the first update past its budget, so the baseline
    reaches its final loss a little after the budget, and the budget itself would rate the baseline
    below 1. The baseline's speed-up is 1 by construction; unpaired seeds use its mean time.

    Returns:
        Rows with ``per_seed`` (``seed``, ``target``, ``target_from``, ``time_to_target_rst_hours``,
        ``baseline_rst_hours``, ``speed_up``), ``reached``, ``n`` (seeds with a target) and the means
        over the seeds that reached the target.
    """
    grouped = groups(cells)
    rows = []
    for (method, budget), group in grouped.items():
        baseline = {c.seed: c for c in _done(grouped.get((BASELINE, budget), [])) if c.final_val_loss is not None
                    and math.isfinite(c.final_val_loss)}
        targets = {seed: cell.final_val_loss for seed, cell in baseline.items()}
        references = {seed: _curve_time(cell, targets[seed]) for seed, cell in baseline.items()}
        references = {seed: time for seed, time in references.items() if time is not None}
        per_seed = []
        for cell in _done(group):
            paired = cell.seed in targets
            target = targets[cell.seed] if paired else mean_std(targets.values())["mean"]
            if target is None:
                continue
            time = _curve_time(cell, target)
            reference = references.get(cell.seed) if paired else mean_std(references.values())["mean"]
            speed_up = None
            if time is not None and reference is not None:
                speed_up = reference / time if time > 0 else math.inf
            per_seed.append({"seed": cell.seed, "target": target,
                             "target_from": f"seed {cell.seed}" if paired else "baseline mean",
                             "time_to_target_rst_hours": time, "baseline_rst_hours": reference,
                             "speed_up": speed_up})
        reached = [p for p in per_seed if p["time_to_target_rst_hours"] is not None]
        rows.append({"method": method, "budget": budget, "unit": group[0].unit, "per_seed": per_seed,
                     "reached": len(reached), "n": len(per_seed),
                     "mean_time_to_target_rst_hours": mean_std(p["time_to_target_rst_hours"] for p in reached)["mean"],
                     "mean_speed_up": mean_std(p["speed_up"] for p in reached if p["speed_up"] is not None)["mean"]})
    return rows


def missing_cells(cells: Iterable[Cell]) -> list[tuple[str, float, int]]:
    """The ``(method, budget, seed)`` of the sweep's grid (every method x budget x seed seen) with no cell."""
    cells = list(cells)
    have = {(c.method, c.budget, c.seed) for c in cells}
    methods = sorted({c.method for c in cells}, key=method_order)
    return [(m, b, s) for b in sorted({c.budget for c in cells}) for m in methods
            for s in sorted({c.seed for c in cells}) if (m, b, s) not in have]
