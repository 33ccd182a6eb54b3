"""Who may do what: ``auth.py`` (API tokens, JWTs, grants, roles, rate limits),
``policies.py`` (row-level security and column masking), ``visibility.py`` (what the
policies let a caller see of a table's metadata) and ``audit.py`` (reading the audit
trail).

May import ``app.settings`` and the layers below (``events``, ``projections``).
"""
