"""Device protocol codecs (sans-I/O) and the transports that move their bytes."""
