"""The ``expbuild-worker`` command: ``serve`` runs a worker, ``bot`` joins a scheduler; others talk to one."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from expbuild_worker.execution.host import disable_grpc_fork_handlers

disable_grpc_fork_handlers()  # before anything below imports grpc

from expbuild_worker import __version__  # noqa: E402
from expbuild_worker.cli import _bot, _client, _serve  # noqa: E402

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="expbuild-worker",
        description="Run a build worker (serve), join a scheduler as a bot (bot), or talk to a "
        "running worker (exec, capabilities, health).",
        epilog="Run 'expbuild-worker COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _serve.register(subparsers)
    _bot.register(subparsers)
    _client.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script and of ``python -m expbuild_worker``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    code: int = args.handler(args)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
