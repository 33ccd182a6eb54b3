"""The HTTP API: ``app.py`` (the Litestar factory, middleware, the one error map),
``routes/`` (one module per resource), ``iceberg_rest.py`` (the Iceberg REST catalog),
``schemas.py`` (wire structs), ``guards.py`` (the caller) and ``mcp_mount.py`` (the MCP
endpoint at ``/mcp``, in process).

May import ``app.services``, ``app.access``, ``app.write``, ``app.mcp`` (mounted at
``/mcp``) and the layers below; nothing below imports it.
"""
