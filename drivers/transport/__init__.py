"""Transports move bytes; they know nothing about what the bytes mean."""
