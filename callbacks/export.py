"""Export the trained model in Hugging Face format at the end of ``fit``.

The export is what fine-tuning suites and plain ``transformers`` users consume, so it is always
full depth and carries the tokenizer the run trained on.
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from app.modules.budgeted import BudgetedModule


class HuggingFaceExport(Callback):
    """Write ``save_pretrained`` weights and the tokenizer to ``<run dir>/<dirname>`` after ``fit``.

    Args:
        dirname: sub-directory of the run directory (the logger's version directory).
    """

    def __init__(self, dirname: str = "hf") -> None:
        self.dirname = dirname

    @staticmethod
    def run_directory(trainer: Trainer) -> Path:
        """The directory that holds this run's logs, config and checkpoints.

        ``trainer.log_dir`` without its broadcast: that is a collective, so the writers that run on
        rank 0 alone (this export, ``RunRecord``) hung every DDP run waiting for ranks that never
        asked. Rank 0 gets its own directory, the one everything is written to; another rank's answer
        may name another version directory and is only ever passed to calls rank 0 carries out.
        """
        logger = trainer.loggers[0] if trainer.loggers else None
        if logger is None:
            return Path(trainer.default_root_dir)
        directory = logger.log_dir if isinstance(logger, (TensorBoardLogger, CSVLogger)) else logger.save_dir
        return Path(directory or trainer.default_root_dir)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero or not isinstance(pl_module, BudgetedModule):
            return
        tokenizer = getattr(trainer.datamodule, "tokenizer", None)
        target = pl_module.export_pretrained(self.run_directory(trainer) / self.dirname, tokenizer)
        rank_zero_info(f"ntng: exported Hugging Face checkpoint to {target}")
