"""devicegw: ward-side gateway for nebulizers and pulse oximeters in a blinded trial."""

__version__ = "0.1.0"
