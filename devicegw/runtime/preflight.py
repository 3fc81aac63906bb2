"""What the machine must offer a valid configuration, checked the same way by check-config and run.

The configuration file can be valid and the gateway still unable to start: a
data directory it cannot write, a CA file that is missing, a password file it
cannot read. ``devicegw check-config`` and ``devicegw run`` both call
:func:`preflight`, which performs exactly the loads ``run`` performs (the TLS
context is built by the publisher's own function), so a file that passes
check-config does not fail at run, and one that fails, fails with the same
one-line message naming the field.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from devicegw.config import Config
from devicegw.errors import ConfigError
from devicegw.mqtt.publisher import build_tls_context
from devicegw.runtime import descriptors
from devicegw.safe_text import printable
from devicegw.storage.assignments import KitListError, load_kit_list


def preflight(config: Config) -> list[str]:
    """Raise ``ConfigError`` for what would stop ``run``; return warnings to show loudly."""
    _state_dir(config.gateway.data_dir, "gateway.data_dir")
    if config.gateway.record_dir is not None:
        _state_dir(config.gateway.record_dir, "gateway.record_dir")
    tls = config.broker.tls
    if tls.enabled:
        for field, path in (
            ("ca_file", tls.ca_file),
            ("cert_file", tls.cert_file),
            ("key_file", tls.key_file),
        ):
            if path is not None:
                _readable_file(path, f"broker.tls.{field}")
    build_tls_context(config.broker)
    want, allowed = descriptors.needed(config), descriptors.hard_limit()
    if want > allowed:
        raise ConfigError(
            f"devices: {len(config.devices) + len(config.oximeters)} devices need about {want} "
            f"file descriptors; this machine allows at most {allowed} (ulimit -Hn, or "
            "LimitNOFILE= in the systemd unit)",
            field="devices",
        )
    if config.trial is not None and config.trial.kit_list is not None:
        _readable_file(config.trial.kit_list, "trial.kit_list")
        try:
            load_kit_list(config.trial.kit_list)
        except KitListError as exc:
            raise ConfigError(f"trial.kit_list: {exc}", field="trial.kit_list") from None
    if config.broker.password_file is not None:
        _readable_file(config.broker.password_file, "broker.password_file")
    password = config.broker.password()
    if password is not None and not password.get_secret_value():
        field = "broker.password_env" if config.broker.password_env else "broker.password_file"
        raise ConfigError(f"{field}: the broker password is empty", field=field)
    return insecure_settings(config)


def insecure_settings(config: Config) -> list[str]:
    """What the configuration allows that weakens security, to be said loudly."""
    warnings = []
    if config.broker.plaintext_password:
        warnings.append(
            f"the broker password goes in PLAIN TEXT to {printable(config.broker.host)}"
            " (broker.allow_plaintext_password = true): anyone on the network can read it"
        )
    return warnings


def _readable_file(path: Path, field: str) -> None:
    shown = printable(path)
    try:
        st = path.stat()
    except OSError as exc:
        raise ConfigError(f"{field}: {shown}: {exc.strerror}", field=field) from None
    if not path.is_file():
        raise ConfigError(f"{field}: {shown} is not a regular file", field=field)
    if not os.access(path, os.R_OK) or st.st_size == 0:
        why = "cannot be read" if st.st_size else "is empty"
        raise ConfigError(f"{field}: {shown} {why}", field=field)


def _state_dir(path: Path, field: str) -> None:
    """The directory exists and takes a file, or its nearest existing parent lets us make it."""
    shown = printable(path)
    target = Path(os.path.abspath(path))
    existing = target
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(
            f"{field}: {shown} cannot be made: {printable(existing)} is not a directory",
            field=field,
        )
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".devicegw-check-"):
            pass
    except OSError as exc:
        why = "is not writable" if existing == target else f"cannot be made in {existing}"
        raise ConfigError(f"{field}: {shown} {why}: {exc.strerror}", field=field) from None
