"""Export the trained model in Hugging Face format at the end of ``fit``.

The export is what fine-tuning suites and plain ``transformers`` users consume, so it is always
full depth and carries the tokenizer the run trained on.
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
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
        """The directory that holds this run's logs, config and checkpoints."""
        return Path(trainer.log_dir or trainer.default_root_dir)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero or not isinstance(pl_module, BudgetedModule):
            return
        tokenizer = getattr(trainer.datamodule, "tokenizer", None)
        target = pl_module.export_pretrained(self.run_directory(trainer) / self.dirname, tokenizer)
        rank_zero_info(f"ntng: exported Hugging Face checkpoint to {target}")
