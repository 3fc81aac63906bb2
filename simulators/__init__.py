"""Device simulators that speak the real wire protocols behind real pseudo-terminals.

- :mod:`simulators.scenario`: TOML scenario files (what a device does and when),
  validated once at load time.
- :mod:`simulators.vm1_model`: the VM-1 nebulizer as a pure function of time and
  host commands (no I/O, no clock).
- :mod:`simulators.vm1_pty`: that model behind a pseudo-terminal, framed exactly
  as the device frames it, driven by an injected :class:`drivers.clock.Clock`.
- :mod:`simulators.run`: run several scenarios at once (``devicegw simulate``).
"""
