"""Where a kernel's issued instructions go: a summary of Nsight Compute's source page.

`ncu -i report.ncu-rep --page source --csv --print-source sass` prints, per profiled kernel, a
"Kernel Name" line and then one row per SASS instruction with its executed count. That file
is megabytes per kernel; this reduces it to what a reader needs: per kernel launch, the total
warp instructions, the totals per opcode (FFMA, LDS, IMAD, ...) and the hottest instructions.

    python -m bench.kernels.sass_summary sass.csv --out DIR   # DIR/sass-summary.{json,md}
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import Counter
from pathlib import Path

COUNT = "Instructions Executed"


def parse(lines: list[str]) -> list[dict]:
    """One record per kernel section: name, total, per-opcode counts, the hottest rows."""
    kernels: list[dict] = []
    header: list[str] | None = None
    for row in csv.reader(lines):
        if not row:
            continue
        if row[0] == "Kernel Name":
            kernels.append({"kernel": row[1], "rows": []})
            header = None
        elif row[0] == "Address":
            header = row
        elif header is not None and kernels and len(row) == len(header):
            kernels[-1]["rows"].append(dict(zip(header, row, strict=True)))
    return [_summarize(k["kernel"], k["rows"]) for k in kernels]


def opcode(source: str) -> str:
    """`@!P0 LDS.64 R36, [R57]` -> `LDS` (the guard and the modifiers dropped)."""
    words = source.split()
    if not words:
        return "?"
    word = words[1] if words[0].startswith("@") and len(words) > 1 else words[0]
    return word.split(".")[0]


def _summarize(kernel: str, rows: list[dict], top: int = 12) -> dict:
    counts = [(int(r.get(COUNT) or 0), r.get("Source", "")) for r in rows]
    total = sum(n for n, _ in counts)
    by_opcode: Counter[str] = Counter()
    for n, source in counts:
        by_opcode[opcode(source)] += n
    hottest = sorted(counts, key=lambda c: -c[0])[:top]
    return {
        "kernel": kernel,
        "instructions": total,
        "by_opcode": dict(by_opcode.most_common()),
        "hottest": [{"count": n, "source": s.strip()} for n, s in hottest],
    }


def markdown(kernels: list[dict], opcodes: int = 10) -> str:
    lines = [
        "# Issued warp instructions per kernel launch (ncu source page)",
        "",
        "| launch | kernel | warp instructions | top 1 | top 2 | top 3 |",
        "|---|---|---|---|---|---|",
    ]
    for i, k in enumerate(kernels):
        total = k["instructions"] or 1
        top = [f"{op} {n / total:.1%}" for op, n in list(k["by_opcode"].items())[:3]]
        top += [""] * (3 - len(top))
        lines.append(f"| {i} | `{k['kernel']}` | {k['instructions']:,} | " + " | ".join(top) + " |")
    for i, k in enumerate(kernels):
        total = k["instructions"] or 1
        lines += ["", f"## launch {i}: `{k['kernel']}`", "", "| opcode | count | share |"]
        lines.append("|---|---|---|")
        for op, n in list(k["by_opcode"].items())[:opcodes]:
            lines.append(f"| {op} | {n:,} | {n / total:.1%} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", type=Path, help="ncu --page source --csv output")
    parser.add_argument("--out", type=Path, required=True, help="folder for sass-summary.*")
    args = parser.parse_args(argv)
    kernels = parse(args.csv.read_text().splitlines())
    if not kernels:
        print(f"{args.csv}: no 'Kernel Name' sections (not ncu's source page?)", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sass-summary.json").write_text(json.dumps(kernels, indent=1) + "\n")
    (args.out / "sass-summary.md").write_text(markdown(kernels))
    print(f"wrote {args.out}/sass-summary.json, .md ({len(kernels)} launches)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
