"""Compare two result files of ``python -m bench`` (JSON): a Markdown table of each
figure before and after, with its ratio to the raw limit measured in the same run.

    python -m bench.compare bench/results/<before>.json bench/results/<after>.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from bench.core import fmt


def _ratio(m: dict[str, Any]) -> str:
    r = m.get("ratio")
    if r is None:
        return ""
    return f"{r:.0%}" if m["better"] == "higher" else f"{r:.2f}x"


def compare(before: dict[str, Any], after: dict[str, Any]) -> str:
    old = {(m["scenario"], m["case"], m["metric"]): m for m in before["results"]}
    lines = [
        "| scenario | case | metric | before | after | change | ratio to raw, before → after |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in after["results"]:
        b = old.get((m["scenario"], m["case"], m["metric"]))
        if b is None or b["median"] is None or m["median"] is None:
            continue
        change = m["median"] / b["median"] if b["median"] else float("nan")
        better = change > 1 if m["better"] == "higher" else change < 1
        word = f"{change:.2f}x" + (" (better)" if better and abs(change - 1) > 0.05 else "")
        lines.append(
            f"| {m['scenario']} | {m['case']} | {m['metric']} | {fmt(b['median'])} {m['unit']} "
            f"| {fmt(m['median'])} {m['unit']} | {word} | {_ratio(b)} → {_ratio(m)} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    before, after = (json.loads(Path(a).read_text()) for a in args)
    print(compare(before, after), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
