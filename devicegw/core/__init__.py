"""The core: sessions, dose checks, the SpO2 overlay and the VM-1 pipeline.

No transport, broker or database library (an import-linter contract); storage and
publishing are reached only through the protocols in :mod:`devicegw.core.ports`.
"""
