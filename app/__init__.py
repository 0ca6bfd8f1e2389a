"""ntng application core: LightningModules, model building, the layer adapter, the CLI."""
