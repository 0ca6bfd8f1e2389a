"""Which distributed strategies each method supports: the declarations, the setup-time refusal with its fix,
and the table in docs/strategies.md. (DDP itself runs in tests/test_ddp_methods.py.)"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
)

from app.errors import ConfigurationError
from app.modules.budgeted import BudgetedModule
from app.modules.strategies import check_strategy_support, strategy_kind
from app.modules.masked_lm import MaskedLanguageModel
from app.modules.span_corruption import SpanCorruptionModel
from callbacks.export import HuggingFaceExport
from callbacks.layer_drop import ProgressiveLayerDrop
from callbacks.random_path import RandomPathTraining
from callbacks.rho_loss import RhoLoss
from callbacks.selective_backprop import SelectiveBackprop
from callbacks.sophia import SophiaHessian
from callbacks.stacking import LayerStacking
from tests.conftest import REPO_ROOT, tiny_masked_lm
from tests.test_methods import METHODS

# test_methods' method name -> the callback its overlay adds (None: the optimizer or nothing changes).
CALLBACKS = {"baseline": None, "lion": None, "layer_drop": ProgressiveLayerDrop, "raptr": RandomPathTraining,
             "stacking": LayerStacking, "selective_backprop": SelectiveBackprop, "rho_loss": RhoLoss,
             "sophia": SophiaHessian}
LEAVE_LAYERS_WITHOUT_GRADIENT = {"layer_drop", "raptr", "stacking"}
MODULES = {"bert": MaskedLanguageModel, "t5": SpanCorruptionModel}


def _deepspeed() -> DeepSpeedStrategy:
    # Constructing it needs deepspeed installed; the check only looks at the class.
    return DeepSpeedStrategy.__new__(DeepSpeedStrategy)


REFUSED = {"FSDPStrategy": FSDPStrategy, "ModelParallelStrategy": ModelParallelStrategy,
           "DeepSpeedStrategy": _deepspeed}


def _trainer(strategy, method: str, family: str = "bert") -> SimpleNamespace:
    callback = CALLBACKS[method]
    callbacks = [] if callback is None else [callback.__new__(callback)]  # the declarations are class attributes
    module = MODULES[family].__new__(MODULES[family])
    return SimpleNamespace(strategy=strategy, callbacks=callbacks, lightning_module=module, world_size=2)


def test_the_table_covers_every_method():
    assert set(CALLBACKS) == set(METHODS)


def test_strategy_kinds():
    assert strategy_kind(DDPStrategy()) == strategy_kind(DDPStrategy(find_unused_parameters=True)) == "ddp"
    assert strategy_kind(FSDPStrategy()) == strategy_kind(ModelParallelStrategy()) == "fsdp"
    assert strategy_kind(_deepspeed()) == "deepspeed"  # a DDPStrategy subclass, so checked first
    assert strategy_kind(SingleDeviceStrategy("cpu")) is None


@pytest.mark.parametrize("owner", [BudgetedModule, ProgressiveLayerDrop, RandomPathTraining, LayerStacking,
                                   SelectiveBackprop, RhoLoss, SophiaHessian])
def test_the_module_and_every_method_callback_declare_fsdp_and_deepspeed(owner):
    assert set(owner.unsupported_strategies) == {"fsdp", "deepspeed"}
    assert all(reason.strip() for reason in owner.unsupported_strategies.values())


@pytest.mark.parametrize("family", sorted(MODULES))
@pytest.mark.parametrize("method", sorted(CALLBACKS))
@pytest.mark.parametrize("strategy", sorted(REFUSED))
def test_fsdp_and_deepspeed_are_refused_with_the_reasons_and_the_fix(strategy, method, family):
    trainer = _trainer(REFUSED[strategy](), method, family)
    fix = "ddp_find_unused_parameters_true" if method in LEAVE_LAYERS_WITHOUT_GRADIENT else "ddp"
    with pytest.raises(ConfigurationError) as refused:
        check_strategy_support(trainer)
    message = str(refused.value)
    assert message.startswith(f"trainer.strategy {strategy} is not supported: {MODULES[family].__name__}: ")
    if CALLBACKS[method] is not None:
        assert f"; {CALLBACKS[method].__name__}: " in message  # the method's own reason too
    assert message.endswith(f"set trainer.strategy={fix} (tested for every method; docs/strategies.md)")


@pytest.mark.parametrize("method", sorted(CALLBACKS))
def test_ddp_and_one_device_pass_the_check(method):
    for strategy in (DDPStrategy(), DDPStrategy(find_unused_parameters=True), SingleDeviceStrategy("cpu")):
        check_strategy_support(_trainer(strategy, method))


def test_the_module_refuses_at_setup():
    module = tiny_masked_lm()
    module.trainer = SimpleNamespace(strategy=FSDPStrategy(), callbacks=[LayerStacking(1, [0.5])], world_size=2)
    with pytest.raises(ConfigurationError, match="FSDPStrategy is not supported: MaskedLanguageModel: .*; "
                                                 "LayerStacking: .*ddp_find_unused_parameters_true"):
        module.setup("fit")


class _NoCollectives:
    def broadcast(self, obj, src=0):
        raise AssertionError("run_directory must not broadcast: rank-0-only writers call it")


def test_run_directory_is_the_log_dir_without_a_collective(tmp_path):
    # trainer.log_dir broadcasts; the export and RunRecord ask on rank 0 alone, which hung every DDP fit.
    logger = TensorBoardLogger(save_dir=tmp_path, name="run", version=3)
    trainer = SimpleNamespace(loggers=[logger], default_root_dir=str(tmp_path / "root"), strategy=_NoCollectives())
    assert HuggingFaceExport.run_directory(trainer) == tmp_path / "run" / "version_3"
    trainer.loggers = []
    assert HuggingFaceExport.run_directory(trainer) == tmp_path / "root"
    # In one process it is what trainer.log_dir says, with a logger (the next free version) or without.
    for logger in (TensorBoardLogger(save_dir=tmp_path, name="run"), False):
        real = Trainer(logger=logger, default_root_dir=tmp_path / "root", enable_progress_bar=False)
        assert HuggingFaceExport.run_directory(real) == Path(real.log_dir)


def _table() -> dict[str, dict[str, str]]:
    text = (REPO_ROOT / "docs" / "strategies.md").read_text()
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in text.splitlines() if line.startswith("| `")]
    return {re.sub(r"[`*]", "", row[0]): dict(zip(("ddp", "fsdp", "deepspeed"), row[2:5])) for row in rows}


def test_docs_table_says_what_the_code_declares():
    table = _table()
    assert set(table) == set(CALLBACKS)
    for method, cells in table.items():
        owners = [BudgetedModule] + ([CALLBACKS[method]] if CALLBACKS[method] else [])
        assert cells["ddp"].startswith("supported"), method
        for kind in ("fsdp", "deepspeed"):
            refused = any(kind in owner.unsupported_strategies for owner in owners)
            assert cells[kind].startswith("refused") == refused, (method, kind, cells[kind])
