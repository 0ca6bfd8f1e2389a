"""``ntng report``: NTNG's tables, differences, time to target and figures of a synthetic sweep.

The fixture sweep has closed-form numbers: a cell's validation loss is ``8 + 0.01 * seed - k * rst``
(k = 100 for the baseline, ``150 + 10 * seed`` for layer_drop, 50 for sophia), so its time to the
baseline's final loss ``8 + 0.01 * seed - 100 * budget`` is ``100 * budget / k``. Downstream scores
come from ``metrics.summarize`` and ``reports.results_document``, so the files have the real format.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

import pytest

from app.commands import report
from app.errors import ConfigurationError
from app.evaluation import comparison as cmp
from app.evaluation.metrics import summarize
from app.evaluation.reports import results_document

FULL = {"cb": ("f1", "accuracy"), "boolq": ("accuracy",), "copa": ("accuracy",), "rte": ("accuracy",),
        "wic": ("accuracy",), "wsc": ("accuracy",)}
SMALL = {"copa": ("accuracy",), "rte": ("accuracy",)}
OFFSETS = {"cb": 0.10, "boolq": 0.12, "copa": 0.02, "rte": 0.04, "wic": 0.0, "wsc": 0.08}
BRANCH = {"budget": 0.02, "rst_hours": 0.0071}
OOM = "RuntimeError: CUDA out of memory\n  File fit.py, line 3"


def slope(method: str, seed: int) -> float:
    return {"baseline": 100.0, "layer_drop": 150.0 + 10 * seed, "sophia": 50.0}[method]


def loss(method: str, seed: int, rst_hours: float) -> float:
    return 8 + 0.01 * seed - slope(method, seed) * rst_hours


def task_score(task: str, metric: str, method: str, seed: int, ft_seed: int = 0) -> float:
    method_gain = 0.02 * (method == "layer_drop")
    return 0.5 + 0.01 * seed + method_gain + OFFSETS[task] + 0.001 * ft_seed - 0.03 * (metric == "f1")


def write_cell(sweep: Path, method: str, budget: float, seed: int, status: str = "done", tasks=None,
               ft_seeds=(0,), branched_from=None, error=None, results_exist: bool = True) -> Path:
    """A cell directory as ``ntng sweep`` writes it."""
    cell = sweep / "cells" / method / f"b{budget}" / f"s{seed}"
    fit = cell / "fit" / "version_0"
    fit.mkdir(parents=True)
    meta = {"status": status, "method": method, "budget": budget, "unit": "rst_hours", "seed": seed,
            "branched_from": branched_from, "fit_dir": "fit/version_0",
            "finetune": {"superglue": "finetune/superglue/results.json"} if tasks or not results_exist else {},
            "error": error}
    (cell / "cell.json").write_text(json.dumps(meta))
    if status != "done":
        return cell
    val_times = [budget * i / 5 for i in range(1, 6)]
    rows = [{"kind": "train", "rst_hours": budget * i / 10, "updates": 10 * i, "lr_multiplier": min(1.0, i / 2),
             "depth": 12 - (6 * i / 10 if method == "layer_drop" else 0), "loss": 9.0} for i in range(1, 11)]
    rows += [{"kind": "val", "rst_hours": t, "updates": int(t * 6000), "tokens": int(t * 6000) * 4096,
              "loss": loss(method, seed, t)} for t in val_times]
    rows.sort(key=lambda r: r["rst_hours"])
    (fit / "curve.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    updates = int(6100 * budget) + seed
    (fit / "summary.json").write_text(json.dumps({
        "rst_hours": budget + 0.00003, "updates": updates, "tokens_trained": updates * 4096, "tokens_scored": 0,
        "wall_seconds": 41.2 + seed, "final_val_loss": loss(method, seed, budget), "budget": budget,
        "unit": "rst_hours"}))
    if tasks:
        runs = {task: {s: [{m: task_score(task, m, method, seed, s) for m in metrics}] for s in ft_seeds}
                for task, metrics in tasks.items()}
        document = results_document("superglue", summarize(runs, "superglue"), {}, {})
        (cell / "finetune" / "superglue").mkdir(parents=True)
        (cell / "finetune" / "superglue" / "results.json").write_text(json.dumps(document))
    return cell


def build_sweep(sweep: Path) -> Path:
    for seed in range(3):
        write_cell(sweep, "baseline", 0.01, seed, tasks=FULL)
    write_cell(sweep, "layer_drop", 0.01, 0, tasks=FULL, branched_from=BRANCH)
    write_cell(sweep, "layer_drop", 0.01, 1, tasks=FULL)
    write_cell(sweep, "layer_drop", 0.01, 2, status="failed", error=OOM)
    for seed in range(2):
        write_cell(sweep, "sophia", 0.01, seed)  # never fine-tuned
        write_cell(sweep, "baseline", 0.02, seed, tasks=SMALL)  # seed 2 missing from the grid
    write_cell(sweep, "layer_drop", 0.02, 0, tasks=SMALL, ft_seeds=(0, 1))
    write_cell(sweep, "layer_drop", 0.02, 1, results_exist=False)
    write_cell(sweep, "layer_drop", 0.02, 2, tasks=SMALL)
    return sweep


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    return build_sweep(tmp_path_factory.mktemp("sweep"))


@pytest.fixture(scope="module")
def written(sweep) -> dict:
    html_path = report.write_report(sweep, sweep / "report")
    return {"html": html_path, "json": json.loads((sweep / "report" / "report.json").read_text()),
            "md": (sweep / "report" / "report.md").read_text()}


def table_line(md: str, heading: str, start: str) -> str:
    """The Markdown table row starting with ``start`` in the section whose heading starts with ``heading``."""
    section = md.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    return next(line for line in section.splitlines() if line.startswith(start))


def row(rows: list[dict], method: str, budget: float) -> dict:
    return next(r for r in rows if r["method"] == method and r["budget"] == budget)


def ntng_superglue(method: str, seed: int, ft_seeds=(0,)) -> float:
    per_ft = [statistics.mean([task_score("cb", "f1", method, seed, f)]
                              + [task_score(t, "accuracy", method, seed, f) for t in FULL if t != "cb"])
              for f in ft_seeds]
    return statistics.mean(per_ft)


def partial(method: str, seed: int, tasks, ft_seeds=(0,)) -> float:
    # headline = the first metric of each task, mean over fine-tuning seeds
    return statistics.mean(statistics.mean(task_score(t, m[0], method, seed, f) for f in ft_seeds)
                           for t, m in tasks.items())


# ------------------------------------------------------------------------------------ pure math
def test_bootstrap_ci_known_cases():
    assert cmp.bootstrap_ci([0.3, 0.3, 0.3]) == pytest.approx((0.3, 0.3))
    low, high = cmp.bootstrap_ci([-1.0, 0.0, 1.0, -2.0, 2.0])
    assert low < 0.0 < high
    assert cmp.bootstrap_ci([1.0, 2.5, 4.0], seed=3) == cmp.bootstrap_ci([1.0, 2.5, 4.0], seed=3)
    assert cmp.bootstrap_ci([1.0, 2.5, 4.0], confidence=0.5) != cmp.bootstrap_ci([1.0, 2.5, 4.0])
    with pytest.raises(ValueError):
        cmp.bootstrap_ci([])


def test_time_to_target_interpolates_and_handles_the_edges():
    times, losses = [0.1, 0.2, 0.3], [8.0, 6.0, 5.0]
    assert cmp.time_to_target(times, losses, 7.0) == pytest.approx(0.15)
    assert cmp.time_to_target(times, losses, 6.0) == pytest.approx(0.2)  # reached exactly at a point
    assert cmp.time_to_target(times, losses, 9.0) == pytest.approx(0.1)  # the first point already below
    assert cmp.time_to_target(times, losses, 4.0) is None
    assert cmp.time_to_target([0.1, 0.2, 0.3], [8.0, math.nan, 6.0], 7.0) == pytest.approx(0.2)  # NaN skipped
    # The first crossing counts, even when the curve comes back above.
    assert cmp.time_to_target([1, 2, 3, 4], [8, 6, 8, 5], 7) == pytest.approx(1.5)


def test_speed_up_is_the_baseline_s_time_over_the_method_s_not_the_budget():
    # The baseline stops past its budget of 1.0 (at 1.2), where it reaches its final loss 5.0.
    baseline = cmp.Cell("baseline", 1.0, 0, "done", summary={"final_val_loss": 5.0},
                        val_curve=((0.4, 7.0), (0.8, 6.0), (1.2, 5.0)))
    method = cmp.Cell("fast", 1.0, 0, "done", summary={"final_val_loss": 4.0}, val_curve=((0.4, 6.0), (0.8, 4.0)))
    rows = {r["method"]: r for r in cmp.time_to_target_rows([baseline, method])}
    assert rows["baseline"]["mean_speed_up"] == 1.0
    assert rows["fast"]["per_seed"][0]["time_to_target_rst_hours"] == pytest.approx(0.6)
    assert rows["fast"]["mean_speed_up"] == pytest.approx(1.2 / 0.6)


def test_paired_differences_use_only_seeds_both_have():
    assert cmp.paired_differences({0: 1.0, 1: 2.0, 3: 9.0}, {0: 0.5, 1: 1.0, 2: 7.0}) == {0: 0.5, 1: 1.0}


def test_mean_curve_uses_the_range_every_seed_covers():
    curve = cmp.mean_curve([[(0.0, 8.0), (1.0, 6.0)], [(0.5, 7.0), (2.0, 4.0)]], points=3)
    assert list(curve["rst_hours"]) == pytest.approx([0.5, 0.75, 1.0])
    assert list(curve["mean"]) == pytest.approx([7.0, (6.5 + 6.5) / 2, (6.0 + 6.0) / 2])
    assert cmp.mean_curve([[(0.0, 1.0), (1.0, 1.0)], [(2.0, 1.0), (3.0, 1.0)]]) is None


def test_partial_mean_takes_each_task_s_first_metric_and_the_fine_tuning_seed_mean(sweep):
    cell = report.load_cell(sweep / "cells" / "layer_drop" / "b0.02" / "s0", "final")
    score = cell.scores[cmp.PARTIAL]
    assert score.tasks == ("superglue/copa", "superglue/rte") and score.components == 2
    assert score.value == pytest.approx(partial("layer_drop", 0, SMALL, (0, 1)))
    assert cell.scores["ntng_superglue"].value is None
    assert cell.scores["ntng_superglue"].missing == ("cb/f1", "boolq/accuracy", "wic/accuracy", "wsc/accuracy")


def test_best_epoch_scores_are_the_per_metric_maxima():
    runs = {"copa": {0: [{"accuracy": 0.6}, {"accuracy": 0.5}]}, "rte": {0: [{"accuracy": 0.4}, {"accuracy": 0.7}]}}
    document = results_document("superglue", summarize(runs, "superglue"), {}, {})
    assert cmp.downstream_scores({"superglue": document})[cmp.PARTIAL].value == pytest.approx(0.6)
    assert cmp.downstream_scores({"superglue": document}, "best")[cmp.PARTIAL].value == pytest.approx(0.65)


# --------------------------------------------------------------------------------------- tables
def test_table_1_means_and_sample_stds(written):
    rows = written["json"]["table1"]
    assert [(r["method"], r["budget"]) for r in rows] == [
        ("baseline", 0.01), ("layer_drop", 0.01), ("sophia", 0.01), ("baseline", 0.02), ("layer_drop", 0.02)]
    base = row(rows, "baseline", 0.01)
    losses = [loss("baseline", s, 0.01) for s in range(3)]
    assert base["n"] == 3
    assert base["final_val_loss"]["mean"] == pytest.approx(statistics.mean(losses))
    assert base["final_val_loss"]["std"] == pytest.approx(statistics.stdev(losses))
    assert base["updates"] == pytest.approx(statistics.mean(61 + s for s in range(3)))
    assert base["wall_seconds"] == pytest.approx(42.2)
    glue = base["downstream"]["ntng_superglue"]
    assert glue["mean"] == pytest.approx(statistics.mean(ntng_superglue("baseline", s) for s in range(3)))
    assert glue["std"] == pytest.approx(statistics.stdev(ntng_superglue("baseline", s) for s in range(3)))
    assert base["downstream"][cmp.PARTIAL]["mean"] == pytest.approx(
        statistics.mean(partial("baseline", s, FULL) for s in range(3)))

    dropped = row(rows, "layer_drop", 0.02)  # seed 1 has no results file
    assert dropped["n"] == 3 and dropped["downstream"]["ntng_superglue"]["mean"] is None
    part = dropped["downstream"][cmp.PARTIAL]
    assert part["n"] == 2 and part["mean"] == pytest.approx(
        statistics.mean([partial("layer_drop", 0, SMALL, (0, 1)), partial("layer_drop", 2, SMALL)]))
    assert row(rows, "layer_drop", 0.01)["n"] == 2 and row(rows, "layer_drop", 0.01)["cells"] == 3
    assert row(rows, "layer_drop", 0.01)["branched"] == [{"seed": 0, **BRANCH}]
    assert written["json"]["averages"] == ["ntng_superglue", cmp.PARTIAL]


def test_table_1_shows_missing_components_and_the_labelled_partial_mean(written):
    md = written["md"]
    line = table_line(md, "Table 1", "| layer_drop | 0.02 RST h |")
    assert "— (not fine-tuned: seed 1; missing 4 of 6: cb/f1, boolq/accuracy, wic/accuracy, wsc/accuracy)" in line
    assert "(2 tasks; 2 of 3 seeds)" in line
    assert "mean of tasks run (partial)" in md
    assert "— (not fine-tuned)" in table_line(md, "Table 1", "| sophia | 0.01 RST h |")
    assert "layer_drop†" in md
    assert "cooldown branched from the 0.02 h run at 0.0071 RST h; charged the shared part" in md
    assert "ntng_glue: no cell has GLUE fine-tuning results" in md


def test_differences_pair_seeds_and_bootstrap_them(written):
    rows = written["json"]["differences"]
    small = row(rows, "layer_drop", 0.01)
    differences = [loss("layer_drop", s, 0.01) - loss("baseline", s, 0.01) for s in (0, 1)]
    assert small["final_val_loss"]["seeds"] == [0, 1]
    assert small["final_val_loss"]["mean"] == pytest.approx(statistics.mean(differences))
    assert small["final_val_loss"]["ci"] == pytest.approx(list(cmp.bootstrap_ci(differences)))
    assert small["final_val_loss"]["excludes_zero"]
    glue = [ntng_superglue("layer_drop", s) - ntng_superglue("baseline", s) for s in (0, 1)]
    assert small["ntng_superglue"]["mean"] == pytest.approx(statistics.mean(glue))

    large = row(rows, "layer_drop", 0.02)  # seed 2 has no baseline, seed 1 no fine-tuning result
    assert large["final_val_loss"]["seeds"] == [0, 1]
    assert large[cmp.PARTIAL]["seeds"] == [0] and large[cmp.PARTIAL]["ci"] is None
    assert large[cmp.PARTIAL]["mean"] == pytest.approx(
        partial("layer_drop", 0, SMALL, (0, 1)) - partial("baseline", 0, SMALL))
    assert large["ntng_superglue"]["n"] == 0
    # The partial mean at 0.01 pairs the same six tasks.
    assert small[cmp.PARTIAL]["seeds"] == [0, 1]
    assert table_line(written["md"], "Difference", "| layer_drop | 0.02 RST h |").endswith("| +2.0 (n=1) |")
    assert " * (n=2)" in table_line(written["md"], "Difference", "| layer_drop | 0.01 RST h |")


def test_time_to_target_and_speed_up(written):
    rows = written["json"]["time_to_target"]
    fast = row(rows, "layer_drop", 0.01)
    times = [100 * 0.01 / slope("layer_drop", s) for s in (0, 1)]
    assert [p["time_to_target_rst_hours"] for p in fast["per_seed"]] == pytest.approx(times)
    assert fast["mean_time_to_target_rst_hours"] == pytest.approx(statistics.mean(times))
    assert fast["mean_speed_up"] == pytest.approx(statistics.mean([1.5, 1.6]))
    assert (fast["reached"], fast["n"]) == (2, 2)
    baseline = row(rows, "baseline", 0.01)
    assert baseline["mean_speed_up"] == pytest.approx(1.0) and baseline["reached"] == 3
    slow = row(rows, "sophia", 0.01)
    assert (slow["reached"], slow["n"], slow["mean_speed_up"]) == (0, 2, None)
    # Seed 2 at 0.02 has no baseline seed: its target is the mean of the baseline's seeds.
    unpaired = row(rows, "layer_drop", 0.02)["per_seed"][-1]
    target = statistics.mean(loss("baseline", s, 0.02) for s in (0, 1))
    assert unpaired["target_from"] == "baseline mean" and unpaired["target"] == pytest.approx(target)
    assert unpaired["time_to_target_rst_hours"] == pytest.approx((8.02 - target) / slope("layer_drop", 2))
    assert "| not reached | 0/2 |" in table_line(written["md"], "Time to", "| sophia | 0.01 RST h |")


# ---------------------------------------------------------------------------------------- files
def test_every_figure_is_written_and_the_html_is_self_contained(written, sweep):
    for name in ("val_loss.png", "downstream.png", "speed_up.png", "schedules.png"):
        assert (sweep / "report" / name).stat().st_size > 1000
        assert f"]({name})" in written["md"]
    text = written["html"].read_text()
    references = re.findall(r'(?:src|href)\s*=\s*["\']?([^"\'\s>]*)', text)
    assert len(references) == 4 and all(r.startswith("data:image/png;base64,") for r in references)
    assert text.count("<table>") == 3
    for heading in ("Table 1", "Difference from the baseline", "Time to the baseline", "How to read this"):
        assert heading in text and heading in written["md"]


def test_cells_not_done_are_listed(written):
    listed = written["json"]["listed"]
    assert any(li.startswith("failed: cells/layer_drop/b0.01/s2: RuntimeError: CUDA out of memory")
               and "line 3" not in li for li in listed)
    assert "missing: baseline at 0.02, seed 2 (no cell.json)" in listed
    assert any("missing fine-tuning result: cells/layer_drop/b0.02/s1: superglue" in li for li in listed)
    assert written["json"]["counts"] == {"done": 12, "failed": 1, "missing": 5, "unreadable": 0}
    assert "failed: cells/layer_drop/b0.01/s2" in written["md"]


def test_hparams_summaries_for_done_cells(written, sweep):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    for cell_json in sweep.glob("cells/*/*/*/cell.json"):
        events = list((cell_json.parent / "hparams").glob("events.out.tfevents.*"))
        if json.loads(cell_json.read_text())["status"] == "done":
            assert events and any(b"final/val_loss" in e.read_bytes() for e in events)
        else:
            assert not events
    accumulator = EventAccumulator(str(sweep / "cells" / "layer_drop" / "b0.02" / "s2" / "hparams"))
    accumulator.Reload()
    content = accumulator.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert (hparams["method"].string_value, hparams["budget"].number_value, hparams["seed"].number_value) == (
        "layer_drop", 0.02, 2)


def test_cli_writes_elsewhere_skips_empty_figures_and_reruns_cleanly(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    write_cell(sweep, "baseline", 0.01, 0)
    report.main([str(sweep), "--output", str(tmp_path / "out")])
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(tmp_path / "out" / "report.html")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Not drawn: downstream.png (no fine-tuning results)" in md
    assert not (tmp_path / "out" / "downstream.png").exists() and not (sweep / "report").exists()
    events = sorted((sweep / "cells/baseline/b0.01/s0/hparams").glob("events.out.tfevents.*"))
    report.main([str(sweep), "--output", str(tmp_path / "out")])
    assert len(sorted((sweep / "cells/baseline/b0.01/s0/hparams").glob("events.out.tfevents.*"))) == len(events)


def test_unreadable_and_incomplete_cells_are_listed(tmp_path):
    sweep = tmp_path / "sweep"
    write_cell(sweep, "baseline", 0.01, 0)
    (write_cell(sweep, "baseline", 0.01, 1) / "fit" / "version_0" / "summary.json").unlink()
    (write_cell(sweep, "baseline", 0.01, 2) / "cell.json").write_text("{not json")
    data = json.loads(report.write_report(sweep, tmp_path / "out").with_name("report.json").read_text())
    assert data["counts"] == {"done": 1, "incomplete": 1, "missing": 0, "unreadable": 1}
    assert any(li.startswith("incomplete: cells/baseline/b0.01/s1: done, but its fit files are unreadable")
               for li in data["listed"])
    assert any(li.startswith("unreadable cell.json: cells/baseline/b0.01/s2: JSONDecodeError") for li in data["listed"])


def test_a_directory_without_cells_is_a_configuration_error(tmp_path):
    with pytest.raises(ConfigurationError, match=r"no sweep cells under .* \(expected .*/cells/<method>/b<budget>"
                                                 r"/s<seed>/cell.json\)"):
        report.write_report(tmp_path, tmp_path / "report")


def test_sni_rouge_l_is_a_table_column(tmp_path):
    from app.evaluation.comparison import downstream_scores

    document = {"suite": "sni", "tasks": {"sni": {"rouge_l": 0.25, "exact_match": 0.1}}, "averages": {},
                "best_epoch": {"tasks": {"sni": {"rouge_l": 0.3, "exact_match": 0.1}}, "averages": {}}}
    scores = downstream_scores({"sni": document})
    assert scores["sni_rouge_l"].value == 0.25 and scores["sni_rouge_l"].missing == ()
    assert downstream_scores({"sni": document}, epoch="best")["sni_rouge_l"].value == 0.3
    missing = downstream_scores({"sni": {**document, "tasks": {"sni": {}}}})["sni_rouge_l"]
    assert missing.value is None and missing.missing == ("sni/rouge_l",)
