"""Shared test helpers (no tests here): HTTP helpers, processes, mirror readers, servers."""
