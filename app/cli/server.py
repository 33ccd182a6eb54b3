"""The long-running commands: ``serve`` (the API and the projector), ``worker``
(projections only) and ``mcp`` (the MCP tools over a running Ledgerlake)."""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from typing import Any

import anyio
import msgspec

from app.cli.common import is_loopback, redis_for
from app.services import Services
from app.settings import Settings, decode_path

log = logging.getLogger("ledgerlake.serve")

# How ``serve``'s server processes get their settings and Redis URL: the processes are
# spawned by uvicorn, which can only name a factory, so the parent leaves them here.
PEER_ENV = "_LEDGERLAKE_SERVE_PEER"
BACKGROUND_ENV = "_LEDGERLAKE_SERVE_BACKGROUND"
PR_SET_PDEATHSIG = 1


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    import uvicorn
    from uvicorn.config import STARTUP_FAILURE
    from uvicorn.supervisors import Multiprocess

    from app.api.app import create_app

    jwt_configured = (
        settings.jwt_hs256_secret or settings.jwt_public_key_file or settings.jwt_jwks_url
    )
    if not is_loopback(settings.host) and not settings.api_token and not jwt_configured:
        raise SystemExit(
            f"refusing to bind {settings.host}: it is not a loopback address and no "
            "authentication is configured (set LEDGERLAKE_API_TOKEN, or a JWT provider "
            "with LEDGERLAKE_JWT_*)"
        )
    processes = settings.server_processes
    with redis_for(settings) as url:
        if processes == 1:
            app = create_app(settings, url, bootstrap=is_loopback(settings.host), warm=True)
            uvicorn.run(app, host=settings.host, port=settings.port, log_config=None,
                        access_log=False)  # fmt: skip
            return 0
        # Once, here: the storage check (fail fast, as one process does) and the
        # admin token's bootstrap (not raced by the processes).
        _prepare(settings, url, bootstrap=is_loopback(settings.host))
        peer = {"settings": settings, "redis_url": url, "parent": os.getpid()}
        os.environ[PEER_ENV] = msgspec.json.encode(peer, enc_hook=str).decode()
        config = uvicorn.Config("app.cli.server:peer_app", factory=True, workers=processes,
                                host=settings.host, port=settings.port, log_config=None,
                                access_log=False)  # fmt: skip
        sock = listen(settings.host, settings.port)
        log.info("listening on http://%s:%d with %d server processes", settings.host,
                 sock.getsockname()[1], processes)  # fmt: skip
        background = Background(settings, url)
        background.start()
        # uvicorn's supervisor hands the socket to each process, restarts one that dies,
        # and stops them all (SIGTERM, graceful) on SIGINT or SIGTERM.
        supervisor = Multiprocess(config, sockets=[sock])
        try:
            supervisor.run()
        finally:
            background.stop()
        if any(p.exitcode == STARTUP_FAILURE for p in supervisor.processes):
            return STARTUP_FAILURE  # a process could not start: uvicorn stopped them all
    return 0


def listen(host: str, port: int) -> socket.socket:
    """The port, bound once for every server process. Made with its protocol named
    (uvicorn's own leaves it 0): asyncio turns Nagle's algorithm off only on connections
    of a socket whose protocol is TCP, and with it on, each response waited out the
    client's delayed ACK (about 40 ms)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SystemExit(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock


def _prepare(settings: Settings, url: str, *, bootstrap: bool) -> None:
    from app.api.app import bootstrap_token

    async def main() -> None:
        async with Services.open(settings, url) as services:  # (reaches the storage)
            if bootstrap:
                await bootstrap_token(services, settings)

    anyio.run(main)


def peer_app() -> Any:
    """The app of one of ``serve``'s server processes (uvicorn calls this in each
    process it spawned): a full peer, as a separate pod would be."""
    from app.api.app import create_app
    from app.logs import setup_logging

    peer = msgspec.json.decode(os.environ[PEER_ENV])
    _die_with(peer["parent"])
    settings = msgspec.convert(peer["settings"], Settings, strict=False, dec_hook=decode_path)
    setup_logging(settings.log_format, settings.log_level)
    # (The projections run in serve's background process.)
    return create_app(
        settings, peer["redis_url"], warm=True, storage_checked=True, run_projector=False
    )


def _die_with(parent: int) -> None:
    """Be killed when ``serve`` dies, even by SIGKILL: otherwise this process would keep
    the port. (The signal follows the thread that spawned this process: uvicorn spawns
    from its main thread, which lives as long as ``serve``.)"""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # serve died before the line above took effect
        os._exit(1)


async def _until_signal(stop: anyio.Event) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            stop.set()
            return


async def _work(settings: Settings, url: str, *, burst: bool = False) -> None:
    """What ``worker`` runs (and ``serve --workers N``'s background process): the
    projections, mirrors and archive, and background compaction, until SIGINT/SIGTERM;
    with ``burst``, the projections until they caught up."""
    async with Services.open(settings, url) as services:
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(_until_signal, stop)
            if settings.compact_interval_s > 0 and not burst:
                tg.start_soon(services.compact_forever, settings.compact_interval_s)
            if burst:
                n = await services.catch_up()
                print(f"projected {n} events", file=sys.stderr)
            else:
                await services.run_projections(stop)
            tg.cancel_scope.cancel()


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    with redis_for(settings) as url:
        anyio.run(lambda: _work(settings, url, burst=args.burst))
    return 0


class Background:
    """``serve --workers N``'s background process: the projection runners, the mirrors,
    the archive and compaction, apart from the server processes, whose requests then
    never wait behind a Delta or Iceberg commit for the GIL. Restarted if it dies;
    stopped (SIGTERM) after the server processes. It has its own session, so a Ctrl-C
    at the terminal reaches only ``serve``, which stops it last."""

    def __init__(self, settings: Settings, url: str) -> None:
        env = {k: v for k, v in os.environ.items() if k != PEER_ENV}
        peer = {"settings": settings, "redis_url": url, "parent": os.getpid()}
        env[BACKGROUND_ENV] = msgspec.json.encode(peer, enc_hook=str).decode()
        self.env = env
        self.stopping = threading.Event()
        self.process: subprocess.Popen[bytes] | None = None
        self.thread = threading.Thread(target=self._keep, name="background", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _keep(self) -> None:
        code = "from app.cli.server import background_main; background_main()"
        while not self.stopping.is_set():
            self.process = subprocess.Popen(
                [sys.executable, "-c", code], env=self.env, start_new_session=True
            )
            log.info("background process %d: projections, mirrors, archive", self.process.pid)
            status = self.process.wait()
            if self.stopping.is_set():
                return
            log.warning("the background process exited (%s); starting another", status)
            self.stopping.wait(1.0)

    def stop(self) -> None:
        self.stopping.set()
        process = self.process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.thread.join(timeout=5)


def background_main() -> None:
    """The entry of ``serve``'s background process (``Background``)."""
    from app.logs import setup_logging

    peer = msgspec.json.decode(os.environ[BACKGROUND_ENV])
    _die_with(peer["parent"])
    settings = msgspec.convert(peer["settings"], Settings, strict=False, dec_hook=decode_path)
    setup_logging(settings.log_format, settings.log_level)
    anyio.run(_work, settings, peer["redis_url"])


def cmd_mcp(settings: Settings, args: argparse.Namespace) -> int:
    """The MCP server as a client of a running Ledgerlake: over stdio with one token
    (``LEDGERLAKE_TOKEN``), or over streamable HTTP, where each MCP client brings its own
    bearer token. Either way the API decides what each call may do."""
    from app.mcp.server import run_stdio, standalone_app

    url = (args.url or os.environ.get("LEDGERLAKE_URL") or "http://127.0.0.1:8000").rstrip("/")
    if args.transport == "stdio":
        token = args.token or os.environ.get("LEDGERLAKE_TOKEN")
        if not token:
            raise SystemExit(
                "ledgerlake mcp needs LEDGERLAKE_TOKEN: an API token (POST "
                "/v1/principals/{id}/tokens) or a JWT, whose grants the tools will have"
            )
        run_stdio(settings, url, token)
        return 0
    import uvicorn

    host, port = args.host or "127.0.0.1", args.port or 8765
    print(f"MCP endpoint: http://{host}:{port}/mcp (Ledgerlake API: {url})", file=sys.stderr)
    uvicorn.run(
        standalone_app(settings, url), host=host, port=port, log_config=None, access_log=False
    )
    return 0
