"""Every method under DDP on CPU: two gloo processes, the tiny BERT and T5 recipes of ``test_methods``.

Per family the two processes are launched once and run the eight methods' fits one after another
(each in its own directory), as ``ntng fit`` under ``torchrun`` would (Lightning sees ``LOCAL_RANK``
and launches nothing itself). Each rank records, at every micro-batch, the update, the layers every
stack ran, their output scales, the model's depth, the rows trained, the clock and the stop flag; at
every optimizer step, which parameters had a gradient. The parent then checks, per method:

* every rank made the same layer choices (drop, path, stack depth) and trained as many rows, at
  every micro-batch (batch selection: each rank its own examples, never another's);
* every rank's clock read the same at every micro-batch and at the end (so LR, cadence and the stop
  agree), and every rank stopped at the same update;
* every rank took every step (optimizer steps == updates == the clock's count, every micro-batch
  of every update ran), with gradients on the same parameters;
* the weights are bitwise equal on both ranks at the end.

The whole launch has a hard time-out: a hang fails naming the method (and update) each rank was in.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch import Callback
from torch.multiprocessing.spawn import ProcessExitedException, ProcessRaisedException

from callbacks.selection import BatchSelection
from tests.test_methods import METHODS, method_run

pytestmark = [
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo"),
    pytest.mark.slow,  # two gloo processes, eight fits each: about 20 s per family on 2 cores
]

WORLD_SIZE = 2
LAUNCH_TIMEOUT_S = 240  # per family; a healthy launch takes about 20 s on 2 (shared) cores
# Methods that leave layers without gradient need DDP's unused-parameter search (setup refuses
# plain DDP for them); the others run under plain DDP.
FIND_UNUSED = {"layer_drop", "raptr", "stacking"}
# Two micro-batches per update (so the micro-step logic runs under DDP) and twice the budget of
# test_methods (about ten updates again).
BUDGET_FACTOR = 2
EXTRA = {
    # BERT: no fixed layer, so the first stage draws one of the two layers at random (T5's block 0
    # is always in the path, which leaves a 2-block T5 nothing to draw).
    ("bert", "raptr"): ["--trainer.callbacks.fixed_layers=[]"],
    # Refresh the Hessian every other update, not only at update 0.
    ("bert", "sophia"): ["--trainer.callbacks.every_n_steps=2"],
    ("t5", "sophia"): ["--trainer.callbacks.every_n_steps=2"],
}
RANDOM_LAYERS = {"layer_drop", "raptr"}  # the run must have drawn more than one layer set
SELECTION = {"selective_backprop", "rho_loss"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RankRecorder(Callback):
    """What this rank did at every micro-batch and optimizer step (appended last: it sees every
    method callback's choice and the budget callback's stop)."""

    def __init__(self, progress: Path, case: str) -> None:
        self.progress, self.case = progress, case
        self.micro: list[dict] = []
        self.steps: list[dict] = []
        self.example_ids: list[tuple[int | None, list[int]]] = []  # (candidate epoch, ids) per micro-batch

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        self.steps.append({"update": trainer.global_step, "with_grad": [p.grad is not None for p in params]})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        layers = pl_module.layers
        self.micro.append({
            "update": trainer.global_step, "batch_idx": batch_idx,
            "active": {s: layers.active_layers(s) for s in layers.stack_names},
            "scales": {s: layers.output_scales(s) for s in layers.stack_names},
            "model_depth": pl_module.model_depth, "rows": int(batch["input_ids"].shape[0]),
            "clock": pl_module.clock.state_dict(), "should_stop": bool(trainer.should_stop),
        })
        # Batch selection: this rank's candidate epoch (ranks' streams are disjoint within an epoch).
        selection = next((c for c in trainer.callbacks if isinstance(c, BatchSelection)), None)
        epoch = selection.stream.epoch if selection is not None else None
        self.example_ids.append((epoch, batch["example_ids"].tolist()))
        self.progress.write_text(f"{self.case}, update {trainer.global_step}")

    def result(self, cli) -> dict:
        module, trainer = cli.model, cli.trainer
        return {
            "updates": trainer.global_step, "accumulate": trainer.accumulate_grad_batches,
            "world_size": trainer.world_size, "strategy": type(trainer.strategy).__name__,
            "clock": module.clock.state_dict(), "micro": self.micro, "steps": self.steps,
            "example_ids": self.example_ids,
            "weights": {k: v.detach().cpu().clone() for k, v in module.state_dict().items()},
        }


def _worker(rank: int, port: int, cases: list[dict], out: str) -> None:
    os.setsid()  # its own process group: the parent's time-out kills it with anything it started
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD_SIZE),
                      RANK=str(rank), LOCAL_RANK=str(rank), NODE_RANK="0", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from app.recipe import build_recipe

    out = Path(out)
    progress = out / f"rank{rank}.progress"
    case = None
    try:
        for case in cases:
            progress.write_text(f"{case['name']}, setting up")
            cli = build_recipe(case["configs"], case["overrides"])
            recorder = RankRecorder(progress, case["name"])
            cli.trainer.callbacks.append(recorder)
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
            torch.save(recorder.result(cli), out / f"{case['name']}-rank{rank}.pt")
        progress.write_text("done")
    except BaseException:
        (out / f"rank{rank}.error").write_text(f"{case and case['name']}\n{traceback.format_exc()}")
        raise


def _kill(context) -> None:
    for process in context.processes:
        if process.pid is None:
            continue
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the worker's own group (os.setsid)
        except (ProcessLookupError, PermissionError):
            pass
        process.join(5)


def _where(out: Path) -> str:
    places = []
    for rank in range(WORLD_SIZE):
        progress = out / f"rank{rank}.progress"
        places.append(f"rank {rank}: " + (progress.read_text() if progress.is_file() else "not started"))
    return "; ".join(places)


def launch(cases: list[dict], out: Path, timeout: float = LAUNCH_TIMEOUT_S) -> None:
    """Run ``cases`` on two gloo ranks; fail naming the case on an error or after ``timeout`` s."""
    context = torch.multiprocessing.start_processes(
        _worker, args=(_free_port(), cases, str(out)), nprocs=WORLD_SIZE, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                if context.join(timeout=min(2.0, max(0.1, deadline - time.monotonic()))):
                    return
            except (ProcessRaisedException, ProcessExitedException) as err:
                errors = [(out / f"rank{r}.error") for r in range(WORLD_SIZE)]
                details = "\n".join(e.read_text() for e in errors if e.is_file()) or str(err)
                pytest.fail(f"a DDP rank failed ({_where(out)}):\n{details}", pytrace=False)
            if time.monotonic() > deadline:
                pytest.fail(f"the DDP launch hung: killed after {timeout:.0f} s ({_where(out)})", pytrace=False)
    finally:
        _kill(context)


def ddp_case(family: str, method: str, sample_corpus, tmp_path: Path) -> dict:
    directory = tmp_path / method
    directory.mkdir()
    run = method_run(family, method, sample_corpus, directory)
    budget = next(a for a in run.overrides if a.startswith("--budget.budget="))
    strategy = "ddp_find_unused_parameters_true" if method in FIND_UNUSED else "ddp"
    # As ntng fit runs: the recipe's TensorBoard logger (the run directory rank 0 writes the curve, summary
    # and export to), validation paced by the budget.
    overrides = [*(a for a in run.overrides if a != "--trainer.logger=false"),
                 f"--trainer.logger.init_args.save_dir={directory / 'runs'}", "--budget.validate_every_fraction=0.5",
                 f"--budget.budget={float(budget.split('=')[1]) * BUDGET_FACTOR}",
                 f"--trainer.strategy={strategy}", f"--trainer.devices={WORLD_SIZE}", "--trainer.accelerator=cpu",
                 "--trainer.num_nodes=1", "--trainer.accumulate_grad_batches=2", "--trainer.enable_model_summary=false",
                 f"--trainer.default_root_dir={directory}", *EXTRA.get((family, method), [])]
    return {"name": method, "configs": run.configs, "overrides": overrides, "single": run.overrides,
            "runs": str(directory / "runs")}


def _prepare_data(case: dict) -> None:
    """Build the tokenizer and block cache once in the parent (the ranks share the cache)."""
    from app.recipe import build_recipe

    build_recipe(case["configs"], case["single"]).datamodule.prepare_data()


def disagreements(method: str, ranks: list[dict]) -> list[str]:
    """What the ranks' records of ``method``'s fit do not agree on (empty: nothing)."""
    problems: list[str] = []
    first = ranks[0]
    if any(r["world_size"] != WORLD_SIZE for r in ranks):
        return [f"{method}: world sizes {[r['world_size'] for r in ranks]}"]
    if first["updates"] < 4:
        problems.append(f"{method}: only {first['updates']} updates")
    for rank, record in enumerate(ranks):
        updates, micro = record["updates"], record["micro"]
        if record["updates"] != first["updates"]:
            problems.append(f"{method}: rank {rank} stopped at update {updates}, rank 0 at {first['updates']}")
        if len(record["steps"]) != updates or record["clock"]["optimizer_steps"] != updates:
            problems.append(f"{method}: rank {rank} took {len(record['steps'])} optimizer steps "
                            f"(clock: {record['clock']['optimizer_steps']}) in {updates} updates")
        if [s["update"] for s in record["steps"]] != list(range(updates)):
            problems.append(f"{method}: rank {rank} stepped at updates {[s['update'] for s in record['steps']]}")
        # Exactly ``accumulate`` micro-batches per update: an epoch ends with whole updates.
        if len(micro) != updates * record["accumulate"] or len(micro) != len(first["micro"]):
            problems.append(f"{method}: rank {rank} ran {len(micro)} micro-batches for {updates} updates")
        if not micro or not micro[-1]["should_stop"] or any(m["should_stop"] for m in micro[:-1]):
            problems.append(f"{method}: rank {rank} did not stop exactly at its last micro-batch")
        if record["clock"] != first["clock"]:
            problems.append(f"{method}: rank {rank} ended with clock {record['clock']}, rank 0 {first['clock']}")
    for index, entries in enumerate(zip(*(r["micro"] for r in ranks))):
        if any(entry != entries[0] for entry in entries):
            problems.append(f"{method}: micro-batch {index} differs across ranks: {list(entries)}")
            break
    for index, steps in enumerate(zip(*(r["steps"] for r in ranks))):
        if any(step != steps[0] for step in steps):
            problems.append(f"{method}: gradients on different parameters at optimizer step {index}")
            break
    for key, value in first["weights"].items():
        if any(not torch.equal(r["weights"][key], value) for r in ranks[1:]):
            problems.append(f"{method}: weights differ across ranks at the end, e.g. {key}")
            break
    # The method did what makes DDP hard in this short run.
    sets = {json.dumps(m["active"], sort_keys=True) for m in first["micro"]}
    if method in RANDOM_LAYERS and len(sets) < 2:
        problems.append(f"{method}: drew only one layer set ({sets}); the test exercises nothing random")
    if method == "stacking" and len({m["model_depth"] for m in first["micro"]}) < 2:
        problems.append(f"{method}: never grew")
    if method in SELECTION:  # each rank trains its own shard of the candidates (first epoch: no re-reads)
        batches = [[ids for epoch, ids in r["example_ids"] if epoch == 0] for r in ranks]
        trained = [{i for ids in rank_batches for i in ids} for rank_batches in batches]
        if min(map(len, batches)) < 2 or trained[0] & trained[1]:
            problems.append(f"{method}: in the first candidate epoch ({list(map(len, batches))} micro-batches) both "
                            f"ranks trained examples {sorted(trained[0] & trained[1])[:5]}")
    return problems


def run_files(method: str, runs: Path) -> list[str]:
    """What rank 0 did not write into the one run directory (version_0) of ``method``'s fit."""
    versions = sorted(p.relative_to(runs) for p in runs.glob("*/version_*"))
    if len(versions) != 1:
        return [f"{method}: run directories {versions} (one expected)"]
    run = runs / versions[0]
    problems = [f"{method}: no {name} in {run}" for name in ("hf/config.json", "summary.json", "curve.jsonl")
                if not (run / name).is_file()]
    if not problems and not any(json.loads(line)["kind"] == "val" for line in (run / "curve.jsonl").open()):
        problems.append(f"{method}: no validation row in {run / 'curve.jsonl'}")
    return problems


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_every_method_trains_in_lockstep_on_two_ddp_ranks(family, sample_corpus, tmp_path):
    cases = [ddp_case(family, method, sample_corpus, tmp_path) for method in sorted(METHODS)]
    _prepare_data(cases[0])
    out = tmp_path / "records"
    out.mkdir()
    started = time.monotonic()
    launch(cases, out)
    problems = []
    for case in cases:
        ranks = [torch.load(out / f"{case['name']}-rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]
        assert ranks[0]["strategy"] == "DDPStrategy"
        problems += disagreements(case["name"], ranks) + run_files(case["name"], Path(case["runs"]))
    assert not problems, "\n".join(problems)
    print(f"{family}: {len(cases)} DDP fits in {time.monotonic() - started:.0f} s")
