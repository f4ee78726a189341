"""Attention across sequence lengths and a per-stage profile of one ViT block: the same as
``python -m vit_kernels profile-attention``.

    python benchmarks/attention.py --tokens 197,577,1025 --dtype bf16,fp16 --head-dim 64,80

See ``python benchmarks/attention.py --help``.
"""

import sys

from vit_kernels import cli

if __name__ == "__main__":
    sys.exit(cli.main(["profile-attention", *sys.argv[1:]]))
