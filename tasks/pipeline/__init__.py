"""Prefect tasks of the reproduction pipeline: one module per DVC stage (flows/<stage>.py)."""
