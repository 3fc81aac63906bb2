"""The ``devicegw`` command line; the only part of the gateway that may start simulators."""

from devicegw.cli.main import main

__all__ = ["main"]
