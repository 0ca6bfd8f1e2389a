"""The ntng application: the ``ntng`` command (``cli``), recipes (``recipe``), LightningModules
(``modules``), model building (``model``), budget accounting (``accounting``), downstream scoring
and reports (``evaluation``), the commands that train nothing (``commands``), run directories and resume (``runs``),
kill-safe writes (``files``), shipped files found from any directory (``shipped``), CPU heap memory kept mapped between steps (``host_memory``), and ``errors``."""
