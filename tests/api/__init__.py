"""The HTTP API (app/api): bad input, catalog reads and routes, the Iceberg REST catalog."""
