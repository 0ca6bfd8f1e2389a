"""Scoring, aggregation and report files of ``app.evaluation.metrics``, against hand-computed values."""

from __future__ import annotations

import json
import math

import pytest

from app.evaluation import metrics as ev
from app.evaluation import reports
from datamodules.tasks.spec import Example, TaskSpec


def spec(name, suite="glue", kind="classification", labels=("0", "1"), metrics=("accuracy",), **kw):
    """A task spec built here, independent of the suite registries."""
    return TaskSpec(name=name, suite=suite, kind=kind, label_names=labels, metrics=metrics,
                    directory=kw.pop("directory", name.upper()), reader=lambda d, s: [], **kw)


def labelled(labels):
    return [Example(idx=i, segments=("a",), label=label) for i, label in enumerate(labels)]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------------------ score
def test_accuracy_and_binary_f1():
    mrpc = spec("mrpc", metrics=("f1", "accuracy"))
    # tp=2 fp=1 fn=1 -> P = R = 2/3 -> F1 = 2/3; 3 of 5 right.
    got = ev.score(mrpc, labelled([1, 0, 0, 1, 1]), [1, 1, 0, 1, 0])
    assert list(got) == ["f1", "accuracy"]
    assert got["f1"] == pytest.approx(2 / 3)
    assert got["accuracy"] == pytest.approx(0.6)
    # F1 of class 1 is 0 when it is never predicted.
    assert ev.score(mrpc, labelled([1, 0]), [0, 0])["f1"] == 0.0


def test_cb_macro_f1():
    cb = spec("cb", suite="superglue", labels=("entailment", "contradiction", "neutral"),
              metrics=("accuracy", "f1"))
    # per class F1: 0 -> 2/4, 1 -> 4/5, 2 -> 2/3
    got = ev.score(cb, labelled([0, 0, 1, 2, 2, 1]), [0, 1, 1, 2, 0, 1])
    assert got["accuracy"] == pytest.approx(4 / 6)
    assert got["f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)


def test_matthews_and_constant_predictions():
    cola = spec("cola", metrics=("matthews",))
    # tp=2 fp=1 tn=1 fn=1 -> (2*1 - 1*1) / sqrt(3*3*2*2) = 1/6
    assert ev.score(cola, labelled([1, 0, 0, 1, 1]), [1, 1, 0, 0, 1])["matthews"] == pytest.approx(1 / 6)
    assert ev.score(cola, labelled([1, 0, 0, 1]), [1, 1, 1, 1])["matthews"] == 0.0


def test_pearson_spearman_and_constant_vector():
    stsb = spec("stsb", kind="regression", labels=(), metrics=("pearson", "spearman"))
    got = ev.score(stsb, labelled([1.0, 2.0, 4.0]), [1.0, 2.0, 3.0])
    assert got["pearson"] == pytest.approx(9 / math.sqrt(84))
    assert got["spearman"] == pytest.approx(1.0)
    # ties get average ranks: [1, 2.5, 2.5, 4] vs [1, 3, 2, 4] -> 4.5 / sqrt(4.5 * 5)
    tied = ev.score(stsb, labelled([1.0, 3.0, 2.0, 4.0]), [1.0, 2.0, 2.0, 3.0])
    assert tied["spearman"] == pytest.approx(4.5 / math.sqrt(22.5))
    constant = ev.score(stsb, labelled([1.0, 2.0, 3.0]), [2.0, 2.0, 2.0])
    assert math.isnan(constant["pearson"]) and math.isnan(constant["spearman"])


@pytest.mark.parametrize("with_group", [True, False])
def test_multirc_f1a_and_exact_match(with_group):
    multirc = spec("multirc", suite="superglue", metrics=("f1", "exact_match"))
    rows = [(0, 0, 0, 1, 1), (0, 0, 1, 0, 0), (0, 0, 2, 1, 0), (0, 1, 0, 0, 0), (0, 1, 1, 1, 1)]
    examples = [Example(idx={"paragraph": p, "question": q, "answer": a}, segments=("x",), label=label,
                        group=(p, q) if with_group else None) for p, q, a, label, _ in rows]
    got = ev.score(multirc, examples, [pred for *_, pred in rows])
    # tp=2 fp=0 fn=1 -> F1a 0.8; question 0 has a wrong answer, question 1 is all right.
    assert got == {"f1": pytest.approx(0.8), "exact_match": pytest.approx(0.5)}


def test_record_normalisation_and_multiple_answers():
    record = spec("record", suite="superglue", kind="multiple_choice", labels=(),
                  metrics=("f1", "exact_match"))

    def query(i, candidates, answers):
        return Example(idx=i, candidates=tuple((c,) for c in candidates), label=0,
                       answers=tuple(answers), candidate_texts=tuple(candidates))

    examples = [
        query(0, ["The Eiffel Tower", "Paris"], ["Eiffel Tower!"]),  # article, punctuation, case
        query(1, ["Barack Obama", "Obama Administration"], ["Obama", "President Obama"]),
        query(2, ["the United States"], ["U.S.", "united states"]),  # second answer matches
        query(3, ["A cat"], ["dog"]),
    ]
    got = ev.score(record, examples, [0, 1, 0, 0])
    # query 1: "obama administration" vs "obama" -> 2/3, vs "president obama" -> 1/2; max 2/3
    assert got["f1"] == pytest.approx((1 + 2 / 3 + 1 + 0) / 4)
    assert got["exact_match"] == pytest.approx(2 / 4)


def test_score_rejects_bad_input():
    rte = spec("rte")
    with pytest.raises(ValueError):
        ev.score(rte, labelled([0, 1]), [0])
    with pytest.raises(ValueError):
        ev.score(rte, [Example(idx=0, segments=("a",))], [0])


# -------------------------------------------------------------------------------------- summarize
def test_summarize_final_best_epoch_and_mnli_mm():
    runs = {
        "rte": {0: [{"accuracy": 0.5}, {"accuracy": 0.7}, {"accuracy": 0.6}]},
        "mrpc": {0: [{"f1": 0.8, "accuracy": 0.70}, {"f1": 0.75, "accuracy": 0.72}]},
        "mnli-m": {0: [{"accuracy": 0.6}, {"accuracy": 0.8}, {"accuracy": 0.7}]},
        "mnli-mm": {0: [{"accuracy": 0.6}, {"accuracy": 0.8}, {"accuracy": 0.7}]},
    }
    out = ev.summarize(runs)
    assert out["tasks"]["rte"] == {"accuracy": 0.6}  # one seed -> plain float
    assert out["best_epoch"]["tasks"]["rte"] == {"accuracy": 0.7}
    assert out["tasks"]["mrpc"] == {"f1": 0.75, "accuracy": 0.72}
    # NTNG: each metric's own max, even from different epochs
    assert out["best_epoch"]["tasks"]["mrpc"] == {"f1": 0.8, "accuracy": 0.72}
    assert out["best_epoch"]["tasks"]["mnli-m"] == {"accuracy": 0.8}
    assert out["best_epoch"]["tasks"]["mnli-mm"] == {"accuracy": 0.7}  # evaluated once, at the end
    assert "averages" not in out


def test_summarize_three_seeds():
    runs = {"rte": {s: [{"accuracy": 0.9}, {"accuracy": v}] for s, v in [(0, 0.6), (1, 0.7), (2, 0.8)]}}
    value = ev.summarize(runs)["tasks"]["rte"]["accuracy"]
    assert value["mean"] == pytest.approx(0.7)
    assert value["std"] == pytest.approx(0.1)  # sample std, ddof=1
    assert value["per_seed"] == {"0": 0.6, "1": 0.7, "2": 0.8}
    best = ev.summarize(runs)["best_epoch"]["tasks"]["rte"]["accuracy"]
    assert best["mean"] == pytest.approx(0.9) and best["std"] == pytest.approx(0.0)


GLUE = {"cola": {"matthews": 0.3}, "sst2": {"accuracy": 0.9}, "mrpc": {"f1": 0.85, "accuracy": 0.8},
        "stsb": {"pearson": 0.8, "spearman": 0.7}, "qqp": {"f1": 0.8, "accuracy": 0.84},
        "mnli-m": {"accuracy": 0.8}, "mnli-mm": {"accuracy": 0.82}, "qnli": {"accuracy": 0.88},
        "rte": {"accuracy": 0.6}, "wnli": {"accuracy": 0.5}}


def test_glue_averages_and_missing_task():
    avg = ev.averages(GLUE, "glue")
    assert avg["ntng_glue"]["value"] == pytest.approx((0.8 + 0.88 + 0.85 + 0.8 + 0.82 + 0.8 + 0.9 + 0.6 + 0.3) / 9)
    assert avg["glue_score"]["value"] == pytest.approx(
        (0.3 + 0.9 + 0.825 + 0.75 + 0.82 + 0.81 + 0.88 + 0.6 + 0.5) / 9)
    assert avg["ntng_glue"]["missing"] == []
    partial = ev.averages({k: v for k, v in GLUE.items() if k != "qqp"}, "glue")
    assert partial["ntng_glue"] == {"value": None, "missing": ["qqp/f1"],
                                    "components": avg["ntng_glue"]["components"]}
    assert partial["glue_score"]["value"] is None
    assert partial["glue_score"]["missing"] == ["qqp/f1", "qqp/accuracy"]


def test_superglue_averages():
    values = {"boolq": {"accuracy": 0.8}, "cb": {"accuracy": 0.9, "f1": 0.7}, "copa": {"accuracy": 0.6},
              "multirc": {"f1": 0.5, "exact_match": 0.1}, "record": {"f1": 0.4, "exact_match": 0.3},
              "rte": {"accuracy": 0.65}, "wic": {"accuracy": 0.55}, "wsc": {"accuracy": 0.62}}
    avg = ev.averages(values, "superglue")
    assert avg["superglue_score"]["value"] == pytest.approx((0.8 + 0.8 + 0.6 + 0.3 + 0.35 + 0.65 + 0.55 + 0.62) / 8)
    assert avg["ntng_superglue"]["value"] == pytest.approx(3.92 / 6)
    assert avg["ntng_superglue_code"]["value"] == pytest.approx(4.42 / 7)
    no_record = ev.averages({k: v for k, v in values.items() if k != "record"}, "superglue")
    assert no_record["superglue_score"]["value"] is None
    assert no_record["ntng_superglue_code"]["value"] == pytest.approx(4.42 / 7)  # ReCoRD not a part


def test_summarize_averages_per_seed():
    runs = {key: {s: [{m: v + 0.01 * s for m, v in metrics.items()}] for s in (0, 1)}
            for key, metrics in GLUE.items()}
    out = ev.summarize(runs, "glue")
    ntng = out["averages"]["ntng_glue"]["value"]
    base = ev.averages(GLUE, "glue")["ntng_glue"]["value"]
    assert ntng["per_seed"]["0"] == pytest.approx(base)
    assert ntng["per_seed"]["1"] == pytest.approx(base + 0.01)
    assert ntng["mean"] == pytest.approx(base + 0.005)
    # a task run for only one of the seeds: null, and the seed is named
    runs["qqp"] = {0: runs["qqp"][0]}
    avg = ev.summarize(runs, "glue")["best_epoch"]["averages"]["ntng_glue"]
    assert avg["value"] is None and avg["missing"] == ["qqp/f1 (seeds 1)"]


# ---------------------------------------------------------------------------------------- writers
def test_results_json_round_trip_with_nan(tmp_path):
    runs = {"stsb": {0: [{"pearson": math.nan, "spearman": 0.5}]}, "rte": {0: [{"accuracy": 0.6}]}}
    results = ev.summarize(runs, "glue")
    path = reports.write_results(tmp_path, "glue", results, {"qqp": "data not found"}, {"lr": 4e-5})
    assert path == tmp_path / "results.json"
    data = json.loads(path.read_text())
    assert data["suite"] == "glue"
    assert data["tasks"]["stsb"] == {"pearson": None, "spearman": 0.5}
    assert data["best_epoch"]["tasks"]["rte"] == {"accuracy": 0.6}
    assert data["averages"]["ntng_glue"]["value"] is None
    assert "qqp/f1" in data["averages"]["ntng_glue"]["missing"]
    assert data["skipped"] == {"qqp": "data not found"} and data["settings"] == {"lr": 4e-5}
    with pytest.raises(ValueError):
        reports.write_results(tmp_path, "glue", ev.summarize(runs), {}, {})  # no averages


def test_markdown_table():
    runs = {key: {s: [{m: v for m, v in metrics.items()}] for s in (0, 1, 2)}
            for key, metrics in GLUE.items() if key != "qqp"}
    runs["rte"] = {s: [{"accuracy": 0.6 + 0.01 * s}] for s in (0, 1, 2)}
    document = reports.results_document("glue", ev.summarize(runs, "glue"), {"qqp": "data not found"}, {})
    table = reports.markdown_table(document, document["skipped"])
    assert "| rte | accuracy | 61.0 ± 1.0 | 61.0 ± 1.0 |" in table
    assert "| mrpc | f1 / accuracy | 85.0 ± 0.0 / 80.0 ± 0.0 |" in table
    assert "**ntng_glue**" in table and "**glue_score**" in table
    assert "missing: qqp/f1" in table
    assert "- qqp: data not found" in table


def test_write_predictions(tmp_path):
    stsb = spec("stsb", kind="regression", labels=(), metrics=("pearson",))
    rows = read_jsonl(reports.write_predictions(tmp_path / "stsb.jsonl", stsb, labelled([3.5, 1.0]), [3.25, 0.5]))
    assert rows == [{"idx": 0, "label": 3.5, "prediction": 3.25}, {"idx": 1, "label": 1.0, "prediction": 0.5}]
    record = spec("record", suite="superglue", kind="multiple_choice", labels=(), metrics=("f1",))
    example = Example(idx=7, candidates=(("a",), ("b",)), label=1, answers=("Rome",),
                      candidate_texts=("Paris", "Rome"))
    rows = read_jsonl(reports.write_predictions(tmp_path / "record.jsonl", record, [example], [0]))
    assert rows == [{"idx": 7, "label": 1, "prediction": 0, "prediction_text": "Paris"}]


def test_glue_submission_classification_and_stsb(tmp_path):
    rte = spec("rte", labels=("entailment", "not_entailment"), submission_name="RTE.tsv")
    test = [Example(idx=i, segments=("a", "b")) for i in range(3)]
    path = reports.write_submission(tmp_path, rte, "test", test, [1, 0, 1])
    assert path.name == "RTE.tsv"
    assert path.read_text() == "index\tprediction\n0\tnot_entailment\n1\tentailment\n2\tnot_entailment\n"
    stsb = spec("stsb", kind="regression", labels=(), metrics=("pearson",), submission_name="STS-B.tsv")
    text = reports.write_submission(tmp_path, stsb, "test", test, [5.7, -0.2, 2.5]).read_text()
    assert text.splitlines()[1:] == ["0\t5.0", "1\t0.0", "2\t2.5"]


@pytest.mark.parametrize("submission_name", ["MNLI-m.tsv", "MNLI.tsv"])
def test_mnli_submission_names(tmp_path, submission_name):
    mnli = spec("mnli", labels=("entailment", "neutral", "contradiction"), submission_name=submission_name,
                dev_splits=("dev_matched", "dev_mismatched"), test_splits=("test_matched", "test_mismatched"))
    test = [Example(idx=0, segments=("a", "b"))]
    assert reports.write_submission(tmp_path, mnli, "test_matched", test, [2]).name == "MNLI-m.tsv"
    path = reports.write_submission(tmp_path, mnli, "test_mismatched", test, [1])
    assert path.name == "MNLI-mm.tsv" and path.read_text().splitlines()[1] == "0\tneutral"


def test_multirc_submission_nesting(tmp_path):
    multirc = spec("multirc", suite="superglue", metrics=("f1",), submission_name="MultiRC.jsonl")
    keys = [(0, 0, 0), (0, 0, 1), (0, 1, 2), (1, 2, 3)]
    test = [Example(idx={"paragraph": p, "question": q, "answer": a}, segments=("x",)) for p, q, a in keys]
    rows = read_jsonl(reports.write_submission(tmp_path, multirc, "test", test, [1, 0, 1, 0]))
    assert rows == [
        {"idx": 0, "passage": {"questions": [{"idx": 0, "answers": [{"idx": 0, "label": 1}, {"idx": 1, "label": 0}]},
                                             {"idx": 1, "answers": [{"idx": 2, "label": 1}]}]}},
        {"idx": 1, "passage": {"questions": [{"idx": 2, "answers": [{"idx": 3, "label": 0}]}]}},
    ]


def test_superglue_submission_labels(tmp_path):
    test = [Example(idx=i, segments=("a",)) for i in range(2)]
    cases = [(spec("boolq", suite="superglue", labels=("False", "True")), ["false", "true"]),
             (spec("wic", suite="superglue", labels=("false", "true")), ["false", "true"]),
             (spec("wsc", suite="superglue", labels=("false", "true")), ["False", "True"]),
             (spec("cb", suite="superglue", labels=("entailment", "contradiction", "neutral")),
              ["entailment", "contradiction"]),
             (spec("copa", suite="superglue", kind="multiple_choice", labels=()), [0, 1])]
    for task, expected in cases:
        rows = read_jsonl(reports.write_submission(tmp_path, task, "test", test, [0, 1]))
        assert [row["label"] for row in rows] == expected, task.name
        assert [row["idx"] for row in rows] == [0, 1]
    record = spec("record", suite="superglue", kind="multiple_choice", labels=(), submission_name="ReCoRD.jsonl")
    query = Example(idx=5, candidates=(("a",), ("b",)), candidate_texts=("Paris", "Rome"))
    path = reports.write_submission(tmp_path, record, "test", [query], [1])
    assert path.name == "ReCoRD.jsonl" and read_jsonl(path) == [{"idx": 5, "label": "Rome"}]
