"""Does a shallower step really cost what the profile says?

Calibrates an RST profile for an 8-layer version of the quickstart model on this machine, then
times real training steps (forward, backward, optimizer step) under the active sets each
depth-changing method produces (on a GPU when there is one, under bf16 autocast), and prints
measured / predicted per scenario, side by side in one
run: full depth, progressive layer dropping at its steady state, every RaPTr stage and every
stacking stage. Scenarios are interleaved step by step and each reports the median of its
per-step ratios. Goal: every ratio within 5 % of 1.

    python benchmarks/depth_speed.py [--layers 8] [--steps 8] [--micro-batch-size 16]

The last line is ``ratio: <the scenario's median ratio farthest from 1>``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from app.commands.calibrate import calibrate_module
from app.host_memory import keep_freed_host_memory
from app.modules.masked_lm import MaskedLanguageModel
from callbacks.layer_drop import keep_probabilities, keep_ratio, sample_active_layers
from callbacks.random_path import resolve_schedule, sample_path
from callbacks.sampling import step_generator
from callbacks.stacking import GrowthSchedule
from datamodules.pretraining.datamodule import PretrainingDataModule


def scenarios(num_layers: int, steps: int) -> dict[str, list[list[int]]]:
    """Active sets per step for each scenario, drawn with the methods' own functions."""
    pld = keep_probabilities(keep_ratio(1.0, theta_bar=0.5, gamma_f=100.0), num_layers)  # NTNG BERT settings
    result = {"full depth": [list(range(num_layers))] * steps}
    result["PLD steady state (theta 0.5)"] = [
        sample_active_layers(pld, step_generator(0, step, 0)) for step in range(steps * 2)
    ]
    lengths, _, fixed = resolve_schedule(None, None, [0, -1], num_layers, (), "subset")
    for stage, length in enumerate(lengths):
        result[f"RaPTr stage {stage} (path {length})"] = [
            sample_path(step_generator(0, step, 0), length, num_layers, fixed, "subset") for step in range(steps)
        ]
    for stage, depth in enumerate(GrowthSchedule(num_layers // 4, (0.125, 0.3)).depths()):
        result[f"stacking stage {stage} (depth {depth})"] = [list(range(depth))] * steps
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per scenario (PLD: twice as many)")
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7, help="calibration repeats per depth")
    args = parser.parse_args()
    keep_freed_host_memory()  # as every CPU fit and calibration does
    torch.manual_seed(0)
    data = PretrainingDataModule(["datamodules/samples/gutenberg"], tokenizer_vocab_size=8192, seq_len=128,
                                 val_size=64, micro_batch_size=args.micro_batch_size)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))  # made into examples by the loader
    module = MaskedLanguageModel(
        config={"num_hidden_layers": args.layers, "hidden_size": 256, "num_attention_heads": 4,
                "intermediate_size": 1024, "max_position_embeddings": 130},
        vocab_size=data.vocab_size, pad_token_id=data.pad_token_id, seq_len=128,
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    module.to(device)
    batch = {key: value.to(device) for key, value in batch.items()}

    def forward_context():  # what a bf16-mixed fit runs its forward in on a GPU
        if device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    profile = calibrate_module(module, batch, forward_context, warmup=2, repeats=args.repeats)
    optimizer = module.configure_optimizers()
    tokens = batch["input_ids"].numel()

    def train_step(active: list[int]) -> float:
        start = time.perf_counter()
        with module.layers.active(active), forward_context():
            loss = module.loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(2):  # warm up the allocator and the optimizer state
        train_step(list(range(args.layers)))

    def predicted(active: list[int]) -> float:
        # What the clock charges: the pass at its depth, the optimizer step for the parameters updated.
        depth = {"encoder": len(active)}
        return (profile.seconds("forward_backward", tokens, depth)
                + profile.optimizer_seconds(type(optimizer).__name__, depth))

    # Round-robin over scenarios, one step each, so drift on a noisy machine hits them all alike;
    # each scenario reports the median of its per-step measured/predicted ratios (robust to spikes).
    plans = scenarios(args.layers, args.steps)
    step_ratios: dict[str, list[float]] = {name: [] for name in plans}
    for position in range(max(len(sets) for sets in plans.values())):
        for name, active_sets in plans.items():
            if position < len(active_sets):
                active = active_sets[position]
                step_ratios[name].append(train_step(active) / predicted(active))
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{args.layers}-layer model, hidden 256, micro-batch {args.micro_batch_size} x 128, {where}"
          f"{', bf16 autocast' if device.type == 'cuda' else ', fp32'}, profile calibrated in this run\n")
    print(f"{'scenario':<34}{'mean depth':>11}{'predicted s/step':>18}{'median ratio':>14}")
    ratios = []
    for name, active_sets in plans.items():
        ratios.append(statistics.median(step_ratios[name]))
        depth = statistics.mean(len(active) for active in active_sets)
        mean_predicted = statistics.mean(predicted(active) for active in active_sets)
        print(f"{name:<34}{depth:>11.2f}{mean_predicted:>18.3f}{ratios[-1]:>14.3f}")
    worst = max(ratios, key=lambda r: abs(r - 1))
    print(f"\nworst |ratio - 1| = {abs(worst - 1):.3f} (goal: within 0.05)")
    print(f"ratio: {worst:.4f}")


if __name__ == "__main__":
    main()
