"""Shared by every product: params, catalog, file I/O, tracking, quality gates, environment."""
