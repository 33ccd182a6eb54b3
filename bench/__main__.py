"""Run the benchmarks: ``make bench`` (or ``python -m bench``).

    python -m bench [--full] [--runs 3] [--only ingest,query] [--out bench/results]

Each benchmark starts its own redis-server and ``ledgerlake serve`` in a temporary
directory, runs ``--runs`` times, measures its raw limit in each run, and stops both.
The results are printed as a Markdown table and saved (JSON and Markdown) under
``--out``. The default sizes take a few minutes on 2 cores; ``--full`` uses the sizes
of docs/BENCHMARKS.md (10M rows, 1M events), which takes much longer.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from bench import (
    ingest,
    isolation,
    lag,
    memory,
    peers,
    query,
    replay,
    scaling,
    upserts,
    versus,
    writes,
)
from bench.core import Measure, Server, markdown, serve

Run = Callable[[Server, int, bool], list[Measure]]
# Each benchmark: what it runs, and the settings of its server (over serve()'s own:
# no mirrors, no archive, no rate limit, unless given here).
BENCHMARKS: dict[str, tuple[Run, dict[str, str]]] = {
    "ingest": (ingest.run, {}),
    "writes": (writes.run, {}),
    "writes-defaults": (writes.run_defaults, writes.DEFAULT_ENV),
    "upserts": (upserts.run, upserts.SERVER_ENV),
    "query": (query.run, {}),
    "isolation": (isolation.run, {}),
    "peers": (peers.run, peers.SERVER_ENV),
    "scaling": (scaling.run, scaling.SERVER_ENV),
    "replay": (replay.run, {}),
    "lag": (lag.run, {"LEDGERLAKE_MIRRORS": "delta,iceberg"}),
    "memory": (memory.run, {}),
    "versus": (versus.run, versus.SERVER_ENV),
}


def machine() -> dict[str, str]:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
    from app.ops.embedded_redis import find_redis_server

    redis_version = (
        subprocess.run(
            [find_redis_server(None), "--version"], capture_output=True, text=True, check=False
        )
        .stdout.split(" v=")[-1]
        .split()[0]
    )
    disk = subprocess.run(
        ["df", "-h", "--output=fstype,size", tempfile.gettempdir()],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()[-2:]
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory_gib": f"{int(mem) / 1024 / 1024:.0f}",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "redis": redis_version,
        "temp_disk": " ".join(disk),
        "commit": commit,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="the full sizes (slow)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each benchmark")
    parser.add_argument("--only", default="", help="comma-separated: " + ", ".join(BENCHMARKS))
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    chosen = [b for b in args.only.split(",") if b] or list(BENCHMARKS)
    unknown = [b for b in chosen if b not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")
    info = machine()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    results: list[Measure] = []
    timings: dict[str, float] = {}
    for name in chosen:
        run, env = BENCHMARKS[name]
        started = time.monotonic()
        print(f"== {name} ...", flush=True)
        with serve(env=env) as server:
            measures = run(server, args.runs, args.full)
        timings[name] = time.monotonic() - started
        print(markdown(measures), flush=True)
        print(f"   ({timings[name]:.0f} s)", flush=True)
        results += measures
    table = markdown(results)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    args.out.mkdir(parents=True, exist_ok=True)
    size = "full" if args.full else "default"
    (args.out / f"{stamp}-{size}.json").write_text(
        json.dumps(
            {
                "machine": info,
                "size": size,
                "runs": args.runs,
                "seconds": timings,
                "results": [m.as_json() for m in results],
            },
            indent=1,
        )
    )
    (args.out / f"{stamp}-{size}.md").write_text(table)
    print(table)
    missed = [m for m in results if m.met is False]
    for m in missed:
        print(f"target missed: {m.scenario}, {m.case}, {m.metric}: {m.target}", file=sys.stderr)
    print(f"total {sum(timings.values()):.0f} s; results in {args.out}/{stamp}-{size}.*")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
