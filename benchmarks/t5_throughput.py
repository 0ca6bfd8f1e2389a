"""T5 training step: ntng's SpanCorruptionModel under Lightning vs a plain PyTorch loop vs HF's Seq2SeqTrainer.

The same T5 v1.1 shape (default: t5-efficient-tiny, 4 + 4 blocks, d_model 256, d_ff 1024, 4 heads,
gated-GELU, untied head), the same span-corruption-shaped batches (random ids: inputs 128, targets
32 by default), AdamW at the same learning rate, fp32 on the CPU (or a GPU if there is one). Rounds
are interleaved (a few steps of each path per round) so machine noise hits all three alike; the
median seconds per step of each path is reported. HF's trainer needs ``accelerate``
(``pip install -e '.[bench]'``); without it that column is skipped. The last line is
``ratio: <ntng s/step / plain s/step>``.

    python benchmarks/t5_throughput.py [--shape tiny|small] [--steps 8] [--rounds 3] [--batch 16]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from lightning.pytorch import Callback, LightningDataModule, Trainer
from torch.utils.data import DataLoader

from app.modules.span_corruption import SpanCorruptionModel

SHAPES = {"tiny": {"d_model": 256, "d_ff": 1024, "d_kv": 64, "num_heads": 4, "num_layers": 4, "num_decoder_layers": 4},
          "small": {"d_model": 512, "d_ff": 2048, "d_kv": 64, "num_heads": 8, "num_layers": 6, "num_decoder_layers": 6}}
VOCAB, LR = 32128, 1e-3


def batches(count: int, batch: int, inputs: int, targets: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(2, VOCAB, (batch, inputs), generator=generator),
             "labels": torch.randint(2, VOCAB, (batch, targets), generator=generator)} for _ in range(count)]


def fresh_module(shape: str) -> SpanCorruptionModel:
    torch.manual_seed(0)
    return SpanCorruptionModel(config={**SHAPES[shape], "vocab_size": VOCAB}, vocab_size=VOCAB, pad_token_id=0,
                               optimizer=lambda params: torch.optim.AdamW(params, lr=LR))


class StepTimer(Callback):
    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seconds.append(time.perf_counter() - self._start)


class Batches(LightningDataModule):
    def __init__(self, data: list[dict]) -> None:
        super().__init__()
        self.data = data

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=None)


def ntng_steps(shape: str, data: list[dict], device: str) -> list[float]:
    """Seconds per step of ntng's module in a Lightning fit (no budget, logger or checkpoints)."""
    timer = StepTimer()
    trainer = Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, max_steps=len(data), logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[timer], num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(fresh_module(shape), datamodule=Batches(data))
    return timer.seconds


def plain_steps(shape: str, data: list[dict], device: str) -> list[float]:
    """Seconds per step of the same model in a minimal loop: forward, backward, step, zero_grad."""
    model = fresh_module(shape).model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    seconds = []
    for batch in data:
        start = time.perf_counter()
        loss = model(input_ids=batch["input_ids"].to(device), labels=batch["labels"].to(device)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return seconds


def hf_steps(shape: str, data: list[dict], device: str) -> list[float] | None:
    """Seconds per step of the same model under ``Seq2SeqTrainer`` (None without ``accelerate``)."""
    try:
        from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, TrainerCallback
    except ImportError:
        return None

    class Timer(TrainerCallback):
        seconds: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            Timer.seconds.append(time.perf_counter() - self.start)

    Timer.seconds = []
    rows = [{"input_ids": b["input_ids"][i], "labels": b["labels"][i]} for b in data for i in range(len(b["input_ids"]))]
    with tempfile.TemporaryDirectory() as output:
        arguments = Seq2SeqTrainingArguments(
            output_dir=output, per_device_train_batch_size=len(data[0]["input_ids"]), max_steps=len(data),
            learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, logging_strategy="no",
            save_strategy="no", report_to=[], dataloader_num_workers=0, use_cpu=device == "cpu", seed=0,
            max_grad_norm=0.0,  # the other paths do not clip
        )
        trainer = Seq2SeqTrainer(model=fresh_module(shape).model, args=arguments, train_dataset=rows,
                                 callbacks=[Timer()])
        trainer.train()
    return Timer.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--steps", type=int, default=8, help="steps per path per round (the first is dropped)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--inputs", type=int, default=128)
    parser.add_argument("--targets", type=int, default=32)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = batches(args.steps, args.batch, args.inputs, args.targets)
    times: dict[str, list[float]] = {"ntng": [], "plain": [], "hf": []}
    for _ in range(args.rounds):
        times["plain"] += plain_steps(args.shape, data, device)[1:]  # the first step warms up
        times["ntng"] += ntng_steps(args.shape, data, device)[1:]
        hf = hf_steps(args.shape, data, device)
        if hf is not None:
            times["hf"] += hf[1:]
    median = {name: statistics.median(values) for name, values in times.items() if values}
    print(f"\nT5 {args.shape}, batch {args.batch} x {args.inputs} -> {args.targets} tokens, {device}, "
          f"{args.rounds} rounds x {args.steps - 1} timed steps per path")
    for name, seconds in median.items():
        print(f"  {name:<6} {seconds:.4f} s/step  ({seconds / median['plain']:.3f} x plain)")
    if "hf" not in median:
        print("  hf     skipped: pip install accelerate (the [bench] extra) to time Seq2SeqTrainer")
    print(f"ratio: {median['ntng'] / median['plain']:.4f}")


if __name__ == "__main__":
    main()
