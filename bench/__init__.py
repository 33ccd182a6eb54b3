"""Benchmarks of Ledgerlake against the raw limits of its parts (``make bench``)."""
