"""Ledgerlake's service: ``settings.py`` (configuration), ``services.py`` (the
composition root: every long-lived resource, built once), ``logs.py``, and one package per
role: ``api`` (HTTP), ``mcp`` (MCP tools), ``cli`` (command line), ``write`` (the command
side), ``access`` (who may do what), ``ops`` (recover, rebuild, export/import, gc, the
embedded Redis).

Imports point down: ``cli`` > ``api`` > ``ops`` > ``services`` > ``write`` > ``access`` >
``projections``, ``mirrors`` > ``events``; ``mcp`` is a client of the HTTP API and imports
only ``app.settings``. ``tests/project/test_layout.py`` checks it.
"""
