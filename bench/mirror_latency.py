"""Write-to-mirror latency: how long after a write returns its Delta and Iceberg mirrors
reflect it, through a real server (uvicorn, embedded projections, local storage or S3).

    PYTHONPATH=. .venv/bin/python bench/mirror_latency.py [--writes 50] [--rows 1000]

Starts its own redis-server on a free port and stops it at the end. Prints the median,
p90 and max of (mirror published_at - write response) per format.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import uvicorn

from app.http import create_app
from app.settings import Settings
from tests.conftest import free_port, start_redis


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--writes", type=int, default=50)
    parser.add_argument("--rows", type=int, default=1000)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    (tmp / "redis").mkdir()
    proc, url = start_redis(tmp / "redis")
    settings = Settings(data_dir=tmp / "data", redis_url=url, inline_max_rows=0)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings, url), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=30) as client:
            while True:
                try:
                    client.get("/health")
                    break
                except httpx.TransportError:
                    time.sleep(0.05)
            lags: dict[str, list[float]] = {"delta": [], "iceberg": []}
            rows = [{"id": i, "name": f"n{i}", "amount": i * 1.5} for i in range(args.rows)]
            for _ in range(args.writes):
                written = client.post("/v1/bench/s/tables/t/rows", json=rows).json()
                done = datetime.now(UTC)
                pending = {"delta", "iceberg"}
                while pending:
                    detail = client.get("/v1/bench/s/tables/t").json()
                    for m in detail["mirrors"]:
                        if m["format"] in pending and m["version"] == written["version"]:
                            published = datetime.fromisoformat(m["published_at"])
                            lags[m["format"]].append((published - done).total_seconds())
                            pending.discard(m["format"])
                    time.sleep(0.005)
        for fmt, values in lags.items():
            values.sort()
            print(
                f"{fmt}: median {statistics.median(values) * 1000:.0f} ms, "
                f"p90 {values[int(len(values) * 0.9) - 1] * 1000:.0f} ms, "
                f"max {values[-1] * 1000:.0f} ms over {len(values)} writes of {args.rows} rows"
            )
    finally:
        server.should_exit = True
        thread.join()
        proc.terminate()
        proc.wait(timeout=10)


if __name__ == "__main__":
    main()
