"""VM-1 vibrating-mesh nebulizer: messages, payload codec and serial framing (ICD rev 1.0)."""
