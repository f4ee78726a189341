"""NaN-filled outputs for the tests (a helper module): every new floating tensor from torch.empty /
torch.empty_like starts as NaN, so an element a kernel fails to write fails the comparison with the
oracle. The library allocates with plain torch.empty; this is the only place outputs are poisoned."""

import torch

NAN = float("nan")
_REAL_EMPTY, _REAL_EMPTY_LIKE = torch.empty, torch.empty_like


def _poisoned(fn):
    def make_empty(*args, **kwargs):
        t = fn(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(NAN)
        return t

    return make_empty


def poison_empty(monkeypatch) -> None:
    """Make torch.empty, torch.empty_like and Tensor.new_empty_strided (what a launch plan's replay
    allocates with, vit_kernels.replay) return NaN-filled floating tensors for one test."""
    monkeypatch.setattr(torch, "empty", _poisoned(_REAL_EMPTY))
    monkeypatch.setattr(torch, "empty_like", _poisoned(_REAL_EMPTY_LIKE))
    monkeypatch.setattr(torch.Tensor, "new_empty_strided", _poisoned(torch.Tensor.new_empty_strided))
