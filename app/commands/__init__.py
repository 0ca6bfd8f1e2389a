"""The ``ntng`` commands that train nothing themselves: ``plan`` (what a budget buys), ``calibrate``
(measure an RST profile), ``il_losses`` (irreducible losses for RHO-loss) and ``finetune`` (the
GLUE / SuperGLUE suites). Each builds what it needs from the recipe (``app.recipe``)."""
