"""Budget accounting: the reference clock (``clock``), what a pass costs on the reference machine
(``cost_models``), and the pure planning walk that turns a budget into updates (``planning``)."""
