"""``python -m vit_kernels <command>``: each command lives in its own module with
``add_parser(subparsers)`` and ``run(args)``; the list below is the whole dispatch."""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# command name -> module with add_parser(subparsers) and run(args)
COMMANDS = {
    "verify": "vit_kernels.commands.verify",
    "info": "vit_kernels.commands.info",
    "inspect": "vit_kernels.commands.inspect",
    "bench": "vit_kernels.commands.bench",
    "profile-attention": "vit_kernels.commands.profile_attention",
    "selftest": "vit_kernels.commands.selftest",
}
# commands that compile or time kernels and must not run in Triton's interpreter
NO_INTERPRETER = {"inspect", "bench", "profile-attention"}


def _enable_interpreter_without_gpu() -> None:
    """On a machine without a CUDA device, Triton kernels can only run in Triton's interpreter.
    Turn it on (before triton is imported) and say so."""
    import torch
    if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
        os.environ["TRITON_INTERPRET"] = "1"
        print("note: no CUDA device: Triton kernels run in Triton's interpreter on the CPU "
              "(TRITON_INTERPRET=1; for verification, not speed)", file=sys.stderr)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vit_kernels", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log backend decisions (INFO)")
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, mod in COMMANDS.items():
        modules[name] = importlib.import_module(mod)
        modules[name].add_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if args.command not in NO_INTERPRETER:
        _enable_interpreter_without_gpu()
    try:
        return int(modules[args.command].run(args) or 0)
    except (ValueError, TypeError, RuntimeError) as e:
        if args.verbose:
            raise
        print(f"error: {e}  (run with -v for the traceback)", file=sys.stderr)
        return 2
