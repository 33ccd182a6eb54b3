"""The ``ledgerlake`` command line (app/cli), run as a user runs it."""
