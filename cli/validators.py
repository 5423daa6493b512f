"""argparse ``type=`` validators shared by every ``tandem`` command (a leaf module: no Tandem imports).

Each takes the option's text and returns the parsed value, or raises
:class:`argparse.ArgumentTypeError` with a message saying what to pass instead.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def power_of_two(text: str) -> int:
    """A positive power of two (1, 2, 4, ...)."""
    value = positive_int(text)
    if value & (value - 1):
        raise argparse.ArgumentTypeError(f"must be a positive power of two, got {text!r}")
    return value


def port_number(text: str) -> int:
    """A TCP port in [0, 65535]; 0 lets the server pick a free one."""
    value = _int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port in [0, 65535], got {text!r}")
    return value


def bytes_limit(text: str) -> int:
    """A byte count in [1024, 2**31 - 1] (gRPC message size limits)."""
    value = _int(text)
    if not 1024 <= value <= 2**31 - 1:
        raise argparse.ArgumentTypeError(f"must be in [1024, 2147483647] bytes, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite float > 0."""
    value = _float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """A finite float >= 0 (seconds, temperatures)."""
    value = _float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return value


def probability(text: str) -> float:
    """A float in (0, 1]."""
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text!r}")
    return value


def device_name(text: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    if not DEVICE_PATTERN.fullmatch(text):
        raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda or cuda:N, got {text!r}")
    return text


def model_dir(text: str) -> Path:
    """An existing checkpoint directory."""
    path = Path(text).expanduser()
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"model directory not found: {text!r}")
    return path


def existing_file(text: str) -> Path:
    """A path to a readable file."""
    path = Path(text).expanduser()
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"file not found: {text!r}")
    return path


def redis_url(text: str) -> str:
    """A ``redis://``, ``rediss://`` or ``unix://`` URL."""
    if not text.startswith(("redis://", "rediss://", "unix://")):
        raise argparse.ArgumentTypeError(f"must be a redis://, rediss:// or unix:// URL, got {text!r}")
    return text
