"""LightningDataModules: pretraining data (``pretraining``) and downstream tasks (``tasks``)."""
