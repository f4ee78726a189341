"""Triton kernels and their plain host launchers, one file per kernel family.

Importing a module here imports triton: on CPU tensors set TRITON_INTERPRET=1 first.
"""
