"""Downstream evaluation: scoring predictions with each task's metrics (``metrics``) and the
result, prediction and submission files a suite writes (``reports``)."""
