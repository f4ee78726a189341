"""Triton kernels and their plain host launchers, one file per kernel family.

Importing a module here imports triton: on CPU tensors set TRITON_INTERPRET=1 first. When Triton's
interpreter is on, its launches are serialized across threads (it is not thread-safe; see
:mod:`.interpreter`).
"""
from .interpreter import serialize_launches

serialize_launches()
