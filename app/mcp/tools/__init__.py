"""The MCP tools by theme, each module with a ``register(server, backend)``; they are clients
of the HTTP API (app.mcp.client) and never import the write side or projections."""
