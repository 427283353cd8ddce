"""q8.optim — see README.md."""
