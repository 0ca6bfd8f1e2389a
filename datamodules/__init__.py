"""LightningDataModules: pretraining corpora, collators, downstream tasks."""
