"""Issue 14 item 7: an IDENT flood cannot fill the audit trail.

One allow-listed device sending IDENT with a new firmware string 200 times a
second for 15 s (real serial frames through the VM-1 pipeline, into a real
store): at most ``COALESCE_LIMIT`` records per minute are written, the rest are
counted in one ``audit_coalesced`` record (count, first and last time), a
WARNING says so, and the chain verifies.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path

import pytest

from devicegw.core.ports import AuditKind
from devicegw.core.vm1_pipeline import Vm1Pipeline
from devicegw.storage.audit import COALESCE_LIMIT, AuditTrail, iter_records, verify
from devicegw.storage.store import Store
from drivers.clock import ManualClock
from drivers.vm1.messages import Ident
from drivers.vm1.stream import encode_message_frame
from tests.session_stream import T0
from tests.test_identity_gate import SERIAL, Sink, config


def flood(pipeline: Vm1Pipeline, clock: ManualClock, *, rate_hz: int, seconds: int) -> int:
    n = rate_hz * seconds
    for i in range(n):
        msg = Ident(
            dev_ms=10_000 + i * 5,
            model="VM-1",
            serial_no=SERIAL,
            firmware=f"1.4.{i}",
            nominal_rate_ul_min=400,
            reservoir_capacity_ul=6000,
            last_session_no=41,
        )
        clock.advance(1.0 / rate_hz)
        pipeline.feed(encode_message_frame(msg), clock.now(), clock.monotonic())
    return n


def test_ident_flood_is_coalesced(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = ManualClock(T0)
    cfg = config()
    with Store(tmp_path / "gw.sqlite3") as store:
        trail = AuditTrail(store, clock=clock, gateway_id="gw")
        pipeline = Vm1Pipeline(cfg.devices[0], cfg, Sink(), audit=trail)
        pipeline.link_up(T0)
        with caplog.at_level(logging.WARNING, logger="devicegw.storage.audit"):
            sent = flood(pipeline, clock, rate_hz=200, seconds=15)
        trail.flush_coalesced(everything=True)
        records = list(iter_records(store))
        identified = [r for r in records if r.kind == AuditKind.device_identified]
        coalesced = [r for r in records if r.kind == AuditKind.audit_coalesced]
        assert len(identified) == COALESCE_LIMIT  # 15 s is within one window
        assert len(coalesced) == 1
        body = coalesced[0].body
        assert body["kind"] == "device_identified"
        assert body["count"] == sent - COALESCE_LIMIT
        assert str(body["first_utc"]) < str(body["last_utc"])
        assert coalesced[0].device_id == cfg.devices[0].id
        assert verify(store).ok
    warnings = [r for r in caplog.records if "coalescing" in r.getMessage()]
    assert len(warnings) == 1  # once per window, not per record


def test_a_new_window_writes_again(tmp_path: Path) -> None:
    """The limit is per window: after it, the device's records are written again."""
    clock = ManualClock(T0)
    with Store(tmp_path / "gw.sqlite3") as store:
        trail = AuditTrail(store, clock=clock, gateway_id="gw")
        for round_ in range(3):
            for i in range(COALESCE_LIMIT + 5):
                clock.advance(0.1)
                trail.append(
                    AuditKind.device_refused,
                    device_id="neb-1",
                    body={"serial_no": f"X{round_}-{i}"},
                )
            clock.advance(timedelta(minutes=1).total_seconds())
        trail.append(AuditKind.device_refused, device_id="neb-1", body={"serial_no": "last"})
        kinds = [r.kind for r in iter_records(store)]
        assert kinds.count("device_refused") == 3 * COALESCE_LIMIT + 1
        assert kinds.count("audit_coalesced") == 3
        # Other devices and kinds are not affected.
        trail.append(AuditKind.gateway_start, body={})
        assert verify(store).ok
