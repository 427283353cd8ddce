"""q8.formats — see README.md."""
