"""Shared fixtures: tiny models and data that the tests make themselves (no network)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

TINY_CONFIG = {
    "num_hidden_layers": 2,
    "hidden_size": 32,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 40,
}


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    # Every test gets its own tokenizer/block cache, so no test sees another's files.
    monkeypatch.setenv("NTNG_CACHE_DIR", str(tmp_path / "ntng-cache"))


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models gain nothing from a second intra-op thread, and on a shared 2-core CPU its
    # spin-waits made fits up to 100x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run ``ntng`` in-process; returns (exit code, stdout, stderr)."""
    from app.cli import main

    try:
        main(args)
        code = 0
    except SystemExit as exit_:
        code = exit_.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def tiny_fit_args(sample_corpus: Path, budget_hours: float, *overlays: str) -> list[str]:
    """``ntng fit`` arguments: the tiny recipe (plus ``configs/methods/<overlay>.yaml``) trained quietly
    on ``sample_corpus`` for ``budget_hours`` of the tiny-cpu reference, one validation batch."""
    configs = [arg for name in ("bert/tiny", *(f"methods/{o}" for o in overlays))
               for arg in ("-c", str(REPO_ROOT / "configs" / f"{name}.yaml"))]
    return [
        "fit", *configs,
        f"--data.init_args.sources=[{sample_corpus}]",
        "--data.init_args.tokenizer_vocab_size=500",
        "--data.init_args.val_size=16",
        f"--budget.budget={budget_hours}",
        "--budget.allow_profile_mismatch=true",  # the profile was measured with the full sample corpus
        "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
    ]


def mlm_batch(vocab_size: int = 100, batch: int = 4, seq: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random MLM batch with ~25 % of positions carrying labels (never none)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, vocab_size, (batch, seq), generator=generator)
    selected = torch.rand(batch, seq, generator=generator) < 0.25
    selected[:, 1] = True
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, -100))
    return {"input_ids": input_ids, "labels": labels, "example_ids": torch.arange(batch)}


@pytest.fixture
def sample_corpus(tmp_path) -> Path:
    """A small real-text corpus: the first ~60 kB of two shipped Gutenberg books."""
    target = tmp_path / "corpus"
    target.mkdir()
    for name in ("pg11.txt", "pg35.txt"):
        text = (REPO_ROOT / "datamodules" / "samples" / "gutenberg" / name).read_bytes()
        (target / name).write_bytes(text[:60_000])
    return target


class RandomMLMData:
    """Factory for a LightningDataModule of fixed random MLM batches (fast, no tokenizer)."""

    @staticmethod
    def make(vocab_size: int = 100, seq_len: int = 16, micro_batch_size: int = 4, blocks: int = 64):
        from lightning.pytorch import LightningDataModule
        from torch.utils.data import DataLoader

        class _Data(LightningDataModule):
            def __init__(self) -> None:
                super().__init__()
                self.examples = [
                    {k: v[0] for k, v in mlm_batch(vocab_size, 1, seq_len, seed=i).items() if k != "example_ids"}
                    | {"example_ids": torch.tensor(i)}
                    for i in range(blocks)
                ]

            def train_dataloader(self):
                return DataLoader(self.examples, batch_size=micro_batch_size, shuffle=True, drop_last=True)

            def val_dataloader(self):
                return DataLoader(self.examples[:8], batch_size=micro_batch_size)

        return _Data()


def write_profile(path: Path, fb_seconds: dict[int, float], reference_tokens: int = 64, **model) -> Path:
    """A synthetic RST profile: ``fb_seconds[depth]`` per micro-batch of ``reference_tokens`` tokens."""
    import yaml

    signature = {"family": "roberta-prelayernorm", "layers": {"encoder": 2}, "hidden": 32, "heads": 2,
                 "ffn": 64, "vocab": 100, "seq_len": 16} | model
    document = {
        "name": path.stem,
        "model": signature,
        "reference_tokens": reference_tokens,
        "passes": {
            "forward_backward": {"table": fb_seconds, "fixed": 0.0, "per_layer": {"encoder": max(fb_seconds.values()) / 2}},
            "forward": {"table": {d: s / 3 for d, s in fb_seconds.items()}, "fixed": 0.0, "per_layer": {"encoder": 0.1}},
        },
        "optimizer_step_seconds": {},
    }
    path.write_text(yaml.safe_dump(document))
    return path


def tiny_masked_lm(layers: int = 2, module_class=None, **kwargs):
    """A seeded tiny ``MaskedLanguageModel`` on ``TINY_CONFIG`` (vocab 100, seq 16; AdamW 1e-3 unless given)."""
    from app.modules.masked_lm import MaskedLanguageModel

    torch.manual_seed(0)
    kwargs.setdefault("optimizer", lambda params: torch.optim.AdamW(params, lr=1e-3))
    return (module_class or MaskedLanguageModel)(
        config={**TINY_CONFIG, "num_hidden_layers": layers}, vocab_size=100, pad_token_id=0, seq_len=16, **kwargs
    )


def fit_tiny(module, callbacks: list, tmp_path: Path, ckpt_path=None, **trainer_kwargs):
    """Fit ``module`` on random MLM batches with a quiet test Trainer; returns the trainer.

    No sanity check, no progress bar, one validation batch, and validation only when a callback asks
    for it (the budget callback's cadence); ``trainer_kwargs`` override any of these.
    """
    from lightning.pytorch import Trainer

    settings = dict(
        default_root_dir=tmp_path, logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=1, val_check_interval=10**6, check_val_every_n_epoch=None,
    )
    trainer = Trainer(callbacks=callbacks, **{**settings, **trainer_kwargs})
    trainer.fit(module, datamodule=RandomMLMData.make(), ckpt_path=ckpt_path)
    return trainer


def plan_hours(method, settings, budget_hours: float, stop_rule: str = "after_crossing") -> dict:
    """``ntng plan``'s counts for ``method`` (a method callback, or None for the baseline) at an RST budget."""
    from app.accounting.clock import Budget
    from app.commands.plan import plan_method

    return plan_method(method, "method", settings, Budget(budget_hours, "rst_hours"), stop_rule).result


class PassRecorder(Callback):
    """A test callback that records every pass the network runs in training, independently of the clock.

    A forward hook on the HF base model sees every forward (training, scoring, Hessian passes); each
    is recorded with its kind (gradient on: forward+backward), tokens and active depth; validation
    passes are not charged and are skipped. Optimizer steps are recorded with the share of
    parameters that had a gradient. :meth:`reference_seconds` prices them all with a profile.
    """

    def __init__(self) -> None:
        self.passes: list[tuple[str, int, dict[str, int]]] = []
        self.steps: list[tuple[str, float]] = []
        self._handle = None

    def on_fit_start(self, trainer, pl_module) -> None:
        def record(module, args, kwargs):
            if trainer.validating or trainer.sanity_checking:
                return
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            kind = "forward_backward" if torch.is_grad_enabled() else "forward"
            self.passes.append((kind, int(input_ids.numel()), pl_module.layers.active_depth()))

        self._handle = pl_module.model.base_model.register_forward_pre_hook(record, with_kwargs=True)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        share = sum(p.numel() for p in params if p.grad is not None) / sum(p.numel() for p in params)
        self.steps.append((type(optimizer).__name__, share))

    def on_fit_end(self, trainer, pl_module) -> None:
        self._handle.remove()

    def reference_seconds(self, profile) -> float:
        """What the recorded passes and steps cost under ``profile``."""
        passes = sum(profile.seconds(kind, tokens, depth) for kind, tokens, depth in self.passes)
        return passes + sum(profile.optimizer_step_seconds.get(name, 0.0) * share for name, share in self.steps)


def recipe_fit(configs: list[str], overrides: list[str], ckpt_path=None, callbacks=()):
    """``ntng fit`` in-process on built recipe objects (plus extra ``callbacks``); returns the built CLI."""
    from app.recipe import build_recipe

    cli = build_recipe(configs, overrides)
    cli.trainer.callbacks.extend(callbacks)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    return cli


def run_in_process(command: list[str], log) -> int:
    """A sweep step's ``ntng`` command run in this process (tests: no interpreter start per step)."""
    import contextlib
    import traceback

    from app.cli import main

    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            main(command[1:])
            return 0
        except SystemExit as exit_:
            return int(exit_.code or 0)
        except Exception:  # noqa: BLE001 - a step's crash is its exit code, as in a subprocess
            traceback.print_exc(file=log)
            return 1


class CrashAfter(Callback):
    """Raise at the end of update ``step`` (a pre-empted run: no export, no summary, checkpoints kept)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            raise RuntimeError(f"simulated crash after update {self.step}")
