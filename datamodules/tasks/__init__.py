"""Downstream tasks: what a task and an example are (``spec``), the GLUE and SuperGLUE readers
(``glue``, ``superglue``), the same tasks from the Hugging Face hub (``hub``), every known task
(``registry``), and the fine-tuning LightningDataModule (``datamodule``)."""
