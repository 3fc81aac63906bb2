"""The broker side: the reconnecting publisher over the outbox, and the embedded broker."""
