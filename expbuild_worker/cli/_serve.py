"""``expbuild-worker serve``: run a worker until SIGTERM or SIGINT, then shut down gracefully."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from expbuild_worker.cli._memory import fix_mmap_threshold
from expbuild_worker.composition import build_bot, check_bot_config
from expbuild_worker.config import WorkerConfig, load_config
from expbuild_worker.errors import WorkerError
from expbuild_worker.logging_setup import configure_logging
from expbuild_worker.server import start_server

_log = logging.getLogger("expbuild_worker")


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run a worker",
        description="Run a worker until SIGTERM or SIGINT, then shut down gracefully: running actions "
        "get server.shutdown_grace_seconds to finish, a second signal cancels them at once.",
    )
    parser.add_argument("--config", metavar="FILE", help="TOML configuration (default: built-in defaults)")
    parser.add_argument("--address", help="listen address (overrides server.address; default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="listen port (overrides server.port; 0 = any free port)")
    parser.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], help="overrides server.log_level"
    )
    parser.set_defaults(handler=serve_main)


def _apply_overrides(config: WorkerConfig, args: argparse.Namespace) -> WorkerConfig:
    server = config.server
    if args.address is not None:
        server = dataclasses.replace(server, address=args.address)
    if args.port is not None:
        if not 0 <= args.port <= 65535:
            raise WorkerError(f"--port: expected 0-65535, got {args.port}")
        server = dataclasses.replace(server, port=args.port)
    if args.log_level is not None:
        server = dataclasses.replace(server, log_level=args.log_level)
    return dataclasses.replace(config, server=server)


async def first_stop_signal() -> None:
    """Return at the first SIGTERM or SIGINT; what a second one does, the caller installs after."""
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    await stop_requested.wait()


async def _serve(config: WorkerConfig) -> None:
    running = await start_server(config)
    bot = None
    if config.bot.enabled:  # a bot beside the server, over the same engine
        try:
            bot = await build_bot(config, running.worker)
        except BaseException:
            await running.stop(0)
            raise
        bot.start()
    # One parseable line: scripts and tests that start the worker on port 0 read the port here.
    print(f"expbuild-worker listening on {running.target}", flush=True)
    await first_stop_signal()
    engine = running.worker.engine
    queued = engine.queued_count
    _log.info(
        "shutting down: %d actions running get %gs to finish, %d queued are cancelled; "
        "a second signal cancels the running ones at once",
        engine.active_count - queued,
        config.server.shutdown_grace_seconds,
        queued,
    )
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, engine.cancel_all)
    if bot is not None:  # leave the scheduler first: its leases finish or go back, no new ones come
        await bot.drain(config.server.shutdown_grace_seconds)
        await bot.close()
    await running.stop()
    _log.info("stopped")


def serve_main(args: argparse.Namespace) -> int:
    def configure(config: WorkerConfig) -> WorkerConfig:
        config = _apply_overrides(config, args)
        if config.bot.enabled:
            check_bot_config(config)
        return config

    return run_command(args, configure, _serve)


def run_command(
    args: argparse.Namespace,
    configure: Callable[[WorkerConfig], WorkerConfig],
    run: Callable[[WorkerConfig], Coroutine[Any, Any, None]],
) -> int:
    """Load ``--config``, let ``configure`` apply the command's options and checks, then ``run``:
    2 for a configuration error, 1 for an error while running, 0 otherwise."""
    fix_mmap_threshold()
    try:
        config = configure(WorkerConfig() if args.config is None else load_config(args.config))
    except WorkerError as err:
        print(f"expbuild-worker: {err}", file=sys.stderr)
        return 2
    configure_logging(config.server.log_level, config.server.log_format)
    try:
        asyncio.run(run(config))
    except WorkerError as err:
        print(f"expbuild-worker: {err}", file=sys.stderr)
        return 1
    return 0
