"""The tolerance helper must be able to fail: NaN, a wrong element, a wrong shape."""
import pytest
import torch

from vit_kernels.testing import assert_close, compare


def test_passes_within_twice_the_baseline_error():
    ref = torch.randn(10, 10, dtype=torch.float64)
    base = ref.half()
    assert_close(base.float().half(), ref, base)


def test_reports_where_and_by_how_much():
    ref = torch.randn(4, 6, dtype=torch.float64)
    out = ref.float().clone()
    out[2, 3] += 1.0
    with pytest.raises(AssertionError, match=r"at index \(2, 3\)"):
        assert_close(out, ref, ref.float())


def test_nan_fails():
    ref = torch.randn(8, dtype=torch.float64)
    out = ref.float().clone()
    out[5] = float("nan")
    c = compare(out, ref, ref.float())
    assert not c.ok and c.where == (5,)


def test_shape_mismatch_fails():
    with pytest.raises(AssertionError, match="shape"):
        assert_close(torch.zeros(3), torch.zeros(4, dtype=torch.float64))
