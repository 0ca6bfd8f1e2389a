"""Lightning callbacks: one module per efficiency method, the budget callback, monitoring."""
