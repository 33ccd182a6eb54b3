"""The ``ledgerlake`` command line: ``main.py`` (the arguments), one module per command
group (``server``, ``data``, ``ops``) and what they share (``common``).

The top of the stack: it may import any package; none imports it.
"""
