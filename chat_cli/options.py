"""The command-line options both front ends share: where the server is and how to reach it."""

from __future__ import annotations

import argparse
from importlib import metadata
from pathlib import Path

import grpc

from chat_cli.protocol import SessionError


def port(text: str) -> int:
    """A TCP port to dial, 1 to 65535, for argparse's `type=`."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, not {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is from 1 to 65535, not {value}")
    return value


def add_version_option(parser: argparse.ArgumentParser) -> None:
    """--version, printing the installed package's version."""
    parser.add_argument("--version", action="version", version=f"%(prog)s {metadata.version('chat-service')}")


def add_connection_options(parser: argparse.ArgumentParser) -> None:
    """--host, --port and the TLS options."""
    parser.add_argument("--host", default="127.0.0.1", help="the server's address (default: 127.0.0.1)")
    parser.add_argument("--port", type=port, default=50051, help="the server's port (default: 50051)")
    tls = parser.add_argument_group("TLS")
    tls.add_argument("--tls", action="store_true", help="connect with TLS (implied by --ca, --cert and --key)")
    tls.add_argument(
        "--ca",
        type=Path,
        metavar="PATH",
        help="PEM file of the CA that signed the server's certificate (default: the system's trust store)",
    )
    tls.add_argument("--cert", type=Path, metavar="PATH", help="PEM client certificate, for servers that ask for one")
    tls.add_argument("--key", type=Path, metavar="PATH", help="PEM private key of --cert")


def credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    """TLS credentials from the parsed options, or None for plaintext; raises SessionError for unusable files."""
    if (args.cert is None) != (args.key is None):
        raise SessionError("--cert and --key go together: give both, or neither")
    if not (args.tls or args.ca or args.cert):
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read(args.ca, "--ca"),
        private_key=_read(args.key, "--key"),
        certificate_chain=_read(args.cert, "--cert"),
    )


def _read(path: Path | None, option: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SessionError(f"cannot read {option} {path} ({exc.strerror})") from None
