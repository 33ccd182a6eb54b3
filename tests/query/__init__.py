"""The sandboxed DuckDB query engine (projections/query): SQL checks, safety, pool, slots."""
