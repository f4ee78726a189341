"""Loading the csrc extension (prebuilt, JIT with ninja, or the host-emulation build)."""
from __future__ import annotations

from typing import Optional

import torch


def unavailable_reason(device: torch.device) -> Optional[str]:
    """None when the CUDA backend can run on ``device``, else why not."""
    return "the CUDA C++ backend (csrc) is not implemented yet"
