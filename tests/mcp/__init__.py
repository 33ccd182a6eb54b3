"""The MCP server (app/mcp): its pure logic and the server driven by a real MCP client."""
