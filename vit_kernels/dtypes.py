"""The dtype lists and the command-line dtype names, in one place (the lowest layer beside
:mod:`vit_kernels.arch`; it imports nothing else of vit_kernels).

- :data:`KERNEL_DTYPES`: what every fused kernel (Triton and CUDA C++) takes; csrc's ``vk::DType``
  numbers them in this order;
- :data:`FLOAT_DTYPES`: what the ops accept (float64 runs the torch path, as the oracle does);
- :data:`SHORT_NAMES`: the ``--dtype`` names of the commands (``fp32``, ``fp16``, ``bf16``).
"""

from __future__ import annotations

import torch

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FLOAT_DTYPES = KERNEL_DTYPES + (torch.float64,)
SHORT_NAMES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
