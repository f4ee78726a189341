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


# ------------------------------------------------------------------------------ near the bound
# bound = factor * max|baseline - oracle| + floor * max(1, max|oracle|); an error just inside passes,
# just outside fails. float64 outputs, so the errors placed here are the errors measured.
def near_bound(relative, base_err=3e-4, factor=2.0, floor=1e-6):
    """compare() of an output whose one error is `relative` times the bound, and that bound."""
    ref = 1.5 + torch.rand(64, dtype=torch.float64)  # max |oracle| in [1.5, 2.5): the floor scales
    base, out = ref.clone(), ref.clone()
    base[7] += base_err
    bound = factor * base_err + floor * ref.abs().max().item()
    out[11] -= relative * bound
    return compare(out, ref, base, factor=factor, floor=floor), bound


@pytest.mark.parametrize("factor", [2.0, 3.0])
def test_just_inside_the_bound_passes(factor):
    c, bound = near_bound(1 - 1e-6, factor=factor)
    assert c.ok and c.where == (11,) and c.bound == pytest.approx(bound, rel=1e-12), str(c)


@pytest.mark.parametrize("factor", [2.0, 3.0])
def test_just_outside_the_bound_fails(factor):
    c, bound = near_bound(1 + 1e-6, factor=factor)
    assert not c.ok and c.where == (11,) and c.bound == pytest.approx(bound, rel=1e-12), str(c)
    assert "FAILED" in str(c) and "at index (11,)" in str(c), str(c)


def test_default_floor_per_dtype_without_baseline():
    ref = torch.full((4,), 3.0, dtype=torch.float64)  # floor scales by max |oracle| = 3
    assert compare(ref + 2.9e-3, ref).ok is False  # float64 out: floor 1e-12
    out = (ref + 2.9e-3).half()  # fp16: floor 1e-3 * 3
    assert compare(out, ref).bound == pytest.approx(3e-3) and compare(out, ref).ok
    assert not compare((ref + 4e-3).half(), ref).ok


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_output_fails_even_where_the_oracle_is_huge(value):
    ref = torch.randn(8, dtype=torch.float64) * 1e30
    out = ref.clone()
    out[3] = value
    c = compare(out, ref, ref.float())
    assert not c.ok and c.where == (3,), str(c)


def test_nan_in_the_oracle_or_the_baseline_fails():
    ref = torch.randn(8, dtype=torch.float64)
    bad_ref = ref.clone()
    bad_ref[2] = float("nan")
    assert not compare(ref.float(), bad_ref, ref.float()).ok  # NaN expected: never "close"
    bad_base = ref.float().clone()
    bad_base[2] = float("nan")
    assert not compare(ref.float(), ref, bad_base).ok  # a NaN baseline must not loosen the bound


def test_baseline_shape_mismatch_fails():
    ref = torch.randn(4, 5, dtype=torch.float64)
    with pytest.raises(AssertionError, match=r"baseline: shape \(1, 5\) != oracle shape \(4, 5\)"):
        assert_close(ref.float(), ref, ref[:1].float())  # would broadcast


def test_output_shape_mismatch_names_both_shapes():
    with pytest.raises(AssertionError, match=r"shape \(4, 3\) != oracle shape \(3, 4\)"):
        assert_close(torch.zeros(4, 3), torch.zeros(3, 4, dtype=torch.float64))
