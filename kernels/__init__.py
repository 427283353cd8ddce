"""q8.kernels — see README.md."""
