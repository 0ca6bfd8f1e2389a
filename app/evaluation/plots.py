"""The report's figures: each function draws one PNG from data that ``comparison`` computed and
returns its path.

Figures are built as ``matplotlib.figure.Figure`` on an Agg canvas, not through ``pyplot``: no GUI
backend, no global figure state, nothing to close. A method keeps its colour in every figure
(its place in the baseline-first method order).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from app.evaluation.comparison import method_order
from app.files import atomic_path

_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf"]


def _palette(methods: Sequence[str]) -> dict[str, str]:
    ordered = sorted(set(methods), key=method_order)
    return {method: _COLORS[i % len(_COLORS)] for i, method in enumerate(ordered)}


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    with atomic_path(path) as staging:
        figure.savefig(staging, dpi=110, format=path.suffix.lstrip(".") or "png")
    return path


def _panels(count: int, width: float = 4.2, height: float = 3.4) -> tuple[Figure, list]:
    figure = Figure(figsize=(width * count, height), layout="constrained")
    return figure, list(figure.subplots(1, count, squeeze=False)[0])


def validation_loss(curves: dict[float, dict[str, dict[str, Any]]], path: str | Path) -> Path:
    """Validation loss vs RST hours: one panel per budget, a method's mean over seeds with a min-max band.

    Args:
        curves: ``curves[budget][method]`` = ``comparison.mean_curve`` of its seeds.
        path: the PNG to write.
    """
    colors = _palette([m for by_method in curves.values() for m in by_method])
    budgets = sorted(curves)
    figure, axes = _panels(len(budgets))
    for ax, budget in zip(axes, budgets):
        for method in sorted(curves[budget], key=method_order):
            curve = curves[budget][method]
            label = f"{method} ({curve['seeds']} seed{'s' * (curve['seeds'] != 1)})"
            ax.plot(curve["rst_hours"], curve["mean"], color=colors[method], label=label)
            if curve["seeds"] > 1:
                ax.fill_between(curve["rst_hours"], curve["min"], curve["max"], color=colors[method], alpha=0.2)
        ax.set(title=f"budget {budget:g} RST h", xlabel="RST hours", ylabel="validation loss")
        ax.locator_params(axis="x", nbins=5)
        ax.legend(fontsize="small")
    return _save(figure, path)


def _grouped_bars(ax, budgets: Sequence[float], methods: Sequence[str], colors: dict[str, str],
                  bars: dict[tuple[str, float], tuple[float | None, float | None, str]]) -> None:
    """Bars per budget, one per method; a None height is drawn as an empty hatched bar with its label."""
    width = 0.8 / len(methods)
    tops = [h + (e or 0) for h, e, _ in bars.values() if h is not None]
    empty_height = 0.15 * max(tops, default=1.0)
    for i, method in enumerate(methods):
        legend_label = method  # once per method
        for j, budget in enumerate(budgets):
            if (method, budget) not in bars:
                continue
            height, error, label = bars[(method, budget)]
            x = j - 0.4 + (i + 0.5) * width
            if height is None:
                ax.bar(x, empty_height, width, fill=False, hatch="//", edgecolor=colors[method], label=legend_label)
                ax.text(x, empty_height, label, ha="center", va="bottom", rotation=90, fontsize="x-small")
            else:
                ax.bar(x, height, width, yerr=error, capsize=3, color=colors[method], label=legend_label)
                ax.text(x, height + (error or 0), label, ha="center", va="bottom", fontsize="x-small")
            legend_label = None
    ax.set_xticks(range(len(budgets)), [f"{b:g} h" for b in budgets])
    ax.set_xlabel("RST budget")


def downstream(averages: dict[str, dict[tuple[str, float], tuple[float | None, float | None]]],
               path: str | Path) -> Path:
    """Downstream averages per method and budget, error bars the std over pretraining seeds.

    Args:
        averages: panel title -> ``(method, budget)`` -> ``(mean in percent, std or None)``; a None
            mean (missing components) is drawn as an empty bar labelled "missing".
        path: the PNG to write.
    """
    keys = {key for bars in averages.values() for key in bars}
    methods = sorted({m for m, _ in keys}, key=method_order)
    budgets = sorted({b for _, b in keys})
    colors = _palette(methods)
    figure, axes = _panels(len(averages))
    for ax, (title, bars) in zip(axes, averages.items()):
        _grouped_bars(ax, budgets, methods, colors,
                      {key: (mean, std, "" if mean is not None else "missing") for key, (mean, std) in bars.items()})
        ax.set(title=title, ylabel="score (%)")
        ax.legend(fontsize="small")
    return _save(figure, path)


def speed_ups(values: dict[tuple[str, float], tuple[float | None, str]], path: str | Path) -> Path:
    """Speed-up (the baseline's time to its final loss over the method's) per method and budget.

    Args:
        values: ``(method, budget)`` -> ``(mean speed-up or None when never reached, label)``.
        path: the PNG to write.
    """
    methods = sorted({m for m, _ in values}, key=method_order)
    budgets = sorted({b for _, b in values})
    figure, (ax,) = _panels(1, width=max(4.5, 1.6 * len(budgets) + 2))
    bars = {key: (speed, None, label if speed is not None else f"not reached {label}")
            for key, (speed, label) in values.items()}
    _grouped_bars(ax, budgets, methods, _palette(methods), bars)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set(title="speed-up to the baseline's final loss", ylabel="baseline time / method time")
    ax.legend(fontsize="small")
    return _save(figure, path)


def schedules(runs: dict[str, tuple[int, Sequence[dict[str, float]]]], budget: float, path: str | Path) -> Path:
    """What each method did: LR multiplier and mean active depth vs RST hours (two panels).

    Args:
        runs: method -> (seed, the ``"train"`` rows of that run's ``curve.jsonl``).
        budget: the runs' budget, for the titles.
        path: the PNG to write.
    """
    colors = _palette(list(runs))
    figure, axes = _panels(2)
    for ax, key, label in zip(axes, ("lr_multiplier", "depth"), ("LR / base LR", "mean active layers")):
        for method in sorted(runs, key=method_order):
            seed, rows = runs[method]
            points = [(r["rst_hours"], r[key]) for r in rows if r.get(key) is not None]
            ax.plot([t for t, _ in points], [v for _, v in points], color=colors[method],
                    label=f"{method} (seed {seed})")
        ax.set(title=f"{label}, budget {budget:g} RST h", xlabel="RST hours", ylabel=label)
        ax.locator_params(axis="x", nbins=5)
        ax.legend(fontsize="small")
    return _save(figure, path)
