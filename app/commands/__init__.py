"""The ``ntng`` commands that train nothing themselves: ``plan`` (what a budget buys), ``calibrate``
(measure an RST profile), ``il_losses`` (irreducible losses for RHO-loss), ``finetune`` (the GLUE /
SuperGLUE suites), ``sweep`` (methods x budgets x seeds, each cell's steps run as ``ntng`` commands;
its file format in ``sweep_spec``) and ``report`` (NTNG's Table 1 from a sweep's cells). Each builds
what it needs from the recipe (``app.recipe``)."""
