"""``devicegw run``: the ward-side daemon."""

from __future__ import annotations

import argparse

from devicegw.cli.common import (
    EXIT_CONFIG,
    EXIT_FATAL,
    SubParsers,
    checked,
    log,
    make_clock,
    run_until_signalled,
)
from devicegw.cli.terminal import error
from devicegw.errors import ConfigError, GatewayError
from devicegw.runtime.logging_setup import configure_logging


def register(sub: SubParsers) -> None:
    run = sub.add_parser("run", help="run the gateway daemon")
    run.add_argument("--config", required=True, help="TOML configuration file")
    run.add_argument(
        "--time-scale",
        type=float,
        default=None,
        help="run the clock N times faster (simulated devices only)",
    )
    run.add_argument("--record", metavar="DIR", default=None, help="record raw link events in DIR")
    run.add_argument(
        "--new-store",
        action="store_true",
        help="confirm starting with a new, empty store where one existed (audited)",
    )
    run.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    from devicegw.runtime import descriptors, gc_policy
    from devicegw.runtime.gateway import Gateway
    from devicegw.runtime.supervise import Task
    from devicegw.runtime.systemd_notify import Notifier

    config, warnings = checked(args.config, record=args.record)
    descriptors.raise_soft_limit()  # toward the hard limit: a large ward needs more than 1024
    configure_logging(args.log_level or config.gateway.log_level, config.gateway.log_format)
    for warning in warnings:
        log.warning("INSECURE: %s", warning)
    scale = args.time_scale if args.time_scale is not None else config.gateway.time_scale
    try:
        # Under systemd (Type=notify): READY=1, WATCHDOG=1, STATUS= (deploy/systemd).
        gateway = Gateway(
            config,
            clock=make_clock(scale),
            notifier=Notifier.from_environment(),
            new_store=args.new_store,
        )
    except ConfigError as exc:
        error(exc)
        return EXIT_CONFIG
    except (GatewayError, OSError) as exc:
        error(f"cannot start: {exc}")
        return EXIT_FATAL
    if config.http is not None:  # the ward dashboard, /metrics, /healthz, /readyz
        from devicegw.web.auth import UsersFileError
        from devicegw.web.server import WebServer

        try:
            gateway.extra_runners.append(WebServer(gateway))
        except UsersFileError as exc:
            error(exc)
            return EXIT_CONFIG
        except OSError as exc:  # the certificate or key (ssl.SSLError is an OSError)
            error(f"cannot start the dashboard: [http] tls_cert/tls_key: {exc}")
            return EXIT_FATAL

    # Built: what exists now lives as long as the process (runtime/gc_policy.py); so
    # does what the devices' runners make once they run: frozen again when they are up.
    gc_policy.freeze_startup_objects()
    clock = gateway.clock
    gateway.extra_runners.append(Task("gc-freeze", lambda: gc_policy.keep_frozen(clock)))

    async def serve() -> None:
        async with gateway:  # closes the store and the recorder on the way out
            await gateway.run()

    try:
        return run_until_signalled(serve())
    except Exception as exc:  # noqa: BLE001 - one line for anything before the tasks run
        # Every running task is supervised (devicegw/runtime/supervise.py); what arrives
        # here failed before the tasks started. One line here, the traceback in the log.
        log.critical("gateway could not start", exc_info=True)
        error(f"cannot start: {type(exc).__name__}: {exc}")
        return EXIT_FATAL
