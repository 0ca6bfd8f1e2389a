"""``ntng calibrate``: measure an RST profile for a recipe's model on this machine.

For every active depth it times a forward-only pass (no gradient) and a forward+backward pass on a
real micro-batch from the recipe's data, repeated after warm-up, taking the median; then the
optimizer step at full depth. The profile records the device, precision, software versions and
the model signature, and the command prints how well ``fixed + per_layer * depth`` fits.
"""

from __future__ import annotations

import datetime
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from app.accounting.cost_models import PassCost, RSTProfile, fit_linear
from app.commands import CommandParser
from app.errors import ConfigurationError
from app.files import write_text_atomic
from app.host_memory import keep_freed_host_memory
from app.recipe import build_recipe


def median_seconds(fn: Callable[[], None], warmup: int, repeats: int, device: torch.device,
                   between: Callable[[], None] | None = None) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after ``warmup`` untimed runs; ``between``
    runs untimed after each (what training does between two passes)."""
    timings = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            timings.append(time.perf_counter() - start)
        if between is not None:
            between()
    return statistics.median(timings)


def calibrate_module(module, batch: dict, forward_context, warmup: int = 3, repeats: int = 10,
                     gradient_clip_val: float | None = None) -> RSTProfile:
    """Time passes of a pretraining module at every active depth.

    Args:
        module: a module with ``layers``, ``loss`` and ``configure_optimizers``.
        batch: one masked micro-batch on the module's device.
        forward_context: a context-manager factory for precision (Lightning's precision plugin).
        warmup: untimed runs before timing each measurement.
        repeats: timed runs per measurement (the median is kept).
        gradient_clip_val: the recipe's gradient-norm clipping, timed as part of the optimizer step
            (it runs once per update, as the step does); None or 0 for none.

    Returns:
        A profile without name and provenance (the caller adds them).
    """
    device = next(module.parameters()).device
    optimizer = module.configure_optimizers()
    module.train()

    def forward() -> None:
        with torch.no_grad(), forward_context():
            module.loss(batch)

    def forward_backward() -> None:
        with forward_context():
            loss = module.loss(batch)
        loss.backward()

    def optimizer_step() -> None:
        # Untimed between forward+backward passes, as in training: the step's allocations shape the
        # heap the next pass runs in (timed back to back without it, passes ran up to 9 % faster
        # on a CPU than the same passes in a fit).
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    layers = module.layers
    depth_of = {stack: layers.num_layers(stack) for stack in layers.stack_names}
    passes = {}
    for kind, fn, between in (("forward", forward, None), ("forward_backward", forward_backward, optimizer_step)):
        table = {}
        for depth in range(1, max(depth_of.values()) + 1):
            with layers.active(list(range(depth))):
                table[depth] = median_seconds(fn, warmup, repeats, device, between)
        fixed, slope, _ = fit_linear(table)
        per_layer = {stack: slope for stack in layers.stack_names}
        if len(layers.stack_names) > 1:
            # Several stacks: sweep each alone (others at full depth) for its own slope.
            for stack in layers.stack_names:
                sweep = {}
                for depth in range(1, depth_of[stack] + 1):
                    with layers.active(list(range(depth)), stack=stack):
                        sweep[depth] = median_seconds(fn, warmup, repeats, device, between)
                per_layer[stack] = fit_linear(sweep)[1]
            fixed = table[max(table)] - sum(per_layer[s] * depth_of[s] for s in per_layer)
        passes[kind] = PassCost(table=table, fixed=fixed, per_layer=per_layer)

    # Optimizer step (with the clipping that precedes it) with real gradients at full depth.
    parameters = [p for p in module.parameters() if p.requires_grad]

    def step() -> None:
        if gradient_clip_val:
            torch.nn.utils.clip_grad_norm_(parameters, gradient_clip_val)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # Each step right after a fresh full-depth backward, as in training. Timed back to back on the
    # same gradients, the step found parameters, gradients and moments still in cache and ran 35 %
    # faster (10 against 15.7 ms on the quickstart model on a CPU with a 480 MiB L3).
    forward_backward()
    optimizer_seconds = median_seconds(step, warmup, repeats, device, between=forward_backward)
    optimizer.zero_grad(set_to_none=True)
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    share = {stack: sum(p.numel() for p in layers.layers(stack)[-1].parameters()) / trainable
             for stack in layers.stack_names}
    return RSTProfile(
        name="",
        reference_tokens=int(batch["input_ids"].numel()),
        passes=passes,
        optimizer_step_seconds={type(optimizer).__name__: optimizer_seconds},
        model=module.model_signature(),
        layer_parameter_share=share,
    )


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def _software() -> dict[str, str]:
    import lightning
    import transformers

    versions = {"python": platform.python_version(), "torch": str(torch.__version__),
                "transformers": transformers.__version__, "lightning": lightning.__version__}
    if torch.version.cuda:
        versions["cuda"] = torch.version.cuda
    return versions


def main(argv: list[str]) -> None:
    """``ntng calibrate`` entry point."""
    parser = CommandParser(prog="ntng calibrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--config", action="append", required=True, help="recipe YAML (repeatable)")
    parser.add_argument("--output", required=True, help="profile YAML to write (e.g. configs/rst/<name>.yaml)")
    parser.add_argument("--name", default=None, help="profile name (default: the output's file name)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs per measurement")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per measurement (median kept)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args, overrides = parser.parse_known_args(argv)
    if args.warmup < 0 or args.repeats < 1:
        flag, value = ("--warmup", args.warmup) if args.warmup < 0 else ("--repeats", args.repeats)
        raise ConfigurationError(f"ntng calibrate {flag} {value}: --warmup must be at least 0 and --repeats at "
                                 "least 1 (the median is taken over the repeats); e.g. --warmup 3 --repeats 10")

    cli = build_recipe(args.config, overrides)
    module, data, trainer = cli.model, cli.datamodule, cli.trainer
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        keep_freed_host_memory()  # as every CPU fit does, so the profile prices the steps fits take
    data.prepare_data()
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))  # made into examples by the loader
    batch = {key: value.to(device) for key, value in batch.items()}
    module.to(device)
    profile = calibrate_module(
        module, batch, trainer.precision_plugin.forward_context, warmup=args.warmup, repeats=args.repeats,
        gradient_clip_val=trainer.gradient_clip_val,
    )
    output = Path(args.output)
    profile.name = args.name or output.stem
    profile.provenance = {
        "device": _device_name(device),
        "precision": str(trainer.precision),
        "software": _software(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "method": f"ntng calibrate: median of {args.repeats} runs after {args.warmup} warm-up, "
        f"micro-batch {batch['input_ids'].shape[0]} x {batch['input_ids'].shape[1]} tokens",
        "recipe": [str(path) for path in args.config],
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(output, profile.to_yaml())
    print(f"wrote {output} ({profile.provenance['device']}, {profile.provenance['precision']})")
    for kind, cost in profile.passes.items():
        _, _, worst = fit_linear(cost.table)
        slopes = ", ".join(f"{s} {v:.6f}" for s, v in cost.per_layer.items())
        print(f"  {kind:<17} fixed {cost.fixed:.6f} s + per layer ({slopes}) s; "
              f"linear fit within {100 * worst:.1f}% of every measured depth")
    for name, seconds in profile.optimizer_step_seconds.items():
        print(f"  optimizer step    {name}: {seconds:.6f} s")
