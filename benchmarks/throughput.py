"""Training throughput: ntng against the stock Hugging Face model under HF's own trainers, side by side.

* **BERT** (the quickstart recipe: 4-layer Pre-LN BERT, hidden 256, seq 128, micro-batch 32): ``ntng fit``
  (sparse MLM head, masking in the loader) against ``RobertaPreLayerNormForMaskedLM`` with the same
  config trained by ``transformers.Trainer`` with ``DataCollatorForLanguageModeling`` on the same
  packed blocks. Goal: ntng ≥ 1.5× the tokens/s.
* **T5** (``configs/t5/tiny.yaml`` with the ``t5-efficient-tiny`` shape: 4 + 4 blocks, d_model 256,
  inputs 128, micro-batch 16): ``ntng fit`` (fused RMSNorm and GELU kernels, ``app.model.fused_t5``)
  against ``T5ForConditionalGeneration``'s stock modules with the same config (v1.1's untied head,
  as ntng's) trained by ``Seq2SeqTrainer`` on the same span-corruption batches. Goal: ntng ≥ 1.3×.

Both sides: dropout 0 (ntng pretrains without it), AdamW with the recipe's learning rate, betas,
epsilon and weight decay, the recipe's gradient clipping, fp32 on a CPU (bf16 autocast on a GPU, or
with ``--precision bf16-mixed``),
timed from one update's end to the next (loading, hooks and the optimizer step included). Rounds
alternate the sides, the first two updates of each round warm up, each side reports its median.

Model FLOP utilisation (MFU) divides the model FLOPs an update needs by its time and by this
machine's measured matmul peak (best of repeated 2048³ matmuls, in the precision the sides train in).
Model FLOPs are 3× the forward's matmul FLOPs (forward + backward):

* BERT, per update of B×T tokens, P of them predicted, L layers, hidden d, FFN f, vocabulary V:
  ``3 · (B·T·L·(8d² + 4df + 4Td) + P·(2d² + 2dV))`` — the head counted on predicted tokens only,
  the work the objective needs (HF's dense head does ~7× more of it, which is not credited).
* T5, per sequence of Te inputs and Td targets, inner attention width a = heads·d_kv, gated FFN:
  ``3 · (Le·Te·(8da + 6df + 4Te·a) + Ld·(Td·(12da + 4Td·a + 4Te·a + 6df) + 4da·Te) + 2dV·Td)``.

    python benchmarks/throughput.py [--model bert|t5|both] [--steps 8] [--rounds 3] [--precision bf16-mixed]

The last line is ``ratio: <ntng tokens/s ÷ HF tokens/s>`` for BERT (for T5 with ``--model t5``).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

from app.host_memory import keep_freed_host_memory
from timing import UpdateTimer, fit_objects, matmul_peak_flops, medians, quiet, training_batches

RECIPES = {
    "bert": (["configs/quickstart.yaml"], ()),
    "t5": (["configs/t5/tiny.yaml", "configs/t5/shapes/tiny.yaml"],
           ("--data.init_args.seq_len=128", "--model.init_args.optimizer=torch.optim.AdamW",
            "--model.init_args.optimizer.lr=1e-3", "--model.init_args.optimizer.weight_decay=0.0")),
}
GOALS = {"bert": 1.5, "t5": 1.3}


PRECISION = "bf16-mixed" if torch.cuda.is_available() else "32-true"  # --precision sets it
COMPILE = False  # --compile: ntng compiles every layer (compile_layers), HF the model (torch_compile)


def precision_flags() -> tuple[str, ...]:
    return (f"--trainer.precision={PRECISION}",) + (("--model.init_args.compile_layers=inductor",) if COMPILE else ())


def build(family: str, workdir: Path, updates: int):
    configs, extra = RECIPES[family]
    return fit_objects(configs, workdir, updates, "--budget.allow_profile_mismatch=true", *extra, *precision_flags())


def ntng_seconds(family: str, workdir: Path, updates: int) -> list[float]:
    cli, timer = build(family, workdir, updates), UpdateTimer()
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return timer.seconds


def hf_seconds(family: str, workdir: Path, updates: int) -> list[float]:
    """The stock HF model of the same config under ``Trainer`` (BERT) or ``Seq2SeqTrainer`` (T5)."""
    from transformers import (DataCollatorForLanguageModeling, Seq2SeqTrainer, Seq2SeqTrainingArguments, Trainer,
                              TrainerCallback, TrainingArguments)
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    cli = build(family, workdir, updates)
    config = copy.deepcopy(cli.model.model.config)
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout_rate"):
        if hasattr(config, name):
            setattr(config, name, 0.0)
    torch.manual_seed(0)
    model = type(cli.model.model)(config)
    # The recipe's optimizer arguments, read back from an optimizer built by its factory.
    defaults = cli.model.optimizer_factory([torch.nn.Parameter(torch.zeros(1))]).defaults
    batches = training_batches(cli, updates)
    micro_batch = len(batches[0]["input_ids"])
    if family == "bert":
        # Unmasked blocks: the stock collator masks them, as an HF user's script would.
        blocks = torch.from_numpy(cli.datamodule.blocks[:updates * micro_batch].astype("int64"))
        rows = [{"input_ids": block} for block in blocks]
        collator = DataCollatorForLanguageModeling(cli.datamodule.tokenizer, mlm_probability=0.15)
        trainer_class, arguments_class = Trainer, TrainingArguments
    else:
        rows = [{"input_ids": b["input_ids"][i], "labels": b["labels"][i]} for b in batches for i in range(micro_batch)]
        collator, trainer_class, arguments_class = None, Seq2SeqTrainer, Seq2SeqTrainingArguments

    seconds: list[float] = []

    class Timer(TrainerCallback):
        last: float | None = None

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            now = time.perf_counter()
            if self.last is not None:
                seconds.append(now - self.last)
            self.last = now

    arguments = arguments_class(
        output_dir=str(workdir / "hf"), per_device_train_batch_size=micro_batch, max_steps=updates,
        learning_rate=defaults["lr"], adam_beta1=defaults["betas"][0], adam_beta2=defaults["betas"][1],
        adam_epsilon=defaults["eps"], weight_decay=defaults["weight_decay"], lr_scheduler_type="constant",
        max_grad_norm=float(cli.trainer.gradient_clip_val or 0.0), logging_strategy="no", save_strategy="no",
        report_to=[], dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(), seed=0,
        bf16=PRECISION == "bf16-mixed", disable_tqdm=True, torch_compile=COMPILE,
    )
    trainer = trainer_class(model=model, args=arguments, train_dataset=rows, data_collator=collator, callbacks=[Timer()])
    for printer in (PrinterCallback, ProgressCallback):  # the table only
        trainer.remove_callback(printer)
    trainer.train()
    return seconds


def update_flops(family: str, cli, batch: dict[str, torch.Tensor]) -> float:
    """Model FLOPs of one update on ``batch`` (the formulas of the module docstring)."""
    config = cli.model.model.config
    if family == "bert":
        (rows, length), predicted = batch["input_ids"].shape, int((batch["labels"] != -100).sum())
        d, f, layers, vocab = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
        return 3.0 * (rows * length * layers * (8 * d * d + 4 * d * f + 4 * length * d)
                      + predicted * (2 * d * d + 2 * d * vocab))
    (rows, te), td = batch["input_ids"].shape, batch["labels"].shape[1]
    d, f, a, vocab = config.d_model, config.d_ff, config.num_heads * config.d_kv, config.vocab_size
    ffn = 6 * d * f if config.is_gated_act else 4 * d * f
    encoder = config.num_layers * te * (8 * d * a + ffn + 4 * te * a)
    decoder = config.num_decoder_layers * (td * (12 * d * a + 4 * td * a + 4 * te * a + ffn) + 4 * d * a * te)
    return 3.0 * rows * (encoder + decoder + 2 * d * vocab * td)


def compare(family: str, workdir: Path, steps: int, rounds: int, peak: float) -> float:
    times: dict[str, list[float]] = {"ntng": [], "hf": []}
    for _ in range(rounds):
        times["ntng"] += ntng_seconds(family, workdir, steps)[1:]  # the first two updates warm up
        times["hf"] += hf_seconds(family, workdir, steps)[1:]
    median = medians(times)
    cli = build(family, workdir, steps)
    (batch,) = training_batches(cli, 1)
    tokens = batch["input_ids"].numel()  # input tokens per update (one micro-batch, no accumulation)
    flops = update_flops(family, cli, batch)
    trainer = "Trainer + DataCollatorForLanguageModeling" if family == "bert" else "Seq2SeqTrainer"
    print(f"\n{family}: {type(cli.model.model).__name__}, micro-batch {tuple(batch['input_ids'].shape)}, "
          f"{rounds} rounds x {steps - 2} timed updates per side, {flops / 1e9:.2f} model GFLOP per update")
    for name, seconds in median.items():
        label = "ntng fit" if name == "ntng" else f"HF {trainer}"
        print(f"  {label:<48} {seconds:.4f} s/update  {tokens / seconds:10.0f} tokens/s  "
              f"MFU {flops / seconds / peak:6.2%}")
    ratio = median["hf"] / median["ntng"]
    print(f"  ntng / HF tokens per second: {ratio:.3f}  (goal >= {GOALS[family]})")
    return ratio


def main() -> None:
    global PRECISION, COMPILE
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["bert", "t5", "both"], default="both")
    parser.add_argument("--steps", type=int, default=8, help="updates per side per round (two warm up)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precision", choices=["32-true", "bf16-mixed"], default=PRECISION,
                        help="both sides (HF: bf16=True); bf16 autocast also runs on CPUs with AMX or AVX-512 BF16")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile (inductor) on both sides: ntng per layer (compile_layers), HF the whole "
                             "model (torch_compile=True); each round compiles again, so use --steps 12 or more")
    args = parser.parse_args()
    PRECISION, COMPILE = args.precision, args.compile
    quiet()
    keep_freed_host_memory()  # what every ntng fit on a CPU sets (app/host_memory.py): HF's side gets it too
    peak = matmul_peak_flops(dtype=torch.bfloat16 if PRECISION == "bf16-mixed" else torch.float32)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"{device}, torch {torch.__version__}, {PRECISION}{', compiled' if COMPILE else ''}; measured matmul peak {peak / 1e9:.1f} GFLOP/s")
    families = ["bert", "t5"] if args.model == "both" else [args.model]
    with tempfile.TemporaryDirectory() as tmp:
        ratios = {family: compare(family, Path(tmp), args.steps, args.rounds, peak) for family in families}
    print(f"ratio: {ratios[families[0]]:.4f}")


if __name__ == "__main__":
    main()
