"""Argument types shared by the CLI commands. Each refuses a bad value while the command line is
parsed, before anything is built: argparse then prints one line naming the option, what was
expected and what was received, and the command exits with code 2."""

from __future__ import annotations

import argparse
from pathlib import Path


def refuse_combination(parser, check) -> None:
    """A check of options that are each valid alone but not together, run by the CLI's parser
    (``cli.Parser``) once the command line is parsed: ``check(args)`` returns the error, written
    ``argument --x: expected ..., got ...``, or None; argparse prints it in one line, exit code 2."""
    parser.combination_checks = (*getattr(parser, "combination_checks", ()), check)


def positive_int(text: str) -> int:
    """An integer >= 1 (depth, batch size, image size, tokens, jobs, repeats, ...)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (seconds: 0 takes the fewest samples only)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not (0 <= value < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {value}")
    return value


def _file_in_the_way(path: Path):
    """The nearest existing path among ``path`` and the folders above it when that is not a folder, else None."""
    for p in (path, *path.parents):
        if p.exists():
            return None if p.is_dir() else p
    return None


def out_folder(text: str) -> str:
    """A folder to write into: it may not exist yet (it is created), but neither it nor any folder
    above it may be a file."""
    path = Path(text).expanduser()
    p = _file_in_the_way(path)
    if p is not None:
        what = "which is a file" if p == path else f"but {p} is a file"
        raise argparse.ArgumentTypeError(f"expected a folder (created when missing), got {text!r}, {what}")
    return text


def image_out_file(text: str) -> str:
    """An image file to write, named with an extension Pillow writes (.png, .jpg, ...): not a folder; the
    folders above it may not exist yet (they are created), but none may be a file."""
    path = Path(text).expanduser()
    expected = "expected an image file to write, named .png, .jpg or another extension Pillow writes"
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{expected}, got {text!r}, which is a folder")
    from PIL import Image

    if Image.registered_extensions().get(path.suffix.lower()) not in Image.SAVE:
        what = f"whose extension {path.suffix!r} is not one" if path.suffix else "which has no extension"
        raise argparse.ArgumentTypeError(f"{expected}, got {text!r}, {what}")
    p = _file_in_the_way(path.parent)
    if p is not None:
        raise argparse.ArgumentTypeError(f"{expected}, got {text!r}, but {p} is a file")
    return str(path)


def image_file(text: str) -> str:
    """An image file Pillow can read."""
    path = Path(text).expanduser()
    if not path.is_file():
        raise argparse.ArgumentTypeError(
            f"expected an image file, got {text!r}: {'a folder' if path.is_dir() else 'no such file'}"
        )
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise argparse.ArgumentTypeError(f"expected an image file Pillow can read, got {text!r} ({e})") from None
    return str(path)
