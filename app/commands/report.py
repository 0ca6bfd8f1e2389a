"""``ntng report DIR``: the comparison of a sweep that ``ntng sweep`` ran, as NTNG's tables and plots.

Reads only the cells of the sweep, ``DIR/cells/<method>/b<budget>/s<seed>/``: ``cell.json``, the
fit's ``summary.json`` and ``curve.jsonl``, and the ``results.json`` of each fine-tuned suite. Writes
``DIR/report/`` (or ``--output``): ``report.md`` with the PNG figures next to it, ``report.html``
(the same, self-contained: figures embedded as data URIs), ``report.json`` (every number of the
tables) and, for TensorBoard, an hparams summary in each done cell's ``hparams/``, so
``tensorboard --logdir DIR`` lists every cell with its method, budget and seed. Cells that are not
done, missing from the grid, unreadable or lack a fine-tuning result are listed, never dropped.
The statistics are ``app.evaluation.comparison``'s; its docstring states the conventions.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter

from app.commands import CommandParser
from app.errors import ConfigurationError
from app.evaluation import comparison as cmp
from app.evaluation import plots
from app.files import write_text_atomic

_HOW_TO_READ = (
    "Every cell is one pretraining run with an equal reference-system-time (RST) budget; comparing "
    "methods at equal RST, not equal steps, is the protocol of No Train No Gain (Kaddour et al. 2023). "
    "A ± B is the mean and sample standard deviation (ddof=1) over pretraining seeds, n of them; "
    "with one seed only the mean is shown. Downstream scores are percent, each cell's the mean over "
    "its fine-tuning seeds; an NTNG average is shown only when every component was fine-tuned in "
    "every seed, else the missing components are listed; the mean of tasks run is partial: it "
    "averages the first metric of the tasks that were run. Differences pair pretraining seeds (method "
    "seed s minus baseline seed s); the bracket is a 95 % percentile bootstrap CI over the paired "
    "differences (10,000 resamples), * where it excludes 0; with one pair no CI exists (n=1), and with few seeds (fewer than about five) the bootstrap "
    "understates the uncertainty: read a * there as a hint, not a finding. Time to "
    "target is the RST at which the method's validation loss first reaches the baseline's final "
    "validation loss at the same budget and seed (interpolated between validations); speed-up is the "
    "baseline's time to that loss divided by the method's, as AlgoPerf scores training speed (1 for the "
    "baseline by construction; the baseline's time is slightly over the budget, as a run stops at the first "
    "update past it).")
_UNITS = {"rst_hours": "RST h", "wall_hours": "wall h"}
_SUITE_NAMES = {"glue": "GLUE", "superglue": "SuperGLUE"}
_CSS = ("body{font-family:sans-serif;max-width:72em;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0;font-size:90%}"
        "th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right}th{background:#f3f3f3}"
        "td:first-child,th:first-child{text-align:left}img{max-width:100%}")


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="ntng report", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, metavar="DIR", help="the sweep's directory (holds cells/)")
    parser.add_argument("--output", type=Path, help="where to write the report (default DIR/report)")
    parser.add_argument("--epoch", choices=("final", "best"), default="final",
                        help="fine-tuning scores of the final epoch or NTNG's per-metric best epoch")
    return parser


# ----------------------------------------------------------------------------------------- reading
def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def _read_curve(path: Path) -> tuple[tuple[tuple[float, float], ...], tuple[dict, ...]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    val = tuple((float(r["rst_hours"]), math.nan if r["loss"] is None else float(r["loss"]))
                for r in rows if r["kind"] == "val")
    return val, tuple(r for r in rows if r["kind"] == "train")


def load_cell(directory: Path, epoch: str) -> cmp.Cell:
    """One cell from its files.

    Args:
        directory: the cell's directory (``cell.json`` in it).
        epoch: ``"final"`` or ``"best"``, the fine-tuning scores to take.

    Returns:
        The cell; a done cell whose fit files are unreadable has status ``"incomplete"``, and a
        fine-tuning results file that ``cell.json`` names but that cannot be read is listed in
        ``missing_results``.
    """
    meta = _read_json(directory / "cell.json")
    fields = dict(method=str(meta["method"]), budget=float(meta["budget"]), seed=int(meta["seed"]),
                  unit=meta.get("unit") or "rst_hours", error=meta.get("error"),
                  branched_from=meta.get("branched_from"))
    if meta["status"] != "done":
        return cmp.Cell(status=str(meta["status"]), **fields)
    fit = directory / meta["fit_dir"]
    try:
        summary = _read_json(fit / "summary.json")
        val_curve, train_rows = _read_curve(fit / "curve.jsonl")
    except (OSError, ValueError, KeyError) as err:
        return cmp.Cell(status="incomplete", **fields | {"error": f"done, but its fit files are unreadable: {err}"})
    results, missing = {}, []
    for suite, relative in sorted((meta.get("finetune") or {}).items()):
        try:
            results[suite] = _read_json(directory / relative)
        except (OSError, ValueError) as err:
            missing.append(f"{suite} ({relative}: {type(err).__name__})")
    return cmp.Cell(status="done", summary=summary, val_curve=val_curve, train_rows=train_rows,
                    scores=cmp.downstream_scores(results, epoch), missing_results=tuple(missing), **fields)


def load_cells(sweep_dir: Path, epoch: str) -> tuple[list[tuple[Path, cmp.Cell]], list[tuple[Path, str]]]:
    """Every cell of a sweep.

    Args:
        sweep_dir: the sweep's directory.
        epoch: as in ``load_cell``.

    Returns:
        ``(directory, cell)`` of each readable cell and ``(directory, why)`` of each unreadable one.

    Raises:
        ConfigurationError: when there is no ``cells/<method>/b<budget>/s<seed>/cell.json``.
    """
    cells, unreadable = [], []
    for path in sorted(sweep_dir.glob("cells/*/*/*/cell.json")):
        try:
            cells.append((path.parent, load_cell(path.parent, epoch)))
        except (OSError, ValueError, KeyError, TypeError) as err:
            unreadable.append((path.parent, f"{type(err).__name__}: {err}"))
    if not cells and not unreadable:
        raise ConfigurationError(f"no sweep cells under {sweep_dir} "
                                 f"(expected {sweep_dir}/cells/<method>/b<budget>/s<seed>/cell.json); pass the "
                                 "directory `ntng sweep` wrote (its --output, default runs/sweeps/<name>)")
    return cells, unreadable


def write_hparams(directory: Path, cell: cmp.Cell) -> Path:
    """A TensorBoard hparams summary of a done cell, so TensorBoard lists every cell of the sweep.

    Args:
        directory: the cell's directory; the summary goes to its ``hparams/`` (replacing an older one).
        cell: the cell: method, budget and seed are the hparams, its finite final numbers the metrics.

    Returns:
        The summary's directory.
    """
    log_dir = directory / "hparams"
    for old in log_dir.glob("events.out.tfevents.*"):
        old.unlink()  # a rerun would otherwise show the cell twice
    values = {"val_loss": cell.final_val_loss, **{k: cell.summary.get(k) for k in ("rst_hours", "updates",
                                                                                     "tokens_trained")},
              **{name: score.value for name, score in cell.scores.items()}}
    metrics = {f"final/{k}": float(v) for k, v in values.items() if v is not None and math.isfinite(v)}
    with SummaryWriter(log_dir=str(log_dir)) as writer:
        writer.add_hparams({"method": cell.method, "budget": cell.budget, "seed": cell.seed}, metrics, run_name=".")
    return log_dir


# -------------------------------------------------------------------------------------- formatting
def _mean_std(stat: dict, scale: float = 1.0, digits: int = 3) -> str:
    if stat["mean"] is None:
        return "—"
    if math.isnan(stat["mean"]):
        return "n/a"
    text = f"{scale * stat['mean']:.{digits}f}"
    return text if stat["std"] is None else f"{text} ± {scale * stat['std']:.{digits}f}"


def _score(entry: dict, n: int) -> str:
    if entry["n"]:
        text = _mean_std(entry, 100, 1)
        tasks = entry.get("tasks")  # the partial mean says what it averages
        if tasks:
            text += f" ({tasks[0]}{'' if len(tasks) == 1 else f'–{tasks[-1]}'} task{'s' * (tasks[-1] > 1)}"
            text += ")" if entry["n"] == n else f"; {entry['n']} of {n} seeds)"
        return text
    if entry["seeds_not_fine_tuned"] and len(entry["seeds_not_fine_tuned"]) == n:
        return "— (not fine-tuned)"
    reasons = []
    if entry["seeds_not_fine_tuned"]:
        seeds = entry["seeds_not_fine_tuned"]
        reasons.append(f"not fine-tuned: seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))}")
    if entry["missing"]:
        reasons.append(f"missing {len(entry['missing'])} of {entry['components']}: {', '.join(entry['missing'])}")
    return "—" + (f" ({'; '.join(reasons)})" if reasons else "")


def _difference(entry: dict, scale: float = 1.0, digits: int = 3) -> str:
    if entry["mean"] is None:
        return "—"
    text = f"{scale * entry['mean']:+.{digits}f}"
    if entry["ci"] is None:
        return f"{text} (n=1)"
    low, high = (scale * v for v in entry["ci"])
    return f"{text} [{low:+.{digits}f}, {high:+.{digits}f}]{' *' if entry['excludes_zero'] else ''} (n={entry['n']})"


def _number(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.2f} h"


def _budget(row: dict) -> str:
    return f"{row['budget']:g} {_UNITS.get(row.get('unit'), row.get('unit', ''))}".strip()


def _title(name: str) -> str:
    return "mean of tasks run (partial)" if name == cmp.PARTIAL else name


# ---------------------------------------------------------------------------------------- document
def _tables(data: dict) -> list[tuple]:
    """The report's blocks after the header: ``("h2"|"p", text)``, ``("ul", items)``, ``("table", head, rows)``."""
    averages = data["averages"]
    head = ["method", "budget", "n", "final val loss", *(_title(a) for a in averages), "updates",
            "tokens trained", "RST h spent", "wall time"]
    rows, footnotes = [], []
    for row in data["table1"]:
        mark = "†" if row["branched"] else ""
        rows.append([row["method"] + mark, _budget(row), str(row["n"]),
                     _mean_std(row["final_val_loss"]), *(_score(row["downstream"][a], row["n"]) for a in averages),
                     _number(row["updates"], ",.0f"), _number(row["tokens_trained"], ",.0f"),
                     _number(row["rst_hours"], ".4g"), _duration(row["wall_seconds"])])
        footnotes += [f"† {row['method']} at {row['budget']:g} h, seed {b['seed']}: cooldown branched from the "
                      f"{b['budget']:g} h run at {b['rst_hours']:.4g} RST h; charged the shared part."
                      for b in row["branched"]]
    blocks: list[tuple] = [("h2", "Table 1: equal-RST pretraining and downstream scores"), ("table", head, rows)]
    blocks += [("p", note) for note in footnotes + data["notes"]]

    head = ["method", "budget", "Δ final val loss", *(f"Δ {_title(a)} (pp)" for a in averages)]
    rows = [[row["method"], _budget(row), _difference(row["final_val_loss"]) if row["baseline"] else "no baseline",
             *(_difference(row[a], 100, 1) for a in averages)] for row in data["differences"]]
    blocks += [("h2", "Difference from the baseline (paired by pretraining seed)"),
               ("table", head, rows) if rows else ("p", "No method besides the baseline: nothing to compare.")]

    head = ["method", "budget", "target (baseline final loss)", "mean time to target (RST h)", "reached",
            "mean speed-up"]
    rows = []
    for row in data["time_to_target"]:
        target = cmp.mean_std(p["target"] for p in row["per_seed"])
        time = row["mean_time_to_target_rst_hours"]
        rows.append([row["method"], _budget(row), _mean_std(target) if row["n"] else "no baseline target",
                     "not reached" if time is None else f"{time:.4g}", f"{row['reached']}/{row['n']}",
                     _number(row["mean_speed_up"], ".2f") + ("×" if row["mean_speed_up"] is not None else "")])
    blocks += [("h2", "Time to the baseline's final validation loss"), ("table", head, rows)]
    return blocks


def _figures(cells: list[cmp.Cell], data: dict, output: Path) -> tuple[list[tuple], dict[str, str]]:
    """Draw every figure there is data for; returns its blocks and ``{figure: file or why not drawn}``."""
    done = [c for c in cells if c.status == "done"]
    drawn: dict[str, str] = {}
    curves: dict[float, dict[str, dict]] = {}
    for (method, budget), group in cmp.groups(c for c in done if c.val_curve).items():
        curve = cmp.mean_curve([c.val_curve for c in group])
        if curve is not None:
            curves.setdefault(budget, {})[method] = curve
    bars = {}
    for name in data["averages"]:
        panel = {(r["method"], r["budget"]): (None if e["mean"] is None else 100 * e["mean"],
                                              None if e["std"] is None else 100 * e["std"])
                 for r in data["table1"] if r["n"] for e in [r["downstream"][name]]}
        if any(mean is not None for mean, _ in panel.values()):
            bars[_title(name)] = panel
    speeds = {(r["method"], r["budget"]): (r["mean_speed_up"], f"{r['reached']}/{r['n']}")
              for r in data["time_to_target"] if r["n"]}
    # One run per method (its first seed) at the largest budget: the whole of each schedule.
    with_rows = [c for c in done if c.train_rows]
    largest = max((c.budget for c in with_rows), default=0.0)
    runs: dict[str, tuple[int, tuple[dict, ...]]] = {}
    for cell in sorted((c for c in with_rows if c.budget == largest), key=lambda c: c.seed):
        runs.setdefault(cell.method, (cell.seed, cell.train_rows))
    planned = [
        ("val_loss.png", "Validation loss vs RST hours (mean over seeds, band: min-max)",
         curves, lambda p: plots.validation_loss(curves, p), "no validation curves"),
        ("downstream.png", "Downstream averages (error bars: std over pretraining seeds)",
         bars, lambda p: plots.downstream(bars, p), "no fine-tuning results"),
        ("speed_up.png", "Speed-up to the baseline's final loss (hatched: not reached)",
         speeds, lambda p: plots.speed_ups(speeds, p), "no baseline final loss to aim at"),
        ("schedules.png", f"What each method did: LR multiplier and active depth (budget {largest:g} h, "
                          "each method's first seed)", runs, lambda p: plots.schedules(runs, largest, p),
         "no train rows in the curves"),
    ]
    blocks: list[tuple] = [("h2", "Figures")]
    for name, caption, content, draw, why_not in planned:
        if content:
            draw(output / name)
            blocks.append(("img", name, caption))
            drawn[name] = name
        else:
            blocks.append(("p", f"Not drawn: {name} ({why_not})."))
            drawn[name] = f"not drawn: {why_not}"
    return blocks, drawn


def _markdown(blocks: list[tuple]) -> str:
    lines = []
    for kind, *content in blocks:
        if kind in ("h1", "h2"):
            lines += ["#" * int(kind[1]) + " " + content[0], ""]
        elif kind == "p":
            lines += [content[0], ""]
        elif kind == "ul":
            lines += [f"- {item}" for item in content[0]] + [""]
        elif kind == "table":
            head, rows = content
            lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(row) + " |" for row in rows] + [""]
        elif kind == "img":
            lines += [f"![{content[1]}]({content[0]})", "", f"*{content[1]}*", ""]
    return "\n".join(lines)


def _html(blocks: list[tuple], output: Path) -> str:
    e = html.escape
    parts = []
    for kind, *content in blocks:
        if kind in ("h1", "h2", "p"):
            parts.append(f"<{kind}>{e(content[0])}</{kind}>")
        elif kind == "ul":
            parts.append("<ul>" + "".join(f"<li>{e(item)}</li>" for item in content[0]) + "</ul>")
        elif kind == "table":
            head, rows = content
            parts.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>"
                         + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows)
                         + "</table>")
        elif kind == "img":
            encoded = base64.b64encode((output / content[0]).read_bytes()).decode("ascii")
            parts.append(f'<figure><img alt="{e(content[1])}" src="data:image/png;base64,{encoded}">'
                         f"<figcaption>{e(content[1])}</figcaption></figure>")
    return (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>ntng report</title>'
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


def _json_safe(value: Any) -> Any:
    """NaN/inf -> None, tuples -> lists, numpy arrays and scalars -> Python values."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "tolist"):
        return _json_safe(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _listing(sweep_dir: Path, loaded: list[tuple[Path, cmp.Cell]], unreadable: list[tuple[Path, str]]) -> list[str]:
    """One line per cell the tables lack or lack something of: not done, missing, unreadable, not fine-tuned."""
    cells = [cell for _, cell in loaded]
    # The first line of an error says what went wrong; the traceback is in the cell's own log.
    lines = [f"{c.status}: {d.relative_to(sweep_dir)}" + (f": {c.error.strip().splitlines()[0]}" if c.error else "")
             for d, c in loaded if c.status != "done"]
    lines += [f"missing: {m} at {b:g}, seed {s} (no cell.json)" for m, b, s in cmp.missing_cells(cells)]
    lines += [f"unreadable cell.json: {d.relative_to(sweep_dir)}: {why}" for d, why in unreadable]
    lines += [f"missing fine-tuning result: {d.relative_to(sweep_dir)}: {r}" for d, c in loaded
              for r in c.missing_results]
    return lines


def write_report(sweep_dir: Path, output: Path, epoch: str = "final") -> Path:
    """Read a sweep's cells and write its report.

    Args:
        sweep_dir: the sweep's directory (``cells/`` in it).
        output: the report's directory (created).
        epoch: fine-tuning scores of the ``"final"`` or NTNG's ``"best"`` epoch.

    Returns:
        The path of ``report.html``.

    Raises:
        ConfigurationError: when ``sweep_dir`` holds no cell.
    """
    loaded, unreadable = load_cells(sweep_dir, epoch)
    cells = [cell for _, cell in loaded]
    suites = [s for s, name in cmp.NTNG_AVERAGES.items() if any(name in c.scores for c in cells)]
    averages = [cmp.NTNG_AVERAGES[s] for s in suites]
    averages += [name for _, _, name in cmp.SINGLE_SCORES.values() if any(name in c.scores for c in cells)]
    if any(cmp.PARTIAL in c.scores for c in cells):
        averages.append(cmp.PARTIAL)
    statuses = sorted({c.status for c in cells})
    data = {"sweep_dir": str(sweep_dir), "epoch": epoch, "averages": averages,
            "notes": [f"{name}: no cell has {_SUITE_NAMES[suite]} fine-tuning results, so it has no column."
                      for suite, name in cmp.NTNG_AVERAGES.items() if suite not in suites],
            "counts": {status: sum(c.status == status for c in cells) for status in statuses}
            | {"missing": len(cmp.missing_cells(cells)), "unreadable": len(unreadable)},
            "listed": _listing(sweep_dir, loaded, unreadable),
            "table1": cmp.table_rows(cells, averages), "differences": cmp.difference_rows(cells, averages),
            "time_to_target": cmp.time_to_target_rows(cells)}
    for directory, cell in loaded:
        if cell.status == "done":
            write_hparams(directory, cell)

    output.mkdir(parents=True, exist_ok=True)
    counts = ", ".join(f"{n} {status}" for status, n in data["counts"].items())
    blocks: list[tuple] = [("h1", "No Train No Gain: sweep report"),
                           ("p", f"Sweep: {sweep_dir}. Fine-tuning scores: {epoch} epoch. Cells: {counts}."),
                           ("h2", "Cells not done, missing or incomplete"),
                           ("ul", data["listed"] or ["none: every cell is done"])]
    blocks += _tables(data)
    figure_blocks, data["figures"] = _figures(cells, data, output)
    blocks += figure_blocks + [("h2", "How to read this"), ("p", _HOW_TO_READ)]
    write_text_atomic(output / "report.md", _markdown(blocks))
    write_text_atomic(output / "report.json", json.dumps(_json_safe(data), indent=2, allow_nan=False) + "\n")
    path = output / "report.html"
    write_text_atomic(path, _html(blocks, output))
    return path


def main(argv: list[str]) -> None:
    """``ntng report`` entry point: writes the report and prints the path of ``report.html``."""
    args = build_parser().parse_args(argv)
    print(write_report(args.sweep_dir, args.output or args.sweep_dir / "report", args.epoch), flush=True)
