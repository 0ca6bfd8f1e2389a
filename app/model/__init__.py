"""Model building: HF backbones (``backbones``), the layer adapter the depth methods act through
(``layers``), T5's fused RMSNorm and GELU ops (``fused_t5``), Tay et al.'s shape knobs (``shapes``),
optimizers written here (``optimizers``), weight-decay groups (``param_groups``) and budget-progress
LR schedules (``schedules``)."""
