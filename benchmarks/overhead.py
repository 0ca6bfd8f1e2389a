"""What does ntng's Lightning step cost beyond the network, and what does each method's host work cost?

Side by side in one run, on the quickstart recipe (4 layers, hidden 256, seq 128, micro-batch 32, fp32):

* **ntng**: ``ntng fit``'s objects as built from the recipe (the forced callbacks: budget, export,
  throughput, run record; the TensorBoard logger), stopped by ``trainer.max_steps``;
* **raw**: a minimal PyTorch loop on the same module class, the same masked batches, the same
  optimizer and param groups and the same gradient clipping: ``loss``, ``backward``, clip, ``step``,
  ``zero_grad``.

Both are timed per update from one update's end to the next (ntng's time therefore includes the
data loader, the masking and every hook), rounds alternate the two paths (each run in a fresh process, so
no earlier fit's heap state is measured), the first two updates of each round warm up, and each
path reports its median. Then each method overlay trains the same
way, and its callbacks' per-update hooks are timed with the module's charged passes (the scoring
forwards of batch selection, Sophia's Hessian pass) subtracted: that is the method's host work,
which no RST profile prices. Goals: ntng / raw ≤ 1.02; each method's host work ≤ 2 % of its update.

    python benchmarks/overhead.py [--steps 8] [--rounds 6] [--method-steps 6] [--methods layer_drop lion]
    python benchmarks/overhead.py --recipe t5-tiny --steps 40   # T5 tiny (20 ms steps), no methods

The last line is ``ratio: <ntng s/update / raw s/update>``.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import Callback

from app.host_memory import keep_freed_host_memory
from callbacks.irreducible_losses import IrreducibleLosses
from timing import UpdateTimer, fit_objects, medians, quiet, timed, training_batches

# Overlays that fit the quickstart's 4 layers and a CPU (Sophia's bf16 overlay runs in fp32 here).
METHODS = {
    "layer_drop": ["--trainer.callbacks.theta_bar=0.5"],
    "raptr": ["--trainer.callbacks.path_lengths=[2,3,4]"],
    "stacking": ["--trainer.callbacks.initial_layers=1"],
    "selective_backprop": [],
    "rho_loss": [],
    "lion": [],
    "sophia": ["--trainer.precision=32-true", "--trainer.callbacks.every_n_steps=2"],
}
PER_UPDATE_HOOKS = ("on_train_batch_start", "on_train_batch_end", "on_before_backward", "on_after_backward",
                    "on_before_optimizer_step", "on_before_zero_grad")
CHARGED_PASSES = ("per_example_losses", "hessian_pass")


RECIPES = {"quickstart": "configs/quickstart.yaml", "t5-tiny": "configs/t5/tiny.yaml"}


def recipe(workdir: Path, steps: int, method: str | None = None, extra: tuple[str, ...] = (),
           name: str = "quickstart"):
    """The configured ``ntng fit`` objects for ``steps`` updates of a recipe (plus a method overlay)."""
    configs = [RECIPES[name]] + ([f"configs/methods/{method}.yaml"] if method else [])
    return fit_objects(configs, workdir, steps, *(METHODS.get(method, []) if method else []), *extra)


def ntng_updates(workdir: Path, steps: int, method: str | None = None, extra: tuple[str, ...] = (),
                 name: str = "quickstart"):
    """Seconds per update of a real ``ntng fit`` (and, for a method, the seconds of its host work)."""
    cli = recipe(workdir, steps, method, extra, name)
    timer, host = UpdateTimer(), defaultdict(float)
    trainer = cli.trainer
    forced = ("callbacks.budget", "callbacks.export", "callbacks.monitoring")  # on in every run
    method_callbacks = [c for c in trainer.callbacks
                        if type(c).__module__.startswith("callbacks.") and type(c).__module__ not in forced]
    for callback in method_callbacks:
        for hook in PER_UPDATE_HOOKS:
            if getattr(type(callback), hook) is not getattr(Callback, hook):
                setattr(callback, hook, timed(getattr(callback, hook), host, "hooks"))
    for name in CHARGED_PASSES:
        if hasattr(cli.model, name):
            setattr(cli.model, name, timed(getattr(cli.model, name), host, "passes"))
    trainer.callbacks.append(timer)
    gc.collect()  # the previous path's garbage is not this one's to collect
    trainer.fit(cli.model, datamodule=cli.datamodule)
    host_seconds = (host["hooks"] - host["passes"]) / max(trainer.global_step, 1)
    return timer.seconds, host_seconds


def raw_updates(workdir: Path, steps: int, name: str = "quickstart") -> list[float]:
    """Seconds per update of the same module and batches (objective applied) in a minimal loop."""
    cli = recipe(workdir, steps, name=name)
    clip = cli.trainer.gradient_clip_val
    module, batches = cli.model, training_batches(cli, steps)
    module.train()
    optimizer = module.configure_optimizers()
    parameters = [p for p in module.parameters() if p.requires_grad]
    gc.collect()
    seconds, last = [], time.perf_counter()
    for batch in batches:
        loss = module.loss(batch)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(parameters, clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        now = time.perf_counter()
        seconds.append(now - last)
        last = now
    return seconds[1:]  # the first includes nothing before it, like ntng's timer


def il_file(workdir: Path) -> str:
    """Zero irreducible losses for every training id of the RHO-loss run (mechanics, not selection)."""
    cli = recipe(workdir, 1, "rho_loss", ("--trainer.callbacks.irreducible_losses=unused",))
    data = cli.datamodule
    data.prepare_data()
    data.setup("fit")
    ids = np.asarray(data.train_example_ids)
    path = workdir / "il.npz"
    IrreducibleLosses(ids, np.zeros((4, len(ids)), dtype=np.float32), data.example_fingerprint(), {}).save(path)
    return str(path)


def in_fresh_process(function, *args):
    """``function(*args)`` in a process forked from a server that only imported ntng: no fit before it
    left its heap, caches or threads behind (a second fit in one process can run several % slower)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["app.recipe", "overhead"])
    with context.Pool(1) as pool:
        return pool.apply(function, args)


def measure(path: str, workdir: str, steps: int, method: str | None = None, extra: tuple[str, ...] = (),
            name: str = "quickstart"):
    """One side's seconds per update (and host work) in this process, as ``ntng fit`` on a CPU runs it."""
    quiet()
    keep_freed_host_memory()  # what every ntng fit on a CPU sets (app/host_memory.py); the raw loop gets it too
    torch.manual_seed(0)
    if path == "raw":
        return raw_updates(Path(workdir), steps, name), 0.0
    return ntng_updates(Path(workdir), steps, method, extra, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="updates per path per round (two warm up)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--method-steps", type=int, default=6, help="updates per method (two warm up)")
    parser.add_argument("--methods", nargs="*", default=None, choices=list(METHODS),
                        help="method overlays to time (default: all on the quickstart, none on t5-tiny)")
    parser.add_argument("--recipe", choices=list(RECIPES), default="quickstart",
                        help="t5-tiny: 20 ms steps, where a fixed per-update cost shows most")
    args = parser.parse_args()
    if args.methods is None:
        args.methods = list(METHODS) if args.recipe == "quickstart" else []
    elif args.methods and args.recipe != "quickstart":
        parser.error("--methods: the overlays' settings fit the quickstart's 4 layers; use --recipe quickstart")
    quiet()
    with tempfile.TemporaryDirectory() as workdir:
        times: dict[str, list[float]] = {"raw": [], "ntng": []}
        for round_ in range(args.rounds):  # each side in its own process; the order alternates
            for path in ("raw", "ntng") if round_ % 2 == 0 else ("ntng", "raw"):
                times[path] += in_fresh_process(measure, path, workdir, args.steps, None, (), args.recipe)[0][1:]
        median = medians(times)
        print(f"\n{args.recipe} model, {torch.get_num_threads()} threads, {args.rounds} rounds x "
              f"{args.steps - 2} timed updates per path, each in a fresh process")
        for name, seconds in median.items():
            print(f"  {name:<5} {seconds:.4f} s/update")
        if args.methods:
            print("\nmethod               s/update   host work/update   share")
            extra = {"rho_loss": (f"--trainer.callbacks.irreducible_losses={il_file(Path(workdir))}",)}
            for method in args.methods:
                seconds, host = in_fresh_process(measure, "ntng", workdir, args.method_steps, method,
                                                 extra.get(method, ()))
                step = statistics.median(seconds[1:])
                note = "" if host else "  (no callback: an optimizer)"
                print(f"  {method:<18} {step:8.4f}   {host * 1000:10.2f} ms      {host / step:6.2%}{note}")
        print(f"ratio: {median['ntng'] / median['raw']:.4f}")


if __name__ == "__main__":
    main()
