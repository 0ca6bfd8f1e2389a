"""The files ``ntng finetune`` writes: results JSON, markdown tables, predictions and leaderboard
submissions.

Submission label formats (``write_submission``):

    ================ =====================================================================
    GLUE             TSV ``index\\tprediction``; label strings ``spec.label_names[id]``;
                     STS-B floats clipped to [0, 5]; MNLI ``test_matched`` ->
                     ``MNLI-m.tsv``, ``test_mismatched`` -> ``MNLI-mm.tsv``
    BoolQ, WiC       JSONL ``{"idx", "label": "true"|"false"}`` (lower case)
    WSC              ``"True"|"False"`` (capitalised)
    CB, RTE, AX-b/g  the label name (``"entailment"``, ``"not_entailment"``, ...)
    COPA             the chosen alternative's index (int)
    ReCoRD           the chosen entity's text
    MultiRC          one line per paragraph: ``{"idx": p, "passage": {"questions":
                     [{"idx": q, "answers": [{"idx": a, "label": 0|1}]}]}}``
    ================ =====================================================================
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from app.evaluation.metrics import AVERAGES
from app.files import write_text_atomic
from datamodules.tasks.spec import Example, TaskSpec


def _json_safe(value: Any) -> Any:
    """Plain JSON values: NaN/inf -> None, tensors/numpy scalars -> Python numbers, tuples -> lists."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def results_document(suite: str, results: dict, skipped: dict[str, str], settings: dict) -> dict:
    """The content of ``results.json`` from ``summarize(runs, suite)`` output (JSON-safe)."""
    if "averages" not in results or "averages" not in results["best_epoch"]:
        # Averages are exact only per seed, which a summary no longer pairs across tasks.
        raise ValueError("results lack averages; build them with summarize(runs, suite)")
    return _json_safe({"suite": suite, "tasks": results["tasks"], "averages": results["averages"],
                       "best_epoch": results["best_epoch"], "skipped": dict(skipped), "settings": settings})


def write_results(path: str | Path, suite: str, results: dict, skipped: dict[str, str], settings: dict) -> Path:
    """Write ``results.json`` (into ``path`` if it is a directory, else to ``path`` ending ``.json``).

    Args:
        results: ``summarize(runs, suite)`` output.
        skipped: task -> why it was not run. settings: the run's settings, written verbatim.
    """
    path = Path(path)
    target = path if path.suffix == ".json" else path / "results.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    document = results_document(suite, results, skipped, settings)
    write_text_atomic(target, json.dumps(document, indent=2, allow_nan=False) + "\n")
    return target


def _cell(value: Any) -> str:
    """Percent with one decimal, ``± std`` with several seeds; ``—`` when missing, ``n/a`` for NaN."""
    if value is None:
        return "—"
    mean, std = (value["mean"], value["std"]) if isinstance(value, dict) else (value, None)
    if mean is None or math.isnan(mean):  # NaN was written to JSON as null
        return "n/a"
    return f"{100 * mean:.1f}" + ("" if std is None else f" ± {100 * std:.1f}")


def markdown_table(results: dict, skipped: dict[str, str]) -> str:
    """A Markdown report of ``results_document`` (or ``summarize``) output: one row per task with
    final and best-epoch metrics, the averages below, then the skipped tasks and why."""
    lines = ["| task | metrics | final | best epoch |", "|---|---|---|---|"]
    best_tasks = results["best_epoch"]["tasks"]
    for key, metrics in results["tasks"].items():
        final = " / ".join(_cell(v) for v in metrics.values())
        best = " / ".join(_cell(best_tasks.get(key, {}).get(m)) for m in metrics)
        lines.append(f"| {key} | {' / '.join(metrics)} | {final} | {best} |")
    best_avgs = results["best_epoch"].get("averages", {})
    for name, avg in results.get("averages", {}).items():
        parts = next(p for by_name in AVERAGES.values() for n, p in by_name.items() if n == name)
        count = len(avg["components"])
        note = (f"mean of {count} numbers" if count == len(parts)
                else f"mean of {len(parts)} task scores ({count} numbers)")
        if avg["missing"]:
            note += f"; missing: {', '.join(avg['missing'])}"
        best_value = best_avgs.get(name, {}).get("value")
        lines.append(f"| **{name}** | {note} | {_cell(avg['value'])} | {_cell(best_value)} |")
    if skipped:
        lines += ["", "Skipped:"] + [f"- {task}: {reason}" for task, reason in skipped.items()]
    return "\n".join(lines) + "\n"


def write_predictions(path: str | Path, spec: TaskSpec, examples: list[Example], predictions: list) -> Path:
    """JSONL, one line per example: ``{"idx", "label", "prediction"}`` (+ ``"prediction_text"``, the
    chosen entity, for ReCoRD). Labels/predictions are class ids, floats (STS-B) or candidate indices."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for example, pred in zip(examples, predictions, strict=True):
        pred = float(pred) if spec.kind == "regression" else int(pred)
        line = {"idx": example.idx, "label": example.label, "prediction": pred}
        if spec.name == "record":
            line["prediction_text"] = example.candidate_texts[pred]
        lines.append(json.dumps(_json_safe(line)) + "\n")
    write_text_atomic(path, "".join(lines))
    return path


_TEST_SUFFIX = {"test_matched": "m", "test_mismatched": "mm"}


def _submission_path(directory: Path, spec: TaskSpec, split: str) -> Path:
    default = spec.directory + (".tsv" if spec.suite == "glue" else ".jsonl")
    name = Path(spec.submission_name or default)
    if split in _TEST_SUFFIX:  # MNLI: one file per test split, MNLI-m.tsv and MNLI-mm.tsv
        stem = re.sub(r"-(m|mm)$", "", name.stem)
        name = Path(f"{stem}-{_TEST_SUFFIX[split]}{name.suffix}")
    return directory / name


def _superglue_label(spec: TaskSpec, example: Example, pred: int) -> Any:
    if spec.name == "copa":
        return pred
    if spec.name == "record":
        return example.candidate_texts[pred]
    label = spec.label_names[pred] if spec.label_names else str(bool(pred))
    if spec.name in ("boolq", "wic"):
        return str(label).lower()
    if spec.name == "wsc":
        return str(label).capitalize()
    return label


def write_submission(directory: str | Path, spec: TaskSpec, split: str, examples: list[Example],
                     predictions: list) -> Path:
    """Write a leaderboard submission file for ``split`` (formats in the module docstring)."""
    path = _submission_path(Path(directory), spec, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    pairs = list(zip(examples, predictions, strict=True))
    if spec.suite == "glue":
        rows = ["index\tprediction"]
        for example, pred in pairs:
            if spec.kind == "regression":
                value = repr(min(5.0, max(0.0, float(pred))))
            else:
                value = spec.label_names[int(pred)]
            rows.append(f"{example.idx}\t{value}")
        write_text_atomic(path, "\n".join(rows) + "\n")
        return path
    if spec.name == "multirc":
        # Regroup the per-answer predictions into paragraph -> question -> answers (hand-written).
        passages: dict[Any, dict[Any, list[dict]]] = {}
        for example, pred in pairs:
            idx = example.idx
            questions = passages.setdefault(idx["paragraph"], {})
            questions.setdefault(idx["question"], []).append({"idx": idx["answer"], "label": int(pred)})
        lines = [{"idx": p, "passage": {"questions": [{"idx": q, "answers": a} for q, a in qs.items()]}}
                 for p, qs in passages.items()]
    else:
        lines = [{"idx": e.idx, "label": _superglue_label(spec, e, int(p))} for e, p in pairs]
    write_text_atomic(path, "".join(json.dumps(_json_safe(line)) + "\n" for line in lines))
    return path
