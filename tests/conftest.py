"""Test setup: Triton's interpreter when there is no GPU, and the bf16 interpreter workaround.

TRITON_INTERPRET must be set before triton is imported, so this runs first.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _patch_interpreter_bf16_dot() -> None:
    """Test-only patch for a flaw of Triton's interpreter (see shared/PLATFORM.md): it keeps bf16
    as numpy uint16 and its dot calls np.matmul on those integers. Widen bf16 operands to
    float32 (bits << 16) first. Kept here, never in the library."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import numpy as np
    from triton.runtime import interpreter as interp

    builder_cls = interp.InterpreterBuilder
    original = builder_cls.create_dot
    if getattr(original, "_vit_kernels_patched", False):
        return

    def widen(t):
        if getattr(t.dtype, "scalar", t.dtype) == interp.tl.bfloat16:
            return interp.TensorHandle((t.data.astype(np.uint32) << 16).view(np.float32), interp.tl.float32)
        return t

    def create_dot(self, a, b, d, *args, **kwargs):
        return original(self, widen(a), widen(b), d, *args, **kwargs)

    create_dot._vit_kernels_patched = True
    builder_cls.create_dot = create_dot

    # Second flaw: the interpreter's fp32 -> bf16 cast truncates the mantissa (and its "rtne"
    # path loses the carry), where the GPU rounds to nearest even. Round like the GPU does.
    original_cast, original_fp_to_fp = builder_cls.cast_impl, builder_cls.create_fp_to_fp

    def to_bf16(src):
        f32 = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32))
        bits = f32.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return interp.TensorHandle(bits.copy(), interp.tl.bfloat16)

    def is_f32_to_bf16(src, dst_type):
        return src.dtype.scalar == interp.tl.float32 and dst_type.scalar == interp.tl.bfloat16

    def cast_impl(self, src, dst_type):
        return to_bf16(src) if is_f32_to_bf16(src, dst_type) else original_cast(self, src, dst_type)

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        if is_f32_to_bf16(src, dst_type):
            return to_bf16(src)
        return original_fp_to_fp(self, src, dst_type, rounding_mode)

    builder_cls.cast_impl = cast_impl
    builder_cls.create_fp_to_fp = create_fp_to_fp


try:
    _patch_interpreter_bf16_dot()
except ImportError:  # triton missing: the Triton tests report it themselves
    pass


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A fresh seed per test, printed on failure, so inputs differ between tests and runs."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield


@pytest.fixture(autouse=True)
def _fresh_function_plans():
    """Each test starts without the launch plans of earlier tests' op calls: tests replace kernels,
    the tuner and backend rules with monkeypatch, which a plan kept across tests would not see."""
    from vit_kernels import library

    library.clear_plans()
    yield
    library.clear_plans()


def pytest_runtest_makereport(item, call):
    if call.when == "call" and call.excinfo is not None:
        for k, v in item.user_properties:
            if k == "seed":
                print(f"\n[{item.nodeid}] torch seed {v} (reproduce with torch.manual_seed({v}))")
