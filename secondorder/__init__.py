"""secondorder: distributed, large-batch training for PyTorch built around second-order
optimization. See README.md for the commands and ``secondorder.train`` for the entry point."""

__version__ = "0.1.0"
