"""Tiny offline fixtures for tests, `check-upstream` and benchmarks: random models and datasets written to a folder."""
