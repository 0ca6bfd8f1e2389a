"""Downstream tasks: what a task and an example are (``spec``), the GLUE and SuperGLUE readers
(``glue``, ``superglue``), Super-Natural-Instructions (``sni``), the same tasks from the Hugging Face
hub (``hub``), every known task (``registry``), the fine-tuning LightningDataModule (``datamodule``)
and the text-to-text input format of T5 models (``text_to_text``)."""
