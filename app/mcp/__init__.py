"""The MCP server for LLM clients (server, gate, backend, budget, tools/) and its client of
the HTTP API; it may import app.mcp.client and app.settings, never the write side or projections."""
