"""Offline profiles: constant-time latency and power lookups per (GPU type, model)."""
