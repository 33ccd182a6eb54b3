"""What the commands share: the Redis to use, the services on it, a progress line,
``org/super/table`` arguments, requests to a running Ledgerlake (``--api``), and printing
a result table."""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import anyio

from app.ops.embedded_redis import EmbeddedRedis
from app.services import Services
from app.settings import Settings


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@contextmanager
def redis_for(settings: Settings) -> Iterator[str]:
    """The Redis URL to use: the configured one, or the embedded server of the data dir
    (started if it is not running, and stopped on exit if nobody else uses it)."""
    if settings.external_redis:
        yield settings.redis_url or ""  # "" : connect as the settings say (e.g. Sentinel)
        return
    embedded = EmbeddedRedis(
        settings.data_dir, binary=settings.redis_server, appendfsync=settings.redis_appendfsync
    )
    url = embedded.start()
    try:
        yield url
    finally:
        embedded.stop_if_last()


def with_services(settings: Settings, body: Callable[[Services], Awaitable[int]]) -> int:
    """Run ``body`` with the services on the configured (or embedded) Redis."""

    async def main(url: str) -> int:
        async with Services.open(settings, url) as services:
            return await body(services)

    with redis_for(settings) as url:
        return anyio.run(main, url)


class Progress:
    """A one-line progress report on stderr, at most a few times per second."""

    def __init__(self, what: str, unit: str) -> None:
        self.what, self.unit = what, unit
        self.started = time.monotonic()
        self.last = self.started
        self.tty = sys.stderr.isatty()

    def __call__(self, done: int) -> None:
        t = time.monotonic()
        if t - self.last < 0.5:
            return
        self.last = t
        self._print(done, end="\r" if self.tty else "\n")

    def _print(self, done: int, end: str) -> None:
        rate = done / max(time.monotonic() - self.started, 1e-6)
        print(f"{self.what}: {done:,} {self.unit} ({rate:,.0f}/s)", end=end, file=sys.stderr)

    def finish(self, done: int) -> None:
        self._print(done, end="\n")


def split(value: str, parts: int, what: str) -> list[str]:
    """``org/super`` or ``org/super/table`` as its names; exits with a message otherwise."""
    pieces = value.split("/")
    if len(pieces) != parts or not all(pieces):
        raise SystemExit(f"{what} must look like {'/'.join(['name'] * parts)}, not {value!r}")
    return pieces


def api_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--api",
        help="send it to a running Ledgerlake at this URL (e.g. http://host:8000) "
        "instead of working on Redis and storage directly",
    )
    p.add_argument("--token", help="bearer token for --api (default: LEDGERLAKE_TOKEN)")


def api_call(args: argparse.Namespace, method: str, path: str, **kwargs: Any) -> Any:
    """A request to a running Ledgerlake (``--api``) with ``--token`` (or
    LEDGERLAKE_TOKEN): the server's authentication and authorization apply, exactly as
    for any HTTP client. Exits 1 with the server's error on a refusal."""
    import httpx

    token = args.token or os.environ.get("LEDGERLAKE_TOKEN")
    if not token:
        raise SystemExit("--api needs --token (or LEDGERLAKE_TOKEN)")
    headers = {"Authorization": f"Bearer {token}", **kwargs.pop("headers", {})}
    try:
        response = httpx.request(
            method, args.api.rstrip("/") + path, headers=headers, timeout=300, **kwargs
        )
    except httpx.HTTPError as exc:
        raise SystemExit(f"cannot reach {args.api}: {exc}") from exc
    if response.status_code >= 400:
        from app.mcp.client import api_error

        error = api_error(response)
        raise SystemExit(f"{error.status} {error.code}: {error.message}")
    return response


def print_table(table: Any, fmt: str) -> None:
    """A result on stdout: CSV, one JSON object per row, or an aligned text table."""
    if fmt == "csv":
        import pyarrow.csv as pacsv

        pacsv.write_csv(table, sys.stdout.buffer)
        return
    if fmt == "json":
        for row in table.to_pylist():
            print(json.dumps(row, default=str))
        return
    names = table.column_names
    rows = [[str(v) for v in row.values()] for row in table.to_pylist()]
    widths = [max([len(n)] + [len(r[i]) for r in rows]) for i, n in enumerate(names)]
    print(" | ".join(n.ljust(w) for n, w in zip(names, widths, strict=True)))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))
