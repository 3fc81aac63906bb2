"""The pure core: sessions, dose checks, the SpO2 overlay and the VM-1 pipeline; no I/O."""
