"""``python -m vit_kernels <command>``: each command lives in its own module with
``add_parser(subparsers)`` and ``run(args)``; the list below is the whole dispatch."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback

# command name -> module with add_parser(subparsers) and run(args)
COMMANDS = {
    "verify": "vit_kernels.commands.verify",
    "info": "vit_kernels.commands.info",
    "inspect": "vit_kernels.commands.inspect",
    "bench": "vit_kernels.commands.bench",
    "profile-attention": "vit_kernels.commands.profile_attention",
    "selftest": "vit_kernels.commands.selftest",
    "attention-map": "vit_kernels.commands.attention_map",
    "attention-distance": "vit_kernels.commands.attention_distance",
}
# commands that compile or time kernels and must not run in Triton's interpreter
NO_INTERPRETER = {"inspect", "bench", "profile-attention"}


_INTERPRETER_NOTE = (
    "note: no CUDA device: Triton kernels run in Triton's interpreter on the CPU "
    "(TRITON_INTERPRET=1; for verification, not speed)"
)
_interpreter_turned_on = False


def interpreter_for_command(command: str) -> None:
    """On a machine without a CUDA device, Triton kernels can only run in Triton's interpreter: turn
    it on for ``command`` (not for NO_INTERPRETER's) unless the user set TRITON_INTERPRET. Triton
    reads the variable when ``@triton.jit`` defines a kernel, so ``python -m vit_kernels`` calls this
    from vit_kernels/__init__.py before any kernel module is imported; :func:`main` says so."""
    global _interpreter_turned_on
    if command in NO_INTERPRETER or "TRITON_INTERPRET" in os.environ:
        return
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
        _interpreter_turned_on = True


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The help of every command: descriptions as written (paragraphs kept), and each option's
    default shown after its sentence, as argparse.ArgumentDefaultsHelpFormatter does, except where
    there is nothing to show (no default, a flag that is off) or the sentence already says it
    (defaults that depend on the device, for one)."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if d is None or d is False or d is argparse.SUPPRESS or d == [] or "default" in text.lower():
            return text
        if not action.option_strings and action.nargs not in ("?", "*"):
            return text
        return text + " (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (``prog: error: argument --depth: expected ...``, exit 2).
    Sub-command parsers are of this class too (add_subparsers uses the parent's class)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        """argparse's parse, then the command's checks of option combinations
        (:func:`vit_kernels.commands.arguments.refuse_combination`): a refused one is a usage error."""
        namespace, extras = super().parse_known_args(args, namespace)
        for check in getattr(self, "combination_checks", ()):
            message = check(namespace)
            if message:
                self.error(message)
        return namespace, extras


def build_parser():
    """The parser of every command; ``-v`` is accepted before or after the command name."""
    parser = Parser(prog="python -m vit_kernels", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log backend decisions (INFO) and print the traceback of an error"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, mod in COMMANDS.items():
        modules[name] = importlib.import_module(mod)
        modules[name].add_parser(sub)
    for p in sub.choices.values():
        p.formatter_class = HelpFormatter  # the same help layout for every command, set here once
        # -v after the command: SUPPRESS keeps a -v given before it
        p.add_argument(
            "-v",
            "--verbose",
            action="store_true",
            default=argparse.SUPPRESS,
            help="log backend decisions (INFO) and print the traceback of an error",
        )
    return parser, modules


# What a command raises for bad input or an unusable environment: one line, exit code 2. Anything
# else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, TypeError, RuntimeError, OSError, ImportError)


def main(argv=None) -> int:
    """Run one command; returns the exit code (0 ok, 1 a check failed, 2 bad input or an error)."""
    parser, modules = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2): argparse printed it
        return e.code if isinstance(e.code, int) else 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    from .cuda.build import quiet_cuda_home_guess

    quiet_cuda_home_guess()  # before anything imports torch.utils.cpp_extension (torch.utils.benchmark does)
    if _interpreter_turned_on and args.command not in NO_INTERPRETER:
        print(_INTERPRETER_NOTE, file=sys.stderr)
    prog = f"{parser.prog} {args.command}"
    try:
        return int(modules[args.command].run(args) or 0)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        return _error(prog, str(e.code), args.verbose)
    except USER_ERRORS as e:
        return _error(prog, str(e) or type(e).__name__, args.verbose)


def _error(prog: str, message: str, verbose: bool) -> int:
    """Print the error in one line (the traceback first with -v); exit code 2."""
    if verbose:
        traceback.print_exc()
        print(f"{prog}: error: {message}", file=sys.stderr)
    else:
        print(f"{prog}: error: {message}  (run with -v for the traceback)", file=sys.stderr)
    return 2
