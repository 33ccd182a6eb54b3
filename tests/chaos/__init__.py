"""The chaos suite: bounded loops of concurrent writers and readers against a real
``serve`` on Redis and S3 while, at seeded random points, ``serve`` and Redis are killed
and S3 is stopped, then every acknowledged write is counted (docs/CHAOS.md).

ledger.py records what was acknowledged and what went wrong, clients.py holds the
writers and readers, faults.py the seeded fault plan and its injector, verify.py the
final checks; the deployment itself is tests/support/chaos.py."""
