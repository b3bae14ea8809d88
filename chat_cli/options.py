"""Command-line value checks both front ends share."""

from __future__ import annotations

import argparse


def port(text: str) -> int:
    """A TCP port to dial, 1 to 65535, for argparse's `type=`."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, not {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is from 1 to 65535, not {value}")
    return value
