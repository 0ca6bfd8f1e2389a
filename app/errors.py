"""The one exception type that means "your configuration or input is wrong".

The ``ntng`` command prints it as a single ``ntng: error: ...`` line instead of a traceback, so
every check that guards against bad input raises it with a message that names the problem.
"""


class ConfigurationError(ValueError):
    """Bad input found before training starts (missing corpus, vocabulary mismatch, ...)."""


class TrainingDiverged(ConfigurationError):
    """The loss or the weights became NaN/inf; the run stops and keeps its last good checkpoint.

    A configuration problem in practice (learning rate, precision), so it is printed the same way:
    one ``ntng: error:`` line naming the update.
    """
