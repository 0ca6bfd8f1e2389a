"""Lightning callbacks: the budget (``budget``), the HF export (``export``), throughput
(``monitoring``), one module per efficiency method (``layer_drop``, ``random_path``, ``stacking``,
``selective_backprop``, ``rho_loss``, ``sophia``), and what methods share: rank- and resume-stable
randomness and depth checks (``sampling``), batch selection's candidate stream and swap
(``selection``), and the irreducible-loss file (``irreducible_losses``)."""
