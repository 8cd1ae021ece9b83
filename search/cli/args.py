"""What every subcommand's flags share: argparse that reports a bad flag as one line, and the
types that check a value as it is parsed."""

from __future__ import annotations

import argparse

from search.inputs.values import cadence_value, pack_value, ramp_value


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag or value as one line (no usage block), exit 2."""

    def error(self, message: str):  # noqa: D102
        self.exit(2, f"{self.prog}: error: {message}\n")


def _word_or_int(text: str, check) -> int | str | None:
    try:
        return check(int(text) if text.lstrip("-").isdigit() else text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def pack_size(text: str) -> int | str:
    """argparse type of --pack: `auto` or an integer >= 1."""
    return _word_or_int(text, pack_value)


def ramp_size(text: str) -> int | None:
    """argparse type of --ramp: `off` or an integer >= 1."""
    return _word_or_int(text, ramp_value)


def checkpoint_cadence(text: str) -> str:
    """argparse type of --checkpoint-every: auto, N epochs or a time (30s, 5m); kept as written."""
    try:
        cadence_value(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def dataset_name(text: str) -> str:
    """argparse type of --dataset: a built-in dataset or folder:PATH (the user's images)."""
    from trainer.catalogue import DATASETS

    if text in DATASETS or (text.startswith("folder:") and len(text) > len("folder:")):
        return text
    raise argparse.ArgumentTypeError(f"expected one of {', '.join(DATASETS)} or folder:PATH, "
                                     f"got {text!r}")


def model_spec(text: str) -> str:
    """argparse type of --model: lenet5, torchvision:NAME, PATH.py:FUNCTION (PATH relative to
    the current directory) or package.module:FUNCTION; built and checked at the preflight."""
    from pathlib import Path

    from search.inputs.space import model_path

    kind, sep, rest = text.partition(":")
    if text != "lenet5" and not (sep and kind and rest):
        raise argparse.ArgumentTypeError(f"expected lenet5, torchvision:NAME, PATH.py:FUNCTION or "
                                         f"package.module:FUNCTION, got {text!r}")
    return model_path(text, Path.cwd())


MODEL_HELP = ("the network: lenet5 (default), torchvision:NAME (e.g. resnet18, fresh weights), "
              "PATH.py:FUNCTION or package.module:FUNCTION (called with num_classes= and the "
              "model_args.NAME settings)")


def storage_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage", help="SQLAlchemy URL or journal file "
                   "(default $SEARCH_STORAGE, else search-journal.log)")
