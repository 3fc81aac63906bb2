"""Transports move chunks of bytes; they know nothing about what the bytes mean.

One contract (:mod:`drivers.transport.base`: :class:`~drivers.transport.base.Link`,
a byte stream or one message per chunk, and the oximeters'
:class:`~drivers.transport.base.SampleSource`), several backends: serial
(:mod:`.serial_link`), BLE (:mod:`.ble_link`, :mod:`.ble_oximeter_link`, both
through :mod:`.ble_central`) and the in-memory twin (:mod:`.memory`); the
adapters between them live in :mod:`.adapters`.
"""
