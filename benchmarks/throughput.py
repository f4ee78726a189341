"""Model throughput, providers side by side: the same as ``python -m vit_kernels bench``.

    python benchmarks/throughput.py vit_base_patch16_224 timm:vit_base_patch16_224 --batch-size 256 --dtype bf16

See ``python benchmarks/throughput.py --help``.
"""

import sys

from vit_kernels import cli

if __name__ == "__main__":
    sys.exit(cli.main(["bench", *sys.argv[1:]]))
