"""Lightning callbacks: one module per efficiency method, the budget callback, monitoring.

Importing the package registers every method's planner with ``ntng plan``.
"""

from callbacks import layer_drop, random_path, rho_loss, selective_backprop, sophia, stacking  # noqa: F401  (planners)
