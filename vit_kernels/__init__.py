"""vit_kernels: fused Triton and CUDA kernels for Vision Transformers.

Public API:
- ops: flash_attention, qkv_attention, layernorm_gelu_mlp, patch_embed, linear
- modules: vit_kernels.nn.FusedAttention, FusedMlp, FusedPatchEmbed
- models: vit_kernels.models.create_model, VisionTransformer
- fuse / verify: swap fused modules into a ViT and check it against the original
- backends: last_decision(op) says which backend an op took and why the others were not;
  record_decisions() collects the decision of every call in a block
- tuning: ``auto`` chooses by measurement on a CUDA device; tune(model, inputs) ahead of time,
  tune_report() prints what was timed (vit_kernels.tuning)
"""

import sys as _sys

if _sys.argv[:1] == ["-m"] and len(_sys.argv) > 1:
    # `python -m vit_kernels COMMAND` (argv[0] is "-m" while Python imports this package to find
    # its __main__): decide Triton's interpreter before any kernel module defines its kernels
    from .cli import interpreter_for_command

    interpreter_for_command(_sys.argv[1])


from . import library, models, nn, ops, reference, tuning  # library: registers torch.ops.vit_kernels.*
from .backends import BACKENDS, Decision, last_decision, record_decisions
from .ops import flash_attention, layernorm_gelu_mlp, linear, patch_embed, qkv_attention
from .swap import fuse, fuse_report, unfuse
from .tuning import tune, tune_report
from .verify import verify

__version__ = "0.1.0"

__all__ = [
    "flash_attention",
    "qkv_attention",
    "layernorm_gelu_mlp",
    "patch_embed",
    "linear",
    "fuse",
    "unfuse",
    "fuse_report",
    "verify",
    "tune",
    "tune_report",
    "tuning",
    "last_decision",
    "record_decisions",
    "Decision",
    "BACKENDS",
    "models",
    "nn",
    "ops",
    "reference",
    "library",
]
