"""The web console at ``/console``: ``pages.py`` (sign-in, sign-out and the page shell,
server-rendered from ``templates/``) and ``static/`` (its script and style, served from
the package: no build step, no third-party request).

May import ``app.services``, ``app.access`` and the layers below; ``app.api`` mounts it.
"""
