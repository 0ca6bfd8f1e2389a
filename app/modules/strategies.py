"""Which Lightning strategies a budgeted fit supports, checked at setup so a refusal comes before training.

DDP is supported by every method (``tests/test_ddp_methods.py``); FSDP and DeepSpeed are refused
with their reasons (``docs/strategies.md``).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import DDPStrategy

from app.errors import ConfigurationError


def check_unused_parameter_support(trainer: Any) -> None:
    """Fail early when DDP would error on layers that get no gradient.

    Methods that leave layers out of some passes declare ``leaves_layers_without_gradient = True``;
    plain DDP's reducer then errors (or hangs) on their parameters, which
    ``find_unused_parameters=True`` prevents.

    Raises:
        ConfigurationError: naming the methods and the fix.
    """
    methods = [type(c).__name__ for c in trainer.callbacks if getattr(c, "leaves_layers_without_gradient", False)]
    strategy = trainer.strategy
    if not methods or trainer.world_size <= 1 or not isinstance(strategy, DDPStrategy):
        return
    # Lightning keeps DDP's constructor arguments only in this private attribute.
    if not getattr(strategy, "_ddp_kwargs", {}).get("find_unused_parameters", False):
        raise ConfigurationError(
            f"{', '.join(methods)} leave some layers without gradients, which plain DDP rejects; "
            "set trainer.strategy=ddp_find_unused_parameters_true"
        )


def strategy_kind(strategy: Any) -> str | None:
    """``"deepspeed"``, ``"fsdp"`` (FSDP, and FSDP2 / tensor parallel: ``ModelParallelStrategy``), ``"ddp"``
    (every ``DDPStrategy``: ddp, ddp_spawn, ddp_find_unused_parameters_true, ...) or None (one device).

    By class name along the MRO: DeepSpeed's strategy is a DDPStrategy, and naming the classes needs
    neither deepspeed installed nor a GPU.
    """
    names = {cls.__name__ for cls in type(strategy).__mro__}
    if "DeepSpeedStrategy" in names:
        return "deepspeed"
    if names & {"FSDPStrategy", "ModelParallelStrategy"}:
        return "fsdp"
    return "ddp" if "DDPStrategy" in names else None


def check_strategy_support(trainer: Any, module: Any = None) -> None:
    """Fail at setup on a distributed strategy that the module or a method callback does not support.

    Each declares ``unsupported_strategies``, a map from :func:`strategy_kind` to the reason; the table
    of what is supported, and the tests that show it, is ``docs/strategies.md``. DDP is supported by
    every method (``tests/test_ddp_methods.py``).

    Args:
        trainer: has ``strategy`` and ``callbacks``.
        module: the LightningModule (default: ``trainer.lightning_module``).

    Raises:
        ConfigurationError: naming the strategy, every reason, and the strategy to use instead.
    """
    kind = strategy_kind(trainer.strategy)
    if kind is None:
        return
    module = module if module is not None else getattr(trainer, "lightning_module", None)
    reasons = [f"{type(owner).__name__}: {owner.unsupported_strategies[kind]}"
               for owner in [module, *trainer.callbacks]
               if kind in (getattr(owner, "unsupported_strategies", None) or {})]
    if not reasons:
        return
    unused = any(getattr(c, "leaves_layers_without_gradient", False) for c in trainer.callbacks)
    instead = "ddp_find_unused_parameters_true" if unused else "ddp"
    raise ConfigurationError(
        f"trainer.strategy {type(trainer.strategy).__name__} is not supported: {'; '.join(reasons)}; "
        f"set trainer.strategy={instead} (tested for every method; docs/strategies.md)"
    )
