"""Triton kernels and their plain host launchers, one file per kernel family.

Importing a module here imports triton: on CPU tensors set TRITON_INTERPRET=1 first. When Triton's
interpreter is on, its launches are serialized across threads (it is not thread-safe; see
:mod:`.interpreter`).
"""

from .interpreter import serialize_launches

# The tl.dot ``input_precision`` of every kernel for fp32 inputs (fp16/bf16 dots ignore it): three TF32
# tensor-core products, about fp32 accuracy. Its one home; asserted by the tests.
FP32_DOT_PRECISION = "tf32x3"


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host code: ``triton.cdiv`` is a ConstexprFunction that costs microseconds
    per host call, which every launch would pay (issue 10's host-time budget)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (0 for n <= 0, as triton.next_power_of_2), for host code
    (see :func:`cdiv`)."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


serialize_launches()
