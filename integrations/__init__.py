"""q8.integrations — see README.md."""
