"""The published MQTT contract: payload models, vocabulary, topics and JSON Schemas."""
