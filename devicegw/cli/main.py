"""``devicegw`` command line: the parser and the entry point; each command lives in
devicegw/cli/commands/."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence

from devicegw import __version__
from devicegw.cli.commands import (
    assign,
    assignments,
    audit,
    check_config,
    correct,
    demo,
    export,
    run,
    schema,
    simulate,
    status,
    tail,
    web_user,
)
from devicegw.cli.terminal import error
from devicegw.errors import GatewayError

# In the order ``devicegw --help`` lists them.
COMMANDS = (
    run,
    status,
    assign,
    assignments,
    correct,
    check_config,
    simulate,
    demo,
    tail,
    export,
    schema,
    audit,
    web_user,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="devicegw", description="devicegw: the ward-side gateway of a nebulized-therapy trial"
    )
    p.add_argument("--version", action="version", version=f"devicegw {__version__}")
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], default=None)
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    from devicegw.cli.replay import add_cli_commands

    add_cli_commands(sub)  # replay, recording show
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc: int = args.func(args)
    except GatewayError as exc:
        error(exc)
        return 1
    except BrokenPipeError:
        # The reader went away (`devicegw status | head`): nothing of ours failed. Point
        # stdout at /dev/null so the interpreter's final flush does not complain.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # what a shell reports for SIGPIPE
    return rc


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
