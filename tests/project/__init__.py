"""Project-level checks: settings and extensions, README completeness, compose.yaml, and
the code layout (layers, cycles, module sizes)."""
