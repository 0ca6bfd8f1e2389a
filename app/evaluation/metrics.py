"""Scoring and aggregation of ``ntng finetune`` results (the files it writes are in ``reports``).

Metrics are fractions in [0, 1] (tables show percent). Accuracy, F1, MCC and Pearson come from
``torchmetrics`` functionals; Spearman is torchmetrics' Pearson of average ranks (its own
``spearman_corrcoef`` adds 1e-6 to the denominator). Written by hand, because torchmetrics has
none of them: the ranking, ReCoRD's SQuAD-style normalisation/token F1, MultiRC's grouping.

Metric definitions and degenerate cases:
    * ``f1``: binary F1 of class id 1; CB: macro-F1 over the classes present in labels or
      predictions (as sklearn's default, which SuperGLUE's scorer uses); MultiRC: F1a, binary F1
      over all answer options; ReCoRD: SQuAD token F1, max over gold answers, mean over queries
      (one ``Example`` per query).
    * ``exact_match``: MultiRC: share of questions (``Example.group``) with every answer right;
      ReCoRD: normalised string match, max over gold answers; SNI: string match after SNI's
      normalisation (lower case, punctuation dropped, whitespace collapsed; articles kept), max
      over references, mean over instances.
    * ``rouge_l`` (SNI): Rouge-L F-measure, the longest common subsequence of the
      prediction's and a reference's tokens; tokens as ``rouge_score``'s default tokenizer makes
      them (lower case, every run of characters other than ``a-z0-9`` a separator) but without the
      Porter stemming of SNI's ``use_stemmer=True``, so inflected matches ("run"/"running") that
      the official script credits count as misses here. 0 when either side has no tokens; max over
      references, mean over instances (SNI's ``compute_metrics``).
    * ``matthews``: 0 for constant predictions (torchmetrics' and sklearn's convention).
    * ``pearson``/``spearman``: NaN when either vector is constant (undefined, as in scipy);
      NaN propagates into every mean that uses it and is written as JSON ``null``.
    * A text-to-text prediction that is no label word (``NO_LABEL``) is wrong whatever the label:
      a class of its own that no label has (accuracy, MCC, MultiRC EM), not the positive class
      (binary F1: a miss of a positive label), and in CB's macro-F1 a miss of the true class
      whose own, empty class is not averaged.

Aggregation (``summarize``): "tasks" holds the final epoch. "best_epoch" follows NTNG: for each seed
and each metric separately, the maximum over epochs (NaN epochs skipped), so a task's metrics may
come from different epochs; this selects on the dev set and is optimistic. MNLI-mm is the
exception: NTNG evaluates it once after training, so its best-epoch value is its final one. With one seed a value is a float;
with several it is ``{"mean", "std", "per_seed"}`` where std is the *sample* std (ddof=1).

Averages, computed per seed from the values above and then aggregated like metrics; an average is
``null`` when any component is missing, and the missing components are listed (``null`` with
nothing missing means a NaN component):

    ======================= ====================================================================
    ``ntng_glue``           NTNG: mean of 9: QQP F1, QNLI acc, MRPC F1, MNLI-m acc, MNLI-mm acc,
                            STS-B Pearson, SST-2 acc, RTE acc, CoLA MCC (WNLI excluded)
    ``glue_score``          GLUE leaderboard: mean over CoLA, SST-2, MRPC, STS-B, QQP, MNLI, QNLI,
                            RTE, WNLI of each task's metric mean (MRPC F1/acc, STS-B
                            Pearson/Spearman, QQP F1/acc, MNLI m/mm acc); AX excluded
    ``superglue_score``     SuperGLUE leaderboard: BoolQ acc, CB mean(acc, F1), COPA acc, MultiRC
                            mean(F1a, EM), ReCoRD mean(F1, EM), RTE, WiC, WSC acc (AX-b/g excluded)
    ``ntng_superglue``      NTNG paper: CB macro-F1, BoolQ, COPA, RTE, WiC, WSC acc (6)
    ``ntng_superglue_code`` NTNG code: the paper's 6 plus MultiRC F1a (7)
    ======================= ====================================================================

SNI has no average: its one task, ``sni``, is already the mean over every evaluated instance.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from typing import Any

import torch
from torchmetrics.functional import pearson_corrcoef
from torchmetrics.functional.classification import (
    binary_f1_score,
    binary_matthews_corrcoef,
    multiclass_accuracy,
    multiclass_f1_score,
    multiclass_matthews_corrcoef,
)

from datamodules.tasks.spec import NO_LABEL, Example, TaskSpec

# Averages as data: name -> parts; a part is the mean of its (report key, metric) components and
# the average is the mean of its parts.
_P = list[list[tuple[str, str]]]
AVERAGES: dict[str, dict[str, _P]] = {
    "glue": {
        "ntng_glue": [[c] for c in [("qqp", "f1"), ("qnli", "accuracy"), ("mrpc", "f1"),
                                    ("mnli-m", "accuracy"), ("mnli-mm", "accuracy"), ("stsb", "pearson"),
                                    ("sst2", "accuracy"), ("rte", "accuracy"), ("cola", "matthews")]],
        "glue_score": [[("cola", "matthews")], [("sst2", "accuracy")], [("mrpc", "f1"), ("mrpc", "accuracy")],
                       [("stsb", "pearson"), ("stsb", "spearman")], [("qqp", "f1"), ("qqp", "accuracy")],
                       [("mnli-m", "accuracy"), ("mnli-mm", "accuracy")], [("qnli", "accuracy")],
                       [("rte", "accuracy")], [("wnli", "accuracy")]],
    },
    "superglue": {
        "superglue_score": [[("boolq", "accuracy")], [("cb", "accuracy"), ("cb", "f1")], [("copa", "accuracy")],
                            [("multirc", "f1"), ("multirc", "exact_match")],
                            [("record", "f1"), ("record", "exact_match")], [("rte", "accuracy")],
                            [("wic", "accuracy")], [("wsc", "accuracy")]],
        "ntng_superglue": [[c] for c in [("cb", "f1"), ("boolq", "accuracy"), ("copa", "accuracy"),
                                         ("rte", "accuracy"), ("wic", "accuracy"), ("wsc", "accuracy")]],
    },
}
AVERAGES["superglue"]["ntng_superglue_code"] = AVERAGES["superglue"]["ntng_superglue"] + [[("multirc", "f1")]]
AVERAGES["sni"] = {}


# ----------------------------------------------------------------------------------------- scoring
_PUNCTUATION = frozenset(string.punctuation)


def _normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation (hand-written, as ReCoRD's official scorer): lower case, drop
    punctuation and the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def _token_f1(prediction: str, gold: str) -> float:
    """SQuAD token-overlap F1 of two normalised strings."""
    pred, ref = _normalize_answer(prediction).split(), _normalize_answer(gold).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


_ROUGE_SEPARATOR = re.compile(r"[^a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """``rouge_score``'s default tokens (without stemming): lower case, split at non-``a-z0-9`` runs."""
    return _ROUGE_SEPARATOR.sub(" ", text.lower()).split()


def _lcs_length(first: list[str], second: list[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, one row at a time)."""
    previous = [0] * (len(second) + 1)
    for token in first:
        current = [0]
        for j, other in enumerate(second):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """Rouge-L F-measure of one prediction against one reference (see the module docstring)."""
    pred, ref = rouge_tokens(prediction), rouge_tokens(reference)
    common = _lcs_length(pred, ref) if pred and ref else 0
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def _sni_normalize(text: str) -> str:
    """SNI's exact-match normalisation: lower case, no punctuation, single spaces (articles kept)."""
    return " ".join("".join(ch for ch in text.lower() if ch not in _PUNCTUATION).split())


def _generation_scores(spec: TaskSpec, examples: list[Example], predictions: list) -> dict[str, float]:
    """Rouge-L / exact match of generated strings, max over each example's references, mean over examples."""
    scorers = {"rouge_l": rouge_l, "exact_match": lambda p, g: float(_sni_normalize(p) == _sni_normalize(g))}
    results = {}
    for metric in spec.metrics:
        if metric not in scorers:
            raise ValueError(f"{spec.name}: unknown metric {metric!r}")
        per_example = [max(scorers[metric](str(p), g) for g in e.answers) for e, p in zip(examples, predictions)]
        results[metric] = sum(per_example) / len(per_example)
    return results


def _cb_macro_f1(preds: list[int], labels: list[int], classes: int) -> float:
    """Macro-F1 over the real classes present in labels or predictions (``NO_LABEL`` is class ``classes``)."""
    per_class = multiclass_f1_score(torch.tensor(preds), torch.tensor(labels), num_classes=classes + 1, average="none")
    present = sorted({*labels, *(p for p in preds if p < classes)})
    return float(per_class[present].mean())


def _hashable(key: Any) -> Any:
    return tuple(sorted(key.items())) if isinstance(key, dict) else key


def _question_key(example: Example) -> Any:
    """MultiRC question of an answer option: ``group``, else the idx's paragraph and question."""
    if example.group is not None:
        return _hashable(example.group)
    return (example.idx["paragraph"], example.idx["question"])


def _average_ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing their mean rank (scipy's ``rankdata``)."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def _correlation(metric: str, preds: list[float], labels: list[float]) -> float:
    """Pearson, or Spearman as the Pearson of average ranks; NaN for a constant vector.

    torchmetrics' ``spearman_corrcoef`` adds 1e-6 to its denominator (biased on small sets) and
    gives 0, not NaN, for constant input, so Spearman goes through its exact ``pearson_corrcoef``.
    """
    if len(set(preds)) < 2 or len(set(labels)) < 2:
        return math.nan  # undefined; torchmetrics would warn and return NaN too
    if metric == "spearman":
        preds, labels = _average_ranks(preds), _average_ranks(labels)
    return float(pearson_corrcoef(torch.tensor(preds, dtype=torch.float64),
                                  torch.tensor(labels, dtype=torch.float64)))


def score(spec: TaskSpec, examples: list[Example], predictions: list) -> dict[str, float]:
    """Score predictions aligned with labelled examples.

    Args:
        spec: the task; its ``metrics`` are the keys returned, in order.
        examples: labelled examples (``label`` not None).
        predictions: class ids, floats (regression), chosen candidate indices (multiple choice; both
            may be ``NO_LABEL``) or generated strings (generation).

    Returns:
        ``{metric: fraction}`` for exactly ``spec.metrics``.

    Raises:
        ValueError: on length mismatch, no or unlabelled examples, or a metric the task cannot have.
    """
    if len(examples) != len(predictions):
        raise ValueError(f"{spec.name}: {len(predictions)} predictions for {len(examples)} examples")
    if not examples or any(example.label is None for example in examples):
        raise ValueError(f"{spec.name}: nothing to score (no examples, or unlabelled ones)")
    if spec.kind == "generation":
        return _generation_scores(spec, examples, predictions)
    if spec.kind == "regression":
        preds = [float(p) for p in predictions]
        labels = [float(e.label) for e in examples]
    else:
        labels = [int(e.label) for e in examples]
        # NO_LABEL becomes a class of its own that no label has (module docstring).
        none = max([2, len(spec.label_names), *(l + 1 for l in labels),
                    *(int(p) + 1 for p in predictions if int(p) != NO_LABEL)])
        preds = [none if int(p) == NO_LABEL else int(p) for p in predictions]
    results: dict[str, float] = {}
    for metric in spec.metrics:
        if spec.name == "record" and metric in ("f1", "exact_match"):
            texts = [e.candidate_texts[p] for e, p in zip(examples, preds)]
            if metric == "f1":
                per_query = [max(_token_f1(t, g) for g in e.answers) for e, t in zip(examples, texts)]
            else:
                per_query = [max(float(_normalize_answer(t) == _normalize_answer(g)) for g in e.answers)
                             for e, t in zip(examples, texts)]
            results[metric] = sum(per_query) / len(per_query)
        elif spec.name == "multirc" and metric == "exact_match":
            # A question is right only when all of its answer options are (hand-written grouping).
            right: dict[Any, bool] = {}
            for example, pred, label in zip(examples, preds, labels):
                key = _question_key(example)
                right[key] = right.get(key, True) and pred == label
            results[metric] = sum(right.values()) / len(right)
        elif metric == "accuracy":
            results[metric] = float(multiclass_accuracy(torch.tensor(preds), torch.tensor(labels),
                                                        num_classes=none + 1, average="micro"))
        elif metric == "f1" and spec.name == "cb":
            results[metric] = _cb_macro_f1(preds, labels, len(spec.label_names))
        elif metric == "f1":
            positive = [int(p == 1) for p in preds]  # NO_LABEL is not a positive prediction
            results[metric] = float(binary_f1_score(torch.tensor(positive), torch.tensor(labels)))
        elif metric == "matthews":
            p, t = torch.tensor(preds), torch.tensor(labels)
            if none in preds:
                results[metric] = float(multiclass_matthews_corrcoef(p, t, num_classes=none + 1))
            elif len(spec.label_names) > 2:
                results[metric] = float(multiclass_matthews_corrcoef(p, t, num_classes=len(spec.label_names)))
            else:
                results[metric] = float(binary_matthews_corrcoef(p, t))
        elif metric in ("pearson", "spearman"):
            results[metric] = _correlation(metric, preds, labels)
        else:
            raise ValueError(f"{spec.name}: unknown metric {metric!r}")
    return results


# ------------------------------------------------------------------------------------- aggregation
def _nanmax(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return max(finite) if finite else math.nan


def aggregate(per_seed: dict[Any, float]) -> float | dict:
    """One seed -> its float; several -> ``{"mean", "std" (sample, ddof=1), "per_seed"}``."""
    values = [float(v) for v in per_seed.values()]
    if len(values) == 1:
        return values[0]
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return {"mean": mean, "std": std, "per_seed": {str(s): float(v) for s, v in per_seed.items()}}


def averages(task_values: dict[str, dict[str, float]], suite: str) -> dict[str, dict]:
    """The suite's averages for ONE seed.

    Returns:
        ``{name: {"value": float | None, "missing": ["task/metric", ...], "components": [...]}}``;
        ``value`` is None when anything is missing.
    """
    out = {}
    for name, parts in AVERAGES[suite].items():
        components = [f"{key}/{metric}" for part in parts for key, metric in part]
        missing = [f"{key}/{metric}" for part in parts for key, metric in part
                   if metric not in task_values.get(key, {})]
        value = None
        if not missing:
            part_means = [sum(task_values[k][m] for k, m in part) / len(part) for part in parts]
            value = sum(part_means) / len(part_means)
        out[name] = {"value": value, "missing": missing, "components": components}
    return out


def aggregate_averages(per_seed_tasks: dict[Any, dict[str, dict[str, float]]], suite: str) -> dict[str, dict]:
    """``averages`` per seed, then aggregated; a component missing in only some seeds is listed as
    ``"task/metric (seeds 1, 2)"``."""
    per_seed = {seed: averages(values, suite) for seed, values in per_seed_tasks.items()}
    out = {}
    for name, parts in AVERAGES[suite].items():
        missing = []
        for component in [f"{k}/{m}" for part in parts for k, m in part]:
            lacking = [str(s) for s, avg in per_seed.items() if component in avg[name]["missing"]]
            if lacking:
                missing.append(component if len(lacking) == len(per_seed)
                               else f"{component} (seeds {', '.join(lacking)})")
        values = {s: avg[name]["value"] for s, avg in per_seed.items()}
        value = None if missing or not values else aggregate(values)
        out[name] = {"value": value, "missing": missing,
                     "components": [f"{k}/{m}" for part in parts for k, m in part]}
    return out


def summarize(runs: dict[str, dict[int, list[dict[str, float]]]], suite: str | None = None) -> dict:
    """Aggregate per-epoch dev metrics over epochs and seeds.

    Args:
        runs: ``runs[report_key][seed]`` = per-epoch metric dicts in epoch order.
        suite: ``"glue"``/``"superglue"`` to add ``"averages"`` (final and best-epoch), computed
            per seed; None to leave them out.

    Returns:
        ``{"tasks": {key: {metric: V}}, "best_epoch": {"tasks": ...}}`` (plus ``averages`` in both
        when ``suite`` is given); V as in ``aggregate``.
    """
    final: dict[Any, dict[str, dict[str, float]]] = {}
    best: dict[Any, dict[str, dict[str, float]]] = {}
    for key, seeds in runs.items():
        for seed, epochs in seeds.items():
            if not epochs:
                raise ValueError(f"{key}: seed {seed} has no evaluated epoch")
            final.setdefault(seed, {})[key] = dict(epochs[-1])
            # NTNG: each metric's own max over epochs; MNLI-mm is evaluated only after training.
            best.setdefault(seed, {})[key] = dict(epochs[-1]) if key == "mnli-mm" else {
                metric: _nanmax([float(e[metric]) for e in epochs]) for metric in epochs[-1]}

    def collect(per_seed: dict[Any, dict[str, dict[str, float]]]) -> dict[str, dict[str, Any]]:
        tasks: dict[str, dict[str, Any]] = {}
        for key in runs:
            metrics = next(iter(runs[key].values()))[-1]
            tasks[key] = {m: aggregate({s: v[key][m] for s, v in per_seed.items() if key in v and m in v[key]})
                          for m in metrics}
        return tasks

    summary: dict = {"tasks": collect(final), "best_epoch": {"tasks": collect(best)}}
    if suite is not None:
        summary["averages"] = aggregate_averages(final, suite)
        summary["best_epoch"]["averages"] = aggregate_averages(best, suite)
    return summary


# ----------------------------------------------------------------------------------------- writers
