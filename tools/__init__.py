"""Command-line tools: the demo and q8convert."""
