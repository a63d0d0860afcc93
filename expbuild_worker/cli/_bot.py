"""``expbuild-worker bot``: take leases from a BuildGrid scheduler until SIGTERM or SIGINT, then leave."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal
from typing import Any

from expbuild_worker.cli._serve import first_stop_signal, run_command
from expbuild_worker.composition import build_bot, build_worker, check_bot_config
from expbuild_worker.config import WorkerConfig
from expbuild_worker.errors import WorkerError

_log = logging.getLogger("expbuild_worker")


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    parser = subparsers.add_parser(
        "bot",
        help="run as a bot of a Remote Workers API scheduler (BuildGrid)",
        description="Take leases from a Remote Workers API scheduler (BuildGrid) until SIGTERM or "
        "SIGINT, then leave: running leases get server.shutdown_grace_seconds to finish, the rest "
        "are handed back.",
    )
    parser.add_argument("--config", metavar="FILE", help="TOML configuration (default: built-in defaults)")
    parser.add_argument(
        "--scheduler", metavar="grpc://HOST:PORT", help="the scheduler (overrides bot.scheduler)"
    )
    parser.add_argument(
        "--instance", metavar="NAME", help="the scheduler's instance (overrides bot.instance_name)"
    )
    parser.add_argument("--bot-id", metavar="ID", help="this bot's id (overrides bot.bot_id)")
    parser.add_argument(
        "--capacity", type=int, metavar="N", help="leases run at once (overrides bot.capacity)"
    )
    parser.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], help="overrides server.log_level"
    )
    parser.set_defaults(handler=bot_main)


def _apply_overrides(config: WorkerConfig, args: argparse.Namespace) -> WorkerConfig:
    bot = dataclasses.replace(config.bot, enabled=True)
    if args.scheduler is not None:
        bot = dataclasses.replace(bot, scheduler=args.scheduler)
    if args.instance is not None:
        bot = dataclasses.replace(bot, instance_name=args.instance)
    if args.bot_id is not None:
        bot = dataclasses.replace(bot, bot_id=args.bot_id)
    if args.capacity is not None:
        if args.capacity < 1:
            raise WorkerError(f"--capacity: expected at least 1, got {args.capacity}")
        bot = dataclasses.replace(bot, capacity=args.capacity)
    server = config.server
    if args.log_level is not None:
        server = dataclasses.replace(server, log_level=args.log_level)
    return dataclasses.replace(config, bot=bot, server=server)


async def _run(config: WorkerConfig) -> None:
    worker = await build_worker(config)
    try:
        bot = await build_bot(config, worker)
    except BaseException:
        await worker.shutdown(0)
        raise
    bot.start()
    # One parseable line: scripts and tests read the bot's id and scheduler here.
    print(f"expbuild-worker bot {bot.settings.bot_id} serving {config.bot.scheduler}", flush=True)
    await first_stop_signal()
    grace = config.server.shutdown_grace_seconds
    _log.info(
        "leaving: running leases get %gs to finish, the rest are handed back; a second signal hands "
        "them back at once",
        grace,
    )
    leave = asyncio.ensure_future(bot.drain(grace))
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, lambda: asyncio.ensure_future(bot.drain(0)))
    await leave
    await bot.close()
    await worker.shutdown(0)
    _log.info("stopped")


def bot_main(args: argparse.Namespace) -> int:
    def configure(config: WorkerConfig) -> WorkerConfig:
        config = _apply_overrides(config, args)
        check_bot_config(config)
        return config

    return run_command(args, configure, _run)
