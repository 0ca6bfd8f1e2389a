"""The one exception type that means "your configuration or input is wrong".

The ``ntng`` command prints it as a single ``ntng: error: ...`` line instead of a traceback, so
every check that guards against bad input raises it with a message that names the problem.
"""


class ConfigurationError(ValueError):
    """Bad input found before training starts (missing corpus, vocabulary mismatch, ...)."""
