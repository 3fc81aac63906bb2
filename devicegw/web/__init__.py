"""The ward dashboard, /metrics and the health endpoints (docs/dashboard.md)."""
