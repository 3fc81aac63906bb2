"""What every command shares: exit codes, the clock, loading and checking a config,
and running a coroutine until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeAlias

from devicegw.cli.terminal import error
from devicegw.config import Config, load_config
from devicegw.errors import ConfigError
from drivers.clock import Clock, ScaledClock, SystemClock

EXIT_CONFIG = 2
EXIT_FATAL = 1

log = logging.getLogger("devicegw")

# What a command module's ``register`` receives: ``build_parser``'s subcommands.
SubParsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def make_clock(scale: float) -> Clock:
    return SystemClock() if scale == 1.0 else ScaledClock(scale)


def run_until_signalled(coro: Coroutine[Any, Any, object]) -> int:
    """Run ``coro``; SIGTERM/SIGINT cancel it so every task shuts down in order."""

    async def main() -> int:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        try:
            result = await coro
        except asyncio.CancelledError:
            return 0
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        return result if isinstance(result, int) else 0

    return asyncio.run(main())


def load(path: str) -> Config:
    """The configuration, or exit 2 with its one-line error."""
    try:
        return load_config(path)
    except ConfigError as exc:
        error(exc)
        raise SystemExit(EXIT_CONFIG) from None


def checked(
    path: str, *, record: str | None = None, machine: bool = True
) -> tuple[Config, list[str]]:
    """The configuration and what the machine must offer it: exactly what ``run`` needs."""
    from devicegw.runtime.preflight import insecure_settings, preflight

    config = load(path)
    if not machine:
        return config, insecure_settings(config)
    if record is not None:
        try:
            gateway_settings = type(config.gateway).model_validate(
                {**config.gateway.model_dump(), "record_dir": Path(record)}
            )
        except ValueError as exc:
            error(f"--record {record}: {exc}")
            raise SystemExit(EXIT_CONFIG) from None
        config = config.model_copy(update={"gateway": gateway_settings})
    try:
        warnings = preflight(config)
    except ConfigError as exc:
        error(f"{path}: {exc}")
        raise SystemExit(EXIT_CONFIG) from None
    return config, warnings


def ask_daemon(command: str, data_dir: Path, payload: dict[str, object]) -> int:
    """One request to the running daemon's control socket, its answer printed:
    exit 0 applied, 2 refused (the reason on stderr), 1 the daemon cannot be reached."""
    from devicegw.cli.terminal import printable
    from devicegw.runtime.control_socket import request, socket_path

    try:
        reply = request(data_dir, payload)
    except OSError as exc:
        where = printable(socket_path(data_dir))
        sys.stderr.write(
            f"devicegw {command}: the gateway is not reachable at {where}: {printable(exc)}\n"
        )
        return EXIT_FATAL
    message = printable(reply.get("message", ""), limit=300)
    if reply.get("applied") is True:
        sys.stdout.write(message + "\n")
        return 0
    sys.stderr.write(f"devicegw {command}: refused: {message}\n")
    return EXIT_CONFIG
