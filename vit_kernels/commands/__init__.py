"""The CLI commands of ``python -m vit_kernels``, one module each (see vit_kernels/cli.py)."""
