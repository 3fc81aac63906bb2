"""Pulse-oximeter codecs (sans-I/O): Bluetooth SIG PLX, BerryMed BCI and Nonin OEM III.

Every codec turns bytes into its own typed, frozen messages and then into the
one :class:`~drivers.oximeter.sample.OximeterSample` the rest of the gateway
consumes, so session logic never needs to know which oximeter a ward uses.
None of these modules does I/O: BLE and serial drivers feed them bytes.
:mod:`drivers.oximeter.downsample` is the signal processing on decoded
samples (BerryMed's 100 Hz -> 1 Hz windows), equally free of I/O and clocks.
"""
