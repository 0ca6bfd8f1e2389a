"""Downstream evaluation: scoring predictions with each task's metrics (``metrics``) and the
result, prediction and submission files a suite writes (``reports``).
Comparing a sweep's cells, NTNG's tables as data (``comparison``), and the report's figures (``plots``)."""
