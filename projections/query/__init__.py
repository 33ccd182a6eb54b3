"""The sandboxed DuckDB query engine: ``analysis`` (what a statement may do), ``views``
(a table version as SQL), ``pool`` (reused connections), ``types`` (what the engine
takes and gives), ``engine`` (running a query under its limits), ``sandbox`` (the
connection a query runs in), ``workers`` / ``worker`` / ``wire`` (the worker processes
queries run in, and what they send each other), ``predicate``
(restricted ``where`` conditions) and ``extensions`` (installed offline).

May import ``events`` and ``projections`` (catalog, arrow); nothing of ``app``.
"""
