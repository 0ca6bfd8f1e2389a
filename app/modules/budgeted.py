"""``BudgetedModule``: the base every pretraining LightningModule shares, and the surface callbacks use.

The module is the only place that runs the network, so it owns the reference clock and charges it
for every pass it runs; the LR is set from budget progress right before each update; the depth the
model has for validation and export (``model_depth``) and extra LR multipliers (``lr_adjustments``)
live here so methods change them through one documented surface. Subclasses add the objective:
the HF model (``self.model``), its layer adapter (``self.layers``), the loss and the passes that
batch selection and Sophia need.

The surface callbacks may use, checked once at their setup by :func:`require_budgeted_module`:

============================== ==================================================================
``layers``                     the :class:`~app.model.layers.LayerAdapter` (active layers, scales,
                               copies, family traits)
``charge(kind, tokens)``       pay one pass at the current active depth
``budget_progress()``          fraction of the budget spent (the LR schedule's input)
``model_depth``                layers (a prefix) that make up the model for validation and export
``lr_adjustments``             extra LR multipliers by name, as functions of budget progress
``model_signature()``          what an RST profile must have been measured for
``prediction_head``            the head that runs on every prediction (for FLOP counting)
``loss(batch)``                the objective's mean loss (``ntng calibrate`` times it)
``per_example_losses(batch)``  no-grad per-example losses (batch selection), optional
``hessian_pass(batch)``        one Sophia-G GNB pass (``SophiaHessian``), optional
``export_pretrained(dir)``     the HF export (``HuggingFaceExport``)
============================== ==================================================================
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from torchmetrics.aggregation import MeanMetric

from app.accounting.clock import ReferenceClock
from app.errors import ConfigurationError
from app.files import atomic_directory
from app.host_memory import keep_freed_host_memory
from app.model.layers import LayerAdapter, truncated_model
from app.model.param_groups import weight_decay_groups
from app.model.schedules import LRSchedule, OneCycleTriangle
from app.modules.strategies import check_strategy_support, check_unused_parameter_support

OPTIONAL_PASSES = ("per_example_losses", "hessian_pass")


class BudgetedModule(LightningModule):
    """A LightningModule trained under a reference-time budget (see the module docstring).

    Args:
        optimizer: optimizer class and arguments; biases and norm weights get no weight decay.
        lr_schedule: learning-rate multiplier as a function of budget progress.
        decay_norm_weights: decay normalisation weights too (NTNG's bert-o3 as it ran; see
            ``app.model.param_groups``).
        compile_layers: ``torch.compile`` backend (``"inductor"`` for speed on a GPU) applied to every
            layer's ``forward`` at setup, or None to run eagerly. Layers, not the model: layer drop,
            RaPTr and stacking change which layers run (a compiled model would recompile at every
            new set), while one layer's graph stays the same; the residual-scaling hooks stay eager
            around it, so a new scale is no new graph either.
    """

    model: torch.nn.Module
    layers: LayerAdapter
    # Strategy kind -> why it is refused (checked at setup by check_strategy_support; docs/strategies.md).
    # DDP is tested for every method (tests/test_ddp_methods.py); FSDP and DeepSpeed are not.
    unsupported_strategies: ClassVar[dict[str, str]] = {
        "fsdp": "untested, and the HF export saves the model's own weights on rank 0 alone, which FSDP shards "
                "(the layer adapter, layer copies and the clock's share of parameters with a gradient also "
                "assume whole parameters)",
        "deepspeed": "untested, and the clock prices each optimizer step from the parameters' .grad, which ZeRO "
                     "stage 2/3 does not keep; ZeRO also hands the optimizer flat partitions, so the RMS-scaled "
                     "optimizers (AdamWScale, RMSScaledLion, SophiaG rms_scaling) would scale by a partition's RMS",
    }

    def __init__(self, optimizer: OptimizerCallable = torch.optim.AdamW, lr_schedule: LRSchedule | None = None,
                 decay_norm_weights: bool = False, compile_layers: str | None = None) -> None:
        super().__init__()
        self.decay_norm_weights, self.compile_layers = decay_norm_weights, compile_layers
        self._layers_compiled = False
        self.optimizer_factory = optimizer
        self.lr_schedule = lr_schedule or OneCycleTriangle()
        self.clock: ReferenceClock | None = None
        # None means all layers; layer stacking grows it, other methods leave it alone.
        self.model_depth: int | None = None
        self.lr_adjustments: dict[str, Callable[[float], float]] = {}
        self.val_loss = MeanMetric()
        self._stepping = False

    # -- what subclasses provide ------------------------------------------------------------------

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The objective's mean loss on ``batch`` (with gradient)."""
        raise NotImplementedError

    def model_signature(self) -> dict[str, Any]:
        """What an RST profile must have been measured for to price this model."""
        raise NotImplementedError

    @property
    def prediction_head(self) -> torch.nn.Module:
        """The module that runs on every prediction (MLM head, LM head)."""
        raise NotImplementedError

    def per_example_losses(self, batch: dict[str, torch.Tensor], charge: bool = True) -> torch.Tensor:
        """Per-example mean loss without gradient (batch selection); charged forward-only when ``charge``."""
        raise NotImplementedError

    def hessian_pass(self, batch: dict[str, torch.Tensor], charge: bool = True) -> int:
        """One Sophia-G Gauss-Newton-Bartlett forward+backward; returns the loss tokens of ``batch``."""
        raise NotImplementedError

    def implements(self, name: str) -> bool:
        """Whether this module's class provides the optional pass ``name`` (see ``OPTIONAL_PASSES``)."""
        return getattr(type(self), name) is not getattr(BudgetedModule, name)

    # -- the clock --------------------------------------------------------------------------------

    def attach_clock(self, clock: ReferenceClock) -> None:
        """Install the reference clock this module charges for every pass it runs."""
        self.clock = clock

    def charge(self, kind: str, tokens: int) -> None:
        """Pay for one pass of ``kind`` over ``tokens`` input tokens at the current active depth."""
        if self.clock is not None:
            self.clock.charge(kind, tokens, self.layers.active_depth())

    def budget_progress(self) -> float:
        """Fraction of the training budget spent, counting the step now being taken.

        With a budgeted clock this is the clock's progress (whatever a step costs); otherwise the
        fraction of ``trainer.max_steps`` (or the epochs' steps) taken. Either way it counts what has
        been charged: at a batch's start the coming update is not included, when the LR is set
        right before the update it is.
        """
        if self.clock is not None and self.clock.budget is not None:
            return self.clock.progress
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total) or total <= 0:
            raise ConfigurationError("set trainer.max_steps (or max_epochs) so the LR schedule has an end")
        return min((self.trainer.global_step + self._stepping) / total, 1.0)

    # -- depth ------------------------------------------------------------------------------------

    def model_layers(self) -> list[int] | None:
        """Indices of the layers that make up the model now (``None``: all of them)."""
        return None if self.model_depth is None else list(range(self.model_depth))

    @contextlib.contextmanager
    def evaluated_model(self) -> Iterator[None]:
        """The whole model as grown so far, unscaled, whatever a method switched off for training."""
        with self.layers.active(self.model_layers()), self.layers.unscaled():
            yield

    # -- Lightning hooks --------------------------------------------------------------------------

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        # Charged before the pass runs, as NTNG does, so progress includes this micro-batch.
        self.charge("forward_backward", batch["input_ids"].numel())
        loss = self.loss(batch)
        self.log_update("train/loss", loss, prog_bar=True)
        return loss

    def log_update(self, name: str, value: Any, prog_bar: bool = False) -> None:
        """``self.log`` for a value of this update, called only when Lightning will use it: on the
        updates it writes to the loggers (every ``trainer.log_every_n_steps``, and the last) or, for
        ``prog_bar`` values, when a progress bar shows them.

        Each ``self.log`` call costs about 0.9 ms of Lightning bookkeeping (it re-walks the metric's
        state to move it to the value's device). At five values an update, that was a fifth of a T5-tiny
        CPU step, and work no profile prices. ``trainer.callback_metrics`` therefore holds these values
        on the logged updates; set ``trainer.log_every_n_steps=1`` to read them after every update.
        """
        trainer = self._trainer
        shown = prog_bar and trainer is not None and trainer.progress_bar_callback is not None
        if trainer is None or shown or trainer._logger_connector.should_update_logs:
            self.log(name, value, prog_bar=prog_bar)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        # Evaluation measures the whole model (for stacking: as grown so far), whatever a method has
        # switched off for training; it is never charged to the clock.
        with self.evaluated_model():
            loss = self.loss(batch)
        self.val_loss.update(loss, weight=(batch["labels"] != -100).sum())

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test")

    def _log_evaluation(self, prefix: str) -> None:
        loss = self.val_loss.compute()  # token-weighted mean over the epoch
        self.val_loss.reset()
        self.log(f"{prefix}/loss", loss, prog_bar=True, sync_dist=True)
        self.log(f"{prefix}/perplexity", torch.exp(loss.clamp(max=50)), sync_dist=True)

    def setup(self, stage: str) -> None:
        if stage == "fit":
            check_strategy_support(self.trainer, self)
            check_unused_parameter_support(self.trainer)
        if self.compile_layers is not None and not self._layers_compiled:
            # In setup, so each spawned DDP process compiles its own (compiled functions do not pickle).
            for stack in self.layers.stack_names:
                for layer in self.layers.layers(stack):
                    layer.forward = torch.compile(layer.forward, backend=self.compile_layers)
            self._layers_compiled = True

    def on_fit_start(self) -> None:
        if self.device.type == "cpu":
            keep_freed_host_memory()  # 3-7 % of a CPU step went to re-faulting trimmed heap pages

    def configure_optimizers(self) -> torch.optim.Optimizer:
        optimizer = self.optimizer_factory(weight_decay_groups(self.model, self.decay_norm_weights))
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        return optimizer

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Set the LR right before the update from the progress *including* this step, so the
        # schedule reaches its final value exactly on the step that spends the budget.
        if self.clock is not None:
            self.clock.charge_optimizer_step(type(optimizer).__name__, _updated_fraction(optimizer))
        self._stepping = True  # the update being taken counts from here on
        try:
            progress = self.budget_progress()
        finally:
            self._stepping = False
        multiplier = self.lr_schedule(progress)
        for adjustment in self.lr_adjustments.values():
            multiplier *= adjustment(progress)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * multiplier
        self.log_update("train/lr", optimizer.param_groups[0]["lr"])

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.clock is not None:
            checkpoint["reference_clock"] = self.clock.state_dict()
        checkpoint["model_depth"] = self.model_depth

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lightning loads the weights after this hook; a checkpoint of another model would fail there
        # with a page of size mismatches, so name the first difference and the fix instead.
        if (difference := state_dict_difference(self.state_dict(), checkpoint.get("state_dict", {}))) is not None:
            source = getattr(self._trainer, "ckpt_path", None) or "the checkpoint"
            raise ConfigurationError(f"{source} was saved by a different model ({difference}); resume it with "
                                     "the recipe that wrote it, or start a new run without --ckpt_path/--resume")
        # A resumed run continues the same clock exactly (the budget callback attached it in setup).
        if self.clock is not None and "reference_clock" in checkpoint:
            self.clock.load_state_dict(checkpoint["reference_clock"])
        self.model_depth = checkpoint.get("model_depth")

    # -- export -----------------------------------------------------------------------------------

    def export_pretrained(self, directory: str | Path, tokenizer: Any = None) -> Path:
        """Write an HF checkpoint (``save_pretrained``) plus the tokenizer, at the model's depth.

        The export holds every layer, or for a stacked model only the layers grown so far (with
        the config's depth updated). Its config carries the configured (fine-tuning) dropout.

        Args:
            directory: target directory, created (or replaced) whole.
            tokenizer: a tokenizer with ``save_pretrained``, written next to the weights.

        Returns:
            The directory.
        """
        directory = Path(directory)
        with atomic_directory(directory) as staging:  # a kill mid-export leaves the previous export whole
            if self.model_depth is not None and self.model_depth < self.layers.num_layers():
                truncated_model(self.model, self.model_depth).save_pretrained(staging)
            else:
                with self.layers.active(None), self.layers.unscaled():
                    self.model.save_pretrained(staging)
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
        return directory


def set_training_dropout(model: torch.nn.Module, probability: float) -> None:
    """Train ``model`` with dropout ``probability`` while its config keeps the configured (fine-tuning)
    dropout, which the export carries.

    HF modules read their probability from ``nn.Dropout.p``, except attention that keeps it as a number:
    T5's ``dropout`` and ModernBERT's ``attention_dropout``.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = probability
            continue
        for name in ("dropout", "attention_dropout"):
            if type(getattr(module, name, None)) in (float, int):
                setattr(module, name, probability)


def state_dict_difference(expected: dict[str, torch.Tensor], found: dict[str, Any]) -> str | None:
    """The first way ``found`` (a checkpoint's weights) does not fit ``expected`` (a model's), or None.

    Args:
        expected: the model's ``state_dict()``.
        found: the checkpoint's ``state_dict``.

    Returns:
        E.g. ``"model.encoder.layer.0.attention... has shape (64, 64), the checkpoint (128, 128)"``.
    """
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing:
        return f"{len(missing)} weights missing, e.g. {missing[0]}"
    if unexpected:
        return f"{len(unexpected)} weights this model does not have, e.g. {unexpected[0]}"
    for key, value in expected.items():
        if tuple(value.shape) != tuple(found[key].shape):
            return f"{key} has shape {tuple(value.shape)}, the checkpoint {tuple(found[key].shape)}"
    return None


def require_budgeted_module(pl_module: LightningModule, user: str, needs: Sequence[str] = ()) -> BudgetedModule:
    """The one check a callback makes at setup that the module offers what it uses.

    Args:
        pl_module: the module being trained.
        user: the callback's name, for the message.
        needs: optional passes it calls (``OPTIONAL_PASSES``).

    Returns:
        ``pl_module``, typed.

    Raises:
        ConfigurationError: naming what is missing.
    """
    name = type(pl_module).__name__
    if not isinstance(pl_module, BudgetedModule):
        raise ConfigurationError(f"{user} needs a budgeted pretraining module (app.modules.budgeted.BudgetedModule, "
                                 f"e.g. MaskedLanguageModel); {name} is not one")
    if missing := [need for need in needs if not pl_module.implements(need)]:
        raise ConfigurationError(f"{user} needs {' and '.join(missing)}, which {name} does not implement")
    return pl_module


def _updated_fraction(optimizer: torch.optim.Optimizer) -> float:
    """Share of the optimizer's parameter elements that have a gradient (and so get updated)."""
    total = updated = 0
    for group in optimizer.param_groups:
        for param in group["params"]:
            total += param.numel()
            updated += param.numel() if param.grad is not None else 0
    return updated / total if total else 1.0
