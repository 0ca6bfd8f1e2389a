"""NTNG's reference training rates, reproduced: ``ntng fit`` tokens/s for crammed BERT and T5-base.

NTNG reports (Kaddour et al. 2023, appendix): crammed BERT on one RTX 3090, 1536 sequences of 128
tokens per update in 2.70 s (72.7k tokens/s); T5-base on one A100, 144 sequences of 512 inputs and
114 targets per update in 1.031 s (87.4k tokens/s). This runs ``configs/bert/crammed.yaml`` and
``configs/t5/base.yaml`` unchanged (micro-batches, accumulation, optimizer, clipping) with the GPU
overlay ``configs/gpu/fast.yaml`` (bf16 autocast, ``torch.compile`` per layer, loader workers) on
the shipped sample corpus, whose trained tokenizer is smaller than the recipes' (BERT's vocabulary,
which the tokenizer sets, is printed; T5's model vocabulary stays 32,128). Each family reports the
median seconds per update after the warm-up updates, which include compilation, and its tokens/s
counted as NTNG counts them: BERT's input tokens, T5's inputs plus targets.

    python benchmarks/gpu_rates.py [--model bert|t5|both] [--updates 8] [--warmup 3]
    python benchmarks/gpu_rates.py --smoke   # a tiny shape and no overlay: checks the script on a CPU

The last line is ``ratio: <ntng tokens/s ÷ NTNG's>`` for the first family run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from timing import UpdateTimer, fit_objects, quiet, training_batches

NTNG_RATES = {  # recipe, tokens per update, seconds per update, NTNG's GPU
    "bert": ("configs/bert/crammed.yaml", 1536 * 128, 2.70, "RTX 3090"),
    "t5": ("configs/t5/base.yaml", 144 * (512 + 114), 1.031, "A100"),
}
CORPUS = "--data.init_args.sources=[datamodules/samples/gutenberg]"
SMOKE = {  # shapes small enough for a CPU, to check the script end to end
    "bert": ["--model.init_args.config.num_hidden_layers=2", "--model.init_args.config.hidden_size=64",
             "--model.init_args.config.num_attention_heads=2", "--model.init_args.config.intermediate_size=128",
             "--data.init_args.micro_batch_size=4", "--trainer.accumulate_grad_batches=2",
             "--data.init_args.tokenizer_vocab_size=1000", "--data.init_args.num_workers=0"],
    "t5": ["--model.init_args.config.d_model=64", "--model.init_args.config.d_ff=128",
           "--model.init_args.config.num_heads=2", "--model.init_args.config.num_layers=2",
           "--model.init_args.config.num_decoder_layers=2", "--data.init_args.micro_batch_size=2",
           "--data.init_args.seq_len=64", "--data.init_args.tokenizer_vocab_size=1000",
           "--data.init_args.val_size=16", "--data.init_args.num_workers=0"],
}


def tokens_per_update(cli, family: str) -> int:
    """Tokens of one update as NTNG counts them (BERT: inputs; T5: inputs and targets)."""
    (batch,) = training_batches(cli, 1)
    per_row = batch["input_ids"].shape[1] + (batch["labels"].shape[1] if family == "t5" else 0)
    return len(batch["input_ids"]) * per_row * cli.trainer.accumulate_grad_batches


def rate(family: str, workdir: Path, updates: int, warmup: int, smoke: bool) -> float:
    recipe, ntng_tokens, ntng_seconds, ntng_gpu = NTNG_RATES[family]
    overlays = [recipe] if smoke or not torch.cuda.is_available() else [recipe, "configs/gpu/fast.yaml"]
    extra = [CORPUS, "--budget.allow_profile_mismatch=true", *(SMOKE[family] if smoke else [])]
    cli = fit_objects(overlays, workdir / family, updates + warmup, *extra)
    tokens = tokens_per_update(cli, family)
    timer = UpdateTimer()
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    seconds = statistics.median(timer.seconds[warmup - 1:])  # the timer's first value is update 2's
    ours, theirs = tokens / seconds, ntng_tokens / ntng_seconds
    config = cli.model.model.config
    print(f"\n{family}: {' + '.join(overlays)}, {cli.trainer.precision}, vocabulary {config.vocab_size}, "
          f"{tokens} tokens per update, {len(timer.seconds) - warmup + 1} timed updates")
    print(f"  ntng fit   {seconds:8.4f} s/update  {ours:12.0f} tokens/s")
    print(f"  NTNG       {ntng_seconds:8.4f} s/update  {theirs:12.0f} tokens/s  ({ntng_gpu}, {ntng_tokens} tokens)")
    print(f"  ntng / NTNG tokens per second: {ours / theirs:.3f}")
    return ours / theirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["bert", "t5", "both"], default="both")
    parser.add_argument("--updates", type=int, default=8, help="timed updates per family")
    parser.add_argument("--warmup", type=int, default=3, help="untimed updates first (compilation happens here)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, no GPU overlay: check the script on a CPU")
    args = parser.parse_args()
    if args.warmup < 1 or args.updates < 1:
        parser.error("--warmup and --updates must be at least 1")
    quiet()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"{device}, torch {torch.__version__}")
    families = ["bert", "t5"] if args.model == "both" else [args.model]
    with tempfile.TemporaryDirectory() as tmp:
        ratios = [rate(family, Path(tmp), args.updates, args.warmup, args.smoke) for family in families]
    print(f"ratio: {ratios[0]:.4f}")


if __name__ == "__main__":
    main()
